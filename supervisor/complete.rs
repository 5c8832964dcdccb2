//! CompleteSession (graduation), routed to the pager version that owns the session.
//!
//! The incoming call's deadline (`grpc-timeout`) is passed on to the pager, less a small margin
//! so that the pager's own answer (DEADLINE_EXCEEDED with how far it got) reaches the client
//! before tonic's server-side timer cancels the call with a bare "Timeout expired". The call to
//! the pager runs in a task of its own: if the client goes away, the completion still finishes
//! and the record is still updated.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{info, warn};
use uffdpager::api::{
    CompleteSessionRequest, CompleteSessionResponse, GetSessionRequest, SessionState,
};

use crate::core::Core;
use crate::lifecycle::{Lifecycle, Phase};
use crate::monitor::merge_live;
use crate::pagers::PagerProcess;
use crate::session_record::{is_terminal, Record};
use crate::session_view::state_name;
use crate::status::ServiceError;

/// Most of the deadline kept back for the answer's way back.
const MAX_MARGIN: Duration = Duration::from_millis(250);
/// How long a failed call waits to learn whether its pager died.
const DIED_CHECK: Duration = Duration::from_millis(500);

/// The timeout to give the pager when `remaining` is left of the caller's deadline.
pub fn outgoing_timeout(remaining: Duration) -> Duration {
    remaining.saturating_sub((remaining / 10).min(MAX_MARGIN))
}

/// A pager's server cancels a call whose deadline passed with a bare CANCELLED "Timeout
/// expired" when its timer fires before the pager's own answer: say DEADLINE_EXCEEDED then.
fn deadline_status(status: tonic::Status, deadline: Option<Instant>) -> tonic::Status {
    // The pager was given the deadline less at most MAX_MARGIN.
    let passed = deadline.is_some_and(|d| Instant::now() + MAX_MARGIN >= d);
    if status.code() == tonic::Code::Cancelled && passed {
        tonic::Status::deadline_exceeded(format!(
            "the call's deadline passed before the completion finished ({}); the session keeps \
             serving and a later CompleteSession may succeed",
            status.message()
        ))
    } else {
        status
    }
}

/// What a CompleteSession on a session in this state does without asking a pager.
fn precheck(id: &str, r: &Record) -> Result<Option<CompleteSessionResponse>, ServiceError> {
    match r.lifecycle().phase() {
        Phase::Graduated => Ok(Some(CompleteSessionResponse {
            session: Some(r.session.clone()),
            already_graduated: true,
            message: format!("session {id} had already graduated; nothing was done"),
            ..Default::default()
        })),
        Phase::Served { readopting: false, .. } => Ok(None),
        // Its pager died: being re-adopted.
        Phase::Served { readopting: true, .. } => Err(ServiceError::Readopting { id: id.into() }),
        Phase::Orphaned { .. } => Err(ServiceError::Orphaned { id: id.into() }),
        // Its VMM has connected and the first handoff is in flight: SERVING in a moment.
        Phase::HandingOver => Err(ServiceError::HandingOff(id.into())),
        Phase::Pending | Phase::Ended | Phase::Failed => Err(ServiceError::WrongState {
            id: id.into(),
            state: state_name(r.state()),
            hint: "only a SERVING session can be completed",
        }),
    }
}

/// The error of a failed call to a pager: when the pager died during the call (the transport
/// broke), says so — the session is re-adopted and keeps serving.
async fn pager_failure(
    version: &str,
    process: &PagerProcess,
    status: tonic::Status,
    deadline: Option<Instant>,
) -> ServiceError {
    let transport = matches!(
        status.code(),
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::Internal
            | tonic::Code::Cancelled
    );
    if transport {
        if let Ok(exit) = tokio::time::timeout(DIED_CHECK, process.wait_exit()).await {
            return ServiceError::PagerDied {
                version: version.to_string(),
                pid: process.pid,
                exit: exit.status,
            };
        }
    }
    ServiceError::Pager { version: version.to_string(), status: deadline_status(status, deadline) }
}

impl Core {
    /// CompleteSession: forwards to the owning pager with the caller's remaining deadline.
    pub async fn complete_session(
        self: &Arc<Self>,
        id: String,
        deadline: Option<Instant>,
    ) -> Result<CompleteSessionResponse, ServiceError> {
        let record =
            self.inventory.record(&id).ok_or_else(|| ServiceError::SessionNotFound(id.clone()))?;
        if let Some(done) = precheck(&id, &record)? {
            return Ok(done);
        }
        let version = record.session.pager_version.clone();
        let process = self.versions.owner(&version)?;
        // COMPLETING from now on, so that watchers see it (unless it changed meanwhile).
        let started = self.inventory.modify(&id, |r| {
            if r.session.pager_version != version {
                return Err(Box::new(r.clone())); // re-adopted by another version meanwhile
            }
            r.step(Lifecycle::begin_completion).map_err(|_| Box::new(r.clone()))
        });
        match started {
            None => return Err(ServiceError::SessionNotFound(id)),
            Some((Err(changed), _)) => {
                return precheck(&id, &changed)?
                    .ok_or_else(|| ServiceError::Readopting { id: id.clone() });
            }
            Some((Ok(()), _)) => {}
        }
        let core = self.clone();
        tokio::spawn(async move { core.run_completion(id, version, process, deadline).await })
            .await
            .map_err(|e| ServiceError::Internal(format!("the completion task failed: {e}")))?
    }

