//! The supervisor's and the controller's `/metrics`, scraped by a real Prometheus server (Debian's
//! `prometheus`, installed by `scripts/setup.sh`) during a short run: VMs served, a `kill -9`
//! of their pager (re-adoption), graduations by the controller. Prometheus's HTTP API must then
//! tell what happened, and `promtool check metrics` must pass on both expositions.

mod common;
#[allow(unused_imports)] // `deploy` is re-exported for the other tests
mod versions_support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{vm_cmd, Env, MIB};
use uffdpager::api::{SessionState, VersionState};
use versions_support::{options, sigkill, version, versions, wait_sessions, wait_versions};

/// A loopback port free right now (the processes are told it on their command line).
fn free_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("binding a loopback port");
    l.local_addr().unwrap()
}

/// `GET path` over HTTP/1.0 (the servers then close the connection after the body): status and
/// body.
fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    Ok((status, body.to_string()))
}

/// Percent-encodes a query parameter.
fn encode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A `prometheus` server of the test's own: loopback port, config and TSDB in the temp dir.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    fn start(dir: &Path, targets: &[(&str, SocketAddr)]) -> Self {
        let mut config =
            String::from("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n");
        for (job, addr) in targets {
            config.push_str(&format!(
                "  - job_name: {job}\n    static_configs:\n      - targets: ['{addr}']\n"
            ));
        }
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        let addr = free_port();
        let log = dir.join("prometheus.log");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("tsdb").display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("prometheus starts");
        let p = Self { child, addr, log };
        p.wait("ready", || matches!(http_get(addr, "/-/ready"), Ok((200, _))));
        p
    }

    fn wait(&self, what: &str, ok: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while !ok() {
            assert!(
                Instant::now() < deadline,
                "prometheus: never {what}; its log:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The value of an instant query that yields one sample (`None`: no sample).
    fn query(&self, q: &str) -> Option<f64> {
        let (status, body) = http_get(self.addr, &format!("/api/v1/query?query={}", encode(q)))
            .unwrap_or_else(|e| panic!("querying {q}: {e}"));
        assert_eq!(status, 200, "{q}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let result = v["data"]["result"].as_array().unwrap_or_else(|| panic!("{q}: {body}"));
        assert!(result.len() <= 1, "{q} gave several samples: {body}");
        result.first().map(|r| r["value"][1].as_str().unwrap().parse().unwrap())
    }

    /// Waits until `q` has a sample for which `ok` holds; returns it.
    fn wait_value(&self, q: &str, ok: impl Fn(f64) -> bool) -> f64 {
        self.wait(&format!("{q} as expected (last: {:?})", self.query(q)), || {
            self.query(q).is_some_and(&ok)
        });
        self.query(q).unwrap()
    }
}

/// `promtool check metrics` on what `addr` serves on /metrics.
fn promtool_check(addr: SocketAddr) {
    let (status, text) = http_get(addr, "/metrics").expect("GET /metrics");
    assert_eq!(status, 200, "{text}");
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed ({}):\n{}{}\non:\n{text}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The controller, with its metrics on `metrics` and its log in `dir`.
fn start_controller(dir: &Path, supervisor: &Path, metrics: SocketAddr) -> Child {
    let socket = dir.join("controller.sock");
    Command::new(testkit::binary("uffd-controller"))
        .arg("--listen")
        .arg(format!("unix:{}", socket.display()))
        .arg("--enabled")
        .arg("--supervisors")
        .arg(format!("unix:{}", supervisor.display()))
        .args(["--min-session-age", "0", "--scan-interval", "200ms"])
        .arg("--metrics-listen")
        .arg(metrics.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("controller.log")).unwrap())
        .spawn()
        .expect("uffd-controller starts")
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_faults_a_readoption_and_the_controllers_graduations() {
    if !(have("prometheus") && have("promtool")) {
        testkit::requirement::machine_lacks(
            "prometheus_scrapes_faults_a_readoption_and_the_controllers_graduations",
            "prometheus and promtool (scripts/setup.sh installs Debian's prometheus)",
        );
        return;
    }
    let sup_metrics = free_port();
    let mut opts = options("v1");
    opts.args.extend(["--metrics-listen".into(), sup_metrics.to_string()]);
    let env = Env::start_with(opts).await;
    let ctl_metrics = free_port();
    let prom = Prometheus::start(
        env.dir.path(),
        &[("supervisor", sup_metrics), ("controller", ctl_metrics)],
    );

    // One VM served, then its pager killed: the session is re-adopted by a fresh v1.
    let mem = env.memfile("mem", 16 * MIB, 0.2, 0.2);
    let mut a = env.restore("vm-a", &mem, &[]).await;
    vm_cmd(&mut a, "read-random 500").await;
    vm_cmd(&mut a, &format!("balloon 0 {} {}", 2 * MIB, MIB)).await;
    let old_pid = version(&versions(&env).await, "v1").pid;
    sigkill(old_pid);
    wait_versions(&env, "v1 respawned", |l| {
        let v = version(l, "v1");
        v.state() == VersionState::Active && v.pid != 0 && v.pid != old_pid
    })
    .await;
    wait_sessions(&env, "vm-a re-adopted", |l| {
        l.sessions.iter().all(|s| s.error.contains("re-adopted by pager version v1"))
    })
    .await;
    vm_cmd(&mut a, "read-random 500 7").await;
    let mut b = env.restore("vm-b", &mem, &[]).await;
    vm_cmd(&mut b, "read-random 300").await;

    // The controller graduates both.
    let mut controller = start_controller(env.dir.path(), &env.sup().socket, ctl_metrics);
    env.wait_state("vm-a", SessionState::Graduated).await;
    env.wait_state("vm-b", SessionState::Graduated).await;
    vm_cmd(&mut a, "read-random 200 9").await;

    let q = |q: &str, ok: &dyn Fn(f64) -> bool| prom.wait_value(q, ok);
    assert_eq!(q("up{job=\"supervisor\"}", &|v| v == 1.0), 1.0);
    assert_eq!(q("up{job=\"controller\"}", &|v| v == 1.0), 1.0);
    // Figures of the pager process serving now (the killed one's went with it).
    q("sum(uffd_pager_faults_total)", &|v| v > 0.0);
    q("sum(uffd_pager_fault_latency_seconds_count)", &|v| v > 0.0);
    q("sum(uffd_pager_copied_bytes_total{cause=\"completion\"})", &|v| v > 0.0);
    q("sum(uffd_pager_graduated_bytes_total)", &|v| v == (32 * MIB) as f64);
    q("sum(uffd_pager_completion_duration_seconds_count)", &|v| v == 2.0);
    // The supervisor's own counters cover the whole run.
    q("sum(uffd_readoptions_total)", &|v| v == 1.0);
    q("sum(uffd_pager_restarts_total{version=\"v1\"})", &|v| v == 1.0);
    q("sum(uffd_pager_exits_total{version=\"v1\",cause=\"signal\"})", &|v| v == 1.0);
    q("sum(uffd_sessions_created_total)", &|v| v == 2.0);
    q("sum(uffd_sessions{state=\"graduated\"})", &|v| v == 2.0);
    q("sum(uffd_versions{state=\"active\"})", &|v| v == 1.0);
    // Completions the pagers counted are the graduations the controller counted.
    let completions = q("sum(uffd_pager_completions_total{outcome=\"graduated\"})", &|v| v == 2.0);
    let graduations =
        q("uffd_controller_graduations_succeeded_total{result=\"graduated\"}", &|v| v == 2.0);
    assert_eq!(completions, graduations);
    q("uffd_controller_graduations_started_total", &|v| v == 2.0);
    q("sum(uffd_controller_graduations_failed_total)", &|v| v == 0.0);
    q("uffd_controller_graduations_in_flight", &|v| v == 0.0);
    q("sum(uffd_controller_supervisor_state{state=\"watching\"})", &|v| v == 1.0);
    q("sum(uffd_controller_tracked_sessions)", &|v| v == 2.0);
    q("uffd_controller_plan_backlog", &|v| v == 0.0);

    promtool_check(sup_metrics);
    promtool_check(ctl_metrics);

    let _ = controller.kill();
    let _ = controller.wait();
    drop((a, b));
}
