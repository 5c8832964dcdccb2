//! The controller's configuration: settings as an operator writes them (a TOML file, then flags
//! over it), the design's defaults, and the one place where they are checked.
//!
//! Every setting is optional where it is written ([`Settings`]); [`Settings::resolve`] fills in
//! the defaults of DESIGN.md's "Controller policy" and refuses what makes no sense with an error
//! that names the setting. Integers are read signed and durations as text so that `-1` or `-5m`
//! is reported as negative instead of failing somewhere less clear.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use uffdpager::config_error::{invalid, ConfigError};
use uffdpager::tls::{TcpSecurity, TlsFiles};

/// Where the Controller API listens unless told otherwise.
pub const DEFAULT_LISTEN: &str = "unix:/run/uffd-pager/controller.sock";
/// Outcomes kept for GetStatus unless told otherwise.
pub const DEFAULT_OUTCOME_HISTORY: usize = 100;
/// Longest duration any setting accepts (keeps every time sum far from overflow).
pub use uffdpager::duration::parse_duration;
/// Most outcomes GetStatus can keep.
const MAX_OUTCOME_HISTORY: i64 = 100_000;

/// The graduation policy (DESIGN.md, "Controller policy").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Soak: least age (from the session's `connected_at`) before a session may graduate.
    pub min_session_age: Duration,
    /// CompleteSession calls in flight at once, across every supervisor (at least 1).
    pub max_concurrent: u32,
    /// 0: every soaked session graduates; N: only enough to bring the serving count down to N.
    pub max_active_sessions: u32,
    /// How often the plan is recomputed (stream events also trigger a scan).
    pub scan_interval: Duration,
    /// Deadline of one CompleteSession call.
    pub completion_timeout: Duration,
    /// Least time between a failed graduation of a session and the next attempt.
    pub failure_backoff: Duration,
    /// No graduation on a supervisor whose host has less available memory, in bytes (0: no
    /// such check).
    pub min_available_memory: u64,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            min_session_age: Duration::from_secs(600),
            max_concurrent: 1,
            max_active_sessions: 0,
            scan_interval: Duration::from_secs(60),
            completion_timeout: Duration::from_secs(600),
            failure_backoff: Duration::from_secs(300),
            min_available_memory: 0,
        }
    }
}

/// The effective configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Disabled (the default): watches nothing, graduates nothing.
    pub enabled: bool,
    /// Runs the loop but records instead of calling CompleteSession.
    pub dry_run: bool,
    pub policy: Policy,
    /// Supervisor endpoints: `unix:/path`, `https://host:port` (mutual TLS with
    /// `supervisor_tls`), or `http://` and a loopback host (a supervisor serving plain TCP).
    pub supervisors: Vec<String>,
    /// The Controller API's Unix socket.
    pub listen: PathBuf,
    /// Members of this group (name or gid) may call the API on the Unix socket, besides root.
    pub api_group: Option<String>,
    /// Also serve the Controller API on this TCP address.
    pub listen_tcp: Option<SocketAddr>,
    /// What the TCP listener serves (Some exactly when `listen_tcp` is).
    pub listen_security: Option<TcpSecurity>,
    /// The controller's certificate, key and the CA of the supervisors it dials over https://.
    pub supervisor_tls: Option<TlsFiles>,
    /// Outcomes kept for GetStatus.
    pub outcome_history: usize,
    /// Serve Prometheus metrics on this address (`/metrics`).
    pub metrics_listen: Option<SocketAddr>,
}

/// Settings as written (file or flags): all optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub enabled: Option<bool>,
    pub dry_run: Option<bool>,
    pub min_session_age: Option<String>,
    pub max_concurrent: Option<i64>,
    pub max_active_sessions: Option<i64>,
    pub scan_interval: Option<String>,
    pub completion_timeout: Option<String>,
    pub failure_backoff: Option<String>,
    pub supervisors: Option<Vec<String>>,
    pub listen: Option<String>,
    pub api_group: Option<String>,
    pub listen_tcp: Option<String>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_client_ca: Option<PathBuf>,
    pub insecure_plaintext_tcp: Option<bool>,
    pub supervisor_tls_cert: Option<PathBuf>,
    pub supervisor_tls_key: Option<PathBuf>,
    pub supervisor_tls_ca: Option<PathBuf>,
    pub outcome_history: Option<i64>,
    pub min_available_memory: Option<String>,
    pub metrics_listen: Option<String>,
}

