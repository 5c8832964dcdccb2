//! The loop: recompute the plan on every scan tick and whenever a watcher reports a change, start
//! CompleteSession for the head of the plan while fewer than `max_concurrent` are in flight,
//! each under `completion_timeout` as its gRPC deadline, and record every outcome. A failed or
//! timed-out session keeps serving (the supervisor's contract) and the plan holds it back for
//! `failure_backoff`.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::{Id, JoinError, JoinSet};
use tonic::{Code, Status};
use tracing::{error, info, warn};
use uffdpager::api::supervisor_client::SupervisorClient;
use uffdpager::api::{CompleteSessionRequest, CompleteSessionResponse, SessionState};

use crate::inventory::{SessionKey, TrackedSession};
use crate::plan::Planned;
use crate::state::{InFlight, Outcome, OutcomeKind, Shared};
use crate::watch::channel;

/// How long past its gRPC deadline a call may run before the controller gives up on it itself
/// (the deadline is the server's to enforce; this covers a server that does not answer).
const DEADLINE_GRACE: Duration = Duration::from_secs(2);
/// How long shutdown waits for the completions in flight before abandoning them (the
/// supervisor finishes or cancels each one on its own; the session keeps serving either way).
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Calls CompleteSession; a trait so that the loop can be tested without a supervisor.
pub trait Completer: Send + Sync + 'static {
    fn complete(
        &self,
        supervisor: &str,
        session: &str,
        deadline: Duration,
    ) -> impl Future<Output = Result<CompleteSessionResponse, Status>> + Send;
}

/// CompleteSession over gRPC, on a fresh channel per call (calls are few, and a fresh channel
/// never carries a broken connection over from before a supervisor restart).
#[derive(Debug, Default)]
pub struct GrpcCompleter {
    /// TLS for `https://` supervisors.
    pub tls: Option<tonic::transport::ClientTlsConfig>,
}

impl Completer for GrpcCompleter {
    fn complete(
        &self,
        supervisor: &str,
        session: &str,
        deadline: Duration,
    ) -> impl Future<Output = Result<CompleteSessionResponse, Status>> + Send {
        let channel = channel(supervisor, self.tls.as_ref());
        let session_id = session.to_string();
        async move {
            let channel = channel.map_err(|e| Status::unavailable(format!("channel: {e}")))?;
            let mut request = tonic::Request::new(CompleteSessionRequest { session_id });
            request.set_timeout(deadline);
            SupervisorClient::new(channel).complete_session(request).await.map(|r| r.into_inner())
        }
    }
}

/// What a finished call task hands back.
#[derive(Debug)]
struct Finished {
    key: SessionKey,
    result: Result<CompleteSessionResponse, Status>,
}

/// The outcome class of a call's result. A CANCELLED that arrives once the deadline has passed
/// is tonic's server-side timer ("Timeout expired"): a timeout too.
pub fn classify(
    result: &Result<CompleteSessionResponse, Status>,
    elapsed: Duration,
    deadline: Duration,
) -> OutcomeKind {
    match result {
        Ok(r) if r.already_graduated => OutcomeKind::AlreadyGraduated,
        Ok(_) => OutcomeKind::Graduated,
        Err(s) => match s.code() {
            Code::DeadlineExceeded => OutcomeKind::TimedOut,
            Code::Cancelled if elapsed >= deadline => OutcomeKind::TimedOut,
            Code::FailedPrecondition | Code::NotFound => OutcomeKind::NotGraduatable,
            _ => OutcomeKind::Failed,
        },
    }
}

/// The scan loop and its completions.
#[derive(Debug)]
pub struct Runner<C> {
    shared: Arc<Shared>,
    completer: Arc<C>,
    tasks: JoinSet<Finished>,
    task_keys: HashMap<Id, SessionKey>,
}

impl<C: Completer> Runner<C> {
    pub fn new(shared: Arc<Shared>, completer: C) -> Self {
        Self {
            shared,
            completer: Arc::new(completer),
            tasks: JoinSet::new(),
            task_keys: HashMap::new(),
        }
    }

