//! A session's descriptors taken back from its VMM, for a session that no pager serves and no
//! supervisor holds any more: its pager died, and the supervisor that held the duplicates was
//! killed (or stopped) before it could have the session adopted.
//!
//! Only the VMM still holds what matters: Firecracker keeps its own uffd for the VM's life. The
//! supervisor (root: `pidfd_getfd(2)` needs ptrace access to the VMM) takes a duplicate of it
//! through a pidfd of the VMM, finding the descriptor in `/proc/<vmm>/fd` by the (device, inode)
//! recorded at the handshake — every userfaultfd has an inode of its own. The rest comes from
//! the runtime directory: the memory file is reopened by path (it must be the same file: device
//! and inode are checked), the removed-ranges log is a file there. The VMM stream is gone with
//! its last holders; the pager watches a pidfd of the VMM instead (`VmmFd::Pidfd`: readable once
//! the VMM has exited). The VMM process is checked to be the one that connected (its start time,
//! recorded at the handshake), so that a reused pid is never taken for it.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use uffdpager::handoff::{HandoffRequest, SessionFds, VmmFd};
use uffdpager::removed_log::RemovedLog;

use crate::pidfd;
use crate::runtime_state::{read_session_overlays, removed_log_path, ConnectedMeta, SessionMeta};

/// Why a session's descriptors could not be taken back from its VMM.
#[derive(Debug, thiserror::Error)]
pub enum VmmFdsError {
    #[error("its VMM (pid {0}) has exited")]
    VmmGone(u32),
    #[error("cannot open a pidfd of its VMM (pid {pid}): {source}")]
    Pidfd { pid: u32, source: std::io::Error },
    #[error("its VMM (pid {pid}) holds no userfaultfd with inode {ino} any more")]
    NoUffd { pid: u32, ino: u64 },
    #[error(
        "process {holder} holds its uffd too: a pager this supervisor could not take over may \
         serve it (two pagers must never serve one uffd)"
    )]
    HeldElsewhere { holder: u32 },
    #[error("taking the uffd from its VMM (pid {pid}, fd {fd}): {source}")]
    GetFd { pid: u32, fd: i32, source: std::io::Error },
    #[error("reopening the memory file: {0}")]
    MemoryFile(#[from] crate::memory_file::MemoryFileError),
    #[error("the memory file {path} is not the one the session was created on (another inode)")]
    MemoryFileReplaced { path: String },
    #[error("reopening the removed-ranges log: {0}")]
    RemovedLog(#[from] uffdpager::removed_log::RemovedLogError),
    #[error("reading back its overlays: {0}")]
    Overlays(std::io::Error),
}

/// The start time of process `pid` (`/proc/<pid>/stat` field 22, clock ticks since boot).
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_start_time(&stat)
}