    async fn run_completion(
        &self,
        id: String,
        version: String,
        process: Arc<PagerProcess>,
        deadline: Option<Instant>,
    ) -> Result<CompleteSessionResponse, ServiceError> {
        let started = Instant::now();
        info!(session = %id, version = %version, "completing the session");
        let mut req = tonic::Request::new(CompleteSessionRequest { session_id: id.clone() });
        let result = match deadline.map(|d| d.saturating_duration_since(started)) {
            Some(left) if left.is_zero() => Err(ServiceError::DeadlineExceeded),
            left => {
                if let Some(left) = left {
                    req.set_timeout(outgoing_timeout(left));
                }
                match process.client().complete_session(req).await {
                    Ok(r) => Ok(r.into_inner()),
                    Err(status) => Err(pager_failure(&version, &process, status, deadline).await),
                }
            }
        };
        match result {
            Ok(mut resp) => {
                // Which process served it: with several versions of one build, the answer
                // names the one that graduated the session.
                resp.message =
                    format!("pager version {version} (pid {}): {}", process.pid, resp.message);
                let live = resp.session.take();
                let merged = self.finish_completion(&id, live.as_ref(), None);
                let session = merged.or(live);
                info!(
                    session = %id,
                    version = %version,
                    populated_bytes = resp.populated_bytes,
                    elapsed = ?started.elapsed(),
                    "session completed"
                );
                resp.session = session;
                Ok(resp)
            }
            Err(err) => {
                // Ask the pager how the session stands now (it may have ended meanwhile).
                let mut get = tonic::Request::new(GetSessionRequest { session_id: id.clone() });
                get.set_timeout(self.config.pager_call_timeout);
                let live =
                    process.client().get_session(get).await.ok().map(tonic::Response::into_inner);
                self.finish_completion(&id, live.as_ref(), Some(err.to_string()));
                warn!(
                    session = %id,
                    version = %version,
                    code = ?err.code(),
                    error = %err,
                    "completion failed; the session keeps serving",
                );
                Err(err)
            }
        }
    }

    /// Ends one completion: merges the pager's view, sets SERVING again if the last completion
    /// failed, records the error, and releases the session if it finished.
    fn finish_completion(
        &self,
        id: &str,
        live: Option<&uffdpager::api::Session>,
        error: Option<String>,
    ) -> Option<uffdpager::api::Session> {
        let (finished, session) = self.inventory.modify(id, |r| {
            let was_terminal = is_terminal(r.state());
            if !was_terminal {
                if let Some(live) = live {
                    merge_live(r, live);
                }
            }
            // The last call in flight makes the session SERVING again (unless it finished).
            if let Err(e) = r.step(Lifecycle::end_completion) {
                warn!(session = %id, error = %e, "a completion ended that was not counted");
            }
            if !is_terminal(r.state()) {
                if let Some(e) = error {
                    r.session.error = e;
                }
            } else if r.state() == SessionState::Graduated {
                r.session.error.clear();
            }
            !was_terminal && is_terminal(r.state())
        })?;
        if finished {
            self.release(id, false);
        }
        Some(session)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pager_gets_the_deadline_less_a_small_margin() {
        assert_eq!(outgoing_timeout(Duration::from_secs(1)), Duration::from_millis(900));
        assert_eq!(outgoing_timeout(Duration::from_secs(600)), Duration::from_millis(599_750));
        assert_eq!(outgoing_timeout(Duration::ZERO), Duration::ZERO);
    }

    fn record(state: SessionState) -> Record {
        Record::new(uffdpager::api::Session {
            id: "a".into(),
            state: state as i32,
            ..Default::default()
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancel_at_the_deadline_reads_as_deadline_exceeded() {
        let expired = tonic::Status::cancelled("Timeout expired");
        let s = deadline_status(expired, Some(Instant::now()));
        assert_eq!(s.code(), tonic::Code::DeadlineExceeded);
        assert!(s.message().contains("keeps serving"), "{}", s.message());
        let early = tonic::Status::cancelled("client went away");
        let s = deadline_status(early, Some(Instant::now() + Duration::from_secs(60)));
        assert_eq!(s.code(), tonic::Code::Cancelled);
        let other = tonic::Status::internal("read error");
        assert_eq!(deadline_status(other, Some(Instant::now())).code(), tonic::Code::Internal);
    }

    #[test]
    fn a_graduated_session_answers_ok_saying_so() {
        let done = precheck("a", &record(SessionState::Graduated)).unwrap().unwrap();
        assert!(done.already_graduated);
    }

    #[test]
    fn pending_ended_and_failed_sessions_cannot_be_completed() {
        for st in [SessionState::Pending, SessionState::Ended, SessionState::Failed] {
            let err = precheck("a", &record(st)).unwrap_err();
            assert_eq!(err.code(), tonic::Code::FailedPrecondition);
            assert!(err.to_string().contains(state_name(st)), "{err}");
        }
        assert!(precheck("a", &record(SessionState::Serving)).unwrap().is_none());
        assert!(precheck("a", &record(SessionState::Completing)).unwrap().is_none());
    }

    #[test]
    fn a_session_being_handed_over_or_readopted_is_not_completed_but_retryable() {
        let mut r = record(SessionState::Pending);
        r.step(Lifecycle::hand_over).unwrap();
        let err = precheck("a", &r).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
        let mut r = record(SessionState::Serving);
        r.step(Lifecycle::begin_readopt).unwrap();
        let err = precheck("a", &r).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
        assert!(err.to_string().contains("another pager"), "{err}");
    }

    #[test]
    fn an_orphaned_session_is_not_completed_but_retryable() {
        let err = precheck("a", &record(SessionState::Orphaned)).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable);
        assert!(err.to_string().contains("ORPHANED"), "{err}");
    }
}
