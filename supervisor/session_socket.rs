//! A session's VMM socket (`DIR/sessions/<id>.sock`, Firecracker's `backend_path`): bound at
//! CreateSession, it takes exactly ONE VMM connection, whose handshake (a JSON array of regions
//! with the uffd attached) is read and validated on a blocking-pool thread. Any later connection
//! is accepted and closed at once, without disturbing the first.

use std::fmt;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener as StdUnixListener, UnixStream as StdUnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::net::{UnixListener, UnixStream};
use tracing::warn;
use uffdpager::firecracker::{self, Handshake, HandshakeError};

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
/// gives it to `on_first`; a connection from another uid is closed at once and logged, and the
/// session keeps waiting for its VMM. Once the VMM is connected, every later connection is
/// accepted and closed with a warning, until the task running this is aborted (which closes
/// the listener).
pub async fn accept_one(
    listener: UnixListener,
    session: String,
    vmm_uid: Option<u32>,
    on_first: impl FnOnce(UnixStream) + Send + 'static,
) {
    let mut on_first = Some(on_first);
    loop {
        match listener.accept().await {
            Ok((stream, _)) if on_first.is_some() => {
                let cred = stream.peer_cred().ok();
                if let Err(reason) = admits_vmm(vmm_uid, cred.map(|c| c.uid())) {
                    warn!(
                        session = %session,
                        peer_uid = ?cred.map(|c| c.uid()),
                        peer_pid = ?cred.and_then(|c| c.pid()),
                        %reason,
                        "refused a VMM connection from the wrong uid; the session stays PENDING",
                    );
                    drop(stream);
                    continue;
                }
                if let Some(f) = on_first.take() {
                    f(stream);
                }
            }
            Ok((stream, _)) => match on_first.take() {
                Some(f) => f(stream),
                None => {
                    let peer_pid = stream.peer_cred().ok().and_then(|c| c.pid());
                    warn!(
                        session = %session,
                        peer_pid = ?peer_pid,
                        "refused a second VMM connection: a session socket takes exactly one"
                    );
                    drop(stream);
                }
            },
            Err(e) => {
                // EMFILE and the like: do not spin; the next accept may succeed.
                warn!(session = %session, error = %e, "accepting on the session socket failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Why a handshake failed.
#[derive(Debug)]
pub enum HandshakeFailure {
    /// The connection could not be prepared for a blocking read.
    Setup(io::Error),
    /// Nothing arrived within the timeout.
    TimedOut(Duration),
    /// What the VMM sent was not a valid handshake.
    Invalid(HandshakeError),
    /// The blocking task did not finish.
    Join(String),
}

impl HandshakeFailure {
    /// The `reason` label of a refusal in `/metrics`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Setup(_) => "setup",
            Self::TimedOut(_) => "timed_out",
            Self::Invalid(e) => e.reason(),
            Self::Join(_) => "internal",
        }
    }
}

impl fmt::Display for HandshakeFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Setup(e) => write!(f, "preparing the VMM connection: {e}"),
            Self::TimedOut(t) => write!(f, "the VMM sent no handshake within {t:?}"),
            Self::Invalid(e) => write!(f, "{e}"),
            Self::Join(e) => write!(f, "the handshake task failed: {e}"),
        }
    }
}

