//! A pager that dies never freezes a VM: its live sessions are handed to another pager.
//!
//! The supervisor keeps, for every session it handed over, duplicates of the uffd, the memory
//! file, the VMM stream and the removed-ranges log (a file where each pager records the ranges
//! the VMM discarded), and the handoff request itself. When a pager process exits unexpectedly:
//!
//! 1. under the `held` lock (the one a first handoff records its outcome under), every SERVING or
//!    COMPLETING session of that version is marked as being handed over (`Served { readopting }`
//!    in `crate::lifecycle`): the monitor does not fail it for missing from a listing,
//!    CompleteSession answers UNAVAILABLE;
//! 2. a task reserves an adopter ([`Versions::begin_handoff`]): the active version, waiting
//!    while it is respawned if it was the one that died; else the running version started last;
//! 3. each session is sent again (`adopt: true`, duplicates of the kept descriptors, the faults
//!    served so far): the adopting pager reads the removed ranges from the log (they stay zero),
//!    wakes every registered range once (faults read but never served by the dead pager are
//!    raised again), and treats EEXIST as "already present";
//! 4. the record moves to the adopter (`pager_version`, so `outdated` follows), with UPDATED.
//!
//! A session that no version can adopt now is ORPHANED, its descriptors still held: the monitor
//! hands it to the next version that becomes available (a deploy, a respawn, a supervisor
//! restart: [`Core::adopt_orphans`]). Only a session the supervisor holds no descriptors for
//! (its pager could not give them back after a supervisor restart, nor its VMM) is FAILED when
//! its pager dies: nothing can serve its VM any more.
//!
//! [`Versions::begin_handoff`]: crate::versions::Versions::begin_handoff

use std::collections::HashMap;
use std::sync::Arc;

use tracing::{error, info, instrument, warn};
use uffdpager::handoff::{self, HandoffRequest, SessionFds};

use crate::core::Core;
use crate::lifecycle::{Lifecycle, Phase};
use crate::pager_exit::Exit;
use crate::session_record::{is_held, is_live};
use crate::versions::HandoffGuard;

/// Handoffs tried per session in one re-adoption, a pause between them (see [`next_step`]).
const ATTEMPTS: u32 = 5;
/// The pause after a session's first failed handoff; it doubles after each one (0.1 s, 0.2 s,
/// 0.4 s, 0.8 s): time for the supervisor to see an adopter that died and respawn it.
const RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);

/// Why one re-adoption failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadoptError {
    #[error("the supervisor no longer holds the session's descriptors")]
    NotHeld,
    #[error("duplicating the session's descriptors: {0}")]
    Dup(std::io::Error),
    #[error("handing the session to pager version {version}: {source}")]
    Handoff { version: String, source: handoff::HandoffError },
    #[error("the handoff task failed: {0}")]
    Task(String),
    #[error("pager version {0} exited right after adopting the session")]
    AdopterDied(String),
}

impl ReadoptError {
    /// Whether the adopting pager itself answered no (it read the session and refused it), as
    /// opposed to bad luck on the way: an adopter that died or was not listening yet.
    fn adopter_refused(&self) -> bool {
        use handoff::HandoffError::*;
        matches!(
            self,
            ReadoptError::Handoff {
                source: Refused(_) | Malformed(_) | WrongFdCount(_) | NoOverlayData,
                ..
            }
        )
    }
}

/// What to do with a session whose handoff just failed for the `attempts`-th time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NextStep {
    /// Hand it over again, to a fresh reservation, after the pause.
    Retry,
    /// Keep its descriptors and wait for the next version available (the monitor hands
    /// ORPHANED sessions over on every pass).
    Orphan,
    /// Nothing can serve it: no descriptors, or the adopters keep refusing it.
    Fail,
}

/// The decision after a failed handoff. An adopter that died or was not listening yet is bad
/// luck, never a reason to give a VM up: retried, then ORPHANED.
fn next_step(error: &ReadoptError, attempts: u32) -> NextStep {
    match error {
        ReadoptError::NotHeld => NextStep::Fail,
        _ if attempts < ATTEMPTS => NextStep::Retry,
        e if e.adopter_refused() => NextStep::Fail,
        _ => NextStep::Orphan,
    }
}

/// What became of one session.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Adopted,
    /// It finished meanwhile (or was forgotten): nothing to hand over.
    Gone,
}

/// Fresh duplicates of the kept descriptors, to send (the kept ones stay with the supervisor).
pub fn dup_fds(fds: &SessionFds) -> std::io::Result<SessionFds> {
    Ok(SessionFds {
        uffd: fds.uffd.try_clone()?,
        memory_file: fds.memory_file.try_clone()?,
        vmm_stream: fds.vmm_stream.try_clone()?,
        removed_log: fds.removed_log.as_ref().map(|f| f.try_clone()).transpose()?,
        overlay: fds.overlay.as_ref().map(|f| f.try_clone()).transpose()?,
    })
}

