//! A session's life on the supervisor's side: created PENDING with its VMM socket, connected by
//! the VMM's handshake, handed to the active pager (SERVING), looked up, and deleted.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::sync::Arc;
use std::time::SystemTime;

use tokio::net::UnixStream;
use tracing::{info, instrument, warn};
use uffdpager::api::{
    CreateSessionRequest, GetSessionRequest, ListSessionsResponse, Region, Session, SessionState,
};
use uffdpager::firecracker::Handshake;
use uffdpager::handoff::{self, HandoffRequest, SessionFds, VmmFd};
use uffdpager::overlay;

use crate::core::{Core, Held};
use crate::inventory::{is_live, is_terminal, state_of, InsertError};
use crate::lifecycle::Lifecycle;
use crate::runtime_state::ConnectedMeta;
use crate::status::ServiceError;
use crate::versions::HandoffGuard;
use crate::{memory_file, refused_vmm, runtime_state, session_id, session_socket, working_set};

/// Attempts at a first handoff when the pager dies during it.
const HANDOFF_ATTEMPTS: u32 = 3;
/// How long a failed handoff waits to learn whether its pager died.
const DIED_CHECK: std::time::Duration = std::time::Duration::from_millis(500);

/// The API's spelling of a session state, for messages: the generated name without its
/// `SESSION_STATE_` prefix ("SERVING").
pub fn state_name(state: SessionState) -> &'static str {
    let name = state.as_str_name();
    name.strip_prefix("SESSION_STATE_").unwrap_or(name)
}

