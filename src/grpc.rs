//! What every gRPC server and client here shares: health and reflection (v1 and v1alpha, since
//! the grpcurl on PyPI speaks only v1alpha), Unix-socket listeners and channels.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::{UnixListener, UnixStream};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::accept_backoff::Backoff;

/// The reflection services (v1 and v1alpha) describing `uffdpager.v1` and `grpc.health.v1`.
pub fn reflection_services() -> (
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
) {
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::api::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    (
        builder().build_v1().expect("embedded descriptor sets are valid"),
        builder().build_v1alpha().expect("embedded descriptor sets are valid"),
    )
}

/// The stream of connections a gRPC server accepts on a Unix socket: pacing its retries when
/// `accept` fails (out of descriptors), instead of spinning (see [`crate::accept_backoff`]).
pub type UdsIncoming = Backoff<UnixListenerStream>;

/// Binds a Unix-socket listener for a gRPC server at `path`, mode 0600, replacing a stale socket
/// left by a process that died. Anything else in the way (a regular file, a directory, a symlink)
/// is refused, never removed.
pub fn bind_uds(path: &Path) -> io::Result<UdsIncoming> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket: refusing to replace it", path.display()),
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(Backoff::new(UnixListenerStream::new(listener), path.display().to_string()))
}

/// Binds an API's Unix socket (see [`bind_uds`]): mode 0600, or with an API group (the
/// `--api-group` of [`crate::peer_auth`]) mode 0660 and that group, so its members can connect.
pub fn bind_api_uds(path: &Path, group: Option<u32>) -> io::Result<UdsIncoming> {
    let listener = bind_uds(path)?;
    if let Some(gid) = group {
        std::os::unix::fs::chown(path, None, Some(gid))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    }
    Ok(listener)
}

/// A lazily connecting channel to a gRPC server on a Unix socket.
pub fn uds_channel(path: &Path) -> Channel {
    let path: PathBuf = path.to_path_buf();
    // The URI is required by the API but unused: the connector below dials the socket.
    Endpoint::from_static("http://localhost")
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
}

/// A channel to `endpoint`: `unix:/path` or `http://host:port`.
pub fn channel_for(endpoint: &str) -> Result<Channel, tonic::transport::Error> {
    match endpoint.strip_prefix("unix:") {
        Some(path) => Ok(uds_channel(Path::new(path))),
        None => Ok(Endpoint::from_shared(endpoint.to_string())?
            .connect_timeout(Duration::from_secs(5))
            .connect_lazy()),
    }
}

/// Timestamp helpers shared by servers.
pub fn timestamp(t: std::time::SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(t)
}

/// Milliseconds since the Unix epoch → protobuf timestamp.
pub fn timestamp_ms(ms: u64) -> prost_types::Timestamp {
    let secs = i64::try_from(ms / 1000).unwrap_or(i64::MAX);
    let nanos = i32::try_from((ms % 1000) * 1_000_000).expect("below one second");
    prost_types::Timestamp { seconds: secs, nanos }
}

/// Now, in milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The deadline a client set on a call (`grpc-timeout` header: digits and a unit of
/// H, M, S, m, u or n), if any.
pub fn grpc_timeout<T>(request: &tonic::Request<T>) -> Option<Duration> {
    parse_grpc_timeout(request.metadata().get("grpc-timeout")?.to_str().ok()?)
}

/// Parses a `grpc-timeout` header value: 1 to 8 ASCII digits and a unit (H, M, S, m, u, n).
/// Anything else (a sign, more digits, another unit) is no timeout at all.
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 || !value.is_ascii() {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_in_every_unit() {
        assert_eq!(parse_grpc_timeout("5000m"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse_grpc_timeout("7u"), Some(Duration::from_micros(7)));
        assert_eq!(parse_grpc_timeout("9n"), Some(Duration::from_nanos(9)));
        assert_eq!(parse_grpc_timeout("S"), None);
        assert_eq!(parse_grpc_timeout("12x"), None);
        assert_eq!(parse_grpc_timeout("1234567890S"), None);
        assert_eq!(parse_grpc_timeout("99999999n"), Some(Duration::from_nanos(99_999_999)));
        for bad in ["", "5", "+5S", "-5S", "5s", "1 S", "1.5S", "123456789S", "٥S", "１S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn timestamps_keep_milliseconds() {
        let t = timestamp_ms(1_500);
        assert_eq!((t.seconds, t.nanos), (1, 500_000_000));
    }

    #[tokio::test]
    async fn binding_replaces_a_stale_socket_but_never_a_file_or_a_symlink() {
        let d = tempfile::tempdir().unwrap();
        let sock = d.path().join("api.sock");
        drop(bind_uds(&sock).unwrap());
        assert!(sock.exists(), "a socket file outlives its listener");
        drop(bind_uds(&sock).unwrap());
        let file = d.path().join("precious");
        std::fs::write(&file, b"keep me").unwrap();
        let err = bind_uds(&file).unwrap_err();
        assert!(err.to_string().contains("is not a socket"), "{err}");
        assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
        let link = d.path().join("link.sock");
        std::os::unix::fs::symlink(&sock, &link).unwrap();
        assert!(bind_uds(&link).is_err());
        assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
    }
}
