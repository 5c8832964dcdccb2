//! Command line of `uffd-supervisor`, and the checks made on it before anything starts.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::startup::{parse_version_spec, VersionSpec};

/// The one public entry point of a host's uffd pagers: creates sessions, owns their VMM sockets,
/// spawns and tracks pager versions, and routes each session's calls to the version serving it.
#[derive(Debug, Parser)]
#[command(name = "uffd-supervisor", version)]
pub struct Cli {
    /// Runtime directory (created mode 0700): supervisor.sock, sessions/, pagers/.
    #[arg(long, default_value = "/run/uffd-pager")]
    pub runtime_dir: PathBuf,

    /// Also serve the Supervisor API on this TCP address (`IP:PORT` or `localhost:PORT`), with
    /// TLS and client certificates (--tls-cert, --tls-key, --tls-client-ca), or as plain TCP on
    /// a loopback address with --insecure-plaintext-tcp.
    #[arg(long, value_parser = parse_listen_addr)]
    pub listen_tcp: Option<SocketAddr>,

    /// The TCP listener's certificate (chain), PEM.
    #[arg(long, value_name = "PEM")]
    pub tls_cert: Option<PathBuf>,

    /// The TCP listener's private key, PEM.
    #[arg(long, value_name = "PEM")]
    pub tls_key: Option<PathBuf>,

    /// The CA that signs the certificates of the TCP clients allowed to call, PEM: a client
    /// without a certificate signed by it is refused at the TLS handshake.
    #[arg(long, value_name = "PEM")]
    pub tls_client_ca: Option<PathBuf>,

    /// Serve --listen-tcp as plain, unauthenticated TCP (loopback addresses only): anyone on
    /// this host who can connect may call every RPC, DeployVersion included.
    #[arg(long)]
    pub insecure_plaintext_tcp: bool,

    /// Members of this group (name or gid) may call the API on the Unix socket, besides root:
    /// the runtime directory becomes group-searchable (0710) and the socket group-writable
    /// (0660). Other callers are refused (PERMISSION_DENIED) and logged.
    #[arg(long, value_name = "GROUP")]
    pub api_group: Option<String>,

    /// A pager binary to start, `PATH` or `PATH=LABEL` (LABEL: its version label, default:
    /// what `PATH --print-version` prints). Repeatable: every one is started, the last one is
    /// the active version and the others stay running as roll-back targets (ActivateVersion)
    /// [default: `uffd-pager` beside this executable].
    #[arg(long, value_name = "PATH[=LABEL]", value_parser = parse_version_spec)]
    pub pager_binary: Vec<VersionSpec>,

    /// Version label of the pager binary, when one `--pager-binary` (or none) is given.
    #[arg(long)]
    pub pager_version: Option<String>,

    /// A TOML file listing the pager versions to start, instead of --pager-binary:
    /// `[[versions]]` tables with `binary_path`, optional `version`, and `active = true` on one.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["pager_binary", "pager_version"])]
    pub versions_config: Option<PathBuf>,

    /// How long a finished session (graduated, ended, failed) stays listed, e.g. 90s, 30m, 1h.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub finished_retention: Duration,

    /// Log line format on stderr (filter with RUST_LOG; default info).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// How log events are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    Text,
    /// One JSON object per line.
    Json,
}

/// Parses `IP:PORT`, `[IPv6]:PORT` or `localhost:PORT` (as 127.0.0.1). Host names other than
/// localhost are refused: the address must be known before it is checked for loopback.
pub fn parse_listen_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(addr);
    }
    if let Some(port) = s.strip_prefix("localhost:") {
        let port: u16 = port.parse().map_err(|e| format!("bad port {port:?}: {e}"))?;
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    Err(format!("{s:?} is not IP:PORT, [IPv6]:PORT or localhost:PORT"))
}

/// Parses a duration: one or more `<number><unit>` with units `ms`, `s`, `m`, `h`, `d`
/// (`1h`, `90s`, `1h30m`), or `0`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err("empty duration".into());
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!("{s:?}: expected a number at {rest:?}"));
        }
        let n: u64 = rest[..digits].parse().map_err(|e| format!("{s:?}: {e}"))?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let part = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            "d" => Duration::from_secs(n.saturating_mul(86400)),
            "" => return Err(format!("{s:?}: missing unit after {n} (ms, s, m, h or d)")),
            other => return Err(format!("{s:?}: unknown unit {other:?} (ms, s, m, h or d)")),
        };
        total = total.saturating_add(part);
    }
    Ok(total)
}

/// `uffd-pager` beside the running executable.
pub fn default_pager_binary() -> std::io::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    Ok(exe.with_file_name("uffd-pager"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_parse_as_ip_port_or_localhost() {
        for a in ["127.0.0.1:7000", "0.0.0.0:7000", "[::1]:7000", "[::ffff:127.0.0.1]:7000"] {
            assert_eq!(parse_listen_addr(a).unwrap(), a.parse().unwrap(), "{a}");
        }
        assert_eq!(parse_listen_addr("localhost:7000").unwrap(), "127.0.0.1:7000".parse().unwrap());
    }

    #[test]
    fn cannot_parse_host_names_or_missing_ports() {
        assert!(parse_listen_addr("example.com:80").is_err());
        assert!(parse_listen_addr("127.0.0.1").is_err());
        assert!(parse_listen_addr("localhost:http").is_err());
    }

    #[test]
    fn durations_read_as_operators_write_them() {
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172800)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
    }

    #[test]
    fn cannot_parse_durations_without_units_or_numbers() {
        assert!(parse_duration("").is_err());
        assert!(parse_duration("10").unwrap_err().contains("missing unit"));
        assert!(parse_duration("h").unwrap_err().contains("expected a number"));
        assert!(parse_duration("5 minutes").is_err());
        assert!(parse_duration("5w").unwrap_err().contains("unknown unit"));
    }

    #[test]
    fn the_command_line_parses_with_defaults() {
        let cli = Cli::try_parse_from(["uffd-supervisor"]).unwrap();
        assert_eq!(cli.runtime_dir, PathBuf::from("/run/uffd-pager"));
        assert_eq!(cli.finished_retention, Duration::from_secs(3600));
        assert_eq!(cli.log_format, LogFormat::Text);
        assert!(cli.listen_tcp.is_none() && !cli.insecure_plaintext_tcp && cli.api_group.is_none());
        let cli = Cli::try_parse_from([
            "uffd-supervisor",
            "--listen-tcp",
            "localhost:9000",
            "--log-format",
            "json",
            "--finished-retention",
            "5m",
        ])
        .unwrap();
        assert_eq!(cli.listen_tcp, Some("127.0.0.1:9000".parse().unwrap()));
        assert_eq!(cli.log_format, LogFormat::Json);
        assert_eq!(cli.finished_retention, Duration::from_secs(300));
    }

    #[test]
    fn pager_binaries_repeat_and_exclude_a_versions_file() {
        let cli = Cli::try_parse_from([
            "uffd-supervisor",
            "--pager-binary",
            "/opt/1/uffd-pager=v1",
            "--pager-binary",
            "/opt/2/uffd-pager=v2",
        ])
        .unwrap();
        let labels: Vec<&str> = cli.pager_binary.iter().map(|s| s.label.as_str()).collect();
        assert_eq!(labels, ["v1", "v2"]);
        let both = Cli::try_parse_from([
            "uffd-supervisor",
            "--pager-binary",
            "/opt/1/uffd-pager",
            "--versions-config",
            "/etc/uffd/versions.toml",
        ]);
        assert!(both.is_err());
    }
}
