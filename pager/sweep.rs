//! Populating guest memory in bulk from the memory file: a cursor over a span of pages that a
//! worker advances one budget at a time, copying the pages that are missing and not discarded,
//! and leaving file holes and zero pages missing (after unregister the kernel supplies zero pages
//! for them; while registered, a fault on one is served like any other).
//!
//! Two users: graduation sweeps every region once; sequential read-ahead sweeps a window ahead
//! of a vCPU that reads memory in order.

use std::ops::Range;
use std::sync::Arc;

use uffdpager::pages::flag_runs;

use crate::session::{FillMode, Session, SessionError};

/// Where a sweep stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// After the last page of the last region.
    AllRegions,
    /// At this page of the sweep's (only) region.
    Page(u64),
}

/// What a sweep did so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepCounts {
    pub populated_bytes: u64,
    pub skipped_zero_bytes: u64,
}

/// Which pages a sweep leaves missing because they read as zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZeroTest {
    /// Holes and data pages of zeros (each data page is read once per memory file to know).
    HolesAndZeroPages,
    /// Holes only, known from the file's extents without reading: for read-ahead, which runs
    /// while a vCPU waits to catch up and must copy faster than it reads.
    Holes,
}

/// A cursor over (region, page).
#[derive(Debug, Clone)]
pub struct Sweep {
    region: usize,
    page: u64,
    stop: Stop,
    zero_test: ZeroTest,
    counts: SweepCounts,
}

impl Sweep {
    /// Every page of every region.
    pub fn all_regions(zero_test: ZeroTest) -> Self {
        Self {
            region: 0,
            page: 0,
            stop: Stop::AllRegions,
            zero_test,
            counts: SweepCounts::default(),
        }
    }

    /// Pages `[first, end)` of region `region`.
    pub fn within(region: usize, first: u64, end: u64, zero_test: ZeroTest) -> Self {
        Self {
            region,
            page: first,
            stop: Stop::Page(end),
            zero_test,
            counts: SweepCounts::default(),
        }
    }

    pub fn counts(&self) -> SweepCounts {
        self.counts
    }

    /// The cursor (region, page) of a sweep within one region; `None` for an all-regions sweep.
    pub fn position(&self) -> Option<(usize, u64)> {
        matches!(self.stop, Stop::Page(_)).then_some((self.region, self.page))
    }

    /// Advances by about `budget` bytes of missing pages (present and discarded pages are passed
    /// over at no cost). `Ok(true)` once every page of the span is behind the cursor.
    pub fn step(&mut self, s: &mut Session, budget: u64) -> Result<bool, SessionError> {
        s.check_file_length()?;
        let mut left = budget;
        while left > 0 {
            let Some((ri, run)) = self.next_run(s, left) else { return Ok(true) };
            self.populate_run(s, ri, run.start, run.end)?;
            left = left.saturating_sub((run.end - run.start) * s.regions[ri].region.page_size);
        }
        Ok(false)
    }

    /// Takes up to `budget` bytes of runs of missing, not discarded pages off the front of the
    /// span without copying them, all in one region and at most `max_runs` runs: a span for a
    /// copy thread ([`crate::copy_threads`]). `None` once every page is behind the cursor.
    pub fn claim(
        &mut self,
        s: &Session,
        budget: u64,
        max_runs: usize,
    ) -> Option<(usize, Vec<Range<u64>>)> {
        let (region, first) = self.next_run(s, budget)?;
        let ps = s.regions[region].region.page_size;
        let mut left = budget.saturating_sub((first.end - first.start) * ps);
        let mut runs = vec![first];
        while left > 0 && runs.len() < max_runs {
            let before = (self.region, self.page);
            match self.next_run(s, left) {
                Some((ri, run)) if ri == region => {
                    left = left.saturating_sub((run.end - run.start) * ps);
                    runs.push(run);
                }
                Some(_) => {
                    // The next region's first run: leave it for the next claim.
                    (self.region, self.page) = before;
                    break;
                }
                None => break,
            }
        }
        Some((region, runs))
    }

    /// The next run of missing, not discarded pages (at most `budget` bytes, at least one page),
    /// with the cursor moved past it. `None` once every page of the span is behind the cursor.
    fn next_run(&mut self, s: &Session, budget: u64) -> Option<(usize, Range<u64>)> {
        loop {
            let r = s.regions.get(self.region)?;
            let (ps, region_pages) = (r.region.page_size, r.region.pages());
            let end = match self.stop {
                Stop::AllRegions => region_pages,
                Stop::Page(p) => p.min(region_pages),
            };
            let Some(p) = r.present().next_clear(self.page).filter(|&p| p < end) else {
                if self.stop != Stop::AllRegions {
                    self.page = end;
                    return None;
                }
                self.region += 1;
                self.page = 0;
                continue;
            };
            if let Some(removed_end) = r.removed.span_end(p) {
                self.page = removed_end.min(end);
                continue;
            }
            let limit = (p + (budget / ps).max(1)).min(end);
            let run_end = r
                .present()
                .next_set_before(p, limit)
                .min(r.removed.next_start_after(p).unwrap_or(u64::MAX));
            self.page = run_end;
            return Some((self.region, p..run_end));
        }
    }

    /// Copies the non-zero pages of the missing run `[first, end)` of the current region. Holes
    /// are known from the file's extents (never read); within data, zero pages are told apart by
    /// content (the memory file's shared zero map) if the sweep tests for them.
    fn populate_run(
        &mut self,
        s: &mut Session,
        ri: usize,
        first: u64,
        end: u64,
    ) -> Result<(), SessionError> {
        let r = s.regions[ri].region;
        let ps = r.page_size;
        let file = Arc::clone(&s.file);
        let (offset, pages) = (r.offset + first * ps, end - first);
        file.map_ahead(offset, pages * ps);
        let mut zero = match self.zero_test {
            ZeroTest::HolesAndZeroPages => file.zero_pages(offset, pages, ps),
            ZeroTest::Holes => file.hole_pages(offset, pages, ps),
        };
        // An overlay page is copied even where the snapshot's page is zero.
        s.overlays.unmark_zero(ri, first, &mut zero);
        for (run, is_zero) in flag_runs(first, &zero) {
            let pages = run.end - run.start;
            if is_zero {
                self.counts.skipped_zero_bytes += pages * ps;
                continue;
            }
            let filled = s.fill(ri, run.start, run.end, FillMode::Populate)?;
            self.counts.populated_bytes += filled * ps;
        }
        Ok(())
    }
}
