//! Guest-like workloads on a restored [`Vm`]: reads that verify every byte against what the page
//! must hold, writes of a known pattern, balloon inflation. Each returns a [`Report`].
//!
//! Reads take `&self`; writes and balloon take `&mut self`, so the foreground thread is the only
//! mutator of page states, as the seqlock in `expect` requires. Any of these may block forever
//! if the pager does not serve faults: bound them with [`run_with_deadline`](super::run_with_deadline).

use std::io;
use std::time::Instant;

use nix::errno::Errno;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::expect::{fill_pattern, Check, Difference, PageState, MAX_GENERATION};
use super::guest::{Guest, PageRef, Vm};
use super::parse::Amount;
use super::report::{Recorder, Report};

/// Why a workload could not run. Each variant names the bad input or the failed step.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error("page {page} does not exist (the guest has {pages} pages)")]
    PageOutOfRange { page: u64, pages: u64 },
    #[error("generation {0} is out of range (1..={MAX_GENERATION})")]
    InvalidGeneration(u32),
    #[error("region {region} does not exist (the guest has {regions} regions)")]
    NoSuchRegion { region: usize, regions: usize },
    #[error("balloon range {offset:#x}+{len:#x} of region {region} is empty, not aligned to its {page_size}-byte pages, or past its end ({size:#x} bytes)")]
    BalloonRange { region: usize, offset: u64, len: u64, page_size: u64, size: u64 },
    #[error("region {region} is mapped from the memory file (the File backend): a discarded page would read the file again, not zeros")]
    BalloonOnFile { region: usize },
    #[error("madvise(MADV_DONTNEED) failed: {0}")]
    Madvise(Errno),
    #[error("spawning the reader thread failed: {0}")]
    SpawnReader(io::Error),
    #[error("the reader thread panicked")]
    ReaderPanicked,
}

/// How often a page read that raced with a mutation is retried before it is given up.
const MAX_RETRIES: u32 = 1000;

/// Describes a mismatching page for a report.
pub(crate) fn describe(page: &PageRef<'_>, state: PageState, diff: Difference) -> String {
    format!(
        "page {} (region {} +{:#x}): expected {state}, word {} (+{:#x}) reads {:#018x}, want {:#018x}",
        page.global,
        page.region,
        page.offset,
        diff.word,
        diff.word * 8,
        diff.got,
        diff.want
    )
}

/// Reads and verifies one page, timing the access. Returns false if the page changed while it
/// was read (only possible with a concurrent mutator): the caller retries or moves on.
pub(crate) fn verify_page(guest: &Guest, page: &PageRef<'_>, rec: &mut Recorder) -> bool {
    let started = Instant::now();
    let check = guest.check(page);
    let latency = started.elapsed();
    let bytes = (page.memory.len() * 8) as u64;
    match check {
        Check::Match(_) => rec.verified(bytes, latency, None),
        Check::Mismatch(state, diff) => {
            rec.verified(bytes, latency, Some(describe(page, state, diff)))
        }
        Check::Changed => {
            rec.retried();
            return false;
        }
    }
    true
}

/// Verifies the pages `indices` yields, in that order.
fn verify_pages(guest: &Guest, workload: &str, indices: impl Iterator<Item = u64>) -> Report {
    let mut rec = Recorder::new(workload);
    for global in indices {
        let Some(page) = guest.page(global) else { continue };
        let mut tries = 0;
        while !verify_page(guest, &page, &mut rec) && tries < MAX_RETRIES {
            tries += 1;
        }
    }
    rec.finish()
}

impl Vm {
    /// Reads `amount` random pages (distinct pages, in random order, when the amount is at
    /// most the guest's page count; with repetition beyond) and verifies each.
    pub fn read_random(&self, amount: Amount, seed: u64) -> Report {
        let total = self.guest.pages;
        let n = amount.pages_of(total);
        let mut rng = SmallRng::seed_from_u64(seed);
        match (usize::try_from(total), usize::try_from(n)) {
            (Ok(t), Ok(k)) if n <= total => {
                let picked = rand::seq::index::sample(&mut rng, t, k);
                verify_pages(&self.guest, "read-random", picked.into_iter().map(|i| i as u64))
            }
            _ => verify_pages(&self.guest, "read-random", (0..n).map(|_| rng.gen_range(0..total))),
        }
    }

    /// Reads every page once, in address order, and verifies each.
    pub fn read_sequential(&self) -> Report {
        verify_pages(&self.guest, "read-seq", 0..self.guest.pages)
    }

