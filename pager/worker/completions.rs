//! A worker's completions (graduations) in progress: one adaptive step each per turn, the copy
//! threads' answers applied, and the finish or failure of each.

use tracing::{info, warn};

use super::{Release, Worker, MAX_STEP_BYTES};
use crate::complete::{Completion, Progress};
use crate::completion_result::CompleteError;
use crate::lifecycle::Change;

impl Worker {
    /// Applies copy threads' answers: present pages into the session, the rest into the claim's
    /// completion (a late answer for a completion that ended only marks pages present).
    pub(super) fn take_claims_done(&mut self) {
        while let Ok(done) = self.claims_rx.try_recv() {
            let token = done.token;
            let Some(s) = self.sessions.get_mut(&token) else { continue };
            s.mark_copied(done.region_index, &done.present, done.epoch);
            s.publish();
            let Some(i) =
                self.completions.iter().position(|(t, c)| *t == token && c.id() == done.completion)
            else {
                continue;
            };
            if let Err(e) = self.completions[i].1.on_claim_done(done) {
                let (_, c) = self.completions.swap_remove(i);
                self.fail_completion(token, c, e);
            }
        }
    }

    /// One step for each completion in progress, then finish or fail those that are done.
    ///
    /// The step adapts: `budget` bytes while faults are coming in (a fault waits at most one
    /// step: ~70 µs for 256 KiB), doubling up to `MAX_STEP_BYTES` while none do, so a quiet VM
    /// graduates at bulk-copy speed with few step overheads. Once the step has grown to its
    /// largest (no fault for ~8 MiB of steps), copy threads get claims too.
    pub(super) fn step_completions(&mut self, faulted: bool) {
        let max = MAX_STEP_BYTES.max(self.budget);
        self.step = if faulted { self.budget } else { (self.step * 2).min(max) };
        let quiet = !faulted && self.step == max;
        self.working = false;
        let mut i = 0;
        while i < self.completions.len() {
            let token = self.completions[i].0;
            let Some(s) = self.sessions.get_mut(&token) else {
                let (_, c) = self.completions.swap_remove(i);
                c.fail(CompleteError::SessionEnded("the session is no longer served".into()));
                continue;
            };
            let helpers = match &self.copies {
                Some(copies) if quiet => Some((copies, &self.reply, token)),
                _ => None,
            };
            let step = self.completions[i].1.step(s, self.step, helpers);
            match step {
                Ok(progress @ (Progress::Working | Progress::AwaitingCopies)) => {
                    self.working |= progress == Progress::Working;
                    i += 1;
                    self.serve_queued(token);
                }
                Ok(Progress::Swept) => {
                    let (_, mut c) = self.completions.swap_remove(i);
                    let report = c.report().clone();
                    let (elapsed, assisted_bytes) = (c.elapsed(), c.assisted_bytes());
                    match c.finish(s) {
                        Ok(()) => {
                            info!(session = %s.id(), version = %self.version, populated_bytes = report.populated_bytes,
                                assisted_bytes, skipped_zero_bytes = report.skipped_zero_bytes, ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX), "session graduated");
                            self.end(token, Release::Graduated, String::new());
                        }
                        Err(e) => self.fail_completion(token, c, e),
                    }
                }
                Err(e) => {
                    let (_, c) = self.completions.swap_remove(i);
                    self.fail_completion(token, c, e);
                }
            }
        }
    }

    pub(super) fn fail_completion(&mut self, token: u64, c: Completion, e: CompleteError) {
        if let Some(s) = self.sessions.get(&token) {
            warn!(session = %s.id(), version = %self.version, error = %e, "completion failed; session keeps serving");
            s.shared.set_error(e.to_string());
            s.publish();
            if let CompleteError::SessionEnded(reason) = &e {
                let reason = reason.clone();
                c.fail(e);
                self.end(token, Release::Ended, reason);
                return;
            }
            let _ = s.shared.change(Change::CompletionFailed);
        }
        c.fail(e);
    }
}
