//! Installing on a host: the systemd units pass `systemd-analyze verify`, the supervisor runs
//! from a config file (flags over it, the pager tuning of `[[versions]]` reaching the pager),
//! and the three services log the same JSON shape with `--log-format json`.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use testkit::{health_ok, pager_pids};
use uffdpager::api::pager_client::PagerClient;
use uffdpager::api::GetInfoRequest;
use uffdpager::grpc::uds_channel;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Writes `deploy/systemd/NAME` into `dir` with its binaries replaced by this build's.
fn unit_for_this_build(dir: &Path, name: &str) -> PathBuf {
    let text = std::fs::read_to_string(repo().join("deploy/systemd").join(name)).unwrap();
    let text = text
        .replace(
            "/usr/local/bin/uffd-supervisor",
            testkit::binary("uffd-supervisor").to_str().unwrap(),
        )
        .replace(
            "/usr/local/bin/uffd-controller",
            testkit::binary("uffd-controller").to_str().unwrap(),
        );
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn the_systemd_units_pass_systemd_analyze_verify() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["uffd-supervisor.service", "uffd-controller.service"] {
        let unit = unit_for_this_build(dir.path(), name);
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&unit)
            .output()
            .expect("systemd-analyze runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        // Unknown keys and bad values are warnings on stderr with exit 0: none is allowed.
        assert!(
            out.status.success() && stderr.trim().is_empty(),
            "{name}: {}\n{stderr}",
            out.status
        );
    }
    let sup =
        std::fs::read_to_string(repo().join("deploy/systemd/uffd-supervisor.service")).unwrap();
    // Busy pagers outlive a supervisor restart, and their runtime directory with them.
    for line in ["KillMode=process", "RuntimeDirectory=uffd-pager", "RuntimeDirectoryPreserve=yes"]
    {
        assert!(sup.lines().any(|l| l == line), "uffd-supervisor.service lacks {line}");
    }
}

#[test]
fn systemd_analyze_verify_fails_on_a_unit_with_a_typo() {
    // The check above can fail: a misspelt key is reported.
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_for_this_build(dir.path(), "uffd-controller.service");
    let text = std::fs::read_to_string(&unit).unwrap().replace("KillMode", "KilMode");
    let text = text.replace("RestartSec=1s", "RestartSec=1s\nRestartSek=1s");
    std::fs::write(&unit, text).unwrap();
    let out = Command::new("systemd-analyze").arg("verify").arg(&unit).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("RestartSek"), "{out:?}");
}

/// Polls (at most a minute) until `ok` holds.
async fn wait_until(what: &str, mut ok: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + common::STEP;
    while !ok().await {
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_supervisor_runs_from_a_config_file_and_passes_the_pager_tuning_to_each_version() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let metrics = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    // The example file, with this build's pager and the test's directory; metrics on a free port.
    let example = std::fs::read_to_string(repo().join("deploy/supervisor.example.toml")).unwrap();
    let config = example
        .replace("/usr/local/bin/uffd-pager", testkit::binary("uffd-pager").to_str().unwrap())
        .replace("metrics_listen = \"127.0.0.1:9464\"", &format!("metrics_listen = \"{metrics}\""))
        .replace("fault_threads = 2", "fault_threads = 3")
        .replace(
            "# runtime_dir = \"/run/uffd-pager\"",
            "runtime_dir = \"/nonexistent/overridden\"",
        );
    let config_path = dir.path().join("supervisor.toml");
    std::fs::write(&config_path, config).unwrap();
    let log = dir.path().join("supervisor.log");
    let mut child = tokio::process::Command::new(testkit::binary("uffd-supervisor"))
        .arg("--config")
        .arg(&config_path)
        // The flag overrides the file's runtime_dir.
        .arg("--runtime-dir")
        .arg(&run)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let socket = run.join("supervisor.sock");
    wait_until("the supervisor answers health", async || {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the supervisor exited: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        socket.exists() && health_ok(&socket).await
    })
    .await;
    // The pager of version v1 (the file's [[versions]]) runs with fault_threads = 3.
    let mut pager = PagerClient::new(uds_channel(&run.join("pagers/v1/grpc.sock")));
    let info = pager.get_info(GetInfoRequest {}).await.expect("the pager answers").into_inner();
    assert_eq!((info.version.as_str(), info.fault_threads), ("v1", 3), "{info:?}");
    // And metrics are served where the file said.
    let body = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(metrics).unwrap();
        write!(s, "GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        text
    })
    .await
    .unwrap();
    assert!(body.contains("uffd_version_info{version=\"v1\",state=\"active\""), "{body}");
    assert!(body.contains("uffd_pager_up{version=\"v1\"} 1"), "{body}");
    let _ = child.kill().await;
    for pid in pager_pids(&run) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

#[test]
fn a_config_file_with_an_unknown_key_stops_the_supervisor_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "metrics_listen = \"127.0.0.1:1\"\nfault_thread = 2\n").unwrap();
    let out = Command::new(testkit::binary("uffd-supervisor"))
        .arg("--config")
        .arg(&config)
        .arg("--runtime-dir")
        .arg(dir.path().join("run"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("fault_thread"), "{err}");
}

