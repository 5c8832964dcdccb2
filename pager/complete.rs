//! Graduation (CompleteSession): populate every page that is neither present nor removed from
//! the memory file, in large runs, serving faults between runs; then unregister every region.
//!
//! The sweep is a cursor over (region, page) that the worker advances one budget at a time, so a
//! vCPU never waits for the whole sweep. Pages behind the cursor are present, removed, or hold
//! only zeros in the snapshot (file holes and zero pages are not copied: after unregister the
//! kernel supplies zero pages for them). Nothing is unregistered unless the sweep finished; on any
//! failure the session keeps serving faults and a later call may succeed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::session::{FillMode, Session, SessionError};

/// What a finished completion did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompletionReport {
    pub populated_bytes: u64,
    pub already_resident_bytes: u64,
    pub skipped_zero_bytes: u64,
    pub skipped_removed_bytes: u64,
    pub faults_during: u64,
    pub duration: Duration,
}

/// Why a completion did not graduate the session.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum CompleteError {
    #[error("completion cancelled after {0:?}; the session keeps serving")]
    Cancelled(Duration),
    #[error("completion deadline expired after {0:?}; the session keeps serving")]
    DeadlineExceeded(Duration),
    #[error("completion failed: {0}; the session keeps serving")]
    Failed(String),
    #[error("the session ended during completion: {0}")]
    SessionEnded(String),
}

pub type CompletionResult = Result<CompletionReport, CompleteError>;

/// A completion in progress, owned by the worker that serves the session.
#[derive(Debug)]
pub struct Completion {
    started: Instant,
    deadline: Option<Instant>,
    cancel: Arc<AtomicBool>,
    done: watch::Sender<Option<CompletionResult>>,
    region: usize,
    page: u64,
    report: CompletionReport,
    faults_at_start: Option<u64>,
}

impl Completion {
    pub fn new(
        deadline: Option<Instant>,
        cancel: Arc<AtomicBool>,
        done: watch::Sender<Option<CompletionResult>>,
    ) -> Self {
        Self {
            started: Instant::now(),
            deadline,
            cancel,
            done,
            region: 0,
            page: 0,
            report: CompletionReport::default(),
            faults_at_start: None,
        }
    }

    fn check_time(&self) -> Result<(), CompleteError> {
        if self.cancel.load(Ordering::Acquire) {
            return Err(CompleteError::Cancelled(self.started.elapsed()));
        }
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(CompleteError::DeadlineExceeded(self.started.elapsed()));
        }
        Ok(())
    }

    /// Advances the sweep by about `budget` bytes. `Ok(true)` once every page is behind the
    /// cursor.
    pub fn step(&mut self, s: &mut Session, budget: u64) -> Result<bool, CompleteError> {
        if self.faults_at_start.is_none() {
            self.faults_at_start = Some(s.faults());
            self.report.already_resident_bytes = s.resident_bytes();
        }
        self.check_time()?;
        // Reading the mapping past the file's end raises SIGBUS: check the length first.
        let need = s.regions.iter().map(|r| r.region.offset + r.region.size).max().unwrap_or(0);
        let len = s
            .file
            .current_len()
            .map_err(|e| CompleteError::Failed(format!("stat memory file: {e}")))?;
        if len < need || s.file.mapped_len() < need {
            return Err(CompleteError::Failed(format!(
                "memory file {} is {len} bytes now, shorter than the {need} bytes the regions need (truncated?)",
                s.shared.memory_file
            )));
        }
        let mut left = budget;
        while left > 0 {
            let Some(r) = s.regions.get(self.region) else { return Ok(true) };
            let (ps, pages) = (r.region.page_size, r.region.pages());
            let Some(p) = r.present.next_clear(self.page) else {
                self.region += 1;
                self.page = 0;
                continue;
            };
            if let Some(end) = r.removed.span_end(p) {
                self.page = end;
                continue;
            }
            let max_pages = (left / ps).max(1);
            let limit = (p + max_pages).min(pages);
            let end = r
                .present
                .next_set_before(p, limit)
                .min(r.removed.next_start_after(p).unwrap_or(u64::MAX));
            self.populate_run(s, p, end).map_err(to_complete_error)?;
            left = left.saturating_sub((end - p) * ps);
            self.page = end;
        }
        Ok(false)
    }

    /// Copies the non-zero pages of the missing run `[first, end)` of the current region. Holes
    /// at the run's start are skipped with one `SEEK_DATA` (no read at all); the rest is told
    /// apart by content: a page of zeros (a written zero page, or a hole inside the run) is not
    /// copied.
    fn populate_run(&mut self, s: &mut Session, first: u64, end: u64) -> Result<(), SessionError> {
        let ri = self.region;
        let r = s.regions[ri].region;
        let ps = r.page_size;
        let file = Arc::clone(&s.file);
        let off = r.offset + first * ps;
        let data = file.next_data(off).unwrap_or(u64::MAX);
        let hole_pages = (data.saturating_sub(off) / ps).min(end - first);
        self.report.skipped_zero_bytes += hole_pages * ps;
        let mut q = first + hole_pages;
        let zero = file.zero_pages(r.offset + q * ps, end - q, ps);
        let is_zero_page = |i: u64| zero[usize::try_from(i - (first + hole_pages)).expect("fits")];
        while q < end {
            if is_zero_page(q) {
                self.report.skipped_zero_bytes += ps;
                q += 1;
                continue;
            }
            let mut run_end = q + 1;
            while run_end < end && !is_zero_page(run_end) {
                run_end += 1;
            }
            let filled = s.fill(ri, q, run_end, FillMode::Populate)?;
            self.report.populated_bytes += filled * ps;
            q = run_end;
        }
        Ok(())
    }

    /// After a full sweep: serve what is queued, unregister every region, and release any event
    /// that came in meanwhile (a VMM madvise blocks until its REMOVE is read).
    pub fn finish(&mut self, s: &mut Session) -> Result<(), CompleteError> {
        let result = (|| {
            s.drain_events()?;
            s.serve_pending()?;
            s.unregister_all()?;
            s.drain_events()?;
            s.serve_pending()
        })();
        match result {
            Ok(()) => {
                self.report.skipped_removed_bytes =
                    s.regions.iter().map(|r| r.removed_missing() * r.region.page_size).sum();
                self.report.faults_during = s.faults() - self.faults_at_start.unwrap_or(0);
                self.report.duration = self.started.elapsed();
                s.shared.set_zero_bytes(self.report.skipped_zero_bytes);
                s.publish();
                // Graduated before anyone hears of it, so the answer shows the final state.
                s.shared.set_error(String::new());
                s.shared.set_state(uffdpager::api::SessionState::Graduated);
                let _ = self.done.send(Some(Ok(self.report.clone())));
                Ok(())
            }
            Err(e) => Err(to_complete_error(e)),
        }
    }

    /// Reports a failure to every waiter.
    pub fn fail(self, error: CompleteError) {
        let _ = self.done.send(Some(Err(error)));
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn report(&self) -> &CompletionReport {
        &self.report
    }
}

fn to_complete_error(e: SessionError) -> CompleteError {
    match e {
        SessionError::Gone(_) => CompleteError::SessionEnded(e.to_string()),
        other => CompleteError::Failed(other.to_string()),
    }
}
