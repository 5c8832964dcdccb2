//! The supervisor's shared state: configuration, the session inventory, the version table, and
//! the operating-system resources each session holds (its VMM socket, its memory file, and the
//! supervisor's duplicates of the uffd and VMM stream).
//!
//! The resources live beside the inventory rather than in it, so the inventory stays pure. Lock
//! order: `held` before the inventory's lock (never take `held` inside an inventory closure).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::AbortHandle;
use tracing::{debug, warn};
use uffdpager::api::EndSessionRequest;
use uffdpager::handoff::{HandoffRequest, SessionFds};

use crate::inventory::Inventory;
use crate::lifecycle::{Finish, Lifecycle};
use crate::refused_vmm::RefusedVmm;
use crate::versions::Versions;

/// Settings and timeouts.
#[derive(Debug, Clone)]
pub struct Config {
    pub runtime_dir: PathBuf,
    /// `DIR/sessions`: one VMM socket per session.
    pub sessions_dir: PathBuf,
    /// `DIR/pagers`: one directory per pager version.
    pub pagers_dir: PathBuf,
    /// How long a finished session stays listed.
    pub finished_retention: Duration,
    /// How long a connected VMM may take to send its handshake.
    pub handshake_timeout: Duration,
    /// How long a pager may take to answer a handoff.
    pub handoff_timeout: Duration,
    /// How long a handoff waits for the active version while it (re)starts.
    pub handoff_wait: Duration,
    /// How long the sessions of a pager that died wait for a version to adopt them (the active
    /// one being respawned, with its backoff), before they are FAILED.
    pub readopt_wait: Duration,
    /// How long a new pager may take to report SERVING on its health check.
    pub ready_timeout: Duration,
    /// Wait after Pager/Shutdown before SIGTERM, and after SIGTERM before SIGKILL.
    pub stop_grace: Duration,
    /// Period of the monitor that polls every pager's sessions.
    pub poll_interval: Duration,
    /// Deadline of the supervisor's own short calls to a pager (list, get, end session).
    pub pager_call_timeout: Duration,
    /// Most sessions not yet finished (PENDING, SERVING, COMPLETING) at once.
    pub max_sessions: usize,
    /// What becomes of a VMM whose session fails before it is served.
    pub refused_vmm: RefusedVmm,
    /// Most bytes of overlays one session may have (`--max-overlay-bytes`).
    pub max_overlay_bytes: u64,
    /// How long a pager may answer NOT_SERVING before it is killed (`pager_health.rs`).
    pub pager_unhealthy_timeout: Duration,
}

/// Default of `--max-sessions`: far more VMs than a host runs, far fewer descriptors (a few per
/// session) than the raised `RLIMIT_NOFILE` allows.
pub const DEFAULT_MAX_SESSIONS: usize = 1024;

impl Config {
    pub fn new(runtime_dir: PathBuf, finished_retention: Duration) -> Self {
        Self {
            sessions_dir: runtime_dir.join("sessions"),
            pagers_dir: runtime_dir.join("pagers"),
            runtime_dir,
            finished_retention,
            handshake_timeout: Duration::from_secs(30),
            handoff_timeout: Duration::from_secs(10),
            handoff_wait: Duration::from_secs(10),
            readopt_wait: Duration::from_secs(60),
            ready_timeout: Duration::from_secs(10),
            stop_grace: Duration::from_secs(5),
            poll_interval: Duration::from_millis(250),
            pager_call_timeout: Duration::from_secs(2),
            max_sessions: DEFAULT_MAX_SESSIONS,
            refused_vmm: RefusedVmm::Kill,
            max_overlay_bytes: 64 << 20,
            pager_unhealthy_timeout: Duration::from_secs(5),
        }
    }
}

/// What the supervisor holds for one session. Until the VMM connects, the memory file is owned
/// by the accept task (dropped with it); from the handoff on, by `fds`.
#[derive(Debug, Default)]
pub struct Held {
    pub socket_path: PathBuf,
    /// The socket file exists and its listener runs.
    pub socket_open: bool,
    /// The supervisor's copies of what it handed to the pager (uffd, memory file, VMM stream,
    /// removed-ranges log). It never reads from the uffd: that would steal the pager's faults.
    /// They exist so that another pager can adopt the session if this one dies.
    pub fds: Option<SessionFds>,
    /// The session's overlays (the sealed memfd of their bytes and where they go), from
    /// CreateSession on; handed to the pager with the session and to any pager adopting it.
    pub overlays: Option<Arc<uffdpager::overlay::Overlays>>,
    /// CreateSession's working-set paths, checked; handed to the pager with the session.
    pub working_set: crate::working_set::WorkingSetPaths,
    /// The handoff that made the session SERVING, to send again (with `adopt`) on re-adoption.
    pub request: Option<HandoffRequest>,
    /// The task accepting on the session socket (aborting it closes the socket).
    pub accept: Option<AbortHandle>,
    /// The task handling the first connection (handshake and handoff).
    pub setup: Option<AbortHandle>,
}

