//! Graduation (CompleteSession): populate every page that is neither present nor removed from
//! the memory file, in large runs, serving faults between runs; then unregister every region.
//!
//! The sweep (`crate::sweep`) is a cursor over (region, page) that the worker advances one
//! budget at a time, so a vCPU never waits for the whole sweep. Pages behind the cursor are
//! present, removed, or hold only zeros in the snapshot (file holes and zero pages are not
//! copied: after unregister the kernel supplies zero pages for them). Nothing is unregistered unless the sweep finished; on any
//! failure the session keeps serving faults and a later call may succeed.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::completion_result::{CompleteError, CompletionReport, CompletionResult};
use crate::copy_threads::{Claim, ClaimDone, CopyThreads, Reply};
use crate::joined_deadline::JoinedDeadline;
use crate::lifecycle::Change;
use crate::metrics::{self, Outcome, METRICS};
use crate::page_copy::ZeroTest;
use crate::session::{Session, SessionError};
use crate::sweep::{Sweep, SweepCounts};

/// Bytes of missing pages per claim a copy thread takes (~1 ms of copying).
const CLAIM_BYTES: u64 = 4 << 20;
/// Runs per claim at most (a VM with many scattered present pages makes many short runs).
const CLAIM_RUNS: usize = 256;
/// Claims in flight per copy thread and completion: one copied, one queued behind it, so a copy
/// thread never waits for the worker to hand out the next.
const CLAIMS_PER_THREAD: usize = 2;

/// Completions get process-unique ids, so a copy thread's late answer is never counted for a
/// later completion of the same session.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Where a completion stands after a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// The worker has pages of its own to copy.
    Working,
    /// Every page is behind the cursor except claims copy threads hold: nothing to do until one
    /// answers.
    AwaitingCopies,
    /// Every page is present, discarded or zero: ready to finish.
    Swept,
}

/// A completion in progress, owned by the worker that serves the session.
#[derive(Debug)]
pub struct Completion {
    started: Instant,
    deadline: Arc<JoinedDeadline>,
    cancel: Arc<AtomicBool>,
    done: watch::Sender<Option<CompletionResult>>,
    id: u64,
    sweep: Sweep,
    /// Whether `sweep` has every page behind its cursor (given out in claims or swept).
    swept: bool,
    /// Spans copy threads handed back unreached, swept by the worker itself (last first).
    leftovers: Vec<Sweep>,
    claims_out: usize,
    /// Tells copy threads to drop this completion's claims once it has ended.
    stop_claims: Arc<AtomicBool>,
    /// Pages counted by copy threads and finished leftover sweeps.
    counted: SweepCounts,
    /// Bytes copy threads populated.
    assisted_bytes: u64,
    report: CompletionReport,
    faults_at_start: Option<u64>,
}

impl Drop for Completion {
    fn drop(&mut self) {
        self.stop_claims.store(true, Ordering::Release);
    }
}

impl Completion {
    pub fn new(
        deadline: Arc<JoinedDeadline>,
        cancel: Arc<AtomicBool>,
        done: watch::Sender<Option<CompletionResult>>,
    ) -> Self {
        Self {
            started: Instant::now(),
            deadline,
            cancel,
            done,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            sweep: Sweep::all_regions(ZeroTest::HolesAndZeroPages),
            swept: false,
            leftovers: Vec::new(),
            claims_out: 0,
            stop_claims: Arc::default(),
            counted: SweepCounts::default(),
            assisted_bytes: 0,
            report: CompletionReport::default(),
            faults_at_start: None,
        }
    }

