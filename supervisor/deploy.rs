//! Pager versions over time: deploy (start, wait for health, make active, demote the previous
//! one to DRAINING), activate (switch back or forth between running versions), respawn an
//! active version that died (a few times in a row, with backoff), and stop a DRAINING version
//! once it serves nothing.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{debug, error, info, warn};
use uffdpager::api::PagerVersion;

use crate::core::Core;
use crate::metrics::exit_cause;
use crate::pager_binary::{check_binary, probe_version};
use crate::pagers::{Exit, PagerError, PagerPaths, PagerProcess};
use crate::session_id;
use crate::status::ServiceError;
use crate::tuning::PagerTuning;
use crate::versions::{Table, VersionEntry};

/// Restarts in a row of an active version before it is declared FAILED.
const MAX_RESTARTS: u32 = 3;
/// A pager that ran this long before dying starts a fresh series of restarts.
const HEALTHY_RUN: Duration = Duration::from_secs(60);
/// Wait before retrying to stop a DRAINING pager that refused.
const STOP_RETRY: Duration = Duration::from_secs(30);

/// Wait before the `n`th restart in a row: none for the first (the VMs of a pager that died wait
/// for its successor), then 1, 2, 4 s...
fn backoff(n: u32) -> Duration {
    match n {
        0 | 1 => Duration::ZERO,
        n => Duration::from_secs(1u64 << (n - 2).min(6)),
    }
}

/// What a started version becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// ACTIVE; the previous active version drains (DeployVersion).
    Active,
    /// DRAINING but kept while idle, as a roll-back target (startup, beside the active one).
    Standby,
}

/// The previous active version steps down: DRAINING if it runs, or its pending respawn is
/// cancelled (EXITED). In any other phase there is nothing to step down from.
fn demote(t: &mut Table, version: &str) {
    if let Some(e) = t.entries.get_mut(version) {
        if let Err(refused) = e.lifecycle.step_down() {
            debug!(version, %refused, "the previous active version keeps its state");
        }
    }
}

impl Core {
    /// ListVersions.
    pub fn list_versions(&self) -> (Vec<PagerVersion>, String) {
        self.versions.list(|v| self.inventory.live_count(v))
    }

    fn version_info(&self, version: &str) -> Result<PagerVersion, ServiceError> {
        let count = self.inventory.live_count(version);
        self.versions
            .get(version, count)
            .ok_or_else(|| ServiceError::VersionNotFound(version.into()))
    }

    /// DeployVersion: starts `binary_path` as a new version, waits for its health check, and
    /// makes it active; the previous active version drains. A version that does not become
    /// healthy is FAILED and the active one is unchanged.
    pub async fn deploy_version(
        self: &Arc<Self>,
        binary_path: &str,
        label: &str,
    ) -> Result<PagerVersion, ServiceError> {
        self.start_version(binary_path, label, Role::Active, &PagerTuning::default()).await
    }

    /// The label a version will run as: `label`, checked, or (empty) what the binary reports.
    pub async fn resolve_label(binary: &Path, label: &str) -> Result<String, ServiceError> {
        check_binary(binary)?;
        if label.is_empty() {
            return Ok(probe_version(binary).await?);
        }
        session_id::validate(label)
            .map_err(|source| ServiceError::InvalidVersionLabel { label: label.into(), source })?;
        Ok(label.to_string())
    }

