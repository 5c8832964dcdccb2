//! The two steps every bulk copy of guest pages is made of, whoever makes it (a fault's fill, the
//! sweep of read-ahead and graduation, a copy thread's claim):
//!
//! * [`zero_parts`]: which parts of a run of missing pages hold data to copy, and which read as
//!   zero and are left missing (file holes, known from the file's extents; and, if asked, data
//!   pages of zeros). An overlay page is always data.
//! * [`copy_pages`]: one `UFFDIO_COPY` from the session's overlay or the memory file, up to the
//!   next edge between the two.
//!
//! What a caller does with the outcome (wait out an `EAGAIN` by reading events, or hand the rest
//! back to the worker that can) is its own: see `Session::fill` and `crate::copy_threads`.

use std::ops::Range;

use nix::errno::Errno;
use uffdpager::firecracker::Region;
use uffdpager::pages::flag_runs;
use uffdpager::uffd_ops::{self, FillOutcome};
use userfaultfd::Uffd;

use crate::memory_file::MappedFile;
use crate::overlay::SessionOverlays;

/// Which pages a bulk copy leaves missing because they read as zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZeroTest {
    /// Holes and data pages of zeros (each data page is read once per memory file to know).
    HolesAndZeroPages,
    /// Holes only, known from the file's extents without reading: for read-ahead, which runs
    /// while a vCPU waits to catch up and must copy faster than it reads.
    Holes,
}

/// Where a session's pages come from: the memory file, and the overlays that replace some.
#[derive(Debug, Clone, Copy)]
pub struct PageSource<'a> {
    pub file: &'a MappedFile,
    pub overlays: &'a SessionOverlays,
}

impl PageSource<'_> {
    /// Splits the missing run `run` of region `ri` into parts that hold data (`false`) and parts
    /// that read as zero (`true`), in order, and asks the kernel to map the run's file range
    /// ahead of the copies.
    pub fn zero_parts(
        &self,
        ri: usize,
        region: &Region,
        run: Range<u64>,
        test: ZeroTest,
    ) -> Vec<(Range<u64>, bool)> {
        let ps = region.page_size;
        let (offset, pages) = (region.offset + run.start * ps, run.end - run.start);
        self.file.map_ahead(offset, pages * ps);
        let mut zero = match test {
            ZeroTest::HolesAndZeroPages => self.file.zero_pages(offset, pages, ps),
            ZeroTest::Holes => self.file.hole_pages(offset, pages, ps),
        };
        // An overlay page is copied even where the snapshot's page is zero.
        self.overlays.unmark_zero(ri, run.start, &mut zero);
        flag_runs(run.start, &zero).collect()
    }

    /// One `UFFDIO_COPY` (waking the range's waiters) of pages `[first, end)` of region `ri`, or
    /// of the part up to the next edge between overlay and memory file. Returns the end page of
    /// the part copied and the kernel's answer.
    pub fn copy_pages(
        &self,
        uffd: &Uffd,
        ri: usize,
        region: &Region,
        first: u64,
        end: u64,
    ) -> (u64, Result<FillOutcome, Errno>) {
        let (end, src) = self.overlays.source(self.file, ri, region, first, end);
        let addr = region.base + first * region.page_size;
        (end, uffd_ops::copy(uffd, src, addr, true))
    }
}
