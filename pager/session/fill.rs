//! The fill loop: making a range of a session's pages present, with the kernel's rules applied
//! (see the parent module): present pages are passed over, discarded pages are zero-filled or
//! left alone by [`FillMode`], `EAGAIN` is waited out by reading events, `EEXIST` wakes the
//! page's waiters, `ENOENT` is explained by an event or by the VMM's exit before it fails.
//! The sweep's populate (read-ahead and graduation) runs on it.

use std::ops::Range;
use std::time::Instant;

use nix::errno::Errno;
use tracing::debug;
use uffdpager::firecracker::{Region, PAGE_4K};
use uffdpager::uffd_ops::{self, FillOutcome};

use super::{FillMode, Session, SessionError};
use crate::page_copy::{PageSource, Stop};
use crate::sweep::Sweep;

/// What one fill has waited out so far: since when fills answer `EAGAIN` with no event to read,
/// and how many `ENOENT`s events were read for.
#[derive(Debug, Default)]
struct Retries {
    eagain_since: Option<Instant>,
    no_mapping: u32,
}

impl Session {
    pub(super) fn wake(&self, addr: u64, len: u64) -> Result<(), SessionError> {
        match uffd_ops::wake(&self.uffd, addr, len) {
            Ok(()) => Ok(()),
            Err(e @ Errno::ESRCH) => Err(SessionError::Gone(e)),
            // A wake that finds nothing to wake is not an error worth failing a VM for.
            Err(e) => {
                debug!(session = %self.shared.id, addr, error = %e, "wake failed");
                Ok(())
            }
        }
    }

    /// Fills pages `[first, end)` of region `ri`: present pages are skipped; removed pages are
    /// zero-filled (`OnFault`) or skipped (`Populate`); the rest get the memory file's bytes.
    /// Returns the number of pages this call made present.
    pub fn fill(
        &mut self,
        ri: usize,
        first: u64,
        end: u64,
        mode: FillMode,
    ) -> Result<u64, SessionError> {
        let mut p = first;
        let mut retries = Retries::default();
        let mut filled = 0;
        while p < end {
            let r = &self.regions[ri];
            if r.present().get(p) {
                p = r.present().next_clear(p).unwrap_or(end).min(end);
                continue;
            }
            let removed_end = r.removed.span_end(p);
            let zero = match (removed_end, mode) {
                (Some(e), FillMode::Populate) => {
                    p = e.min(end);
                    continue;
                }
                (Some(_), FillMode::OnFault) => true,
                (None, _) => false,
            };
            let ps = r.region.page_size;
            // One run of missing pages of the same kind.
            let mut run_end = r.present().next_set_before(p, end);
            run_end = match removed_end {
                Some(e) => run_end.min(e),
                None => run_end.min(r.removed.next_start_after(p).unwrap_or(u64::MAX)),
            };
            if zero && ps != PAGE_4K {
                run_end = p + 1; // zeros for hugepages are copied one page at a time
            }
            let addr = r.region.base + p * ps;
            if !zero {
                let region = r.region;
                p = self.fill_data(ri, &region, p..run_end, &mut filled, &mut retries)?;
                continue;
            }
            let result = if ps == PAGE_4K {
                uffd_ops::zeropage(&self.uffd, addr, (run_end - p) * ps, true)
            } else {
                uffd_ops::copy(&self.uffd, self.zero.bytes(ps), addr, true)
            };
            let len = (run_end - p) * ps;
            let outcome = result.map_err(|errno| SessionError::Fill { addr, len, errno })?;
            match outcome {
                FillOutcome::Done => {
                    filled += self.regions[ri].mark_present(p, run_end);
                    p = run_end;
                    retries.eagain_since = None;
                }
                FillOutcome::Partial(bytes) => {
                    let done = bytes / ps;
                    filled += self.regions[ri].mark_present(p, p + done);
                    p += done;
                    self.await_events(&mut retries.eagain_since)?;
                }
                FillOutcome::Exists => {
                    self.found_present(ri, p)?;
                    p += 1;
                }
                FillOutcome::Gone(e) => return Err(SessionError::Gone(e)),
                FillOutcome::NoMapping => {
                    let op = if ps == PAGE_4K { "UFFDIO_ZEROPAGE" } else { "UFFDIO_COPY" };
                    self.explain_no_mapping(&mut retries, op, addr, len)?;
                }
            }
        }
        Ok(filled)
    }

