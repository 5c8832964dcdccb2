//! What every guest page must hold, and the check of a page against it.
//!
//! A page is in one of three states: `Snapshot` (the memory file's bytes), `Written(gen)` (a
//! pattern the guest wrote, a pure function of the page and the generation) or `Zero` (discarded
//! by balloon inflation: it must read as zeros, never as snapshot data).
//!
//! States live in one `AtomicU64` per page so that background readers can verify pages while the
//! one foreground thread changes them. Each word is a per-page seqlock: the high 32 bits count
//! mutations (odd while one is in progress), the low 32 bits encode the state (0 = snapshot,
//! `u32::MAX` = zero, otherwise the written generation). A reader loads the word, compares the
//! page, reloads the word and trusts the comparison only if the word did not change; otherwise
//! it retries. Only one thread may mutate (`begin` / `publish`).

use std::fmt;
use std::sync::atomic::{fence, AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use super::mix;

const RAW_SNAPSHOT: u32 = 0;
const RAW_ZERO: u32 = u32::MAX;
/// Largest generation a page can be written with (`u32::MAX` encodes `Zero`).
pub const MAX_GENERATION: u32 = u32::MAX - 1;

/// What a page must hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PageState {
    /// The memory file's bytes at the page's file offset.
    Snapshot,
    /// The pattern the guest wrote with this generation (1 ..= [`MAX_GENERATION`]).
    Written(u32),
    /// Discarded (`MADV_DONTNEED`): zeros.
    Zero,
}

impl PageState {
    fn encode(self) -> u32 {
        match self {
            PageState::Snapshot => RAW_SNAPSHOT,
            PageState::Written(gen) => gen,
            PageState::Zero => RAW_ZERO,
        }
    }

    fn decode(raw: u32) -> PageState {
        match raw {
            RAW_SNAPSHOT => PageState::Snapshot,
            RAW_ZERO => PageState::Zero,
            gen => PageState::Written(gen),
        }
    }
}

impl fmt::Display for PageState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PageState::Snapshot => f.write_str("snapshot"),
            PageState::Written(gen) => write!(f, "written(gen {gen})"),
            PageState::Zero => f.write_str("zero"),
        }
    }
}

/// Per-page states with a per-page seqlock. Any thread may read; one thread mutates.
pub struct PageStates {
    words: Box<[AtomicU64]>,
}

impl fmt::Debug for PageStates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PageStates").field("pages", &self.words.len()).finish()
    }
}

impl PageStates {
    /// `pages` pages, all `Snapshot`.
    pub fn new(pages: usize) -> PageStates {
        PageStates { words: (0..pages).map(|_| AtomicU64::new(0)).collect() }
    }

    /// Number of pages.
    pub fn len(&self) -> usize {
        self.words.len()
    }

    /// True when there are no pages.
    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    /// The page's state, or `None` while a mutation is in progress (or for no such page).
    pub fn get(&self, page: usize) -> Option<PageState> {
        let word = self.words.get(page)?.load(Ordering::Acquire);
        ((word >> 32) % 2 == 0).then(|| PageState::decode(state_half(word)))
    }

    /// Starts mutating a page (single mutator only): readers retry until [`publish`](Self::publish).
    /// Returns the state before. Panics on an out-of-range page (a bug of the caller).
    pub fn begin(&self, page: usize) -> PageState {
        let slot = &self.words[page];
        let word = slot.load(Ordering::Relaxed);
        debug_assert!((word >> 32) % 2 == 0, "page {page}: nested mutation");
        slot.store(word.wrapping_add(1 << 32), Ordering::Relaxed);
        // Orders the odd sequence before the page's new contents (seqlock writer side).
        fence(Ordering::Release);
        PageState::decode(state_half(word))
    }

    /// Ends a mutation begun with [`begin`](Self::begin): the page now holds `state`.
    pub fn publish(&self, page: usize, state: PageState) {
        let slot = &self.words[page];
        let seq = (slot.load(Ordering::Relaxed) >> 32).wrapping_add(1);
        slot.store((seq << 32) | u64::from(state.encode()), Ordering::Release);
    }

    /// Compares `memory` (the page) against its expected content under the seqlock.
    /// `snapshot` is the memory file's bytes for the page; `global_page` keys the write pattern.
    pub fn check(
        &self,
        page: usize,
        memory: &[AtomicU64],
        snapshot: &[u8],
        global_page: u64,
    ) -> Check {
        let Some(slot) = self.words.get(page) else {
            return Check::Changed;
        };
        let before = slot.load(Ordering::Acquire);
        if (before >> 32) % 2 == 1 {
            return Check::Changed;
        }
        let state = PageState::decode(state_half(before));
        let diff = first_difference(memory, &expected(state, snapshot, global_page));
        // Orders the page reads before the re-check (seqlock reader side).
        fence(Ordering::Acquire);
        if slot.load(Ordering::Relaxed) != before {
            return Check::Changed;
        }
        match diff {
            None => Check::Match(state),
            Some(diff) => Check::Mismatch(state, diff),
        }
    }
}

