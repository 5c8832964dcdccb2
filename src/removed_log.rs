//! The removed-ranges log of a session: guest ranges the VMM discarded (`UFFD_EVENT_REMOVE`),
//! kept in a file the supervisor creates (`DIR/sessions/<id>.removed`; a memfd where no runtime
//! directory is at hand) and every pager serving the session maps shared.
//!
//! Why outside the pager: a discarded page must read as zero forever after, but a REMOVE event is
//! gone once read. If the pager dies, the pager that adopts the session must still know which
//! missing pages are discarded (zero) rather than never served (snapshot data). Why a file: it
//! survives the pager *and* the supervisor (killed together, the next supervisor finds it by the
//! session's id), where a memfd lives only as long as someone holds it.
//!
//! **The read slot.** A pager reads the uffd's events with `read(2)` straight into this log's
//! *read slot* (`read_into_slot`), not into a buffer of its own: the kernel dequeues the events
//! and writes them here in one system call, so once the VMM's `madvise` is released (the kernel
//! releases it when the REMOVE is read) the REMOVE is already in memory that outlives the pager.
//! The pager then appends the batch's removed ranges to the log and zeroes the slot
//! (`clear_slot`). A pager killed in between leaves the batch in the slot; the adopter moves its
//! removed ranges into the log first (`recover_slot`). Appending a range twice is harmless. So
//! no kernel-acknowledged REMOVE can be lost, whenever the pager dies. (The one page of the slot
//! is locked in memory where the kernel allows it, so the kernel's write into it never has to
//! wait for a page — the only way a fatal signal could make that write fail.)
//!
//! Layout (all `u64`, native endian): `[magic][header]` then two halves of `HALF` entries
//! `(start, end)`; then, on a page of its own, the read slot of [`SLOT_BYTES`] (whole
//! `struct uffd_msg`s, a zero event byte ending them). `header = active_half << 63 | count`.
//! Appending writes the entry, then stores the header with `count + 1`; compaction writes the
//! coalesced ranges into the other half, then flips the header in one store. A crash at any
//! point leaves a consistent log.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use memmap2::MmapMut;
use nix::errno::Errno;

use crate::pages::RangeSet;
use crate::uffd_msg::{self, UffdMsg, MSG_BYTES, MSG_WORDS};

const MAGIC: u64 = 0x7566_6664_726d_6c32; // "uffdrml2"
/// Entries per half.
pub const HALF: usize = 1 << 17;
const HEADER_WORDS: usize = 2;
const PAGE: usize = 4096;
/// Byte offset of the read slot: the first page after the entries.
const SLOT_OFFSET: usize = ((HEADER_WORDS + 4 * HALF) * 8).div_ceil(PAGE) * PAGE;
/// Bytes of the read slot: room for this many `struct uffd_msg`s of one `read(2)`.
pub const SLOT_BYTES: usize = PAGE;
/// Messages the read slot holds.
pub const SLOT_MSGS: usize = SLOT_BYTES / MSG_BYTES;
/// Bytes of the log (sparse: only written pages take memory or disk).
pub const LOG_BYTES: usize = SLOT_OFFSET + SLOT_BYTES;

#[derive(Debug, thiserror::Error)]
pub enum RemovedLogError {
    #[error("creating the removed-ranges log: {0}")]
    Create(io::Error),
    #[error("mapping the removed-ranges log: {0}")]
    Map(io::Error),
    #[error("the removed-ranges log is {0} bytes; {LOG_BYTES} expected")]
    WrongSize(u64),
    #[error("the removed-ranges log has a bad magic number")]
    BadMagic,
    #[error("more than {HALF} disjoint removed ranges: the log cannot hold them")]
    Full,
}

/// A mapped removed-ranges log, and the descriptor it was mapped from.
pub struct RemovedLog {
    map: MmapMut,
    fd: OwnedFd,
}

impl std::fmt::Debug for RemovedLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemovedLog").field("count", &self.count()).finish()
    }
}

impl RemovedLog {
    /// Creates an empty log in a new memfd; returns it and the fd to hand on.
    pub fn create() -> Result<(Self, OwnedFd), RemovedLogError> {
        let fd = nix::sys::memfd::memfd_create(
            c"uffd-removed-ranges",
            nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
        )
        .map_err(|e| RemovedLogError::Create(e.into()))?;
        Self::init(std::fs::File::from(fd))
    }

