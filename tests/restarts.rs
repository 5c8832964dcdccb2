//! Nothing lost across restarts (issue 13, and issue 12's third item): one regression test per
//! defect, through the real binaries, with VMs that verify every byte they read.
//!
//! - a SIGTERM or SIGKILL of the supervisor while a dead pager's sessions are being re-adopted;
//! - a session whose pager dies after a supervisor restart;
//! - sessions no version can adopt (ORPHANED, adopted by the next deploy);
//! - a REMOVE read by a pager killed before it recorded the range;
//! - a new session arriving while the active pager is being restarted;
//! - regions in memory-file order after a restart; a joined completion's own deadline; the
//!   `faults` figure across a re-adoption; a pager whose last session just ended is stopped at
//!   shutdown; the supervisor's threads go back to their idle count.

mod common;
mod versions_support;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{vm_cmd, vm_cmd_within, Env, MIB, STEP};
use testkit::{SupervisorOptions, SupervisorProcess, VmProcess};
use tonic::Code;
use uffdpager::api::{
    CompleteSessionRequest, CreateSessionRequest, DeleteSessionRequest, Session, SessionState,
    VersionState,
};
use versions_support::{
    deploy, options, pager_binary, script, sessions, sigkill, version, versions, wait_sessions,
    wait_versions,
};

/// The pages of MiB `mib..mib + len` (4 KiB pages), as `read-range` takes them.
fn pages(mib: u64, len: u64) -> String {
    format!("{} {}", mib * MIB / 4096, len * MIB / 4096)
}

/// Starts a supervisor on `env`'s runtime directory again, with `opts`.
async fn start_again(env: &mut Env, opts: &SupervisorOptions) {
    let sup = SupervisorProcess::start(&testkit::binary("uffd-supervisor"), &env.run_dir(), opts)
        .await
        .expect("supervisor restarts");
    env.sup = Some(sup);
}

/// True while `pid` runs (not a zombie).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
    })
}

/// Kills the active version's pager and waits until a fresh one has re-adopted every session;
/// returns the fresh pid.
async fn kill_active_and_wait(env: &Env, label: &str) -> u32 {
    let old = version(&versions(env).await, label).pid;
    sigkill(old);
    let fresh = wait_versions(env, "a fresh pager", |l| {
        let v = version(l, label);
        v.state() == VersionState::Active && v.pid != 0 && v.pid != old
    })
    .await;
    let pid = version(&fresh, label).pid;
    wait_sessions(env, "every session re-adopted", |l| {
        l.sessions.iter().all(|s| s.state() != SessionState::Serving || s.pager_version == label)
            && l.sessions.iter().all(|s| {
                s.state() != SessionState::Serving
                    || s.error.contains(&format!("re-adopted by pager version {label} (pid {pid})"))
            })
    })
    .await;
    pid
}

