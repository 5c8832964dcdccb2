//! Blue-green pager versions through the real binaries: one build run as versions `v1` and `v2`
//! (`--version-label`), DeployVersion, routing by owner, `outdated`, ActivateVersion back and
//! forth, a draining version that exits once it serves nothing, a deploy that fails, and the
//! versions a supervisor starts with.

mod common;
mod versions_support;

use std::path::Path;
use std::time::Duration;

use common::{vm_cmd, Env, MIB};
use testkit::{SupervisorOptions, SupervisorProcess};
use tonic::Code;
use uffdpager::api::{
    ActivateVersionRequest, CompleteSessionRequest, PagerVersion, SessionState, VersionState,
};
use versions_support::{
    deploy, options, pager_binary, script, sessions, version, versions, wait_reaped, wait_versions,
};

async fn activate(env: &Env, label: &str) -> Result<PagerVersion, tonic::Status> {
    env.client()
        .activate_version(ActivateVersionRequest { version: label.into() })
        .await
        .map(tonic::Response::into_inner)
}

/// (id, pager_version, outdated) of every session.
async fn routing(env: &Env) -> Vec<(String, String, bool)> {
    sessions(env).await.sessions.into_iter().map(|s| (s.id, s.pager_version, s.outdated)).collect()
}

fn row(id: &str, version: &str, outdated: bool) -> (String, String, bool) {
    (id.into(), version.into(), outdated)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_deploy_new_vms_land_on_v2_v1_serves_its_own_and_exits_once_drained() {
    let env = Env::start_with(options("v1")).await;
    let mem = env.memfile("mem", 16 * MIB, 0.2, 0.2);
    let mut a1 = env.restore("a1", &mem, &[]).await;
    let a2 = env.restore("a2", &mem, &[]).await;
    vm_cmd(&mut a1, "read-random 500").await;
    let v1_pid = version(&versions(&env).await, "v1").pid;

    let v2 = deploy(&env, &pager_binary(), "v2").await.expect("DeployVersion v2");
    assert_eq!(v2.state(), VersionState::Active);
    assert_ne!(v2.pid, v1_pid);
    assert_eq!(v2.binary_path, pager_binary().display().to_string());
    assert!(v2.started_at.is_some());
    let list = versions(&env).await;
    assert_eq!(list.active_version, "v2");
    let v1 = version(&list, "v1");
    assert_eq!((v1.state(), v1.session_count, v1.pid), (VersionState::Draining, 2, v1_pid));

    let mut b1 = env.restore("b1", &mem, &[]).await;
    vm_cmd(&mut b1, "read-random 500").await;
    assert_eq!(
        routing(&env).await,
        [row("a1", "v1", true), row("a2", "v1", true), row("b1", "v2", false)]
    );
    assert_eq!(sessions(&env).await.active_version, "v2");

    // CompleteSession of a v1 session is served by v1's process, whatever is active.
    let done = env
        .client()
        .complete_session(CompleteSessionRequest { session_id: "a1".into() })
        .await
        .expect("CompleteSession a1")
        .into_inner();
    assert_eq!(done.session.as_ref().unwrap().state(), SessionState::Graduated);
    assert_eq!(done.session.as_ref().unwrap().pager_version, "v1");
    assert!(
        done.message.starts_with(&format!("pager version v1 (pid {v1_pid}):")),
        "{}",
        done.message
    );
    vm_cmd(&mut a1, "verify").await;
    let v1 = version(&versions(&env).await, "v1").clone();
    assert_eq!((v1.state(), v1.session_count), (VersionState::Draining, 1), "a2 keeps it");

    // The last v1 session ends (its VM exits): v1 is stopped, reaped, its sockets removed.
    tokio::task::block_in_place(|| a2.exit()).unwrap();
    let list =
        wait_versions(&env, "v1 EXITED", |l| version(l, "v1").state() == VersionState::Exited)
            .await;
    assert_eq!(version(&list, "v1").session_count, 0);
    assert_eq!(version(&list, "v2").state(), VersionState::Active);
    wait_reaped(v1_pid).await;
    let dir = env.run_dir().join("pagers/v1");
    for file in ["grpc.sock", "handoff.sock", "pid"] {
        assert!(!dir.join(file).exists(), "{file} left behind");
    }
    assert_eq!(env.get("a2").await.state(), SessionState::Ended);
    vm_cmd(&mut b1, "verify").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activating_v1_after_deploying_v2_sends_new_sessions_to_v1_again() {
    let env = Env::start_with(options("v1")).await;
    let mem = env.memfile("mem", 8 * MIB, 0.2, 0.2);
    let _a = env.restore("a", &mem, &[]).await;
    deploy(&env, &pager_binary(), "v2").await.expect("DeployVersion v2");
    let _b = env.restore("b", &mem, &[]).await;

    // Roll back: v1 still runs (it serves a), so it can be active again.
    let v1 = activate(&env, "v1").await.expect("ActivateVersion v1");
    assert_eq!(v1.state(), VersionState::Active);
    let mut c = env.restore("c", &mem, &[]).await;
    assert_eq!(
        routing(&env).await,
        [row("a", "v1", false), row("b", "v2", true), row("c", "v1", false)]
    );
    let list = versions(&env).await;
    assert_eq!(list.active_version, "v1");
    assert_eq!(version(&list, "v2").state(), VersionState::Draining);

    // And forward again.
    activate(&env, "v2").await.expect("ActivateVersion v2");
    let _d = env.restore("d", &mem, &[]).await;
    assert_eq!(
        routing(&env).await,
        [row("a", "v1", true), row("b", "v2", false), row("c", "v1", true), row("d", "v2", false)]
    );
    vm_cmd(&mut c, "verify").await;

    let unknown = activate(&env, "v9").await.expect_err("no such version");
    assert_eq!(unknown.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_of_a_binary_that_exits_at_once_fails_clearly_and_the_active_version_stays() {
    let env = Env::start_with(options("v1")).await;
    let broken =
        script(env.dir.path(), "broken-pager", "echo 'broken-pager: missing config' >&2\nexit 3");
    let err = deploy(&env, &broken, "v2").await.expect_err("a pager that exits at once");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let msg = err.message();
    assert!(msg.contains("v2") && msg.contains("exited before it was ready"), "{msg}");
    assert!(msg.contains("exit status: 3") && msg.contains("missing config"), "{msg}");

    let list = versions(&env).await;
    assert_eq!(list.active_version, "v1");
    assert_eq!(version(&list, "v1").state(), VersionState::Active);
    let v2 = version(&list, "v2");
    assert_eq!((v2.state(), v2.pid), (VersionState::Failed, 0));
    assert!(v2.error.contains("missing config"), "{v2:?}");
    // New sessions still land on v1.
    let mem = env.memfile("mem", 4 * MIB, 0.2, 0.2);
    let mut vm = env.restore("after", &mem, &[]).await;
    assert_eq!(env.get("after").await.pager_version, "v1");
    vm_cmd(&mut vm, "verify").await;
    // A FAILED version cannot be activated; a relative path is refused before anything starts.
    assert_eq!(activate(&env, "v2").await.unwrap_err().code(), Code::FailedPrecondition);
    let relative = deploy(&env, Path::new("target/release/uffd-pager"), "v3").await.unwrap_err();
    assert_eq!(relative.code(), Code::InvalidArgument, "{relative:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_pager_binaries_all_start_the_last_active_the_others_kept_as_roll_back_targets() {
    let bin = pager_binary().display().to_string();
    let env = Env::start_with(SupervisorOptions {
        pager_binary: Some(format!("{bin}=v1").into()),
        args: vec!["--pager-binary".into(), format!("{bin}=v2")],
        show_logs: true,
    })
    .await;
    let list = versions(&env).await;
    assert_eq!(list.active_version, "v2");
    let v1 = version(&list, "v1").clone();
    assert_eq!((v1.state(), v1.session_count), (VersionState::Draining, 0));
    assert!(v1.pid > 0);
    // Idle, but not stopped: a standby version waits to be activated. (A few monitor passes.)
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(version(&versions(&env).await, "v1").pid, v1.pid);

    activate(&env, "v1").await.expect("ActivateVersion v1");
    let mem = env.memfile("mem", 4 * MIB, 0.2, 0.2);
    let _vm = env.restore("vm", &mem, &[]).await;
    assert_eq!(env.get("vm").await.pager_version, "v1");
    // v2 was active (not a standby): once it drains (it serves nothing), it exits.
    wait_versions(&env, "v2 EXITED", |l| version(l, "v2").state() == VersionState::Exited).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_versions_file_starts_every_listed_version_with_the_marked_one_active() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("versions.toml");
    std::fs::write(
        &file,
        format!(
            "[[versions]]\nversion = \"blue\"\nbinary_path = \"{bin}\"\nactive = true\n\n\
             [[versions]]\nversion = \"green\"\nbinary_path = \"{bin}\"\n",
            bin = pager_binary().display()
        ),
    )
    .unwrap();
    let sup = SupervisorProcess::start(
        &testkit::binary("uffd-supervisor"),
        &dir.path().join("run"),
        &SupervisorOptions {
            pager_binary: None,
            args: vec!["--versions-config".into(), file.display().to_string()],
            show_logs: true,
        },
    )
    .await
    .expect("supervisor starts with a versions file");
    let env = Env { dir, sup: Some(sup) };
    let list = versions(&env).await;
    assert_eq!(list.active_version, "blue");
    assert_eq!(version(&list, "blue").state(), VersionState::Active);
    assert_eq!(version(&list, "green").state(), VersionState::Draining);
    assert!(version(&list, "green").pid > 0);
    let mem = env.memfile("mem", 4 * MIB, 0.2, 0.2);
    let mut vm = env.restore("vm", &mem, &[]).await;
    assert_eq!(env.get("vm").await.pager_version, "blue");
    vm_cmd(&mut vm, "verify").await;

    // A file that marks two versions active stops the supervisor at startup, saying so.
    std::fs::write(
        &file,
        "[[versions]]\nbinary_path = \"/a\"\nactive = true\n[[versions]]\nbinary_path = \"/b\"\nactive = true\n",
    )
    .unwrap();
    let out = std::process::Command::new(testkit::binary("uffd-supervisor"))
        .arg("--runtime-dir")
        .arg(env.dir.path().join("other"))
        .arg("--versions-config")
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("2 versions are marked active"), "{stderr}");
}
