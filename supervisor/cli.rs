//! Command line of `uffd-supervisor`, and the checks made on it before anything starts.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use std::path::Path;

use clap::{Args, Parser};
use serde::{Deserialize, Serialize};
use uffdpager::config_error::{invalid, ConfigError};
pub use uffdpager::logging::LogFormat;
use uffdpager::tls::TcpSecurity;

use crate::refused_vmm::RefusedVmm;

use crate::version_spec::{parse_version_spec, VersionSpec, VersionsFileEntry};

/// The one public entry point of a host's uffd pagers: creates sessions, owns their VMM sockets,
/// spawns and tracks pager versions, and routes each session's calls to the version serving it.
#[derive(Debug, Parser)]
#[command(name = "uffd-supervisor", version)]
pub struct Cli {
    /// TOML configuration file (see deploy/supervisor.example.toml): every flag below has a key
    /// of the same name (underscores), and `[[versions]]` tables; flags override the file.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    #[command(flatten)]
    pub settings: Settings,
}

/// Every setting, as the file and the flags write it (one struct for both: a new flag is a new
/// key). Unset: the default, applied by [`Settings::resolve`].
#[derive(Debug, Clone, Default, PartialEq, Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Runtime directory: supervisor.sock, sessions/, pagers/. Created (mode 0700) if missing;
    /// an existing one must be a real directory owned by this user and not writable by group or
    /// others (its mode is left as it is) [default: /run/uffd-pager].
    #[arg(long, value_name = "DIR")]
    pub runtime_dir: Option<PathBuf>,

    /// Most sessions not yet finished (PENDING, SERVING, COMPLETING) at once; CreateSession
    /// answers RESOURCE_EXHAUSTED beyond it [default: 1024].
    #[arg(long, value_name = "N")]
    pub max_sessions: Option<usize>,

    /// What becomes of a VMM whose session fails before it is served (its handshake refused, no
    /// pager to take it): `kill` sends it SIGKILL through a pidfd (it would hang on its first
    /// page fault for ever), `keep` leaves it to the operator [default: kill].
    #[arg(long, value_enum, value_name = "POLICY")]
    pub refused_vmm: Option<RefusedVmm>,

    /// Also serve the Supervisor API on this TCP address (`IP:PORT` or `localhost:PORT`), with
    /// TLS and client certificates (--tls-cert, --tls-key, --tls-client-ca), or as plain TCP on
    /// a loopback address with --insecure-plaintext-tcp.
    #[arg(long, value_name = "ADDR")]
    pub listen_tcp: Option<String>,

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
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub insecure_plaintext_tcp: Option<bool>,

    /// Members of this group (name or gid) may call the API on the Unix socket, besides root:
    /// the runtime directory becomes group-searchable (0710) and the socket group-writable
    /// (0660). Other callers are refused (PERMISSION_DENIED) and logged.
    #[arg(long, value_name = "GROUP")]
    pub api_group: Option<String>,

    /// Serve Prometheus metrics on `http://ADDR/metrics` (`IP:PORT` or `localhost:PORT`), e.g.
    /// 127.0.0.1:9464. Off unless given.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<String>,

    /// A pager binary to start, `PATH` or `PATH=LABEL` (LABEL: its version label, default:
    /// what `PATH --print-version` prints). Repeatable: every one is started, the last one is
    /// the active version and the others stay running as roll-back targets (ActivateVersion)
    /// [default: the file's `[[versions]]`, else `uffd-pager` beside this executable].
    #[arg(long, value_name = "PATH[=LABEL]")]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pager_binary: Vec<String>,

    /// Version label of the pager binary, when one `--pager-binary` (or none) is given.
    #[arg(long, value_name = "LABEL")]
    pub pager_version: Option<String>,

    /// A TOML file listing the pager versions to start, instead of --pager-binary:
    /// `[[versions]]` tables with `binary_path`, optional `version`, `active = true` on one,
    /// and the pager's tuning (`fault_threads`, `copy_threads`, `complete_step_bytes`,
    /// `fault_spin_us`, `fault_around_kib`, `memory_file_linger_secs`, `follow_vcpus`).
    #[arg(long, value_name = "FILE")]
    pub versions_config: Option<PathBuf>,

    /// How long a finished session (graduated, ended, failed) stays listed, e.g. 90s, 30m, 1h
    /// [default: 1h].
    #[arg(long, value_name = "DURATION")]
    pub finished_retention: Option<String>,

    /// Most bytes of overlay pages one session may be given at CreateSession (`64M`, `1G`,
    /// or bytes) [default: 64M].
    #[arg(long, value_name = "BYTES")]
    pub max_overlay_bytes: Option<String>,
    /// A pager whose health check answers NOT_SERVING (a fault worker stalled) for this long
    /// without a break is killed, and its sessions re-adopted by another process [default: 5s].
    #[arg(long, value_name = "DURATION")]
    pub pager_unhealthy_timeout: Option<String>,

    /// Log line format on stderr (filter with RUST_LOG; default info) [default: text].
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,

    /// The pager versions to start (config file only: `[[versions]]` tables).
    #[arg(skip)]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub versions: Vec<VersionsFileEntry>,
}

