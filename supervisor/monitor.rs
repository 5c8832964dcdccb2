//! The monitor: every `poll_interval` (~250 ms) it asks each running pager for its sessions and
//! merges their figures and states into the records; records the end of sessions that finished
//! inside a pager (VMM gone, graduated, failed), releases what the supervisor held for them and
//! the pager's tombstone; sends held-back counter updates; forgets finished sessions after the
//! retention; and stops DRAINING versions that serve nothing.

use std::collections::HashSet;
use std::os::fd::AsFd;
use std::sync::Arc;

use tokio::time::{Instant, MissedTickBehavior};
use tracing::{debug, info, warn};
use uffdpager::api::{ListSessionsRequest, Session};

use crate::core::Core;
use crate::lifecycle::{Finish, Phase};
use crate::pagers::PagerProcess;
use crate::session_record::{is_live, is_terminal, state_of, Record};
use crate::session_view::state_name;

/// Merges a pager's view of a session into its record (pure). Counters, error and graduation
/// time come from the pager; so does a terminal state. A COMPLETING record with a completion in
/// flight is not set back to SERVING by a listing taken before the completion began.
pub fn merge_live(r: &mut Record, live: &Session) {
    let s = &mut r.session;
    s.resident_bytes = live.resident_bytes;
    s.removed_bytes = live.removed_bytes;
    s.zero_bytes = live.zero_bytes;
    s.faults = live.faults;
    s.overlay_faults = live.overlay_faults;
    s.fault_worker = live.fault_worker;
    crate::working_set::merge_live(s, live);
    if !live.error.is_empty() {
        s.error = live.error.clone();
    }
    if live.graduated_at.is_some() {
        s.graduated_at = live.graduated_at;
    }
    if s.total_bytes == 0 {
        s.total_bytes = live.total_bytes;
    }
    // A served session takes its pager's word on how it stands (a terminal state, or whether a
    // completion runs); any other has no pager to speak for it.
    let _ = r.step(|l| l.pager_reports(state_of(live)));
}

/// What a finished record still takes from its pager's tombstone: the outcome of a working-set
/// recording, saved on a thread of its own after the session ended (a graduation answers its
/// caller before the save is done). Nothing else of a finished record changes (pure).
pub fn merge_tombstone(r: &mut Record, live: &Session) {
    crate::working_set::merge_live(&mut r.session, live);
}

/// How a pager's view of a session was taken in.
#[derive(Debug, PartialEq, Eq)]
enum Merged {
    /// The record belongs to another version (or to none yet).
    NotOwner,
    /// Merged; the session goes on.
    Live,
    /// Merged; the session just finished; `completions` still wait on it.
    Finished { completions: u32 },
    /// The record had finished already; `completions` still wait on it.
    AlreadyFinished { completions: u32 },
}

impl Core {
    /// Merges a pager's view of one of its sessions into the record; a session that finished is
    /// released. Returns the merged session, or None if no record is owned by `version`.
    pub fn apply_live(&self, version: &str, live: &Session) -> Option<Session> {
        self.apply(version, live).map(|(_, s)| s)
    }

    fn apply(&self, version: &str, live: &Session) -> Option<(Merged, Session)> {
        let (merged, session) = self.inventory.modify(&live.id, |r| {
            if r.session.pager_version != version {
                return Merged::NotOwner;
            }
            if is_terminal(r.state()) {
                merge_tombstone(r, live);
                return Merged::AlreadyFinished { completions: r.completions() };
            }
            merge_live(r, live);
            if is_terminal(r.state()) {
                Merged::Finished { completions: r.completions() }
            } else {
                Merged::Live
            }
        })?;
        match merged {
            Merged::NotOwner => return None,
            Merged::Finished { .. } => {
                let state = state_of(&session);
                info!(
                    session = %session.id,
                    version = %version,
                    state = state_name(state),
                    error = %session.error,
                    "session finished in its pager",
                );
                self.release(&session.id, false);
            }
            Merged::Live | Merged::AlreadyFinished { .. } => {}
        }
        Some((merged, session))
    }

