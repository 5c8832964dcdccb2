//! Userfaultfd messages read straight from the uffd with `read(2)` into memory the caller
//! chooses, and decoded from their raw 32 bytes.
//!
//! Why not the `userfaultfd` crate's `read_events`: it reads into a buffer of its own. A pager
//! reads into the session's removed-ranges log instead (`crate::removed_log`), so that the kernel
//! writes a REMOVE event into memory that outlives the pager in the same `read(2)` that hands the
//! event over (see that module for why this closes the window where a pager killed between
//! reading a REMOVE and recording it lost the range).
//!
//! `struct uffd_msg` (`<linux/userfaultfd.h>`): `__u8 event` then padding to 8 bytes, then a
//! union: `pagefault { __u64 flags; __u64 address; __u32 ptid }`, `fork { __u32 ufd }`,
//! `remap { from, to, len }`, `remove { __u64 start; __u64 end }` (UNMAP uses `remove` too).
//! Every event code is non-zero, so a zeroed message means "no message here".

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

/// Bytes of one `struct uffd_msg`.
pub const MSG_BYTES: usize = 32;
/// 64-bit words of one message.
pub const MSG_WORDS: usize = MSG_BYTES / 8;

/// One decoded message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UffdMsg {
    /// A page fault: `flags` (`UFFD_PAGEFAULT_FLAG_*`) and the faulting address.
    Pagefault { flags: u64, addr: u64 },
    /// The VMM discarded `[start, end)` (`MADV_DONTNEED`, a balloon).
    Remove { start: u64, end: u64 },
    /// The VMM unmapped `[start, end)`.
    Unmap { start: u64, end: u64 },
    /// The VMM forked with `UFFD_FEATURE_EVENT_FORK` (Firecracker never enables it): the kernel
    /// installed a new uffd, numbered `ufd`, in the reading process.
    Fork { ufd: u32 },
    /// `mremap(2)` of registered memory (Firecracker never enables it).
    Remap { from: u64, to: u64, len: u64 },
    /// An event code this build does not know.
    Unknown(u8),
}

impl UffdMsg {
    /// Decodes one message from its four words; `None` for an all-zero event byte (no message).
    pub fn decode(words: [u64; MSG_WORDS]) -> Option<Self> {
        let event = words[0].to_ne_bytes()[0];
        Some(match event {
            0 => return None,
            userfaultfd_sys::UFFD_EVENT_PAGEFAULT => {
                UffdMsg::Pagefault { flags: words[1], addr: words[2] }
            }
            userfaultfd_sys::UFFD_EVENT_REMOVE => {
                UffdMsg::Remove { start: words[1], end: words[2] }
            }
            userfaultfd_sys::UFFD_EVENT_UNMAP => UffdMsg::Unmap { start: words[1], end: words[2] },
            userfaultfd_sys::UFFD_EVENT_FORK => {
                UffdMsg::Fork { ufd: u32::try_from(words[1] & 0xffff_ffff).unwrap_or(u32::MAX) }
            }
            userfaultfd_sys::UFFD_EVENT_REMAP => {
                UffdMsg::Remap { from: words[1], to: words[2], len: words[3] }
            }
            other => UffdMsg::Unknown(other),
        })
    }

    /// A missing-page fault (neither write-protect nor minor).
    pub fn is_missing_fault(&self) -> bool {
        const OTHER_KINDS: u64 =
            userfaultfd_sys::UFFD_PAGEFAULT_FLAG_WP | userfaultfd_sys::UFFD_PAGEFAULT_FLAG_MINOR;
        matches!(self, UffdMsg::Pagefault { flags, .. } if flags & OTHER_KINDS == 0)
    }

    /// The range a REMOVE or UNMAP takes away.
    pub fn removed_range(&self) -> Option<(u64, u64)> {
        match *self {
            UffdMsg::Remove { start, end } | UffdMsg::Unmap { start, end } => Some((start, end)),
            _ => None,
        }
    }
}

