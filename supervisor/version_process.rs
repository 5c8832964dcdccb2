//! The process of a pager version over time: spawned and recorded in the version table, its
//! exit watched and handled (expected: EXITED; otherwise its sessions go to another pager,
//! `readopt.rs`, and an active version is respawned, a few times in a row, with backoff).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tracing::{error, info, warn};

use crate::core::Core;
use crate::metrics::exit_cause;
use crate::pager_exit::{Exit, PagerError};
use crate::pager_paths::PagerPaths;
use crate::pagers::PagerProcess;

/// Restarts in a row of an active version before it is declared FAILED.
const MAX_RESTARTS: u32 = 3;
/// A pager that ran this long before dying starts a fresh series of restarts.
const HEALTHY_RUN: Duration = Duration::from_secs(60);

/// Wait before the `n`th restart in a row: none for the first (the VMs of a pager that died wait
/// for its successor), then 1, 2, 4 s...
fn backoff(n: u32) -> Duration {
    match n {
        0 | 1 => Duration::ZERO,
        n => Duration::from_secs(1u64 << (n - 2).min(6)),
    }
}

impl Core {
    /// Starts one pager process of `version`, records it in the table, and watches its exit.
    pub async fn spawn_version(
        self: &Arc<Self>,
        version: &str,
        binary: &Path,
    ) -> Result<Arc<PagerProcess>, PagerError> {
        // Counted, so that shutdown waits for it (a pager left half started would run for ever).
        let Some(_spawning) = self.spawn_task() else {
            return Err(PagerError::ShuttingDown { version: version.to_string() });
        };
        let paths = PagerPaths::new(&self.config.pagers_dir, version);
        let args = self
            .versions
            .read(|t| t.entries.get(version).map(|e| e.tuning.args()))
            .unwrap_or_default();
        let process =
            PagerProcess::start(version, binary, &args, paths, self.config.ready_timeout).await?;
        self.versions.update(|t| {
            if let Some(e) = t.entries.get_mut(version) {
                if let Err(refused) = e.lifecycle.spawned() {
                    warn!(version, %refused, "a pager process started for a version that stopped");
                }
                e.process = Some(process.clone());
                e.started_at = Some(process.started_at);
            }
        });
        self.watch_process(version, &process);
        Ok(process)
    }

    /// Handles the exit of `process` (of `version`) once it happens.
    pub fn watch_process(self: &Arc<Self>, version: &str, process: &Arc<PagerProcess>) {
        let (core, watched, version) = (self.clone(), process.clone(), version.to_string());
        tokio::spawn(async move {
            let exit = watched.wait_exit().await;
            core.pager_exited(version, watched, exit);
        });
    }

    /// A pager process exited: expected (a stop was asked for) → EXITED; otherwise its live
    /// sessions are handed to another pager (`readopt.rs`), and an active version is respawned
    /// (its fresh process adopts them) unless it died too often in a row.
    fn pager_exited(self: Arc<Self>, version: String, process: Arc<PagerProcess>, exit: Exit) {
        // One the supervisor killed says why, in its version's and its sessions' errors.
        let exit = match process.kill_reason() {
            Some(why) => {
                Exit { status: format!("{}, killed by the supervisor: {why}", exit.status), ..exit }
            }
            None => exit,
        };
        // Counted as a re-adoption from before the process leaves the table until its sessions'
        // task has started (and counts itself): shutdown never sees a gap between the two.
        let _handling = self.adoption_task();
        // Even while shutting down, an active version that dies with sessions is respawned: the
        // re-adoption finishes before the supervisor exits (shutdown waits for it, bounded).
        let serves = self.inventory.live_count(&version) > 0;
        // Sessions waiting for a pager (a first handoff in flight, or ORPHANED) depend on the
        // active version too: without it their VMs stay frozen.
        let awaited = self.inventory.awaiting_pager_count() > 0;
        let wanted = !self.spawns_closed() && (!self.is_closing() || serves);
        let outcome = self.versions.update(|t| {
            let is_active = t.active.as_deref() == Some(version.as_str());
            let depended_on = serves || (is_active && awaited);
            let Some(e) = t.entries.get_mut(&version) else { return ExitOutcome::Stale };
            if !e.process.as_ref().is_some_and(|p| Arc::ptr_eq(p, &process)) {
                return ExitOutcome::Stale; // an older process of this version
            }
            e.process = None;
            // Under the table's lock: no new process of this version binds these paths meanwhile.
            process.paths.remove_files();
            if e.lifecycle.stopped().is_ok() {
                return ExitOutcome::Stopped;
            }
            if process.started.elapsed() >= HEALTHY_RUN {
                e.restarts_in_a_row = 0;
            }
            e.error = format!("pid {} exited unexpectedly: {exit}", process.pid);
            // A process that served and died is respawned as long as sessions depend on it
            // (their VMs freeze without a pager), however often, at the backoff's pace; only a
            // version nobody depends on gives up after MAX_RESTARTS.
            let respawn =
                is_active && wanted && (e.restarts_in_a_row < MAX_RESTARTS || depended_on);
            if let Err(refused) = e.lifecycle.died(respawn) {
                error!(version = %version, %refused, "a pager version's process died out of turn");
                return ExitOutcome::Lost { respawn_after: None };
            }
            if respawn {
                e.restarts_in_a_row += 1;
                ExitOutcome::Lost { respawn_after: Some(backoff(e.restarts_in_a_row)) }
            } else {
                if is_active && wanted {
                    e.error =
                        format!("{}; gave up after {MAX_RESTARTS} restarts in a row", e.error);
                }
                ExitOutcome::Lost { respawn_after: None }
            }
        });
        let pid = process.pid;
        let respawn_after = match outcome {
            ExitOutcome::Stale => return,
            ExitOutcome::Stopped => {
                info!(version = %version, pid, status = %exit.status, "pager exited");
                self.metrics.pager_exits.inc(&[&version, exit_cause(true, &exit.status)]);
                return;
            }
            ExitOutcome::Lost { respawn_after } => respawn_after,
        };
        self.metrics.pager_exits.inc(&[&version, exit_cause(false, &exit.status)]);
        error!(version = %version, pid, exit = %exit, "pager exited unexpectedly");
        // Before the respawn: the sessions are marked as being re-adopted before a fresh
        // process of this version could list (and so lose) them.
        self.orphan_sessions(&version, pid, &exit);
        if let Some(delay) = respawn_after {
            info!(version = %version, delay = ?delay, "respawning the pager version");
            tokio::spawn(self.respawn(version, delay));
        }
    }

