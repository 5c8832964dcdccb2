//! Shutdown: wait for SIGTERM or SIGINT, then stop in order: refuse new work, end the watch
//! streams, drain the gRPC servers under a deadline, close the session sockets, let the
//! re-adoptions under way finish (a pager that died just before, or during, the shutdown has its
//! sessions handed over, its respawn included), stop starting pagers, and stop the pagers that
//! serve nothing. Pagers that still serve sessions are LEFT RUNNING: stopping them would freeze
//! their VMs on the next page fault. Sessions a re-adoption could not finish in time stay
//! recorded in the runtime directory, where the next supervisor takes them back from their VMM
//! (`recover.rs`).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::task::JoinSet;
use tracing::{info, warn};

use uffdpager::api::ListSessionsRequest;

use crate::core::Core;
use crate::pagers::PagerProcess;
use crate::session_record::{is_live, state_of};

/// How long the gRPC servers get to finish the calls in flight.
pub const DRAIN_GRACE: Duration = Duration::from_secs(10);
/// How long re-adoptions under way get to finish (a respawn's backoff and start included).
pub const ADOPTION_GRACE: Duration = Duration::from_secs(20);
/// How long a pager that does not answer at shutdown gets to finish dying.
const DYING_GRACE: Duration = Duration::from_secs(3);

/// SIGTERM and SIGINT, caught from startup on (so that a signal during startup is a clean
/// shutdown too, not the default death).
#[derive(Debug)]
pub struct Signals {
    term: Signal,
    int: Signal,
}

impl Signals {
    pub fn install() -> std::io::Result<Self> {
        Ok(Self { term: signal(SignalKind::terminate())?, int: signal(SignalKind::interrupt())? })
    }

    /// Waits for the next one; returns its name.
    pub async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// Drains the servers: `servers` completes once every server has finished its calls.
pub async fn drain(servers: impl Future<Output = ()>, grace: Duration) {
    match tokio::time::timeout(grace, servers).await {
        Ok(()) => info!("gRPC servers drained"),
        Err(_) => {
            warn!(grace = ?grace, "gRPC calls still running after the grace period; exiting anyway")
        }
    }
}

/// Waits for pagers that are dying as the shutdown begins: one that does not answer is given
/// [`DYING_GRACE`] to exit (a SIGKILL takes a moment to end a process), so that its death is
/// handled — its sessions re-adopted — before the supervisor exits. One that neither answers
/// nor exits is hung, and left to the next supervisor.
pub async fn settle_dying_pagers(core: &Arc<Core>) {
    let mut waits = JoinSet::new();
    for (version, process) in core.versions.running() {
        let core = core.clone();
        waits.spawn(async move {
            if let Err(reason) = live_in_pager(&core, &process).await {
                let exited =
                    tokio::time::timeout(DYING_GRACE, process.wait_exit()).await.is_ok();
                info!(version = %version, pid = process.pid, reason, exited, "a pager did not answer as the shutdown began");
            }
        });
    }
    while waits.join_next().await.is_some() {}
}

/// Stops the pagers that serve no live session, in parallel; leaves the others running.
///
/// Each pager is asked for its sessions first: only SERVING and COMPLETING sessions keep a pager
/// running, and the pager's own view is the fresh one (the supervisor's may lag by a monitor
/// pass: a session that just ended, or a pager that just died). A pager that does not answer is
/// left running (it may still serve VMs), as is one with a handoff under way. The pager's
/// Shutdown refuses too while it serves anything: a second guard against a race.
pub async fn stop_idle_pagers(core: &Arc<Core>) {
    let mut stops = JoinSet::new();
    for (version, process) in core.versions.running() {
        let live = match live_in_pager(core, &process).await {
            Ok(live) => live,
            Err(reason) => {
                warn!(version = %version, pid = process.pid, reason, "leaving the pager running: it did not say what it serves");
                continue;
            }
        };
        if live > 0 {
            warn!(
                version = %version,
                pid = process.pid,
                sessions = live,
                "leaving the pager running: it serves sessions whose VMs would freeze without it"
            );
            continue;
        }
        // Only with no handoff under way (a session being handed over is not yet in its count).
        let claimed = core.versions.update(|t| match t.entries.get_mut(&version) {
            Some(e) if e.inflight_handoffs == 0 => e.lifecycle.begin_stop().is_ok(),
            _ => false,
        });
        if !claimed {
            warn!(version = %version, pid = process.pid, "leaving the pager running: a session is being handed to it");
            continue;
        }
        let (grace, core) = (core.config.stop_grace, core.clone());
        stops.spawn(async move {
            match process.stop(grace).await {
                Ok(exit) => info!(
                    version = %version,
                    pid = process.pid,
                    status = %exit.status,
                    "pager stopped",
                ),
                Err(reason) => {
                    core.versions.update(|t| {
                        if let Some(e) = t.entries.get_mut(&version) {
                            // Already EXITED or FAILED (it died meanwhile): nothing to call off.
                            let _ = e.lifecycle.stop_refused();
                        }
                    });
                    warn!(
                        version = %version,
                        pid = process.pid,
                        reason,
                        "leaving the pager running: it refused to stop"
                    )
                }
            }
        });
    }
    while stops.join_next().await.is_some() {}
}

/// SERVING or COMPLETING sessions the pager itself lists now (a pager that exited serves none).
async fn live_in_pager(core: &Core, process: &PagerProcess) -> Result<usize, String> {
    if process.has_exited() {
        return Ok(0);
    }
    let mut req = tonic::Request::new(ListSessionsRequest {});
    req.set_timeout(core.config.pager_call_timeout);
    match process.client().list_sessions(req).await {
        Ok(r) => Ok(r.into_inner().sessions.iter().filter(|s| is_live(state_of(s))).count()),
        Err(_) if process.has_exited() => Ok(0),
        Err(s) => Err(s.message().to_string()),
    }
}
