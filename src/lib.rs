//! uffd-pager's shared library: the generated gRPC API, Firecracker's handshake, the
//! supervisor → pager handoff, userfaultfd operations, page-range bookkeeping, and the VM
//! simulator used by tests, benchmarks and the demo.

pub mod accept_backoff;
pub mod api;
pub mod duration;
pub mod firecracker;
pub mod grpc;
pub mod handoff;
pub mod harness;
pub mod logging;
pub mod metrics;
pub mod overlay;
pub mod pages;
pub mod peer_auth;
pub mod removed_log;
pub mod scm;
pub mod tls;
pub mod uffd_fd;
pub mod uffd_msg;
pub mod uffd_ops;
pub mod vmsim;
pub mod working_set;
