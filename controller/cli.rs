//! Command line of `uffd-controller`: a config file and one flag per setting, each overriding the
//! file. The values are checked in one place, [`crate::config::Settings::resolve`], whether they
//! come from the file or from here.

use std::path::PathBuf;

use clap::Parser;
pub use uffdpager::logging::LogFormat;

use crate::config::Settings;

/// Graduates Firecracker VMs off their uffd pagers: watches supervisors' session inventories and
/// calls CompleteSession on soaked sessions, outdated pager versions first, oldest first.
#[derive(Debug, Parser)]
#[command(name = "uffd-controller", version)]
pub struct Cli {
    /// TOML configuration file (see controller/controller.example.toml); flags override it.
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,

    /// Graduate sessions: `--enabled`, `--enabled=false` [default: false: a strict no-op].
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub enabled: Option<bool>,

    /// Run the loop but record what would graduate instead of calling CompleteSession.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub dry_run: Option<bool>,

    /// Soak before graduation, from the session's connected_at [default: 10m].
    #[arg(long, value_name = "DURATION", allow_hyphen_values = true)]
    pub min_session_age: Option<String>,

    /// CompleteSession calls in flight at once, across all supervisors [default: 1].
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub max_concurrent: Option<i64>,

    /// 0: every soaked session graduates; N: bring each supervisor's serving count down to N
    /// [default: 0].
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub max_active_sessions: Option<i64>,

    /// How often the plan is recomputed [default: 1m].
    #[arg(long, value_name = "DURATION", allow_hyphen_values = true)]
    pub scan_interval: Option<String>,

    /// Deadline of one CompleteSession [default: 10m].
    #[arg(long, value_name = "DURATION", allow_hyphen_values = true)]
    pub completion_timeout: Option<String>,

    /// Least wait before retrying a session whose graduation failed [default: 5m].
    #[arg(long, value_name = "DURATION", allow_hyphen_values = true)]
    pub failure_backoff: Option<String>,

    /// Supervisor endpoints, `unix:/path`, `https://host:port` (with --supervisor-tls-*) or
    /// `http://` and a loopback host; repeat the flag or separate with commas. Replaces the
    /// file's list.
    #[arg(long, alias = "supervisor", value_name = "ENDPOINT", value_delimiter = ',')]
    pub supervisors: Vec<String>,

    /// The Controller API's Unix socket, `unix:/path` [default: unix:/run/uffd-pager/controller.sock].
    #[arg(long, value_name = "unix:PATH")]
    pub listen: Option<String>,

    /// Members of this group (name or gid) may call the API on the Unix socket, besides root
    /// (the socket becomes 0660 and of that group); others get PERMISSION_DENIED.
    #[arg(long, value_name = "GROUP")]
    pub api_group: Option<String>,

    /// Also serve the Controller API on this TCP address (IP:PORT): TLS with client
    /// certificates (--tls-cert, --tls-key, --tls-client-ca), or plain TCP on loopback with
    /// --insecure-plaintext-tcp.
    #[arg(long, value_name = "IP:PORT")]
    pub listen_tcp: Option<String>,

    /// The TCP listener's certificate (chain), PEM.
    #[arg(long, value_name = "PEM")]
    pub tls_cert: Option<PathBuf>,

    /// The TCP listener's private key, PEM.
    #[arg(long, value_name = "PEM")]
    pub tls_key: Option<PathBuf>,

    /// The CA that signs the certificates of the TCP clients allowed to call, PEM.
    #[arg(long, value_name = "PEM")]
    pub tls_client_ca: Option<PathBuf>,

    /// Serve --listen-tcp as plain, unauthenticated TCP (loopback addresses only).
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub insecure_plaintext_tcp: Option<bool>,

    /// The controller's client certificate for https:// supervisors, PEM.
    #[arg(long, value_name = "PEM")]
    pub supervisor_tls_cert: Option<PathBuf>,

    /// The private key of --supervisor-tls-cert, PEM.
    #[arg(long, value_name = "PEM")]
    pub supervisor_tls_key: Option<PathBuf>,

    /// The CA that signs the supervisors' certificates, PEM.
    #[arg(long, value_name = "PEM")]
    pub supervisor_tls_ca: Option<PathBuf>,

    /// Graduation outcomes kept for GetStatus [default: 100].
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub outcome_history: Option<i64>,

    /// Graduate nothing on a supervisor whose host has less available memory (its
    /// MemAvailable), e.g. 4GiB, 512M [default: 0: no check].
    #[arg(long, value_name = "SIZE")]
    pub min_available_memory: Option<String>,

    /// Serve Prometheus metrics on http://IP:PORT/metrics [default: off].
    #[arg(long, value_name = "IP:PORT")]
    pub metrics_listen: Option<String>,

