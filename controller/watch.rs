//! One supervisor's WatchSessions stream, kept open for the controller's whole life.
//!
//! Each stream starts with the supervisor's snapshot (every session, then an end marker): that
//! is the re-list, and it replaces the inventory wholesale only once complete, so a session that
//! vanished while the stream was down disappears too. Then ADDED / UPDATED / REMOVED apply in
//! order. Any failure (supervisor gone, RESOURCE_EXHAUSTED for a watcher that lagged, a
//! malformed event) ends the stream; the watcher waits a backoff that doubles up to
//! [`MAX_BACKOFF`] (reset by each completed snapshot) and watches again. While it is not
//! WATCHING, the plan leaves the supervisor out.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch as signal;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tracing::{debug, info, warn};
use uffdpager::api::supervisor_client::SupervisorClient;
use uffdpager::api::{
    ListSessionsRequest, SessionEvent, SessionEventType, SessionState, WatchSessionsRequest,
};

use crate::inventory::{EventError, SnapshotBuilder};
use crate::state::{ConnState, Shared};

/// First wait after a stream failed.
pub const INITIAL_BACKOFF: Duration = Duration::from_millis(100);
/// Longest wait between two attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Why a stream ended.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("bad endpoint: {0}")]
    Endpoint(#[from] tonic::transport::Error),
    #[error("opening WatchSessions: {0}")]
    Open(tonic::Status),
    #[error("WatchSessions stream: {0}")]
    Stream(tonic::Status),
    #[error("the stream ended before the snapshot did")]
    EndedInSnapshot,
    #[error("the stream ended")]
    Ended,
    #[error("malformed event: {0}")]
    Event(#[from] EventError),
}

/// A lazily connecting channel to a supervisor: `unix:/path`, or `https://host:port` (with
/// `tls`: the controller's client certificate and the supervisors' CA) or `http://host:port`,
/// with HTTP/2 keepalives (so that a host that vanished without closing the connection is
/// noticed).
pub fn channel(
    endpoint: &str,
    tls: Option<&ClientTlsConfig>,
) -> Result<Channel, tonic::transport::Error> {
    if endpoint.starts_with("unix:") {
        return uffdpager::grpc::channel_for(endpoint);
    }
    let mut e = Endpoint::from_shared(endpoint.to_string())?;
    if let (Some(tls), true) = (tls, endpoint.starts_with("https://")) {
        e = e.tls_config(tls.clone())?;
    }
    Ok(e.connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true)
        .connect_lazy())
}

/// The wait after `failures` failed attempts in a row (1, 2, ...).
pub fn backoff(failures: u32) -> Duration {
    let factor = 1u32 << failures.saturating_sub(1).min(16);
    INITIAL_BACKOFF.saturating_mul(factor).min(MAX_BACKOFF)
}

