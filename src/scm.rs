//! One message with file descriptors over a Unix socket (`SCM_RIGHTS`), as Firecracker's
//! handshake and the supervisor → pager handoff use it.
//!
//! Received descriptors come back as [`OwnedFd`] opened with `MSG_CMSG_CLOEXEC`, so nothing leaks
//! into child processes and everything is closed on drop, on every error path too.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

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
pub fn recv_with_fds(sock: BorrowedFd<'_>, max_len: usize) -> Result<Received, Errno> {
    let mut buf = vec![0u8; max_len];
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
    let (len, fds, truncated, fds_truncated) = loop {
        let mut iov = [IoSliceMut::new(&mut buf)];
        match recvmsg::<()>(sock.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)
        {
            Ok(msg) => {
                let mut fds = Vec::new();
                for c in msg.cmsgs()? {
                    if let ControlMessageOwned::ScmRights(raw) = c {
                        for fd in raw {
                            // SAFETY: the kernel just installed `fd` in our table for this
                            // message; nothing else owns it, so wrapping it transfers ownership.
                            fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                        }
                    }
                }
                let flags = msg.flags;
                break (
                    msg.bytes,
                    fds,
                    flags.contains(MsgFlags::MSG_TRUNC),
                    flags.contains(MsgFlags::MSG_CTRUNC),
                );
            }
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
        }
    };
    buf.truncate(len);
    Ok(Received { bytes: buf, fds, truncated, fds_truncated })
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
    fn a_closed_peer_reads_as_an_empty_message() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(a);
        let got = recv_with_fds(b.as_fd(), 64).unwrap();
        assert!(got.bytes.is_empty() && got.fds.is_empty());
    }
}
