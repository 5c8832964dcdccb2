//! A pager that dies never freezes a VM: the supervisor hands every live session of a pager
//! killed with SIGKILL to another pager process (a fresh one of the same version if it was the
//! active one), with the duplicate uffd, VMM stream, memory file and removed-ranges log it kept.
//! Every VM keeps running and reads only right bytes; ballooned ranges stay zero.

mod common;
mod versions_support;

use std::time::Instant;

use common::{vm_cmd, Env, MIB, STEP};
use tonic::Code;
use uffdpager::api::{CompleteSessionRequest, SessionState, VersionState};
use versions_support::{
    deploy, options, pager_binary, script, sigkill, version, versions, wait_reaped, wait_sessions,
    wait_versions,
};

/// The pages of MiB `mib..mib + len` (4 KiB pages).
fn pages(mib: u64, len: u64) -> String {
    format!("{} {}", mib * MIB / 4096, len * MIB / 4096)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_busy_vms_survive_a_sigkill_of_their_pager_and_ballooned_ranges_stay_zero() {
    let env = Env::start_with(options("v1")).await;
    let mem = env.memfile("mem", 16 * MIB, 0.2, 0.2);
    let ids: Vec<String> = (0..8).map(|i| format!("vm-{i}")).collect();
    let mut vms = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let mut vm = env.restore(id, &mem, &[]).await;
        vm_cmd(&mut vm, "read-random 600").await;
        if i % 2 == 0 {
            // Discard MiB 2..4 (partly touched) and MiB 9..10: the pager reads the REMOVEs
            // (madvise has returned) and records them in the session's removed-ranges log.
            vm_cmd(&mut vm, &format!("balloon 0 {} {}", 2 * MIB, 2 * MIB)).await;
            vm_cmd(&mut vm, &format!("balloon 0 {} {}", 9 * MIB, MIB)).await;
        }
        vm_cmd(&mut vm, &format!("reader-start {i}")).await;
        vms.push(vm);
    }
    let before = versions(&env).await;
    let old_pid = version(&before, "v1").pid;
    assert!(old_pid > 0);

    sigkill(old_pid);
    let killed_at = Instant::now();
    // The active version is respawned, and every session is re-adopted by the fresh process.
    let after = wait_versions(&env, "v1 respawned", |l| {
        let v = version(l, "v1");
        v.state() == VersionState::Active && v.pid != 0 && v.pid != old_pid
    })
    .await;
    let new_pid = version(&after, "v1").pid;
    let listed = wait_sessions(&env, "every session re-adopted", |l| {
        l.sessions
            .iter()
            .all(|s| s.error.contains(&format!("re-adopted by pager version v1 (pid {new_pid})")))
    })
    .await;
    eprintln!("re-adopted 8 sessions {:?} after the kill", killed_at.elapsed());
    for s in &listed.sessions {
        assert_eq!(s.state(), SessionState::Serving, "{s:?}");
        assert_eq!(s.pager_version, "v1");
        assert!(!s.outdated);
    }
    wait_reaped(old_pid).await;

    for (i, vm) in vms.iter_mut().enumerate() {
        // The reader ran across the kill: no mismatch (vm_cmd fails on one).
        let reader = vm_cmd(vm, "reader-stop").await;
        assert!(reader["pages_verified"].as_u64().unwrap() > 0, "{reader}");
        // Served after the kill.
        let r = vm_cmd(vm, "read-random 1000 77").await;
        assert!(r["pages_verified"].as_u64().unwrap() >= 1000, "{r}");
        if i % 2 == 0 {
            // Discarded before the kill: still zero, both ranges (the VM checks every byte).
            let z = vm_cmd(vm, &format!("read-range {}", pages(2, 2))).await;
            assert_eq!(z["pages_verified"].as_u64().unwrap(), 2 * MIB / 4096, "{z}");
            vm_cmd(vm, &format!("read-range {}", pages(9, 1))).await;
            // And a discard after the re-adoption is served as one too.
            vm_cmd(vm, &format!("balloon 0 {} {}", 12 * MIB, MIB)).await;
        }
        vm_cmd(vm, "verify").await;
    }

    // All eight graduate, on the fresh process.
    for (id, vm) in ids.iter().zip(vms.iter_mut()) {
        let done = env.graduate(id).await;
        assert!(done.message.contains(&format!("(pid {new_pid})")), "{}", done.message);
        vm_cmd(vm, "verify").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sessions_of_a_draining_pager_that_dies_go_to_the_active_version() {
    let env = Env::start_with(options("v1")).await;
    let mem = env.memfile("mem", 8 * MIB, 0.2, 0.2);
    let mut old = env.restore("old", &mem, &[]).await;
    vm_cmd(&mut old, "read-random 500").await;
    vm_cmd(&mut old, &format!("balloon 0 {} {}", MIB, MIB)).await;
    deploy(&env, &pager_binary(), "v2").await.expect("DeployVersion v2");
    let mut new = env.restore("new", &mem, &[]).await;
    vm_cmd(&mut old, "reader-start 5").await;
    let list = versions(&env).await;
    let v1 = version(&list, "v1");
    assert_eq!((v1.state(), v1.session_count), (VersionState::Draining, 1));
    assert!(env.get("old").await.outdated);

    sigkill(v1.pid);
    let s = wait_sessions(&env, "old re-adopted by v2", |l| {
        l.sessions.iter().any(|s| {
            s.id == "old"
                && s.pager_version == "v2"
                && !l.sessions.iter().any(|s| s.pager_version == "v1")
        })
    })
    .await;
    let moved = s.sessions.iter().find(|s| s.id == "old").unwrap();
    assert!(!moved.outdated, "its version is the active one now: {moved:?}");
    assert_eq!(moved.state(), SessionState::Serving);
    // A draining version that dies is not restarted: it FAILED, saying why.
    let list =
        wait_versions(&env, "v1 FAILED", |l| version(l, "v1").state() == VersionState::Failed)
            .await;
    assert!(version(&list, "v1").error.contains("exited unexpectedly"), "{list:?}");
    assert_eq!(version(&list, "v2").session_count, 2);

    vm_cmd(&mut old, "reader-stop").await;
    vm_cmd(&mut old, &format!("read-range {}", pages(1, 1))).await;
    vm_cmd(&mut old, "verify").await;
    vm_cmd(&mut new, "verify").await;
    for id in ["old", "new"] {
        let done = env
            .client()
            .complete_session(CompleteSessionRequest { session_id: id.into() })
            .await
            .expect("CompleteSession")
            .into_inner();
        assert_eq!(done.session.unwrap().state(), SessionState::Graduated);
    }
    vm_cmd(&mut old, "verify").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pager_that_crashes_in_a_loop_is_restarted_a_few_times_then_failed_and_its_sessions_move()
{
    let env = Env::start_with(options("v1")).await;
    let mem = env.memfile("mem", 8 * MIB, 0.2, 0.2);
    let mut a = env.restore("a", &mem, &[]).await;
    vm_cmd(&mut a, "read-random 300").await;
    // v2 works the first time it starts, and crashes at once every time after.
    let marker = env.dir.path().join("started-once");
    let flaky = script(
        env.dir.path(),
        "flaky-pager",
        &format!(
            "if [ ! -e {m} ]; then touch {m}; exec {p} \"$@\"; fi\necho 'flaky-pager: cannot start' >&2\nexit 3",
            m = marker.display(),
            p = pager_binary().display()
        ),
    );
    deploy(&env, &flaky, "v2").await.expect("DeployVersion v2");
    let mut b = env.restore("b", &mem, &[]).await;
    vm_cmd(&mut b, "read-random 300").await;
    vm_cmd(&mut b, "reader-start 1").await;
    let v2_pid = version(&versions(&env).await, "v2").pid;

    sigkill(v2_pid);
    let list = wait_versions(&env, "v2 FAILED after its restarts", |l| {
        version(l, "v2").state() == VersionState::Failed
    })
    .await;
    let err = &version(&list, "v2").error;
    assert!(err.contains("gave up after 3 restarts in a row"), "{err}");
    assert!(err.contains("flaky-pager: cannot start"), "the reason carries its last words: {err}");
    // Its session went to the version that still runs.
    wait_sessions(&env, "b adopted by v1", |l| {
        l.sessions
            .iter()
            .any(|s| s.id == "b" && s.pager_version == "v1" && s.state() == SessionState::Serving)
    })
    .await;
    vm_cmd(&mut b, "reader-stop").await;
    vm_cmd(&mut b, "verify").await;
    // The active version is FAILED: new sessions are refused until an operator acts.
    let refused = env
        .client()
        .create_session(uffdpager::api::CreateSessionRequest {
            session_id: "c".into(),
            memory_file: mem.display().to_string(),
            labels: Default::default(),
            ..Default::default()
        })
        .await
        .expect_err("no version to serve a new session");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    env.client()
        .activate_version(uffdpager::api::ActivateVersionRequest { version: "v1".into() })
        .await
        .expect("roll back to v1");
    let mut c = env.restore("c", &mem, &[]).await;
    vm_cmd(&mut c, "verify").await;
    vm_cmd(&mut a, "verify").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_whose_pager_dies_fails_unavailable_and_the_session_serves_on_then_graduates()
{
    let env = Env::start_with(options("v1")).await;
    let mem = env.memfile("mem", 512 * MIB, 0.0, 0.0);
    let mut vm = env.restore("big", &mem, &[]).await;
    vm_cmd(&mut vm, "read-random 500").await;
    vm_cmd(&mut vm, "reader-start 2").await;
    let pid = version(&versions(&env).await, "v1").pid;

    let mut client = env.client();
    let completion = tokio::spawn(async move {
        client.complete_session(CompleteSessionRequest { session_id: "big".into() }).await
    });
    // Kill the pager while it populates (the supervisor marks the session COMPLETING before
    // calling the pager).
    let deadline = Instant::now() + STEP;
    while env.get("big").await.state() != SessionState::Completing {
        assert!(Instant::now() < deadline, "never COMPLETING");
        tokio::task::yield_now().await;
    }
    sigkill(pid);
    let result = completion.await.unwrap();
    let err = result.expect_err("the pager died during the completion");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("exited during the call"), "{}", err.message());

    vm_cmd(&mut vm, "reader-stop").await;
    // Retried while the session is being re-adopted (UNAVAILABLE), as a controller would.
    let deadline = Instant::now() + STEP;
    let done = loop {
        match env
            .client()
            .complete_session(CompleteSessionRequest { session_id: "big".into() })
            .await
        {
            Ok(done) => break done.into_inner(),
            Err(e) if e.code() == Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err(e) => panic!("the retry fails: {e:?}"),
        }
    };
    let s = env.get("big").await;
    assert_eq!(s.pager_version, "v1");
    assert!(s.error.is_empty() || s.error.contains("re-adopt"), "{s:?}");
    assert_eq!(done.session.unwrap().state(), SessionState::Graduated);
    vm_cmd(&mut vm, "verify").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_no_version_can_adopt_them_the_sessions_are_orphaned_saying_why() {
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
    let env = Env::start_with(testkit::SupervisorOptions {
        pager_binary: Some(format!("{}=v1", flaky.display()).into()),
        ..Default::default()
    })
    .await;
    let mem = env.memfile("mem", 4 * MIB, 0.2, 0.2);
    let mut vm = env.restore("lonely", &mem, &[]).await;
    vm_cmd(&mut vm, "read-random 100").await;
    sigkill(version(&versions(&env).await, "v1").pid);

    // Not FAILED: still held, for the next version that becomes available (tests/restarts.rs).
    let s = wait_sessions(&env, "lonely ORPHANED", |l| {
        l.sessions.iter().all(|s| s.state() == SessionState::Orphaned)
    })
    .await;
    let err = &s.sessions[0].error;
    assert!(err.contains("exited unexpectedly"), "{err}");
    assert!(err.contains("no pager version can adopt the session now"), "{err}");
    assert!(err.contains("FAILED"), "the active version's state is named: {err}");
    let v1 = version(&versions(&env).await, "v1").clone();
    assert_eq!(v1.state(), VersionState::Failed);
    assert!(v1.error.contains("gave up after 3 restarts"), "{v1:?}");
}
