//! A supervisor stopped with SIGTERM leaves busy pagers running (their VMs never freeze); the
//! next supervisor on the same runtime directory takes them over (pid file + GetInfo), rebuilds
//! the inventory from their sessions and its session metadata files, and goes on: routing,
//! draining, stopping a pager it did not start. The pagers give each session's descriptors back,
//! so a session from before the restart whose pager dies is re-adopted like one created after.

mod common;
mod versions_support;

use std::path::{Path, PathBuf};

use common::{vm_cmd, Env, MIB, STEP};
use testkit::{SupervisorProcess, VmProcess};
use uffdpager::api::{CompleteSessionRequest, CreateSessionRequest, SessionState, VersionState};
use versions_support::{
    deploy, options, pager_binary, sessions, sigkill, version, versions, wait_sessions,
    wait_versions,
};

/// Creates a session with labels and restores a VM through it.
async fn restore_labelled(env: &Env, id: &str, mem: &Path) -> VmProcess {
    let s = env
        .client()
        .create_session(CreateSessionRequest {
            session_id: id.into(),
            memory_file: mem.display().to_string(),
            labels: [("vm".to_string(), id.to_string())].into(),
            ..Default::default()
        })
        .await
        .expect("CreateSession")
        .into_inner();
    let (socket, mem) = (PathBuf::from(s.socket_path), mem.to_path_buf());
    let vm = tokio::task::spawn_blocking(move || {
        VmProcess::restore(&testkit::binary("uffd-vmsim"), &socket, &mem, &[], STEP)
    })
    .await
    .unwrap()
    .expect("VM restores");
    env.wait_state(id, SessionState::Serving).await;
    vm
}

/// Not running: gone, or a zombie (a pager whose parent, the earlier supervisor, is gone is
/// reaped by init, if init reaps).
fn not_running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => {
            stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_supervisor_takes_over_running_pagers_and_rebuilds_the_inventory() {
    let mut env = Env::start_with(options("v1")).await;
    let mem = env.memfile("mem", 8 * MIB, 0.2, 0.2);
    let mut a = restore_labelled(&env, "a", &mem).await;
    let b = restore_labelled(&env, "b", &mem).await;
    vm_cmd(&mut a, "read-random 500").await;
    vm_cmd(&mut a, &format!("balloon 0 {} {}", MIB, MIB)).await;
    deploy(&env, &pager_binary(), "v2").await.expect("DeployVersion v2");
    let mut c = restore_labelled(&env, "c", &mem).await;
    vm_cmd(&mut c, "read-random 500").await;
    let before = versions(&env).await;
    let listed_before = sessions(&env).await;
    let (v1_pid, v2_pid) = (version(&before, "v1").pid, version(&before, "v2").pid);

    // SIGTERM: the supervisor exits, its busy pagers do not.
    let mut old = env.sup.take().unwrap();
    assert!(old.terminate().await.unwrap().success());
    assert!(!not_running(v1_pid) && !not_running(v2_pid), "busy pagers left running");
    vm_cmd(&mut a, "read-random 300").await;

    // Same command line (v1): v2 was recorded as active and still runs, so it stays active.
    let restarted = SupervisorProcess::start(
        &testkit::binary("uffd-supervisor"),
        &env.run_dir(),
        &options("v1"),
    )
    .await
    .expect("supervisor restarts");
    env.sup = Some(restarted);
    let after = versions(&env).await;
    assert_eq!(after.active_version, "v2");
    let v1 = version(&after, "v1");
    assert_eq!((v1.state(), v1.pid, v1.session_count), (VersionState::Draining, v1_pid, 2));
    assert_eq!(v1.binary_path, pager_binary().display().to_string());
    let v2 = version(&after, "v2");
    assert_eq!((v2.state(), v2.pid, v2.session_count), (VersionState::Active, v2_pid, 1));

    // The sessions come back with their metadata; live figures come from the pagers.
    let listed = sessions(&env).await;
    assert_eq!(listed.sessions.len(), 3);
    for (now, was) in listed.sessions.iter().zip(&listed_before.sessions) {
        assert_eq!(now.id, was.id);
        assert_eq!(now.state(), SessionState::Serving, "{now:?}");
        assert_eq!(now.pager_version, was.pager_version);
        assert_eq!(now.outdated, was.outdated);
        assert_eq!(now.labels, was.labels);
        assert_eq!(now.created_at, was.created_at);
        assert_eq!(now.connected_at, was.connected_at);
        assert_eq!(now.socket_path, was.socket_path);
        assert_eq!((now.vmm_pid, &now.regions), (was.vmm_pid, &was.regions));
    }

    // Routing goes on: a v1 session graduates on v1's process; a new one lands on v2.
    let done = env
        .client()
        .complete_session(CompleteSessionRequest { session_id: "a".into() })
        .await
        .expect("CompleteSession a")
        .into_inner();
    assert!(done.message.contains(&format!("(pid {v1_pid})")), "{}", done.message);
    vm_cmd(&mut a, "verify").await;
    let mut d = restore_labelled(&env, "d", &mem).await;
    assert_eq!(env.get("d").await.pager_version, "v2");

    // v1's last session ends: the pager it did not start is stopped all the same.
    tokio::task::block_in_place(|| b.exit()).unwrap();
    wait_versions(&env, "v1 EXITED", |l| version(l, "v1").state() == VersionState::Exited).await;
    assert!(not_running(v1_pid));
    assert!(!env.run_dir().join("pagers/v1/grpc.sock").exists());

    // v2's pager dies: d (handed over by this supervisor) and c (from before the restart: its
    // pager gave its descriptors back) are both re-adopted by a fresh v2.
    sigkill(v2_pid);
    let l = wait_sessions(&env, "c and d re-adopted", |l| {
        let by_id = |id: &str| l.sessions.iter().find(|s| s.id == id).cloned();
        ["c", "d"].iter().all(|id| {
            by_id(id).is_some_and(|s| {
                s.state() == SessionState::Serving && s.error.contains("re-adopted by")
            })
        })
    })
    .await;
    assert_eq!(l.sessions.iter().filter(|s| s.state() == SessionState::Failed).count(), 0);
    for vm in [&mut c, &mut d] {
        vm_cmd(vm, "read-random 500").await;
        vm_cmd(vm, "verify").await;
    }
    let v2 = version(&versions(&env).await, "v2").clone();
    assert_eq!(v2.state(), VersionState::Active);
    assert_ne!(v2.pid, v2_pid);
}