    /// One pass over one pager's sessions.
    async fn poll_version(
        &self,
        version: &str,
        process: &PagerProcess,
        warned: &mut HashSet<String>,
    ) {
        let asked_at = Instant::now();
        let mut req = tonic::Request::new(ListSessionsRequest {});
        req.set_timeout(self.config.pager_call_timeout);
        let listed = match process.client().list_sessions(req).await {
            Ok(r) => r.into_inner().sessions,
            Err(s) => {
                debug!(
                    version = %version,
                    error = %s.message(),
                    "ListSessions failed; will ask again",
                );
                return;
            }
        };
        let mut seen = HashSet::with_capacity(listed.len());
        for live in &listed {
            seen.insert(live.id.clone());
            // A tombstone is forgotten once its recording's outcome is known, not before.
            let tombstone =
                is_terminal(state_of(live)) && crate::working_set::recording_settled(live);
            match self.apply(version, live) {
                Some((Merged::Live, _)) => {}
                // The pager's tombstone is released once no completion waits on it.
                Some((
                    Merged::Finished { completions: 0 }
                    | Merged::AlreadyFinished { completions: 0 },
                    _,
                )) => {
                    if tombstone {
                        self.end_session(version, &live.id).await;
                    }
                }
                Some((Merged::Finished { .. } | Merged::AlreadyFinished { .. }, _)) => {}
                Some((Merged::NotOwner, _)) | None if tombstone => {
                    self.end_session(version, &live.id).await;
                }
                Some((Merged::NotOwner, _)) | None => {
                    let handing_off =
                        self.inventory.record(&live.id).is_some_and(|r| r.handing_off());
                    if !handing_off && warned.insert(format!("{version}/{}", live.id)) {
                        warn!(
                            session = %live.id,
                            version = %version,
                            "the pager serves a session the supervisor does not own; left alone",
                        );
                    }
                }
            }
        }
        // A live session its pager no longer lists (and had listed since it was handed over);
        // not one being handed over again (its pager died and a fresh one adopts it).
        for rec in self.inventory.records_of_version(version) {
            let id = &rec.session.id;
            let stale = rec.serving_since.is_some_and(|t| t < asked_at);
            let settled = rec.completions() == 0 && !rec.handing_off();
            if is_live(rec.state()) && settled && stale && !seen.contains(id) {
                warn!(
                    session = %id,
                    version = %version,
                    "the pager no longer lists the session; it FAILED",
                );
                self.fail_session(
                    id,
                    format!("pager version {version} no longer knows the session"),
                    true,
                );
            }
        }
    }

    /// ORPHANED sessions whose VMM has exited meanwhile are ENDED (nothing to adopt any more).
    fn end_orphans_whose_vmm_exited(&self) {
        for rec in self.inventory.orphans() {
            let id = &rec.session.id;
            let gone = {
                let held = self.held();
                held.get(id).is_some_and(|h| match (&h.fds, &h.request) {
                    (Some(fds), Some(req)) => {
                        crate::vmm_fds::vmm_gone(fds.vmm_stream.as_fd(), req.vmm_fd)
                    }
                    _ => false,
                })
            };
            if !gone {
                continue;
            }
            let ended = self.inventory.modify(id, |r| {
                let orphan = r.lifecycle().phase() == Phase::Orphaned { adopting: false };
                if orphan && r.step(|l| l.finish(Finish::Ended)).is_ok() {
                    r.session.error =
                        format!("{}; its VMM exited before a pager adopted it", r.session.error);
                }
                orphan
            });
            if matches!(ended, Some((true, _))) {
                info!(session = %id, "ORPHANED session ENDED: its VMM exited");
                self.release(id, false);
            }
        }
    }

