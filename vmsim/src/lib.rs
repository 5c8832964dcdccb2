//! `uffd-vmsim`'s library: a VMM stand-in that restores guest memory exactly as Firecracker does
//! with the `Uffd` memory backend, runs guest-like workloads on it and verifies every byte it
//! reads against the memory file. It is the test client, the benchmarks' load generator and the
//! demo's VM.
//!
//! - [`memfile`]: synthetic memory files (random pages, written zero pages, sparse holes).
//! - [`Vm::restore`]: Firecracker's restore steps and handshake ([`guest`]).
//! - [`expect`]: what each page must hold, checked under a per-page seqlock.
//! - [`Vm::read_random`], [`Vm::read_range`], [`Vm::write_pages`], [`Vm::balloon`],
//!   [`Vm::verify_all`], [`Vm::spawn_reader`]: workloads, each returning a [`Report`].
//! - [`Vm::standby`]: the guest's memory written to a new snapshot memory file, as Firecracker
//!   writes a Full snapshot, every page verified on the way ([`standby`]).
//! - [`run_with_deadline`]: bounding work that a broken pager would block forever.
//! - [`uffd_registered_vmas`]: the kernel's word (`/proc/<pid>/smaps`) on whether a VM still
//!   depends on its pager.
//! - [`control`]: the stdin/stdout line protocol of the `uffd-vmsim` binary.
//!
//! The crate (`vmsim/`) also holds the binaries that drive the real services: `uffd-vmsim`, the
//! demo (`uffd-demo`), the bench (`uffd-bench`) and `uffd-hostile-vmm`. It may depend on the
//! protocol library (`uffdpager`) and on the test support (`testkit`); no service depends on it
//! (the end-to-end tests do, as a dev-dependency).

#![deny(unsafe_code)]

pub mod control;
pub mod deadline;
pub mod expect;
pub mod guest;
#[allow(unsafe_code)]
mod mapping;
pub mod memfile;
pub mod parse;
pub mod reader;
pub mod report;
/// The kernel's word on uffd registrations: test support's reader (`testkit::smaps`).
pub use testkit::smaps;
pub mod standby;
pub mod workload;

#[cfg(test)]
#[allow(unsafe_code)]
// Test values are small and known: plain `as` casts.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_possible_wrap)]
mod testpager;
#[cfg(test)]
// Test values are small and known: plain `as` casts.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_possible_wrap)]
mod tests;

pub use control::{parse_workload_list, Command, CommandRunner, Reply};
pub use deadline::{run_with_deadline, DeadlineError};
pub use expect::{PageState, MAX_GENERATION};
pub use guest::{GuestRegionSpec, Vm, VmError};
pub use memfile::{
    write_memory_file, write_memory_file_layout, MemoryFileLayout, MemoryFileSpec, PageCounts,
    PageKind,
};
pub use parse::{parse_size, Amount};
pub use reader::ReaderHandle;
pub use report::Report;
pub use smaps::{uffd_registered_vmas, uffd_registered_vmas_in};
pub use standby::{SnapshotInfo, StandbyError};
pub use workload::WorkloadError;

/// A 64-bit mix of two values (splitmix64's finaliser): the source of every deterministic
/// choice and pattern of the simulator.
pub(crate) fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(0x632B_E59B_D9B4_E019);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
