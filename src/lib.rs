//! uffd-pager's shared protocol library: the generated gRPC API, Firecracker's handshake and
//! wire format, SCM_RIGHTS, the supervisor → pager handoff, userfaultfd operations and their
//! outcomes, the removed-ranges log, page-range bookkeeping, and what the three services share
//! (gRPC over Unix sockets, peer authentication, TLS, metrics, logging, configuration errors).
//!
//! It may depend on nothing of this workspace and on nothing test-only: the services
//! (`pager/`, `supervisor/`, `controller/`) depend on it, and so do the simulator (`vmsim/`) and
//! the test support (`testkit/`), never the other way round.

pub mod accept_backoff;
pub mod api;
pub mod config_error;
pub mod duration;
pub mod firecracker;
pub mod grpc;
pub mod handoff;
pub mod logging;
pub mod metrics;
pub mod overlay;
pub mod pages;
pub mod peer_auth;
#[allow(unsafe_code)]
pub mod removed_log;
#[allow(unsafe_code)]
pub mod scm;
pub mod tls;
pub mod uffd_fd;
#[allow(unsafe_code)]
pub mod uffd_msg;
#[allow(unsafe_code)]
pub mod uffd_ops;
pub mod working_set;
