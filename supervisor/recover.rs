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

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tracing::{info, warn};
use uffdpager::api::pager_client::PagerClient;
use uffdpager::api::{GetInfoRequest, ListSessionsRequest, PagerInfo, Session, SessionState};
use uffdpager::handoff::{self, HandoffRequest, SessionFds};

use crate::core::{Core, Held};
use crate::inventory::{is_live, state_of};
use crate::pagers::{PagerPaths, PagerProcess};
use crate::pidfd::PidFd;
use crate::runtime_state::{self, ConnectedMeta, SessionMeta};
use crate::session_id;
use crate::sessions::{regions_in_file_order, show_connected};
use crate::version_lifecycle::VersionLifecycle;
use crate::versions::VersionEntry;
use crate::vmm_fds::{self, VmmFdsError};

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

    /// A connected session no running pager lists: listed ORPHANED with its descriptors taken
    /// back from its VMM, or ENDED (its VMM exited), or FAILED (they cannot be taken). Returns
    /// whether it is ORPHANED.
    async fn recover_unserved(&self, meta: SessionMeta, connected: ConnectedMeta) -> bool {
        let id = meta.id.clone();
        let dir = self.config.sessions_dir.clone();
        let (m, c) = (meta.clone(), connected.clone());
        let taken = match tokio::task::spawn_blocking(move || {
            vmm_fds::take_from_vmm(&m, &c, &dir, None)
        })
        .await
        {
            Ok(taken) => taken,
            Err(e) => {
                warn!(session = %id, error = %e, "recovering a session of an earlier run failed");
                return false;
            }
        };
        if let Err(e @ VmmFdsError::HeldElsewhere { .. }) = &taken {
            // Left alone, its metadata kept: a later start may take its pager over.
            warn!(session = %id, error = %e, "a session of an earlier run is left alone");
            return false;
        }
        let mut session = Session { id: id.clone(), ..Default::default() };
        meta.apply_to(&mut session);
        session.memory_file = meta.memory_file.clone();
        show_connected(&mut session, &connected.request);
        session.faults = connected.request.faults;
        let (state, orphaned) = match &taken {
            Ok(_) => {
                session.error = "no pager served the session when this supervisor started (its \
                                 pager died with no supervisor to have it adopted): ORPHANED, \
                                 its descriptors taken back from its VMM, until a pager version \
                                 adopts it"
                    .into();
                (SessionState::Orphaned, true)
            }
            Err(VmmFdsError::VmmGone(_)) => {
                session.error = "its VMM exited while no pager served it".into();
                (SessionState::Ended, false)
            }
            Err(e) => {
                session.error = format!(
                    "no pager served the session when this supervisor started, and its \
                     descriptors cannot be taken back from its VMM: {e}"
                );
                (SessionState::Failed, false)
            }
        };
        session.state = state as i32;
        let mut held = self.held();
        if self.inventory.insert_with(&id, || Ok::<_, ()>(session)).is_err() {
            return false;
        }
        let socket_path = PathBuf::from(&meta.socket_path);
        match taken {
            Ok((request, fds)) => {
                held.insert(id.clone(), Held::recovered(socket_path, request, fds));
                drop(held);
                warn!(session = %id, vmm_pid = connected.request.vmm_pid, "session ORPHANED: no pager serves it; taken back from its VMM");
            }
            Err(e) => {
                drop(held);
                warn!(session = %id, state = ?state, error = %e, "a session of an earlier run is lost");
                self.release(&id, false);
            }
        }
        orphaned
    }

    /// Duplicates of a live session's descriptors, from the pager that serves it (give-back),
    /// else from its VMM; None (logged) if neither can give them.
    async fn take_back(
        &self,
        process: &PagerProcess,
        id: &str,
        meta: Option<&SessionMeta>,
    ) -> Option<(HandoffRequest, SessionFds)> {
        let socket = process.paths.handoff_socket.clone();
        let (sid, timeout) = (id.to_string(), self.config.handoff_timeout);
        let given =
            tokio::task::spawn_blocking(move || handoff::take_back(&socket, &sid, timeout)).await;
        let error = match given {
            Ok(Ok(back)) => return Some(back),
            Ok(Err(e)) => e.to_string(),
            Err(e) => e.to_string(),
        };
        let from_vmm = match meta.and_then(|m| m.connected.clone().map(|c| (m.clone(), c))) {
            Some((m, c)) => {
                let (dir, pager) = (self.config.sessions_dir.clone(), process.pid);
                tokio::task::spawn_blocking(move || {
                    vmm_fds::take_from_vmm(&m, &c, &dir, Some(pager))
                })
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| e.to_string()))
            }
            None => Err("no handshake recorded for it".into()),
        };
        match from_vmm {
            Ok(back) => {
                warn!(session = %id, version = %process.version, error, "the pager did not give the session's descriptors back; took them from its VMM");
                Some(back)
            }
            Err(vmm_error) => {
                warn!(session = %id, version = %process.version, error, vmm_error, "cannot get the session's descriptors back: it cannot be re-adopted if its pager dies");
                None
            }
        }
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

    /// Puts a session a recovered pager serves back into the inventory, with the duplicates of
    /// its descriptors given back (`back`), if any.
    fn rebuild_session(
        &self,
        version: &str,
        live: Session,
        meta: Option<SessionMeta>,
        back: Option<(HandoffRequest, SessionFds)>,
    ) {
        let id = live.id.clone();
        if session_id::validate(&id).is_err() {
            warn!(session = %id, version = %version, "a recovered pager serves a session with an invalid id; left alone");
            return;
        }
        let mut session = live;
        session.pager_version = version.to_string();
        session.outdated = false;
        session.regions = regions_in_file_order(std::mem::take(&mut session.regions));
        if let Some(meta) = &meta {
            meta.apply_to(&mut session);
            // The overlays are held again, as at CreateSession: a pager adopting the session
            // later gets them with it.
            match runtime_state::read_session_overlays(&self.config.sessions_dir, meta) {
                Ok(Some(o)) => {
                    self.held().entry(id.clone()).or_default().overlays = Some(Arc::new(o));
                }
                Ok(None) => {}
                Err(e) => {
                    warn!(session = %id, error = %e, "cannot read the session's overlays back");
                }
            }
        }
        let mut held = self.held();
        let inserted = self.inventory.insert_with(&id, || Ok::<_, ()>(session));
        match inserted {
            Ok(s) => {
                self.inventory.modify(&id, |r| r.serving_since = Some(tokio::time::Instant::now()));
                let readoptable = back.is_some();
                if let Some((request, fds)) = back {
                    let socket_path = PathBuf::from(&s.socket_path);
                    held.insert(id.clone(), Held::recovered(socket_path, request, fds));
                }
                drop(held);
                info!(session = %id, version = %version, state = ?s.state(), readoptable, "session taken over");
                if crate::inventory::is_terminal(state_of(&s)) {
                    // It finished while no supervisor ran: nothing to recover after this one.
                    self.release(&id, false);
                }
            }
            Err(_) => {
                warn!(session = %id, version = %version, "two recovered pagers serve one session id; keeping the first");
            }
        }
    }
}
