//! Shutdown: wait for SIGTERM or SIGINT, then stop in order: refuse new work, end the watch
//! streams, drain the gRPC servers under a deadline, close the session sockets, and stop the
//! pagers that serve nothing. Pagers that still serve sessions are LEFT RUNNING: stopping them
//! would freeze their VMs on the next page fault.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::core::Core;

/// How long the gRPC servers get to finish the calls in flight.
pub const DRAIN_GRACE: Duration = Duration::from_secs(10);

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

/// Stops the pagers that serve no session, in parallel; leaves the others running.
pub async fn stop_idle_pagers(core: &Arc<Core>) {
    let mut stops = JoinSet::new();
    for (version, process) in core.versions.running() {
        let live = core.inventory.live_count(&version);
        if live > 0 {
            warn!(
                version = %version,
                pid = process.pid,
                sessions = live,
                "leaving the pager running: it serves sessions whose VMs would freeze without it"
            );
            continue;
        }
        core.versions.update(|t| {
            if let Some(e) = t.entries.get_mut(&version) {
                e.stopping = true;
            }
        });
        let grace = core.config.stop_grace;
        stops.spawn(async move {
            match process.stop(grace).await {
                Ok(exit) => info!(
                    version = %version,
                    pid = process.pid,
                    status = %exit.status,
                    "pager stopped",
                ),
                Err(reason) => warn!(
                    version = %version,
                    pid = process.pid,
                    reason,
                    "leaving the pager running: it refused to stop"
                ),
            }
        });
    }
    while stops.join_next().await.is_some() {}
}
