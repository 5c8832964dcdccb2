//! Process file descriptors (`pidfd_open(2)`, `pidfd_send_signal(2)`, Linux 5.3+): waiting for
//! and signalling a pager by a handle that cannot come to name another process.
//!
//! A supervisor restarted while pagers still ran is not their parent: it cannot `waitpid` them,
//! and a bare pid may be reused once such a pager exits. A pidfd refers to the one process it was
//! opened for; it becomes readable when that process has exited (zombie or reaped), and a signal
//! sent through it never reaches a later process with the same pid. Pagers this supervisor
//! starts get one too, so that every pager is signalled the same way.
//!
//! A restarted supervisor that finds a session no pager serves any more takes the session's uffd
//! back from its VMM, through a pidfd of the VMM (`pidfd_getfd(2)`, see `vmm_fds.rs`).
//!
//! The only unsafe code of the supervisor: three raw `syscall(2)`s with integer arguments (libc
//! has no wrapper for them, and `nix` 0.29 none for the first), and tokio's registration of the
//! pidfd it owns.

#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::Signal;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// `SO_PEERPIDFD` from `asm-generic/socket.h` (x86-64 and arm64; not exported by libc 0.2).
const SO_PEERPIDFD: libc::c_int = 77;

/// A pidfd, registered with tokio so that its exit can be awaited.
#[derive(Debug)]
pub struct PidFd {
    pid: u32,
    fd: AsyncFd<OwnedFd>,
}

impl PidFd {
    /// Opens a pidfd for `pid`. Fails with ESRCH if no such process exists (a zombie still
    /// exists: see [`PidFd::has_exited`]). Must run inside a tokio runtime.
    pub fn open(pid: u32) -> io::Result<Self> {
        let owned = open_owned(pid)?;
        Self::register(pid, owned)
    }

    /// A pidfd of the process at the other end of a connected Unix socket, whose
    /// `SO_PEERCRED` pid is `pid`: `SO_PEERPIDFD` (Linux 6.5+) names the very process that
    /// connected, even if it has exited and its pid was given to another process since; on an
    /// older kernel, `pidfd_open(pid)`. Must run inside a tokio runtime.
    pub fn of_peer(sock: BorrowedFd<'_>, pid: u32) -> io::Result<Self> {
        let mut raw: libc::c_int = -1;
        let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>())
            .expect("an int's size fits a socklen_t");
        // SAFETY: getsockopt writes at most `len` bytes (one int) into `raw`, which lives on
        // this stack frame for the call, and updates `len`; the socket fd is borrowed, valid.
        let ret = unsafe {
            libc::getsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                SO_PEERPIDFD,
                (&raw mut raw).cast::<libc::c_void>(),
                &mut len,
            )
        };
        if ret != 0 || raw < 0 {
            let err = io::Error::last_os_error();
            // ENOPROTOOPT: a kernel without SO_PEERPIDFD. Anything else: the peer is gone.
            if ret != 0 && err.raw_os_error() != Some(libc::ENOPROTOOPT) {
                return Err(err);
            }
            return Self::open(pid);
        }
        // SAFETY: the kernel just installed `raw` in our table for this call; nothing else
        // owns it, so OwnedFd takes it over and closes it once.
        let owned = unsafe { OwnedFd::from_raw_fd(raw) };
        nix::fcntl::fcntl(
            owned.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        )
        .map_err(io::Error::from)?;
        Self::register(pid, owned)
    }

    fn register(pid: u32, owned: OwnedFd) -> io::Result<Self> {
        // SAFETY: the AsyncFd takes ownership of the OwnedFd and is the only holder of that
        // descriptor: it stays open, and names the same pidfd, until the AsyncFd is dropped.
        let fd = unsafe { AsyncFd::register_with_interest(owned, Interest::READABLE) }
            .map_err(io::Error::from)?;
        Ok(Self { pid, fd })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// True once the process has exited (a zombie counts as exited).
    pub fn has_exited(&self) -> bool {
        let mut fds = [PollFd::new(self.fd.get_ref().as_fd(), PollFlags::POLLIN)];
        matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
    }

    /// Completes once the process has exited.
    pub async fn wait_exit(&self) {
        loop {
            match self.fd.readable().await {
                // Readiness stays set: a pidfd, once readable, is readable for good.
                Ok(_guard) => return,
                Err(_) if self.has_exited() => return,
                Err(_) => tokio::task::yield_now().await,
            }
        }
    }

    /// Sends `signal` to the process. `Ok(false)`: it had exited already.
    pub fn send_signal(&self, signal: Signal) -> io::Result<bool> {
        let fd = self.fd.get_ref().as_raw_fd();
        // SAFETY: pidfd_send_signal(pidfd, sig, info, flags) with a pidfd we own, a valid signal
        // number, a null siginfo (the kernel then fills in one as kill(2) would) and no flags.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                fd,
                signal as libc::c_int,
                std::ptr::null::<libc::siginfo_t>(),
                0 as libc::c_uint,
            )
        };
        if ret == 0 {
            return Ok(true);
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ESRCH) {
            Ok(false)
        } else {
            Err(err)
        }
    }
}