impl Settings {
    /// Parses a TOML document (`path` only names it in errors).
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|source| ConfigError::Parse { path: path.into(), source })
    }

    /// Reads and parses a TOML file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.into(), source })?;
        Self::from_toml(&text, path)
    }

    /// These settings, with every one that `over` sets replaced by its value (a list replaces
    /// the whole list).
    pub fn overlay(self, over: Settings) -> Settings {
        Settings {
            enabled: over.enabled.or(self.enabled),
            dry_run: over.dry_run.or(self.dry_run),
            min_session_age: over.min_session_age.or(self.min_session_age),
            max_concurrent: over.max_concurrent.or(self.max_concurrent),
            max_active_sessions: over.max_active_sessions.or(self.max_active_sessions),
            scan_interval: over.scan_interval.or(self.scan_interval),
            completion_timeout: over.completion_timeout.or(self.completion_timeout),
            failure_backoff: over.failure_backoff.or(self.failure_backoff),
            supervisors: over.supervisors.or(self.supervisors),
            listen: over.listen.or(self.listen),
            api_group: over.api_group.or(self.api_group),
            listen_tcp: over.listen_tcp.or(self.listen_tcp),
            tls_cert: over.tls_cert.or(self.tls_cert),
            tls_key: over.tls_key.or(self.tls_key),
            tls_client_ca: over.tls_client_ca.or(self.tls_client_ca),
            insecure_plaintext_tcp: over.insecure_plaintext_tcp.or(self.insecure_plaintext_tcp),
            supervisor_tls_cert: over.supervisor_tls_cert.or(self.supervisor_tls_cert),
            supervisor_tls_key: over.supervisor_tls_key.or(self.supervisor_tls_key),
            supervisor_tls_ca: over.supervisor_tls_ca.or(self.supervisor_tls_ca),
            outcome_history: over.outcome_history.or(self.outcome_history),
            min_available_memory: over.min_available_memory.or(self.min_available_memory),
            metrics_listen: over.metrics_listen.or(self.metrics_listen),
        }
    }

    /// Fills in the defaults and checks every setting.
    pub fn resolve(self) -> Result<Config, ConfigError> {
        let d = Policy::default();
        let policy = Policy {
            min_session_age: duration(
                "min_session_age",
                self.min_session_age,
                d.min_session_age,
                true,
            )?,
            max_concurrent: count("max_concurrent", self.max_concurrent, d.max_concurrent, 1)?,
            max_active_sessions: count(
                "max_active_sessions",
                self.max_active_sessions,
                d.max_active_sessions,
                0,
            )?,
            scan_interval: duration("scan_interval", self.scan_interval, d.scan_interval, false)?,
            completion_timeout: duration(
                "completion_timeout",
                self.completion_timeout,
                d.completion_timeout,
                false,
            )?,
            failure_backoff: duration(
                "failure_backoff",
                self.failure_backoff,
                d.failure_backoff,
                false,
            )?,
            min_available_memory: match self.min_available_memory.as_deref() {
                None => d.min_available_memory,
                Some(text) => {
                    parse_bytes(text).map_err(|reason| invalid("min_available_memory", reason))?
                }
            },
        };
        let enabled = self.enabled.unwrap_or(false);
        let supervisor_tls = uffdpager::tls::tls_files(
            self.supervisor_tls_cert.as_deref(),
            self.supervisor_tls_key.as_deref(),
            self.supervisor_tls_ca.as_deref(),
            ["supervisor_tls_cert", "supervisor_tls_key", "supervisor_tls_ca"],
        )
        .map_err(|e| invalid("supervisor_tls", e.to_string()))?;
        let supervisors = self.supervisors.unwrap_or_default();
        let mut seen = BTreeSet::new();
        for s in &supervisors {
            check_endpoint(s, supervisor_tls.is_some())
                .map_err(|reason| invalid("supervisors", reason))?;
            if !seen.insert(s.as_str()) {
                return Err(invalid("supervisors", format!("{s:?} is listed twice")));
            }
        }
        if enabled && supervisors.is_empty() {
            return Err(invalid(
                "supervisors",
                "the controller is enabled but watches no supervisor: give at least one endpoint \
                 (`unix:/path` or `http://host:port`)",
            ));
        }
        let listen = self.listen.unwrap_or_else(|| DEFAULT_LISTEN.to_string());
        let listen = match listen.strip_prefix("unix:") {
            Some(p) if Path::new(p).is_absolute() => PathBuf::from(p),
            _ => {
                return Err(invalid(
                    "listen",
                    format!("{listen:?} is not `unix:` and an absolute path"),
                ))
            }
        };
        let listen_tcp = self
            .listen_tcp
            .map(|a| {
                a.parse::<SocketAddr>()
                    .map_err(|e| invalid("listen_tcp", format!("{a:?} is not IP:PORT: {e}")))
            })
            .transpose()?;
        let listen_security = uffdpager::tls::tcp_security(
            listen_tcp,
            self.tls_cert.as_deref(),
            self.tls_key.as_deref(),
            self.tls_client_ca.as_deref(),
            self.insecure_plaintext_tcp.unwrap_or(false),
        )
        .map_err(|e| invalid("listen_tcp", e.to_string()))?;
        if let Some(g) =
            self.api_group.as_deref().filter(|g| g.is_empty() || g.contains(char::is_whitespace))
        {
            return Err(invalid("api_group", format!("{g:?} is not a group name or gid")));
        }
        let metrics_listen = self
            .metrics_listen
            .map(|a| {
                a.parse::<SocketAddr>()
                    .map_err(|e| invalid("metrics_listen", format!("{a:?} is not IP:PORT: {e}")))
            })
            .transpose()?;
        let history = self
            .outcome_history
            .unwrap_or(i64::try_from(DEFAULT_OUTCOME_HISTORY).unwrap_or(i64::MAX));
        if !(1..=MAX_OUTCOME_HISTORY).contains(&history) {
            return Err(invalid(
                "outcome_history",
                format!("must be between 1 and {MAX_OUTCOME_HISTORY} (got {history})"),
            ));
        }
        Ok(Config {
            enabled,
            dry_run: self.dry_run.unwrap_or(false),
            policy,
            supervisors,
            listen,
            api_group: self.api_group,
            listen_tcp,
            listen_security,
            supervisor_tls,
            outcome_history: usize::try_from(history).unwrap_or(DEFAULT_OUTCOME_HISTORY),
            metrics_listen,
        })
    }
}

