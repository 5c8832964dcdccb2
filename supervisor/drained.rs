//! A DRAINING version that serves nothing (and has no handoff under way) is stopped; one that
//! refuses is tried again later. A standby version is kept while idle.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::core::Core;

/// Wait before retrying to stop a DRAINING pager that refused.
const STOP_RETRY: Duration = Duration::from_secs(30);

impl Core {
    /// Stops every DRAINING version that serves nothing and has no handoff under way.
    pub fn stop_drained_versions(self: &Arc<Self>) {
        let now = Instant::now();
        let to_stop = self.versions.update(|t| {
            let mut out = Vec::new();
            for e in t.entries.values_mut() {
                let due = e.next_stop_attempt.is_none_or(|at| at <= now);
                // A standby version is kept while idle.
                if !e.lifecycle.drains() || e.inflight_handoffs > 0 || !due {
                    continue;
                }
                // Lock order: versions, then the inventory.
                if self.inventory.live_count(&e.version) > 0 {
                    continue;
                }
                if let Some(p) = e.usable().cloned() {
                    match e.lifecycle.begin_stop() {
                        Ok(()) => out.push((e.version.clone(), p)),
                        Err(refused) => debug!(version = %e.version, %refused, "not stopped"),
                    }
                }
            }
            out
        });
        for (version, process) in to_stop {
            let core = self.clone();
            tokio::spawn(async move {
                info!(
                    version = %version,
                    pid = process.pid,
                    "DRAINING version serves no session: stopping it",
                );
                if let Err(reason) = process.stop(core.config.stop_grace).await {
                    warn!(
                        version = %version,
                        pid = process.pid,
                        reason,
                        "the pager refused to stop; retrying later",
                    );
                    core.versions.update(|t| {
                        if let Some(e) = t.entries.get_mut(&version) {
                            if let Err(refused) = e.lifecycle.stop_refused() {
                                debug!(version = %version, %refused, "no stop to call off");
                            }
                            e.next_stop_attempt = Some(Instant::now() + STOP_RETRY);
                        }
                    });
                }
            });
        }
    }
}
