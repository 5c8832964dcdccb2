//! The version table: every pager version this supervisor started, its state, and which one is
//! active. Pure bookkeeping behind a mutex; starting and stopping processes is `deploy.rs`'s job.
//!
//! States: STARTING (spawned, not yet healthy, or waiting to be respawned), ACTIVE (new sessions
//! go to it; exactly one at a time), DRAINING (serves the sessions it has, gets no new ones; shut
//! down once it has none left — except a standby version started at startup as a roll-back
//! target, kept until it is first made active), EXITED (stopped on purpose), FAILED (would not
//! start, died while not active, or died and could not be restarted). A session is routed to the version named in its `pager_version`,
//! whatever that version's state, as long as its process runs.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::time::Instant;
use uffdpager::api::PagerVersion;

use crate::pagers::PagerProcess;
use crate::status::ServiceError;
use crate::version_lifecycle::VersionLifecycle;

/// One version's entry.
#[derive(Debug)]
pub struct VersionEntry {
    pub version: String,
    pub binary_path: PathBuf,
    /// Its state and transitions (`version_lifecycle.rs`).
    pub lifecycle: VersionLifecycle,
    pub error: String,
    pub started_at: Option<SystemTime>,
    /// The running process, if any.
    pub process: Option<Arc<PagerProcess>>,
    /// Handoffs under way to this version (it must not be stopped meanwhile).
    pub inflight_handoffs: u32,
    /// Unexpected exits since it last ran long enough to count as healthy.
    pub restarts_in_a_row: u32,
    /// No drain stop is tried before this (after a pager refused one).
    pub next_stop_attempt: Option<Instant>,
    /// Flags passed to each process of this version.
    pub tuning: crate::tuning::PagerTuning,
}

impl VersionEntry {
    pub fn new(version: &str, binary_path: PathBuf) -> Self {
        Self {
            version: version.to_string(),
            binary_path,
            lifecycle: VersionLifecycle::new(),
            error: String::new(),
            started_at: None,
            process: None,
            inflight_handoffs: 0,
            restarts_in_a_row: 0,
            next_stop_attempt: None,
            tuning: Default::default(),
        }
    }

    /// Running and not being stopped: sessions may be routed to it.
    pub fn usable(&self) -> Option<&Arc<PagerProcess>> {
        self.process.as_ref().filter(|p| !self.lifecycle.is_stopping() && p.exit().is_none())
    }

    fn to_proto(&self, session_count: u32) -> PagerVersion {
        PagerVersion {
            version: self.version.clone(),
            binary_path: self.binary_path.display().to_string(),
            pid: self.process.as_ref().map_or(0, |p| p.pid),
            state: self.lifecycle.state() as i32,
            session_count,
            started_at: self.started_at.map(uffdpager::grpc::timestamp),
            error: self.error.clone(),
        }
    }
}

/// The table's contents.
#[derive(Debug, Default)]
pub struct Table {
    pub entries: BTreeMap<String, VersionEntry>,
    pub active: Option<String>,
}

impl Table {
    fn describe(&self, version: &str) -> String {
        match self.entries.get(version) {
            None => "unknown".into(),
            Some(e) if e.error.is_empty() => e.lifecycle.name().into(),
            Some(e) => format!("{}: {}", e.lifecycle.name(), e.error),
        }
    }
}

/// The shared version table. Every change bumps a counter that waiters can watch.
#[derive(Debug, Clone)]
pub struct Versions {
    table: Arc<Mutex<Table>>,
    changed: Arc<watch::Sender<u64>>,
}

impl Default for Versions {
    fn default() -> Self {
        Self { table: Arc::default(), changed: Arc::new(watch::channel(0).0) }
    }
}

impl Versions {
    /// Runs `f` on the table under its lock, then wakes the waiters.
    pub fn update<R>(&self, f: impl FnOnce(&mut Table) -> R) -> R {
        let r = f(&mut self.lock());
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
        r
    }

