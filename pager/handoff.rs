//! Accepts sessions the supervisor hands over (see `uffdpager::handoff`): checks them, maps the
//! memory file, gives the session to a fault worker, and answers once it is served. A bad
//! handoff is refused alone; nothing else is disturbed.

use std::os::fd::{AsFd, FromRawFd, IntoRawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};
use uffdpager::firecracker;
use uffdpager::handoff::{self, HandoffRequest, Incoming, SessionFds};
use uffdpager::peer_auth::{self, CallerPolicy, PeerCredentials};
use uffdpager::removed_log::RemovedLog;
use userfaultfd::Uffd;

use crate::overlay::SessionOverlays;
use crate::registry::{Entry, SessionShared};
use crate::session::Session;
use crate::worker::Command;
use crate::working_set;
use crate::Pager;

/// How long one handoff may take (both the supervisor's message and the worker's answer).
const HANDOFF_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the handoff socket until the process exits.
pub fn serve(listener: UnixListener, pager: Arc<Pager>) {
    for conn in listener.incoming() {
        match conn {
            Ok(conn) => {
                let _ = conn.set_read_timeout(Some(HANDOFF_TIMEOUT));
                let _ = conn.set_write_timeout(Some(HANDOFF_TIMEOUT));
                handle(&conn, &pager);
            }
            Err(e) => warn!(version = %pager.version, error = %e, "accepting a handoff connection"),
        }
    }
}

fn handle(conn: &UnixStream, pager: &Pager) {
    // Only the supervisor (this process's uid, or root) may hand sessions over or take them back.
    let caller = PeerCredentials::of(conn.as_fd())
        .map_err(|e| format!("the caller's credentials cannot be read: {e}"))
        .and_then(|peer| peer_auth::authorize(&CallerPolicy::owner_only(), &peer));
    if let Err(reason) = caller {
        warn!(version = %pager.version, %reason, "refused a handoff connection");
        let _ = handoff::reply(conn, Err(reason));
        return;
    }
    let (request, fds) = match handoff::recv_message(conn) {
        Ok(Incoming::Session(request, fds)) => (*request, fds),
        Ok(Incoming::GiveBack(id)) => {
            give_back(conn, pager, &id);
            return;
        }
        Err(e) => {
            warn!(version = %pager.version, error = %e, "unreadable handoff");
            let _ = handoff::reply(conn, Err(e.to_string()));
            return;
        }
    };
    let id = request.session_id.clone();
    let result = adopt(request, fds, pager);
    match &result {
        Ok(()) => {}
        Err(e) => warn!(session = %id, version = %pager.version, error = %e, "handoff refused"),
    }
    if let Err(e) = handoff::reply(conn, result) {
        warn!(session = %id, version = %pager.version, error = %e, "answering a handoff");
    }
}

/// Answers a supervisor's request for duplicates of a session's descriptors (it restarted and
/// lost its own): the worker that owns the session makes them.
fn give_back(conn: &UnixStream, pager: &Pager, id: &str) {
    let found =
        pager.registry.lock().get(id).filter(|e| e.shared.is_live()).map(|e| (e.worker(), e.token));
    let answer = match found {
        None => Err(format!("no session {id} is served here")),
        Some((worker, token)) => {
            let (tx, rx) = std::sync::mpsc::channel();
            pager.workers[worker].send(Command::GiveBack { token, reply: tx }).and_then(|()| {
                rx.recv_timeout(HANDOFF_TIMEOUT)
                    .map_err(|_| "the fault worker did not answer".to_string())?
            })
        }
    };
    let result = match &answer {
        Ok((request, fds)) => Ok((request, fds)),
        Err(e) => Err(e.clone()),
    };
    match handoff::reply_give_back(conn, result) {
        Ok(()) if answer.is_ok() => {
            info!(session = %id, version = %pager.version, "gave the session's descriptors back to the supervisor");
        }
        Ok(()) => {
            warn!(session = %id, version = %pager.version, error = ?answer.err(), "cannot give the session's descriptors back");
        }
        Err(e) => {
            warn!(session = %id, version = %pager.version, error = %e, "answering a give-back")
        }
    }
}