/// Field 22 of a `/proc/<pid>/stat` line (the command name, field 2, may hold spaces and
/// parentheses: fields are counted after its last `)`).
pub fn parse_start_time(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    // `rest` starts at field 3 (state); field 22 is the 20th from there.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// The (device, inode) of an open descriptor.
/// (An `fstat` of the descriptor itself: no duplicate, so it works with no descriptor to spare.)
pub fn fd_id(fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<(u64, u64)> {
    let st = nix::sys::stat::fstat(std::os::fd::AsRawFd::as_raw_fd(&fd))?;
    Ok((st.st_dev, st.st_ino))
}

/// The number of the descriptor of process `pid` whose target has (device, inode) `id`.
fn find_fd(pid: u32, id: (u64, u64)) -> Option<i32> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    dir.flatten().find_map(|e| {
        let n: i32 = e.file_name().to_str()?.parse().ok()?;
        let meta = std::fs::metadata(e.path()).ok()?;
        ((meta.dev(), meta.ino()) == id).then_some(n)
    })
}

/// A live process other than `except` that holds a descriptor of (device, inode) `id`: the
/// pager serving a uffd always holds it. Scans every process's descriptors (only at startup, for
/// sessions no pager listed).
fn other_holder(id: (u64, u64), except: &[u32]) -> Option<u32> {
    let procs = std::fs::read_dir("/proc").ok()?;
    procs.flatten().find_map(|p| {
        let pid: u32 = p.file_name().to_str()?.parse().ok()?;
        if except.contains(&pid) {
            return None;
        }
        find_fd(pid, id).map(|_| pid)
    })
}

/// Takes session `meta`'s descriptors back from its VMM and the runtime directory. Blocking
/// (procfs and file system calls).
///
/// `serving_pager`: the pager known to serve the session, if any; any other process holding the
/// uffd refuses it ([`VmmFdsError::HeldElsewhere`]).
pub fn take_from_vmm(
    meta: &SessionMeta,
    connected: &ConnectedMeta,
    sessions_dir: &Path,
    serving_pager: Option<u32>,
) -> Result<(HandoffRequest, SessionFds), VmmFdsError> {
    let pid = connected.request.vmm_pid;
    let vmm = pidfd::open_owned(pid).map_err(|source| {
        if source.raw_os_error() == Some(libc::ESRCH) {
            VmmFdsError::VmmGone(pid)
        } else {
            VmmFdsError::Pidfd { pid, source }
        }
    })?;
    // Checked after the pidfd is open: from here the pid cannot name another process.
    if start_time(pid) != Some(connected.vmm_start_time) || exited(&vmm) {
        return Err(VmmFdsError::VmmGone(pid));
    }
    let target = find_fd(pid, connected.uffd_id)
        .ok_or(VmmFdsError::NoUffd { pid, ino: connected.uffd_id.1 })?;
    let except = [Some(pid), Some(std::process::id()), serving_pager];
    let except: Vec<u32> = except.into_iter().flatten().collect();
    if let Some(holder) = other_holder(connected.uffd_id, &except) {
        return Err(VmmFdsError::HeldElsewhere { holder });
    }
    let uffd = pidfd::get_fd(vmm.as_fd(), target).map_err(|source| VmmFdsError::GetFd {
        pid,
        fd: target,
        source,
    })?;
    let memory = crate::memory_file::open(&meta.memory_file)?;
    let found = fd_id(memory.file.as_fd()).ok();
    if meta.memory_file_id != (0, 0) && found != Some(meta.memory_file_id) {
        return Err(VmmFdsError::MemoryFileReplaced { path: meta.memory_file.clone() });
    }
    let (_log, removed_log) = RemovedLog::open_file(&removed_log_path(sessions_dir, &meta.id))?;
    let overlay = read_session_overlays(sessions_dir, meta).map_err(VmmFdsError::Overlays)?;
    let mut request = connected.request.clone();
    request.vmm_fd = VmmFd::Pidfd;
    let fds = SessionFds {
        uffd,
        memory_file: OwnedFd::from(memory.file),
        vmm_stream: vmm,
        removed_log: Some(removed_log),
        overlay: overlay.map(|o| o.fd),
    };
    Ok((request, fds))
}

/// A pidfd reads as ready once its process has exited.
fn exited(pidfd: &OwnedFd) -> bool {
    vmm_gone(pidfd.as_fd(), VmmFd::Pidfd)
}

/// True when a session's VMM descriptor says the VMM is gone: EOF or hang-up on its stream, a
/// readable pidfd. Never blocks.
pub fn vmm_gone(fd: std::os::fd::BorrowedFd<'_>, kind: VmmFd) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let events = match kind {
        // nix names no POLLRDHUP: the kernel's bit, as libc spells it.
        VmmFd::Stream => PollFlags::from_bits_retain(libc::POLLRDHUP),
        VmmFd::Pidfd => PollFlags::POLLIN,
    };
    // Only the asked-for event, POLLHUP or POLLERR can be reported (the kernel adds the last two
    // unasked): any of them means the VMM is gone. (nix cannot decode a POLLRDHUP `revents`.)
    let mut fds = [PollFd::new(fd, events)];
    matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;

    use super::*;

    #[test]
    fn the_start_time_is_field_22_even_after_a_name_with_parentheses() {
        let stat = "4242 (a (b) c) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 \
                    98765 1000 10 18446744073709551615";
        assert_eq!(parse_start_time(stat), Some(98765));
        assert_eq!(parse_start_time("garbage"), None);
        assert!(start_time(std::process::id()).is_some());
    }

    #[test]
    fn a_closed_stream_and_an_exited_process_read_as_gone() {
        let (a, b) = UnixStream::pair().unwrap();
        assert!(!vmm_gone(a.as_fd(), VmmFd::Stream));
        drop(b);
        assert!(vmm_gone(a.as_fd(), VmmFd::Stream));
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let fd = pidfd::open_owned(child.id()).unwrap();
        assert!(!vmm_gone(fd.as_fd(), VmmFd::Pidfd));
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(vmm_gone(fd.as_fd(), VmmFd::Pidfd));
    }

    #[test]
    fn a_descriptor_of_another_process_is_found_by_its_inode_and_taken() {
        let uffd = uffdpager::uffd_ops::firecracker_uffd(true).expect("userfaultfd");
        let id = fd_id(uffd.as_fd()).unwrap();
        let me = std::process::id();
        let n = find_fd(me, id).expect("found in /proc/self/fd");
        let pidfd = pidfd::open_owned(me).unwrap();
        let copy = pidfd::get_fd(pidfd.as_fd(), n).unwrap();
        assert_eq!(fd_id(copy.as_fd()).unwrap(), id);
        let other = uffdpager::uffd_ops::firecracker_uffd(true).expect("userfaultfd");
        assert_ne!(fd_id(other.as_fd()).unwrap(), id, "each uffd has an inode of its own");
    }
}