impl Core {
    /// CreateSession: validates the id and the memory file, binds the VMM socket, and starts
    /// waiting for the VMM.
    pub async fn create_session(
        self: &Arc<Self>,
        req: CreateSessionRequest,
    ) -> Result<Session, ServiceError> {
        if self.is_closing() {
            return Err(ServiceError::ShuttingDown);
        }
        self.versions.check_can_serve()?;
        let generated = req.session_id.is_empty();
        let mut id = if generated { session_id::generate_session_id() } else { req.session_id };
        session_id::validate(&id)
            .map_err(|source| ServiceError::InvalidSessionId { id: id.clone(), source })?;
        if self.inventory.get(&id).is_some() {
            return Err(ServiceError::SessionExists(id)); // checked again under the lock below
        }
        let path = req.memory_file.clone();
        let memory = tokio::task::spawn_blocking(move || memory_file::open(&path))
            .await
            .map_err(|e| ServiceError::Internal(format!("opening the memory file: {e}")))??;
        let (inputs, file_len, max) =
            (overlay_inputs(&req.overlays), memory.len, self.config.max_overlay_bytes);
        let overlays = tokio::task::spawn_blocking(move || overlay::load(inputs, file_len, max))
            .await
            .map_err(|e| ServiceError::Internal(format!("reading the overlays: {e}")))??
            .map(Arc::new);
        let (record, prefetch, shown, file) = (
            req.record_working_set.clone(),
            req.prefetch_working_set.clone(),
            memory.path.clone(),
            memory.file.try_clone().map_err(|source| {
                ServiceError::io(format!("duplicating memory file {}", memory.path), source)
            })?,
        );
        let working_set = tokio::task::spawn_blocking(move || {
            working_set::check(&record, &prefetch, &shown, &file)
        })
        .await
        .map_err(|e| ServiceError::Internal(format!("checking the working-set fields: {e}")))??;
        let (overlay_count, overlay_bytes) = overlays
            .as_ref()
            .map(|o| (u32::try_from(o.spans.len()).unwrap_or(u32::MAX), o.bytes()))
            .unwrap_or_default();

        let mut held = self.held();
        let mut attempts = 0;
        let (session, listener, socket_path) = loop {
            let socket_path = session_socket::socket_path(&self.config.sessions_dir, &id)?;
            let mut listener = None;
            let inserted = self.inventory.insert_capped(&id, self.config.max_sessions, || {
                let l = session_socket::bind(&socket_path).map_err(|source| {
                    ServiceError::io(
                        format!("binding the session socket {}", socket_path.display()),
                        source,
                    )
                })?;
                if let Some(uid) = req.vmm_uid {
                    session_socket::give_to_vmm(&socket_path, uid).map_err(|source| {
                        let _ = std::fs::remove_file(&socket_path);
                        ServiceError::Io {
                            what: format!(
                                "giving the session socket {} to vmm_uid {uid}",
                                socket_path.display()
                            ),
                            source,
                        }
                    })?;
                }
                listener = Some(l);
                Ok(working_set.marked(Session {
                    state: SessionState::Pending as i32,
                    memory_file: memory.path.clone(),
                    socket_path: socket_path.display().to_string(),
                    created_at: Some(uffdpager::grpc::timestamp(SystemTime::now())),
                    labels: req.labels.clone(),
                    vmm_uid: req.vmm_uid,
                    overlay_count,
                    overlay_bytes,
                    ..Default::default()
                }))
            });
            match (inserted, listener) {
                (Ok(session), Some(l)) => break (session, l, socket_path),
                (Err(InsertError::Exists), _) if generated && attempts < 8 => {
                    attempts += 1;
                    id = session_id::generate_session_id();
                }
                (Err(InsertError::Exists), _) => return Err(ServiceError::SessionExists(id)),
                (Err(InsertError::Full { live }), _) => {
                    return Err(ServiceError::TooManySessions {
                        live,
                        limit: self.config.max_sessions,
                    })
                }
                (Err(InsertError::Make(e)), _) => return Err(e),
                (Ok(_), None) => return Err(ServiceError::Internal("socket not bound".into())),
            }
        };

        let memory_id =
            crate::vmm_fds::fd_id(std::os::fd::AsFd::as_fd(&memory.file)).unwrap_or_default();
        let core = self.clone();
        let (sid, file_len, setup_file) = (id.clone(), memory.len, memory.file);
        let accept = tokio::spawn(session_socket::accept_first(
            listener,
            socket_path.clone(),
            id.clone(),
            req.vmm_uid,
            move |stream| {
                let setup = tokio::spawn(core.clone().connect_session(
                    sid.clone(),
                    stream,
                    setup_file,
                    file_len,
                ));
                if let Some(h) = core.held().get_mut(&sid) {
                    // The listener is closed and its file gone: nobody else can connect.
                    h.socket_open = false;
                    h.accept = None;
                    h.setup = Some(setup.abort_handle());
                }
            },
        ));
        held.insert(
            id.clone(),
            Held {
                socket_path,
                socket_open: true,
                fds: None,
                overlays: overlays.clone(),
                working_set,
                request: None,
                accept: Some(accept.abort_handle()),
                setup: None,
            },
        );
        drop(held);
        self.metrics.session_created();
        runtime_state::write_session_meta(
            &self.config.sessions_dir,
            &session,
            overlays.as_deref(),
            memory_id,
        );
        info!(
            session = %id,
            memory_file = %session.memory_file,
            socket = %session.socket_path,
            vmm_uid = ?session.vmm_uid,
            overlays = overlay_count,
            overlay_bytes,
            "session created; waiting for the VMM",
        );
        Ok(session)
    }