/// Closes the uffd a FORK message installed in this process (nothing serves a forked VMM).
pub fn close_forked(msg: &UffdMsg) {
    if let UffdMsg::Fork { ufd } = *msg {
        if let Ok(fd) = i32::try_from(ufd) {
            // SAFETY: the kernel installed `ufd` in this process for this message alone and
            // nothing else knows the number: wrapping it transfers ownership, dropping closes it.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }
}

/// Whether this kernel honours `RWF_NOWAIT` on a uffd (cleared at the first `EOPNOTSUPP`).
static NOWAIT_WORKS: AtomicBool = AtomicBool::new(true);

/// Reads as many whole messages as fit in `len` bytes at `dst` from a uffd, never waiting for
/// one. Returns how many were read (0: none queued).
///
/// The uffd's `O_NONBLOCK` lives on the open file description the VMM shares with us: the
/// supervisor and the handoff set it, but the VMM can clear it again (`fcntl(F_SETFL, 0)`), and
/// it can read its own uffd too and take an event the worker's epoll just announced. A plain
/// `read()` would then wait for the next event, holding every other VM of the fault worker. So
/// messages are read with `preadv2(..., RWF_NOWAIT)`, which never waits whatever the file's
/// flags (the kernel's uffd `read_iter` honours `IOCB_NOWAIT`, since Linux 6.7); where the
/// kernel refuses the flag (`EOPNOTSUPP`), a `poll` then `read()` is the fallback, with the flag
/// set at the handoff and the pager's worker watchdog as the remaining defence.
///
/// # Safety
///
/// `dst` must be valid for writes of `len` bytes, 8-byte aligned, and nothing may hold a
/// reference to that memory that assumes it does not change (access it through atomics or raw
/// reads only).
pub unsafe fn read_into(uffd: BorrowedFd<'_>, dst: *mut u8, len: usize) -> Result<usize, Errno> {
    let len = len - len % MSG_BYTES;
    loop {
        // SAFETY: the caller guarantees `dst` is writable for `len` bytes.
        match unsafe { read_once(uffd, dst, len) } {
            Ok(n) => return Ok(n / MSG_BYTES),
            Err(Errno::EINTR) => continue,
            Err(Errno::EAGAIN) => return Ok(0),
            Err(e) => return Err(e),
        }
    }
}

/// [`read_into`] a buffer of the caller's own: as many whole messages as fit in `buf`, never
/// waiting for one. Returns how many were read (0: none queued).
pub fn read_into_words(uffd: BorrowedFd<'_>, buf: &mut [u64]) -> Result<usize, Errno> {
    let len = std::mem::size_of_val(buf);
    // SAFETY: `buf` is borrowed mutably for the call, so it is writable for its `len` bytes,
    // 8-byte aligned (u64s), and nothing else refers to it until the call returns.
    unsafe { read_into(uffd, buf.as_mut_ptr().cast(), len) }
}

/// One read of at most `len` bytes into `dst`, never waiting (see [`read_into`]).
///
/// # Safety
///
/// As [`read_into`].
unsafe fn read_once(uffd: BorrowedFd<'_>, dst: *mut u8, len: usize) -> Result<usize, Errno> {
    if NOWAIT_WORKS.load(Ordering::Relaxed) {
        let iov = libc::iovec { iov_base: dst.cast(), iov_len: len };
        // SAFETY: `iov` names `len` bytes at `dst`, writable by the caller's guarantee; offset
        // -1 reads at the file position (a uffd has none), as read() does.
        let r = unsafe { libc::preadv2(uffd.as_raw_fd(), &iov, 1, -1, libc::RWF_NOWAIT) };
        match Errno::result(r) {
            Ok(n) => return Ok(usize::try_from(n).unwrap_or(0)),
            Err(Errno::EOPNOTSUPP) => {
                NOWAIT_WORKS.store(false, Ordering::Relaxed);
                tracing::warn!(
                    "this kernel does not honour RWF_NOWAIT on a userfaultfd: reads rely on \
                     O_NONBLOCK, and a VMM that clears it is caught by the worker watchdog"
                );
            }
            Err(e) => return Err(e),
        }
    }
    // Without RWF_NOWAIT: ask first, so that a VMM that cleared O_NONBLOCK makes a read wait
    // only if it takes the very event announced (the watchdog catches that).
    let mut fds = [PollFd::new(uffd, PollFlags::POLLIN)];
    if poll(&mut fds, PollTimeout::ZERO)? == 0 {
        return Err(Errno::EAGAIN);
    }
    // SAFETY: as above; read(2) writes at most `len` bytes at `dst`.
    let n = unsafe { libc::read(uffd.as_raw_fd(), dst.cast(), len) };
    Errno::result(n).map(|n| usize::try_from(n).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(event: u8, a: u64, b: u64, c: u64) -> [u64; MSG_WORDS] {
        let mut first = [0u8; 8];
        first[0] = event;
        [u64::from_ne_bytes(first), a, b, c]
    }

    #[test]
    fn the_message_layout_is_the_kernels() {
        assert_eq!(std::mem::size_of::<userfaultfd_sys::uffd_msg>(), MSG_BYTES);
    }

    #[test]
    fn messages_decode_by_their_event_code() {
        assert_eq!(UffdMsg::decode([0; MSG_WORDS]), None);
        let fault = UffdMsg::decode(words(userfaultfd_sys::UFFD_EVENT_PAGEFAULT, 1, 0x7000, 0));
        assert_eq!(fault, Some(UffdMsg::Pagefault { flags: 1, addr: 0x7000 }));
        assert!(fault.unwrap().is_missing_fault(), "a write fault on a missing page");
        let wp = UffdMsg::decode(words(
            userfaultfd_sys::UFFD_EVENT_PAGEFAULT,
            userfaultfd_sys::UFFD_PAGEFAULT_FLAG_WP,
            0x7000,
            0,
        ));
        assert!(!wp.unwrap().is_missing_fault());
        let remove = UffdMsg::decode(words(userfaultfd_sys::UFFD_EVENT_REMOVE, 0x1000, 0x3000, 0));
        assert_eq!(remove.unwrap().removed_range(), Some((0x1000, 0x3000)));
        let unmap = UffdMsg::decode(words(userfaultfd_sys::UFFD_EVENT_UNMAP, 0x5000, 0x6000, 0));
        assert_eq!(unmap.unwrap().removed_range(), Some((0x5000, 0x6000)));
        assert_eq!(
            UffdMsg::decode(words(userfaultfd_sys::UFFD_EVENT_FORK, 7, 0, 0)),
            Some(UffdMsg::Fork { ufd: 7 })
        );
        assert_eq!(UffdMsg::decode(words(0x77, 0, 0, 0)), Some(UffdMsg::Unknown(0x77)));
    }

    /// Reads up to four messages from `uffd` into a buffer of the test's own.
    fn read_some(uffd: &userfaultfd::Uffd) -> Result<usize, Errno> {
        let mut buf = [0u64; 4 * MSG_WORDS];
        // SAFETY: `buf` is a local, aligned, writable array of the length given.
        unsafe {
            read_into(
                std::os::fd::AsFd::as_fd(uffd),
                buf.as_mut_ptr().cast(),
                std::mem::size_of_val(&buf),
            )
        }
    }

    #[test]
    fn an_empty_uffd_reads_no_message() {
        let uffd = crate::uffd_ops::firecracker_uffd(true).expect("userfaultfd");
        assert_eq!(read_some(&uffd), Ok(0));
    }

    #[test]
    fn an_empty_blocking_uffd_reads_no_message_at_once() {
        let uffd = userfaultfd::UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(false)
            .user_mode_only(false)
            .create()
            .expect("a userfaultfd");
        // A plain read() here would wait for ever.
        assert_eq!(read_some(&uffd), Ok(0));
    }
}
