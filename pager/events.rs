//! Reading a session's userfaultfd events without ever blocking the fault worker.
//!
//! The uffd's `O_NONBLOCK` lives on the open file description the VMM shares with us: the
//! supervisor and the handoff set it, but the VMM can clear it again (`fcntl(F_SETFL, 0)`), and
//! it can read its own uffd too and take an event the worker's epoll just announced. A plain
//! `read()` would then wait for the next event, holding every other VM of the worker. So events
//! are read with `preadv2(..., RWF_NOWAIT)`, which never waits whatever the file's flags (the
//! kernel's uffd `read_iter` honours `IOCB_NOWAIT`, since Linux 6.7); where the kernel refuses
//! the flag (`EOPNOTSUPP`), a plain `read()` is the fallback, with the flag set at the handoff
//! and the worker watchdog (`crate::watchdog`) as the remaining defence.
//!
//! Messages are parsed here, not by the `userfaultfd` crate (which only reads with `read()`):
//! `struct uffd_msg` is 32 bytes, the event code first, its argument from byte 8
//! (`include/uapi/linux/userfaultfd.h`). A `UFFD_EVENT_FORK` carries a descriptor the kernel
//! installed in this process while reading: it is wrapped at once, so it is closed.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

/// Size of one `struct uffd_msg`.
pub const MSG_BYTES: usize = 32;

const EVENT_PAGEFAULT: u8 = 0x12;
const EVENT_FORK: u8 = 0x13;
const EVENT_REMAP: u8 = 0x14;
const EVENT_REMOVE: u8 = 0x15;
const EVENT_UNMAP: u8 = 0x16;
/// `UFFD_PAGEFAULT_FLAG_WP` and `UFFD_PAGEFAULT_FLAG_MINOR`: faults of modes Firecracker never
/// registers.
const FLAG_WP: u64 = 1 << 1;
const FLAG_MINOR: u64 = 1 << 2;

/// One userfaultfd event. (The fields of the kinds Firecracker never asks for are read only
/// through `Debug`, in the warning that reports them.)
#[derive(Debug)]
#[allow(dead_code)]
pub enum UffdEvent {
    /// A fault on a missing page (MISSING mode, the only one Firecracker registers).
    Missing { addr: u64 },
    /// A write-protect or minor fault: a mode Firecracker never registers.
    OtherFault { addr: u64, flags: u64 },
    /// `MADV_DONTNEED` / `MADV_REMOVE` of `[start, end)`.
    Remove { start: u64, end: u64 },
    /// `munmap` of `[start, end)`.
    Unmap { start: u64, end: u64 },
    /// `mremap` (a feature Firecracker never enables).
    Remap { from: u64, to: u64, len: u64 },
    /// `fork` (a feature Firecracker never enables): the child's uffd, closed on drop.
    Fork { uffd: OwnedFd },
    /// An event code this pager does not know.
    Unknown { code: u8 },
}

/// A message's fields, before any descriptor it names is taken over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawEvent {
    Fault { addr: u64, flags: u64 },
    Fork { fd: i32 },
    Remap { from: u64, to: u64, len: u64 },
    Remove { start: u64, end: u64 },
    Unmap { start: u64, end: u64 },
    Unknown { code: u8 },
}

fn u64_at(msg: &[u8; MSG_BYTES], at: usize) -> u64 {
    u64::from_ne_bytes(msg[at..at + 8].try_into().expect("8 bytes"))
}

/// Parses one `struct uffd_msg` (pure).
pub fn parse_msg(msg: &[u8; MSG_BYTES]) -> RawEvent {
    match msg[0] {
        EVENT_PAGEFAULT => RawEvent::Fault { addr: u64_at(msg, 16), flags: u64_at(msg, 8) },
        EVENT_FORK => {
            RawEvent::Fork { fd: i32::from_ne_bytes(msg[8..12].try_into().expect("4 bytes")) }
        }
        EVENT_REMAP => {
            RawEvent::Remap { from: u64_at(msg, 8), to: u64_at(msg, 16), len: u64_at(msg, 24) }
        }
        EVENT_REMOVE => RawEvent::Remove { start: u64_at(msg, 8), end: u64_at(msg, 16) },
        EVENT_UNMAP => RawEvent::Unmap { start: u64_at(msg, 8), end: u64_at(msg, 16) },
        code => RawEvent::Unknown { code },
    }
}

