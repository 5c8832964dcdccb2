//! Drives the real binaries from tests, the demo and the benchmarks: a supervisor in a runtime
//! directory of its own, and simulated VMs (`uffd-vmsim run`) as child processes steered over
//! their stdin/stdout (one command, one JSON answer); what processes hold ([`procfs`]) and
//! what the page cache holds ([`pagecache`]), read from the kernel.

mod build;
pub mod pagecache;
pub mod procfs;
mod supervisor;
mod vm;

pub use build::build_sibling_binaries;
pub use supervisor::{health_ok, pager_pids, SupervisorOptions, SupervisorProcess};
pub use vm::{VmProcess, VmProcessError};

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