impl Held {
    /// What a restarted supervisor holds for a session it got back (from its pager or its VMM):
    /// the handoff and its descriptors, ready for a re-adoption.
    pub fn recovered(socket_path: PathBuf, request: HandoffRequest, fds: SessionFds) -> Self {
        Self { socket_path, fds: Some(fds), request: Some(request), ..Default::default() }
    }
}

/// The shared state, owned by an `Arc` that every task holds.
#[derive(Debug)]
pub struct Core {
    pub config: Config,
    pub inventory: Inventory,
    pub versions: Versions,
    held: Mutex<HashMap<String, Held>>,
    closing: watch::Sender<bool>,
    /// Serialises DeployVersion / ActivateVersion.
    pub deploy_lock: tokio::sync::Mutex<()>,
    /// Counters for `/metrics`.
    pub metrics: crate::metrics::SupervisorMetrics,
    /// Tasks handing sessions whose pager died (or that were ORPHANED) to a pager; shutdown
    /// waits for them.
    adoptions: watch::Sender<usize>,
    /// Pager processes being started (deploy, respawn); shutdown waits for them.
    spawns: watch::Sender<usize>,
    /// Set at the end of shutdown: no pager process is started any more.
    spawns_closed: AtomicBool,
}

/// Counts one task in a `watch` counter while it lives.
#[derive(Debug)]
pub struct Counted(watch::Sender<usize>);

