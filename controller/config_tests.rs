//! Settings as operators write them: defaults, overrides, and every refusal naming its setting.

use super::*;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Settings::from_toml(text, Path::new("test.toml"))?.resolve()
}

fn err(text: &str) -> String {
    parse(text).unwrap_err().to_string()
}

#[test]
fn nothing_written_means_disabled_with_the_designs_defaults() {
    let c = parse("").unwrap();
    assert!(!c.enabled && !c.dry_run);
    assert_eq!(c.policy, Policy::default());
    assert_eq!(c.policy.min_session_age, Duration::from_secs(600));
    assert_eq!(c.policy.failure_backoff, Duration::from_secs(300));
    assert_eq!(c.listen, PathBuf::from("/run/uffd-pager/controller.sock"));
    assert_eq!(c.outcome_history, DEFAULT_OUTCOME_HISTORY);
    assert!(c.supervisors.is_empty() && c.listen_tcp.is_none());
}

#[test]
fn every_setting_is_read_from_the_file() {
    let c = parse(
        r#"
        enabled = true
        dry_run = true
        min_session_age = "90s"
        max_concurrent = 3
        max_active_sessions = 5
        scan_interval = "10s"
        completion_timeout = "2m"
        failure_backoff = "1h 30m"
        supervisors = ["unix:/run/uffd-pager/supervisor.sock", "https://10.0.0.2:7000"]
        supervisor_tls_cert = "/etc/uffd/controller-client.pem"
        supervisor_tls_key = "/etc/uffd/controller-client.key"
        supervisor_tls_ca = "/etc/uffd/ca.pem"
        listen = "unix:/tmp/c.sock"
        api_group = "uffd"
        listen_tcp = "127.0.0.1:7100"
        insecure_plaintext_tcp = true
        outcome_history = 7
        "#,
    )
    .unwrap();
    assert!(c.enabled && c.dry_run);
    let p = &c.policy;
    assert_eq!(p.min_session_age, Duration::from_secs(90));
    assert_eq!((p.max_concurrent, p.max_active_sessions), (3, 5));
    assert_eq!(p.scan_interval, Duration::from_secs(10));
    assert_eq!(p.completion_timeout, Duration::from_secs(120));
    assert_eq!(p.failure_backoff, Duration::from_secs(5400));
    assert_eq!(c.supervisors.len(), 2);
    assert_eq!(c.listen, PathBuf::from("/tmp/c.sock"));
    assert_eq!(c.listen_tcp, Some("127.0.0.1:7100".parse().unwrap()));
    assert_eq!(c.listen_security, Some(uffdpager::tls::TcpSecurity::Plaintext));
    assert_eq!(c.api_group.as_deref(), Some("uffd"));
    assert_eq!(c.supervisor_tls.unwrap().ca, PathBuf::from("/etc/uffd/ca.pem"));
    assert_eq!(c.outcome_history, 7);
}

#[test]
fn the_example_file_is_valid() {
    let text = include_str!("controller.example.toml");
    let c =
        Settings::from_toml(text, Path::new("controller.example.toml")).unwrap().resolve().unwrap();
    assert!(c.enabled);
    assert_eq!(c.policy, Policy::default());
}

#[test]
fn flags_override_the_file_setting_by_setting() {
    let file = Settings {
        enabled: Some(true),
        max_concurrent: Some(4),
        supervisors: Some(vec!["unix:/a".into(), "unix:/b".into()]),
        ..Default::default()
    };
    let flags = Settings {
        enabled: Some(false),
        supervisors: Some(vec!["unix:/c".into()]),
        ..Default::default()
    };
    let c = file.overlay(flags).resolve().unwrap();
    assert!(!c.enabled);
    assert_eq!(c.policy.max_concurrent, 4);
    assert_eq!(c.supervisors, vec!["unix:/c".to_string()]);
}

#[test]
fn negative_numbers_are_refused_naming_the_setting() {
    let e = err("max_concurrent = -1");
    assert!(e.contains("`max_concurrent`") && e.contains("-1"), "{e}");
    let e = err("max_active_sessions = -3");
    assert!(e.contains("`max_active_sessions`") && e.contains("at least 0"), "{e}");
    let e = err("outcome_history = 0");
    assert!(e.contains("`outcome_history`"), "{e}");
}

#[test]
fn zero_is_refused_where_it_makes_no_sense() {
    for key in ["scan_interval", "completion_timeout", "failure_backoff"] {
        let e = err(&format!("{key} = \"0s\""));
        assert!(e.contains(&format!("`{key}`")) && e.contains("longer than zero"), "{e}");
    }
    let e = err("max_concurrent = 0");
    assert!(e.contains("`max_concurrent`") && e.contains("at least 1"), "{e}");
    let c = parse("min_session_age = \"0\"\nmax_active_sessions = 0").unwrap();
    assert_eq!(c.policy.min_session_age, Duration::ZERO);
}