impl Core {
    /// A process of `version` (pid `pid`) exited unexpectedly: marks its live sessions as being
    /// handed over and starts the task that hands them to another pager. Sessions without kept
    /// descriptors are FAILED.
    pub fn orphan_sessions(self: &Arc<Self>, version: &str, pid: u32, exit: &Exit) {
        let why =
            format!("pager version {version} (pid {pid}) exited unexpectedly ({})", exit.status);
        let mut orphans = Vec::new();
        let mut lost = Vec::new();
        {
            // Lock order: held, then the inventory.
            let held = self.held();
            for rec in self.inventory.records_of_version(version) {
                if !is_live(rec.state()) {
                    continue;
                }
                let id = rec.session.id;
                if !held.get(&id).is_some_and(|h| h.fds.is_some() && h.request.is_some()) {
                    lost.push(id);
                    continue;
                }
                // One being handed over already (a fresh process of this version died before it
                // adopted it) stays with the task that hands it over.
                let marked = self.inventory.modify(&id, |r| {
                    let mine = r.lifecycle().is_served()
                        && r.session.pager_version == version
                        && r.step(Lifecycle::begin_readopt).is_ok();
                    if mine {
                        r.session.error = format!("{why}; re-adopting the session");
                    }
                    mine
                });
                if matches!(marked, Some((true, _))) {
                    orphans.push(id);
                }
            }
        }
        for id in lost {
            error!(session = %id, version = %version, "session FAILED: its pager died and no descriptors are held to re-adopt it");
            self.fail_session(
                &id,
                format!(
                    "{why}; this supervisor holds no duplicate descriptors for the session (its \
                     pager could not give them back after a supervisor restart, nor its VMM), so \
                     no pager can adopt it: its VM cannot be served"
                ),
                true,
            );
        }
        if !orphans.is_empty() {
            warn!(version = %version, pid, sessions = orphans.len(), "re-adopting the sessions of a pager that died");
            let task = self.adoption_task();
            let core = self.clone();
            tokio::spawn(async move {
                let _counted = task;
                core.readopt(orphans, why).await;
            });
        }
    }

    /// Hands every ORPHANED session to a version, if one runs now (called by the monitor: a
    /// deploy, a respawn or a restart made one available).
    pub fn adopt_orphans(self: &Arc<Self>) {
        if !self.versions.any_usable() {
            return;
        }
        let mut ids = Vec::new();
        let mut why = String::new();
        for rec in self.inventory.orphans() {
            let marked = self.inventory.modify(&rec.session.id, |r| {
                r.lifecycle().phase() == Phase::Orphaned { adopting: false }
                    && r.step(Lifecycle::begin_readopt).is_ok()
            });
            if matches!(marked, Some((true, _))) {
                why = rec.session.error.clone();
                ids.push(rec.session.id);
            }
        }
        if ids.is_empty() {
            return;
        }
        info!(sessions = ids.len(), "a pager version is available: adopting the ORPHANED sessions");
        let task = self.adoption_task();
        let core = self.clone();
        let why = if ids.len() == 1 { why } else { "the session was ORPHANED".to_string() };
        tokio::spawn(async move {
            let _counted = task;
            core.readopt(ids, why).await;
        });
    }

    /// Hands `ids` to an adopter; retries a failed handoff with a fresh reservation. What no
    /// version can take now is ORPHANED; what the adopters keep refusing is FAILED.
    #[instrument(skip_all)]
    async fn readopt(self: Arc<Self>, ids: Vec<String>, why: String) {
        let mut attempts: HashMap<String, u32> = HashMap::new();
        let mut queue = ids;
        while !queue.is_empty() {
            let guard = match self.versions.begin_handoff(self.config.readopt_wait).await {
                Ok(g) => g,
                Err(e) => {
                    for id in queue {
                        warn!(session = %id, error = %e, "session ORPHANED: no pager version can adopt it now; the next one available will");
                        self.orphan_session(
                            &id,
                            format!(
                                "{why}; no pager version can adopt the session now ({e}): it is \
                                 ORPHANED until one is available (deploy, respawn, restart)"
                            ),
                        );
                    }
                    return;
                }
            };
            let mut retry = Vec::new();
            let mut most_attempts = 0;
            for id in queue {
                match self.adopt_one(&id, &guard, &why).await {
                    Ok(Outcome::Adopted | Outcome::Gone) => {}
                    Err(e) => {
                        let n = attempts.entry(id.clone()).or_default();
                        *n += 1;
                        most_attempts = most_attempts.max(*n);
                        match next_step(&e, *n) {
                            NextStep::Retry => {
                                warn!(session = %id, to = %guard.version, attempt = *n, error = %e, "re-adoption failed; trying again");
                                retry.push(id);
                            }
                            NextStep::Orphan => {
                                warn!(session = %id, to = %guard.version, error = %e, "session ORPHANED: re-adoption kept failing; the next version available adopts it");
                                self.orphan_session(
                                    &id,
                                    format!(
                                        "{why}; re-adoption failed {n} times (last: {e}): it is \
                                         ORPHANED until a pager version adopts it"
                                    ),
                                );
                            }
                            NextStep::Fail => {
                                error!(session = %id, to = %guard.version, error = %e, "session FAILED: re-adoption failed");
                                self.fail_session(
                                    &id,
                                    format!("{why}; re-adoption failed: {e}"),
                                    true,
                                );
                            }
                        }
                    }
                }
            }
            drop(guard);
            if !retry.is_empty() {
                // An adopter that died is seen by the supervisor (and respawned) a moment later:
                // a retry at once would meet the same dead process.
                tokio::time::sleep(RETRY_PAUSE * 2u32.pow(most_attempts.saturating_sub(1))).await;
            }
            queue = retry;
        }
    }

