//! Supervisor → pager session handoff: file descriptors cannot travel over gRPC, so a session
//! reaches its pager over a Unix `SOCK_SEQPACKET` socket, one connection per handoff:
//!
//! 1. the supervisor sends ONE message: a JSON [`HandoffRequest`] with three to five descriptors
//!    attached (`SCM_RIGHTS`), in this order: the userfaultfd, the memory file (read-only), the VMM
//!    stream, the session's removed-ranges log (`crate::removed_log`, a memfd), if any, and last,
//!    when the request lists overlays, the sealed memfd of their bytes (`crate::overlay`);
//! 2. the pager answers ONE message: a JSON [`HandoffReply`], sent only once the session is being
//!    served (or refused, with the reason).
//!
//! The supervisor keeps its own copies of the descriptors, so that a session whose pager died can
//! be handed to another pager (`adopt`).
//!
//! **Give-back.** A supervisor restarted while its pagers ran has lost those copies. It asks each
//! pager for them on the same socket: it sends ONE message `{"give_back": "<session id>"}` with no
//! descriptor, and the pager answers ONE [`GiveBackReply`] with the session as a
//! [`HandoffRequest`] (its regions, VMM pid, faults so far, overlays...) and duplicates of its
//! descriptors attached in the handoff's order. The supervisor is then exactly as able to have
//! the session re-adopted as before its restart.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::Path;
use std::time::Duration;

use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
use serde::{Deserialize, Serialize};

use crate::firecracker::Region;
use crate::overlay::OverlaySpan;
use crate::scm;

/// Largest handoff message (a request lists regions and removed ranges).
pub const MAX_MESSAGE_BYTES: usize = 128 * 1024;

/// What the supervisor tells a pager about a session it hands over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoffRequest {
    pub session_id: String,
    /// The memory file's path, for display; the pager reads the descriptor, not the path.
    pub memory_file: String,
    pub regions: Vec<Region>,
    pub vmm_pid: u32,
    /// Handshake time, milliseconds since the Unix epoch.
    pub connected_at_ms: u64,
    /// The session was being served by a pager that died: wake every registered range once, so
    /// faults read but never served by the dead pager are raised again.
    #[serde(default)]
    pub adopt: bool,
    /// Guest address ranges `[start, end)` the VMM discarded (balloon) that must read as zero.
    #[serde(default)]
    pub removed: Vec<(u64, u64)>,
    /// The session's overlays: pages served from the overlay memfd (the last descriptor)
    /// instead of the memory file.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overlays: Vec<OverlaySpan>,
    /// Faults earlier pagers served for this session (its `faults` figure goes on from here).
    #[serde(default)]
    pub faults: u64,
    /// What the third descriptor is: the VMM's stream (EOF: the VMM is gone) or, for a session a
    /// supervisor recovered from the VMM itself, a pidfd of the VMM (readable: it exited).
    #[serde(default)]
    pub vmm_fd: VmmFd,
    /// CreateSession's `record_working_set`, checked by the supervisor: record the VM's
    /// first-touch order to this path (see `crate::working_set`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record_working_set: Option<String>,
    /// CreateSession's `prefetch_working_set`, checked by the supervisor: prefetch the
    /// recording at this path (the pager checks it again against the session it gets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefetch_working_set: Option<String>,
}

/// What tells a pager that a session's VMM is gone.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmmFd {
    /// The VMM's connection to the session socket: EOF (`EPOLLRDHUP`) when the VMM exits.
    #[default]
    Stream,
    /// A pidfd of the VMM process: readable (`EPOLLIN`) once it has exited.
    Pidfd,
}

/// The supervisor asks for duplicates of a session's descriptors back (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GiveBackRequest {
    pub give_back: String,
}

/// The pager's answer to a give-back: the session, with four descriptors attached when `ok`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GiveBackReply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<HandoffRequest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What arrived on a pager's handoff socket.
#[derive(Debug)]
pub enum Incoming {
    /// A session to serve.
    Session(Box<HandoffRequest>, SessionFds),
    /// A supervisor's request for a session's descriptors back.
    GiveBack(String),
}

/// The pager's answer to a handoff.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoffReply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The descriptors of a handed-over session.
#[derive(Debug)]
pub struct SessionFds {
    pub uffd: OwnedFd,
    pub memory_file: OwnedFd,
    pub vmm_stream: OwnedFd,
    /// The session's removed-ranges log (a memfd the supervisor keeps), if any.
    pub removed_log: Option<OwnedFd>,
    /// The sealed memfd of the session's overlay bytes; sent only with overlays listed.
    pub overlay: Option<OwnedFd>,
}