    fn check_time(&self) -> Result<(), CompleteError> {
        if self.cancel.load(Ordering::Acquire) {
            return Err(CompleteError::Cancelled(self.started.elapsed()));
        }
        if self.deadline.passed() {
            return Err(CompleteError::DeadlineExceeded(self.started.elapsed()));
        }
        Ok(())
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    /// Advances the sweep by about `budget` bytes. With `helpers`, first hands claims to copy
    /// threads, up to [`CLAIMS_PER_THREAD`] each (the worker passes them only while the VM is
    /// quiet).
    pub fn step(
        &mut self,
        s: &mut Session,
        budget: u64,
        helpers: Option<(&CopyThreads, &Reply, u64)>,
    ) -> Result<Progress, CompleteError> {
        if self.faults_at_start.is_none() {
            self.faults_at_start = Some(s.faults());
            self.report.already_resident_bytes = s.resident_bytes();
        }
        self.check_time()?;
        if let Some((threads, reply, token)) = helpers {
            self.hand_out(s, threads, reply, token);
        }
        if let Some(leftover) = self.leftovers.last_mut() {
            if s.sweep_step(leftover, budget).map_err(CompleteError::from)? {
                let counts = leftover.counts();
                self.count(counts);
                self.leftovers.pop();
            }
        } else if !self.swept {
            self.swept = s.sweep_step(&mut self.sweep, budget).map_err(CompleteError::from)?;
        }
        // `resident_bytes` in GetSession grows while the completion runs.
        s.publish();
        self.update_report();
        Ok(self.progress())
    }

    fn progress(&self) -> Progress {
        if !self.swept || !self.leftovers.is_empty() {
            Progress::Working
        } else if self.claims_out > 0 {
            Progress::AwaitingCopies
        } else {
            Progress::Swept
        }
    }

    /// Plans claims off the front of the sweep and queues them for the copy threads.
    fn hand_out(&mut self, s: &Session, threads: &CopyThreads, reply: &Reply, token: u64) {
        while !self.swept && self.claims_out < threads.threads() * CLAIMS_PER_THREAD {
            let Some((region_index, runs)) = self.sweep.claim(&s.regions, CLAIM_BYTES, CLAIM_RUNS)
            else {
                self.swept = true;
                return;
            };
            let claim = Claim {
                completion: self.id,
                token,
                region_index,
                region: s.regions[region_index].region,
                runs,
                uffd: Arc::clone(&s.uffd),
                file: Arc::clone(&s.file),
                overlays: Arc::clone(&s.overlays),
                gate: Arc::clone(&s.gate),
                epoch: s.gate.epoch(),
                stop: Arc::clone(&self.stop_claims),
                reply: reply.clone(),
            };
            match threads.send(claim) {
                Ok(()) => self.claims_out += 1,
                Err(claim) => {
                    // No copy thread left: sweep the span here.
                    self.take_back(claim.region_index, &claim.runs);
                    return;
                }
            }
        }
    }

    /// Queues `runs` of region `ri` for the worker's own sweep.
    fn take_back(&mut self, ri: usize, runs: &[std::ops::Range<u64>]) {
        for run in runs.iter().rev() {
            self.leftovers.push(Sweep::within(ri, run.start, run.end, ZeroTest::HolesAndZeroPages));
        }
    }

    /// Applies a copy thread's answer to one of this completion's claims (the caller has marked
    /// its present pages in the session).
    pub fn on_claim_done(&mut self, done: ClaimDone) -> Result<Progress, CompleteError> {
        self.claims_out -= 1;
        self.take_back(done.region_index, &done.undone);
        if let Some(e) = done.error {
            return Err(CompleteError::from(e));
        }
        self.assisted_bytes += done.populated_bytes;
        self.count(SweepCounts {
            populated_bytes: done.populated_bytes,
            skipped_zero_bytes: done.skipped_zero_bytes,
        });
        self.update_report();
        Ok(self.progress())
    }

    fn count(&mut self, counts: SweepCounts) {
        self.counted.populated_bytes += counts.populated_bytes;
        self.counted.skipped_zero_bytes += counts.skipped_zero_bytes;
    }

    /// Recomputes the report's byte counts; what they grew by goes to the pager's metrics.
    fn update_report(&mut self) {
        let leftover = self.leftovers.last().map(Sweep::counts).unwrap_or_default();
        let (main, counted) = (self.sweep.counts(), self.counted);
        let (populated, zero) = (self.report.populated_bytes, self.report.skipped_zero_bytes);
        self.report.populated_bytes =
            main.populated_bytes + counted.populated_bytes + leftover.populated_bytes;
        self.report.skipped_zero_bytes =
            main.skipped_zero_bytes + counted.skipped_zero_bytes + leftover.skipped_zero_bytes;
        metrics::add(
            &METRICS.completion_bytes,
            self.report.populated_bytes.saturating_sub(populated),
        );
        metrics::add(
            &METRICS.zero_skipped_bytes,
            self.report.skipped_zero_bytes.saturating_sub(zero),
        );
    }

    /// After a full sweep: serve what is queued, unregister every region, and read every event
    /// raised before the unregister, queued yet or not (a VMM madvise blocks until its REMOVE is
    /// read: one left unread once the session is released would freeze that VMM thread).
    pub fn finish(&mut self, s: &mut Session) -> Result<(), CompleteError> {
        let result = (|| {
            s.drain_events()?;
            s.serve_pending()?;
            s.unregister_all()?;
            match s.settle_events() {
                // Every region is unregistered: the session cannot go back to serving. Events
                // that keep coming are for ranges this pager never registered.
                Err(e @ SessionError::Stuck(_)) => {
                    tracing::warn!(session = %s.id(), error = %e, "events kept coming after the unregister; graduating anyway");
                    Ok(())
                }
                other => other,
            }
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
                if let Err(e) = s.shared.change(Change::Graduate) {
                    tracing::warn!(session = %s.id(), error = %e, "graduated, though not completing");
                }
                METRICS.graduated(self.report.duration, s.shared.total_bytes());
                let _ = self.done.send(Some(Ok(self.report.clone())));
                Ok(())
            }
            Err(e) => Err(CompleteError::from(e)),
        }
    }

    /// Reports a failure to every waiter.
    pub fn fail(self, error: CompleteError) {
        METRICS.completion_ended(Outcome::of(&error));
        let _ = self.done.send(Some(Err(error)));
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Bytes of `report().populated_bytes` that copy threads populated.
    pub fn assisted_bytes(&self) -> u64 {
        self.assisted_bytes
    }

    pub fn report(&self) -> &CompletionReport {
        &self.report
    }
}