/// Opens a plain pidfd for `pid` (not registered with tokio: to hand to another process, or to
/// take descriptors through). ESRCH if no such process exists.
pub fn open_owned(pid: u32) -> io::Result<OwnedFd> {
    let raw_pid = libc::pid_t::try_from(pid)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::ESRCH))?;
    // SAFETY: pidfd_open takes a pid and a flags word and returns a new fd or -1; no memory
    // is passed. The fd, if any, is owned by nobody else: it is wrapped in an OwnedFd below.
    let ret = unsafe { libc::syscall(libc::SYS_pidfd_open, raw_pid, 0 as libc::c_uint) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    let raw = i32::try_from(ret).map_err(|_| io::Error::other("pidfd out of range"))?;
    // SAFETY: `raw` is a file descriptor the kernel just returned to us and that nothing
    // else owns; OwnedFd closes it once.
    let owned = unsafe { OwnedFd::from_raw_fd(raw) };
    Ok(owned)
}

/// Duplicates descriptor `target` of the process behind `pidfd` into this process
/// (`pidfd_getfd(2)`, Linux 5.6+: needs ptrace access to that process, which root has). The copy
/// is close-on-exec.
pub fn get_fd(pidfd: std::os::fd::BorrowedFd<'_>, target: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_getfd(pidfd, targetfd, flags) with a pidfd we hold, an fd number, and no
    // flags; no memory is passed. The new fd, if any, is owned by nobody else.
    let ret = unsafe {
        libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target, 0 as libc::c_uint)
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    let raw = i32::try_from(ret).map_err(|_| io::Error::other("fd out of range"))?;
    // SAFETY: `raw` is a descriptor the kernel just installed for us; OwnedFd closes it once.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

#[cfg(test)]
mod tests {
    use std::process::{Command, Stdio};
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_pidfd_signals_its_process_and_sees_it_exit() {
        let mut child = Command::new("sleep").arg("30").stdin(Stdio::null()).spawn().unwrap();
        let pidfd = PidFd::open(child.id()).unwrap();
        assert!(!pidfd.has_exited());
        assert!(pidfd.send_signal(Signal::SIGKILL).unwrap());
        tokio::time::timeout(Duration::from_secs(10), pidfd.wait_exit()).await.unwrap();
        // A zombie (not yet reaped) has exited too.
        assert!(pidfd.has_exited());
        child.wait().unwrap();
        assert!(!pidfd.send_signal(Signal::SIGTERM).unwrap(), "no process to signal");
    }

    #[tokio::test]
    async fn the_peer_of_a_socket_is_the_process_that_connected() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let pidfd = PidFd::of_peer(b.as_fd(), std::process::id()).unwrap();
        assert_eq!(pidfd.pid(), std::process::id());
        assert!(!pidfd.has_exited(), "this process runs");
        drop(a);
    }

    #[tokio::test]
    async fn no_pidfd_for_a_pid_that_does_not_exist() {
        assert!(PidFd::open(0).is_err());
        assert!(PidFd::open(u32::MAX).is_err());
    }
}
