//! The supervisor against hostile VMMs, local users and its own limits, through the real
//! binaries: silent VMMs by the thousand, handshakes too large or in pieces, a descriptor limit
//! filled up, a session cap, wrapper "pagers" that leave processes behind, a runtime directory
//! another user prepared, VMMs whose handshake is refused (they are stopped, not left hanging)
//! and a second VMM on a used socket, and the controller's `--listen` in a missing directory.
//! Where a VM can run, a healthy one is served and verified throughout by the same pager.

mod common;
mod versions_support;

use std::os::fd::AsFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::hostile::{
    as_nobody, cpu_seconds, nofile_limits, running, supervisor_with_nofile, threads, KillPidFiles,
    SilentVmms, NOBODY,
};
use common::{vm_cmd, Env, MIB, STEP};
use testkit::{SupervisorOptions, VmProcess, VmProcessError};
use tonic::Code;
use uffdpager::api::supervisor_client::SupervisorClient;
use uffdpager::api::{
    ActivateVersionRequest, CreateSessionRequest, DeleteSessionRequest, GetSessionRequest,
    ListSessionsRequest, Session, SessionState, VersionState,
};
use versions_support::{deploy, options, pager_binary, script, version, versions, wait_versions};

fn with_args(args: &[&str]) -> SupervisorOptions {
    SupervisorOptions { args: args.iter().map(|a| a.to_string()).collect(), ..Default::default() }
}

fn supervisor_pid(env: &Env) -> u32 {
    env.sup().pid().expect("the supervisor runs")
}

async fn create_with(
    client: &mut SupervisorClient<tonic::transport::Channel>,
    id: &str,
    mem: &Path,
) -> Result<Session, tonic::Status> {
    client
        .create_session(CreateSessionRequest {
            session_id: id.into(),
            memory_file: mem.display().to_string(),
            labels: Default::default(),
            ..Default::default()
        })
        .await
        .map(tonic::Response::into_inner)
}

/// Restores a simulated VM onto `socket` with extra `uffd-vmsim run` arguments.
async fn restore_raw(
    socket: &str,
    memfile: &Path,
    args: &[&str],
) -> Result<VmProcess, VmProcessError> {
    let (socket, memfile) = (PathBuf::from(socket), memfile.to_path_buf());
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        VmProcess::restore_with_args(
            &testkit::binary("uffd-vmsim"),
            &socket,
            &memfile,
            &[],
            &[],
            &args,
            STEP,
        )
    })
    .await
    .unwrap()
}

