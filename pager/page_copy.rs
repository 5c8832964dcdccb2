//! What every bulk copy of guest pages is made of, whoever makes it (a fault's fill, the sweep of
//! read-ahead and graduation, a copy thread's claim):
//!
//! * [`PageSource::zero_parts`]: which parts of a run of missing pages hold data to copy, and
//!   which read as zero and are left missing (file holes, known from the file's extents; and, if
//!   asked, data pages of zeros). An overlay page is always data.
//! * [`PageSource::copy_run`]: the copy loop, `UFFDIO_COPY`s from the session's overlay or the
//!   memory file (split at each edge between the two) until the pages are present or a call
//!   says why not ([`Stop`]).
//!
//! What a caller does where the loop stopped (wait out an `EAGAIN` by reading events, or hand
//! the rest back to the worker that can) is its own: see `Session::fill` and
//! `crate::copy_threads`.

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
    fn copy_pages(
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

/// Why [`PageSource::copy_run`] stopped before the end of its pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// The caller's `enter` said no (a copy thread's completion ended, or memory was discarded
    /// since its claim was planned).
    Refused,
    /// `EEXIST`: this page is present already (someone else filled it; the call woke nobody).
    Exists,
    /// `EAGAIN` with nothing copied: an event (a REMOVE) is in flight and unread.
    Again,
    /// `ESRCH`: the VMM's address space is gone.
    Gone(Errno),
    /// `ENOENT`: no registered mapping at `addr` (not proof that the VMM is gone).
    NoMapping { addr: u64, len: u64 },
    /// Any other error of the call at `addr`.
    Failed { addr: u64, len: u64, errno: Errno },
}