    /// Creates an empty log in a new file at `path` (mode 0600; it must not exist yet).
    pub fn create_file(path: &Path) -> Result<(Self, OwnedFd), RemovedLogError> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(RemovedLogError::Create)?;
        Self::init(file)
    }

    fn init(file: std::fs::File) -> Result<(Self, OwnedFd), RemovedLogError> {
        file.set_len(LOG_BYTES as u64).map_err(RemovedLogError::Create)?;
        let fd = OwnedFd::from(file);
        let log = Self::map(&fd)?;
        log.word(0).store(MAGIC, Ordering::Release);
        Ok((log, fd))
    }

    /// Maps an existing log (handed over by the supervisor).
    pub fn open(fd: &OwnedFd) -> Result<Self, RemovedLogError> {
        let log = Self::map(fd)?;
        if log.word(0).load(Ordering::Acquire) != MAGIC {
            return Err(RemovedLogError::BadMagic);
        }
        Ok(log)
    }

    /// Opens the log file at `path` (a restarted supervisor's way back to it); returns it and
    /// a descriptor to hand on.
    pub fn open_file(path: &Path) -> Result<(Self, OwnedFd), RemovedLogError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(RemovedLogError::Map)?;
        let fd = OwnedFd::from(file);
        let log = Self::open(&fd)?;
        Ok((log, fd))
    }

    fn map(fd: &OwnedFd) -> Result<Self, RemovedLogError> {
        let own = fd.as_fd().try_clone_to_owned().map_err(RemovedLogError::Map)?;
        let file = std::fs::File::from(own.try_clone().map_err(RemovedLogError::Map)?);
        let len = file.metadata().map_err(RemovedLogError::Map)?.len();
        if len != LOG_BYTES as u64 {
            return Err(RemovedLogError::WrongSize(len));
        }
        // SAFETY: a shared mapping of a file or memfd of exactly LOG_BYTES bytes (checked above)
        // that is never truncated (only this module sizes it). Other processes write it
        // concurrently, so every access goes through atomics (`word`) or the kernel (`read(2)`
        // into the slot), never through plain references.
        let map = unsafe { MmapMut::map_mut(&file) }.map_err(RemovedLogError::Map)?;
        // A few words are touched, far apart: no read-ahead around them (on a disk file system
        // each first touch would otherwise bring in and map tens of KiB of holes).
        let _ = map.advise(memmap2::Advice::Random);
        // Best effort (RLIMIT_MEMLOCK may refuse): see the module doc for why the slot's page
        // is locked.
        // SAFETY: mlock(2) of one page inside this mapping; it changes no data.
        let _ = unsafe { libc::mlock(map.as_ptr().add(SLOT_OFFSET).cast(), SLOT_BYTES) };
        Ok(Self { map, fd: own })
    }

    /// The descriptor of the log (to hand it on).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    fn word(&self, i: usize) -> &AtomicU64 {
        assert!(i < LOG_BYTES / 8);
        // SAFETY: the mapping is page aligned and LOG_BYTES long, so word `i` is in bounds and
        // 8-byte aligned; AtomicU64 has the layout of u64, and all access to the shared memory
        // is atomic, so concurrent writers in other processes cause no data race UB.
        unsafe { &*self.map.as_ptr().cast::<AtomicU64>().add(i) }
    }

    fn header(&self) -> (usize, usize) {
        let h = self.word(1).load(Ordering::Acquire);
        ((h >> 63) as usize, usize::try_from(h & !(1 << 63)).unwrap_or(usize::MAX).min(HALF))
    }

    fn entry_index(half: usize, i: usize) -> usize {
        HEADER_WORDS + (half * HALF + i) * 2
    }

    /// Entries currently in the log.
    pub fn count(&self) -> usize {
        self.header().1
    }

    /// Appends `[start, end)` (guest addresses). When the active half is full, compacts first.
    pub fn append(&mut self, start: u64, end: u64) -> Result<(), RemovedLogError> {
        let (half, count) = self.header();
        if count == HALF {
            self.compact()?;
            return self.append(start, end);
        }
        let i = Self::entry_index(half, count);
        self.word(i).store(start, Ordering::Relaxed);
        self.word(i + 1).store(end, Ordering::Relaxed);
        self.word(1).store(((half as u64) << 63) | (count as u64 + 1), Ordering::Release);
        Ok(())
    }

    /// Every range recorded, in order of recording.
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        let (half, count) = self.header();
        (0..count)
            .map(|i| {
                let e = Self::entry_index(half, i);
                (self.word(e).load(Ordering::Relaxed), self.word(e + 1).load(Ordering::Relaxed))
            })
            .collect()
    }

    /// Rewrites the log as coalesced ranges in the other half, then flips to it.
    fn compact(&mut self) -> Result<(), RemovedLogError> {
        let mut set = RangeSet::new();
        for (s, e) in self.ranges() {
            set.insert(s..e);
        }
        let (half, _) = self.header();
        let other = 1 - half;
        let ranges: Vec<_> = set.iter().collect();
        if ranges.len() >= HALF {
            return Err(RemovedLogError::Full);
        }
        for (i, r) in ranges.iter().enumerate() {
            let e = Self::entry_index(other, i);
            self.word(e).store(r.start, Ordering::Relaxed);
            self.word(e + 1).store(r.end, Ordering::Relaxed);
        }
        self.word(1).store(((other as u64) << 63) | ranges.len() as u64, Ordering::Release);
        Ok(())
    }

    /// Reads up to `max` queued messages (at most [`SLOT_MSGS`]) from the non-blocking `uffd`
    /// straight into the read slot, which must be clear (see the module doc). Returns how many.
    pub fn read_into_slot(&self, uffd: BorrowedFd<'_>, max: usize) -> Result<usize, Errno> {
        let len = max.min(SLOT_MSGS) * MSG_BYTES;
        // SAFETY: the slot is the last SLOT_BYTES of this mapping (in bounds, page aligned),
        // accessed otherwise only through atomics (`slot_message`, `clear_slot`).
        unsafe { uffd_msg::read_into(uffd, self.map.as_ptr().add(SLOT_OFFSET).cast_mut(), len) }
    }

    /// Message `i` of the read slot; `None` if that place is empty.
    pub fn slot_message(&self, i: usize) -> Option<UffdMsg> {
        if i >= SLOT_MSGS {
            return None;
        }
        let first = SLOT_OFFSET / 8 + i * MSG_WORDS;
        let mut words = [0u64; MSG_WORDS];
        for (k, w) in words.iter_mut().enumerate() {
            *w = self.word(first + k).load(Ordering::Acquire);
        }
        UffdMsg::decode(words)
    }

    /// Zeroes the first `n` messages of the read slot (once their removed ranges are appended).
    pub fn clear_slot(&self, n: usize) {
        let words = n.min(SLOT_MSGS) * MSG_WORDS;
        for k in 0..words {
            self.word(SLOT_OFFSET / 8 + k).store(0, Ordering::Release);
        }
    }

    /// What a pager that died left in the read slot: appends the removed ranges of those
    /// messages to the log, clears the slot, and returns the messages (their faults were read
    /// but never served: the adopter wakes every range anyway).
    pub fn recover_slot(&mut self) -> Result<Vec<UffdMsg>, RemovedLogError> {
        let left: Vec<UffdMsg> = (0..SLOT_MSGS).map_while(|i| self.slot_message(i)).collect();
        for (start, end) in left.iter().filter_map(UffdMsg::removed_range) {
            self.append(start, end)?;
        }
        self.clear_slot(left.len());
        Ok(left)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_written_by_one_mapping_are_read_by_another() {
        let (mut a, fd) = RemovedLog::create().unwrap();
        a.append(0x1000, 0x3000).unwrap();
        a.append(0x8000, 0x9000).unwrap();
        let b = RemovedLog::open(&fd).unwrap();
        assert_eq!(b.ranges(), vec![(0x1000, 0x3000), (0x8000, 0x9000)]);
        drop(a);
        assert_eq!(RemovedLog::open(&fd).unwrap().count(), 2);
    }

    #[test]
    fn a_log_file_outlives_every_mapping_and_descriptor_of_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.removed");
        let (mut log, fd) = RemovedLog::create_file(&path).unwrap();
        log.append(0x4000, 0x6000).unwrap();
        drop((log, fd));
        let (reopened, _fd) = RemovedLog::open_file(&path).unwrap();
        assert_eq!(reopened.ranges(), vec![(0x4000, 0x6000)]);
        assert!(RemovedLog::create_file(&path).is_err(), "an existing log is never replaced");
    }

    #[test]
    fn a_full_half_is_compacted_into_the_other_and_nothing_is_lost() {
        let (mut log, _fd) = RemovedLog::create().unwrap();
        for i in 0..HALF as u64 {
            // Adjacent ranges: they coalesce into one.
            log.append(i * 4096, (i + 1) * 4096).unwrap();
        }
        log.append(1 << 40, (1 << 40) + 4096).unwrap();
        assert_eq!(log.ranges(), vec![(0, HALF as u64 * 4096), (1 << 40, (1 << 40) + 4096)]);
    }

    #[test]
    fn a_foreign_memfd_is_refused() {
        let fd = nix::sys::memfd::memfd_create(c"x", nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC)
            .unwrap();
        assert!(matches!(RemovedLog::open(&fd), Err(RemovedLogError::WrongSize(0))));
    }

    /// Writes a message into the slot as the kernel's read(2) would.
    fn put(log: &RemovedLog, i: usize, event: u8, a: u64, b: u64) {
        let mut first = [0u8; 8];
        first[0] = event;
        let w = SLOT_OFFSET / 8 + i * MSG_WORDS;
        log.word(w).store(u64::from_ne_bytes(first), Ordering::Release);
        log.word(w + 1).store(a, Ordering::Release);
        log.word(w + 2).store(b, Ordering::Release);
    }

    #[test]
    fn removes_left_in_the_read_slot_by_a_dead_reader_are_moved_into_the_log() {
        let (reader, fd) = RemovedLog::create().unwrap();
        put(&reader, 0, userfaultfd_sys::UFFD_EVENT_PAGEFAULT, 0, 0x9000);
        put(&reader, 1, userfaultfd_sys::UFFD_EVENT_REMOVE, 0x2000, 0x5000);
        put(&reader, 2, userfaultfd_sys::UFFD_EVENT_UNMAP, 0x8000, 0x9000);
        drop(reader); // killed before appending them
        let mut adopter = RemovedLog::open(&fd).unwrap();
        let left = adopter.recover_slot().unwrap();
        assert_eq!(left.len(), 3);
        assert_eq!(adopter.ranges(), vec![(0x2000, 0x5000), (0x8000, 0x9000)]);
        assert_eq!(adopter.slot_message(0), None, "the slot is clear again");
        assert!(adopter.recover_slot().unwrap().is_empty());
    }

    #[test]
    fn events_are_read_straight_into_the_slot() {
        // A real uffd with one REMOVE queued: register a range, then discard it from another
        // thread (madvise waits until the event is read).
        let uffd = crate::uffd_ops::firecracker_uffd(true).expect("userfaultfd");
        let mut map = memmap2::MmapMut::map_anon(4 * PAGE).unwrap();
        map[0] = 1; // present before registration: the discard must go through the uffd
        uffd.register(map.as_mut_ptr().cast(), 4 * PAGE).unwrap();
        let (base, len) = (map.as_ptr() as usize, 4 * PAGE);
        let discard = std::thread::spawn(move || {
            // SAFETY: MADV_DONTNEED on the anonymous mapping above, which outlives this thread
            // (joined below); its pages read as faults to the uffd afterwards.
            unsafe { libc::madvise(base as *mut libc::c_void, len, libc::MADV_DONTNEED) }
        });
        let (log, _fd) = RemovedLog::create().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let n = loop {
            let n = log.read_into_slot(uffd.as_fd(), SLOT_MSGS).unwrap();
            if n > 0 {
                break n;
            }
            assert!(std::time::Instant::now() < deadline, "no REMOVE arrived");
            std::thread::yield_now();
        };
        assert_eq!(discard.join().unwrap(), 0);
        assert_eq!(n, 1);
        let msg = log.slot_message(0).unwrap();
        assert_eq!(msg.removed_range(), Some((base as u64, (base + len) as u64)));
        log.clear_slot(n);
        assert_eq!(log.slot_message(0), None);
        drop(map);
    }
}
