//! Who may call the Supervisor API, from the settings: the Unix socket's callers (root and the
//! `api_group`, checked by their `SO_PEERCRED`), and what the TCP listener serves (TLS with
//! client certificates, or plain TCP on loopback when explicitly asked; decided by
//! `Settings::resolve`). Loaded before anything starts, so a bad certificate path or group fails
//! the start, not the first client.

use std::net::SocketAddr;

use tonic::transport::ServerTlsConfig;
use uffdpager::peer_auth::{ApiGroup, ApiGroupError, CallerPolicy};
use uffdpager::tls::{TcpSecurity, TlsLoadError};

use crate::cli::Resolved;

/// Why the API's access settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ApiAccessError {
    #[error(transparent)]
    Group(#[from] ApiGroupError),
    #[error(transparent)]
    Tls(#[from] TlsLoadError),
}

/// The TCP listener: its address and, unless plain TCP was asked for, its TLS.
#[derive(Debug, Clone)]
pub struct TcpListen {
    pub addr: SocketAddr,
    /// None: plain TCP (loopback only, explicitly asked).
    pub tls: Option<ServerTlsConfig>,
}

/// The access settings of the Supervisor API.
#[derive(Debug, Clone)]
pub struct ApiAccess {
    /// Who may call on the Unix socket.
    pub callers: CallerPolicy,
    pub tcp: Option<TcpListen>,
}

impl ApiAccess {
    pub fn from_settings(settings: &Resolved) -> Result<Self, ApiAccessError> {
        let group = settings.api_group.as_deref().map(ApiGroup::resolve).transpose()?;
        let tcp = match (settings.listen_tcp, &settings.tcp_security) {
            (Some(addr), Some(TcpSecurity::Tls(files))) => {
                Some(TcpListen { addr, tls: Some(uffdpager::tls::server_config(files)?) })
            }
            (Some(addr), Some(TcpSecurity::Plaintext)) => Some(TcpListen { addr, tls: None }),
            _ => None,
        };
        Ok(Self { callers: CallerPolicy::with_group(group), tcp })
    }

    /// The API group's gid, if any.
    pub fn group_gid(&self) -> Option<u32> {
        self.callers.group.as_ref().map(|g| g.gid)
    }

    /// How the TCP listener is described in the log.
    pub fn tcp_mode(&self) -> &'static str {
        match &self.tcp {
            None => "none",
            Some(TcpListen { tls: Some(_), .. }) => "tls (client certificates required)",
            Some(TcpListen { tls: None, .. }) => "plaintext (insecure, loopback)",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn access(args: &[&str]) -> Result<ApiAccess, ApiAccessError> {
        let cli = crate::cli::Cli::try_parse_from(
            std::iter::once("uffd-supervisor").chain(args.iter().copied()),
        )
        .unwrap();
        ApiAccess::from_settings(&cli.resolve().unwrap())
    }

    #[test]
    fn plain_tcp_explicitly_asked_for_serves_plaintext() {
        let a = access(&["--listen-tcp", "127.0.0.1:7000", "--insecure-plaintext-tcp"]).unwrap();
        assert_eq!(a.tcp_mode(), "plaintext (insecure, loopback)");
    }

    #[test]
    fn a_missing_certificate_file_fails_at_start() {
        let err = access(&[
            "--listen-tcp",
            "127.0.0.1:7000",
            "--tls-cert",
            "/nonexistent/cert.pem",
            "--tls-key",
            "/nonexistent/key.pem",
            "--tls-client-ca",
            "/nonexistent/ca.pem",
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("/nonexistent/cert.pem"), "{err}");
    }

    #[test]
    fn the_api_group_must_exist() {
        let err = access(&["--api-group", "no-such-group-uffd"]).unwrap_err().to_string();
        assert!(err.contains("no such group"), "{err}");
        let a = access(&["--api-group", "root"]).unwrap();
        assert_eq!(a.group_gid(), Some(0));
        assert_eq!(a.tcp_mode(), "none");
    }
}
