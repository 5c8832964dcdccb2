//! Pager versions made active: deploy (start, wait for health, make active, demote the previous
//! one to DRAINING), activate (switch back or forth between running versions). Their processes'
//! spawning, exits and respawns are `version_process.rs`'s; stopping drained ones `drained.rs`'s.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::{debug, error, info, warn};
use uffdpager::api::PagerVersion;

use crate::core::Core;
use crate::pager_binary::{check_binary, probe_version};
use crate::pager_exit::PagerError;
use crate::session_id;
use crate::status::ServiceError;
use crate::tuning::PagerTuning;
use crate::versions::{Table, VersionEntry};

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
}

#[cfg(test)]
mod tests {
    use uffdpager::api::VersionState;

    use super::*;

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
