//! A pager that dies never freezes a VM: its live sessions are handed to another pager.
//!
//! The supervisor keeps, for every session it handed over, duplicates of the uffd, the memory
//! file, the VMM stream and the removed-ranges log (a memfd where each pager records the ranges
//! the VMM discarded), and the handoff request itself. When a pager process exits unexpectedly:
//!
//! 1. under the `held` lock (the one a first handoff records its outcome under), every SERVING or
//!    COMPLETING session of that version is marked as being handed over (`handing_off`): the
//!    monitor does not fail it for missing from a listing, CompleteSession answers UNAVAILABLE;
//! 2. a task reserves an adopter ([`Versions::begin_adoption`]): the active version, waiting
//!    while it is respawned if it was the one that died; else the running version started last;
//! 3. each session is sent again (`adopt: true`, duplicates of the kept descriptors): the adopting
//!    pager reads the removed ranges from the log (they stay zero), wakes every registered range
//!    once (faults read but never served by the dead pager are raised again), and treats EEXIST
//!    as "already present";
//! 4. the record moves to the adopter (`pager_version`, so `outdated` follows), with UPDATED.
//!
//! A session that no version can adopt is FAILED, its descriptors still held. A session the
//! supervisor holds no descriptors for (found serving after a supervisor restart) is FAILED at
//! once: nothing can serve its VM any more.
//!
//! [`Versions::begin_adoption`]: crate::versions::Versions::begin_adoption

use std::collections::HashMap;
use std::sync::Arc;

use tracing::{error, info, instrument, warn};
use uffdpager::handoff::{self, HandoffRequest, SessionFds};

use crate::core::Core;
use crate::inventory::is_live;
use crate::pagers::Exit;
use crate::versions::HandoffGuard;

/// Handoffs tried per session before it is FAILED.
const ATTEMPTS: u32 = 3;

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

/// What became of one session.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Adopted,
    /// It finished meanwhile (or was forgotten): nothing to hand over.
    Gone,
}

/// Fresh duplicates of the kept descriptors, to send (the kept ones stay with the supervisor).
fn dup_fds(fds: &SessionFds) -> std::io::Result<SessionFds> {
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
                    let mine =
                        is_live(r.state()) && r.session.pager_version == version && !r.handing_off;
                    if mine {
                        r.handing_off = true;
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
                    "{why}; this supervisor holds no duplicate descriptors for the session (it \
                     found it serving after a restart), so no pager can adopt it: its VM cannot \
                     be served"
                ),
                true,
            );
        }
        if !orphans.is_empty() {
            warn!(version = %version, pid, sessions = orphans.len(), "re-adopting the sessions of a pager that died");
            tokio::spawn(self.clone().readopt(orphans, version.to_string(), why));
        }
    }

    /// Hands `ids` (orphaned by the death of a process of `from`) to an adopter; retries a
    /// failed handoff with a fresh reservation, and FAILs what cannot be adopted.
    #[instrument(skip_all, fields(version = %from))]
    async fn readopt(self: Arc<Self>, ids: Vec<String>, from: String, why: String) {
        let mut attempts: HashMap<String, u32> = HashMap::new();
        let mut queue = ids;
        while !queue.is_empty() {
            let guard = match self.versions.begin_adoption(self.config.readopt_wait).await {
                Ok(g) => g,
                Err(e) => {
                    for id in queue {
                        error!(session = %id, error = %e, "session FAILED: no pager version can adopt it");
                        self.fail_session(
                            &id,
                            format!("{why}; no pager version could adopt the session: {e}"),
                            true,
                        );
                    }
                    return;
                }
            };
            let mut retry = Vec::new();
            for id in queue {
                match self.adopt_one(&id, &guard, &why).await {
                    Ok(Outcome::Adopted | Outcome::Gone) => {}
                    Err(e) => {
                        let n = attempts.entry(id.clone()).or_default();
                        *n += 1;
                        if *n < ATTEMPTS && !matches!(e, ReadoptError::NotHeld) {
                            warn!(session = %id, to = %guard.version, error = %e, "re-adoption failed; trying again");
                            retry.push(id);
                        } else {
                            error!(session = %id, to = %guard.version, error = %e, "session FAILED: re-adoption failed");
                            self.fail_session(&id, format!("{why}; re-adoption failed: {e}"), true);
                        }
                    }
                }
            }
            drop(guard);
            queue = retry;
        }
    }

    /// Sends one orphaned session to the reserved adopter and records the new owner.
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
        if !self.inventory.record(id).is_some_and(|r| is_live(r.state()) && r.handing_off) {
            return Ok(Outcome::Gone);
        }
        request.adopt = true;
        request.removed = vec![]; // the removed-ranges log carries them
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
            r.handing_off = false;
            r.serving_since = Some(tokio::time::Instant::now());
            r.session.pager_version = to.clone();
            if r.completions == 0 {
                r.session.state = uffdpager::api::SessionState::Serving as i32;
            }
            r.session.error = format!("{why}; re-adopted by pager version {to} (pid {pid})");
        });
        drop(held);
        info!(session = %id, to = %to, pid, "session re-adopted");
        self.metrics.readoptions.inc(&[&to]);
        Ok(Outcome::Adopted)
    }
}
