//! Populating guest memory in bulk from the memory file: a cursor over a span of pages that a
//! worker advances one budget at a time, copying the pages that are missing and not discarded,
//! and leaving file holes and zero pages missing (after unregister the kernel supplies zero pages
//! for them; while registered, a fault on one is served like any other).
//!
//! Two users: graduation sweeps every region once; sequential read-ahead sweeps a window ahead
//! of a vCPU that reads memory in order.
//!
//! This module is the plan only, a pure function of the session's page state (which pages are
//! present, which discarded): the next run to copy, the next claim for a copy thread. The copies
//! are the session's (`Session::sweep_step`) and the copy threads'.

use std::ops::Range;

use crate::page_copy::ZeroTest;
use crate::region_pages::RegionPages;

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

    /// Which pages the sweep leaves missing because they read as zero.
    pub fn zero_test(&self) -> ZeroTest {
        self.zero_test
    }

    /// Counts bytes the caller copied, and bytes it left missing as zero.
    pub fn count(&mut self, populated_bytes: u64, skipped_zero_bytes: u64) {
        self.counts.populated_bytes += populated_bytes;
        self.counts.skipped_zero_bytes += skipped_zero_bytes;
    }

    /// Takes up to `budget` bytes of runs of missing, not discarded pages off the front of the
    /// span without copying them, all in one region and at most `max_runs` runs: a span for a
    /// copy thread ([`crate::copy_threads`]). `None` once every page is behind the cursor.
    pub fn claim(
        &mut self,
        regions: &[RegionPages],
        budget: u64,
        max_runs: usize,
    ) -> Option<(usize, Vec<Range<u64>>)> {
        let (region, first) = self.next_run(regions, budget)?;
        let ps = regions[region].region.page_size;
        let mut left = budget.saturating_sub((first.end - first.start) * ps);
        let mut runs = vec![first];
        while left > 0 && runs.len() < max_runs {
            let before = (self.region, self.page);
            match self.next_run(regions, left) {
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
    pub fn next_run(
        &mut self,
        regions: &[RegionPages],
        budget: u64,
    ) -> Option<(usize, Range<u64>)> {
        loop {
            let r = regions.get(self.region)?;
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
}

#[cfg(test)]
// A claim of one run is a vector of one range here, not a range of pages spelled wrong.
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use uffdpager::firecracker::Region;

    use super::*;

    const PS: u64 = 4096;

    fn regions(pages: &[u64]) -> Vec<RegionPages> {
        let mut base = 0x10_0000;
        pages
            .iter()
            .map(|&n| {
                let r = Region { base, size: n * PS, offset: base, page_size: PS };
                base += n * PS;
                RegionPages::new(r)
            })
            .collect()
    }

    fn runs(sweep: &mut Sweep, regions: &[RegionPages], budget: u64) -> Vec<(usize, Range<u64>)> {
        std::iter::from_fn(|| sweep.next_run(regions, budget)).collect()
    }

    #[test]
    fn the_next_runs_pass_over_present_and_discarded_pages_and_cross_regions() {
        let mut rs = regions(&[16, 8]);
        rs[0].mark_present(2, 4);
        rs[0].remove(8, 10);
        rs[1].mark_present(0, 8);
        let mut sweep = Sweep::all_regions(ZeroTest::Holes);
        assert_eq!(runs(&mut sweep, &rs, u64::MAX), [(0, 0..2), (0, 4..8), (0, 10..16)]);
        assert_eq!(sweep.next_run(&rs, u64::MAX), None, "the end stays the end");
    }

    #[test]
    fn a_run_is_at_most_the_budget_and_at_least_one_page() {
        let rs = regions(&[10]);
        let mut sweep = Sweep::all_regions(ZeroTest::Holes);
        assert_eq!(runs(&mut sweep, &rs, 4 * PS), [(0, 0..4), (0, 4..8), (0, 8..10)]);
        let mut sweep = Sweep::all_regions(ZeroTest::Holes);
        assert_eq!(runs(&mut sweep, &rs, 1).len(), 10, "a budget under a page still moves");
    }

    #[test]
    fn a_sweep_within_a_window_stops_at_its_end() {
        let rs = regions(&[32]);
        let mut sweep = Sweep::within(0, 5, 9, ZeroTest::Holes);
        assert_eq!(sweep.position(), Some((0, 5)));
        assert_eq!(runs(&mut sweep, &rs, u64::MAX), [(0, 5..9)]);
        assert_eq!(sweep.position(), Some((0, 9)));
        assert_eq!(Sweep::all_regions(ZeroTest::Holes).position(), None);
    }

    #[test]
    fn a_claim_stays_in_one_region_within_its_budget_and_run_count() {
        let mut rs = regions(&[16, 16]);
        for p in (1..16).step_by(2) {
            rs[0].mark_present(p, p + 1); // runs of one page: 0, 2, 4, ...
        }
        let mut sweep = Sweep::all_regions(ZeroTest::Holes);
        let (ri, claimed) = sweep.claim(&rs, u64::MAX, 3).unwrap();
        assert_eq!((ri, claimed), (0, vec![0..1, 2..3, 4..5]), "at most 3 runs");
        let (ri, claimed) = sweep.claim(&rs, 2 * PS, 100).unwrap();
        assert_eq!((ri, claimed), (0, vec![6..7, 8..9]), "at most the budget");
        let (ri, claimed) = sweep.claim(&rs, u64::MAX, 100).unwrap();
        assert_eq!((ri, claimed), (0, vec![10..11, 12..13, 14..15]), "never into region 1");
        assert_eq!(sweep.claim(&rs, u64::MAX, 100), Some((1, vec![0..16])));
        assert_eq!(sweep.claim(&rs, u64::MAX, 100), None);
    }

    #[test]
    fn counts_add_up_what_the_caller_reports() {
        let mut sweep = Sweep::all_regions(ZeroTest::HolesAndZeroPages);
        sweep.count(3 * PS, 0);
        sweep.count(0, PS);
        assert_eq!(sweep.counts(), SweepCounts { populated_bytes: 3 * PS, skipped_zero_bytes: PS });
        assert_eq!(sweep.zero_test(), ZeroTest::HolesAndZeroPages);
    }
}
