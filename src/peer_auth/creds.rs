//! The credentials of the process at the other end of a connected Unix socket, as the kernel
//! recorded them at `connect(2)` (unix(7): `SO_PEERCRED`, `SO_PEERGROUPS`). They cannot be
//! forged by the peer; they stay those of the connecting process even if it later changes uid.

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// A connected peer's uid, gid, pid and supplementary groups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCredentials {
    pub uid: u32,
    pub gid: u32,
    /// None when the peer is in a pid namespace this process cannot see.
    pub pid: Option<i32>,
    pub groups: Vec<u32>,
}

impl fmt::Display for PeerCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "uid {} (gid {}", self.uid, self.gid)?;
        match self.pid {
            Some(pid) => write!(f, ", pid {pid})"),
            None => write!(f, ")"),
        }
    }
}

impl PeerCredentials {
    /// Reads the credentials of the peer of the connected Unix socket `fd`.
    pub fn of(fd: BorrowedFd<'_>) -> io::Result<Self> {
        let cred = nix::sys::socket::getsockopt(&fd, nix::sys::socket::sockopt::PeerCredentials)?;
        Ok(Self {
            uid: cred.uid(),
            gid: cred.gid(),
            // 0: the peer's pid is not visible from this pid namespace.
            pid: Some(cred.pid()).filter(|p| *p > 0),
            groups: peer_groups(fd)?,
        })
    }
}

/// The peer's supplementary groups (`SO_PEERGROUPS`, Linux 4.13). The kernel answers `ERANGE`
/// with the length it needs when the buffer is too small; it holds at most `NGROUPS_MAX`
/// (65536) groups.
pub fn peer_groups(fd: BorrowedFd<'_>) -> io::Result<Vec<u32>> {
    const GID: usize = std::mem::size_of::<libc::gid_t>();
    let mut groups: Vec<libc::gid_t> = vec![0; 32];
    loop {
        let mut len = libc::socklen_t::try_from(groups.len() * GID)
            .map_err(|_| io::Error::other("too many groups"))?;
        // SAFETY: `fd` is a live socket for the duration of the call; the kernel writes at
        // most `len` bytes into `groups`, which owns that many, and updates `len`.
        let rc = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let needed = usize::try_from(len).unwrap_or(usize::MAX) / GID;
        if rc == 0 {
            groups.truncate(needed);
            return Ok(groups);
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ERANGE) && needed > groups.len() && needed <= 65536 {
            groups.resize(needed, 0);
            continue;
        }
        return Err(err);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socket_pair_shows_this_process_as_its_peer() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let peer = PeerCredentials::of(std::os::fd::AsFd::as_fd(&a)).unwrap();
        assert_eq!(peer.uid, nix::unistd::geteuid().as_raw());
        assert_eq!(peer.gid, nix::unistd::getegid().as_raw());
        assert_eq!(peer.pid, Some(i32::try_from(std::process::id()).unwrap()));
        let mine: Vec<u32> =
            nix::unistd::getgroups().unwrap().into_iter().map(|g| g.as_raw()).collect();
        let mut theirs = peer.groups.clone();
        theirs.sort_unstable();
        let mut mine = mine;
        mine.sort_unstable();
        assert_eq!(theirs, mine);
    }
}