    /// Reads the table under its lock.
    pub fn read<R>(&self, f: impl FnOnce(&Table) -> R) -> R {
        f(&self.lock())
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The table as the API shows it; `count` gives each version's live sessions.
    pub fn list(&self, count: impl Fn(&str) -> u32) -> (Vec<PagerVersion>, String) {
        let t = self.lock();
        let versions = t.entries.values().map(|e| e.to_proto(count(&e.version))).collect();
        (versions, t.active.clone().unwrap_or_default())
    }

    pub fn get(&self, version: &str, session_count: u32) -> Option<PagerVersion> {
        self.lock().entries.get(version).map(|e| e.to_proto(session_count))
    }

    /// The running process of the version that owns a session.
    pub fn owner(&self, version: &str) -> Result<Arc<PagerProcess>, ServiceError> {
        let t = self.lock();
        match t.entries.get(version).and_then(|e| e.process.as_ref()) {
            Some(p) if p.exit().is_none() => Ok(p.clone()),
            _ => Err(ServiceError::OwnerUnavailable {
                version: version.to_string(),
                why: t.describe(version),
            }),
        }
    }

    /// True while some version's process has exited but its exit is not handled yet (its
    /// sessions not yet marked for re-adoption).
    pub fn exits_unhandled(&self) -> bool {
        self.lock().entries.values().any(|e| e.process.as_ref().is_some_and(|p| p.has_exited()))
    }

    /// Every version with a live process: (version, process).
    pub fn running(&self) -> Vec<(String, Arc<PagerProcess>)> {
        self.lock()
            .entries
            .values()
            .filter_map(|e| {
                e.process
                    .as_ref()
                    .filter(|p| p.exit().is_none())
                    .map(|p| (e.version.clone(), p.clone()))
            })
            .collect()
    }

    /// Refuses new sessions early when no version could serve them (none active, or the active
    /// one FAILED); a version that is (re)starting is fine.
    pub fn check_can_serve(&self) -> Result<(), ServiceError> {
        let t = self.lock();
        let Some(active) = t.active.as_deref() else {
            return Err(ServiceError::NoActiveVersion);
        };
        match t.entries.get(active).map(|e| e.lifecycle) {
            Some(l) if l.is_active() || l.is_starting() => Ok(()),
            _ => Err(ServiceError::OwnerUnavailable {
                version: active.to_string(),
                why: t.describe(active),
            }),
        }
    }

    /// Reserves a version for one handoff — a new session's, or one whose pager died: the active
    /// version, waiting up to `wait` while it (re)starts (a dead active version is respawned;
    /// one whose death is still being processed counts as restarting); if the active version
    /// cannot serve (FAILED, none, or still starting at the deadline), the running version
    /// started last. Err when no version runs: the session is then ORPHANED by the caller.
    ///
    /// The reservation (which keeps the version from being stopped) lasts as long as the guard:
    /// drop it only once the session's new state is recorded.
    pub async fn begin_handoff(&self, wait: Duration) -> Result<HandoffGuard, ServiceError> {
        let deadline = Instant::now() + wait;
        let mut changed = self.changed.subscribe();
        loop {
            let expired = Instant::now() >= deadline;
            {
                let mut t = self.lock();
                let active = t.active.clone();
                let mut starting = false;
                if let Some(e) = active.as_deref().and_then(|a| t.entries.get_mut(a)) {
                    if let Some(p) = e.usable().cloned() {
                        e.inflight_handoffs += 1;
                        return Ok(self.guard(e.version.clone(), p));
                    }
                    let dying = e.lifecycle.is_active()
                        && e.process.as_ref().is_some_and(|p| p.exit().is_some());
                    starting = (e.lifecycle.is_starting() || dying) && !e.lifecycle.is_stopping();
                }
                if !starting || expired {
                    let fallback = t
                        .entries
                        .values_mut()
                        .filter(|e| e.lifecycle.takes_sessions())
                        .filter(|e| e.usable().is_some())
                        .max_by_key(|e| e.started_at);
                    if let Some(e) = fallback {
                        let p = e.usable().cloned().ok_or(ServiceError::NoActiveVersion)?;
                        e.inflight_handoffs += 1;
                        return Ok(self.guard(e.version.clone(), p));
                    }
                    return Err(match active {
                        None => ServiceError::NoActiveVersion,
                        Some(a) => ServiceError::OwnerUnavailable {
                            why: format!("{}, and no other version runs", t.describe(&a)),
                            version: a,
                        },
                    });
                }
            }
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {}
                r = changed.changed() => if r.is_err() {
                    return Err(ServiceError::NoActiveVersion);
                }
            }
        }
    }

    /// Some version runs that could take a session (ACTIVE or DRAINING, not being stopped).
    pub fn any_usable(&self) -> bool {
        self.lock().entries.values().any(|e| e.lifecycle.takes_sessions() && e.usable().is_some())
    }

    fn guard(&self, version: String, process: Arc<PagerProcess>) -> HandoffGuard {
        HandoffGuard { versions: self.clone(), version, process }
    }
}