#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error("connecting to the pager's handoff socket {path}: {source}")]
    Connect { path: String, source: nix::errno::Errno },
    #[error("sending the session to the pager: {0}")]
    Send(nix::errno::Errno),
    #[error("receiving a handoff message: {0}")]
    Recv(nix::errno::Errno),
    #[error("the peer closed the handoff connection without answering")]
    Closed,
    #[error("handoff message is not valid: {0}")]
    Malformed(String),
    #[error("handoff carried {0} descriptors; 3 or 4 are expected (uffd, memory file, VMM stream, removed log), and one more with overlays")]
    WrongFdCount(usize),
    #[error("the request lists overlays, but no overlay memfd was attached")]
    NoOverlayData,
    #[error("the pager refused the session: {0}")]
    Refused(String),
    #[error("socket setup: {0}")]
    Io(#[from] io::Error),
}

/// Hands a session to the pager listening on `socket`, and waits (at most `timeout`) until the
/// pager says it serves it. Blocking.
pub fn send_session(
    socket: &Path,
    request: &HandoffRequest,
    fds: &SessionFds,
    timeout: Duration,
) -> Result<(), HandoffError> {
    let stream = connect_seqpacket(socket, timeout)?;
    let bytes = serde_json::to_vec(request).expect("handoff request serialises");
    let attached = attached_fds(request, fds)?;
    scm::send_with_fds(stream.as_fd(), &bytes, &attached).map_err(HandoffError::Send)?;
    let reply =
        scm::recv_with_fds(stream.as_fd(), MAX_MESSAGE_BYTES).map_err(HandoffError::Recv)?;
    if reply.bytes.is_empty() {
        return Err(HandoffError::Closed);
    }
    let reply: HandoffReply =
        serde_json::from_slice(&reply.bytes).map_err(|e| HandoffError::Malformed(e.to_string()))?;
    if reply.ok {
        Ok(())
    } else {
        Err(HandoffError::Refused(reply.error.unwrap_or_else(|| "no reason given".into())))
    }
}

/// Receives one handoff request on an accepted connection. Blocking.
pub fn recv_session(conn: &StdUnixStream) -> Result<(HandoffRequest, SessionFds), HandoffError> {
    match recv_message(conn)? {
        Incoming::Session(request, fds) => Ok((*request, fds)),
        Incoming::GiveBack(_) => Err(HandoffError::WrongFdCount(0)),
    }
}

/// Receives one message on an accepted connection of a pager's handoff socket: a session, or a
/// give-back request (no descriptors). Blocking.
pub fn recv_message(conn: &StdUnixStream) -> Result<Incoming, HandoffError> {
    let msg = scm::recv_with_fds(conn.as_fd(), MAX_MESSAGE_BYTES).map_err(HandoffError::Recv)?;
    decode_message(msg)
}

/// Decodes a received handoff message (pure but for the descriptors it takes over: those it
/// does not return are closed with it).
pub fn decode_message(msg: scm::Received) -> Result<Incoming, HandoffError> {
    if msg.bytes.is_empty() && msg.fds.is_empty() {
        return Err(HandoffError::Closed);
    }
    if msg.truncated {
        return Err(HandoffError::Malformed("message truncated".into()));
    }
    if msg.fds.is_empty() && !msg.fds_truncated {
        if let Ok(ask) = serde_json::from_slice::<GiveBackRequest>(&msg.bytes) {
            return Ok(Incoming::GiveBack(ask.give_back));
        }
    }
    let request: HandoffRequest =
        serde_json::from_slice(&msg.bytes).map_err(|e| HandoffError::Malformed(e.to_string()))?;
    let fds = session_fds(msg.fds, msg.fds_truncated, !request.overlays.is_empty())?;
    Ok(Incoming::Session(Box::new(request), fds))
}

/// The descriptors of a session, in the handoff's order: three or four, and with overlays
/// listed one more, the overlay memfd, last.
fn session_fds(
    fds: Vec<OwnedFd>,
    truncated: bool,
    has_overlays: bool,
) -> Result<SessionFds, HandoffError> {
    let n = fds.len();
    let mut all = fds;
    let overlay = if !has_overlays || n < 4 { None } else { all.pop() };
    if has_overlays && overlay.is_none() {
        return Err(HandoffError::WrongFdCount(n));
    }
    let mut fds = all.into_iter();
    match (fds.next(), fds.next(), fds.next(), fds.next(), fds.next()) {
        (Some(uffd), Some(memory_file), Some(vmm_stream), removed_log, None) if !truncated => {
            Ok(SessionFds { uffd, memory_file, vmm_stream, removed_log, overlay })
        }
        _ => Err(HandoffError::WrongFdCount(n)),
    }
}