    /// Log line format on stderr (filter with RUST_LOG; default info).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

impl Cli {
    /// The settings given as flags (to lay over the file's).
    pub fn settings(&self) -> Settings {
        Settings {
            enabled: self.enabled,
            dry_run: self.dry_run,
            min_session_age: self.min_session_age.clone(),
            max_concurrent: self.max_concurrent,
            max_active_sessions: self.max_active_sessions,
            scan_interval: self.scan_interval.clone(),
            completion_timeout: self.completion_timeout.clone(),
            failure_backoff: self.failure_backoff.clone(),
            supervisors: (!self.supervisors.is_empty()).then(|| self.supervisors.clone()),
            listen: self.listen.clone(),
            api_group: self.api_group.clone(),
            listen_tcp: self.listen_tcp.clone(),
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            tls_client_ca: self.tls_client_ca.clone(),
            insecure_plaintext_tcp: self.insecure_plaintext_tcp,
            supervisor_tls_cert: self.supervisor_tls_cert.clone(),
            supervisor_tls_key: self.supervisor_tls_key.clone(),
            supervisor_tls_ca: self.supervisor_tls_ca.clone(),
            outcome_history: self.outcome_history,
            min_available_memory: self.min_available_memory.clone(),
            metrics_listen: self.metrics_listen.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("uffd-controller").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn no_flags_set_nothing() {
        let c = cli(&[]);
        assert_eq!(c.settings(), Settings::default());
        assert_eq!(c.log_format, LogFormat::Text);
        assert!(c.config.is_none());
    }

    #[test]
    fn every_setting_has_a_flag() {
        let c = cli(&[
            "--enabled",
            "--dry-run",
            "--min-session-age",
            "1s",
            "--max-concurrent",
            "2",
            "--max-active-sessions",
            "3",
            "--scan-interval",
            "200ms",
            "--completion-timeout",
            "30s",
            "--failure-backoff",
            "2s",
            "--supervisors",
            "unix:/a,unix:/b",
            "--supervisor",
            "https://10.0.0.2:1",
            "--listen",
            "unix:/tmp/c.sock",
            "--api-group",
            "uffd",
            "--listen-tcp",
            "0.0.0.0:7101",
            "--tls-cert",
            "/etc/uffd/controller.pem",
            "--tls-key",
            "/etc/uffd/controller.key",
            "--tls-client-ca",
            "/etc/uffd/ca.pem",
            "--supervisor-tls-cert",
            "/etc/uffd/client.pem",
            "--supervisor-tls-key",
            "/etc/uffd/client.key",
            "--supervisor-tls-ca",
            "/etc/uffd/ca.pem",
            "--outcome-history",
            "5",
        ]);
        let s = c.settings();
        assert_eq!((s.enabled, s.dry_run), (Some(true), Some(true)));
        assert_eq!(s.min_session_age.as_deref(), Some("1s"));
        assert_eq!((s.max_concurrent, s.max_active_sessions), (Some(2), Some(3)));
        assert_eq!(s.supervisors.as_deref().unwrap(), ["unix:/a", "unix:/b", "https://10.0.0.2:1"]);
        assert_eq!(s.api_group.as_deref(), Some("uffd"));
        let config = s.resolve().unwrap();
        assert!(matches!(config.listen_security, Some(uffdpager::tls::TcpSecurity::Tls(_))));
        assert_eq!(config.supervisor_tls.unwrap().cert, PathBuf::from("/etc/uffd/client.pem"));
        let config = cli(&["--enabled", "--supervisors", "unix:/a"]).settings().resolve().unwrap();
        assert!(config.enabled);
        let plain = cli(&["--listen-tcp", "127.0.0.1:7101", "--insecure-plaintext-tcp"]);
        let config = plain.settings().resolve().unwrap();
        assert_eq!(config.listen_security, Some(uffdpager::tls::TcpSecurity::Plaintext));
    }

    #[test]
    fn booleans_can_be_turned_off_explicitly() {
        assert_eq!(cli(&["--enabled=false"]).enabled, Some(false));
        assert_eq!(cli(&["--dry-run=false"]).dry_run, Some(false));
        assert!(Cli::try_parse_from(["uffd-controller", "--enabled=maybe"]).is_err());
    }

    #[test]
    fn negative_values_reach_validation_and_are_refused_there() {
        let e = cli(&["--max-concurrent", "-1"]).settings().resolve().unwrap_err().to_string();
        assert!(e.contains("`max_concurrent`"), "{e}");
        let e = cli(&["--failure-backoff", "-5m"]).settings().resolve().unwrap_err().to_string();
        assert!(e.contains("`failure_backoff`") && e.contains("negative"), "{e}");
    }
}