/// The outcome of one page check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// The page holds what its state says.
    Match(PageState),
    /// The page's state was stable during the read and the page does not hold it.
    Mismatch(PageState, Difference),
    /// The page was being changed during the read: try again.
    Changed,
}

/// The first word where a page differs from its expectation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Difference {
    /// Index of the 8-byte word in the page.
    pub word: usize,
    /// What the page holds there.
    pub got: u64,
    /// What it should hold.
    pub want: u64,
}

/// The expected content of a page.
#[derive(Debug, Clone, Copy)]
pub enum Expected<'a> {
    /// These bytes (the memory file's).
    Bytes(&'a [u8]),
    /// The write pattern of `(page, gen)`.
    Pattern { page: u64, gen: u32 },
    /// Zeros.
    Zero,
}

/// The expectation of a page in `state`.
pub fn expected(state: PageState, snapshot: &[u8], global_page: u64) -> Expected<'_> {
    match state {
        PageState::Snapshot => Expected::Bytes(snapshot),
        PageState::Written(gen) => Expected::Pattern { page: global_page, gen },
        PageState::Zero => Expected::Zero,
    }
}

/// The key of a page's write pattern: every word of the page derives from it.
fn pattern_key(page: u64, gen: u32) -> u64 {
    mix(page, u64::from(gen) | 0x5752_0000_0000_0000)
}

/// Word `word` of the pattern written to global page `page` with generation `gen`.
pub fn pattern_word(page: u64, gen: u32, word: usize) -> u64 {
    mix(pattern_key(page, gen), word as u64)
}

/// Writes the pattern of `(page, gen)` into `memory`, word by word, first word first (so the
/// first access takes the page's write fault).
pub fn fill_pattern(memory: &[AtomicU64], page: u64, gen: u32) {
    let key = pattern_key(page, gen);
    for (i, w) in memory.iter().enumerate() {
        w.store(mix(key, i as u64), Ordering::Relaxed);
    }
}

/// Reads every word of `memory` (first word first) and returns the first that differs from
/// `expected`. A snapshot slice shorter than the page counts as zeros past its end.
pub fn first_difference(memory: &[AtomicU64], expected: &Expected<'_>) -> Option<Difference> {
    first_difference_in(memory.iter().map(|w| w.load(Ordering::Relaxed)), expected)
}

/// Like [`first_difference`], over a page already read into native-endian words (e.g. a copy
/// of the page that is then written somewhere else, so that what is checked is what is kept).
pub fn first_difference_in(
    words: impl IntoIterator<Item = u64>,
    expected: &Expected<'_>,
) -> Option<Difference> {
    let mut first = None;
    let mut note = |word: usize, got: u64, want: u64| {
        if got != want && first.is_none() {
            first = Some(Difference { word, got, want });
        }
    };
    match *expected {
        Expected::Bytes(bytes) => {
            let mut chunks = bytes.chunks_exact(8);
            for (i, got) in words.into_iter().enumerate() {
                let want = chunks.next().map_or(0, |c| {
                    u64::from_ne_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])
                });
                note(i, got, want);
            }
        }
        Expected::Pattern { page, gen } => {
            let key = pattern_key(page, gen);
            for (i, got) in words.into_iter().enumerate() {
                note(i, got, mix(key, i as u64));
            }
        }
        Expected::Zero => {
            for (i, got) in words.into_iter().enumerate() {
                note(i, got, 0);
            }
        }
    }
    first
}

/// The state half (low 32 bits) of a page's seqlock word; the high half is its sequence.
#[allow(clippy::cast_possible_truncation)] // keeping the low 32 bits is the point
fn state_half(word: u64) -> u32 {
    word as u32
}

#[cfg(test)]
// Test values are small and known: plain `as` casts.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_possible_wrap)]
mod tests {
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    use super::*;

    const WORDS: usize = 512;

    fn page_memory(pages: usize) -> Vec<AtomicU64> {
        (0..pages * WORDS).map(|_| AtomicU64::new(0)).collect()
    }

    #[test]
    fn states_round_trip_through_their_encoding() {
        for s in [
            PageState::Snapshot,
            PageState::Zero,
            PageState::Written(1),
            PageState::Written(MAX_GENERATION),
        ] {
            assert_eq!(PageState::decode(s.encode()), s);
        }
        assert_eq!(PageState::Written(3).to_string(), "written(gen 3)");
    }