    /// The first VMM connection: handshake, then handoff to the active pager.
    #[instrument(skip_all, fields(session = %id))]
    async fn connect_session(
        self: Arc<Self>,
        id: String,
        stream: UnixStream,
        memory_file: std::fs::File,
        file_len: u64,
    ) {
        let vmm_pid = stream
            .peer_cred()
            .ok()
            .and_then(|c| c.pid())
            .and_then(|p| u32::try_from(p).ok())
            .unwrap_or(0);
        // Taken now, so that a refusal later reaches this process and no other.
        let pidfd = refused_vmm::peer_pidfd(stream.as_fd(), vmm_pid);
        self.inventory.modify(&id, |r| r.session.vmm_pid = vmm_pid);
        info!(vmm_pid, "VMM connected; reading its handshake");
        let timeout = self.config.handshake_timeout;
        let read = session_socket::read_handshake(&stream, file_len, vmm_pid, timeout).await;
        let hs = match read {
            Ok(hs) => hs,
            Err(e) => {
                warn!(error = %e, vmm_pid, "handshake refused; the session FAILED");
                self.metrics.handshake_refusals.inc(&[e.reason()]);
                self.refuse_vmm(&id, e.to_string(), &pidfd, vmm_pid, e.sent_nothing()).await;
                return;
            }
        };
        let vmm = match session_socket::into_blocking(stream) {
            Ok(vmm) => vmm,
            Err(e) => {
                let error = format!("preparing the VMM stream for the pager: {e}");
                self.refuse_vmm(&id, error, &pidfd, vmm_pid, false).await;
                return;
            }
        };
        let (overlays, working_set) = self
            .held()
            .get(&id)
            .map(|h| (h.overlays.clone(), h.working_set.clone()))
            .unwrap_or_default();
        if let Some(o) = &overlays {
            if let Err(e) = overlay::check_regions(&o.spans, &hs.regions) {
                warn!(error = %e, "the overlays do not fit the VMM's regions; the session FAILED");
                self.fail_session(
                    &id,
                    format!("the overlays do not fit the VMM's regions: {e}"),
                    false,
                );
                return;
            }
        }
        let connected_at_ms = uffdpager::grpc::now_ms();
        // From here the session cannot be deleted until the pager has answered.
        let claimed = self.inventory.modify(&id, |r| r.step(Lifecycle::hand_over).is_ok());
        if !matches!(claimed, Some((true, _))) {
            return; // deleted meanwhile: dropping the fds closes the VMM's connection
        }
        let mut request = HandoffRequest {
            session_id: id.clone(),
            memory_file: self.inventory.get(&id).map(|s| s.memory_file).unwrap_or_default(),
            regions: hs.regions.clone(),
            vmm_pid: hs.vmm_pid,
            connected_at_ms,
            adopt: false,
            removed: vec![],
            overlays: overlays.as_ref().map(|o| o.spans.clone()).unwrap_or_default(),
            faults: 0,
            vmm_fd: VmmFd::Stream,
            record_working_set: working_set.record,
            prefetch_working_set: working_set.prefetch,
        };
        let overlay_fd = match overlays.as_ref().map(|o| o.fd.try_clone()).transpose() {
            Ok(fd) => fd,
            Err(e) => {
                self.fail_session(&id, format!("duplicating the overlay memfd: {e}"), false);
                return;
            }
        };
        // Recorded before any pager has it: whatever dies from here on (pager, supervisor, or
        // both), the next supervisor can have the session adopted (see `recover.rs`).
        let connected = ConnectedMeta {
            request: request.clone(),
            uffd_id: crate::vmm_fds::fd_id(hs.uffd.as_fd()).unwrap_or_default(),
            vmm_start_time: crate::vmm_fds::start_time(hs.vmm_pid).unwrap_or_default(),
        };
        runtime_state::update_session_meta(&self.config.sessions_dir, &id, |m| {
            m.connected = Some(connected);
        });
        let log_path = runtime_state::removed_log_path(&self.config.sessions_dir, &id);
        let mut fds = Some(session_fds(hs, memory_file, vmm, overlay_fd, &log_path));
        let mut attempt = 0;
        // The reservation is held until the outcome is recorded, so that the version is not
        // stopped meanwhile.
        loop {
            attempt += 1;
            let reservation = match self.versions.begin_handoff(self.config.handoff_wait).await {
                Ok(r) => r,
                Err(e) => {
                    warn!(error = %e, "no pager can take the session now; it is ORPHANED until one can");
                    if let Some(fds) = fds.take() {
                        let why = format!(
                            "handing the session to a pager: {e}; ORPHANED until a pager version \
                             is available (deploy, respawn, restart)"
                        );
                        self.record_orphaned(&id, fds, &request, why);
                    }
                    return;
                }
            };
            let version = reservation.version.clone();
            let socket = reservation.process.paths.handoff_socket.clone();
            let timeout = self.config.handoff_timeout;
            let (req, sending) = (request.clone(), fds.take());
            let sent = tokio::task::spawn_blocking(move || {
                let fds = sending.ok_or_else(|| "no descriptors to send".to_string())?;
                let r = handoff::send_session(&socket, &req, &fds, timeout);
                Ok::<_, String>((fds, r))
            })
            .await;
            let result = match sent {
                Ok(Ok((sent_fds, r))) => {
                    fds = Some(sent_fds);
                    r
                }
                Ok(Err(e)) => {
                    let error = format!("the handoff failed: {e}");
                    self.refuse_vmm(&id, error, &pidfd, vmm_pid, false).await;
                    return;
                }
                Err(e) => {
                    let error = format!("the handoff task failed: {e}");
                    self.refuse_vmm(&id, error, &pidfd, vmm_pid, false).await;
                    return;
                }
            };
            let mut lost_pager = false;
            let error = match (result, fds.take()) {
                (Ok(()), Some(sent)) => {
                    let Some(sent) = self.record_serving(&id, &reservation, sent, &request) else {
                        return;
                    };
                    fds = Some(sent);
                    "the pager exited right after taking the session".to_string()
                }
                (Ok(()), None) => return,
                (Err(e), sent) => {
                    fds = sent;
                    lost_pager = handoff_lost_the_pager(&e);
                    e.to_string()
                }
            };
            // A pager that died during the handoff may have begun serving the session: the next
            // one adopts it (waking every range), as after any pager crash. A connection lost
            // mid-handoff is taken for a death too (the exit may be noticed a moment later): the
            // VMM is never stopped for its pager's fault.
            let died =
                tokio::time::timeout(DIED_CHECK, reservation.process.wait_exit()).await.is_ok()
                    || lost_pager;
            if died && attempt < HANDOFF_ATTEMPTS && fds.is_some() {
                warn!(version = %version, error, "the pager died during the handoff; handing the session to its successor");
                request.adopt = true;
                continue;
            }
            if let (true, Some(kept)) = (died, fds.take()) {
                warn!(version = %version, error, "the pagers keep dying during the handoff; the session is ORPHANED");
                let why = format!(
                    "handing the session to pager version {version}: {error}; ORPHANED until a \
                     pager version is available"
                );
                self.record_orphaned(&id, kept, &request, why);
                return;
            }
            warn!(version = %version, error, "handoff failed; the session FAILED");
            let error = format!("handing the session to pager version {version}: {error}");
            self.refuse_vmm(&id, error, &pidfd, vmm_pid, false).await;
            return;
        }
    }

