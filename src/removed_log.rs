//! The removed-ranges log of a session: guest ranges the VMM discarded (`UFFD_EVENT_REMOVE`),
//! kept in a memfd that the supervisor owns and every pager serving the session maps shared.
//!
//! Why outside the pager: a discarded page must read as zero forever after, but a REMOVE event is
//! gone once read. If the pager dies, the pager that adopts the session must still know which
//! missing pages are discarded (zero) rather than never served (snapshot data). The pager appends
//! a range right after reading the event, before serving anything else; the memfd survives the
//! pager's death. (A pager killed between `read()` and the append loses that one range: a window
//! of a few instructions that no kernel interface closes.)
//!
//! Layout (all `u64`, native endian): `[magic][header]` then two halves of `HALF` entries
//! `(start, end)`. `header = active_half << 63 | count`. Appending writes the entry, then stores
//! the header with `count + 1`; compaction writes the coalesced ranges into the other half, then
//! flips the header in one store. A crash at any point leaves a consistent log.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};

use memmap2::MmapMut;

use crate::pages::RangeSet;

const MAGIC: u64 = 0x7566_6664_726d_6c31; // "uffdrml1"
/// Entries per half.
pub const HALF: usize = 1 << 17;
const HEADER_WORDS: usize = 2;
/// Bytes of the memfd (sparse: only written pages take memory).
pub const LOG_BYTES: usize = (HEADER_WORDS + 4 * HALF) * 8;

#[derive(Debug, thiserror::Error)]
pub enum RemovedLogError {
    #[error("creating the removed-ranges memfd: {0}")]
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

/// A mapped removed-ranges log.
pub struct RemovedLog {
    map: MmapMut,
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
        let file = std::fs::File::from(fd);
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

    fn map(fd: &OwnedFd) -> Result<Self, RemovedLogError> {
        let file =
            std::fs::File::from(fd.as_fd().try_clone_to_owned().map_err(RemovedLogError::Map)?);
        let len = file.metadata().map_err(RemovedLogError::Map)?.len();
        if len != LOG_BYTES as u64 {
            return Err(RemovedLogError::WrongSize(len));
        }
        // SAFETY: a shared mapping of a memfd of exactly LOG_BYTES bytes (checked above) that is
        // never truncated (only this module sizes it). Other processes write it concurrently, so
        // every access goes through atomics (`word`), never through plain references.
        let map = unsafe { MmapMut::map_mut(&file) }.map_err(RemovedLogError::Map)?;
        Ok(Self { map })
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
}