impl UffdEvent {
    /// Takes over what `raw` names: a fork's descriptor becomes owned here.
    fn adopt(raw: RawEvent) -> UffdEvent {
        match raw {
            RawEvent::Fault { addr, flags } if flags & (FLAG_WP | FLAG_MINOR) == 0 => {
                UffdEvent::Missing { addr }
            }
            RawEvent::Fault { addr, flags } => UffdEvent::OtherFault { addr, flags },
            RawEvent::Fork { fd } => {
                // SAFETY: the kernel installed `fd` in this process's table while we read the
                // message (`resolve_userfault_fork`), and handed it to nobody else: wrapping it
                // makes us its only owner, so it is closed exactly once.
                UffdEvent::Fork { uffd: unsafe { OwnedFd::from_raw_fd(fd) } }
            }
            RawEvent::Remap { from, to, len } => UffdEvent::Remap { from, to, len },
            RawEvent::Remove { start, end } => UffdEvent::Remove { start, end },
            RawEvent::Unmap { start, end } => UffdEvent::Unmap { start, end },
            RawEvent::Unknown { code } => UffdEvent::Unknown { code },
        }
    }
}

/// Why events could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    #[error("reading the userfaultfd: {0}")]
    Read(Errno),
    #[error("the userfaultfd returned {0} bytes, not a whole number of {MSG_BYTES}-byte messages")]
    Partial(usize),
}

/// Whether this kernel honours `RWF_NOWAIT` on a uffd (cleared at the first `EOPNOTSUPP`).
static NOWAIT_WORKS: AtomicBool = AtomicBool::new(true);

/// A buffer of messages, reused for every read.
#[derive(Debug)]
pub struct EventReader {
    buf: Vec<u8>,
}

impl EventReader {
    /// Reads at most `batch` messages per call.
    pub fn new(batch: usize) -> Self {
        Self { buf: vec![0; batch.max(1) * MSG_BYTES] }
    }

    /// Reads the events queued now, never waiting for one (empty: none queued).
    pub fn read(&mut self, uffd: BorrowedFd<'_>) -> Result<Vec<UffdEvent>, ReadError> {
        let n = loop {
            match self.read_once(uffd) {
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => return Ok(Vec::new()),
                Err(e) => return Err(ReadError::Read(e)),
                Ok(n) => break n,
            }
        };
        // Every message read is taken over before any error return: a fork's descriptor is in
        // our table already.
        let events: Vec<UffdEvent> = self.buf[..n - n % MSG_BYTES]
            .chunks_exact(MSG_BYTES)
            .map(|m| UffdEvent::adopt(parse_msg(m.try_into().expect("a whole message"))))
            .collect();
        if n % MSG_BYTES != 0 {
            return Err(ReadError::Partial(n));
        }
        Ok(events)
    }

