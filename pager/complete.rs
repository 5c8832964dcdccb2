//! Graduation (CompleteSession): populate every page that is neither present nor removed from
//! the memory file, in large runs, serving faults between runs; then unregister every region.
//!
//! The sweep (`crate::sweep`) is a cursor over (region, page) that the worker advances one
//! budget at a time, so a vCPU never waits for the whole sweep. Pages behind the cursor are
//! present, removed, or hold only zeros in the snapshot (file holes and zero pages are not
//! copied: after unregister the kernel supplies zero pages for them). Nothing is unregistered unless the sweep finished; on any
//! failure the session keeps serving faults and a later call may succeed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::session::{Session, SessionError};
use crate::sweep::{Sweep, ZeroTest};

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
    sweep: Sweep,
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
            sweep: Sweep::all_regions(ZeroTest::HolesAndZeroPages),
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
        let done = self.sweep.step(s, budget).map_err(to_complete_error)?;
        let counts = self.sweep.counts();
        self.report.populated_bytes = counts.populated_bytes;
        self.report.skipped_zero_bytes = counts.skipped_zero_bytes;
        Ok(done)
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
