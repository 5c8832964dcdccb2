//! Which memory files no session holds any more are let go, and when a file may be served
//! from the mapping of an earlier session: pure decisions, kept apart from the table that
//! applies them ([`super::MemoryFiles`]).
//!
//! A snapshot is restored again and again (a burst of VMs from one function's snapshot; a
//! working-set recording made by one restore and replayed by the next). A file whose last
//! session ended stays mapped for a while, its pages in this process's page tables and its
//! zero map known, so that the next session restored from it copies without a page fault on
//! the source and without learning the file again. The page cache pages stay the kernel's:
//! mapped, they are still reclaimable.

use std::fs::Metadata;
use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

/// Most files kept mapped that no session holds: beyond it, the longest idle go first.
pub const MAX_IDLE_FILES: usize = 16;

/// What a file looked like when it was mapped: a file rewritten since (same inode, new length
/// or times) is mapped afresh, its zero map learned again, never served from the old one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub len: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
}

impl Stamp {
    pub fn of(meta: &Metadata) -> Self {
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        Self {
            len: meta.len(),
            mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
            ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
        }
    }
}

/// The files to let go at `now`, of those no session holds (`idle`: each one's key and since
/// when it has been idle): every one idle for `linger` or longer, and the longest idle beyond
/// `max_idle`.
pub fn release<K: Copy>(
    idle: &[(K, Instant)],
    now: Instant,
    linger: Duration,
    max_idle: usize,
) -> Vec<K> {
    let mut by_age: Vec<(K, Instant)> = idle.to_vec();
    by_age.sort_by_key(|&(_, since)| since);
    let over = by_age.len().saturating_sub(max_idle);
    by_age
        .iter()
        .enumerate()
        .filter(|&(i, &(_, since))| i < over || now.saturating_duration_since(since) >= linger)
        .map(|(_, &(k, _))| k)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_idle_for_its_linger_is_let_go_and_one_idle_for_less_is_kept() {
        let t0 = Instant::now();
        let linger = Duration::from_secs(30);
        let idle = [(1, t0), (2, t0 + Duration::from_secs(20))];
        assert!(release(&idle, t0 + Duration::from_secs(10), linger, 16).is_empty());
        assert_eq!(release(&idle, t0 + Duration::from_secs(30), linger, 16), [1]);
        assert_eq!(release(&idle, t0 + Duration::from_secs(60), linger, 16), [1, 2]);
    }

    #[test]
    fn no_linger_lets_every_idle_file_go_at_once() {
        let t0 = Instant::now();
        assert_eq!(release(&[(7, t0)], t0, Duration::ZERO, 16), [7]);
    }

    #[test]
    fn beyond_the_most_idle_files_the_longest_idle_go_first() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let idle = [(3, t0 + s(2)), (1, t0), (2, t0 + s(1))];
        assert_eq!(release(&idle, t0 + s(3), s(30), 2), [1]);
        assert_eq!(release(&idle, t0 + s(3), s(30), 0), [1, 2, 3]);
    }

    #[test]
    fn a_file_rewritten_in_place_has_another_stamp() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut f, &[1u8; 4096]).unwrap();
        let before = Stamp::of(&f.as_file().metadata().unwrap());
        assert_eq!(before, Stamp::of(&f.as_file().metadata().unwrap()));
        std::thread::sleep(Duration::from_millis(20));
        std::os::unix::fs::FileExt::write_all_at(f.as_file(), &[2u8; 4096], 0).unwrap();
        let after = Stamp::of(&f.as_file().metadata().unwrap());
        assert_eq!(after.len, before.len);
        assert_ne!(after, before, "same length, rewritten: the times tell");
    }
}