impl Counted {
    fn new(counter: &watch::Sender<usize>) -> Self {
        counter.send_modify(|n| *n += 1);
        Self(counter.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

impl Core {
    pub fn new(config: Config) -> Arc<Self> {
        Arc::new(Self {
            config,
            inventory: Inventory::default(),
            versions: Versions::default(),
            held: Mutex::new(HashMap::new()),
            closing: watch::channel(false).0,
            deploy_lock: tokio::sync::Mutex::new(()),
            metrics: Default::default(),
            adoptions: watch::channel(0).0,
            spawns: watch::channel(0).0,
            spawns_closed: AtomicBool::new(false),
        })
    }

    /// Counts a re-adoption task while the guard lives.
    pub fn adoption_task(&self) -> Counted {
        Counted::new(&self.adoptions)
    }

    /// Counts a pager start while the guard lives; None once shutdown has closed spawns.
    pub fn spawn_task(&self) -> Option<Counted> {
        let guard = Counted::new(&self.spawns);
        (!self.spawns_closed.load(Ordering::SeqCst)).then_some(guard)
    }

    /// No pager process is started from now on.
    pub fn close_spawns(&self) {
        self.spawns_closed.store(true, Ordering::SeqCst);
    }

    pub fn spawns_closed(&self) -> bool {
        self.spawns_closed.load(Ordering::SeqCst)
    }

    /// Waits (at most `limit`) until no pager's death is left unhandled, no re-adoption task
    /// runs and no session waits to be handed over; returns whether that was reached.
    pub async fn wait_adoptions(&self, limit: Duration) -> bool {
        let mut rx = self.adoptions.subscribe();
        let settled = async {
            loop {
                // A pager that died just before the shutdown (its death seen by its pidfd, not
                // yet handled) counts too: its sessions are about to be re-adopted.
                if *rx.borrow_and_update() == 0
                    && self.inventory.handing_off_count() == 0
                    && !self.versions.exits_unhandled()
                {
                    return;
                }
                // Woken when a task ends; polled too, for records that settle on their own.
                let _ = tokio::time::timeout(Duration::from_millis(50), rx.changed()).await;
            }
        };
        tokio::time::timeout(limit, settled).await.is_ok()
    }

    /// Waits (at most `limit`) until no pager is being started.
    pub async fn wait_spawns(&self, limit: Duration) -> bool {
        let mut rx = self.spawns.subscribe();
        let done = tokio::time::timeout(limit, rx.wait_for(|n| *n == 0)).await.is_ok();
        done
    }

    /// Becomes true once shutdown has begun.
    pub fn closing(&self) -> watch::Receiver<bool> {
        self.closing.subscribe()
    }

    /// Completes once shutdown has begun.
    pub async fn wait_closing(&self) {
        until_true(&mut self.closing()).await;
    }

    pub fn is_closing(&self) -> bool {
        *self.closing.borrow()
    }

    pub fn begin_closing(&self) {
        self.closing.send_replace(true);
    }

    pub fn held(&self) -> MutexGuard<'_, HashMap<String, Held>> {
        self.held.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Releases everything the supervisor holds for a session (socket, duplicate fds), or
    /// everything but the duplicate fds when `keep_fds` (a session whose pager died keeps them
    /// for a later adoption).
    pub fn release(&self, id: &str, keep_fds: bool) {
        {
            let mut held = self.held();
            if let Some(h) = held.get_mut(id) {
                close_socket(h);
                if !keep_fds {
                    held.remove(id);
                }
            }
        }
        if !keep_fds {
            // Finished (whether or not anything was held for it here, as for a session found
            // finished after a restart): nothing for a restarted supervisor to recover.
            let dir = &self.config.sessions_dir;
            crate::runtime_state::update_session_meta(dir, id, |m| {
                m.finished = true;
                m.connected = None;
            });
            crate::runtime_state::remove_removed_log(dir, id);
            debug!(session = %id, "released the session's descriptors");
        }
    }

    /// Forgets a session's resources entirely, listener and setup included, and its metadata
    /// file.
    pub fn forget_held(&self, id: &str) {
        crate::runtime_state::remove_session_meta(&self.config.sessions_dir, id);
        crate::runtime_state::remove_removed_log(&self.config.sessions_dir, id);
        let mut held = self.held();
        if let Some(mut h) = held.remove(id) {
            close_socket(&mut h);
            if let Some(setup) = h.setup.take() {
                setup.abort();
            }
        }
    }

    /// Closes every session socket (at shutdown: no new VMM can connect).
    pub fn close_all_sockets(&self) {
        for h in self.held().values_mut() {
            close_socket(h);
        }
    }

    /// Marks a session FAILED with `error` unless it already finished, and releases its
    /// resources (see [`Core::release`] for `keep_fds`).
    pub fn fail_session(&self, id: &str, error: String, keep_fds: bool) {
        self.inventory.modify(id, |r| {
            if r.step(|l| l.finish(Finish::Failed)).is_ok() {
                r.session.error = error;
            }
        });
        self.release(id, keep_fds);
    }

    /// Marks a session ORPHANED: its VMM is connected, no pager version can serve it now, the
    /// supervisor keeps its descriptors, and the next version available adopts it (the monitor
    /// hands it over: `adopt_orphans`).
    pub fn orphan_session(&self, id: &str, why: String) {
        self.inventory.modify(id, |r| match r.step(Lifecycle::orphan) {
            Ok(()) => r.session.error = why,
            Err(e) => warn!(session = %id, error = %e, "not ORPHANED"),
        });
    }

    /// Makes `version` the active one in the inventory (sessions' `outdated` flips, with
    /// UPDATED events) and records it in `DIR/active-version` for a restarted supervisor.
    pub fn set_active_version(&self, version: &str) {
        self.inventory.set_active_version(version);
        if let Err(e) =
            crate::runtime_state::write_active_version(&self.config.runtime_dir, version)
        {
            warn!(version = %version, error = %e, "cannot record the active version");
        }
    }

    /// Asks `version` to release a finished session it still lists (its tombstone). Best
    /// effort: a pager that does not answer is asked again on the monitor's next pass.
    pub async fn end_session(&self, version: &str, id: &str) {
        let Ok(process) = self.versions.owner(version) else { return };
        let mut req =
            tonic::Request::new(EndSessionRequest { session_id: id.into(), force: false });
        req.set_timeout(self.config.pager_call_timeout);
        match process.client().end_session(req).await {
            Ok(_) => {
                debug!(session = %id, version = %version, "the pager released the finished session")
            }
            Err(s) if s.code() == tonic::Code::NotFound => {}
            Err(s) => {
                debug!(session = %id, version = %version, error = %s.message(), "EndSession failed")
            }
        }
    }
}

/// Completes once `rx` holds true (or its sender is gone).
pub async fn until_true(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}

fn close_socket(h: &mut Held) {
    if let Some(accept) = h.accept.take() {
        accept.abort();
    }
    if h.socket_open {
        h.socket_open = false;
        // Only a socket is removed: never a file someone put in its place.
        crate::session_socket::unlink(&h.socket_path);
    }
}
