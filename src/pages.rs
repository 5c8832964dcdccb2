//! Page bookkeeping: which pages of a region are present, which were discarded by the VMM.
//! Pure data structures, no I/O, so they are tested as functions.

use std::collections::BTreeMap;
use std::ops::Range;

/// One bit per page: set = present in guest memory.
#[derive(Debug, Clone, Default)]
pub struct PageBitmap {
    words: Vec<u64>,
    len: u64,
    ones: u64,
}

impl PageBitmap {
    pub fn new(len: u64) -> Self {
        let words = usize::try_from(len.div_ceil(64)).expect("bitmap fits in memory");
        Self { words: vec![0; words], len, ones: 0 }
    }

    /// Number of pages tracked.
    #[inline]
    pub fn len(&self) -> u64 {
        self.len
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of set bits.
    pub fn count_ones(&self) -> u64 {
        self.ones
    }

    #[inline]
    fn at(i: u64) -> (usize, u64) {
        (usize::try_from(i / 64).expect("index fits"), 1u64 << (i % 64))
    }

    #[inline]
    pub fn get(&self, i: u64) -> bool {
        debug_assert!(i < self.len);
        let (w, b) = Self::at(i);
        self.words[w] & b != 0
    }

    /// Sets bit `i`; returns true if it was clear.
    #[inline]
    pub fn set(&mut self, i: u64) -> bool {
        let (w, b) = Self::at(i);
        let was_clear = self.words[w] & b == 0;
        self.words[w] |= b;
        self.ones += u64::from(was_clear);
        was_clear
    }

    /// Clears bit `i`; returns true if it was set.
    #[inline]
    pub fn clear(&mut self, i: u64) -> bool {
        let (w, b) = Self::at(i);
        let was_set = self.words[w] & b != 0;
        self.words[w] &= !b;
        self.ones -= u64::from(was_set);
        was_set
    }

    /// Sets every bit in `range`; returns how many were clear.
    pub fn set_range(&mut self, range: Range<u64>) -> u64 {
        range.filter(|&i| self.set(i)).count() as u64
    }

    /// The first clear bit at or after `from`, if any (skips full words quickly).
    pub fn next_clear(&self, from: u64) -> Option<u64> {
        let mut i = from;
        while i < self.len {
            let (w, _) = Self::at(i);
            let word = self.words[w] | ((1u64 << (i % 64)) - 1);
            if word == u64::MAX {
                i = (i / 64 + 1) * 64;
                continue;
            }
            let found = (i / 64) * 64 + u64::from(word.trailing_ones());
            return (found < self.len).then_some(found);
        }
        None
    }

    /// The first set bit at or after `from`, or `len` if none.
    pub fn next_set(&self, from: u64) -> u64 {
        self.next_set_before(from, self.len)
    }

    /// The first set bit in `[from, end)`, or `end` if none: the scan stops at `end`, so asking
    /// about a short run of a huge, empty bitmap costs the run, not the bitmap.
    pub fn next_set_before(&self, from: u64, end: u64) -> u64 {
        let end = end.min(self.len);
        let mut i = from;
        while i < end {
            let (w, _) = Self::at(i);
            let word = self.words[w] & !((1u64 << (i % 64)) - 1);
            if word == 0 {
                i = (i / 64 + 1) * 64;
                continue;
            }
            return ((i / 64) * 64 + u64::from(word.trailing_zeros())).min(end);
        }
        end.max(from.min(end))
    }

    /// Bytes of memory this bitmap holds.
    pub fn heap_bytes(&self) -> usize {
        self.words.capacity() * 8
    }
}

/// A set of page indices kept as disjoint, coalesced half-open intervals.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeSet {
    /// start → end, disjoint and not touching.
    spans: BTreeMap<u64, u64>,
}

impl RangeSet {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// Adds `range`, merging with overlapping or adjacent intervals.
    pub fn insert(&mut self, range: Range<u64>) {
        if range.is_empty() {
            return;
        }
        let (mut start, mut end) = (range.start, range.end);
        // An interval starting at or before `start` that reaches it merges in.
        if let Some((&s, &e)) = self.spans.range(..=start).next_back() {
            if e >= start {
                start = s;
                end = end.max(e);
            }
        }
        // Intervals starting inside [start, end] merge in.
        let inside: Vec<(u64, u64)> =
            self.spans.range(start..=end).map(|(&s, &e)| (s, e)).collect();
        for (s, e) in inside {
            self.spans.remove(&s);
            end = end.max(e);
        }
        self.spans.insert(start, end);
    }

    pub fn contains(&self, i: u64) -> bool {
        self.spans.range(..=i).next_back().is_some_and(|(_, &e)| i < e)
    }

