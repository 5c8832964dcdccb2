//! A session's VMM socket (`DIR/sessions/<id>.sock`, Firecracker's `backend_path`): bound at
//! CreateSession, it takes exactly ONE VMM connection, and then stops listening (the listener is
//! closed and the socket file removed), so that a second VMM restored onto it fails at connect
//! instead of hanging on its first page fault.
//!
//! The handshake (a JSON array of regions with the uffd attached) is read asynchronously, on
//! the socket's readiness (no thread per pending connection: a thousand VMMs that connect and
//! say nothing cost a thousand idle sockets, not a thousand threads), piece by piece until the
//! JSON is whole (see `uffdpager::firecracker::Partial`), under one deadline.

use std::fmt;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener as StdUnixListener, UnixStream as StdUnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::{UnixListener, UnixStream};
use tracing::{info, warn};
use uffdpager::accept_backoff::{is_resource_exhaustion, Pacing};
use uffdpager::firecracker::{Handshake, HandshakeError, Partial, Progress};

use crate::status::ServiceError;

/// Longest path a Unix socket address holds (`sun_path` less its terminating NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// `DIR/sessions/<id>.sock`, refused if too long for a Unix socket address.
pub fn socket_path(sessions_dir: &Path, id: &str) -> Result<PathBuf, ServiceError> {
    let path = sessions_dir.join(format!("{id}.sock"));
    let len = path.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(ServiceError::SocketPathTooLong { path: path.display().to_string(), len });
    }
    Ok(path)
}

/// Binds the session socket at `path` (mode 0600), replacing a stale socket file left by an
/// earlier run. Non-blocking, ready for tokio. Must run inside a tokio runtime.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "a file that is not a socket is in the way",
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = StdUnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    listener.set_nonblocking(true)?;
    UnixListener::from_std(listener)
}

/// Removes the socket file at `path` if it is still a socket (never anything else).
pub fn unlink(path: &Path) {
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(path);
    }
}

/// Gives the session socket at `path` to `uid` (CreateSession's `vmm_uid`), keeping mode 0600:
/// a VMM jailed as that uid can connect (through a hard link or bind mount of the socket into
/// its jail), nobody else but root.
pub fn give_to_vmm(path: &Path, uid: u32) -> io::Result<()> {
    std::os::unix::fs::chown(path, Some(uid), None)
}

/// Whether a connection from `peer_uid` may be the session's VMM: any uid when the session
/// names none, otherwise only that one (root too is refused: a jailed VMM is never root).
pub fn admits_vmm(expected: Option<u32>, peer_uid: Option<u32>) -> Result<(), String> {
    match (expected, peer_uid) {
        (None, _) => Ok(()),
        (Some(want), Some(uid)) if uid == want => Ok(()),
        (Some(want), Some(uid)) => Err(format!("uid {uid} is not the session's vmm_uid {want}")),
        (Some(want), None) => {
            Err(format!("the caller's uid cannot be read (the session's vmm_uid is {want})"))
        }
    }
}

/// Accepts the first connection from the expected VMM uid (`vmm_uid`; any uid when None) and
/// gives it to `on_first`, after closing the listener and removing its socket file: nobody else
/// can connect from then on. A connection from another uid is closed at once and logged, and
/// the session keeps waiting for its VMM. A failed accept (out of descriptors) is retried after
/// a pause that grows while the failures go on, logged once per burst. Ends when the task
/// running it is aborted (which closes the listener).
pub async fn accept_first(
    listener: UnixListener,
    path: PathBuf,
    session: String,
    vmm_uid: Option<u32>,
    on_first: impl FnOnce(UnixStream) + Send + 'static,
) {
    let mut pacing = Pacing::default();
    let stream = loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let cred = stream.peer_cred().ok();
                match admits_vmm(vmm_uid, cred.map(|c| c.uid())) {
                    Ok(()) => break stream,
                    Err(reason) => warn!(
                        session = %session,
                        peer_uid = ?cred.map(|c| c.uid()),
                        peer_pid = ?cred.and_then(|c| c.pid()),
                        %reason,
                        "refused a VMM connection from the wrong uid; the session stays PENDING",
                    ),
                }
            }
            Err(e) => {
                let next = pacing.failed();
                if next.log {
                    warn!(
                        session = %session,
                        error = %e,
                        out_of_descriptors = is_resource_exhaustion(&e),
                        "accepting on the session socket failed; backing off until it works",
                    );
                }
                tokio::time::sleep(next.pause).await;
            }
        }
    };
    let failed = pacing.succeeded();
    if failed > 0 {
        info!(session = %session, failed, "accepted the VMM after failed attempts");
    }
    drop(listener);
    unlink(&path);
    on_first(stream);
}

