//! Drives the real binaries from tests, the demo and the benchmarks: a supervisor in a runtime
//! directory of its own, and simulated VMs (`uffd-vmsim run`) as child processes steered over
//! their stdin/stdout (one command, one JSON answer); what processes hold ([`procfs`]) and
//! what the page cache holds ([`pagecache`]), read from the kernel; a test's share of the
//! machine's 2 MiB hugepages ([`hugepages`]) and what a test does where the machine lacks
//! something ([`requirement`]).
//!
//! Test support: a dev-dependency of the crates whose tests use it, and a dependency of the
//! simulator's drivers (`uffd-demo`, `uffd-bench` in `vmsim/`); never a dependency of a service.
//! It may depend on the protocol library (`uffdpager`) and on nothing else of this workspace.

mod build;
pub mod hugepages;
#[allow(unsafe_code)]
pub mod pagecache;
pub mod procfs;
pub mod requirement;
pub mod smaps;
mod supervisor;
mod vm;

pub use build::{binary, build_sibling_binaries, ALL_BINARIES};
pub use hugepages::{reserve_for_test as reserve_hugepages_for_test, HugepageReservation};
pub use requirement::machine_lacks;
pub use supervisor::{health_ok, pager_pids, SupervisorOptions, SupervisorProcess};
pub use vm::{stdout_lines, VmProcess, VmProcessError};

use std::path::PathBuf;

/// Where the project's binaries are: beside the current executable, or one directory up (test
/// executables live in `target/<profile>/deps`).
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current executable");
    let dir = exe.parent().expect("executable has a directory");
    for d in [Some(dir), dir.parent()].into_iter().flatten() {
        let p = d.join(name);
        if p.is_file() {
            return p;
        }
    }
    dir.join(name)
}
