//! uffd-controller against the real supervisor, pagers and simulated VMs: blue-green draining,
//! the ceiling, the concurrency limit, deadlines and backoff, the disabled no-op, a supervisor
//! restart under a running controller, and grpcurl on the Controller API.
//!
//! Every claim about what the controller did is read from its own record (GetStatus outcomes
//! and counters), never inferred from timing.

mod common;

use testkit::health_ok;

use common::grpcurl;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command as StdCommand, Stdio};
use std::time::{Duration, Instant};

use common::{vm_cmd, Env, MIB, STEP};
use testkit::{SupervisorOptions, SupervisorProcess, VmProcess};
use tokio::process::{Child, Command};
use tonic::transport::Channel;
use uffdpager::api::controller_client::ControllerClient;
use uffdpager::api::{
    ConnectionState, ControllerStatus, GetStatusRequest, ListSessionsRequest, ListVersionsRequest,
    OutcomeResult, PlanRequest, PlanResponse, SessionState, VersionState,
};
use uffdpager::grpc::uds_channel;

/// A `uffd-controller` child process, its API socket and its log file; killed on drop.
struct Controller {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl Controller {
    /// Starts the controller with `args` (plus `--listen` in `dir`) and waits for its health.
    async fn start(dir: &Path, name: &str, args: &[&str]) -> Self {
        let socket = dir.join(format!("{name}.sock"));
        let log = dir.join(format!("{name}.log"));
        let mut child = Command::new(testkit::binary("uffd-controller"))
            .arg("--listen")
            .arg(format!("unix:{}", socket.display()))
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .kill_on_drop(true)
            .spawn()
            .expect("uffd-controller starts");
        let deadline = Instant::now() + STEP;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "uffd-controller exited at start ({status}):\n{}",
                    std::fs::read_to_string(&log).unwrap()
                );
            }
            if socket.exists() && health_ok(&socket).await {
                break;
            }
            assert!(Instant::now() < deadline, "uffd-controller never became healthy");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Self { child, socket, log }
    }

    fn client(&self) -> ControllerClient<Channel> {
        ControllerClient::new(uds_channel(&self.socket))
    }

    async fn status(&self) -> ControllerStatus {
        self.client().get_status(GetStatusRequest {}).await.expect("GetStatus").into_inner()
    }

    async fn plan(&self) -> PlanResponse {
        self.client().plan(PlanRequest {}).await.expect("Plan").into_inner()
    }

    /// Polls GetStatus until `done` holds (at most a minute).
    async fn wait(&self, what: &str, done: impl Fn(&ControllerStatus) -> bool) -> ControllerStatus {
        let deadline = Instant::now() + STEP;
        loop {
            let s = self.status().await;
            if done(&s) {
                return s;
            }
            assert!(Instant::now() < deadline, "controller never reached: {what}\n{s:#?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the loop has scanned `n` more times (to show that nothing more happens).
    async fn scans(&self, n: u64) -> ControllerStatus {
        let from = counters(&self.status().await).scans;
        self.wait(&format!("{n} more scans"), |s| counters(s).scans >= from + n).await
    }

    /// SIGTERM, then the exit status.
    async fn stop(mut self) -> std::process::ExitStatus {
        if let Some(pid) = self.child.id() {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap());
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        }
        tokio::time::timeout(STEP, self.child.wait())
            .await
            .expect("controller exits on SIGTERM")
            .unwrap()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn counters(s: &ControllerStatus) -> uffdpager::api::ControllerCounters {
    s.counters.unwrap_or_default()
}

/// A timestamp in milliseconds since the epoch (0 if unset).
fn ms(t: Option<prost_types::Timestamp>) -> i64 {
    t.map_or(0, |t| t.seconds * 1000 + i64::from(t.nanos / 1_000_000))
}

fn graduated_ids(s: &ControllerStatus) -> Vec<String> {
    s.outcomes
        .iter()
        .filter(|o| o.result() == OutcomeResult::Graduated)
        .map(|o| o.session_id.clone())
        .collect()
}

fn supervisor_endpoint(env: &Env) -> String {
    format!("unix:{}", env.run_dir().join("supervisor.sock").display())
}

fn supervisor_options() -> SupervisorOptions {
    SupervisorOptions {
        pager_binary: Some(testkit::binary("uffd-pager")),
        args: vec!["--pager-version".into(), "v1".into()],
        show_logs: true,
    }
}

/// A supervisor whose first pager version is `v1`.
async fn env_v1() -> Env {
    Env::start_with(supervisor_options()).await
}

/// Makes `v2` (the same pager binary under another label) active; v1 drains.
async fn deploy_v2(env: &Env) {
    let pager = &testkit::binary("uffd-pager");
    let v = common::deploy(env, pager, "v2").await.expect("DeployVersion v2");
    assert_eq!(v.state(), VersionState::Active);
}

/// Restores `ids` one after another (so their connected_at are in that order), each VM reading a
/// little of its memory.
async fn restore_all(env: &Env, memfile: &Path, ids: &[&str]) -> Vec<VmProcess> {
    let mut vms = Vec::new();
    for id in ids {
        let mut vm = env.restore(id, memfile, &[]).await;
        vm_cmd(&mut vm, "read-random 200").await;
        vms.push(vm);
    }
    vms
}

async fn state_of(env: &Env, id: &str) -> SessionState {
    env.get(id).await.state()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outdated_sessions_graduate_first_and_the_old_version_drains_and_exits() {
    let env = env_v1().await;
    let mem = env.memfile("bg.mem", 16 * MIB, 0.2, 0.2);
    let mut vms = restore_all(&env, &mem, &["old-1", "old-2"]).await;
    deploy_v2(&env).await;
    vms.extend(restore_all(&env, &mem, &["new-1", "new-2"]).await);
    let sup = supervisor_endpoint(&env);
    let ctl = Controller::start(
        env.dir.path(),
        "bg",
        &[
            "--enabled",
            "--supervisors",
            &sup,
            "--min-session-age",
            "1s",
            "--scan-interval",
            "200ms",
        ],
    )
    .await;
    let s = ctl.wait("4 graduations", |s| counters(s).graduated == 4).await;
    let order: Vec<(&str, &str)> =
        s.outcomes.iter().map(|o| (o.session_id.as_str(), o.pager_version.as_str())).collect();
    assert_eq!(order[..2].iter().map(|o| o.1).collect::<Vec<_>>(), ["v1", "v1"], "{order:?}");
    assert_eq!(order[2..].iter().map(|o| o.1).collect::<Vec<_>>(), ["v2", "v2"], "{order:?}");
    assert!(
        s.outcomes[0].reason.starts_with("outdated version v1 (active v2)"),
        "{}",
        s.outcomes[0].reason
    );

    // v1 serves nothing any more: the supervisor stops it.
    let deadline = Instant::now() + STEP;
    loop {
        let versions =
            env.client().list_versions(ListVersionsRequest {}).await.unwrap().into_inner();
        let v1 = versions.versions.iter().find(|v| v.version == "v1").expect("v1 listed");
        if v1.state() == VersionState::Exited && v1.session_count == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "v1 never exited: {v1:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for vm in &mut vms {
        vm_cmd(vm, "verify").await;
    }
    assert!(ctl.stop().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ceiling_graduates_exactly_the_oldest_and_outdated_sessions_regardless() {
    let env = env_v1().await;
    let mem = env.memfile("ceiling.mem", 8 * MIB, 0.2, 0.2);
    let mut vms = restore_all(&env, &mem, &["o1", "o2"]).await;
    deploy_v2(&env).await;
    let current = ["c1", "c2", "c3", "c4", "c5", "c6"];
    vms.extend(restore_all(&env, &mem, &current).await);
    let sup = supervisor_endpoint(&env);
    let ctl = Controller::start(
        env.dir.path(),
        "ceiling",
        &[
            "--enabled",
            "--supervisors",
            &sup,
            "--min-session-age",
            "1s",
            "--max-active-sessions",
            "3",
            "--max-concurrent",
            "2",
            "--scan-interval",
            "200ms",
        ],
    )
    .await;
    ctl.wait("5 graduations", |s| counters(s).graduated == 5).await;
    // Then nothing more, scan after scan.
    let s = ctl.scans(5).await;
    let graduated: BTreeSet<String> = graduated_ids(&s).into_iter().collect();
    let want: BTreeSet<String> = ["o1", "o2", "c1", "c2", "c3"].map(String::from).into();
    assert_eq!(graduated, want);
    assert_eq!(counters(&s).started, 5, "{:?}", s.outcomes);
    for id in ["c4", "c5", "c6"] {
        assert_eq!(state_of(&env, id).await, SessionState::Serving, "{id}");
    }
    let plan = ctl.plan().await;
    assert!(plan.graduations.is_empty(), "{plan:?}");
    assert_eq!(plan.held.len(), 3, "{plan:?}");
    assert!(plan.held.iter().all(|h| h.reason.contains("under the ceiling")), "{plan:?}");
    for vm in &mut vms {
        vm_cmd(vm, "verify").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_concurrent_one_never_runs_two_completions_at_once() {
    let env = env_v1().await;
    let mem = env.memfile("serial.mem", 32 * MIB, 0.0, 0.0);
    let mut vms = restore_all(&env, &mem, &["a", "b", "c", "d"]).await;
    let sup = supervisor_endpoint(&env);
    let ctl = Controller::start(
        env.dir.path(),
        "serial",
        &[
            "--enabled",
            "--supervisors",
            &sup,
            "--min-session-age",
            "0",
            "--max-concurrent",
            "1",
            "--scan-interval",
            "100ms",
        ],
    )
    .await;
    let s = ctl.wait("4 graduations", |s| counters(s).graduated == 4).await;
    assert_eq!(counters(&s).peak_in_flight, 1);
    assert!(s.outcomes.iter().all(|o| o.in_flight_at_start == 1), "{:?}", s.outcomes);
    for pair in s.outcomes.windows(2) {
        assert!(ms(pair[1].started_at) >= ms(pair[0].finished_at), "overlap: {pair:#?}");
    }
    for vm in &mut vms {
        vm_cmd(vm, "verify").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_timeout_too_short_fails_keeps_the_vm_served_and_retries_after_the_backoff() {
    let env = env_v1().await;
    let mem = env.memfile("big.mem", 256 * MIB, 0.0, 0.0);
    let mut vms = restore_all(&env, &mem, &["big"]).await;
    let sup = supervisor_endpoint(&env);
    let common_args =
        ["--enabled", "--supervisors", &sup, "--min-session-age", "1s", "--scan-interval", "100ms"];
    let short =
        [&common_args[..], &["--completion-timeout", "5ms", "--failure-backoff", "2s"]].concat();
    let ctl = Controller::start(env.dir.path(), "short", &short).await;
    let s = ctl.wait("two failed attempts", |s| s.outcomes.len() >= 2).await;
    for o in &s.outcomes[..2] {
        assert!(
            matches!(o.result(), OutcomeResult::TimedOut | OutcomeResult::Failed),
            "a 5 ms deadline cannot graduate 256 MiB: {o:?}"
        );
        assert!(!o.error.is_empty(), "{o:?}");
    }
    let (first, second) = (&s.outcomes[0], &s.outcomes[1]);
    let gap = ms(second.started_at) - ms(first.finished_at);
    assert!(gap >= 2000, "retried {gap} ms after the failure, before failure_backoff");
    // The VM is still served, and right. (The supervisor hears of the failure from the pager a
    // moment after the controller's deadline fired: wait for SERVING rather than race it.)
    env.wait_state("big", SessionState::Serving).await;
    vm_cmd(&mut vms[0], "verify").await;
    assert!(ctl.stop().await.success());

    // With a deadline that allows it, the same session graduates (its soak survived the restart).
    let long = [&common_args[..], &["--completion-timeout", "2m"]].concat();
    let ctl = Controller::start(env.dir.path(), "long", &long).await;
    let s = ctl.wait("the graduation", |s| counters(s).graduated == 1).await;
    assert_eq!(graduated_ids(&s), ["big"]);
    assert_eq!(state_of(&env, "big").await, SessionState::Graduated);
    vm_cmd(&mut vms[0], "verify").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disabled_controller_graduates_nothing_and_says_so() {
    let env = env_v1().await;
    let mem = env.memfile("off.mem", 8 * MIB, 0.2, 0.2);
    let _vms = restore_all(&env, &mem, &["idle"]).await;
    let config = env.dir.path().join("off.toml");
    std::fs::write(
        &config,
        format!(
            "enabled = false\nsupervisors = [\"{}\"]\nmin_session_age = \"0\"\nscan_interval = \"100ms\"\n",
            supervisor_endpoint(&env)
        ),
    )
    .unwrap();
    let ctl =
        Controller::start(env.dir.path(), "off", &["--config", config.to_str().unwrap()]).await;
    // Absence cannot be awaited: give an enabled controller ample time (20 scan intervals).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let s = ctl.status().await;
    assert!(!s.enabled);
    assert!(s.mode.starts_with("disabled"), "{}", s.mode);
    assert_eq!(s.supervisors[0].state(), ConnectionState::NotWatched);
    assert!(s.outcomes.is_empty() && s.in_flight.is_empty());
    assert_eq!(counters(&s).scans, 0);
    let plan = ctl.plan().await;
    assert!(plan.graduations.is_empty() && plan.note.starts_with("disabled"), "{plan:?}");
    assert_eq!(state_of(&env, "idle").await, SessionState::Serving);
    assert!(ctl.log().contains("disabled"), "{}", ctl.log());
}

#[test]
fn nonsense_settings_stop_the_controller_at_startup_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(
        &config,
        "enabled = true\nsupervisors = [\"unix:/nonexistent.sock\"]\nmax_concurrent = 0\n",
    )
    .unwrap();
    for (args, setting) in [
        (vec!["--config", config.to_str().unwrap()], "max_concurrent"),
        (
            vec![
                "--config",
                config.to_str().unwrap(),
                "--max-concurrent",
                "1",
                "--failure-backoff",
                "-5m",
            ],
            "failure_backoff",
        ),
        (vec!["--enabled"], "supervisors"),
    ] {
        let listen = format!("unix:{}", dir.path().join("c.sock").display());
        let out = StdCommand::new(testkit::binary("uffd-controller"))
            .args(&args)
            .args(["--listen", &listen])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} started");
        assert!(stderr.contains(&format!("`{setting}`")), "{args:?}: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_supervisor_is_reconnected_re_listed_and_served_on() {
    let mut env = env_v1().await;
    let mem = env.memfile("restart.mem", 8 * MIB, 0.2, 0.2);
    let mut vms = restore_all(&env, &mem, &["before"]).await;
    let sup = supervisor_endpoint(&env);
    let ctl = Controller::start(
        env.dir.path(),
        "restart",
        &[
            "--enabled",
            "--supervisors",
            &sup,
            "--min-session-age",
            "1s",
            "--scan-interval",
            "200ms",
        ],
    )
    .await;
    ctl.wait("the first graduation", |s| counters(s).graduated == 1).await;

    let mut old = env.sup.take().expect("supervisor running");
    old.terminate().await.unwrap();
    ctl.wait("the stream lost", |s| s.supervisors[0].state() != ConnectionState::Watching).await;
    let restarted = SupervisorProcess::start(
        &testkit::binary("uffd-supervisor"),
        &env.run_dir(),
        &supervisor_options(),
    )
    .await
    .expect("supervisor restarts");
    env.sup = Some(restarted);
    let s = ctl
        .wait("watching again", |s| {
            let w = &s.supervisors[0];
            w.state() == ConnectionState::Watching && w.reconnects >= 1
        })
        .await;
    // Re-listed: the controller tracks exactly what the new supervisor lists.
    let listed: BTreeSet<String> = env
        .client()
        .list_sessions(ListSessionsRequest {})
        .await
        .unwrap()
        .into_inner()
        .sessions
        .into_iter()
        .map(|s| s.id)
        .collect();
    let tracked: BTreeSet<String> = s.sessions.iter().map(|t| t.session_id.clone()).collect();
    assert_eq!(tracked, listed);
    assert!(!s.supervisors[0].last_error.is_empty());

    // And carries on.
    vms.extend(restore_all(&env, &mem, &["after"]).await);
    let s = ctl.wait("the second graduation", |s| counters(s).graduated == 2).await;
    assert_eq!(graduated_ids(&s), ["before", "after"]);
    for vm in &mut vms {
        vm_cmd(vm, "verify").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_drives_get_status_and_plan_of_a_dry_run() {
    let env = env_v1().await;
    let mem = env.memfile("dry.mem", 8 * MIB, 0.2, 0.2);
    let ids = ["first", "second", "third"];
    let _vms = restore_all(&env, &mem, &ids).await;
    let sup = supervisor_endpoint(&env);
    // Scans come from the first tick and the end of the snapshot, then not for an hour: the dry
    // run records the oldest session or two (one slot per scan), and the plan shows what the
    // next scan would do with the rest.
    let ctl = Controller::start(
        env.dir.path(),
        "dry",
        &[
            "--enabled",
            "--dry-run",
            "--supervisors",
            &sup,
            "--min-session-age",
            "0",
            "--scan-interval",
            "1h",
        ],
    )
    .await;
    ctl.wait("the dry-run record", |s| !s.outcomes.is_empty()).await;
    let sock = ctl.socket.display().to_string();
    let base = format!("grpcurl -plaintext -unix -authority localhost {sock}");
    let listed = grpcurl(&format!("{base} list"));
    for service in [
        "uffdpager.v1.Controller",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(listed.contains(service), "{service} missing from:\n{listed}");
    }
    assert!(!listed.contains("uffdpager.v1.Supervisor"), "not served here:\n{listed}");
    let described = grpcurl(&format!("{base} describe uffdpager.v1.Controller"));
    assert!(described.contains("GetStatus") && described.contains("Plan"), "{described}");

    let status: serde_json::Value =
        serde_json::from_str(&grpcurl(&format!("{base} uffdpager.v1.Controller/GetStatus")))
            .unwrap();
    assert_eq!(
        status["mode"], "enabled, dry run: records what it would graduate, calls nothing",
        "{status}"
    );
    assert_eq!(status["config"]["minSessionAge"], "0s", "{status}");
    assert_eq!(status["supervisors"][0]["state"], "CONNECTION_STATE_WATCHING", "{status}");
    let outcomes = status["outcomes"].as_array().unwrap();
    let recorded: Vec<&str> = outcomes.iter().map(|o| o["sessionId"].as_str().unwrap()).collect();
    assert_eq!(recorded, ids[..recorded.len()], "oldest first: {status}");
    assert!(recorded.len() < ids.len(), "{status}");
    for o in outcomes {
        assert_eq!(o["result"], "OUTCOME_RESULT_DRY_RUN", "{status}");
        assert!(o["reason"].as_str().unwrap().contains("time-based weaning"), "{status}");
    }
    assert!(status["counters"].get("started").is_none(), "no CompleteSession started: {status}");

    let plan: serde_json::Value =
        serde_json::from_str(&grpcurl(&format!("{base} uffdpager.v1.Controller/Plan"))).unwrap();
    let next = &plan["graduations"][0];
    assert_eq!(next["sessionId"], ids[recorded.len()], "{plan}");
    assert_eq!(next["class"], "PLAN_CLASS_SOAKED", "{plan}");
    assert_eq!(next["startsNextScan"], true, "{plan}");
    assert_eq!(plan["slots"], 1, "{plan}");
    // The README's controller examples run as written, against this controller's socket.
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let block = readme
        .split("<!-- controller-examples:begin -->")
        .nth(1)
        .and_then(|rest| rest.split("<!-- controller-examples:end -->").next())
        .expect("README has a controller-examples block");
    let examples: Vec<&str> =
        block.lines().map(str::trim).filter(|l| l.starts_with("grpcurl ")).collect();
    assert!(examples.len() >= 2, "{examples:?}");
    for example in examples {
        let out = grpcurl(&example.replace("/run/uffd-pager/controller.sock", &sock));
        assert!(out.trim_start().starts_with('{'), "{example}: {out}");
    }

    // Nothing was called: every session still serves.
    for id in ids {
        assert_eq!(state_of(&env, id).await, SessionState::Serving, "{id}");
    }
}
