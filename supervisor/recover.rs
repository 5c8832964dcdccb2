//! A restarted supervisor finds the pagers an earlier run left serving, and rebuilds its
//! inventory from them.
//!
//! For each `DIR/pagers/<version>/` with a pid file: the process must be alive (a pidfd that is
//! not yet readable: a zombie has exited) AND its gRPC socket must answer `GetInfo` with that pid
//! and that version. Such a pager joins the version table (ACTIVE if `DIR/active-version` names
//! it, else DRAINING), watched through its pidfd (it is not this process's child, so it cannot be
//! reaped here) and still stoppable (Shutdown RPC, then signals through the pidfd). Its sessions
//! come back from its `ListSessions` with their figures, completed by `DIR/sessions/<id>.json`
//! (labels, creation time, socket path). Directories of pagers that are gone are cleaned up.
//!
//! The duplicates of each live session's uffd, memory file, VMM stream and removed-ranges log
//! died with the earlier supervisor; the pager that serves the session gives them back over its
//! handoff socket (`uffdpager::handoff`'s give-back), so the session is exactly as re-adoptable
//! as before the restart. Why from the pager, rather than taking them with `pidfd_getfd(2)`: the
//! pager knows which descriptor is which (no guessing from `/proc`), it needs no ptrace rights
//! over anyone, and it gives the real VMM stream back, the VMM's one sure sign of exit.
//!
//! Sessions whose metadata says they were connected but that no running pager lists — their
//! pager died while no supervisor, or a supervisor killed before it could have them adopted,
//! held them — are taken back from their VMM (`vmm_fds.rs`: the uffd through a pidfd of the VMM,
//! the memory file and the removed-ranges log from the runtime directory) and listed ORPHANED:
//! the active version adopts them once it runs. One whose VMM has exited is listed ENDED. What
//! cannot come back: sessions that were still PENDING (their VMM socket listeners are gone).
//!
//! This module finds and takes over the pagers; putting their sessions (and the unserved ones)
//! back is `recover_sessions.rs`'s.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tracing::{info, warn};
use uffdpager::api::pager_client::PagerClient;
use uffdpager::api::{GetInfoRequest, ListSessionsRequest, PagerInfo};

use crate::core::Core;
use crate::pager_paths::PagerPaths;
use crate::pagers::PagerProcess;
use crate::pidfd::PidFd;
use crate::runtime_state::{self, SessionMeta};
use crate::session_id;
use crate::session_record::{is_live, state_of};
use crate::version_lifecycle::VersionLifecycle;
use crate::versions::VersionEntry;

/// Deadline of each call to a pager found running.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a pager directory was not taken over.
#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    #[error("no readable pid file")]
    NoPid,
    #[error("pid {0} is not running")]
    NotRunning(u32),
    #[error("pid {pid} runs but its gRPC socket does not answer GetInfo: {reason}")]
    NoAnswer { pid: u32, reason: String },
    #[error("the pager on the socket is pid {got} version {version:?}, not pid {pid}")]
    Mismatch { pid: u32, got: u32, version: String },
    #[error("listing its sessions: {0}")]
    List(String),
}

/// What the recovery found.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Versions taken over.
    pub versions: BTreeSet<String>,
    /// The one of them recorded as active, made ACTIVE again.
    pub active: Option<String>,
    /// Sessions rebuilt.
    pub sessions: usize,
    /// Sessions no pager served, taken back from their VMM (ORPHANED until adopted).
    pub orphans: usize,
}

/// Checks that pid `pid` runs and answers on `paths.grpc_socket` as `version`.
async fn probe(
    version: &str,
    pid: u32,
    paths: &PagerPaths,
) -> Result<(PidFd, PagerInfo), RecoverError> {
    let pidfd = PidFd::open(pid).map_err(|_| RecoverError::NotRunning(pid))?;
    if pidfd.has_exited() {
        return Err(RecoverError::NotRunning(pid));
    }
    let mut client = PagerClient::new(uffdpager::grpc::uds_channel(&paths.grpc_socket));
    let mut req = tonic::Request::new(GetInfoRequest {});
    req.set_timeout(CALL_TIMEOUT);
    let info = match tokio::time::timeout(CALL_TIMEOUT, client.get_info(req)).await {
        Ok(Ok(r)) => r.into_inner(),
        Ok(Err(s)) => return Err(RecoverError::NoAnswer { pid, reason: s.message().to_string() }),
        Err(_) => return Err(RecoverError::NoAnswer { pid, reason: "no answer within 2s".into() }),
    };
    if info.pid != pid || info.version != version {
        return Err(RecoverError::Mismatch { pid, got: info.pid, version: info.version });
    }
    Ok((pidfd, info))
}