/// Why a handshake failed.
#[derive(Debug)]
pub enum HandshakeFailure {
    /// The connection could not be read or handed on.
    Setup(io::Error),
    /// The VMM did not finish its handshake within the deadline.
    TimedOut { timeout: Duration, received: usize },
    /// What the VMM sent was not a valid handshake.
    Invalid(HandshakeError),
}

impl HandshakeFailure {
    /// The VMM closed the connection without sending anything: nothing of it waits for this
    /// supervisor (a probe, or a VMM that gave up).
    pub fn sent_nothing(&self) -> bool {
        matches!(self, Self::Invalid(HandshakeError::Empty))
    }
}

impl HandshakeFailure {
    /// The `reason` label of a refusal in `/metrics`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Setup(_) => "setup",
            Self::TimedOut { .. } => "timed_out",
            Self::Invalid(e) => e.reason(),
        }
    }
}

impl fmt::Display for HandshakeFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Setup(e) => write!(f, "reading the VMM connection: {e}"),
            Self::TimedOut { timeout, received: 0 } => {
                write!(f, "the VMM sent no handshake within {timeout:?}")
            }
            Self::TimedOut { timeout, received } => write!(
                f,
                "the VMM did not finish its handshake within {timeout:?} ({received} bytes \
                 received)"
            ),
            Self::Invalid(e) => write!(f, "{e}"),
        }
    }
}

/// Reads the VMM's handshake from `stream` (readiness-driven: no thread waits on it) within
/// `timeout`, and validates it against the memory file's length.
pub async fn read_handshake(
    stream: &UnixStream,
    file_len: u64,
    vmm_pid: u32,
    timeout: Duration,
) -> Result<Handshake, HandshakeFailure> {
    let mut partial = Partial::default();
    let read = async {
        loop {
            stream.readable().await.map_err(HandshakeFailure::Setup)?;
            let len = partial.next_read_len();
            let got = stream.try_io(Interest::READABLE, || {
                uffdpager::scm::recv_with_fds(stream.as_fd(), len).map_err(io::Error::from)
            });
            let received = match got {
                Ok(r) => r,
                // Readiness was stale: wait for the next wake-up.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => {
                    let errno = nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO));
                    return Err(HandshakeFailure::Invalid(HandshakeError::Recv(errno)));
                }
            };
            match partial.push(received).map_err(HandshakeFailure::Invalid)? {
                Progress::More => {}
                Progress::Complete(mappings) => return Ok(mappings),
            }
        }
    };
    let outcome = tokio::time::timeout(timeout, read).await;
    let mappings = match outcome {
        Ok(result) => result?,
        Err(_) => return Err(HandshakeFailure::TimedOut { timeout, received: partial.len() }),
    };
    partial.finish(&mappings, file_len, vmm_pid).map_err(HandshakeFailure::Invalid)
}

