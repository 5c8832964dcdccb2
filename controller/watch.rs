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
use uffdpager::api::{SessionEvent, SessionEventType, SessionState, WatchSessionsRequest};

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
    loop {
        let event = stream.message().await.map_err(WatchError::Stream)?.ok_or(WatchError::Ended)?;
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
