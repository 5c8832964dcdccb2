//! A session's life on the supervisor's side: created PENDING with its VMM socket (its VMM's
//! connection is `session_connect.rs`'s), looked up, and deleted.

use std::sync::Arc;
use std::time::SystemTime;

use tracing::{info, warn};
use uffdpager::api::{
    CreateSessionRequest, GetSessionRequest, ListSessionsResponse, Session, SessionState,
};
use uffdpager::overlay;

use crate::core::{Core, Held};
use crate::inventory::InsertError;
use crate::session_record::{is_live, is_terminal, state_of};
use crate::session_view::state_name;
use crate::status::ServiceError;
use crate::{memory_file, runtime_state, session_id, session_socket, working_set};

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

#[cfg(test)]
#[path = "sessions_tests.rs"]
mod tests;
