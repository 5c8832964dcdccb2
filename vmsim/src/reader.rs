//! The background reader: a thread that keeps reading random guest pages and verifying them
//! until stopped, while the foreground writes, inflates the balloon, or the pager graduates the
//! VM underneath. Page states are read under their seqlock, so a page changed mid-read is
//! retried, never reported as a mismatch.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::guest::{Guest, Vm};
use super::report::{Recorder, Report};
use super::workload::{verify_page, WorkloadError};

/// Pages between progress updates.
const PROGRESS_EVERY: u64 = 64;

/// Pages verified so far, for waiters.
#[derive(Debug, Default)]
struct Progress {
    verified: Mutex<u64>,
    changed: Condvar,
}

impl Progress {
    fn set(&self, n: u64) {
        *self.verified.lock().unwrap_or_else(PoisonError::into_inner) = n;
        self.changed.notify_all();
    }
}

/// A running background reader. [`stop`](Self::stop) ends it and returns its report; dropping
/// the handle asks the thread to stop without waiting for it.
#[derive(Debug)]
pub struct ReaderHandle {
    stop: Arc<AtomicBool>,
    progress: Arc<Progress>,
    thread: Option<JoinHandle<Report>>,
}

impl ReaderHandle {
    /// Pages verified so far (updated every few dozen pages).
    pub fn pages_verified(&self) -> u64 {
        *self.progress.verified.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until the reader has verified at least `pages` pages; false on timeout.
    pub fn wait_for_pages(&self, pages: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut seen = self.progress.verified.lock().unwrap_or_else(PoisonError::into_inner);
        while *seen < pages {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            seen = self
                .progress
                .changed
                .wait_timeout(seen, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        true
    }

    /// Stops the reader and returns what it verified. Blocks until its current page read ends
    /// (forever, if the pager never serves it: bound it with `run_with_deadline`).
    pub fn stop(mut self) -> Result<Report, WorkloadError> {
        self.stop.store(true, Ordering::Relaxed);
        let thread = self.thread.take().ok_or(WorkloadError::ReaderPanicked)?;
        thread.join().map_err(|_| WorkloadError::ReaderPanicked)
    }
}

impl Drop for ReaderHandle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn run(
    guest: Arc<Guest>,
    seed: u64,
    pages: Range<u64>,
    stop: Arc<AtomicBool>,
    progress: Arc<Progress>,
) -> Report {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut rec = Recorder::new("reader");
    while !stop.load(Ordering::Relaxed) {
        let Some(page) = guest.page(rng.gen_range(pages.clone())) else { continue };
        // A page that changed while read is simply skipped: another random page comes next.
        if verify_page(&guest, &page, &mut rec) {
            let n = rec.pages_verified();
            if n == 1 || n % PROGRESS_EVERY == 0 {
                progress.set(n);
            }
        }
    }
    progress.set(rec.pages_verified());
    rec.finish()
}

impl Vm {
    /// Starts a background reader that verifies random pages (from `seed`) until stopped.
    /// Stop it before dropping the VM: the reader keeps guest memory mapped, but once the VMM's
    /// socket is closed the pager stops serving it.
    pub fn spawn_reader(&self, seed: u64) -> Result<ReaderHandle, WorkloadError> {
        self.spawn_reader_in(seed, 0, self.guest.pages)
    }

    /// Like [`spawn_reader`](Self::spawn_reader), reading only the `count` pages from global
    /// page `first` on: a guest whose working set is that range, so that the pages outside it
    /// stay untouched (e.g. to show that writes to pages never touched before graduation need
    /// no pager afterwards).
    pub fn spawn_reader_in(
        &self,
        seed: u64,
        first: u64,
        count: u64,
    ) -> Result<ReaderHandle, WorkloadError> {
        let total = self.guest.pages;
        let pages = match first.checked_add(count) {
            Some(end) if end <= total && count > 0 => first..end,
            _ => {
                return Err(WorkloadError::PageOutOfRange {
                    page: first.saturating_add(count.max(1) - 1),
                    pages: total,
                })
            }
        };
        let stop = Arc::new(AtomicBool::new(false));
        let progress = Arc::new(Progress::default());
        let thread = {
            let (guest, stop, progress) = (self.guest.clone(), stop.clone(), progress.clone());
            std::thread::Builder::new()
                .name("vmsim-reader".into())
                .spawn(move || run(guest, seed, pages, stop, progress))
                .map_err(WorkloadError::SpawnReader)?
        };
        Ok(ReaderHandle { stop, progress, thread: Some(thread) })
    }
}