    /// One monitor pass.
    pub async fn monitor_once(self: &Arc<Self>, warned: &mut HashSet<String>) {
        for (version, process) in self.versions.running() {
            self.poll_version(&version, &process, warned).await;
        }
        self.end_orphans_whose_vmm_exited();
        self.adopt_orphans();
        self.inventory.flush_counters();
        for s in self.inventory.prune_finished(self.config.finished_retention) {
            self.forget_held(&s.id);
            info!(
                session = %s.id,
                state = state_name(state_of(&s)),
                "finished session forgotten after the retention",
            );
        }
        self.stop_drained_versions();
    }
}

/// Runs the monitor until shutdown begins.
pub async fn run(core: Arc<Core>) {
    let mut tick = tokio::time::interval(core.config.poll_interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut warned = HashSet::new();
    let mut unhealthy = crate::pager_health::UnhealthyTracker::default();
    loop {
        tokio::select! {
            _ = core.wait_closing() => return,
            _ = tick.tick() => {
                core.monitor_once(&mut warned).await;
                core.check_pager_health(&mut unhealthy).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::Lifecycle;
    use uffdpager::api::SessionState;

    /// A record in `state` with `completions` CompleteSession calls in flight.
    fn record(state: SessionState, completions: u32) -> Record {
        let mut r = Record::new(Session {
            id: "a".into(),
            state: state as i32,
            pager_version: "v1".into(),
            total_bytes: 8192,
            ..Default::default()
        });
        for _ in 0..completions {
            r.step(Lifecycle::begin_completion).unwrap();
        }
        r
    }

    fn live(state: SessionState) -> Session {
        Session {
            id: "a".into(),
            state: state as i32,
            resident_bytes: 4096,
            faults: 1,
            ..Default::default()
        }
    }

    #[test]
    fn figures_come_from_the_pager() {
        let mut r = record(SessionState::Serving, 0);
        merge_live(&mut r, &live(SessionState::Serving));
        assert_eq!((r.session.resident_bytes, r.session.faults), (4096, 1));
        assert_eq!(r.session.total_bytes, 8192);
    }

    #[test]
    fn a_completion_in_flight_is_not_undone_by_an_older_listing() {
        let mut r = record(SessionState::Completing, 1);
        merge_live(&mut r, &live(SessionState::Serving));
        assert_eq!(r.state(), SessionState::Completing);
        let mut r = record(SessionState::Completing, 0);
        merge_live(&mut r, &live(SessionState::Serving));
        assert_eq!(r.state(), SessionState::Serving);
    }

    #[test]
    fn a_terminal_state_from_the_pager_always_wins() {
        for st in [SessionState::Ended, SessionState::Graduated, SessionState::Failed] {
            let mut r = record(SessionState::Completing, 2);
            let mut l = live(st);
            l.error = if st == SessionState::Failed { "I/O error".into() } else { String::new() };
            merge_live(&mut r, &l);
            assert_eq!(r.state(), st);
        }
    }

    #[test]
    fn a_recording_saved_after_graduation_reaches_the_finished_record() {
        use uffdpager::api::WorkingSetState;
        let mut r = record(SessionState::Graduated, 0);
        r.session.record_state = WorkingSetState::Running as i32;
        let mut l = live(SessionState::Graduated);
        l.record_state = WorkingSetState::Done as i32;
        l.record_reason = "saved to /ws (graduation began)".into();
        merge_tombstone(&mut r, &l);
        assert_eq!(r.session.record_state(), WorkingSetState::Done);
        assert_eq!(r.session.record_reason, "saved to /ws (graduation began)");
        assert_eq!(r.state(), SessionState::Graduated);
        assert_eq!(r.session.resident_bytes, 0, "only the recording's outcome is taken");
    }

    #[test]
    fn an_empty_error_from_the_pager_keeps_the_supervisors() {
        let mut r = record(SessionState::Serving, 0);
        r.session.error = "completion deadline exceeded".into();
        merge_live(&mut r, &live(SessionState::Serving));
        assert_eq!(r.session.error, "completion deadline exceeded");
    }
}