impl PageSource<'_> {
    /// The copy loop: copies pages `[pages.start, pages.end)` of region `ri`, at most
    /// `call_pages` per `UFFDIO_COPY`, each call made holding what `enter` returns (`None`: stop
    /// with [`Stop::Refused`]). Pages are handed to `copied` as they become present. A call that
    /// copies part of its range goes on from there (the next call says why it stopped). Returns
    /// where and why it stopped, if before the end; what to do then (wait out `EAGAIN` by reading
    /// events, wake an `EEXIST` page's waiters, or hand the rest back) is the caller's.
    // The target (uffd, region), the pages and call size, and the caller's two hooks: each one
    // is something the two callers differ in.
    #[allow(clippy::too_many_arguments)]
    pub fn copy_run<G>(
        &self,
        uffd: &Uffd,
        ri: usize,
        region: &Region,
        pages: Range<u64>,
        call_pages: u64,
        mut enter: impl FnMut() -> Option<G>,
        mut copied: impl FnMut(Range<u64>),
    ) -> Result<(), (u64, Stop)> {
        let ps = region.page_size;
        let mut p = pages.start;
        while p < pages.end {
            let call_end = p.saturating_add(call_pages.max(1)).min(pages.end);
            let Some(held) = enter() else { return Err((p, Stop::Refused)) };
            let (end, result) = self.copy_pages(uffd, ri, region, p, call_end);
            drop(held);
            let (addr, len) = (region.base + p * ps, (end - p) * ps);
            match result {
                Ok(FillOutcome::Done) => {
                    copied(p..end);
                    p = end;
                }
                Ok(FillOutcome::Partial(bytes)) if bytes >= ps => {
                    let done = bytes / ps;
                    copied(p..p + done);
                    p += done;
                }
                Ok(FillOutcome::Partial(_)) => return Err((p, Stop::Again)),
                Ok(FillOutcome::Exists) => return Err((p, Stop::Exists)),
                Ok(FillOutcome::Gone(errno)) => return Err((p, Stop::Gone(errno))),
                Ok(FillOutcome::NoMapping) => return Err((p, Stop::NoMapping { addr, len })),
                Err(errno) => return Err((p, Stop::Failed { addr, len, errno })),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
// Test values are small and known: plain `as` casts; a list of one run is a list, not a range.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_possible_wrap)]
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use std::fs::File;
    use std::io::Write;
    use uffdpager::uffd_ops;

    use super::*;
    use crate::memory_file::MemoryFiles;

    const PS: u64 = 4096;
    const PAGES: u64 = 32;

    /// The copy loop on a real uffd over a region of `PAGES` pages whose page `p` holds `p + 1`.
    fn with_region(test: impl FnOnce(&PageSource<'_>, &Uffd, &Region, &memmap2::MmapMut)) {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        for p in 0..PAGES {
            file.write_all(&vec![(p + 1) as u8; PS as usize]).unwrap();
        }
        let mapped = MemoryFiles::default().open(File::open(file.path()).unwrap().into()).unwrap();
        let uffd = uffd_ops::firecracker_uffd(false).expect("userfaultfd");
        let dst = memmap2::MmapOptions::new().len((PAGES * PS) as usize).map_anon().unwrap();
        uffd.register(dst.as_ptr() as *mut _, dst.len()).unwrap();
        let region =
            Region { base: dst.as_ptr() as u64, size: PAGES * PS, offset: 0, page_size: PS };
        let overlays = SessionOverlays::default();
        test(&PageSource { file: &mapped, overlays: &overlays }, &uffd, &region, &dst);
    }

    #[test]
    fn the_loop_copies_in_calls_of_its_size_and_stops_at_a_present_page() {
        with_region(|source, uffd, region, dst| {
            // Page 10 is present already (someone filled it).
            let one = vec![0xee; PS as usize];
            assert_eq!(
                uffd_ops::copy(uffd, &one, region.base + 10 * PS, true),
                Ok(FillOutcome::Done)
            );
            let mut copied = Vec::new();
            let calls = std::cell::Cell::new(0);
            let stopped = source.copy_run(
                uffd,
                0,
                region,
                2..20,
                4,
                || {
                    calls.set(calls.get() + 1);
                    Some(())
                },
                |c| copied.push(c),
            );
            assert_eq!(stopped, Err((10, Stop::Exists)));
            assert_eq!(copied, [2..6, 6..10], "two calls of 4 pages, then one that stopped at 10");
            assert_eq!(calls.get(), 3);
            assert_eq!(dst[(9 * PS) as usize], 10, "the snapshot's bytes");
            assert_eq!(dst[(10 * PS) as usize], 0xee, "a present page is never written");
            // From past the present page on, the rest goes in one call.
            let mut rest = Vec::new();
            assert_eq!(
                source.copy_run(uffd, 0, region, 11..20, u64::MAX, || Some(()), |c| rest.push(c)),
                Ok(())
            );
            assert_eq!(rest, [11..20]);
        });
    }

    #[test]
    fn a_refusal_stops_the_loop_before_its_call() {
        with_region(|source, uffd, region, dst| {
            let mut left = 2;
            let mut copied = Vec::new();
            let enter = || {
                left -= 1;
                (left >= 0).then_some(())
            };
            let stopped = source.copy_run(uffd, 0, region, 0..PAGES, 8, enter, |c| copied.push(c));
            assert_eq!(stopped, Err((16, Stop::Refused)));
            assert_eq!(copied, [0..8, 8..16]);
            assert_eq!(dst[(15 * PS) as usize], 16);
        });
    }

    #[test]
    fn zero_parts_split_a_run_into_data_and_holes() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.as_file().set_len(8 * PS).unwrap();
        file.write_all(&vec![7; 2 * PS as usize]).unwrap(); // pages 0-1 data, 2-7 a hole
        let mapped = MemoryFiles::default().open(File::open(file.path()).unwrap().into()).unwrap();
        let overlays = SessionOverlays::default();
        let source = PageSource { file: &mapped, overlays: &overlays };
        let region = Region { base: 0x10_0000, size: 8 * PS, offset: 0, page_size: PS };
        assert_eq!(
            source.zero_parts(0, &region, 0..8, ZeroTest::Holes),
            [(0..2, false), (2..8, true)]
        );
        assert_eq!(
            source.zero_parts(0, &region, 1..3, ZeroTest::HolesAndZeroPages),
            [(1..2, false), (2..3, true)]
        );
    }
}