fn adopt(request: HandoffRequest, fds: SessionFds, pager: &Pager) -> Result<(), String> {
    if request.session_id.is_empty() || request.session_id.len() > 128 {
        return Err("session id must be 1-128 bytes".into());
    }
    if pager.registry.lock().get(&request.session_id).is_some_and(|e| e.shared.is_live()) {
        return Err(format!("session {} is already served here", request.session_id));
    }
    if !uffdpager::scm::is_userfaultfd(fds.uffd.as_fd()) {
        return Err("the first descriptor is not a userfaultfd".into());
    }
    // Checked and made non-blocking at the handshake already; again here, whoever sent it.
    uffdpager::uffd_fd::accept_received(fds.uffd.as_fd()).map_err(|e| e.to_string())?;
    let file = pager
        .memory_files
        .open(fds.memory_file)
        .map_err(|e| format!("mapping memory file {}: {e}", request.memory_file))?;
    // Check again what the supervisor checked: the regions must fit the file we map.
    let mappings: Vec<_> = request.regions.iter().map(|r| r.to_mapping()).collect();
    let regions = firecracker::validate(&mappings, file.mapped_len()).map_err(|e| e.to_string())?;

    let overlays = SessionOverlays::open(&request.overlays, fds.overlay, &regions)
        .map_err(|e| format!("overlays: {e}"))?;
    let removed_log = match &fds.removed_log {
        Some(fd) => Some(RemovedLog::open(fd).map_err(|e| e.to_string())?),
        None => None,
    };
    // SAFETY: `fds.uffd` is an open userfaultfd (checked above) that we own; ownership moves into
    // the Uffd, which closes it on drop.
    let uffd = unsafe { Uffd::from_raw_fd(fds.uffd.into_raw_fd()) };
    let shared = Arc::new(SessionShared::new(
        request.session_id.clone(),
        request.memory_file.clone(),
        regions,
        request.vmm_pid,
        request.connected_at_ms,
        pager.version.clone(),
    ));
    // A recording that does not fit is skipped with its reason, never served: the session is
    // then served on demand as without it.
    let prefetch = request
        .prefetch_working_set
        .as_deref()
        .map(|path| working_set::load_prefetch(path, &file, &shared.regions));
    let mut session = Session::new(
        Arc::clone(&shared),
        uffd,
        (fds.vmm_stream, request.vmm_fd),
        file,
        &request.removed,
        removed_log,
        Arc::clone(&pager.zero),
        request.faults,
    )
    .with_overlays(overlays)
    .with_fault_around(pager.fault_around_pages);
    session.start_recording(request.record_working_set.as_deref(), request.adopt, pager.record);
    session.start_prefetch(prefetch);
    let token = pager.registry.next_token();
    // Following the vCPUs, a session starts beside its VMM (its main thread, the one that sent
    // the handshake); the follower moves it once its vCPU is seen elsewhere.
    let worker = crate::follow::worker_beside(request.vmm_pid, &pager.worker_cpus)
        .unwrap_or_else(|| pager.registry.least_loaded_worker(pager.workers.len()));
    shared.set_worker(worker);
    pager.registry.lock().insert(
        request.session_id.clone(),
        Entry { shared: Arc::clone(&shared), token, completion: None },
    );
    let (tx, rx) = std::sync::mpsc::channel();
    let sent = pager.workers[worker].send(Command::Add {
        token,
        session: Box::new(session),
        adopt: request.adopt,
        reply: tx,
    });
    let result = sent.and_then(|()| {
        rx.recv_timeout(HANDOFF_TIMEOUT)
            .map_err(|_| "the fault worker did not answer".to_string())?
    });
    match result {
        Ok(()) => {
            info!(session = %request.session_id, version = %pager.version, worker, vmm_pid = request.vmm_pid,
                adopt = request.adopt, "session handed over");
            Ok(())
        }
        Err(e) => {
            pager.registry.lock().remove(&request.session_id);
            Err(e)
        }
    }
}