    /// The end of the interval containing `i`, if any.
    pub fn span_end(&self, i: u64) -> Option<u64> {
        self.spans.range(..=i).next_back().and_then(|(_, &e)| (i < e).then_some(e))
    }

    /// The start of the first interval beginning after `i`, if any.
    pub fn next_start_after(&self, i: u64) -> Option<u64> {
        self.spans.range(i + 1..).next().map(|(&s, _)| s)
    }

    /// The intervals, in order.
    pub fn iter(&self) -> impl Iterator<Item = Range<u64>> + '_ {
        self.spans.iter().map(|(&s, &e)| s..e)
    }

    /// Total number of indices in the set.
    pub fn count(&self) -> u64 {
        self.spans.iter().map(|(s, e)| e - s).sum()
    }
}

/// Splits the items `first..first + flags.len()` into maximal runs of equal flags, in order:
/// `(range, flag)`.
pub fn flag_runs(first: u64, flags: &[bool]) -> impl Iterator<Item = (Range<u64>, bool)> + '_ {
    let mut i = 0;
    std::iter::from_fn(move || {
        let flag = *flags.get(i)?;
        let len = flags[i..].iter().take_while(|&&f| f == flag).count();
        let start = first + i as u64;
        i += len;
        Some((start..start + len as u64, flag))
    })
}

/// Splits `range` into runs of at most `max_len` indices.
pub fn chunks(range: Range<u64>, max_len: u64) -> impl Iterator<Item = Range<u64>> {
    assert!(max_len > 0);
    let Range { start, end } = range;
    (start..end)
        .step_by(usize::try_from(max_len).unwrap_or(usize::MAX))
        .map(move |s| s..(s + max_len).min(end))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_counts_set_and_clear_once_each() {
        let mut b = PageBitmap::new(130);
        assert!(b.set(3));
        assert!(!b.set(3));
        assert_eq!(b.count_ones(), 1);
        assert_eq!(b.set_range(0..130), 129);
        assert!(b.clear(129));
        assert!(!b.clear(129));
        assert_eq!(b.count_ones(), 129);
    }

    #[test]
    fn next_clear_and_next_set_skip_whole_words() {
        let mut b = PageBitmap::new(200);
        assert_eq!(b.next_clear(0), Some(0));
        b.set_range(0..150);
        assert_eq!(b.next_clear(0), Some(150));
        assert_eq!(b.next_clear(151), Some(151));
        assert_eq!(b.next_set(150), 200);
        b.set(170);
        assert_eq!(b.next_set(150), 170);
        assert_eq!(b.next_set_before(150, 160), 160);
        assert_eq!(b.next_set_before(150, 171), 170);
        assert_eq!(b.next_set_before(175, 171), 171);
        assert_eq!(b.next_set(0), 0);
        b.set_range(150..200);
        assert_eq!(b.next_clear(0), None);
        assert_eq!(PageBitmap::new(64).next_set(10), 64);
    }

    #[test]
    fn next_clear_stops_at_len_inside_the_last_word() {
        let mut b = PageBitmap::new(70);
        b.set_range(0..70);
        assert_eq!(b.next_clear(0), None);
        assert_eq!(b.next_clear(69), None);
    }

    #[test]
    fn range_set_merges_overlapping_and_adjacent_intervals() {
        let mut s = RangeSet::new();
        s.insert(10..20);
        s.insert(30..40);
        s.insert(20..25);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![10..25, 30..40]);
        s.insert(5..35);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![5..40]);
        s.insert(7..8);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![5..40]);
        s.insert(50..50);
        assert_eq!(s.count(), 35);
    }

    #[test]
    fn range_set_answers_membership_at_interval_edges() {
        let mut s = RangeSet::new();
        s.insert(10..20);
        assert!(!s.contains(9));
        assert!(s.contains(10));
        assert!(s.contains(19));
        assert!(!s.contains(20));
        assert_eq!(s.span_end(15), Some(20));
        assert_eq!(s.span_end(20), None);
        assert_eq!(s.next_start_after(0), Some(10));
        assert_eq!(s.next_start_after(10), None);
    }

    #[test]
    fn flag_runs_split_items_into_maximal_runs_in_order() {
        let flags = [true, true, false, false, false, true, false];
        let runs: Vec<_> = flag_runs(10, &flags).collect();
        assert_eq!(runs, vec![(10..12, true), (12..15, false), (15..16, true), (16..17, false)]);
        assert_eq!(flag_runs(0, &[]).count(), 0);
    }

    #[test]
    fn chunks_cover_a_range_exactly() {
        let v: Vec<_> = chunks(3..12, 4).collect();
        assert_eq!(v, vec![3..7, 7..11, 11..12]);
        assert_eq!(chunks(5..5, 4).count(), 0);
    }
}