    /// Fails a session whose VMM connected but will not be served, and stops that VMM unless
    /// the operator said otherwise or it sent nothing (see `refused_vmm.rs`): the record keeps
    /// the VMM's pid and says what became of it.
    async fn refuse_vmm(
        &self,
        id: &str,
        error: String,
        pidfd: &std::io::Result<crate::pidfd::PidFd>,
        vmm_pid: u32,
        sent_nothing: bool,
    ) {
        let verdict = refused_vmm::verdict(
            self.config.refused_vmm,
            vmm_pid,
            std::process::id(),
            sent_nothing,
        );
        let error = if sent_nothing {
            error
        } else {
            let outcome = refused_vmm::apply(verdict, pidfd, vmm_pid).await;
            warn!(session = %id, vmm_pid, outcome, "refused VMM");
            format!("{error}; {outcome}")
        };
        self.fail_session(id, error, false);
    }

    /// Records a handed-over session as SERVING on `reservation`'s version, keeping `sent` (the
    /// supervisor's copies) and the request for a later re-adoption. Done under `held` (the lock
    /// a pager's exit takes first to find the sessions to re-adopt), and only if the pager still
    /// runs: a pager that dies later finds the session SERVING with its descriptors; if it died
    /// already, the descriptors come back (None: recorded).
    fn record_serving(
        &self,
        id: &str,
        reservation: &HandoffGuard,
        sent: SessionFds,
        request: &HandoffRequest,
    ) -> Option<SessionFds> {
        let mut held = self.held();
        if reservation.process.exit().is_some() {
            return Some(sent);
        }
        if let Some(h) = held.get_mut(id) {
            h.fds = Some(sent);
            h.request = Some(request.clone());
            h.setup = None;
        }
        let version = &reservation.version;
        let total_bytes: u64 = request.regions.iter().map(|r| r.size).sum();
        self.inventory.modify(id, |r| {
            if let Err(e) = r.step(Lifecycle::serve) {
                warn!(session = %id, error = %e, "served, though not being handed over");
            }
            r.serving_since = Some(tokio::time::Instant::now());
            let s = &mut r.session;
            s.pager_version = version.clone();
            show_connected(s, request);
        });
        drop(held);
        info!(
            version = %version,
            vmm_pid = request.vmm_pid,
            total_bytes,
            regions = request.regions.len(),
            adopt = request.adopt,
            "session SERVING",
        );
        None
    }