    /// Starts `binary_path` as version `label` (empty: what the binary reports) in `role`.
    pub async fn start_version(
        self: &Arc<Self>,
        binary_path: &str,
        label: &str,
        role: Role,
        tuning: &PagerTuning,
    ) -> Result<PagerVersion, ServiceError> {
        if self.is_closing() {
            return Err(ServiceError::ShuttingDown);
        }
        let _serial = self.deploy_lock.lock().await;
        let binary = PathBuf::from(binary_path);
        if !binary.is_absolute() {
            return Err(PagerError::Binary {
                path: binary_path.into(),
                reason: "binary_path must be an absolute path".into(),
            }
            .into());
        }
        let label = Self::resolve_label(&binary, label).await?;
        self.versions.update(|t| {
            if let Some(e) = t.entries.get(&label) {
                if e.lifecycle.is_running() {
                    return Err(ServiceError::VersionRunning {
                        version: label.clone(),
                        state: e.lifecycle.name(),
                    });
                }
            }
            let mut entry = VersionEntry::new(&label, binary.clone());
            entry.tuning = tuning.clone();
            t.entries.insert(label.clone(), entry);
            Ok(())
        })?;
        info!(version = %label, binary = %binary.display(), ?role, "deploying pager version");
        let process = match self.spawn_version(&label, &binary).await {
            Ok(p) => p,
            Err(e) => {
                error!(
                    version = %label,
                    error = %e,
                    "pager version FAILED to start; the active version is unchanged",
                );
                self.versions.update(|t| {
                    if let Some(entry) = t.entries.get_mut(&label) {
                        if let Err(refused) = entry.lifecycle.fail_to_start() {
                            warn!(version = %label, %refused, "a version that did not start");
                        }
                        entry.error = e.to_string();
                    }
                });
                return Err(e.into());
            }
        };
        let previous = self.versions.update(|t| {
            let alive = t
                .entries
                .get(&label)
                .and_then(|e| e.process.as_ref())
                .is_some_and(|p| Arc::ptr_eq(p, &process) && p.exit().is_none());
            if !alive {
                return Err(ServiceError::VersionNotRunning {
                    version: label.clone(),
                    why: format!(
                        "it exited right after becoming healthy: {}",
                        t.entries.get(&label).map(|e| e.error.clone()).unwrap_or_default()
                    ),
                });
            }
            let healthy = |e: &mut VersionEntry| match role {
                Role::Standby => e.lifecycle.stand_by(),
                Role::Active => e.lifecycle.become_active(),
            };
            if let Some(refused) = t.entries.get_mut(&label).and_then(|e| healthy(e).err()) {
                return Err(ServiceError::VersionNotRunning {
                    version: label.clone(),
                    why: refused.to_string(),
                });
            }
            if role == Role::Standby {
                return Ok(None);
            }
            let previous = t.active.replace(label.clone());
            if let Some(prev) = previous.as_deref().filter(|p| *p != label) {
                demote(t, prev);
            }
            Ok(previous)
        })?;
        if role == Role::Standby {
            info!(version = %label, pid = process.pid, "pager version on standby (DRAINING, kept while idle)");
            return self.version_info(&label);
        }
        self.set_active_version(&label);
        info!(
            version = %label,
            pid = process.pid,
            previous = previous.as_deref().unwrap_or(""),
            "pager version ACTIVE",
        );
        self.version_info(&label)
    }

    /// ActivateVersion: makes a running version the active one; the previous one drains.
    pub async fn activate_version(&self, label: &str) -> Result<PagerVersion, ServiceError> {
        let _serial = self.deploy_lock.lock().await;
        let previous = self.versions.update(|t| {
            let Some(e) = t.entries.get_mut(label) else {
                return Err(ServiceError::VersionNotFound(label.into()));
            };
            // Only a version whose process runs, not being stopped, ACTIVE or DRAINING.
            let running = e.usable().is_some() && e.lifecycle.activate().is_ok();
            if !running {
                let why = match e.error.as_str() {
                    "" => e.lifecycle.name().to_string(),
                    err => format!("{}: {err}", e.lifecycle.name()),
                };
                return Err(ServiceError::VersionNotRunning { version: label.into(), why });
            }
            e.next_stop_attempt = None;
            let previous = t.active.replace(label.to_string());
            if let Some(prev) = previous.as_deref().filter(|p| *p != label) {
                demote(t, prev);
            }
            Ok(previous)
        })?;
        self.set_active_version(label);
        info!(
            version = %label,
            previous = previous.as_deref().unwrap_or(""),
            "pager version ACTIVE",
        );
        self.version_info(label)
    }

    /// Starts one pager process of `version`, records it in the table, and watches its exit.
    async fn spawn_version(
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
    use uffdpager::api::VersionState;

    use super::*;

    #[test]
    fn restarts_back_off_exponentially_and_stay_bounded() {
        assert_eq!(backoff(1), Duration::ZERO);
        assert_eq!(backoff(2), Duration::from_secs(1));
        assert_eq!(backoff(3), Duration::from_secs(2));
        assert_eq!(backoff(4), Duration::from_secs(4));
        assert_eq!(backoff(100), Duration::from_secs(64));
    }

    #[test]
    fn the_previous_active_version_drains_or_its_respawn_is_cancelled() {
        let mut t = Table::default();
        let mut a = VersionEntry::new("a", "/p".into());
        a.lifecycle.become_active().unwrap();
        t.entries.insert("a".into(), a);
        let mut b = VersionEntry::new("b", "/p".into());
        b.lifecycle.become_active().unwrap();
        b.lifecycle.died(true).unwrap();
        t.entries.insert("b".into(), b);
        demote(&mut t, "a");
        assert_eq!(t.entries["a"].lifecycle.state(), VersionState::Draining);
        demote(&mut t, "b");
        assert_eq!(t.entries["b"].lifecycle.state(), VersionState::Exited);
        assert!(!t.entries["b"].lifecycle.awaits_respawn(), "its respawn is cancelled");
    }
}