    /// Reads `count` pages from global page `first` on, in address order, and verifies each: a
    /// guest touching only part of its memory.
    pub fn read_range(&self, first: u64, count: u64) -> Result<Report, WorkloadError> {
        let total = self.guest.pages;
        match first.checked_add(count) {
            Some(end) if end <= total => Ok(verify_pages(&self.guest, "read-range", first..end)),
            _ => Err(WorkloadError::PageOutOfRange {
                page: first.saturating_add(count).saturating_sub(1).max(first),
                pages: total,
            }),
        }
    }

    /// Reads and verifies every page (the final check of a test).
    pub fn verify_all(&self) -> Report {
        verify_pages(&self.guest, "verify", 0..self.guest.pages)
    }

    /// Writes the pattern of generation `gen` (1 ..= [`MAX_GENERATION`]) into each page of
    /// `pages` (global indices) and records it as what those pages must hold. Pages never
    /// touched before take a write fault first, which the pager serves.
    pub fn write_pages(&mut self, pages: &[u64], gen: u32) -> Result<Report, WorkloadError> {
        let total = self.guest.pages;
        if let Some(&page) = pages.iter().find(|&&p| p >= total) {
            return Err(WorkloadError::PageOutOfRange { page, pages: total });
        }
        self.write_checked(pages.iter().copied(), gen)
    }

    /// Writes generation `gen` into `count` pages from global page `first` on.
    pub fn write_range(
        &mut self,
        first: u64,
        count: u64,
        gen: u32,
    ) -> Result<Report, WorkloadError> {
        let total = self.guest.pages;
        match first.checked_add(count) {
            Some(end) if end <= total => self.write_checked(first..end, gen),
            _ => Err(WorkloadError::PageOutOfRange {
                page: first.saturating_add(count).saturating_sub(1).max(first),
                pages: total,
            }),
        }
    }

    fn write_checked(
        &mut self,
        pages: impl Iterator<Item = u64>,
        gen: u32,
    ) -> Result<Report, WorkloadError> {
        if gen == 0 || gen > MAX_GENERATION {
            return Err(WorkloadError::InvalidGeneration(gen));
        }
        let guest = &*self.guest;
        let mut rec = Recorder::new("write");
        for global in pages {
            let (Some(page), Ok(index)) = (guest.page(global), usize::try_from(global)) else {
                continue; // validated by the callers
            };
            guest.states.begin(index);
            let started = Instant::now();
            fill_pattern(page.memory, global, gen);
            rec.written(started.elapsed());
            guest.states.publish(index, PageState::Written(gen));
        }
        Ok(rec.finish())
    }

    /// Balloon inflation: `madvise(MADV_DONTNEED)` on `len` bytes at `offset` of region
    /// `region` (aligned to the region's page size: 2 MiB for hugepage regions). The pages must
    /// read as zeros from now on. Blocks until the pager has read the REMOVE event.
    pub fn balloon(
        &mut self,
        region: usize,
        offset: u64,
        len: u64,
    ) -> Result<Report, WorkloadError> {
        let guest = &*self.guest;
        let regions = guest.regions.len();
        let r = guest.regions.get(region).ok_or(WorkloadError::NoSuchRegion { region, regions })?;
        if r.map.file_backed() {
            return Err(WorkloadError::BalloonOnFile { region });
        }
        let (ps, size) = (r.spec.page_size, r.spec.size);
        let bad = WorkloadError::BalloonRange { region, offset, len, page_size: ps, size };
        let in_range = offset.checked_add(len).is_some_and(|end| end <= size);
        if len == 0 || offset % ps != 0 || len % ps != 0 || !in_range {
            return Err(bad);
        }
        let (Ok(off), Ok(n)) = (usize::try_from(offset), usize::try_from(len)) else {
            return Err(bad);
        };
        let first = r.first_page + offset / ps;
        let indices: Vec<usize> =
            (first..first + len / ps).filter_map(|p| usize::try_from(p).ok()).collect();
        let mut rec = Recorder::new("balloon");
        let before: Vec<PageState> = indices.iter().map(|&i| guest.states.begin(i)).collect();
        if let Err(e) = r.map.discard(off, n) {
            // Nothing was discarded: the pages still hold what they held.
            for (&i, &state) in indices.iter().zip(&before) {
                guest.states.publish(i, state);
            }
            return Err(WorkloadError::Madvise(e));
        }
        for &i in &indices {
            guest.states.publish(i, PageState::Zero);
        }
        rec.removed(indices.len() as u64);
        Ok(rec.finish())
    }
}
