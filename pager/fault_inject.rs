//! Fault-injection hooks for tests, off unless an environment variable names them. They let a
//! test kill the pager at one exact point that no outside signal could hit reliably.
//!
//! - `UFFD_PAGER_KILL_AFTER_REMOVE_READ=PATH`: the first time this pager reads a batch of uffd
//!   events holding a REMOVE (or UNMAP), and only if it can create the file `PATH` (which must
//!   not exist), it kills itself with SIGKILL right after the `read(2)` and before recording the
//!   range anywhere: the window `uffdpager::removed_log` closes. The marker file makes it fire
//!   once per test, however many pager processes inherit the variable.
//!
//! - `UFFD_PAGER_DELAY_WORKING_SET_SAVE_MS=N`: each working-set save waits N ms before it
//!   writes, so that a test sees a session finish before its recording is saved.
//!
//! Nothing sets these in a normal deployment; a pager started without them never looks again.

use std::path::PathBuf;
use std::sync::OnceLock;

/// The variable naming the marker of [`after_remove_read`].
pub const KILL_AFTER_REMOVE_READ: &str = "UFFD_PAGER_KILL_AFTER_REMOVE_READ";

fn marker() -> Option<&'static PathBuf> {
    static MARKER: OnceLock<Option<PathBuf>> = OnceLock::new();
    MARKER.get_or_init(|| std::env::var_os(KILL_AFTER_REMOVE_READ).map(PathBuf::from)).as_ref()
}

/// Called right after a `read(2)` of uffd events that returned a REMOVE or UNMAP.
pub fn after_remove_read() {
    let Some(path) = marker() else { return };
    if std::fs::OpenOptions::new().write(true).create_new(true).open(path).is_ok() {
        tracing::warn!(
            hook = KILL_AFTER_REMOVE_READ,
            "fault injection: killing this pager after reading a REMOVE"
        );
        // SIGKILL, as `kill -9` would: no unwinding, no cleanup, nothing written after the read.
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}

/// The variable of [`before_working_set_save`].
pub const DELAY_WORKING_SET_SAVE_MS: &str = "UFFD_PAGER_DELAY_WORKING_SET_SAVE_MS";

/// Called by a working-set save thread before it writes.
pub fn before_working_set_save() {
    static DELAY: OnceLock<Option<u64>> = OnceLock::new();
    let delay = DELAY
        .get_or_init(|| std::env::var(DELAY_WORKING_SET_SAVE_MS).ok().and_then(|v| v.parse().ok()));
    if let Some(ms) = *delay {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}