    fn read_once(&mut self, uffd: BorrowedFd<'_>) -> Result<usize, Errno> {
        if NOWAIT_WORKS.load(Ordering::Relaxed) {
            let iov =
                libc::iovec { iov_base: self.buf.as_mut_ptr().cast(), iov_len: self.buf.len() };
            // SAFETY: `iov` names `self.buf`, which is valid for writes of its length and not
            // otherwise borrowed during the call; offset -1 reads at the file position (a uffd
            // has none), as read() does.
            let r = unsafe { libc::preadv2(uffd.as_raw_fd(), &iov, 1, -1, libc::RWF_NOWAIT) };
            match Errno::result(r) {
                Ok(n) => return Ok(usize::try_from(n).expect("non-negative")),
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
        // Without RWF_NOWAIT: ask first, so that a VMM that cleared O_NONBLOCK makes a read
        // wait only if it takes the very event announced (the watchdog catches that).
        let mut fds = [PollFd::new(uffd, PollFlags::POLLIN)];
        if poll(&mut fds, PollTimeout::ZERO)? == 0 {
            return Err(Errno::EAGAIN);
        }
        nix::unistd::read(uffd.as_raw_fd(), &mut self.buf)
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    fn msg(code: u8, words: [u64; 3]) -> [u8; MSG_BYTES] {
        let mut m = [0u8; MSG_BYTES];
        m[0] = code;
        for (i, w) in words.iter().enumerate() {
            m[8 + i * 8..16 + i * 8].copy_from_slice(&w.to_ne_bytes());
        }
        m
    }

    #[test]
    fn the_layout_and_codes_match_the_kernel_header() {
        assert_eq!(std::mem::size_of::<userfaultfd_sys::uffd_msg>(), MSG_BYTES);
        assert_eq!(EVENT_PAGEFAULT, userfaultfd_sys::UFFD_EVENT_PAGEFAULT);
        assert_eq!(EVENT_FORK, userfaultfd_sys::UFFD_EVENT_FORK);
        assert_eq!(EVENT_REMAP, userfaultfd_sys::UFFD_EVENT_REMAP);
        assert_eq!(EVENT_REMOVE, userfaultfd_sys::UFFD_EVENT_REMOVE);
        assert_eq!(EVENT_UNMAP, userfaultfd_sys::UFFD_EVENT_UNMAP);
        assert_eq!(FLAG_WP, userfaultfd_sys::UFFD_PAGEFAULT_FLAG_WP);
    }

    #[test]
    fn each_event_parses_from_its_bytes() {
        assert_eq!(
            parse_msg(&msg(EVENT_PAGEFAULT, [1, 0x7f00_0000_1000, 9])),
            RawEvent::Fault { addr: 0x7f00_0000_1000, flags: 1 }
        );
        assert_eq!(
            parse_msg(&msg(EVENT_REMOVE, [0x1000, 0x3000, 0])),
            RawEvent::Remove { start: 0x1000, end: 0x3000 }
        );
        assert_eq!(
            parse_msg(&msg(EVENT_UNMAP, [0x1000, 0x3000, 0])),
            RawEvent::Unmap { start: 0x1000, end: 0x3000 }
        );
        assert_eq!(
            parse_msg(&msg(EVENT_REMAP, [1, 2, 3])),
            RawEvent::Remap { from: 1, to: 2, len: 3 }
        );
        assert_eq!(parse_msg(&msg(EVENT_FORK, [7, 0, 0])), RawEvent::Fork { fd: 7 });
        assert_eq!(parse_msg(&msg(0x42, [0, 0, 0])), RawEvent::Unknown { code: 0x42 });
    }

    #[test]
    fn a_write_protect_fault_is_not_a_missing_fault() {
        let e = UffdEvent::adopt(RawEvent::Fault { addr: 4096, flags: FLAG_WP });
        assert!(matches!(e, UffdEvent::OtherFault { addr: 4096, .. }), "{e:?}");
        let e = UffdEvent::adopt(RawEvent::Fault { addr: 4096, flags: 1 });
        assert!(matches!(e, UffdEvent::Missing { addr: 4096 }), "{e:?}");
    }

    #[test]
    fn an_empty_blocking_uffd_reads_as_no_events_at_once() {
        let uffd = userfaultfd::UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(false)
            .user_mode_only(false)
            .create()
            .expect("a userfaultfd");
        let mut reader = EventReader::new(8);
        // A plain read() here would wait for ever.
        assert!(reader.read(uffd.as_fd()).unwrap().is_empty());
    }
}