    /// Sends one session to the reserved adopter and records the new owner.
    async fn adopt_one(
        &self,
        id: &str,
        guard: &HandoffGuard,
        why: &str,
    ) -> Result<Outcome, ReadoptError> {
        let (mut request, fds): (HandoffRequest, SessionFds) = {
            let held = self.held();
            let Some(h) = held.get(id) else { return Ok(Outcome::Gone) };
            let (Some(request), Some(fds)) = (h.request.clone(), h.fds.as_ref()) else {
                return Err(ReadoptError::NotHeld);
            };
            (request, dup_fds(fds).map_err(ReadoptError::Dup)?)
        };
        let Some(record) = self.inventory.record(id) else { return Ok(Outcome::Gone) };
        if !(is_held(record.state()) && record.handing_off()) {
            return Ok(Outcome::Gone);
        }
        request.adopt = true;
        request.removed = vec![]; // the removed-ranges log carries them
        request.faults = record.session.faults; // the figure goes on where the dead pager left it
        let socket = guard.process.paths.handoff_socket.clone();
        let timeout = self.config.handoff_timeout;
        let sent = tokio::task::spawn_blocking(move || {
            handoff::send_session(&socket, &request, &fds, timeout)
        })
        .await
        .map_err(|e| ReadoptError::Task(e.to_string()))?;
        sent.map_err(|source| ReadoptError::Handoff { version: guard.version.clone(), source })?;
        let (to, pid) = (guard.version.clone(), guard.process.pid);
        // Under `held`, and only if the adopter still runs (as for a first handoff): an adopter
        // that dies later finds the session as its own; one that died already is retried.
        let held = self.held();
        if guard.process.exit().is_some() {
            return Err(ReadoptError::AdopterDied(to));
        }
        self.inventory.modify(id, |r| {
            if let Err(e) = r.step(Lifecycle::readopted) {
                warn!(session = %id, error = %e, "re-adopted, though not being handed over");
            }
            r.serving_since = Some(tokio::time::Instant::now());
            r.session.pager_version = to.clone();
            r.session.error = format!("{why}; re-adopted by pager version {to} (pid {pid})");
        });
        drop(held);
        info!(session = %id, to = %to, pid, "session re-adopted");
        self.metrics.readoptions.inc(&[&to]);
        Ok(Outcome::Adopted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uffdpager::handoff::HandoffError;

    fn handoff(source: HandoffError) -> ReadoptError {
        ReadoptError::Handoff { version: "v2".into(), source }
    }

    #[test]
    fn an_adopter_that_died_or_did_not_listen_is_retried_then_the_session_orphaned() {
        let unlucky = [
            handoff(HandoffError::Connect {
                path: "h.sock".into(),
                source: nix::errno::Errno::ECONNREFUSED,
            }),
            handoff(HandoffError::Recv(nix::errno::Errno::ECONNRESET)),
            handoff(HandoffError::Closed),
            ReadoptError::AdopterDied("v2".into()),
        ];
        for e in &unlucky {
            for n in 1..ATTEMPTS {
                assert_eq!(next_step(e, n), NextStep::Retry, "{e} after {n}");
            }
            assert_eq!(next_step(e, ATTEMPTS), NextStep::Orphan, "{e}: never FAILED");
        }
    }

    #[test]
    fn a_session_the_adopters_refuse_fails_after_the_attempts_and_one_not_held_at_once() {
        let refused = handoff(HandoffError::Refused("memory file truncated".into()));
        assert_eq!(next_step(&refused, 1), NextStep::Retry);
        assert_eq!(next_step(&refused, ATTEMPTS), NextStep::Fail);
        assert_eq!(next_step(&ReadoptError::NotHeld, 1), NextStep::Fail);
    }
}