/// The effective settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    pub runtime_dir: PathBuf,
    pub max_sessions: usize,
    pub refused_vmm: RefusedVmm,
    pub listen_tcp: Option<SocketAddr>,
    /// What the TCP listener serves (Some exactly when `listen_tcp` is).
    pub tcp_security: Option<TcpSecurity>,
    /// The group whose members may call on the Unix socket (name or gid, as written).
    pub api_group: Option<String>,
    pub metrics_listen: Option<SocketAddr>,
    pub pager_binary: Vec<VersionSpec>,
    pub pager_version: Option<String>,
    pub versions_config: Option<PathBuf>,
    pub versions: Vec<VersionsFileEntry>,
    pub finished_retention: Duration,
    pub max_overlay_bytes: u64,
    pub pager_unhealthy_timeout: Duration,
    pub log_format: LogFormat,
}

impl Settings {
    /// Parses a config file's text; relative paths in it (`versions_config`, `[[versions]]`'
    /// `binary_path`) are taken from `base`, the file's directory.
    pub fn from_toml(text: &str, path: &Path, base: &Path) -> Result<Self, ConfigError> {
        let mut s: Settings = toml::from_str(text)
            .map_err(|source| ConfigError::Parse { path: path.into(), source })?;
        for v in &mut s.versions {
            v.binary_path = base.join(&v.binary_path);
        }
        s.versions_config = s.versions_config.map(|p| base.join(p));
        Ok(s)
    }

    /// Reads a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.into(), source })?;
        let base = std::path::absolute(path)
            .map_err(|source| ConfigError::Read { path: path.into(), source })?
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        Self::from_toml(&text, path, &base)
    }

    /// These settings with every one that `over` sets replaced by its value (a list replaces
    /// the whole list). Field by field through their TOML form, so a new setting needs no code
    /// here.
    pub fn overlay(self, over: Settings) -> Result<Settings, ConfigError> {
        let table = |s: Settings| match toml::Value::try_from(s) {
            Ok(toml::Value::Table(t)) => Ok(t),
            Ok(other) => Err(ConfigError::Merge(format!("not a table: {other}"))),
            Err(e) => Err(ConfigError::Merge(e.to_string())),
        };
        let mut base = table(self)?;
        for (k, v) in table(over)? {
            base.insert(k, v);
        }
        toml::Value::Table(base)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Merge(e.to_string()))
    }

    /// Fills in the defaults and checks every setting.
    pub fn resolve(self) -> Result<Resolved, ConfigError> {
        let listen_tcp = self
            .listen_tcp
            .as_deref()
            .map(|a| parse_listen_addr(a).map_err(|e| invalid("listen_tcp", e)))
            .transpose()?;
        let tcp_security = uffdpager::tls::tcp_security(
            listen_tcp,
            self.tls_cert.as_deref(),
            self.tls_key.as_deref(),
            self.tls_client_ca.as_deref(),
            self.insecure_plaintext_tcp.unwrap_or(false),
        )
        .map_err(|e| invalid("listen_tcp", e.to_string()))?;
        let metrics_listen = self
            .metrics_listen
            .as_deref()
            .map(|a| parse_listen_addr(a).map_err(|e| invalid("metrics_listen", e)))
            .transpose()?;
        let pager_binary = self
            .pager_binary
            .iter()
            .map(|s| parse_version_spec(s).map_err(|e| invalid("pager_binary", e.to_string())))
            .collect::<Result<Vec<_>, _>>()?;
        let finished_retention = match self.finished_retention.as_deref() {
            None => Duration::from_secs(3600),
            Some(d) => parse_duration(d).map_err(|e| invalid("finished_retention", e))?,
        };
        let max_sessions = match self.max_sessions {
            None => crate::core::DEFAULT_MAX_SESSIONS,
            Some(0) => return Err(invalid("max_sessions", "at least one session must be allowed")),
            Some(n) => n,
        };
        let max_overlay_bytes = match self.max_overlay_bytes.as_deref() {
            None => 64 << 20,
            Some(b) => parse_bytes(b).map_err(|e| invalid("max_overlay_bytes", e))?,
        };
        let pager_unhealthy_timeout = match self.pager_unhealthy_timeout.as_deref() {
            None => Duration::from_secs(5),
            Some(d) => parse_duration(d).map_err(|e| invalid("pager_unhealthy_timeout", e))?,
        };
        Ok(Resolved {
            runtime_dir: self.runtime_dir.unwrap_or_else(|| PathBuf::from(DEFAULT_RUNTIME_DIR)),
            max_sessions,
            refused_vmm: self.refused_vmm.unwrap_or_default(),
            listen_tcp,
            tcp_security,
            api_group: self.api_group,
            metrics_listen,
            pager_binary,
            pager_version: self.pager_version,
            versions_config: self.versions_config,
            versions: self.versions,
            finished_retention,
            max_overlay_bytes,
            pager_unhealthy_timeout,
            log_format: self.log_format.unwrap_or_default(),
        })
    }
}