/// The descriptors to attach for `request`, in the handoff's order (see [`session_fds`]).
fn attached_fds<'a>(
    request: &HandoffRequest,
    fds: &'a SessionFds,
) -> Result<Vec<BorrowedFd<'a>>, HandoffError> {
    let mut attached = vec![fds.uffd.as_fd(), fds.memory_file.as_fd(), fds.vmm_stream.as_fd()];
    attached.extend(fds.removed_log.as_ref().map(|f| f.as_fd()));
    if !request.overlays.is_empty() {
        attached.push(fds.overlay.as_ref().ok_or(HandoffError::NoOverlayData)?.as_fd());
    }
    Ok(attached)
}

/// Asks the pager listening on `socket` for duplicates of session `id`'s descriptors (see the
/// module doc). Blocking; at most `timeout` per step.
pub fn take_back(
    socket: &Path,
    id: &str,
    timeout: Duration,
) -> Result<(HandoffRequest, SessionFds), HandoffError> {
    let stream = connect_seqpacket(socket, timeout)?;
    let ask = serde_json::to_vec(&GiveBackRequest { give_back: id.to_string() })
        .expect("give-back request serialises");
    scm::send_with_fds(stream.as_fd(), &ask, &[]).map_err(HandoffError::Send)?;
    let msg = scm::recv_with_fds(stream.as_fd(), MAX_MESSAGE_BYTES).map_err(HandoffError::Recv)?;
    if msg.bytes.is_empty() {
        return Err(HandoffError::Closed);
    }
    let reply: GiveBackReply =
        serde_json::from_slice(&msg.bytes).map_err(|e| HandoffError::Malformed(e.to_string()))?;
    let session = match (reply.ok, reply.session) {
        (true, Some(session)) => session,
        (_, _) => {
            return Err(HandoffError::Refused(
                reply.error.unwrap_or_else(|| "no reason given".into()),
            ))
        }
    };
    let fds = session_fds(msg.fds, msg.fds_truncated, !session.overlays.is_empty())?;
    if session.session_id != id {
        return Err(HandoffError::Malformed(format!(
            "asked for session {id}, got {}",
            session.session_id
        )));
    }
    Ok((session, fds))
}

/// Answers a give-back: the session and its descriptors, or why not. Blocking.
pub fn reply_give_back(
    conn: &StdUnixStream,
    result: Result<(&HandoffRequest, &SessionFds), String>,
) -> Result<(), HandoffError> {
    let (reply, attached) = match result {
        Ok((session, fds)) => match attached_fds(session, fds) {
            Ok(attached) => {
                (GiveBackReply { ok: true, session: Some(session.clone()), error: None }, attached)
            }
            Err(e) => {
                (GiveBackReply { ok: false, session: None, error: Some(e.to_string()) }, vec![])
            }
        },
        Err(e) => (GiveBackReply { ok: false, session: None, error: Some(e) }, vec![]),
    };
    let bytes = serde_json::to_vec(&reply).expect("give-back reply serialises");
    scm::send_with_fds(conn.as_fd(), &bytes, &attached).map_err(HandoffError::Send)?;
    Ok(())
}

/// Connects to a pager's handoff socket, with `timeout` on every later read and write.
fn connect_seqpacket(socket: &Path, timeout: Duration) -> Result<StdUnixStream, HandoffError> {
    let sock = socket_seqpacket()?;
    let addr = UnixAddr::new(socket)
        .map_err(|source| HandoffError::Connect { path: socket.display().to_string(), source })?;
    connect(std::os::fd::AsRawFd::as_raw_fd(&sock), &addr)
        .map_err(|source| HandoffError::Connect { path: socket.display().to_string(), source })?;
    let stream = StdUnixStream::from(sock);
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    Ok(stream)
}

/// Answers a handoff request. Blocking.
pub fn reply(conn: &StdUnixStream, result: Result<(), String>) -> Result<(), HandoffError> {
    let reply = match result {
        Ok(()) => HandoffReply { ok: true, error: None },
        Err(e) => HandoffReply { ok: false, error: Some(e) },
    };
    let bytes = serde_json::to_vec(&reply).expect("handoff reply serialises");
    scm::send_with_fds(conn.as_fd(), &bytes, &[]).map_err(HandoffError::Send)?;
    Ok(())
}

/// Binds a `SOCK_SEQPACKET` listener at `path` (replacing a stale socket file), mode 0600.
pub fn bind_listener(path: &Path) -> io::Result<std::os::unix::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::remove_file(path);
    let sock = socket_seqpacket()?;
    let addr = UnixAddr::new(path).map_err(io::Error::from)?;
    nix::sys::socket::bind(std::os::fd::AsRawFd::as_raw_fd(&sock), &addr)
        .map_err(io::Error::from)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    nix::sys::socket::listen(&sock, nix::sys::socket::Backlog::new(128).expect("valid backlog"))
        .map_err(io::Error::from)?;
    Ok(std::os::unix::net::UnixListener::from(sock))
}