/// The keys of each JSON line a process wrote; fails on a line that is not a JSON object.
fn json_keys(who: &str, text: &str) -> Vec<BTreeSet<String>> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("{who}: not JSON ({e}): {l}"));
            let o = v.as_object().unwrap_or_else(|| panic!("{who}: not an object: {l}"));
            o.keys().cloned().collect()
        })
        .collect()
}

/// Runs `cmd` until `ready` holds, then SIGTERM; returns what it wrote on stderr.
async fn log_of(
    mut cmd: tokio::process::Command,
    log: &Path,
    ready: impl AsyncFn() -> bool,
) -> String {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_until("ready", async || ready().await).await;
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id().unwrap()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    tokio::time::timeout(common::STEP, child.wait()).await.expect("exits on SIGTERM").unwrap();
    std::fs::read_to_string(log).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_three_services_log_one_json_shape() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut logs = Vec::new();

    let (grpc, handoff) = (d.join("pager.sock"), d.join("handoff.sock"));
    let mut pager = tokio::process::Command::new(testkit::binary("uffd-pager"));
    pager.arg("--log-format=json").arg("--grpc-socket").arg(&grpc);
    pager.arg("--handoff-socket").arg(&handoff);
    let g = grpc.clone();
    logs.push(("pager", log_of(pager, &d.join("p.log"), async || health_ok(&g).await).await));

    let run = d.join("run");
    let mut sup = tokio::process::Command::new(testkit::binary("uffd-supervisor"));
    sup.arg("--log-format").arg("json").arg("--runtime-dir").arg(&run);
    sup.arg("--pager-binary").arg(format!("{}=v1", testkit::binary("uffd-pager").display()));
    let s = run.join("supervisor.sock");
    logs.push(("supervisor", log_of(sup, &d.join("s.log"), async || health_ok(&s).await).await));

    let csock = d.join("controller.sock");
    let mut ctl = tokio::process::Command::new(testkit::binary("uffd-controller"));
    ctl.arg("--log-format").arg("json").arg("--listen").arg(format!("unix:{}", csock.display()));
    let c = csock.clone();
    logs.push(("controller", log_of(ctl, &d.join("c.log"), async || health_ok(&c).await).await));

    for (who, text) in &logs {
        let lines = json_keys(who, text);
        assert!(lines.len() >= 2, "{who} logged too little: {text}");
        for keys in &lines {
            for k in ["timestamp", "level", "target", "message"] {
                assert!(keys.contains(k), "{who}: a line without {k:?}: {text}");
            }
            // Fields at the top level, as in the other services: never nested.
            assert!(!keys.contains("fields") && !keys.contains("span"), "{who}: {text}");
        }
    }
    // The pager's version is a field of its lines, as in the supervisor's.
    assert!(logs[0].1.contains("\"version\":"), "{}", logs[0].1);
    for pid in pager_pids(&run) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}