// ---- item 7: the handshake is read asynchronously, whole, under a deadline ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_silent_vmms_leave_create_session_answering_at_once_and_vms_served() {
    let env = Env::start_with(with_args(&["--max-sessions", "2000"])).await;
    let mem = env.memfile("mem", 8 * MIB, 0.2, 0.2);
    let mut healthy = env.restore("healthy", &mem, &[]).await;
    vm_cmd(&mut healthy, "reader-start 1").await;
    let pager = env.pager_pid();

    let mut client = env.client();
    let mut sockets = Vec::new();
    for i in 0..1000 {
        let s = create_with(&mut client, &format!("silent-{i}"), &mem).await.expect("create");
        sockets.push(PathBuf::from(s.socket_path));
    }
    let silent = tokio::task::block_in_place(|| SilentVmms::connect(&sockets));
    // Every one of them is connected and waited on (its pid is on its session).
    let deadline = Instant::now() + STEP;
    loop {
        let list = client.list_sessions(ListSessionsRequest {}).await.unwrap().into_inner();
        let waiting = list.sessions.iter().filter(|s| s.vmm_pid == silent.pid).count();
        if waiting == 1000 {
            break;
        }
        assert!(Instant::now() < deadline, "only {waiting} of 1000 silent VMMs seen connected");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut slowest = Duration::ZERO;
    for i in 0..5 {
        let started = Instant::now();
        create_with(&mut client, &format!("new-{i}"), &mem).await.expect("CreateSession");
        slowest = slowest.max(started.elapsed());
    }
    eprintln!("CreateSession beside 1000 silent VMMs: slowest of 5 took {slowest:?}");
    assert!(slowest < Duration::from_secs(2), "CreateSession took {slowest:?}");
    let mut late = env.restore("late", &mem, &[]).await;
    vm_cmd(&mut late, "read-random 300").await;
    vm_cmd(&mut late, "verify").await;

    drop(silent);
    let reader = vm_cmd(&mut healthy, "reader-stop").await;
    assert!(reader["pages_verified"].as_u64().unwrap() > 0);
    vm_cmd(&mut healthy, "verify").await;
    assert_eq!(env.pager_pid(), pager);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_burst_of_concurrent_connects_the_supervisor_returns_to_its_idle_threads() {
    let env = Env::start().await;
    let mem = env.memfile("mem", 4 * MIB, 0.2, 0.2);
    let mut healthy = env.restore("healthy", &mem, &[]).await;
    let pid = supervisor_pid(&env);
    let idle = threads(pid);

    let creates = (0..50).map(|i| {
        let (mut client, mem) = (env.client(), mem.clone());
        async move { create_with(&mut client, &format!("burst-{i}"), &mem).await.unwrap() }
    });
    let sessions = futures_join_all(creates).await;
    let sockets: Vec<PathBuf> = sessions.iter().map(|s| PathBuf::from(&s.socket_path)).collect();
    let silent = tokio::task::block_in_place(|| SilentVmms::connect(&sockets));
    let deadline = Instant::now() + STEP;
    while env
        .client()
        .list_sessions(ListSessionsRequest {})
        .await
        .unwrap()
        .into_inner()
        .sessions
        .iter()
        .filter(|s| s.vmm_pid == silent.pid)
        .count()
        < 50
    {
        assert!(Instant::now() < deadline, "the 50 silent VMMs were never all connected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let during = threads(pid);
    drop(silent);
    vm_cmd(&mut healthy, "read-random 200").await;

    // Idle threads of tokio's blocking pool end after 10 s without work: wait for that.
    let deadline = Instant::now() + STEP;
    let after = loop {
        let now = threads(pid);
        if now <= idle {
            break now;
        }
        assert!(
            Instant::now() < deadline,
            "the supervisor keeps {now} threads, {idle} before 50 connects ({during} during): {:?}",
            testkit::procfs::thread_names(i32::try_from(pid).unwrap())
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    eprintln!("supervisor threads: {idle} idle, {during} with 50 silent VMMs, {after} after");
    vm_cmd(&mut healthy, "verify").await;
}

async fn futures_join_all<F: std::future::Future + Send + 'static>(
    fs: impl Iterator<Item = F>,
) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = fs.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_in_several_reads_is_read_whole_and_one_too_large_is_refused_saying_so() {
    // The too-large handshakes come from this test process too: keep their senders running.
    let env = Env::start_with(with_args(&["--refused-vmm", "keep"])).await;
    let mem = env.memfile("mem", 4 * MIB, 0.2, 0.2);
    let mut healthy = env.restore("healthy", &mem, &[]).await;
    vm_cmd(&mut healthy, "reader-start 1").await;

    // 60 KB: under the limit, but more than one read's worth (~36 KB per piece).
    let s = env.create("padded", &mem).await;
    let mut padded = restore_raw(&s.socket_path, &mem, &["--handshake-padding", "60K"])
        .await
        .expect("a padded handshake is accepted");
    env.wait_state("padded", SessionState::Serving).await;
    vm_cmd(&mut padded, "read-random 300").await;
    vm_cmd(&mut padded, "verify").await;

    // 10 MB of it: refused as too large, saying so.
    let s = env.create("huge", &mem).await;
    let huge = restore_raw(&s.socket_path, &mem, &["--handshake-padding", "10M"]).await;
    let failed = env.wait_state("huge", SessionState::Failed).await;
    assert!(failed.error.contains("larger than 65536 bytes"), "{}", failed.error);
    drop(huge);

    // 10,000 regions (~1.1 MB): the same, not a JSON error at some column.
    let s = env.create("many", &mem).await;
    let regions: Vec<String> = (0..10_000u64)
        .map(|i| {
            format!(
                r#"{{"base_host_virt_addr":{},"size":4096,"offset":0,"page_size":4096}}"#,
                (1u64 << 32) + i * 4096
            )
        })
        .collect();
    let json = format!("[{}]", regions.join(","));
    let socket = s.socket_path.clone();
    let sender = std::thread::spawn(move || {
        let uffd = uffdpager::uffd_ops::firecracker_uffd(false).unwrap();
        let conn = std::os::unix::net::UnixStream::connect(socket).unwrap();
        // The supervisor stops reading past its limit and closes: EPIPE ends the send.
        let _ = uffdpager::scm::send_with_fds(conn.as_fd(), json.as_bytes(), &[uffd.as_fd()]);
    });
    let failed = env.wait_state("many", SessionState::Failed).await;
    assert!(failed.error.contains("larger than 65536 bytes"), "{}", failed.error);
    assert!(failed.error.contains("at most 128 regions"), "{}", failed.error);
    tokio::task::block_in_place(|| sender.join()).unwrap();

    let reader = vm_cmd(&mut healthy, "reader-stop").await;
    assert!(reader["pages_verified"].as_u64().unwrap() > 0);
    vm_cmd(&mut healthy, "verify").await;
}

// ---- item 6: descriptors, their limit, the session cap ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_supervisor_raises_its_descriptor_limit_to_the_hard_limit_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let wrapper = supervisor_with_nofile(dir.path(), 256, 4096);
    let env = Env::start_in(dir, &wrapper, SupervisorOptions::default()).await;
    let limits = nofile_limits(supervisor_pid(&env));
    assert_eq!(limits, ("4096".to_string(), "4096".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_the_supervisor_says_so_and_never_spins_on_a_waiting_client() {
    let dir = tempfile::tempdir().unwrap();
    let wrapper = supervisor_with_nofile(dir.path(), 128, 128);
    let env = Env::start_in(dir, &wrapper, with_args(&["--max-sessions", "10000"])).await;
    let mem = env.memfile("mem", 4 * MIB, 0.2, 0.2);
    let mut healthy = env.restore("healthy", &mem, &[]).await;
    vm_cmd(&mut healthy, "reader-start 1").await;
    let pid = supervisor_pid(&env);

    // One connection for every call from here on: a new one could not be accepted.
    let mut client = env.client();
    let mut created = Vec::new();
    // Filled until refusals hold for a second: a refusal met while some task of the supervisor
    // held a descriptor for a moment (reading /proc, a log) leaves one free once it is done.
    let mut refusals = 0;
    let refusal = loop {
        match create_with(&mut client, &format!("fill-{}", created.len()), &mem).await {
            Ok(s) => {
                created.push(s.id);
                refusals = 0;
            }
            Err(status) if refusals == 10 => break status,
            Err(_) => {
                refusals += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        assert!(created.len() < 200, "128 descriptors never ran out");
    };
    assert_eq!(refusal.code(), Code::ResourceExhausted, "{refusal:?}");
    assert!(refusal.message().contains("out of file descriptors"), "{}", refusal.message());
    assert!(refusal.message().contains("128"), "the limit is named: {}", refusal.message());

    // A new client waits in the listen queue; the supervisor must not burn CPU meanwhile.
    let waiting = tokio::spawn({
        let socket = env.sup().socket.clone();
        async move {
            let mut health = tonic_health::pb::health_client::HealthClient::new(
                uffdpager::grpc::uds_channel(&socket),
            );
            let req = tonic_health::pb::HealthCheckRequest { service: String::new() };
            tokio::time::timeout(STEP, health.check(req)).await
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = cpu_seconds(pid);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let used = cpu_seconds(pid) - before;
    eprintln!("supervisor CPU over 3 s with a client it cannot accept: {used:.2} s");
    assert!(used < 0.5, "the supervisor spins: {used:.2} s of CPU in 3 s");
    // Whether the client is answered before the deletes depends on whether the refused
    // CreateSession left a descriptor spare (a refusal at the socket's bind releases the memory
    // file's): what matters is no spinning meanwhile, and an answer once descriptors free up.

    for id in created.iter().take(5) {
        client.delete_session(DeleteSessionRequest { session_id: id.clone() }).await.unwrap();
    }
    let answered = waiting.await.unwrap().expect("the waiting client is answered");
    answered.expect("health check");

    let reader = vm_cmd(&mut healthy, "reader-stop").await;
    assert!(reader["pages_verified"].as_u64().unwrap() > 0);
    vm_cmd(&mut healthy, "verify").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_sessions_caps_live_sessions_and_the_refusal_names_the_limit() {
    let env = Env::start_with(with_args(&["--max-sessions", "3"])).await;
    let mem = env.memfile("mem", 4 * MIB, 0.2, 0.2);
    let mut healthy = env.restore("healthy", &mem, &[]).await;
    let mut client = env.client();
    create_with(&mut client, "p1", &mem).await.unwrap();
    create_with(&mut client, "p2", &mem).await.unwrap();
    let err = create_with(&mut client, "p3", &mem).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("--max-sessions 3"), "{}", err.message());
    assert!(env.client().get_session(GetSessionRequest { session_id: "p3".into() }).await.is_err());

    client.delete_session(DeleteSessionRequest { session_id: "p1".into() }).await.unwrap();
    create_with(&mut client, "p3", &mem).await.expect("room again after a delete");
    env.graduate("healthy").await;
    create_with(&mut client, "p4", &mem).await.expect("a graduated session is not live");
    vm_cmd(&mut healthy, "verify").await;
}

// ---- item 8: nothing of a pager outlives it ----

fn wait_not_running(pid: i32, what: &str) {
    let deadline = Instant::now() + STEP;
    while running(pid) {
        assert!(Instant::now() < deadline, "{what} (pid {pid}) still runs");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn read_pid(path: &Path) -> i32 {
    std::fs::read_to_string(path).unwrap().trim().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_deploy_and_a_stopped_version_leave_none_of_their_processes_behind() {
    let env = Env::start_with(options("v1")).await;
    let mem = env.memfile("mem", 4 * MIB, 0.2, 0.2);
    let mut healthy = env.restore("healthy", &mem, &[]).await;
    vm_cmd(&mut healthy, "reader-start 1").await;
    let pager = env.pager_pid();
    let bin = env.dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let (leader_file, child_file, kept_file) =
        (bin.join("leader.pid"), bin.join("child.pid"), bin.join("kept.pid"));
    let _cleanup = KillPidFiles(vec![leader_file.clone(), child_file.clone(), kept_file.clone()]);

    // A wrapper that never gets healthy, and leaves a child of its own.
    let never = script(
        &bin,
        "never-healthy",
        &format!(
            "echo $$ > {}\nsleep 300 &\necho $! > {}\nexec sleep 299",
            leader_file.display(),
            child_file.display()
        ),
    );
    let err = deploy(&env, &never, "v2").await.unwrap_err();
    assert!(err.message().contains("not healthy"), "{err:?}");
    tokio::task::block_in_place(|| {
        wait_not_running(read_pid(&leader_file), "the failed pager");
        wait_not_running(read_pid(&child_file), "the failed pager's child");
    });

    // A wrapper that becomes a real pager, leaving a child too; drained and stopped.
    let wrapper = script(
        &bin,
        "wrapped-pager",
        &format!(
            "sleep 300 &\necho $! > {}\nexec {} \"$@\"",
            kept_file.display(),
            pager_binary().display()
        ),
    );
    let v3 = deploy(&env, &wrapper, "v3").await.expect("the wrapper deploys");
    assert_eq!(v3.state(), VersionState::Active);
    assert!(running(read_pid(&kept_file)));
    env.client()
        .activate_version(ActivateVersionRequest { version: "v1".into() })
        .await
        .expect("back to v1");
    wait_versions(&env, "v3 EXITED", |l| version(l, "v3").state() == VersionState::Exited).await;
    tokio::task::block_in_place(|| {
        wait_not_running(read_pid(&kept_file), "the stopped pager's child")
    });
    assert_eq!(versions(&env).await.active_version, "v1");

    let reader = vm_cmd(&mut healthy, "reader-stop").await;
    assert!(reader["pages_verified"].as_u64().unwrap() > 0);
    vm_cmd(&mut healthy, "verify").await;
    assert_eq!(env.pager_pid(), pager);
}

// ---- item 10: the runtime directory is the supervisor's own ----

/// Starts the supervisor on `run_dir`; it must refuse to start. Returns its stderr.
fn refused_at_start(run_dir: &Path) -> String {
    let mut child = std::process::Command::new(testkit::binary("uffd-supervisor"))
        .arg("--runtime-dir")
        .arg(run_dir)
        .arg("--pager-binary")
        .arg(pager_binary())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            // It started: stop the pager it may have started too.
            for pid in testkit::pager_pids(run_dir) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            panic!("the supervisor started on {}", run_dir.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "{err}");
    err
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
}

#[test]
fn a_runtime_directory_another_user_planted_is_refused_and_nothing_it_points_at_is_touched() {
    // A world-writable, sticky directory, like /tmp.
    let world = tempfile::Builder::new().prefix("uffd-world-").tempdir_in("/tmp").unwrap();
    std::fs::set_permissions(world.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
    // Root's directory with a socket in it: what the planted symlinks point at.
    let victim = tempfile::tempdir().unwrap();
    std::fs::set_permissions(victim.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let victim_socket = victim.path().join("important.sock");
    drop(std::os::unix::net::UnixListener::bind(&victim_socket).unwrap());

    // Another user makes the runtime directory, with `sessions` a symlink to root's directory.
    let run = world.path().join("run");
    as_nobody(&format!(
        "mkdir -m 777 {run} && ln -s {victim} {run}/sessions && ln -s {victim} {run}/pagers",
        run = run.display(),
        victim = victim.path().display()
    ));
    let err = refused_at_start(&run);
    assert!(err.contains(&format!("owned by uid {NOBODY}")), "{err}");
    // ... or the runtime directory itself as a symlink to root's directory.
    let link = world.path().join("run-link");
    as_nobody(&format!("ln -s {} {}", victim.path().display(), link.display()));
    let err = refused_at_start(&link);
    assert!(err.contains("is a symbolic link"), "{err}");
    // Root's own runtime directory with a symlink planted under it is refused all the same.
    let rooted = tempfile::tempdir().unwrap();
    let run2 = rooted.path().join("run");
    std::fs::create_dir(&run2).unwrap();
    std::os::unix::fs::symlink(victim.path(), run2.join("sessions")).unwrap();
    let err = refused_at_start(&run2);
    assert!(err.contains("is a symbolic link"), "{err}");

    assert_eq!(mode(victim.path()), 0o755, "the symlinks' target keeps its mode");
    assert!(victim_socket.exists(), "and its socket");
    assert_eq!(std::fs::metadata(&run).unwrap().uid(), NOBODY);
    assert_eq!(mode(&run), 0o777, "the planted directory's mode is not changed either");
}

#[test]
fn a_runtime_directory_writable_by_others_is_refused_not_chmodded() {
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    std::fs::create_dir(&run).unwrap();
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o775)).unwrap();
    let err = refused_at_start(&run);
    assert!(err.contains("writable by group or others"), "{err}");
    assert_eq!(mode(&run), 0o775);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_runtime_directory_of_roots_keeps_its_mode_as_run_must() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    std::fs::create_dir(&run).unwrap();
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755)).unwrap();
    let env = Env::start_in(dir, &testkit::binary("uffd-supervisor"), Default::default()).await;
    let mem = env.memfile("mem", 4 * MIB, 0.2, 0.2);
    let mut vm = env.restore("vm", &mem, &[]).await;
    vm_cmd(&mut vm, "read-random 100").await;
    assert_eq!(mode(&env.run_dir()), 0o755, "the runtime directory's mode is its owner's");
    assert_eq!(mode(&env.run_dir().join("sessions")), 0o700, "what it creates is private");
    assert_eq!(mode(&env.run_dir().join("pagers")), 0o700);
}

// ---- item 11: a VMM the supervisor will not serve is not left hanging ----

/// Restores a VM whose regions lie past the end of the session's memory file (the VM's own
/// file is twice as large), as a snapshot restored against the wrong memory file would.
async fn restore_past_the_end(env: &Env, id: &str) -> (Result<VmProcess, VmProcessError>, Session) {
    let small = env.memfile(&format!("{id}-small"), 4 * MIB, 0.2, 0.2);
    let large = env.memfile(&format!("{id}-large"), 8 * MIB, 0.2, 0.2);
    let s = env.create(id, &small).await;
    let vm = restore_raw(&s.socket_path, &large, &[]).await;
    let failed = env.wait_state(id, SessionState::Failed).await;
    (vm, failed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vmm_whose_handshake_is_refused_is_killed_and_its_failed_session_says_so() {
    let env = Env::start().await;
    let mem = env.memfile("mem", 4 * MIB, 0.2, 0.2);
    let mut healthy = env.restore("healthy", &mem, &[]).await;
    vm_cmd(&mut healthy, "reader-start 1").await;
    let pager = env.pager_pid();

    let (vm, failed) = restore_past_the_end(&env, "wrong-file").await;
    assert!(failed.error.contains("past the end of the memory file"), "{}", failed.error);
    assert!(failed.error.contains("was stopped with SIGKILL"), "{}", failed.error);
    assert_ne!(failed.vmm_pid, 0, "the VMM's pid is recorded");
    assert!(failed.error.contains(&format!("pid {}", failed.vmm_pid)), "{}", failed.error);
    match vm {
        Ok(mut vm) => {
            assert_eq!(vm.pid, failed.vmm_pid);
            let status = tokio::task::block_in_place(|| vm.wait_exit(STEP))
                .expect("the refused VMM does not run on");
            assert_eq!(status.signal(), Some(9), "{status:?}");
        }
        // Killed before it could print that it had restored.
        Err(e) => assert!(matches!(e, VmProcessError::Exited(_)), "{e}"),
    }
    assert!(!running(i32::try_from(failed.vmm_pid).unwrap()));

    let reader = vm_cmd(&mut healthy, "reader-stop").await;
    assert!(reader["pages_verified"].as_u64().unwrap() > 0);
    vm_cmd(&mut healthy, "verify").await;
    assert_eq!(env.pager_pid(), pager);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_refused_vmm_keep_a_refused_vmm_is_left_running_and_its_session_says_so() {
    let env = Env::start_with(with_args(&["--refused-vmm", "keep"])).await;
    let (vm, failed) = restore_past_the_end(&env, "wrong-file").await;
    let mut vm = vm.expect("a VMM left running printed that it restored");
    assert_eq!(failed.vmm_pid, vm.pid);
    assert!(
        failed
            .error
            .contains(&format!("the VMM (pid {}) was left running (--refused-vmm keep)", vm.pid)),
        "{}",
        failed.error
    );
    assert!(tokio::task::block_in_place(|| vm.wait_exit(Duration::from_secs(1))).is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_vmm_restored_onto_a_used_session_socket_fails_at_connect_instead_of_hanging() {
    let env = Env::start().await;
    let mem = env.memfile("mem", 4 * MIB, 0.2, 0.2);
    let mut healthy = env.restore("healthy", &mem, &[]).await;
    vm_cmd(&mut healthy, "reader-start 1").await;
    let used = env.get("healthy").await.socket_path;

    let started = Instant::now();
    let second = restore_raw(&used, &mem, &[]).await;
    match second {
        Err(VmProcessError::Refused { error, .. }) => {
            assert!(error.contains("connecting to the pager socket"), "{error}")
        }
        other => panic!("the second VMM should fail at connect: {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    assert_eq!(env.get("healthy").await.state(), SessionState::Serving);

    let reader = vm_cmd(&mut healthy, "reader-stop").await;
    assert!(reader["pages_verified"].as_u64().unwrap() > 0);
    vm_cmd(&mut healthy, "verify").await;
}

// ---- item 12: the controller creates no directory ----

#[test]
fn the_controller_refuses_a_listen_socket_in_a_directory_that_does_not_exist() {
    let d = tempfile::tempdir().unwrap();
    let missing = d.path().join("nonexistent-dir");
    let socket = missing.join("x");
    let mut child = std::process::Command::new(testkit::binary("uffd-controller"))
        .arg("--listen")
        .arg(format!("unix:{}", socket.display()))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the controller started, listening in {}", missing.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success());
    assert!(err.contains("creates no directory") && err.contains("nonexistent-dir"), "{err}");
    assert!(!missing.exists(), "no directory was created");
}
