//! WatchSessions through the real binaries: a watcher started before a scenario and one started
//! in its middle both end with a view equal to ListSessions — across session states, a version
//! switch (`outdated` flips), counter updates, deletions and a pager crash with re-adoption.

mod common;
mod versions_support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{vm_cmd, Env, MIB, STEP};
use tokio::task::JoinHandle;
use uffdpager::api::{
    CompleteSessionRequest, DeleteSessionRequest, Session, SessionEventType, SessionState,
    WatchSessionsRequest,
};
use versions_support::{
    deploy, options, pager_binary, sessions, sigkill, version, versions, wait_sessions,
};

/// What one watcher has seen.
#[derive(Debug, Default)]
struct View {
    sessions: BTreeMap<String, Session>,
    active_version: String,
    /// The end-of-snapshot marker arrived.
    synced: bool,
    events: u64,
    /// Events that came without `active_version`.
    without_active: u64,
    ended: Option<String>,
}

/// Watches the supervisor and applies every event to a shared view.
async fn watcher(env: &Env) -> (Arc<Mutex<View>>, JoinHandle<()>) {
    let mut stream = env
        .client()
        .watch_sessions(WatchSessionsRequest {})
        .await
        .expect("WatchSessions")
        .into_inner();
    let view = Arc::new(Mutex::new(View::default()));
    let shared = view.clone();
    let task = tokio::spawn(async move {
        loop {
            let next = stream.message().await;
            let mut v = shared.lock().unwrap();
            let event = match next {
                Ok(Some(e)) => e,
                Ok(None) => {
                    v.ended = Some("the stream ended".into());
                    return;
                }
                Err(s) => {
                    v.ended = Some(format!("{s:?}"));
                    return;
                }
            };
            v.events += 1;
            if event.active_version.is_empty() {
                v.without_active += 1;
            }
            v.active_version = event.active_version.clone();
            let kind = SessionEventType::try_from(event.r#type).unwrap();
            match (kind, event.session) {
                (SessionEventType::Snapshot, None) => v.synced = true,
                (SessionEventType::Removed, Some(s)) => {
                    assert!(v.sessions.remove(&s.id).is_some(), "REMOVED of unknown {}", s.id);
                }
                (SessionEventType::Added, Some(s)) => {
                    assert!(v.synced, "ADDED before the end of the snapshot");
                    assert!(v.sessions.insert(s.id.clone(), s).is_none(), "ADDED twice");
                }
                (SessionEventType::Updated, Some(s)) => {
                    assert!(v.sessions.insert(s.id.clone(), s).is_some(), "UPDATED of unknown");
                }
                (SessionEventType::Snapshot, Some(s)) => {
                    assert!(!v.synced, "SNAPSHOT after the marker");
                    v.sessions.insert(s.id.clone(), s);
                }
                (other, s) => panic!("unexpected event {other:?} {s:?}"),
            }
        }
    });
    (view, task)
}

/// Waits until the view equals ListSessions (counter updates are sent at most once a second per
/// session, so the last ones may lag that much).
async fn converges(env: &Env, name: &str, view: &Mutex<View>) {
    let deadline = Instant::now() + STEP;
    loop {
        let list = sessions(env).await;
        {
            let v = view.lock().unwrap();
            assert!(v.ended.is_none(), "{name}: {:?}", v.ended);
            let seen: Vec<&Session> = v.sessions.values().collect();
            let listed: Vec<&Session> = list.sessions.iter().collect();
            if v.synced && seen == listed && v.active_version == list.active_version {
                assert_eq!(v.without_active, 0, "{name}: every event names the active version");
                eprintln!("{name}: {} events, view equals ListSessions", v.events);
                return;
            }
            if Instant::now() >= deadline {
                panic!("{name} never converged:\nview: {:#?}\nlist: {list:#?}", v.sessions);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_started_before_and_during_a_scenario_end_with_the_listed_inventory() {
    let env = Env::start_with(options("v1")).await;
    let (early, _early_task) = watcher(&env).await;
    let mem = env.memfile("mem", 8 * MIB, 0.2, 0.2);
    let mut s1 = env.restore("s1", &mem, &[]).await;
    let s2 = env.restore("s2", &mem, &[]).await;
    vm_cmd(&mut s1, "read-random 800").await;
    vm_cmd(&mut s1, &format!("balloon 0 {} {}", MIB, MIB)).await;

    deploy(&env, &pager_binary(), "v2").await.expect("DeployVersion v2");
    let (late, _late_task) = watcher(&env).await;
    let mut s3 = env.restore("s3", &mem, &[]).await;
    vm_cmd(&mut s3, "reader-start 3").await;
    let pending = env.create("s4", &mem).await;
    assert_eq!(pending.state(), SessionState::Pending);

    env.client()
        .complete_session(CompleteSessionRequest { session_id: "s1".into() })
        .await
        .expect("CompleteSession s1");
    tokio::task::block_in_place(|| s2.exit()).unwrap();
    env.wait_state("s2", SessionState::Ended).await;
    env.client()
        .delete_session(DeleteSessionRequest { session_id: "s2".into() })
        .await
        .expect("DeleteSession s2");
    env.client()
        .delete_session(DeleteSessionRequest { session_id: "s4".into() })
        .await
        .expect("DeleteSession s4");

    // v2's pager dies: s3 is re-adopted by a fresh v2 (UPDATED events).
    let v2_pid = version(&versions(&env).await, "v2").pid;
    sigkill(v2_pid);
    wait_sessions(&env, "s3 re-adopted", |l| {
        l.sessions.iter().any(|s| s.id == "s3" && s.error.contains("re-adopted by"))
    })
    .await;
    vm_cmd(&mut s3, "reader-stop").await;
    vm_cmd(&mut s3, "read-random 500").await;

    converges(&env, "the early watcher", &early).await;
    converges(&env, "the late watcher", &late).await;
    let v = early.lock().unwrap();
    assert_eq!(v.active_version, "v2");
    let ids: Vec<&String> = v.sessions.keys().collect();
    assert_eq!(ids, ["s1", "s3"]);
    assert_eq!(v.sessions["s1"].state(), SessionState::Graduated);
    assert!(v.sessions["s1"].outdated);
    assert!(!v.sessions["s3"].outdated);
}