#[test]
fn bad_durations_are_refused_naming_the_setting() {
    for (text, word) in
        [("\"-5m\"", "negative"), ("\"soon\"", "not a duration"), ("\"1000y\"", "365 days")]
    {
        let e = err(&format!("min_session_age = {text}"));
        assert!(e.contains("`min_session_age`") && e.contains(word), "{e}");
    }
    let e = err("scan_interval = 60");
    assert!(e.contains("scan_interval"), "{e}");
}

#[test]
fn unknown_keys_are_refused() {
    let e = err("max_concurent = 2");
    assert!(e.contains("max_concurent"), "{e}");
}

#[test]
fn an_enabled_controller_needs_a_supervisor() {
    let e = err("enabled = true");
    assert!(e.contains("`supervisors`"), "{e}");
}

#[test]
fn supervisor_endpoints_are_checked() {
    for bad in ["unix:relative.sock", "/run/x.sock", "ftp://h:1", "http://", "https://", ""] {
        assert!(check_endpoint(bad, true).is_err(), "{bad:?}");
        let e = err(&format!("supervisors = [{bad:?}]"));
        assert!(e.contains("`supervisors`"), "{e}");
    }
    for good in ["unix:/run/uffd-pager/supervisor.sock", "http://127.0.0.1:7000", "http://[::1]:1"]
    {
        assert_eq!(check_endpoint(good, false), Ok(()), "{good}");
    }
    assert_eq!(check_endpoint("http://localhost:7000", false), Ok(()));
    assert_eq!(check_endpoint("https://host:1", true), Ok(()));
    let e = check_endpoint("https://host:1", false).unwrap_err();
    assert!(e.contains("supervisor_tls_cert"), "{e}");
    let e = check_endpoint("http://10.0.0.2:7000", true).unwrap_err();
    assert!(e.contains("loopback"), "{e}");
    let e = err("supervisors = [\"unix:/a\", \"unix:/a\"]");
    assert!(e.contains("twice"), "{e}");
}

#[test]
fn tcp_listeners_need_tls_or_the_explicit_plaintext_flag_on_loopback() {
    let e = err("listen_tcp = \"127.0.0.1:7100\"");
    assert!(e.contains("`listen_tcp`") && e.contains("--insecure-plaintext-tcp"), "{e}");
    let e = err("listen_tcp = \"0.0.0.0:7100\"\ninsecure_plaintext_tcp = true");
    assert!(e.contains("not a loopback address"), "{e}");
    let c = parse(
        "listen_tcp = \"0.0.0.0:7100\"\ntls_cert = \"/c.pem\"\ntls_key = \"/k.pem\"\n\
         tls_client_ca = \"/ca.pem\"",
    )
    .unwrap();
    assert!(matches!(c.listen_security, Some(uffdpager::tls::TcpSecurity::Tls(_))));
    let e = err("supervisor_tls_cert = \"/c.pem\"");
    assert!(e.contains("`supervisor_tls`") && e.contains("supervisor_tls_key"), "{e}");
}

#[test]
fn listen_addresses_are_checked() {
    assert!(err("listen = \"/tmp/c.sock\"").contains("`listen`"));
    assert!(err("listen = \"unix:c.sock\"").contains("`listen`"));
    assert!(err("listen_tcp = \"localhost\"").contains("`listen_tcp`"));
}

#[test]
fn a_missing_file_is_reported_with_its_path() {
    let e = Settings::load(Path::new("/nonexistent/controller.toml")).unwrap_err().to_string();
    assert!(e.contains("/nonexistent/controller.toml"), "{e}");
}

#[test]
fn sizes_read_as_operators_write_them() {
    assert_eq!(parse_bytes("0"), Ok(0));
    assert_eq!(parse_bytes("4096"), Ok(4096));
    assert_eq!(parse_bytes("4GiB"), Ok(4 << 30));
    assert_eq!(parse_bytes("512M"), Ok(512_000_000));
    assert_eq!(parse_bytes("2 KiB"), Ok(2048));
    assert!(parse_bytes("GiB").is_err());
    assert!(parse_bytes("5 parsecs").unwrap_err().contains("unknown unit"));
    let e = Settings { min_available_memory: Some("-1G".into()), ..Default::default() }
        .resolve()
        .unwrap_err()
        .to_string();
    assert!(e.contains("`min_available_memory`"), "{e}");
}