/// Reads and validates the VMM's handshake against the memory file's length. Returns it with
/// the VMM stream, now a blocking std stream (the pager takes it over).
pub async fn handshake(
    stream: UnixStream,
    file_len: u64,
    timeout: Duration,
) -> Result<(Handshake, StdUnixStream), HandshakeFailure> {
    let stream = stream.into_std().map_err(HandshakeFailure::Setup)?;
    stream.set_nonblocking(false).map_err(HandshakeFailure::Setup)?;
    stream.set_read_timeout(Some(timeout)).map_err(HandshakeFailure::Setup)?;
    let (stream, result) = tokio::task::spawn_blocking(move || {
        let r = firecracker::recv_handshake(stream.as_fd(), file_len);
        (stream, r)
    })
    .await
    .map_err(|e| HandshakeFailure::Join(e.to_string()))?;
    // The pager sets its own mode; no timeout stays on a stream it will read.
    stream.set_read_timeout(None).map_err(HandshakeFailure::Setup)?;
    match result {
        Ok(h) => Ok((h, stream)),
        Err(HandshakeError::Recv(nix::errno::Errno::EAGAIN)) => {
            Err(HandshakeFailure::TimedOut(timeout))
        }
        Err(e) => Err(HandshakeFailure::Invalid(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use firecracker::GuestRegionUffdMapping;

    fn mapping(page_size: u64) -> GuestRegionUffdMapping {
        GuestRegionUffdMapping {
            base_host_virt_addr: 0x7f00_0000_0000,
            size: 8192,
            offset: 0,
            page_size: Some(page_size),
            page_size_kib: Some(page_size),
        }
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
    }

    #[tokio::test]
    async fn a_second_connection_is_closed_and_the_first_kept() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s.sock");
        let listener = bind(&p).unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(accept_one(listener, "t".into(), None, move |s| {
            let _ = tx.send(s);
        }));
        let _first = UnixStream::connect(&p).await.unwrap();
        let kept = rx.await.unwrap();
        let mut second = UnixStream::connect(&p).await.unwrap();
        let mut buf = [0u8; 1];
        let n = tokio::io::AsyncReadExt::read(&mut second, &mut buf).await.unwrap();
        assert_eq!(n, 0, "the second connection is closed at once");
        assert!(kept.peer_addr().is_ok());
        task.abort();
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
        let task = tokio::spawn(accept_one(listener, "t".into(), Some(me + 1), move |s| {
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
        let err = handshake(ours, 1 << 20, Duration::from_secs(5)).await.unwrap_err();
        assert!(err.to_string().contains("no file descriptor"), "{err}");
    }

    #[tokio::test]
    async fn a_plain_file_in_place_of_the_uffd_is_refused() {
        let (vmm, ours) = UnixStream::pair().unwrap();
        let file = tempfile::tempfile().unwrap();
        let json = serde_json::to_vec(&[mapping(4096)]).unwrap();
        uffdpager::scm::send_with_fds(vmm.as_fd(), &json, &[file.as_fd()]).unwrap();
        let err = handshake(ours, 1 << 20, Duration::from_secs(5)).await.unwrap_err();
        assert!(err.to_string().contains("not a userfaultfd"), "{err}");
    }

    #[tokio::test]
    async fn a_bad_page_size_is_named_in_the_error() {
        let Ok(uffd) = userfaultfd::UffdBuilder::new().close_on_exec(true).create() else {
            eprintln!("no userfaultfd on this machine: skipped");
            return;
        };
        let (vmm, ours) = UnixStream::pair().unwrap();
        let json = serde_json::to_vec(&[mapping(12345)]).unwrap();
        uffdpager::scm::send_with_fds(vmm.as_fd(), &json, &[uffd.as_fd()]).unwrap();
        let err = handshake(ours, 1 << 20, Duration::from_secs(5)).await.unwrap_err();
        assert_eq!(err.to_string(), "region 0: page size 12345 is neither 4096 nor 2097152");
    }

    #[tokio::test]
    async fn a_valid_handshake_gives_the_regions_and_the_vmm_pid() {
        let Ok(uffd) = userfaultfd::UffdBuilder::new().close_on_exec(true).create() else {
            eprintln!("no userfaultfd on this machine: skipped");
            return;
        };
        let (vmm, ours) = UnixStream::pair().unwrap();
        let json = serde_json::to_vec(&[mapping(4096)]).unwrap();
        uffdpager::scm::send_with_fds(vmm.as_fd(), &json, &[uffd.as_fd()]).unwrap();
        let (h, _stream) = handshake(ours, 8192, Duration::from_secs(5)).await.unwrap();
        assert_eq!(h.regions.len(), 1);
        assert_eq!(h.regions[0].size, 8192);
        assert_eq!(h.vmm_pid, std::process::id());
    }

    #[tokio::test]
    async fn a_silent_vmm_times_out() {
        let (_vmm, ours) = UnixStream::pair().unwrap();
        let err = handshake(ours, 1 << 20, Duration::from_millis(200)).await.unwrap_err();
        assert_eq!(err.to_string(), "the VMM sent no handshake within 200ms");
    }
}
