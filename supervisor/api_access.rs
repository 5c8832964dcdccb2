//! Who may call the Supervisor API, from the command line: the Unix socket's callers (root and
//! the `--api-group`, checked by their `SO_PEERCRED`), and what the TCP listener serves (TLS
//! with client certificates, or plain TCP on loopback when explicitly asked). Decided and loaded
//! before anything starts, so a bad certificate path fails the start, not the first client.

use std::net::SocketAddr;

use tonic::transport::ServerTlsConfig;
use uffdpager::peer_auth::{ApiGroup, ApiGroupError, CallerPolicy};
use uffdpager::tls::{TcpSecurity, TcpSecurityError, TlsLoadError};

use crate::cli::Cli;

/// Why the API's access settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ApiAccessError {
    #[error(transparent)]
    Group(#[from] ApiGroupError),
    #[error(transparent)]
    Tcp(#[from] TcpSecurityError),
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
    pub fn from_cli(cli: &Cli) -> Result<Self, ApiAccessError> {
        let group = cli.api_group.as_deref().map(ApiGroup::resolve).transpose()?;
        let security = uffdpager::tls::tcp_security(
            cli.listen_tcp,
            cli.tls_cert.as_deref(),
            cli.tls_key.as_deref(),
            cli.tls_client_ca.as_deref(),
            cli.insecure_plaintext_tcp,
        )?;
        let tcp = match (cli.listen_tcp, security) {
            (Some(addr), Some(TcpSecurity::Tls(files))) => {
                Some(TcpListen { addr, tls: Some(uffdpager::tls::server_config(&files)?) })
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
        let cli =
            Cli::try_parse_from(std::iter::once("uffd-supervisor").chain(args.iter().copied()))
                .unwrap();
        ApiAccess::from_cli(&cli)
    }

    #[test]
    fn tcp_without_tls_or_the_explicit_flag_is_refused() {
        let err = access(&["--listen-tcp", "127.0.0.1:7000"]).unwrap_err().to_string();
        assert!(err.contains("--insecure-plaintext-tcp"), "{err}");
        let err = access(&["--listen-tcp", "0.0.0.0:7000", "--insecure-plaintext-tcp"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a loopback address"), "{err}");
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
