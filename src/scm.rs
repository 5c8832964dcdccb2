//! One message with file descriptors over a Unix socket (`SCM_RIGHTS`), as Firecracker's
//! handshake and the supervisor → pager handoff use it.
//!
//! Received descriptors come back as [`OwnedFd`] opened with `MSG_CMSG_CLOEXEC`, so nothing leaks
//! into child processes and everything is closed on drop, on every error path too, a message
//! that carried more descriptors than it may included.

use std::io::IoSlice;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};

/// Most descriptors one message may carry; more is a protocol error (and they are closed).
pub const MAX_FDS: usize = 8;

/// A received message: its bytes and the descriptors attached to it.
#[derive(Debug)]
pub struct Received {
    pub bytes: Vec<u8>,
    pub fds: Vec<OwnedFd>,
    /// The kernel cut the payload (`MSG_TRUNC`): the sender sent more than the buffer held.
    pub truncated: bool,
    /// The kernel dropped descriptors (`MSG_CTRUNC`).
    pub fds_truncated: bool,
}

/// Receives one message of at most `max_len` bytes. Blocks unless the socket is non-blocking.
/// `Ok` with empty bytes and no fds means the peer closed the connection.
///
/// Every descriptor the kernel installed is wrapped before anything else happens, on every
/// path: with `MSG_CTRUNC` (more than [`MAX_FDS`] sent) the kernel installs as many as the
/// control buffer holds and drops the rest, and those it installed are ours to close. The
/// control messages are walked here with the `CMSG_*` macros rather than through
/// `nix::sys::socket::RecvMsg::cmsgs`, which refuses a truncated buffer before handing out
/// what it holds.
pub fn recv_with_fds(sock: BorrowedFd<'_>, max_len: usize) -> Result<Received, Errno> {
    let mut buf = vec![0u8; max_len];
    // u64 words: aligned for `cmsghdr`.
    let cmsg_words = cmsg_space(MAX_FDS).div_ceil(8);
    let mut cmsg = vec![0u64; cmsg_words];
    loop {
        let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
        // SAFETY: an all-zero `msghdr` is a valid empty one; the fields set below point at
        // `iov` and `cmsg`, which outlive the call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cmsg.as_mut_ptr().cast();
        msg.msg_controllen = cmsg_words * 8;
        // SAFETY: `msg` describes buffers this function owns, valid for writes of the lengths
        // given; the kernel writes no further.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        let n = match Errno::result(n) {
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
            Ok(n) => usize::try_from(n).expect("non-negative"),
        };
        // SAFETY: `msg` was just filled by recvmsg: its control buffer holds `msg_controllen`
        // bytes of well-formed control messages.
        let fds = unsafe { take_fds(&msg) };
        buf.truncate(n);
        return Ok(Received {
            bytes: buf,
            fds,
            truncated: msg.msg_flags & libc::MSG_TRUNC != 0,
            fds_truncated: msg.msg_flags & libc::MSG_CTRUNC != 0,
        });
    }
}

/// Bytes of control buffer for `n` descriptors.
fn cmsg_space(n: usize) -> usize {
    let bytes = u32::try_from(n * std::mem::size_of::<RawFd>()).expect("a few fds");
    // SAFETY: CMSG_SPACE only computes a size.
    usize::try_from(unsafe { libc::CMSG_SPACE(bytes) }).expect("fits")
}

