//! Populating guest memory in bulk from the memory file: a cursor over a span of pages that a
//! worker advances one budget at a time, copying the pages that are missing and not discarded,
//! and leaving file holes and zero pages missing (after unregister the kernel supplies zero pages
//! for them; while registered, a fault on one is served like any other).
//!
//! Two users: graduation sweeps every region once; sequential read-ahead sweeps a window ahead
//! of a vCPU that reads memory in order.

use std::sync::Arc;

use crate::session::{FillMode, Session, SessionError};

/// Data runs at least this long have the memory file's pages mapped into the pager in one call
/// before they are copied (shorter ones are not worth the call).
const POPULATE_MIN_PAGES: u64 = 16;

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

    /// Advances by about `budget` bytes of missing pages (present and discarded pages are passed
    /// over at no cost). `Ok(true)` once every page of the span is behind the cursor.
    pub fn step(&mut self, s: &mut Session, budget: u64) -> Result<bool, SessionError> {
        s.check_file_length()?;
        let mut left = budget;
        while left > 0 {
            let Some(r) = s.regions.get(self.region) else { return Ok(true) };
            let (ps, region_pages) = (r.region.page_size, r.region.pages());
            let end = match self.stop {
                Stop::AllRegions => region_pages,
                Stop::Page(p) => p.min(region_pages),
            };
            let next_missing = r.present().next_clear(self.page).filter(|&p| p < end);
            let Some(p) = next_missing else {
                if self.stop != Stop::AllRegions {
                    self.page = end;
                    return Ok(true);
                }
                self.region += 1;
                self.page = 0;
                continue;
            };
            if let Some(removed_end) = r.removed.span_end(p) {
                self.page = removed_end.min(end);
                continue;
            }
            let limit = (p + (left / ps).max(1)).min(end);
            let run_end = r
                .present()
                .next_set_before(p, limit)
                .min(r.removed.next_start_after(p).unwrap_or(u64::MAX));
            self.populate_run(s, p, run_end)?;
            left = left.saturating_sub((run_end - p) * ps);
            self.page = run_end;
        }
        Ok(false)
    }

    /// Copies the non-zero pages of the missing run `[first, end)` of the current region. Holes
    /// are known from the file's extents (never read); within data, zero pages are told apart by
    /// content (the memory file's shared zero map) if the sweep tests for them.
    fn populate_run(&mut self, s: &mut Session, first: u64, end: u64) -> Result<(), SessionError> {
        let ri = self.region;
        let r = s.regions[ri].region;
        let ps = r.page_size;
        let file = Arc::clone(&s.file);
        let (offset, pages) = (r.offset + first * ps, end - first);
        let zero = match self.zero_test {
            ZeroTest::HolesAndZeroPages => file.zero_pages(offset, pages, ps),
            ZeroTest::Holes => file.hole_pages(offset, pages, ps),
        };
        let mut q = first;
        while q < end {
            let i = usize::try_from(q - first).expect("run fits");
            if zero[i] {
                let zeros = zero[i..].iter().take_while(|&&z| z).count() as u64;
                self.counts.skipped_zero_bytes += zeros * ps;
                q += zeros;
                continue;
            }
            let data = zero[i..].iter().take_while(|&&z| !z).count() as u64;
            if data >= POPULATE_MIN_PAGES {
                file.populate(r.offset + q * ps, data * ps);
            }
            let filled = s.fill(ri, q, q + data, FillMode::Populate)?;
            self.counts.populated_bytes += filled * ps;
            q += data;
        }
        Ok(())
    }
}
