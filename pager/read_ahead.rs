//! Sequential read-ahead: the decision, per fault, of what to serve. Pure: no I/O, tested as a
//! function; the session carries it out.
//!
//! A fault that lands just past what was served for the previous one (or anywhere inside the
//! window streamed ahead of it) means the vCPU reads memory in order. Such a fault gets a small
//! block at once (the vCPU waits for it), and a *stream*: a window ahead of the fault that the
//! worker copies in the background, a chunk at a time, while the vCPU reads what is already
//! there. Each time the vCPU reaches the end of its window the next window doubles, up to
//! [`MAX_WINDOW_PAGES`]. Any other fault gets its one page.

use std::ops::Range;

/// Pages served at once for a sequential fault (64 KiB of 4 KiB pages): what the vCPU waits for.
pub const SYNC_PAGES: u64 = 16;
/// The first window streamed ahead of a sequential fault (2 MiB).
pub const FIRST_WINDOW_PAGES: u64 = 512;
/// The largest window (32 MiB): at most this much is populated that a reader which stops
/// reading in order never asks for (graduation would populate it anyway).
pub const MAX_WINDOW_PAGES: u64 = 8192;

/// What to serve for one fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// The faulting page alone.
    OnePage,
    /// A random fault: the aligned block of pages that holds it (see [`ReadAhead::new`]).
    Around { block: Range<u64> },
    /// `now` at once (it starts at the faulting page), then `stream` in the background.
    Sequential { now: Range<u64>, stream: Range<u64> },
}

/// One session's read-ahead state.
#[derive(Debug, Clone)]
pub struct ReadAhead {
    region: usize,
    last_fault: u64,
    /// A fault at or before this page (and after `last_fault`) continues the sequence.
    frontier: u64,
    /// Whether the last plan streamed a window (ending at `frontier`).
    streamed: bool,
    window: u64,
    /// Pages served for a random fault: the aligned block of this many that holds it (1: the
    /// page alone).
    around: u64,
}

impl Default for ReadAhead {
    fn default() -> Self {
        Self::new(1)
    }
}

impl ReadAhead {
    /// Read-ahead that serves a random fault with the aligned block of `around` pages holding
    /// it (at least the page alone).
    pub fn new(around: u64) -> Self {
        Self {
            region: usize::MAX,
            last_fault: 0,
            frontier: 0,
            streamed: false,
            window: 0,
            around: around.max(1),
        }
    }

    /// Plans the serving of a fault at `page` of region `region` (`region_pages` long), which is
    /// neither present nor discarded.
    pub fn on_fault(&mut self, region: usize, page: u64, region_pages: u64) -> Plan {
        let sequential = self.region == region && page > self.last_fault && page <= self.frontier;
        if !sequential {
            let around = self.around;
            let block = (page - page % around)..(page - page % around + around).min(region_pages);
            *self = Self {
                region,
                last_fault: page,
                frontier: block.end.max(page + 1),
                streamed: false,
                window: FIRST_WINDOW_PAGES,
                around,
            };
            if around == 1 {
                return Plan::OnePage;
            }
            return Plan::Around { block };
        }
        if self.streamed && page >= self.frontier {
            // The vCPU read the whole window before faulting: give it a larger one.
            self.window = (self.window * 2).min(MAX_WINDOW_PAGES);
        }
        let now = page..(page + SYNC_PAGES).min(region_pages);
        let stream = now.end..(page + self.window).min(region_pages).max(now.end);
        self.last_fault = page;
        self.frontier = stream.end.max(now.end);
        self.streamed = !stream.is_empty();
        Plan::Sequential { now, stream }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_random_fault_gets_one_page_and_the_next_page_starts_a_stream() {
        let mut ra = ReadAhead::default();
        assert_eq!(ra.on_fault(0, 100, 100_000), Plan::OnePage);
        assert_eq!(
            ra.on_fault(0, 101, 100_000),
            Plan::Sequential { now: 101..117, stream: 117..101 + FIRST_WINDOW_PAGES }
        );
    }

    #[test]
    fn a_random_fault_gets_its_aligned_block_clipped_to_the_region_and_its_end_is_sequential() {
        let mut ra = ReadAhead::new(16);
        assert_eq!(ra.on_fault(0, 100, 100_000), Plan::Around { block: 96..112 });
        // The next fault past the block continues in order: a stream, not another block.
        assert!(matches!(ra.on_fault(0, 112, 100_000), Plan::Sequential { .. }));
        assert_eq!(ra.on_fault(0, 5000, 100_000), Plan::Around { block: 4992..5008 });
        // A region's tail block ends with the region.
        let mut ra = ReadAhead::new(16);
        assert_eq!(ra.on_fault(1, 99, 100), Plan::Around { block: 96..100 });
        // One page around is the page alone.
        assert_eq!(ReadAhead::new(1).on_fault(0, 100, 1000), Plan::OnePage);
        assert_eq!(ReadAhead::new(0).on_fault(0, 100, 1000), Plan::OnePage);
    }

    #[test]
    fn a_fault_inside_the_window_continues_and_one_at_its_end_doubles_it() {
        let mut ra = ReadAhead::default();
        ra.on_fault(0, 0, 100_000);
        ra.on_fault(0, 1, 100_000);
        // The vCPU caught up with the stream half way: same window from there.
        let Plan::Sequential { stream, .. } = ra.on_fault(0, 200, 100_000) else { panic!() };
        assert_eq!(stream, 216..200 + FIRST_WINDOW_PAGES);
        // It read to the end of the window: the next window is twice as long.
        let end = 200 + FIRST_WINDOW_PAGES;
        let Plan::Sequential { stream, .. } = ra.on_fault(0, end, 100_000) else { panic!() };
        assert_eq!(stream, end + SYNC_PAGES..end + 2 * FIRST_WINDOW_PAGES);
    }

    #[test]
    fn the_window_stops_growing_and_never_passes_the_region() {
        let mut ra = ReadAhead::default();
        ra.on_fault(0, 0, 1 << 20);
        let mut page = 1;
        let mut last = 0..0;
        for _ in 0..20 {
            let Plan::Sequential { stream, .. } = ra.on_fault(0, page, 1 << 20) else { panic!() };
            page = stream.end;
            last = stream;
        }
        assert_eq!(last.end - last.start + SYNC_PAGES, MAX_WINDOW_PAGES);
        let mut ra = ReadAhead::default();
        ra.on_fault(1, 90, 100);
        assert_eq!(ra.on_fault(1, 91, 100), Plan::Sequential { now: 91..100, stream: 100..100 });
        // At the region's last page there is nothing left to stream.
        assert_eq!(ra.on_fault(1, 99, 100), Plan::Sequential { now: 99..100, stream: 100..100 });
    }

    #[test]
    fn other_regions_backward_and_far_faults_are_not_sequential() {
        let mut ra = ReadAhead::default();
        ra.on_fault(0, 10, 1000);
        ra.on_fault(0, 11, 1000);
        assert_eq!(ra.on_fault(1, 12, 1000), Plan::OnePage);
        let mut ra = ReadAhead::default();
        ra.on_fault(0, 10, 1000);
        assert_eq!(ra.on_fault(0, 9, 1000), Plan::OnePage);
        assert_eq!(ra.on_fault(0, 600, 1000), Plan::OnePage);
    }
}