    /// Restarts an active version that died, after `delay`; retries with backoff until the
    /// version has failed [`MAX_RESTARTS`] times in a row.
    async fn respawn(self: Arc<Self>, version: String, mut delay: Duration) {
        loop {
            tokio::time::sleep(delay).await;
            let binary = self.versions.read(|t| {
                t.entries
                    .get(&version)
                    .filter(|e| e.lifecycle.awaits_respawn())
                    .map(|e| e.binary_path.clone())
            });
            let Some(binary) = binary.filter(|_| !self.spawns_closed()) else { return };
            let err = match self.spawn_version(&version, &binary).await {
                Ok(process) => {
                    let state = self.versions.update(|t| {
                        let is_active = t.active.as_deref() == Some(version.as_str());
                        let e = t.entries.get_mut(&version)?;
                        if let Err(refused) = e.lifecycle.respawned(is_active) {
                            warn!(version = %version, %refused, "a respawned pager's version moved on");
                        }
                        // `error` says why a version FAILED or EXITED unexpectedly; it runs again.
                        e.error.clear();
                        Some(e.lifecycle.name())
                    });
                    let state = state.unwrap_or("?");
                    info!(version = %version, pid = process.pid, state, "pager version respawned");
                    self.metrics.pager_restarts.inc(&[&version]);
                    return;
                }
                Err(err) => err,
            };
            error!(version = %version, error = %err, "respawning the pager version failed");
            let again = self.versions.update(|t| {
                let e = t.entries.get_mut(&version)?;
                if e.restarts_in_a_row < MAX_RESTARTS && e.lifecycle.awaits_respawn() {
                    e.restarts_in_a_row += 1;
                    e.error = err.to_string();
                    Some(backoff(e.restarts_in_a_row))
                } else {
                    if let Err(refused) = e.lifecycle.give_up() {
                        warn!(version = %version, %refused, "a respawn failed for a version that moved on");
                    }
                    e.error = format!("{err}; gave up after {MAX_RESTARTS} restarts in a row");
                    None
                }
            });
            match again {
                Some(next) if !self.spawns_closed() => delay = next,
                _ => return,
            }
        }
    }
}

/// What a pager's exit means for its version.
#[derive(Debug)]
enum ExitOutcome {
    /// Not the version's current process: nothing to do.
    Stale,
    /// A stop was asked for: EXITED.
    Stopped,
    /// It died: its sessions are re-adopted; maybe respawn.
    Lost { respawn_after: Option<Duration> },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_back_off_exponentially_and_stay_bounded() {
        assert_eq!(backoff(1), Duration::ZERO);
        assert_eq!(backoff(2), Duration::from_secs(1));
        assert_eq!(backoff(3), Duration::from_secs(2));
        assert_eq!(backoff(4), Duration::from_secs(4));
        assert_eq!(backoff(100), Duration::from_secs(64));
    }
}