    /// Runs until `shutdown` completes, then waits (a while) for the completions in flight.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        if !self.shared.config.enabled {
            info!("controller disabled: watches nothing, graduates nothing");
            shutdown.await;
            return;
        }
        let mut ticker = tokio::time::interval(self.shared.config.policy.scan_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                _ = ticker.tick() => {}
                () = self.shared.wake.notified() => {}
                Some(joined) = self.tasks.join_next_with_id(), if !self.tasks.is_empty() => {
                    self.finish(joined);
                }
            }
            self.scan();
        }
        self.drain().await;
    }

    /// One scan: compute the plan and start what the free slots allow.
    pub fn scan(&mut self) {
        let config = &self.shared.config;
        let now = self.shared.now();
        let mut st = self.shared.lock();
        st.counters.scans += 1;
        st.last_scan_at = Some(now);
        st.expire(now, config.policy.failure_backoff);
        let plan = st.plan(config, now);
        let max = usize::try_from(config.policy.max_concurrent).unwrap_or(usize::MAX);
        let slots = max.saturating_sub(st.in_flight.len());
        for p in plan.graduate.into_iter().take(slots) {
            let Planned { key, pager_version, reason, .. } = p;
            if config.dry_run {
                info!(supervisor = %key.supervisor, session = %key.session, version = %pager_version, %reason, "dry run: would graduate");
                let seq = st.next_seq();
                let outcome = Outcome {
                    seq,
                    key: key.clone(),
                    pager_version,
                    result: OutcomeKind::DryRun,
                    reason,
                    error: String::new(),
                    started_at: now,
                    finished_at: now,
                    duration: Duration::ZERO,
                    in_flight_at_start: 0,
                    populated_bytes: 0,
                };
                st.record(outcome);
                st.dry_run_done.insert(key);
                continue;
            }
            info!(supervisor = %key.supervisor, session = %key.session, version = %pager_version, %reason, "graduating");
            let in_flight = u32::try_from(st.in_flight.len() + 1).unwrap_or(u32::MAX);
            let flight = InFlight {
                pager_version,
                reason,
                started_at: now,
                started: tokio::time::Instant::now(),
                in_flight_at_start: in_flight,
            };
            st.in_flight.insert(key.clone(), flight);
            st.counters.started += 1;
            st.counters.peak_in_flight = st.counters.peak_in_flight.max(in_flight);
            let completer = self.completer.clone();
            let deadline = config.policy.completion_timeout;
            let task_key = key.clone();
            let handle = self.tasks.spawn(async move {
                let call = completer.complete(&key.supervisor, &key.session, deadline);
                let result = match tokio::time::timeout(deadline + DEADLINE_GRACE, call).await {
                    Ok(r) => r,
                    Err(_) => Err(Status::deadline_exceeded(format!(
                        "no answer within completion_timeout {deadline:?} (+{DEADLINE_GRACE:?})"
                    ))),
                };
                Finished { key, result }
            });
            self.task_keys.insert(handle.id(), task_key);
        }
    }

    /// Records a finished call.
    fn finish(&mut self, joined: Result<(Id, Finished), JoinError>) {
        let (key, result) = match joined {
            Ok((id, f)) => {
                self.task_keys.remove(&id);
                (f.key, f.result)
            }
            Err(e) => {
                let Some(key) = self.task_keys.remove(&e.id()) else {
                    error!(error = %e, "a completion task failed and its session is unknown");
                    return;
                };
                (key, Err(Status::internal(format!("the completion task failed: {e}"))))
            }
        };
        let now = self.shared.now();
        let deadline = self.shared.config.policy.completion_timeout;
        let mut st = self.shared.lock();
        let Some(flight) = st.in_flight.remove(&key) else {
            error!(supervisor = %key.supervisor, session = %key.session, "a completion finished that was not in flight");
            return;
        };
        let duration = flight.started.elapsed();
        let kind = classify(&result, duration, deadline);
        let (error, populated_bytes) = match &result {
            Ok(r) => (String::new(), r.populated_bytes),
            Err(s) => (format!("{:?}: {}", s.code(), s.message()), 0),
        };
        if let (Ok(resp), Some(sup)) = (&result, st.supervisor_mut(&key.supervisor)) {
            // Graduated: say so in the inventory at once, so that the next scan (which follows
            // right away) does not pick the session again before the supervisor's event arrives.
            let answered = resp.session.as_ref().filter(|s| s.id == key.session);
            let known = sup.inventory.sessions.get(&key.session).cloned();
            if let Some(mut s) = answered.map(TrackedSession::from_proto).or(known) {
                s.state = SessionState::Graduated;
                sup.inventory.sessions.insert(key.session.clone(), s);
            }
        }
        let (sup, session, version) = (&key.supervisor, &key.session, &flight.pager_version);
        if kind.is_failure() {
            st.failed_at.insert(key.clone(), now);
            let backoff = self.shared.config.policy.failure_backoff;
            warn!(supervisor = %sup, session = %session, version = %version, result = ?kind, %error, ?duration, retry_after = ?backoff, "graduation failed; the session keeps serving");
        } else {
            st.failed_at.remove(&key);
            info!(supervisor = %sup, session = %session, version = %version, result = ?kind, populated_bytes, ?duration, "session graduated");
        }
        let seq = st.next_seq();
        let outcome = Outcome {
            seq,
            key: key.clone(),
            pager_version: flight.pager_version.clone(),
            result: kind,
            reason: flight.reason.clone(),
            error,
            started_at: flight.started_at,
            finished_at: now,
            duration,
            in_flight_at_start: flight.in_flight_at_start,
            populated_bytes,
        };
        st.record(outcome);
    }

    /// Waits for the completions in flight, for at most [`SHUTDOWN_GRACE`].
    async fn drain(&mut self) {
        if self.tasks.is_empty() {
            return;
        }
        info!(in_flight = self.tasks.len(), "waiting for the graduations in flight");
        let waited = tokio::time::timeout(SHUTDOWN_GRACE, async {
            while let Some(joined) = self.tasks.join_next_with_id().await {
                self.finish(joined);
            }
        })
        .await;
        if waited.is_err() {
            warn!(in_flight = self.tasks.len(), grace = ?SHUTDOWN_GRACE, "abandoning the graduations still in flight; their sessions keep serving unless the supervisor finishes them");
            self.tasks.abort_all();
        }
    }
}

#[cfg(test)]
#[path = "runner_tests.rs"]
// Test values are small and known: plain `as` casts.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_possible_wrap)]
mod tests;