/// The executable of a running process (`/proc/<pid>/exe`), for `binary_path`.
fn binary_of(pid: u32) -> PathBuf {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
    let text = exe.to_string_lossy();
    match text.strip_suffix(" (deleted)") {
        Some(path) => PathBuf::from(path),
        None => exe,
    }
}

fn system_time(t: Option<prost_types::Timestamp>) -> SystemTime {
    t.and_then(|t| {
        let secs = u64::try_from(t.seconds).ok()?;
        let nanos = u32::try_from(t.nanos).ok()?;
        SystemTime::UNIX_EPOCH.checked_add(Duration::new(secs, nanos))
    })
    .unwrap_or_else(SystemTime::now)
}

impl Core {
    /// Takes over the pagers an earlier supervisor left running, and their sessions. Call once,
    /// at startup, before any version is started.
    pub async fn recover(self: &Arc<Self>) -> Recovered {
        let mut found = Recovered::default();
        let mut metas = runtime_state::read_session_metas(&self.config.sessions_dir);
        let recorded_active = runtime_state::read_active_version(&self.config.runtime_dir);
        let Ok(entries) = std::fs::read_dir(&self.config.pagers_dir) else { return found };
        let mut versions: Vec<String> = entries
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .filter(|v| session_id::validate(v).is_ok())
            .collect();
        versions.sort();
        for version in versions {
            let paths = PagerPaths::new(&self.config.pagers_dir, &version);
            if !paths.pid_file.exists() {
                continue; // a version that exited: only its log is left
            }
            match self.take_over(&version, paths.clone(), &mut metas).await {
                Ok(sessions) => {
                    found.sessions += sessions;
                    found.versions.insert(version);
                }
                Err(e @ RecoverError::NoAnswer { .. }) => {
                    warn!(version = %version, error = %e, "a pager process runs but cannot be taken over; left alone");
                }
                Err(e) => {
                    info!(version = %version, reason = %e, "pager of an earlier run is gone; removing its files");
                    paths.remove_files();
                }
            }
        }
        if let Some(active) = recorded_active.filter(|a| found.versions.contains(a)) {
            self.versions.update(|t| {
                if let Some(e) = t.entries.get_mut(&active) {
                    if let Err(refused) = e.lifecycle.activate() {
                        warn!(version = %active, %refused, "the recorded active version");
                    }
                }
                t.active = Some(active.clone());
            });
            self.set_active_version(&active);
            found.active = Some(active);
        }
        // Sessions no pager serves any more: connected ones are taken back from their VMM.
        for (id, meta) in metas {
            match meta.connected.clone().filter(|_| !meta.finished) {
                Some(connected) => {
                    if self.recover_unserved(meta, connected).await {
                        found.orphans += 1;
                    }
                }
                None => {
                    runtime_state::remove_session_meta(&self.config.sessions_dir, &id);
                    runtime_state::remove_removed_log(&self.config.sessions_dir, &id);
                }
            }
        }
        if !found.versions.is_empty() || found.orphans > 0 {
            info!(
                versions = ?found.versions,
                active = found.active.as_deref().unwrap_or(""),
                sessions = found.sessions,
                orphans = found.orphans,
                "took over the pagers and sessions of an earlier run",
            );
        }
        found
    }

    /// Takes over one pager and its sessions; returns how many sessions it serves.
    async fn take_over(
        self: &Arc<Self>,
        version: &str,
        paths: PagerPaths,
        metas: &mut HashMap<String, SessionMeta>,
    ) -> Result<usize, RecoverError> {
        let pid: u32 = crate::runtime_dir::read_private_file(&paths.pid_file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or(RecoverError::NoPid)?;
        let (pidfd, info) = probe(version, pid, &paths).await?;
        let process = PagerProcess::recovered(version, pidfd, paths, system_time(info.started_at));
        let mut req = tonic::Request::new(ListSessionsRequest {});
        req.set_timeout(CALL_TIMEOUT);
        let sessions = process
            .client()
            .list_sessions(req)
            .await
            .map_err(|s| RecoverError::List(s.message().to_string()))?
            .into_inner()
            .sessions;
        self.versions.update(|t| {
            let mut entry = VersionEntry::new(version, binary_of(pid));
            entry.lifecycle = VersionLifecycle::taken_over();
            entry.started_at = Some(process.started_at);
            entry.process = Some(process.clone());
            t.entries.insert(version.to_string(), entry);
        });
        self.watch_process(version, &process);
        info!(version = %version, pid, sessions = sessions.len(), "found a running pager");
        let count = sessions.len();
        for live in sessions {
            let meta = metas.remove(&live.id);
            let back = if is_live(state_of(&live)) {
                self.take_back(&process, &live.id, meta.as_ref()).await
            } else {
                None
            };
            self.rebuild_session(version, live, meta, back);
        }
        Ok(count)
    }
}
