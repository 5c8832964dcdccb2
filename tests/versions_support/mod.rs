//! What the pager-version tests share (beside `common`): listing and waiting on versions and
//! sessions with a deadline, deploying, killing a pager, and telling a reaped process from a
//! zombie.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use testkit::SupervisorOptions;
use uffdpager::api::{
    ListSessionsRequest, ListSessionsResponse, ListVersionsRequest, ListVersionsResponse,
    PagerVersion,
};

pub use crate::common::deploy;
use crate::common::{Env, STEP};

/// The pager binary of this build.
pub fn pager_binary() -> PathBuf {
    testkit::binary("uffd-pager")
}

/// A supervisor whose first (active) version is this build labelled `label`.
pub fn options(label: &str) -> SupervisorOptions {
    SupervisorOptions {
        pager_binary: Some(pager_binary()),
        args: vec!["--pager-version".into(), label.into()],
        show_logs: true,
    }
}

pub async fn versions(env: &Env) -> ListVersionsResponse {
    env.client().list_versions(ListVersionsRequest {}).await.expect("ListVersions").into_inner()
}

pub async fn sessions(env: &Env) -> ListSessionsResponse {
    env.client().list_sessions(ListSessionsRequest {}).await.expect("ListSessions").into_inner()
}

/// The entry of `label` in a listing.
pub fn version<'a>(list: &'a ListVersionsResponse, label: &str) -> &'a PagerVersion {
    list.versions
        .iter()
        .find(|v| v.version == label)
        .unwrap_or_else(|| panic!("version {label} not listed: {list:?}"))
}

/// Polls ListVersions (at most a minute) until `ok` holds.
pub async fn wait_versions(
    env: &Env,
    what: &str,
    ok: impl Fn(&ListVersionsResponse) -> bool,
) -> ListVersionsResponse {
    let deadline = Instant::now() + STEP;
    loop {
        let list = versions(env).await;
        if ok(&list) {
            return list;
        }
        assert!(Instant::now() < deadline, "never true: {what}: {list:#?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls ListSessions (at most a minute) until `ok` holds.
pub async fn wait_sessions(
    env: &Env,
    what: &str,
    ok: impl Fn(&ListSessionsResponse) -> bool,
) -> ListSessionsResponse {
    let deadline = Instant::now() + STEP;
    loop {
        let list = sessions(env).await;
        if ok(&list) {
            return list;
        }
        assert!(Instant::now() < deadline, "never true: {what}: {list:#?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// kill -9.
pub fn sigkill(pid: u32) {
    let pid = i32::try_from(pid).expect("pid fits");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL)
        .expect("kill -9");
}

/// The process is gone entirely: not running, and not a zombie either (it was reaped).
pub fn reaped(pid: u32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}

/// Waits (at most a minute) until `pid` has been reaped.
pub async fn wait_reaped(pid: u32) {
    let deadline = Instant::now() + STEP;
    while !reaped(pid) {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(Instant::now() < deadline, "pid {pid} was never reaped: {stat}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An executable shell script in `dir`.
pub fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}