/// Wraps every descriptor of every `SCM_RIGHTS` message in `msg`'s control buffer.
///
/// # Safety
/// `msg` must have just been filled by `recvmsg`, its control buffer untouched since.
unsafe fn take_fds(msg: &libc::msghdr) -> Vec<OwnedFd> {
    let mut fds = Vec::new();
    // SAFETY: the caller guarantees a control buffer of well-formed messages; CMSG_FIRSTHDR
    // (and CMSG_NXTHDR below) stay within `msg_controllen` and return null at its end.
    let mut c = unsafe { libc::CMSG_FIRSTHDR(msg) };
    while !c.is_null() {
        // SAFETY: `c` is non-null, so it points at a whole `cmsghdr` inside the buffer.
        let hdr = unsafe { &*c };
        if hdr.cmsg_level == libc::SOL_SOCKET && hdr.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: CMSG_LEN(0) only computes a size.
            let header = usize::try_from(unsafe { libc::CMSG_LEN(0) }).expect("fits");
            let count = hdr.cmsg_len.saturating_sub(header) / std::mem::size_of::<RawFd>();
            // SAFETY: the data of an SCM_RIGHTS message is `count` fds (the kernel sets
            // `cmsg_len` to what it copied), possibly unaligned: read one by one.
            let data = unsafe { libc::CMSG_DATA(c) }.cast::<RawFd>();
            for i in 0..count {
                // SAFETY: `i < count`, within the message's data.
                let fd = unsafe { data.add(i).read_unaligned() };
                // SAFETY: the kernel installed `fd` in our table for this message; nothing
                // else owns it, so wrapping it transfers ownership (it closes on drop).
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
        // SAFETY: as above: the next header, or null past the end.
        c = unsafe { libc::CMSG_NXTHDR(msg, c) };
    }
    fds
}

/// Sends `bytes` and `fds` as one message (the fds are duplicated into the receiver).
pub fn send_with_fds(
    sock: BorrowedFd<'_>,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
) -> Result<usize, Errno> {
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let iov = [IoSlice::new(bytes)];
    let cmsgs: Vec<ControlMessage<'_>> =
        if raw.is_empty() { Vec::new() } else { vec![ControlMessage::ScmRights(&raw)] };
    loop {
        match sendmsg::<()>(sock.as_raw_fd(), &iov, &cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Err(Errno::EINTR) => continue,
            other => return other,
        }
    }
}

/// The pid of the process at the other end of a connected Unix socket (`SO_PEERCRED`).
pub fn peer_pid(sock: BorrowedFd<'_>) -> Result<u32, Errno> {
    let cred = nix::sys::socket::getsockopt(&sock, nix::sys::socket::sockopt::PeerCredentials)?;
    u32::try_from(cred.pid()).map_err(|_| Errno::EINVAL)
}

/// True when `fd` is a userfaultfd (its `/proc/self/fd` link names `anon_inode:[userfaultfd]`).
pub fn is_userfaultfd(fd: BorrowedFd<'_>) -> bool {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map(|p| p.as_os_str() == "anon_inode:[userfaultfd]")
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_message_and_its_fds_arrive_together() {
        let (a, b) = UnixStream::pair().unwrap();
        let file = tempfile::tempfile().unwrap();
        send_with_fds(a.as_fd(), b"hello", &[file.as_fd()]).unwrap();
        let got = recv_with_fds(b.as_fd(), 64).unwrap();
        assert_eq!(got.bytes, b"hello");
        assert_eq!(got.fds.len(), 1);
        assert!(!got.truncated && !got.fds_truncated);
        assert!(!is_userfaultfd(got.fds[0].as_fd()));
        assert_eq!(peer_pid(b.as_fd()).unwrap(), std::process::id());
    }

    #[test]
    fn more_than_eight_fds_are_flagged_and_every_one_installed_is_ours_to_close() {
        let (a, b) = UnixStream::pair().unwrap();
        let files: Vec<std::fs::File> = (0..12).map(|_| tempfile::tempfile().unwrap()).collect();
        let sent: Vec<BorrowedFd<'_>> = files.iter().map(|f| f.as_fd()).collect();
        send_with_fds(a.as_fd(), b"too many", &sent).unwrap();
        let got = recv_with_fds(b.as_fd(), 64).unwrap();
        assert_eq!(got.bytes, b"too many");
        assert!(got.fds_truncated, "the kernel dropped some: MSG_CTRUNC");
        // The kernel installs as many as the control buffer holds: all of them are wrapped.
        assert_eq!(got.fds.len(), MAX_FDS);
        for fd in &got.fds {
            let flags = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFD).unwrap();
            assert_ne!(flags & libc::FD_CLOEXEC, 0, "received close-on-exec");
        }
    }

    #[test]
    fn a_closed_peer_reads_as_an_empty_message() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(a);
        let got = recv_with_fds(b.as_fd(), 64).unwrap();
        assert!(got.bytes.is_empty() && got.fds.is_empty());
    }
}