/// Watches `endpoint` until `stop` turns true.
pub async fn watch(shared: Arc<Shared>, endpoint: String, mut stop: signal::Receiver<bool>) {
    let mut failures = 0u32;
    let mut attempts = 0u64;
    loop {
        set_conn(&shared, &endpoint, ConnState::Connecting, attempts > 0, None);
        attempts += 1;
        let ended = tokio::select! {
            r = stream_once(&shared, &endpoint, &mut failures) => r,
            _ = stop.wait_for(|s| *s) => return,
        };
        failures = failures.saturating_add(1);
        let delay = backoff(failures);
        let error = match ended {
            Ok(never) => match never {},
            Err(e) => e.to_string(),
        };
        warn!(supervisor = %endpoint, %error, retry_in = ?delay, "watch stream lost; watching again after a backoff");
        set_conn(&shared, &endpoint, ConnState::Backoff, false, Some(error));
        shared.wake.notify_one();
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

fn set_conn(
    shared: &Shared,
    endpoint: &str,
    conn: ConnState,
    reconnect: bool,
    error: Option<String>,
) {
    let now = shared.now();
    let mut st = shared.lock();
    if reconnect {
        st.counters.reconnects += 1;
    }
    if let Some(s) = st.supervisor_mut(endpoint) {
        s.conn = conn;
        if conn != ConnState::Watching {
            s.watching_since = None;
        } else {
            s.watching_since = Some(now);
        }
        if reconnect {
            s.reconnects += 1;
        }
        if let Some(e) = error {
            s.last_error = e;
        }
    }
}

/// One stream: the snapshot, then changes until it fails. Never returns `Ok`.
async fn stream_once(
    shared: &Shared,
    endpoint: &str,
    failures: &mut u32,
) -> Result<std::convert::Infallible, WatchError> {
    let mut client = SupervisorClient::new(channel(endpoint, shared.supervisor_tls.as_ref())?);
    let mut stream = client
        .watch_sessions(WatchSessionsRequest {})
        .await
        .map_err(WatchError::Open)?
        .into_inner();
    set_conn(shared, endpoint, ConnState::Syncing, false, None);
    let mut snapshot = SnapshotBuilder::default();
    let inventory = loop {
        let event = stream
            .message()
            .await
            .map_err(WatchError::Stream)?
            .ok_or(WatchError::EndedInSnapshot)?;
        count_event(shared, endpoint);
        if let Some(inv) = snapshot.push(&event)? {
            break inv;
        }
    };
    info!(
        supervisor = %endpoint,
        sessions = inventory.sessions.len(),
        serving = inventory.live_count(),
        active_version = %inventory.active_version,
        "watching: inventory listed"
    );
    {
        let mut st = shared.lock();
        if let Some(s) = st.supervisor_mut(endpoint) {
            s.inventory = inventory;
        }
    }
    set_conn(shared, endpoint, ConnState::Watching, false, None);
    *failures = 0;
    shared.wake.notify_one();
    // The host's available memory is not in the stream: with `min_available_memory` set, it is
    // asked for (ListSessions) at once and then every scan interval (at most 10 s apart).
    let polls_memory = shared.config.policy.min_available_memory > 0;
    let mut memory_tick =
        tokio::time::interval(shared.config.policy.scan_interval.min(MEMORY_POLL_MAX));
    memory_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let message = tokio::select! {
            m = stream.message() => m,
            _ = memory_tick.tick(), if polls_memory => {
                poll_memory(shared, endpoint, &mut client).await;
                continue;
            }
        };
        let event = message.map_err(WatchError::Stream)?.ok_or(WatchError::Ended)?;
        count_event(shared, endpoint);
        let changed = {
            let mut st = shared.lock();
            match st.supervisor_mut(endpoint) {
                Some(s) => s.inventory.apply(&event)?,
                None => false,
            }
        };
        log_event(endpoint, &event, changed);
        if changed {
            shared.wake.notify_one();
        }
    }
}

/// Longest wait between two reads of a supervisor's available memory.
const MEMORY_POLL_MAX: Duration = Duration::from_secs(10);

/// Reads the supervisor's host's available memory (ListSessions) into its inventory; wakes the
/// runner when that changes which side of `min_available_memory` it is on. A failed call leaves
/// it unknown (the plan then holds that supervisor's graduations).
async fn poll_memory(shared: &Shared, endpoint: &str, client: &mut SupervisorClient<Channel>) {
    let answer =
        tokio::time::timeout(Duration::from_secs(5), client.list_sessions(ListSessionsRequest {}))
            .await;
    let available = match answer {
        Ok(Ok(r)) => r.into_inner().host_available_memory_bytes,
        Ok(Err(e)) => {
            debug!(supervisor = %endpoint, error = %e, "ListSessions for the host's memory failed");
            None
        }
        Err(_) => {
            debug!(supervisor = %endpoint, "ListSessions for the host's memory timed out");
            None
        }
    };
    let min = shared.config.policy.min_available_memory;
    let crossed = {
        let mut st = shared.lock();
        let Some(s) = st.supervisor_mut(endpoint) else { return };
        let before = s.inventory.available_memory;
        s.inventory.available_memory = available;
        before.map(|b| b >= min) != available.map(|a| a >= min)
    };
    if crossed {
        info!(supervisor = %endpoint, available_memory = ?available, min_available_memory = min, "host memory crossed min_available_memory");
        shared.wake.notify_one();
    }
}

fn count_event(shared: &Shared, endpoint: &str) {
    let mut st = shared.lock();
    st.counters.watch_events += 1;
    if let Some(s) = st.supervisor_mut(endpoint) {
        s.events += 1;
    }
}

/// One line per event: info when the plan cares, debug for progress.
fn log_event(endpoint: &str, event: &SessionEvent, changed: bool) {
    let kind = SessionEventType::try_from(event.r#type).unwrap_or(SessionEventType::Unspecified);
    let Some(s) = &event.session else { return };
    let state = SessionState::try_from(s.state).unwrap_or(SessionState::Unspecified);
    if changed {
        info!(supervisor = %endpoint, session = %s.id, version = %s.pager_version, event = ?kind, state = ?state, active_version = %event.active_version, "session event");
    } else {
        debug!(supervisor = %endpoint, session = %s.id, version = %s.pager_version, event = ?kind, resident_bytes = s.resident_bytes, "session progress");
    }
}

#[cfg(test)]
#[path = "watch_tests.rs"]
mod tests;