/// Parses a byte size: a number of bytes, or a number with a unit `K`/`M`/`G`/`T` (powers of
/// 1000) or `KiB`/`MiB`/`GiB`/`TiB` (powers of 1024): `"4GiB"`, `"512M"`, `"0"`.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    if digits == 0 {
        return Err(format!("{text:?} is not a size like \"4GiB\" or \"512M\""));
    }
    let n: u64 = t[..digits].parse().map_err(|e| format!("{text:?}: {e}"))?;
    let unit: u64 = match t[digits..].trim() {
        "" | "B" => 1,
        "K" | "KB" => 1_000,
        "M" | "MB" => 1_000_000,
        "G" | "GB" => 1_000_000_000,
        "T" | "TB" => 1_000_000_000_000,
        "Ki" | "KiB" => 1 << 10,
        "Mi" | "MiB" => 1 << 20,
        "Gi" | "GiB" => 1 << 30,
        "Ti" | "TiB" => 1 << 40,
        other => {
            return Err(format!(
                "{text:?}: unknown unit {other:?} (K, M, G, T, KiB, MiB, GiB, TiB)"
            ))
        }
    };
    n.checked_mul(unit).ok_or_else(|| format!("{text:?} is too large"))
}

fn duration(
    setting: &'static str,
    value: Option<String>,
    default: Duration,
    zero_ok: bool,
) -> Result<Duration, ConfigError> {
    let Some(text) = value else { return Ok(default) };
    let d = parse_duration(&text).map_err(|reason| invalid(setting, reason))?;
    if d.is_zero() && !zero_ok {
        return Err(invalid(setting, format!("must be longer than zero (got {text:?})")));
    }
    Ok(d)
}

fn count(
    setting: &'static str,
    value: Option<i64>,
    default: u32,
    min: i64,
) -> Result<u32, ConfigError> {
    let Some(n) = value else { return Ok(default) };
    if n < min {
        return Err(invalid(setting, format!("must be at least {min} (got {n})")));
    }
    u32::try_from(n).map_err(|_| invalid(setting, format!("{n} is too large")))
}

/// Checks a supervisor endpoint: `unix:` and an absolute path; `https://host[:port]` (mutual
/// TLS: needs the supervisor TLS files, `client_tls`); or `http://` and a loopback host, since a
/// supervisor serves plain TCP (`--insecure-plaintext-tcp`) on loopback only.
pub fn check_endpoint(endpoint: &str, client_tls: bool) -> Result<(), String> {
    if let Some(path) = endpoint.strip_prefix("unix:") {
        if Path::new(path).is_absolute() {
            return Ok(());
        }
        return Err(format!("{endpoint:?}: `unix:` must be followed by an absolute path"));
    }
    let uri: tonic::transport::Uri = endpoint.parse().map_err(|e| {
        format!("{endpoint:?} is not `unix:/path`, `https://host:port` or `http://host:port`: {e}")
    })?;
    let host = match uri.authority() {
        Some(a) if !a.host().is_empty() => a.host(),
        _ => return Err(format!("{endpoint:?} names no host")),
    };
    match uri.scheme_str() {
        Some("https") if client_tls => Ok(()),
        Some("https") => Err(format!(
            "{endpoint:?}: https:// needs the controller's client certificate: set \
             supervisor_tls_cert, supervisor_tls_key and supervisor_tls_ca"
        )),
        Some("http") if is_loopback_host(host) => Ok(()),
        Some("http") => Err(format!(
            "{endpoint:?}: plain http:// only to a loopback supervisor (one started with \
             --insecure-plaintext-tcp); reach other hosts over https:// with client certificates"
        )),
        _ => Err(format!(
            "{endpoint:?} is not `unix:/path`, `https://host:port` or `http://host:port`"
        )),
    }
}

/// `localhost`, or a loopback IP address (IPv6 in brackets, as URIs write it).
fn is_loopback_host(host: &str) -> bool {
    host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.to_canonical().is_loopback())
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