/// Every VM answers a read of `n` random pages (verified) within a generous deadline.
async fn all_read(vms: &mut [VmProcess], n: u32, what: &str) {
    for vm in vms.iter_mut() {
        vm_cmd_within(vm, &format!("read-random {n}"), STEP, what).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigterm_while_a_dead_pagers_sessions_wait_for_its_respawn_finishes_the_re_adoption() {
    let mut env = Env::start_with(options("v1")).await;
    let mem = env.memfile("mem", 8 * MIB, 0.2, 0.2);
    let mut vms = vec![env.restore("a", &mem, &[]).await, env.restore("b", &mem, &[]).await];
    vm_cmd(&mut vms[0], &format!("balloon 0 {} {}", MIB, MIB)).await;
    all_read(&mut vms, 300, "before the kills").await;
    // The first death is respawned at once; the second one waits 1 s (backoff)...
    kill_active_and_wait(&env, "v1").await;
    let second = version(&versions(&env).await, "v1").pid;
    // ...and SIGTERM arrives right then, before the supervisor has even noticed the death.
    sigkill(second);
    let mut old = env.sup.take().unwrap();
    let started = Instant::now();
    assert!(old.terminate().await.unwrap().success());
    eprintln!("the supervisor exited {:?} after SIGTERM", started.elapsed());

    // The re-adoption finished before it exited: a pager serves both VMs now.
    all_read(&mut vms, 300, "after the supervisor exited").await;
    start_again(&mut env, &options("v1")).await;
    let listed = sessions(&env).await;
    assert_eq!(listed.sessions.len(), 2, "every session is listed: {listed:?}");
    let pid = version(&versions(&env).await, "v1").pid;
    assert!(pid != second && running(pid), "a fresh pager serves them");
    for s in &listed.sessions {
        assert_eq!((s.state(), s.pager_version.as_str()), (SessionState::Serving, "v1"), "{s:?}");
    }
    vm_cmd(&mut vms[0], &format!("read-range {}", pages(1, 1))).await; // ballooned: zeros
    for vm in &mut vms {
        vm_cmd(vm, "verify").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkill_while_a_dead_pagers_sessions_wait_leaves_them_to_the_next_supervisor() {
    let mut env = Env::start_with(options("v1")).await;
    let mem = env.memfile("mem", 8 * MIB, 0.2, 0.2);
    let mut vms = vec![env.restore("a", &mem, &[]).await, env.restore("b", &mem, &[]).await];
    vm_cmd(&mut vms[0], "read-random 500").await;
    vm_cmd(&mut vms[0], &format!("balloon 0 {} {}", 2 * MIB, MIB)).await;
    vm_cmd(&mut vms[1], "write 10 20 7").await;
    kill_active_and_wait(&env, "v1").await;
    let second = version(&versions(&env).await, "v1").pid;
    // The second death waits 1 s for its respawn: kill -9 the supervisor in that window. Only
    // the VMMs still hold the sessions' uffds now.
    sigkill(second);
    env.sup.take().unwrap().kill().await.unwrap();

    start_again(&mut env, &options("v1")).await;
    // Listed at once (ORPHANED, or already adopted), then adopted by the version it started.
    let first = sessions(&env).await;
    assert_eq!(first.sessions.len(), 2, "{first:?}");
    assert!(
        first
            .sessions
            .iter()
            .all(|s| matches!(s.state(), SessionState::Orphaned | SessionState::Serving)),
        "{first:?}"
    );
    let pid = version(&versions(&env).await, "v1").pid;
    let l = wait_sessions(&env, "both adopted", |l| {
        l.sessions.iter().all(|s| s.state() == SessionState::Serving && s.pager_version == "v1")
    })
    .await;
    for s in &l.sessions {
        assert!(s.error.contains(&format!("re-adopted by pager version v1 (pid {pid})")), "{s:?}");
        assert_eq!(s.regions.len(), 1);
        assert!(s.connected_at.is_some() && s.vmm_pid > 0, "{s:?}");
    }
    vm_cmd(&mut vms[0], &format!("read-range {}", pages(2, 1))).await; // ballooned: zeros
    vm_cmd(&mut vms[1], "read-range 10 20").await; // written before: the guest's own bytes
    for vm in &mut vms {
        vm_cmd(vm, "verify").await;
    }
    // And they are as re-adoptable as ever: its VMM stream is a pidfd now.
    kill_active_and_wait(&env, "v1").await;
    all_read(&mut vms, 200, "after one more kill").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_supervisor_restart_a_session_whose_pager_dies_is_re_adopted_with_right_bytes() {
    let mut env = Env::start_with(options("v1")).await;
    let mem = env.memfile("mem", 8 * MIB, 0.2, 0.2);
    let mut vm = env.restore("a", &mem, &[]).await;
    vm_cmd(&mut vm, "read-random 500").await;
    vm_cmd(&mut vm, &format!("balloon 0 {} {}", 3 * MIB, MIB)).await;
    assert!(env.sup.take().unwrap().terminate().await.unwrap().success());
    start_again(&mut env, &options("v1")).await;
    let before = env.get("a").await;
    assert_eq!(before.state(), SessionState::Serving);

    let fresh = kill_active_and_wait(&env, "v1").await;
    let s = env.get("a").await;
    assert_eq!(s.state(), SessionState::Serving, "{s:?}");
    assert!(s.error.contains(&format!("(pid {fresh})")), "{s:?}");
    vm_cmd(&mut vm, &format!("read-range {}", pages(3, 1))).await; // ballooned: zeros
    vm_cmd(&mut vm, "read-random 500 9").await;
    vm_cmd(&mut vm, "verify").await;
    env.graduate("a").await;
    vm_cmd(&mut vm, "verify").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_no_version_can_adopt_is_orphaned_and_the_next_deploy_adopts_it() {
    // The only version works the first time it starts, and crashes at once every time after.
    let bin_dir = tempfile::tempdir().unwrap();
    let marker = bin_dir.path().join("started-once");
    let flaky = script(
        bin_dir.path(),
        "flaky-pager",
        &format!(
            "if [ ! -e {m} ]; then touch {m}; exec {p} \"$@\"; fi\necho 'flaky-pager: no' >&2\nexit 3",
            m = marker.display(),
            p = pager_binary().display()
        ),
    );
    let env = Env::start_with(SupervisorOptions {
        pager_binary: Some(format!("{}=v1", flaky.display()).into()),
        ..Default::default()
    })
    .await;
    let mem = env.memfile("mem", 4 * MIB, 0.2, 0.2);
    let mut vm = env.restore("lonely", &mem, &[]).await;
    vm_cmd(&mut vm, "read-random 100").await;
    vm_cmd(&mut vm, &format!("balloon 0 {} {}", MIB, MIB)).await;
    sigkill(version(&versions(&env).await, "v1").pid);

    let l = wait_sessions(&env, "lonely ORPHANED", |l| {
        l.sessions.iter().all(|s| s.state() == SessionState::Orphaned)
    })
    .await;
    assert!(l.sessions[0].error.contains("ORPHANED until"), "{:?}", l.sessions[0]);
    // Not terminal, not graduatable, not deletable: it waits for a pager.
    let complete = env
        .client()
        .complete_session(CompleteSessionRequest { session_id: "lonely".into() })
        .await
        .expect_err("nothing serves it");
    assert_eq!(complete.code(), Code::Unavailable, "{complete:?}");
    let delete = env
        .client()
        .delete_session(DeleteSessionRequest { session_id: "lonely".into() })
        .await
        .expect_err("its VM is alive");
    assert_eq!(delete.code(), Code::FailedPrecondition, "{delete:?}");

    deploy(&env, &pager_binary(), "v2").await.expect("DeployVersion v2");
    let s = wait_sessions(&env, "adopted by v2", |l| {
        l.sessions.iter().all(|s| s.state() == SessionState::Serving && s.pager_version == "v2")
    })
    .await;
    assert!(s.sessions[0].error.contains("re-adopted by pager version v2"), "{s:?}");
    vm_cmd(&mut vm, &format!("read-range {}", pages(1, 1))).await; // ballooned: zeros
    vm_cmd(&mut vm, "verify").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remove_read_by_a_pager_killed_before_it_recorded_the_range_still_reads_zero() {
    let hook_dir = tempfile::tempdir().unwrap();
    let marker = hook_dir.path().join("killed-after-remove-read");
    let marker_text = marker.display().to_string();
    let env = Env::start_with_env(
        options("v1"),
        &[("UFFD_PAGER_KILL_AFTER_REMOVE_READ", marker_text.as_str())],
    )
    .await;
    let mem = env.memfile("mem", 8 * MIB, 0.0, 0.0);
    let mut vm = env.restore("a", &mem, &[]).await;
    // MiB 2..4 partly touched, so the range holds present and never-served pages.
    vm_cmd(&mut vm, &format!("read-range {} {}", 2 * MIB / 4096, 100)).await;
    let pid = version(&versions(&env).await, "v1").pid;
    // The pager reads this REMOVE (so the VMM's madvise returns) and dies before recording it.
    vm_cmd(&mut vm, &format!("balloon 0 {} {}", 2 * MIB, 2 * MIB)).await;
    // (The madvise returns as soon as the event is read: the hook fires a moment later.)
    let deadline = Instant::now() + STEP;
    while !marker.exists() {
        assert!(Instant::now() < deadline, "the hook never fired");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let fresh = wait_versions(&env, "v1 respawned", |l| {
        let v = version(l, "v1");
        v.state() == VersionState::Active && v.pid != 0 && v.pid != pid
    })
    .await;
    assert!(!running(pid));
    let fresh = version(&fresh, "v1").pid;
    wait_sessions(&env, "a re-adopted", |l| {
        l.sessions[0].error.contains(&format!("re-adopted by pager version v1 (pid {fresh})"))
    })
    .await;
    // Every page of the discarded range reads zero (the VM checks each byte), touched or not.
    let z = vm_cmd(&mut vm, &format!("read-range {}", pages(2, 2))).await;
    assert_eq!(z["pages_verified"].as_u64().unwrap(), 2 * MIB / 4096, "{z}");
    vm_cmd(&mut vm, "verify").await;
    env.graduate("a").await;
    vm_cmd(&mut vm, "verify").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_session_arriving_while_the_active_pager_restarts_waits_for_it_and_serves() {
    let env = Env::start_with(options("v1")).await;
    let mem = env.memfile("mem", 4 * MIB, 0.2, 0.2);
    let mut a = env.restore("a", &mem, &[]).await;
    kill_active_and_wait(&env, "v1").await;
    // The second death in a row is respawned after 1 s: a VM restored meanwhile must wait for it.
    sigkill(version(&versions(&env).await, "v1").pid);
    let mut b = env.restore("b", &mem, &[]).await;
    let s = env.get("b").await;
    assert_eq!((s.state(), s.pager_version.as_str()), (SessionState::Serving, "v1"), "{s:?}");
    vm_cmd(&mut b, "read-random 300").await;
    vm_cmd(&mut a, "read-random 300").await;

    // An active version that keeps dying: the new session goes to another running version.
    let marker = env.dir.path().join("started-once");
    let flaky = script(
        env.dir.path(),
        "flaky-pager",
        &format!(
            "if [ ! -e {m} ]; then touch {m}; exec {p} \"$@\"; fi\necho 'flaky-pager: no' >&2\nexit 3",
            m = marker.display(),
            p = pager_binary().display()
        ),
    );
    deploy(&env, &flaky, "v2").await.expect("DeployVersion v2");
    sigkill(version(&versions(&env).await, "v2").pid);
    let c = tokio::spawn({
        let client = env.client();
        let mem = mem.clone();
        async move { restore_with(client, "c", &mem).await }
    });
    wait_versions(&env, "v2 FAILED", |l| version(l, "v2").state() == VersionState::Failed).await;
    let mut c = c.await.unwrap();
    // The VM is up once its handshake is sent; the handoff may still be waiting for v2's restart.
    let s = env.wait_state("c", SessionState::Serving).await;
    assert_eq!((s.state(), s.pager_version.as_str()), (SessionState::Serving, "v1"), "{s:?}");
    vm_cmd(&mut c, "read-random 300").await;
    vm_cmd(&mut c, "verify").await;
}

/// CreateSession and a VM restored through it, without waiting for SERVING.
async fn restore_with(
    mut client: uffdpager::api::supervisor_client::SupervisorClient<tonic::transport::Channel>,
    id: &str,
    mem: &Path,
) -> VmProcess {
    let s: Session = client
        .create_session(CreateSessionRequest {
            session_id: id.into(),
            memory_file: mem.display().to_string(),
            labels: Default::default(),
            ..Default::default()
        })
        .await
        .expect("CreateSession")
        .into_inner();
    let (socket, mem) = (std::path::PathBuf::from(s.socket_path), mem.to_path_buf());
    tokio::task::spawn_blocking(move || {
        VmProcess::restore(&testkit::binary("uffd-vmsim"), &socket, &mem, &[], STEP)
    })
    .await
    .unwrap()
    .expect("VM restores")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regions_keep_memory_file_order_across_a_supervisor_restart() {
    let mut env = Env::start_with(options("v1")).await;
    let mem = env.memfile("mem", 8 * MIB, 0.2, 0.2);
    let mut vm = env.restore("two", &mem, &["4M@0", "4M@4M"]).await;
    let before = env.get("two").await.regions;
    let offsets: Vec<u64> = before.iter().map(|r| r.offset).collect();
    assert_eq!(offsets, [0, 4 * MIB], "memory-file order: {before:?}");
    assert!(env.sup.take().unwrap().terminate().await.unwrap().success());
    start_again(&mut env, &options("v1")).await;
    assert_eq!(env.get("two").await.regions, before);
    vm_cmd(&mut vm, "verify").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_joined_without_a_deadline_is_not_cut_short_by_the_first_callers() {
    let env = Env::start_with(options("v1")).await;
    let mem = env.memfile("mem", 512 * MIB, 0.0, 0.0);
    let mut vm = env.restore("big", &mem, &[]).await;
    vm_cmd(&mut vm, "read-random 200").await;
    let mut first = env.client();
    let hasty = tokio::spawn(async move {
        let mut req = tonic::Request::new(CompleteSessionRequest { session_id: "big".into() });
        req.set_timeout(Duration::from_millis(100));
        first.complete_session(req).await
    });
    let deadline = Instant::now() + STEP;
    while env.get("big").await.state() != SessionState::Completing {
        assert!(Instant::now() < deadline, "never COMPLETING");
        tokio::task::yield_now().await;
    }
    // Joins the running completion, with no deadline of its own.
    let patient =
        env.client().complete_session(CompleteSessionRequest { session_id: "big".into() }).await;
    let hasty = hasty.await.unwrap();
    let err = hasty.expect_err("512 MiB do not graduate in 100 ms");
    assert!(matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled), "{err:?}");
    let done = patient.expect("the joined call graduates the session").into_inner();
    assert_eq!(done.session.unwrap().state(), SessionState::Graduated);
    vm_cmd(&mut vm, "verify").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_faults_figure_goes_on_across_a_re_adoption() {
    let env = Env::start_with(options("v1")).await;
    let mem = env.memfile("mem", 8 * MIB, 0.0, 0.0);
    let mut vm = env.restore("a", &mem, &[]).await;
    vm_cmd(&mut vm, "read-random 400").await;
    let before = env.get("a").await.faults;
    assert!(before >= 1, "faults counted: {before}");
    kill_active_and_wait(&env, "v1").await;
    let after = env.get("a").await.faults;
    assert!(after >= before, "the figure went back from {before} to {after}");
    vm_cmd(&mut vm, "read-random 400 5").await;
    let later = env.get("a").await.faults;
    assert!(later > after, "faults after the re-adoption count on: {after} -> {later}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigterm_right_after_the_last_vm_exited_stops_its_pager() {
    let mut env = Env::start_with(options("v1")).await;
    let mem = env.memfile("mem", 4 * MIB, 0.2, 0.2);
    let a = env.restore("a", &mem, &[]).await;
    let b = env.restore("b", &mem, &[]).await;
    let pid = version(&versions(&env).await, "v1").pid;
    // Both VMs exit; SIGTERM follows at once, before the supervisor's monitor has noticed.
    tokio::task::block_in_place(|| {
        a.exit().unwrap();
        b.exit().unwrap();
    });
    let mut sup = env.sup.take().unwrap();
    assert!(sup.terminate().await.unwrap().success());
    let deadline = Instant::now() + STEP;
    while running(pid) {
        assert!(Instant::now() < deadline, "pager {pid} left running with nothing to serve");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_supervisors_threads_return_to_their_idle_count_after_concurrent_handoffs() {
    let env = Env::start_with(options("v1")).await;
    let mem = env.memfile("mem", 4 * MIB, 0.2, 0.2);
    let sup = i32::try_from(env.sup().pid().unwrap()).unwrap();
    let idle = common::holdings(sup, &[]).threads;
    let restores: Vec<_> = (0..8)
        .map(|i| {
            let (client, mem) = (env.client(), mem.clone());
            tokio::spawn(async move { restore_with(client, &format!("vm-{i}"), &mem).await })
        })
        .collect();
    let mut vms = Vec::new();
    for r in restores {
        vms.push(r.await.unwrap());
    }
    for i in 0..8 {
        env.wait_state(&format!("vm-{i}"), SessionState::Serving).await;
    }
    let busy = common::holdings(sup, &[]).threads;
    tokio::task::block_in_place(|| vms.into_iter().for_each(|vm| drop(vm.exit())));
    // tokio's blocking pool lets a thread go after 10 s without work: nothing may keep them.
    let deadline = Instant::now() + STEP;
    loop {
        let now = common::holdings(sup, &[]).threads;
        if now <= idle {
            eprintln!("threads: {idle} idle, {busy} with 8 handoffs, {now} after");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the supervisor keeps {now} threads ({idle} when idle): {:?}",
            testkit::procfs::thread_names(sup)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
