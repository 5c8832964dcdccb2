//! Why a session cannot go on being served, and how a fill treats discarded pages: what the
//! session, the sweep, the copy threads and graduation share (a leaf: it depends on nothing of
//! the pager's).

use std::time::Duration;

use nix::errno::Errno;

/// Why a session cannot go on being served.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("the VMM's memory is gone ({0}: its address space has no users): the VMM exited")]
    Gone(Errno),
    #[error("the VMM is gone: {0}")]
    VmmGone(String),
    #[error(
        "{op} of {len} bytes at {addr:#x} found no registered mapping there (ENOENT), though \
         the VMM runs and its regions are registered"
    )]
    NoMapping { op: &'static str, addr: u64, len: u64 },
    #[error("UFFDIO_COPY of {len} bytes at {addr:#x} failed: {errno}")]
    Fill { addr: u64, len: u64, errno: Errno },
    #[error("reading userfaultfd events failed: {0}")]
    ReadEvents(String),
    #[error("the kernel answered EAGAIN for {0:?} with no event to read")]
    Stuck(Duration),
    #[error("UFFDIO_UNREGISTER of {len} bytes at {addr:#x} failed: {errno}")]
    Unregister { addr: u64, len: u64, errno: Errno },
    #[error("memory file {file}: {error}")]
    StatFile { file: String, error: String },
    #[error("memory file {file} is {len} bytes now, shorter than the {need} bytes the regions need (truncated?)")]
    Truncated { file: String, len: u64, need: u64 },
}

/// How a fill treats pages the VMM discarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FillMode {
    /// A fault: removed pages are zero-filled (the guest must read zeros there).
    OnFault,
    /// A populate: removed pages are left alone (after unregister the kernel zero-fills them).
    Populate,
}