/// The VMM stream as a blocking std stream, for the pager (which sets its own mode).
pub fn into_blocking(stream: UnixStream) -> io::Result<StdUnixStream> {
    let stream = stream.into_std()?;
    stream.set_nonblocking(false)?;
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;
    use uffdpager::firecracker::GuestRegionUffdMapping;

    fn mapping(page_size: u64) -> GuestRegionUffdMapping {
        GuestRegionUffdMapping {
            base_host_virt_addr: 0x7f00_0000_0000,
            size: 8192,
            offset: 0,
            page_size: Some(page_size),
            page_size_kib: Some(page_size),
        }
    }

    /// A uffd as Firecracker makes one (this machine has userfaultfd: its absence fails the test).
    fn a_uffd() -> userfaultfd::Uffd {
        uffdpager::uffd_ops::firecracker_uffd(false).expect("creating a userfaultfd")
    }

    async fn handshake(ours: &UnixStream, len: u64, t: Duration) -> Result<Handshake, String> {
        read_handshake(ours, len, 42, t).await.map_err(|e| e.to_string())
    }

    #[test]
    fn a_socket_path_too_long_for_sun_path_is_refused() {
        let dir = PathBuf::from(format!("/{}", "d".repeat(60)));
        assert!(socket_path(&dir, "vm-1").is_ok());
        let err = socket_path(&dir, &"x".repeat(64)).unwrap_err().to_string();
        assert!(err.contains("shorter session id"), "{err}");
    }

    #[tokio::test]
    async fn binding_replaces_a_stale_socket_but_not_a_regular_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s.sock");
        drop(bind(&p).unwrap());
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let _again = bind(&p).unwrap();
        let f = d.path().join("file");
        std::fs::write(&f, b"x").unwrap();
        assert_eq!(bind(&f).unwrap_err().kind(), io::ErrorKind::AlreadyExists);
        unlink(&f);
        assert!(f.exists(), "unlink removes sockets only");
    }

    #[tokio::test]
    async fn after_the_first_connection_the_socket_is_gone_and_a_second_connect_fails() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s.sock");
        let listener = bind(&p).unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(accept_first(listener, p.clone(), "t".into(), None, move |s| {
            let _ = tx.send(s);
        }));
        let _first = UnixStream::connect(&p).await.unwrap();
        let kept = rx.await.unwrap();
        task.await.unwrap();
        assert!(!p.exists(), "the socket file is removed");
        let err = UnixStream::connect(&p).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(kept.peer_addr().is_ok());
    }

    #[test]
    fn only_the_named_vmm_uid_is_admitted() {
        assert_eq!(admits_vmm(None, Some(65534)), Ok(()));
        assert_eq!(admits_vmm(None, None), Ok(()));
        assert_eq!(admits_vmm(Some(123), Some(123)), Ok(()));
        assert_eq!(
            admits_vmm(Some(123), Some(0)).unwrap_err(),
            "uid 0 is not the session's vmm_uid 123"
        );
        assert!(admits_vmm(Some(123), None).is_err());
    }

    #[tokio::test]
    async fn a_connection_from_another_uid_is_closed_and_the_socket_keeps_waiting() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s.sock");
        let listener = bind(&p).unwrap();
        let me = nix::unistd::geteuid().as_raw();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task =
            tokio::spawn(accept_first(listener, p.clone(), "t".into(), Some(me + 1), move |s| {
                let _ = tx.send(s);
            }));
        let mut wrong = UnixStream::connect(&p).await.unwrap();
        let mut buf = [0u8; 1];
        let n = tokio::io::AsyncReadExt::read(&mut wrong, &mut buf).await.unwrap();
        assert_eq!(n, 0, "the wrong uid's connection is closed at once");
        task.abort();
        assert!(rx.await.is_err(), "no connection was taken as the VMM's");
    }

    #[tokio::test]
    async fn a_handshake_without_a_uffd_is_refused_with_a_clear_error() {
        let (vmm, ours) = UnixStream::pair().unwrap();
        let json = serde_json::to_vec(&[mapping(4096)]).unwrap();
        uffdpager::scm::send_with_fds(vmm.as_fd(), &json, &[]).unwrap();
        let err = handshake(&ours, 1 << 20, Duration::from_secs(5)).await.unwrap_err();
        assert!(err.contains("no file descriptor"), "{err}");
    }

    #[tokio::test]
    async fn a_plain_file_in_place_of_the_uffd_is_refused() {
        let (vmm, ours) = UnixStream::pair().unwrap();
        let file = tempfile::tempfile().unwrap();
        let json = serde_json::to_vec(&[mapping(4096)]).unwrap();
        uffdpager::scm::send_with_fds(vmm.as_fd(), &json, &[file.as_fd()]).unwrap();
        let err = handshake(&ours, 1 << 20, Duration::from_secs(5)).await.unwrap_err();
        assert!(err.contains("not a userfaultfd"), "{err}");
    }

    #[tokio::test]
    async fn a_bad_page_size_is_named_in_the_error() {
        let uffd = a_uffd();
        let (vmm, ours) = UnixStream::pair().unwrap();
        let json = serde_json::to_vec(&[mapping(12345)]).unwrap();
        uffdpager::scm::send_with_fds(vmm.as_fd(), &json, &[uffd.as_fd()]).unwrap();
        let err = handshake(&ours, 1 << 20, Duration::from_secs(5)).await.unwrap_err();
        assert_eq!(err, "region 0: page size 12345 is neither 4096 nor 2097152");
    }

    #[tokio::test]
    async fn a_valid_handshake_gives_the_regions_and_the_vmm_pid() {
        let uffd = a_uffd();
        let (vmm, ours) = UnixStream::pair().unwrap();
        let json = serde_json::to_vec(&[mapping(4096)]).unwrap();
        uffdpager::scm::send_with_fds(vmm.as_fd(), &json, &[uffd.as_fd()]).unwrap();
        let h = read_handshake(&ours, 8192, 42, Duration::from_secs(5)).await.unwrap();
        assert_eq!(h.regions.len(), 1);
        assert_eq!(h.regions[0].size, 8192);
        assert_eq!(h.vmm_pid, 42);
        let blocking = into_blocking(ours).unwrap();
        assert!(blocking.peer_addr().is_ok());
    }

    #[tokio::test]
    async fn a_handshake_sent_in_many_pieces_is_read_whole() {
        let uffd = a_uffd();
        let (vmm, ours) = UnixStream::pair().unwrap();
        let json = serde_json::to_vec(&[mapping(4096)]).unwrap();
        let mut text = vec![b' '; 50_000];
        text.extend_from_slice(&json);
        let (first, rest) = text.split_at(1000);
        uffdpager::scm::send_with_fds(vmm.as_fd(), first, &[uffd.as_fd()]).unwrap();
        let reader = tokio::spawn(async move {
            read_handshake(&ours, 8192, 42, Duration::from_secs(10)).await.map(|h| h.regions)
        });
        for chunk in rest.chunks(7000) {
            tokio::time::sleep(Duration::from_millis(5)).await;
            uffdpager::scm::send_with_fds(vmm.as_fd(), chunk, &[]).unwrap();
        }
        let regions = reader.await.unwrap().unwrap();
        assert_eq!(regions[0].size, 8192);
    }

    #[tokio::test]
    async fn a_silent_vmm_times_out_and_one_that_stops_half_way_says_how_much_came() {
        let (_vmm, ours) = UnixStream::pair().unwrap();
        let err = handshake(&ours, 1 << 20, Duration::from_millis(200)).await.unwrap_err();
        assert_eq!(err, "the VMM sent no handshake within 200ms");
        let (vmm, ours) = UnixStream::pair().unwrap();
        uffdpager::scm::send_with_fds(vmm.as_fd(), b"[{\"size\":", &[]).unwrap();
        let err = handshake(&ours, 1 << 20, Duration::from_millis(200)).await.unwrap_err();
        assert!(err.contains("did not finish its handshake") && err.contains("(9 bytes"), "{err}");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn hundreds_of_silent_connections_are_waited_on_by_one_thread() {
        let mut pairs = Vec::new();
        let mut readers = tokio::task::JoinSet::new();
        for _ in 0..300 {
            let (vmm, ours) = UnixStream::pair().unwrap();
            pairs.push(vmm);
            readers.spawn(async move {
                read_handshake(&ours, 1 << 20, 42, Duration::from_secs(30)).await.map(|_| ())
            });
        }
        // On a current-thread runtime a reader that blocked would stop everything: the 300
        // waits are readiness registrations, and this one closes them all.
        tokio::task::yield_now().await;
        drop(pairs);
        while let Some(done) = readers.join_next().await {
            let err = done.unwrap().unwrap_err();
            assert!(err.sent_nothing(), "{err}");
        }
    }
}
