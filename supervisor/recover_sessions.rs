//! The sessions of an earlier run, put back into the inventory at startup (`recover.rs`):
//! those a taken-over pager serves, with duplicates of their descriptors given back by the pager
//! (or, failing that, taken from their VMM); and connected ones no running pager lists, taken
//! back from their VMM and listed ORPHANED (or ENDED, or FAILED).

use std::path::PathBuf;
use std::sync::Arc;

use tracing::{info, warn};
use uffdpager::api::{Session, SessionState};
use uffdpager::handoff::{self, HandoffRequest, SessionFds};

use crate::core::{Core, Held};
use crate::pagers::PagerProcess;
use crate::runtime_state::{self, ConnectedMeta, SessionMeta};
use crate::session_id;
use crate::session_record::state_of;
use crate::session_view::{regions_in_file_order, show_connected};
use crate::vmm_fds::{self, VmmFdsError};

impl Core {
    /// A connected session no running pager lists: listed ORPHANED with its descriptors taken
    /// back from its VMM, or ENDED (its VMM exited), or FAILED (they cannot be taken). Returns
    /// whether it is ORPHANED.
    pub async fn recover_unserved(&self, meta: SessionMeta, connected: ConnectedMeta) -> bool {
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
    pub async fn take_back(
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

    /// Puts a session a recovered pager serves back into the inventory, with the duplicates of
    /// its descriptors given back (`back`), if any.
    pub fn rebuild_session(
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
                if crate::session_record::is_terminal(state_of(&s)) {
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
