//! Bad input gets a clear error and harms nothing else: every malformed handshake, a second
//! connection (refused at connect), unknown ids and bad memory files, while a healthy VM keeps being served and
//! verified the whole time by the same pager process.

mod common;

use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use common::{vm_cmd, Env, MIB};
use tonic::Code;
use uffdpager::api::{
    CompleteSessionRequest, CreateSessionRequest, DeleteSessionRequest, GetSessionRequest,
    SessionState,
};
use uffdpager::scm::send_with_fds;

fn a_uffd() -> userfaultfd::Uffd {
    uffdpager::uffd_ops::firecracker_uffd(false).unwrap()
}

enum Send {
    Nothing,
    Json(&'static str),
    JsonNoFd(&'static str),
    JsonWithFile(&'static str),
}

const GOOD_SHAPE: &str = r#"[{"base_host_virt_addr":1073741824,"size":1048576,"offset":0,"page_size":4096,"page_size_kib":4096}]"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_handshakes_fail_their_session_alone_while_a_healthy_vm_runs_on() {
    // The bad handshakes come from this test process: a supervisor that stopped refused VMMs
    // (its default) would stop the test (tests/hostile_supervisor.rs checks that it does).
    let env = Env::start_with(testkit::SupervisorOptions {
        args: vec!["--refused-vmm".into(), "keep".into()],
        ..Default::default()
    })
    .await;
    let mem = env.memfile("mem", 16 * MIB, 0.1, 0.1);
    let mut healthy = env.restore("healthy", &mem, &[]).await;
    vm_cmd(&mut healthy, "reader-start 1").await;
    let pager = env.pager_pid();

    let cases: Vec<(&str, Send, &str)> = vec![
        ("malformed-json", Send::Json("{not json"), "not a JSON array"),
        ("empty-message", Send::Nothing, "without sending a handshake"),
        ("no-fd", Send::JsonNoFd(GOOD_SHAPE), "no file descriptor"),
        ("not-a-uffd", Send::JsonWithFile(GOOD_SHAPE), "not a userfaultfd"),
        (
            "page-size-12345",
            Send::Json(r#"[{"base_host_virt_addr":0,"size":49380,"offset":0,"page_size":12345}]"#),
            "page size 12345 is neither 4096 nor 2097152",
        ),
        (
            "overlapping",
            Send::Json(
                r#"[{"base_host_virt_addr":1073741824,"size":2097152,"offset":0,"page_size":4096},{"base_host_virt_addr":1074790400,"size":2097152,"offset":2097152,"page_size":4096}]"#,
            ),
            "overlap",
        ),
        (
            "past-eof",
            Send::Json(
                r#"[{"base_host_virt_addr":1073741824,"size":16777216,"offset":4096,"page_size":4096}]"#,
            ),
            "past the end of the memory file",
        ),
    ];
    for (id, send, want) in cases {
        let s = env.create(id, &mem).await;
        let mut conn = UnixStream::connect(&s.socket_path).unwrap();
        let uffd = a_uffd();
        match send {
            Send::Nothing => conn.shutdown(std::net::Shutdown::Write).unwrap(),
            Send::Json(j) => {
                send_with_fds(conn.as_fd(), j.as_bytes(), &[uffd.as_fd()]).unwrap();
            }
            Send::JsonNoFd(j) => conn.write_all(j.as_bytes()).unwrap(),
            Send::JsonWithFile(j) => {
                let f = std::fs::File::open(&mem).unwrap();
                send_with_fds(conn.as_fd(), j.as_bytes(), &[f.as_fd()]).unwrap();
            }
        }
        let failed = env.wait_state(id, SessionState::Failed).await;
        assert!(failed.error.contains(want), "{id}: error {:?} should say {want:?}", failed.error);
        assert_eq!(failed.vmm_pid, std::process::id(), "{id}: the VMM's pid is recorded");
        assert_eq!(env.pager_pid(), pager, "{id}: the pager keeps running");
        assert_eq!(env.get("healthy").await.state(), SessionState::Serving, "{id}");
        // A failed session cannot graduate, and can be forgotten.
        let err = env
            .client()
            .complete_session(CompleteSessionRequest { session_id: id.into() })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{id}: {err:?}");
        env.client().delete_session(DeleteSessionRequest { session_id: id.into() }).await.unwrap();
    }

    // A used socket takes no second connection: it is gone once its VMM has connected.
    let used = PathBuf::from(env.get("healthy").await.socket_path);
    let err = UnixStream::connect(&used).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::NotFound, "{err}");
    assert_eq!(env.get("healthy").await.state(), SessionState::Serving);

    let reader = vm_cmd(&mut healthy, "reader-stop").await;
    assert!(reader["pages_verified"].as_u64().unwrap() > 0);
    vm_cmd(&mut healthy, "verify").await;
    assert_eq!(env.pager_pid(), pager);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_sessions_and_bad_memory_files_get_codes_a_client_can_act_on() {
    let env = Env::start().await;
    let mut c = env.client();
    let id = || "no-such-session".to_string();
    let e = c.get_session(GetSessionRequest { session_id: id() }).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = c.complete_session(CompleteSessionRequest { session_id: id() }).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = c.delete_session(DeleteSessionRequest { session_id: id() }).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");

    let create = |file: &str, id: &str| CreateSessionRequest {
        session_id: id.into(),
        memory_file: file.into(),
        labels: Default::default(),
        ..Default::default()
    };
    let e = c.create_session(create("/nonexistent/vm.mem", "")).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("/nonexistent/vm.mem"), "{e:?}");
    let e = c.create_session(create(env.dir.path().to_str().unwrap(), "")).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "a directory is no memory file: {e:?}");
    let e = c.create_session(create("relative.mem", "")).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    let mem = env.memfile("mem", MIB, 0.0, 0.0);
    let e = c.create_session(create(mem.to_str().unwrap(), "../escape")).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let pending =
        c.create_session(create(mem.to_str().unwrap(), "twice")).await.unwrap().into_inner();
    assert_eq!(pending.state(), SessionState::Pending);
    let e = c.create_session(create(mem.to_str().unwrap(), "twice")).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    let e = c
        .complete_session(CompleteSessionRequest { session_id: "twice".into() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "a pending session cannot graduate: {e:?}");
    c.delete_session(DeleteSessionRequest { session_id: "twice".into() }).await.unwrap();
    assert!(
        !PathBuf::from(&pending.socket_path).exists(),
        "a cancelled session's socket is removed"
    );

    let generated = c.create_session(create(mem.to_str().unwrap(), "")).await.unwrap().into_inner();
    assert!(!generated.id.is_empty());
}

/// A pager tuning flag out of range stops the pager at start with a message naming the flag
/// and the value, before it binds anything.
#[test]
fn a_fault_around_size_that_is_no_power_of_two_stops_the_pager_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    for bad in ["48", "2", "4096"] {
        let mut child = std::process::Command::new(testkit::binary("uffd-pager"))
            .arg("--grpc-socket")
            .arg(dir.path().join("pager.sock"))
            .arg("--handoff-socket")
            .arg(dir.path().join("handoff.sock"))
            .args(["--fault-around-kib", bad])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // A pager that took the value would serve until stopped.
        let started = std::time::Instant::now();
        while child.try_wait().unwrap().is_none() {
            if started.elapsed() > std::time::Duration::from_secs(10) {
                let _ = child.kill();
                panic!("--fault-around-kib {bad} was taken: the pager is serving");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let out = child.wait_with_output().unwrap();
        assert!(!out.status.success(), "--fault-around-kib {bad} was taken");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("--fault-around-kib must be a power of two from 4 to 2048")
                && stderr.contains(bad),
            "{stderr}"
        );
        assert!(!dir.path().join("pager.sock").exists(), "it bound its socket");
    }
}