/// A handoff under way to `version` (see [`Versions::begin_handoff`]).
#[derive(Debug)]
pub struct HandoffGuard {
    versions: Versions,
    pub version: String,
    pub process: Arc<PagerProcess>,
}

impl Drop for HandoffGuard {
    fn drop(&mut self) {
        self.versions.update(|t| {
            if let Some(e) = t.entries.get_mut(&self.version) {
                e.inflight_handoffs = e.inflight_handoffs.saturating_sub(1);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_handoff_without_an_active_version_is_refused() {
        let v = Versions::default();
        assert!(matches!(
            v.begin_handoff(Duration::ZERO).await,
            Err(ServiceError::NoActiveVersion)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_handoff_waits_for_a_starting_version_then_gives_up_naming_it() {
        let v = Versions::default();
        v.update(|t| {
            t.entries.insert("v1".into(), VersionEntry::new("v1", "/bin/pager".into()));
            t.active = Some("v1".into());
        });
        let err = v.begin_handoff(Duration::from_secs(3)).await.unwrap_err();
        assert!(err.to_string().contains("v1") && err.to_string().contains("STARTING"), "{err}");
    }

    #[tokio::test]
    async fn new_sessions_are_refused_without_a_version_that_could_serve_them() {
        let v = Versions::default();
        assert!(matches!(v.check_can_serve(), Err(ServiceError::NoActiveVersion)));
        v.update(|t| {
            t.entries.insert("v1".into(), VersionEntry::new("v1", "/bin/pager".into()));
            t.active = Some("v1".into());
        });
        assert!(v.check_can_serve().is_ok(), "a starting version will serve them");
        v.update(|t| t.entries.get_mut("v1").unwrap().lifecycle.fail_to_start()).unwrap();
        assert!(matches!(v.check_can_serve(), Err(ServiceError::OwnerUnavailable { .. })));
    }

    #[tokio::test]
    async fn a_failed_active_version_refuses_handoffs_with_its_error() {
        let v = Versions::default();
        v.update(|t| {
            let mut e = VersionEntry::new("v1", "/bin/pager".into());
            e.lifecycle.fail_to_start().unwrap();
            e.error = "exited 4 times in a row".into();
            t.entries.insert("v1".into(), e);
            t.active = Some("v1".into());
        });
        let err = v.begin_handoff(Duration::from_secs(3)).await.unwrap_err().to_string();
        assert!(err.contains("FAILED: exited 4 times in a row"), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_adoption_waits_for_a_respawning_active_version_then_says_none_runs() {
        let v = Versions::default();
        v.update(|t| {
            t.entries.insert("v1".into(), VersionEntry::new("v1", "/bin/pager".into()));
            t.active = Some("v1".into());
        });
        let started = Instant::now();
        let err = v.begin_handoff(Duration::from_secs(30)).await.unwrap_err().to_string();
        assert!(started.elapsed() >= Duration::from_secs(30), "waited for the respawn");
        assert!(err.contains("v1") && err.contains("no other version runs"), "{err}");
        v.update(|t| t.entries.get_mut("v1").unwrap().lifecycle.fail_to_start()).unwrap();
        let started = Instant::now();
        assert!(v.begin_handoff(Duration::from_secs(30)).await.is_err());
        assert_eq!(started.elapsed(), Duration::ZERO, "a FAILED version is not waited for");
    }

    #[test]
    fn the_listing_shows_every_version_and_the_active_one() {
        let v = Versions::default();
        v.update(|t| {
            let mut old = VersionEntry::new("v1", "/bin/p1".into());
            old.lifecycle.become_active().unwrap();
            old.lifecycle.step_down().unwrap();
            t.entries.insert("v1".into(), old);
            let mut new = VersionEntry::new("v2", "/bin/p2".into());
            new.lifecycle.become_active().unwrap();
            t.entries.insert("v2".into(), new);
            t.active = Some("v2".into());
        });
        let (list, active) = v.list(|name| if name == "v1" { 3 } else { 0 });
        assert_eq!(active, "v2");
        assert_eq!(list.len(), 2);
        assert_eq!(list[0].state, uffdpager::api::VersionState::Draining as i32);
        assert_eq!(list[0].session_count, 3);
        assert_eq!(list[1].binary_path, "/bin/p2");
        assert!(matches!(v.owner("v1"), Err(ServiceError::OwnerUnavailable { .. })));
    }
}
