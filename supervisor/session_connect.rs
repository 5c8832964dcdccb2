//! A session's first VMM connection: the handshake read and checked, the descriptors handed to
//! the active pager (retried when the pager dies during it), and the outcome recorded: SERVING,
//! ORPHANED (no pager can take it now) or FAILED (the VMM is refused, `refused_vmm.rs`).

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::sync::Arc;

use tokio::net::UnixStream;
use tracing::{info, instrument, warn};
use uffdpager::firecracker::Handshake;
use uffdpager::handoff::{self, HandoffRequest, SessionFds, VmmFd};
use uffdpager::overlay;

use crate::core::Core;
use crate::lifecycle::Lifecycle;
use crate::runtime_state::ConnectedMeta;
use crate::session_view::show_connected;
use crate::versions::HandoffGuard;
use crate::{refused_vmm, runtime_state, session_socket};

/// Attempts at a first handoff when the pager dies during it.
const HANDOFF_ATTEMPTS: u32 = 3;
/// How long a failed handoff waits to learn whether its pager died.
const DIED_CHECK: std::time::Duration = std::time::Duration::from_millis(500);

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

/// Whether a handoff failed because the connection to the pager was lost (the pager died, or is
/// dying), rather than because the pager refused the session or misspoke.
fn handoff_lost_the_pager(e: &handoff::HandoffError) -> bool {
    use handoff::HandoffError as E;
    matches!(e, E::Connect { .. } | E::Send(_) | E::Recv(_) | E::Closed | E::Io(_))
}

impl Core {
    /// The first VMM connection: handshake, then handoff to the active pager.
    #[instrument(skip_all, fields(session = %id))]
    pub async fn connect_session(
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
}