    /// Records a connected session that no pager can take now as ORPHANED, keeping its
    /// descriptors and handoff for the version that adopts it later.
    fn record_orphaned(&self, id: &str, fds: SessionFds, request: &HandoffRequest, why: String) {
        let mut held = self.held();
        let Some(h) = held.get_mut(id) else { return }; // deleted meanwhile: the fds close
        h.fds = Some(fds);
        h.request = Some(request.clone());
        h.setup = None;
        self.inventory.modify(id, |r| {
            if let Err(e) = r.step(Lifecycle::orphan) {
                warn!(session = %id, error = %e, "ORPHANED, though not being handed over");
            }
            let s = &mut r.session;
            s.error = why;
            show_connected(s, request);
        });
        drop(held);
        warn!(vmm_pid = request.vmm_pid, "session ORPHANED");
    }

    /// GetSession: the record, with live figures from the owning pager when it serves it.
    pub async fn get_session(&self, req: GetSessionRequest) -> Result<Session, ServiceError> {
        let id = req.session_id;
        let record =
            self.inventory.record(&id).ok_or_else(|| ServiceError::SessionNotFound(id.clone()))?;
        if !is_live(record.state()) {
            return Ok(record.session);
        }
        let version = record.session.pager_version.clone();
        let Ok(process) = self.versions.owner(&version) else { return Ok(record.session) };
        let mut call = tonic::Request::new(GetSessionRequest { session_id: id.clone() });
        call.set_timeout(self.config.pager_call_timeout);
        match process.client().get_session(call).await {
            Ok(live) => Ok(self.apply_live(&version, &live.into_inner()).unwrap_or(record.session)),
            Err(s) => {
                warn!(
                    session = %id,
                    version = %version,
                    error = %s.message(),
                    "the pager did not answer GetSession; showing the last known figures",
                );
                Ok(record.session)
            }
        }
    }

    /// ListSessions.
    pub fn list_sessions(&self) -> ListSessionsResponse {
        let (sessions, active_version) = self.inventory.list();
        ListSessionsResponse {
            sessions,
            active_version,
            host_available_memory_bytes: crate::metrics::host_available_memory(),
        }
    }

    /// DeleteSession: cancels a PENDING session, forgets a finished one; refuses a live one.
    pub async fn delete_session(&self, id: String) -> Result<Session, ServiceError> {
        let removed = {
            let mut held = self.held();
            let removed = self.inventory.remove_if(&id, |r| match r.state() {
                s @ (SessionState::Serving | SessionState::Completing) => {
                    Err(ServiceError::WrongState {
                        id: id.clone(),
                        state: state_name(s),
                        hint:
                            "graduate it first (CompleteSession); deleting it would freeze its VM",
                    })
                }
                SessionState::Orphaned => Err(ServiceError::WrongState {
                    id: id.clone(),
                    state: "ORPHANED",
                    hint: "its VM waits for a pager: deploy a version and it is adopted (it ends \
                           by itself once its VMM exits)",
                }),
                SessionState::Pending if r.handing_off() => {
                    Err(ServiceError::HandingOff(id.clone()))
                }
                _ => Ok(()),
            });
            let session = removed.ok_or_else(|| ServiceError::SessionNotFound(id.clone()))??;
            (session, held.remove(&id))
        };
        let (session, held) = removed;
        runtime_state::remove_session_meta(&self.config.sessions_dir, &id);
        if let Some(mut h) = held {
            if let Some(setup) = h.setup.take() {
                setup.abort();
            }
            if let Some(accept) = h.accept.take() {
                accept.abort();
            }
            if h.socket_open {
                let _ = std::fs::remove_file(&h.socket_path);
            }
        }
        let state = state_of(&session);
        if is_terminal(state) && !session.pager_version.is_empty() {
            self.end_session(&session.pager_version, &id).await;
        }
        info!(session = %id, state = state_name(state), "session deleted");
        Ok(session)
    }
}