    /// The data part of [`Session::fill`]: copies the missing, not discarded pages `pages` of
    /// region `ri` from its overlay or the memory file with the one copy loop
    /// ([`PageSource::copy_run`]), counting what it made present in `filled`; returns the page to
    /// go on from. Where the loop stops: `EEXIST` wakes the page's waiters; `EAGAIN` reads the
    /// events in flight (the caller then plans the rest again from the page state); `ENOENT`
    /// is explained or fails ([`Session::explain_no_mapping`]).
    fn fill_data(
        &mut self,
        ri: usize,
        region: &Region,
        pages: Range<u64>,
        filled: &mut u64,
        retries: &mut Retries,
    ) -> Result<u64, SessionError> {
        let start = pages.start;
        let source = PageSource { file: &self.file, overlays: &self.overlays };
        let regions = &mut self.regions;
        let stopped = source.copy_run(
            &self.uffd,
            ri,
            region,
            pages.clone(),
            u64::MAX,
            || Some(()),
            |c| {
                *filled += regions[ri].mark_present(c.start, c.end);
            },
        );
        let Err((at, stop)) = stopped else {
            retries.eagain_since = None;
            return Ok(pages.end);
        };
        if at > start {
            retries.eagain_since = None;
        }
        match stop {
            Stop::Exists => {
                self.found_present(ri, at)?;
                Ok(at + 1)
            }
            Stop::Again => {
                self.await_events(&mut retries.eagain_since)?;
                Ok(at)
            }
            // `enter` above never refuses: plan again from here.
            Stop::Refused => Ok(at),
            Stop::Gone(e) => Err(SessionError::Gone(e)),
            Stop::NoMapping { addr, len } => {
                self.explain_no_mapping(retries, "UFFDIO_COPY", addr, len)?;
                Ok(at)
            }
            Stop::Failed { addr, len, errno } => Err(SessionError::Fill { addr, len, errno }),
        }
    }

    /// `EEXIST` at page `page` of region `ri`: the page is present already, and the call that
    /// found it woke nobody, so its waiters are woken here.
    fn found_present(&mut self, ri: usize, page: u64) -> Result<(), SessionError> {
        let r = &mut self.regions[ri];
        r.mark_present(page, page + 1);
        let (addr, ps) = (r.region.base + page * r.region.page_size, r.region.page_size);
        self.wake(addr, ps)
    }

    /// `ENOENT` from `op` at `addr` is no proof that the VMM is gone. An UNMAP or REMOVE read now
    /// explains it: `Ok` lets the fill plan the range again, twice at most. Then proof is asked
    /// of the VMM's stream (EOF) before the range is given up on.
    fn explain_no_mapping(
        &mut self,
        retries: &mut Retries,
        op: &'static str,
        addr: u64,
        len: u64,
    ) -> Result<(), SessionError> {
        retries.no_mapping += 1;
        if retries.no_mapping <= 2 {
            self.drain_events()?;
            return Ok(());
        }
        if let Some(why) = self.vmm_gone() {
            return Err(SessionError::VmmGone(why));
        }
        Err(SessionError::NoMapping { op, addr, len })
    }

    /// Marks pages a copy thread made present, for a claim planned under gate epoch `epoch`.
    /// If memory was discarded since, discarded pages are not marked: a copy made before the
    /// REMOVE was read was zapped with it (see `crate::remove_gate`). Returns the pages marked.
    pub fn mark_copied(&mut self, ri: usize, runs: &[Range<u64>], epoch: u64) -> u64 {
        let removed_since = self.gate.epoch() != epoch;
        let Some(r) = self.regions.get_mut(ri) else { return 0 };
        let mut marked = 0;
        for run in runs {
            if !removed_since {
                marked += r.mark_present(run.start, run.end);
                continue;
            }
            for p in run.clone() {
                if !r.removed.contains(p) {
                    marked += r.mark_present(p, p + 1);
                }
            }
        }
        marked
    }

    /// Advances `sweep` by about `budget` bytes of missing pages (present and discarded pages are
    /// passed over at no cost), copying their data and leaving the parts that read as zero
    /// missing (after unregister the kernel supplies zero pages for them; while registered, a
    /// fault on one is served like any other). `Ok(true)` once every page of the span is behind
    /// the cursor.
    pub fn sweep_step(&mut self, sweep: &mut Sweep, budget: u64) -> Result<bool, SessionError> {
        self.check_file_length()?;
        let mut left = budget;
        while left > 0 {
            let Some((ri, run)) = sweep.next_run(&self.regions, left) else { return Ok(true) };
            let region = self.regions[ri].region;
            let ps = region.page_size;
            left = left.saturating_sub((run.end - run.start) * ps);
            let source = PageSource { file: &self.file, overlays: &self.overlays };
            for (part, is_zero) in source.zero_parts(ri, &region, run, sweep.zero_test()) {
                let bytes = (part.end - part.start) * ps;
                if is_zero {
                    sweep.count(0, bytes);
                } else {
                    let filled = self.fill(ri, part.start, part.end, FillMode::Populate)?;
                    sweep.count(filled * ps, 0);
                }
            }
        }
        Ok(false)
    }
}