fn socket_seqpacket() -> io::Result<OwnedFd> {
    socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None)
        .map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> HandoffRequest {
        HandoffRequest {
            session_id: "vm-1".into(),
            memory_file: "/snap/mem".into(),
            regions: vec![Region { base: 0x10000, size: 0x2000, offset: 0, page_size: 4096 }],
            vmm_pid: 42,
            connected_at_ms: 1,
            adopt: false,
            removed: vec![(0x10000, 0x11000)],
            overlays: vec![],
            faults: 12,
            vmm_fd: VmmFd::Stream,
            record_working_set: None,
            prefetch_working_set: Some("/snap/ws".into()),
        }
    }

    fn fds() -> SessionFds {
        let f = || OwnedFd::from(tempfile::tempfile().unwrap());
        SessionFds {
            uffd: f(),
            memory_file: f(),
            vmm_stream: f(),
            removed_log: Some(f()),
            overlay: Some(f()),
        }
    }

    #[test]
    fn a_session_crosses_with_its_three_descriptors_and_gets_an_answer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.sock");
        let listener = bind_listener(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (conn, _) = listener.accept().unwrap();
            let (req, _fds) = recv_session(&conn).unwrap();
            reply(&conn, Ok(())).unwrap();
            req
        });
        send_session(&path, &request(), &fds(), Duration::from_secs(5)).unwrap();
        assert_eq!(server.join().unwrap(), request());
    }

    #[test]
    fn a_session_with_overlays_crosses_with_their_memfd_last() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.sock");
        let listener = bind_listener(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (conn, _) = listener.accept().unwrap();
            let got = recv_session(&conn);
            reply(&conn, Ok(())).unwrap();
            got.unwrap()
        });
        let mut req = request();
        req.overlays = vec![OverlaySpan { offset: 4096, len: 4096, data_offset: 0 }];
        let mut sent = fds();
        let mut marked = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut marked, b"overlay").unwrap();
        sent.overlay = Some(OwnedFd::from(marked));
        send_session(&path, &req, &sent, Duration::from_secs(5)).unwrap();
        let (got, fds) = server.join().unwrap();
        assert_eq!(got, req);
        assert!(fds.removed_log.is_some());
        let overlay = std::fs::File::from(fds.overlay.expect("the overlay memfd"));
        assert_eq!(overlay.metadata().unwrap().len(), 7, "the last descriptor is the overlay's");
    }

    #[test]
    fn a_refusal_carries_the_pagers_reason() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.sock");
        let listener = bind_listener(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (conn, _) = listener.accept().unwrap();
            let _ = recv_session(&conn).unwrap();
            reply(&conn, Err("memory file unreadable".into())).unwrap();
        });
        let err = send_session(&path, &request(), &fds(), Duration::from_secs(5)).unwrap_err();
        server.join().unwrap();
        assert!(err.to_string().contains("memory file unreadable"), "{err}");
    }

    #[test]
    fn a_pager_gives_a_sessions_descriptors_back_on_request() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.sock");
        let listener = bind_listener(&path).unwrap();
        let server = std::thread::spawn(move || {
            for answer in [true, false] {
                let (conn, _) = listener.accept().unwrap();
                let Incoming::GiveBack(id) = recv_message(&conn).unwrap() else {
                    panic!("a give-back request expected")
                };
                assert_eq!(id, "vm-1");
                let (req, fds) = (request(), fds());
                let result = if answer { Ok((&req, &fds)) } else { Err("no such session".into()) };
                reply_give_back(&conn, result).unwrap();
            }
        });
        let (got, fds) = take_back(&path, "vm-1", Duration::from_secs(5)).unwrap();
        assert_eq!(got, request());
        assert!(fds.removed_log.is_some());
        let err = take_back(&path, "vm-1", Duration::from_secs(5)).unwrap_err();
        assert!(err.to_string().contains("no such session"), "{err}");
        server.join().unwrap();
    }

    #[test]
    fn a_request_from_an_older_supervisor_still_parses() {
        let old =
            r#"{"session_id":"a","memory_file":"/m","regions":[],"vmm_pid":1,"connected_at_ms":2}"#;
        let req: HandoffRequest = serde_json::from_str(old).unwrap();
        assert_eq!((req.faults, req.vmm_fd, req.adopt), (0, VmmFd::Stream, false));
    }

    #[test]
    fn no_listener_is_a_connect_error_naming_the_socket() {
        let err = send_session(
            Path::new("/nonexistent/h.sock"),
            &request(),
            &fds(),
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/h.sock"), "{err}");
    }
}
