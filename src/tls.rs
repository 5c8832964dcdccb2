//! TLS for the gRPC APIs on TCP (the supervisor's and the controller's `--listen-tcp`) and for
//! the controller's TCP connections to supervisors: mutual TLS through tonic's rustls support.
//!
//! A TCP listener serves TLS and requires every client to present a certificate signed by the
//! configured CA (`--tls-client-ca`); plain TCP only when explicitly asked
//! (`--insecure-plaintext-tcp`), and then only on a loopback address. [`tcp_security`] is that
//! decision, a pure function; [`server_config`] and [`client_config`] read the PEM files.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// How long a TCP client may take over its TLS handshake (a silent client holds only a task).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The PEM files of one side of a mutual-TLS connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// This side's certificate (chain), PEM.
    pub cert: PathBuf,
    /// This side's private key, PEM.
    pub key: PathBuf,
    /// The CA that signs the other side's certificates, PEM (one or more certificates).
    pub ca: PathBuf,
}

/// The names of a listener's TLS files, as flags.
pub const LISTENER_TLS_FLAGS: [&str; 3] = ["--tls-cert", "--tls-key", "--tls-client-ca"];

/// What a TCP listener serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TcpSecurity {
    /// TLS with client certificates checked against the CA.
    Tls(TlsFiles),
    /// Plain TCP: explicitly asked for, loopback only.
    Plaintext,
}

/// Why a TCP listener's settings are refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TcpSecurityError {
    #[error(
        "--listen-tcp {addr} without TLS: give --tls-cert, --tls-key and --tls-client-ca \
         (every client must then present a certificate signed by that CA), or \
         --insecure-plaintext-tcp to serve unauthenticated plain TCP on a loopback address"
    )]
    NoTls { addr: SocketAddr },
    #[error(
        "--listen-tcp {addr} is not a loopback address: plain TCP (--insecure-plaintext-tcp) \
         is served on loopback only; serve TLS with client certificates to reach other hosts"
    )]
    PlaintextNotLoopback { addr: SocketAddr },
    #[error("TLS needs {}, {} and {} together: {missing} is missing", .names[0], .names[1], .names[2])]
    Incomplete { names: [&'static str; 3], missing: &'static str },
    #[error("--insecure-plaintext-tcp and TLS files were both given: choose one")]
    Conflicting,
    #[error("TLS files were given but no --listen-tcp: they are used only on TCP")]
    TlsWithoutTcp,
}

/// Decides what a TCP listener on `addr` serves from the three TLS files (each optional as
/// written) and the explicit plaintext flag. `addr` None: no TCP listener; then TLS files or the
/// plaintext flag make no sense and are refused, so that a typo never leaves an operator
/// believing TLS is on.
pub fn tcp_security(
    addr: Option<SocketAddr>,
    cert: Option<&Path>,
    key: Option<&Path>,
    client_ca: Option<&Path>,
    insecure_plaintext: bool,
) -> Result<Option<TcpSecurity>, TcpSecurityError> {
    let files = tls_files(cert, key, client_ca, LISTENER_TLS_FLAGS)?;
    let Some(addr) = addr else {
        return match (files, insecure_plaintext) {
            (None, false) => Ok(None),
            (Some(_), _) => Err(TcpSecurityError::TlsWithoutTcp),
            (None, true) => Ok(None),
        };
    };
    match (files, insecure_plaintext) {
        (Some(_), true) => Err(TcpSecurityError::Conflicting),
        (Some(files), false) => Ok(Some(TcpSecurity::Tls(files))),
        (None, false) => Err(TcpSecurityError::NoTls { addr }),
        (None, true) if addr.ip().to_canonical().is_loopback() => Ok(Some(TcpSecurity::Plaintext)),
        (None, true) => Err(TcpSecurityError::PlaintextNotLoopback { addr }),
    }
}

