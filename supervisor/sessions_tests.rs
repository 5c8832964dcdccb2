//! Session flows through [`Core`] directly (no gRPC, no pager process): the version table holds
//! one version that never finishes starting.

use std::os::fd::AsFd;
use std::path::Path;
use std::time::Duration;

use tonic::Code;
use uffdpager::api::{CreateSessionRequest, GetSessionRequest};

use super::*;
use crate::core::Config;
use crate::versions::VersionEntry;

fn core(dir: &Path) -> Arc<Core> {
    let mut config = Config::new(dir.join("run"), Duration::from_secs(3600));
    config.handoff_wait = Duration::from_millis(100);
    std::fs::create_dir_all(&config.sessions_dir).unwrap();
    let core = Core::new(config);
    core.versions.update(|t| {
        t.entries.insert("v1".into(), VersionEntry::new("v1", "/nonexistent/uffd-pager".into()));
        t.active = Some("v1".into());
    });
    core.inventory.set_active_version("v1");
    core
}

fn memfile(dir: &Path) -> String {
    let p = dir.join("mem");
    std::fs::write(&p, vec![1u8; 64 * 1024]).unwrap();
    p.display().to_string()
}

async fn create(core: &Arc<Core>, id: &str, mem: &str) -> Result<Session, ServiceError> {
    let req = CreateSessionRequest {
        session_id: id.into(),
        memory_file: mem.into(),
        labels: [("team".to_string(), "a".to_string())].into(),
        ..Default::default()
    };
    core.create_session(req).await
}

/// Waits (on the inventory's events, at most 10 s) until the session is in `state`.
async fn wait_state(core: &Core, id: &str, state: SessionState) -> Session {
    let (_, mut rx) = core.inventory.watch();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let s = core.inventory.get(id).unwrap();
        if state_of(&s) == state {
            return s;
        }
        tokio::time::timeout_at(deadline, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("{id} never reached {state:?}: {s:?}"))
            .unwrap();
    }
}

#[tokio::test]
async fn a_new_session_is_pending_with_its_socket_and_labels() {
    let d = tempfile::tempdir().unwrap();
    let core = core(d.path());
    let s = create(&core, "vm-1", &memfile(d.path())).await.unwrap();
    assert_eq!(state_of(&s), SessionState::Pending);
    assert_eq!(s.labels["team"], "a");
    assert!(s.created_at.is_some());
    assert!(Path::new(&s.socket_path).exists());
    assert_eq!(core.get_session(GetSessionRequest { session_id: "vm-1".into() }).await.unwrap(), s);
}

#[tokio::test]
async fn an_empty_id_gets_a_generated_one_and_a_duplicate_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let core = core(d.path());
    let mem = memfile(d.path());
    let s = create(&core, "", &mem).await.unwrap();
    assert!(s.id.starts_with("s-"), "{}", s.id);
    let err = create(&core, &s.id, &mem).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    let err = create(&core, "bad/id", &mem).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn deleting_a_pending_session_closes_and_removes_its_socket() {
    let d = tempfile::tempdir().unwrap();
    let core = core(d.path());
    let s = create(&core, "vm-1", &memfile(d.path())).await.unwrap();
    let gone = core.delete_session("vm-1".into()).await.unwrap();
    assert_eq!(gone.id, "vm-1");
    assert!(!Path::new(&s.socket_path).exists());
    assert!(core.inventory.get("vm-1").is_none());
    let err = core.delete_session("vm-1".into()).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    // The id is free again.
    create(&core, "vm-1", &memfile(d.path())).await.unwrap();
}

#[tokio::test]
async fn a_serving_session_cannot_be_deleted_and_a_pending_one_cannot_be_completed() {
    let d = tempfile::tempdir().unwrap();
    let core = core(d.path());
    create(&core, "p", &memfile(d.path())).await.unwrap();
    let err = core.complete_session("p".into(), None).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let err = core.complete_session("nope".into(), None).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    core.inventory.modify("p", |r| {
        r.step(crate::lifecycle::Lifecycle::hand_over).unwrap();
        r.step(crate::lifecycle::Lifecycle::serve).unwrap();
    });
    let err = core.delete_session("p".into()).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.to_string().contains("graduate it first"), "{err}");
    assert!(core.inventory.get("p").is_some());
}

#[tokio::test]
async fn an_invalid_handshake_fails_its_session_alone_and_removes_its_socket() {
    let d = tempfile::tempdir().unwrap();
    let core = core(d.path());
    let mem = memfile(d.path());
    let bad = create(&core, "bad", &mem).await.unwrap();
    let good = create(&core, "good", &mem).await.unwrap();
    let vmm = tokio::net::UnixStream::connect(&bad.socket_path).await.unwrap();
    uffdpager::scm::send_with_fds(vmm.as_fd(), b"{not json", &[]).unwrap();
    let s = wait_state(&core, "bad", SessionState::Failed).await;
    assert!(s.error.contains("not a JSON array"), "{}", s.error);
    assert!(!Path::new(&bad.socket_path).exists());
    assert_eq!(state_of(&core.inventory.get("good").unwrap()), SessionState::Pending);
    assert!(Path::new(&good.socket_path).exists());
}

#[tokio::test]
async fn a_valid_handshake_with_no_running_pager_orphans_the_session_naming_the_version() {
    let uffd = uffdpager::uffd_ops::firecracker_uffd(false).expect("creating a userfaultfd");
    let d = tempfile::tempdir().unwrap();
    let core = core(d.path());
    let s = create(&core, "vm-1", &memfile(d.path())).await.unwrap();
    let vmm = tokio::net::UnixStream::connect(&s.socket_path).await.unwrap();
    let json = br#"[{"base_host_virt_addr":1048576,"size":65536,"offset":0,"page_size":4096}]"#;
    uffdpager::scm::send_with_fds(vmm.as_fd(), json, &[uffd.as_fd()]).unwrap();
    let s = wait_state(&core, "vm-1", SessionState::Orphaned).await;
    assert!(s.error.contains("pager version v1") && s.error.contains("STARTING"), "{}", s.error);
    assert_eq!((s.vmm_pid, s.total_bytes), (std::process::id(), 65536), "{s:?}");
    let held = core.held();
    let h = held.get("vm-1").unwrap();
    assert!(h.fds.is_some() && h.request.is_some(), "kept for the version that adopts it");
}

#[tokio::test]
async fn new_sessions_are_refused_while_the_active_version_has_failed() {
    let d = tempfile::tempdir().unwrap();
    let core = core(d.path());
    core.versions.update(|t| t.entries.get_mut("v1").unwrap().lifecycle.fail_to_start()).unwrap();
    let err = create(&core, "vm-1", &memfile(d.path())).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(core.inventory.get("vm-1").is_none());
}