/// What a connected session shows of its handshake: connection time, VMM pid, size, and its
/// regions in memory-file order, the order Firecracker lists guest memory in (the handshake's
/// validation sorted them by host address).
pub fn show_connected(s: &mut Session, request: &HandoffRequest) {
    s.connected_at = Some(uffdpager::grpc::timestamp_ms(request.connected_at_ms));
    s.vmm_pid = request.vmm_pid;
    s.total_bytes = request.regions.iter().map(|r| r.size).sum();
    s.regions = regions_in_file_order(request.regions.iter().map(to_proto_region).collect());
}

/// Regions sorted by their offset in the memory file.
pub fn regions_in_file_order(mut regions: Vec<Region>) -> Vec<Region> {
    regions.sort_by_key(|r| r.offset);
    regions
}

/// The descriptors handed to the pager; the supervisor keeps them as its own copies afterwards.
/// A new removed-ranges log (a file at `log_path`, which outlives every process) goes with them,
/// so that a pager that adopts the session after a crash knows which ranges the VMM discarded.
fn session_fds(
    hs: Handshake,
    memory_file: std::fs::File,
    vmm: StdUnixStream,
    overlay: Option<OwnedFd>,
    log_path: &std::path::Path,
) -> SessionFds {
    // A file left by an earlier session of this id that was forgotten uncleanly is replaced.
    let _ = std::fs::remove_file(log_path);
    let removed_log = match uffdpager::removed_log::RemovedLog::create_file(log_path) {
        Ok((_mapping, fd)) => Some(fd),
        Err(e) => {
            tracing::warn!(error = %e, path = %log_path.display(), "no removed-ranges log: a re-adopted session could not tell discarded pages");
            None
        }
    };
    SessionFds {
        uffd: hs.uffd,
        memory_file: OwnedFd::from(memory_file),
        vmm_stream: OwnedFd::from(vmm),
        removed_log,
        overlay,
    }
}

/// The overlays of a CreateSession request, as the checks take them.
fn overlay_inputs(overlays: &[uffdpager::api::Overlay]) -> Vec<overlay::OverlayInput> {
    use uffdpager::api::overlay::Source;
    overlays
        .iter()
        .map(|o| overlay::OverlayInput {
            offset: o.offset,
            source: match &o.source {
                Some(Source::Data(d)) => overlay::OverlaySource::Data(d.clone()),
                Some(Source::Path(p)) => overlay::OverlaySource::Path(p.clone()),
                None => overlay::OverlaySource::Missing,
            },
        })
        .collect()
}

pub fn to_proto_region(r: &uffdpager::firecracker::Region) -> Region {
    Region { base_host_virt_addr: r.base, size: r.size, offset: r.offset, page_size: r.page_size }
}

#[cfg(test)]
#[path = "sessions_tests.rs"]
mod tests;

/// Whether a handoff failed because the connection to the pager was lost (the pager died, or is
/// dying), rather than because the pager refused the session or misspoke.
fn handoff_lost_the_pager(e: &handoff::HandoffError) -> bool {
    use handoff::HandoffError as E;
    matches!(e, E::Connect { .. } | E::Send(_) | E::Recv(_) | E::Closed | E::Io(_))
}