/// The three files together, or none of them; `names` name them in the error.
pub fn tls_files(
    cert: Option<&Path>,
    key: Option<&Path>,
    ca: Option<&Path>,
    names: [&'static str; 3],
) -> Result<Option<TlsFiles>, TcpSecurityError> {
    match (cert, key, ca) {
        (None, None, None) => Ok(None),
        (Some(cert), Some(key), Some(ca)) => {
            Ok(Some(TlsFiles { cert: cert.into(), key: key.into(), ca: ca.into() }))
        }
        (c, k, _) => {
            let missing = if c.is_none() {
                names[0]
            } else if k.is_none() {
                names[1]
            } else {
                names[2]
            };
            Err(TcpSecurityError::Incomplete { names, missing })
        }
    }
}

/// Why the TLS files cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsLoadError {
    #[error("reading the TLS {what} {path}: {source}")]
    Read { what: &'static str, path: PathBuf, source: io::Error },
    #[error("the TLS {what} {path} holds no PEM block (-----BEGIN ...)")]
    NotPem { what: &'static str, path: PathBuf },
}

fn read_pem(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsLoadError> {
    let pem = std::fs::read(path).map_err(|source| TlsLoadError::Read {
        what,
        path: path.into(),
        source,
    })?;
    if !pem.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(TlsLoadError::NotPem { what, path: path.into() });
    }
    Ok(pem)
}

fn identity(files: &TlsFiles) -> Result<Identity, TlsLoadError> {
    Ok(Identity::from_pem(read_pem("certificate", &files.cert)?, read_pem("key", &files.key)?))
}

/// A server's TLS: its identity, and client certificates required and checked against the CA
/// (rustls' WebPKI verifier: chain to the CA, validity dates, client-auth usage).
pub fn server_config(files: &TlsFiles) -> Result<ServerTlsConfig, TlsLoadError> {
    Ok(ServerTlsConfig::new()
        .identity(identity(files)?)
        .client_ca_root(Certificate::from_pem(read_pem("client CA", &files.ca)?))
        .client_auth_optional(false)
        .timeout(HANDSHAKE_TIMEOUT))
}

/// A client's TLS: the server is checked against the CA (its certificate must name the host
/// dialled), and this client presents its own certificate.
pub fn client_config(files: &TlsFiles) -> Result<ClientTlsConfig, TlsLoadError> {
    Ok(ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read_pem("CA", &files.ca)?))
        .identity(identity(files)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> Option<SocketAddr> {
        Some(s.parse().unwrap())
    }

    fn p(s: &str) -> Option<&Path> {
        Some(Path::new(s))
    }

    #[test]
    fn tls_files_make_a_tls_listener_on_any_address() {
        for a in ["127.0.0.1:7000", "0.0.0.0:7000", "[::]:7000", "10.1.2.3:7000"] {
            let s = tcp_security(addr(a), p("/c"), p("/k"), p("/ca"), false).unwrap();
            let files = TlsFiles { cert: "/c".into(), key: "/k".into(), ca: "/ca".into() };
            assert_eq!(s, Some(TcpSecurity::Tls(files)), "{a}");
        }
    }

    #[test]
    fn plain_tcp_is_refused_unless_explicitly_asked() {
        let err = tcp_security(addr("127.0.0.1:7000"), None, None, None, false).unwrap_err();
        assert_eq!(err, TcpSecurityError::NoTls { addr: "127.0.0.1:7000".parse().unwrap() });
        assert!(err.to_string().contains("--insecure-plaintext-tcp"), "{err}");
        let ok = tcp_security(addr("127.0.0.1:7000"), None, None, None, true).unwrap();
        assert_eq!(ok, Some(TcpSecurity::Plaintext));
        let ok = tcp_security(addr("[::1]:7000"), None, None, None, true).unwrap();
        assert_eq!(ok, Some(TcpSecurity::Plaintext));
    }

    #[test]
    fn plain_tcp_off_loopback_is_refused_even_when_asked() {
        for a in ["0.0.0.0:7000", "[::]:7000", "192.0.2.1:7000"] {
            let err = tcp_security(addr(a), None, None, None, true).unwrap_err();
            assert!(matches!(err, TcpSecurityError::PlaintextNotLoopback { .. }), "{a}: {err}");
        }
    }

    #[test]
    fn incomplete_or_conflicting_tls_settings_are_refused() {
        let a = addr("127.0.0.1:1");
        let err = tcp_security(a, p("/c"), None, p("/ca"), false).unwrap_err();
        assert_eq!(
            err,
            TcpSecurityError::Incomplete { names: LISTENER_TLS_FLAGS, missing: "--tls-key" }
        );
        let err = tcp_security(a, None, p("/k"), p("/ca"), false).unwrap_err();
        assert_eq!(
            err,
            TcpSecurityError::Incomplete { names: LISTENER_TLS_FLAGS, missing: "--tls-cert" }
        );
        let err = tcp_security(a, p("/c"), p("/k"), None, false).unwrap_err();
        assert_eq!(
            err,
            TcpSecurityError::Incomplete { names: LISTENER_TLS_FLAGS, missing: "--tls-client-ca" }
        );
        let err = tcp_security(a, p("/c"), p("/k"), p("/ca"), true).unwrap_err();
        assert_eq!(err, TcpSecurityError::Conflicting);
        let err = tcp_security(None, p("/c"), p("/k"), p("/ca"), false).unwrap_err();
        assert_eq!(err, TcpSecurityError::TlsWithoutTcp);
        assert_eq!(tcp_security(None, None, None, None, false), Ok(None));
    }

    #[test]
    fn a_file_that_is_not_pem_is_named_in_the_error() {
        let d = tempfile::tempdir().unwrap();
        let junk = d.path().join("cert.pem");
        std::fs::write(&junk, b"not a certificate").unwrap();
        let files = TlsFiles { cert: junk.clone(), key: junk.clone(), ca: junk.clone() };
        let err = server_config(&files).unwrap_err().to_string();
        assert!(err.contains("holds no PEM block") && err.contains("cert.pem"), "{err}");
        let missing = d.path().join("missing.pem");
        let files = TlsFiles { cert: missing.clone(), key: missing.clone(), ca: missing };
        let err = client_config(&files).unwrap_err().to_string();
        assert!(err.contains("reading the TLS") && err.contains("missing.pem"), "{err}");
    }
}