impl Cli {
    /// The effective settings: defaults, then the file, then the flags.
    pub fn resolve(&self) -> Result<Resolved, ConfigError> {
        let file = match &self.config {
            Some(path) => Settings::load(path)?,
            None => Settings::default(),
        };
        file.overlay(self.settings.clone())?.resolve()
    }
}

/// The runtime directory unless told otherwise.
pub const DEFAULT_RUNTIME_DIR: &str = "/run/uffd-pager";

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

/// Parses a byte count: a number with an optional `K`, `M` or `G` suffix (powers of 1024).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, shift) = match s.char_indices().last() {
        Some((i, 'K' | 'k')) => (&s[..i], 10),
        Some((i, 'M' | 'm')) => (&s[..i], 20),
        Some((i, 'G' | 'g')) => (&s[..i], 30),
        _ => (s, 0),
    };
    let n: u64 = digits.parse().map_err(|e| format!("{s:?} is not a byte count: {e}"))?;
    n.checked_mul(1 << shift).ok_or_else(|| format!("{s:?} is too large"))
}

pub use uffdpager::duration::parse_duration;

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

    fn resolved(args: &[&str]) -> Result<Resolved, ConfigError> {
        Cli::try_parse_from(std::iter::once("uffd-supervisor").chain(args.iter().copied()))
            .unwrap()
            .resolve()
    }

    #[test]
    fn the_command_line_parses_with_defaults() {
        let r = resolved(&[]).unwrap();
        assert_eq!(r.runtime_dir, PathBuf::from("/run/uffd-pager"));
        assert_eq!(r.finished_retention, Duration::from_secs(3600));
        assert_eq!(r.log_format, LogFormat::Text);
        assert!(r.listen_tcp.is_none() && r.metrics_listen.is_none());
        assert_eq!(r.max_sessions, crate::core::DEFAULT_MAX_SESSIONS);
        assert_eq!(r.refused_vmm, RefusedVmm::Kill);
        assert!(r.tcp_security.is_none() && r.api_group.is_none());
        let r = resolved(&[
            "--listen-tcp",
            "localhost:9000",
            "--insecure-plaintext-tcp",
            "--log-format",
            "json",
            "--finished-retention",
            "5m",
            "--metrics-listen",
            "127.0.0.1:9464",
        ])
        .unwrap();
        assert_eq!(r.listen_tcp, Some("127.0.0.1:9000".parse().unwrap()));
        assert_eq!(r.metrics_listen, Some("127.0.0.1:9464".parse().unwrap()));
        assert_eq!(r.log_format, LogFormat::Json);
        assert_eq!(r.finished_retention, Duration::from_secs(300));
        assert_eq!(r.tcp_security, Some(TcpSecurity::Plaintext));
        let err = resolved(&["--listen-tcp", "127.0.0.1:9000"]).unwrap_err().to_string();
        assert!(err.contains("--insecure-plaintext-tcp"), "{err}");
        let err = resolved(&["--listen-tcp", "0.0.0.0:9000", "--insecure-plaintext-tcp"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a loopback address"), "{err}");
        let tls = resolved(&[
            "--listen-tcp",
            "0.0.0.0:9000",
            "--tls-cert",
            "/c.pem",
            "--tls-key",
            "/k.pem",
            "--tls-client-ca",
            "/ca.pem",
        ])
        .unwrap();
        assert!(matches!(tls.tcp_security, Some(TcpSecurity::Tls(_))));
    }

    #[test]
    fn the_session_cap_and_the_refused_vmm_policy_are_flags_and_keys() {
        let r = resolved(&["--max-sessions", "8", "--refused-vmm", "keep"]).unwrap();
        assert_eq!((r.max_sessions, r.refused_vmm), (8, RefusedVmm::Keep));
        let err = resolved(&["--max-sessions", "0"]).unwrap_err().to_string();
        assert!(err.contains("max_sessions"), "{err}");
        assert!(Cli::try_parse_from(["s", "--refused-vmm", "maybe"]).is_err());
        let file = Settings::from_toml(
            "max_sessions = 16\nrefused_vmm = \"keep\"\n",
            Path::new("f.toml"),
            Path::new("/"),
        )
        .unwrap();
        let r = file.resolve().unwrap();
        assert_eq!((r.max_sessions, r.refused_vmm), (16, RefusedVmm::Keep));
    }

    #[test]
    fn pager_binaries_repeat() {
        let r = resolved(&[
            "--pager-binary",
            "/opt/1/uffd-pager=v1",
            "--pager-binary",
            "/opt/2/uffd-pager=v2",
        ])
        .unwrap();
        let labels: Vec<&str> = r.pager_binary.iter().map(|s| s.label.as_str()).collect();
        assert_eq!(labels, ["v1", "v2"]);
    }

    #[test]
    fn flags_override_the_file_and_lists_replace_lists() {
        let file = Settings::from_toml(
            "runtime_dir = \"/var/run/x\"\nfinished_retention = \"2h\"\n\
             pager_binary = [\"/a=v1\"]\n[[versions]]\nbinary_path = \"bin/p\"\nfault_threads = 3\n",
            Path::new("f.toml"),
            Path::new("/etc/uffd"),
        )
        .unwrap();
        assert_eq!(file.versions[0].binary_path, PathBuf::from("/etc/uffd/bin/p"));
        let flags = Cli::try_parse_from(["s", "--finished-retention", "5m"]).unwrap().settings;
        let r = file.clone().overlay(flags).unwrap().resolve().unwrap();
        assert_eq!(r.runtime_dir, PathBuf::from("/var/run/x"));
        assert_eq!(r.finished_retention, Duration::from_secs(300));
        assert_eq!(r.pager_binary.len(), 1);
        assert_eq!(r.versions[0].fault_threads, Some(3));
        let flags =
            Cli::try_parse_from(["s", "--pager-binary", "/b=v2", "--pager-binary", "/c=v3"])
                .unwrap()
                .settings;
        let r = file.overlay(flags).unwrap().resolve().unwrap();
        let labels: Vec<&str> = r.pager_binary.iter().map(|s| s.label.as_str()).collect();
        assert_eq!(labels, ["v2", "v3"]);
    }

    /// Every flag (but --config) has a config-file key of the same name.
    #[test]
    fn every_flag_is_a_key_of_the_config_file() {
        use clap::CommandFactory;
        for arg in Cli::command().get_arguments() {
            let id = arg.get_id().as_str();
            if matches!(id, "config" | "help" | "version") {
                continue;
            }
            let err = Settings::from_toml(&format!("{id} = {{}}"), Path::new("t"), Path::new("/"))
                .unwrap_err()
                .to_string();
            assert!(!err.contains("unknown field"), "--{id} has no config key: {err}");
        }
    }

    /// The example file documents every key, and loads.
    #[test]
    fn the_example_config_documents_every_setting_and_loads() {
        use clap::CommandFactory;
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/supervisor.example.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        for arg in Cli::command().get_arguments() {
            let id = arg.get_id().as_str();
            if matches!(id, "config" | "help" | "version") {
                continue;
            }
            assert!(
                text.lines().any(|l| l.trim_start_matches("# ").starts_with(&format!("{id} ="))),
                "deploy/supervisor.example.toml does not document `{id}`"
            );
        }
        for key in [
            "fault_threads",
            "copy_threads",
            "complete_step_bytes",
            "fault_spin_us",
            "fault_around_kib",
            "memory_file_linger_secs",
            "follow_vcpus",
        ] {
            assert!(text.contains(&format!("{key} =")), "[[versions]] key {key} undocumented");
        }
        let r = Settings::load(&path).unwrap().resolve().unwrap();
        assert!(r.metrics_listen.is_some_and(|a| a.ip().is_loopback()));
        assert!(!r.versions.is_empty());
    }
}