    #[test]
    fn patterns_differ_by_page_generation_and_word() {
        assert_eq!(pattern_word(5, 1, 0), pattern_word(5, 1, 0));
        assert_ne!(pattern_word(5, 1, 0), pattern_word(6, 1, 0));
        assert_ne!(pattern_word(5, 1, 0), pattern_word(5, 2, 0));
        assert_ne!(pattern_word(5, 1, 0), pattern_word(5, 1, 1));
        let mem = page_memory(1);
        fill_pattern(&mem, 5, 1);
        assert!(mem.iter().all(|w| w.load(Ordering::Relaxed) != 0));
        assert_eq!(first_difference(&mem, &Expected::Pattern { page: 5, gen: 1 }), None);
        let diff = first_difference(&mem, &Expected::Pattern { page: 5, gen: 2 }).unwrap();
        assert_eq!(diff.word, 0);
        assert_eq!(diff.want, pattern_word(5, 2, 0));
    }

    #[test]
    fn a_page_compares_against_snapshot_bytes_and_zeros() {
        let mem = page_memory(1);
        let snapshot: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        let diff = first_difference(&mem, &Expected::Bytes(&snapshot)).unwrap();
        assert_eq!((diff.word, diff.got), (0, 0));
        for (i, c) in snapshot.chunks_exact(8).enumerate() {
            mem[i].store(u64::from_ne_bytes(c.try_into().unwrap()), Ordering::Relaxed);
        }
        assert_eq!(first_difference(&mem, &Expected::Bytes(&snapshot)), None);
        assert_eq!(first_difference(&mem, &Expected::Zero).map(|d| d.word), Some(0));
        mem[100].store(7, Ordering::Relaxed);
        let diff = first_difference(&mem, &Expected::Bytes(&snapshot)).unwrap();
        assert_eq!((diff.word, diff.got), (100, 7));
    }

    #[test]
    fn a_stable_corrupt_page_is_a_mismatch_and_a_busy_one_is_retried() {
        let states = PageStates::new(2);
        let mem = page_memory(2);
        let snapshot = vec![0u8; 4096];
        assert_eq!(states.check(0, &mem[..WORDS], &snapshot, 0), Check::Match(PageState::Snapshot));
        states.begin(1);
        assert_eq!(states.get(1), None);
        assert_eq!(states.check(1, &mem[WORDS..], &snapshot, 1), Check::Changed);
        fill_pattern(&mem[WORDS..], 1, 4);
        states.publish(1, PageState::Written(4));
        assert_eq!(states.get(1), Some(PageState::Written(4)));
        assert_eq!(
            states.check(1, &mem[WORDS..], &snapshot, 1),
            Check::Match(PageState::Written(4))
        );
        mem[WORDS + 9].store(0, Ordering::Relaxed);
        assert!(matches!(
            states.check(1, &mem[WORDS..], &snapshot, 1),
            Check::Mismatch(PageState::Written(4), Difference { word: 9, got: 0, .. })
        ));
        assert_eq!(states.check(5, &mem[..WORDS], &snapshot, 5), Check::Changed);
    }

    /// The seqlock in action: one thread keeps rewriting pages with new generations and zeroing
    /// them while another verifies; the reader must never report a mismatch.
    #[test]
    fn concurrent_reader_never_sees_a_torn_page_as_a_mismatch() {
        const PAGES: usize = 8;
        let states = Arc::new(PageStates::new(PAGES));
        let mem: Arc<Vec<AtomicU64>> = Arc::new(page_memory(PAGES));
        let snapshot = Arc::new(vec![0u8; 4096]);
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let (states, mem, snapshot, stop) =
                (states.clone(), mem.clone(), snapshot.clone(), stop.clone());
            std::thread::spawn(move || {
                let (mut matched, mut changed, mut i) = (0u64, 0u64, 0usize);
                while !stop.load(Ordering::Relaxed) || matched < 100 {
                    let p = i % PAGES;
                    i += 1;
                    match states.check(p, &mem[p * WORDS..(p + 1) * WORDS], &snapshot, p as u64) {
                        Check::Match(_) => matched += 1,
                        Check::Changed => changed += 1,
                        Check::Mismatch(s, d) => panic!("page {p} {s}: {d:?}"),
                    }
                }
                (matched, changed)
            })
        };
        for round in 0..20_000u32 {
            let p = (round as usize * 5) % PAGES;
            let page = &mem[p * WORDS..(p + 1) * WORDS];
            states.begin(p);
            if round % 7 == 0 {
                page.iter().for_each(|w| w.store(0, Ordering::Relaxed));
                states.publish(p, PageState::Zero);
            } else {
                let gen = round % 3 + 1;
                fill_pattern(page, p as u64, gen);
                states.publish(p, PageState::Written(gen));
            }
        }
        stop.store(true, Ordering::Relaxed);
        let (matched, _changed) = reader.join().unwrap();
        assert!(matched >= 100);
    }
}
