//! The watcher against an in-process fake supervisor on a Unix socket: snapshot, changes,
//! re-list after a restart, and after RESOURCE_EXHAUSTED.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use uffdpager::api::supervisor_server::{Supervisor, SupervisorServer};
use uffdpager::api::*;

use super::*;
use crate::config::Settings;
use crate::state::{Clock, ConnState, Shared};

type Events = mpsc::Sender<Result<SessionEvent, Status>>;

/// A supervisor that only watches: each stream gets the snapshot, the marker, then what the
/// test pushes.
#[derive(Debug, Clone, Default)]
struct Fake {
    snapshot: Arc<Mutex<Vec<Session>>>,
    streams: Arc<Mutex<Vec<Events>>>,
}

fn serving(id: &str) -> Session {
    Session {
        id: id.into(),
        pager_version: "v1".into(),
        state: SessionState::Serving as i32,
        ..Default::default()
    }
}

fn event(kind: SessionEventType, session: Option<Session>) -> SessionEvent {
    SessionEvent { r#type: kind as i32, session, active_version: "v1".into() }
}

impl Fake {
    fn with(ids: &[&str]) -> Self {
        let fake = Fake::default();
        *fake.snapshot.lock().unwrap() = ids.iter().map(|id| serving(id)).collect();
        fake
    }

    /// Sends to every open stream.
    fn push(&self, item: Result<SessionEvent, Status>) {
        for tx in self.streams.lock().unwrap().iter() {
            let _ = tx.try_send(item.clone());
        }
    }

    /// Ends every open stream.
    fn hang_up(&self) {
        self.streams.lock().unwrap().clear();
    }

    /// Serves on `path` until the returned handle is aborted.
    fn serve(&self, path: &Path) -> tokio::task::JoinHandle<()> {
        let incoming = uffdpager::grpc::bind_uds(path).unwrap();
        let svc = SupervisorServer::new(self.clone());
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(incoming)
                .await;
        })
    }
}

fn unimplemented<T>() -> Result<Response<T>, Status> {
    Err(Status::unimplemented("fake"))
}

#[tonic::async_trait]
impl Supervisor for Fake {
    async fn create_session(
        &self,
        _: Request<CreateSessionRequest>,
    ) -> Result<Response<Session>, Status> {
        unimplemented()
    }
    async fn get_session(
        &self,
        _: Request<GetSessionRequest>,
    ) -> Result<Response<Session>, Status> {
        unimplemented()
    }
    async fn list_sessions(
        &self,
        _: Request<ListSessionsRequest>,
    ) -> Result<Response<ListSessionsResponse>, Status> {
        unimplemented()
    }
    type WatchSessionsStream = ReceiverStream<Result<SessionEvent, Status>>;
    async fn watch_sessions(
        &self,
        _: Request<WatchSessionsRequest>,
    ) -> Result<Response<Self::WatchSessionsStream>, Status> {
        let (tx, rx) = mpsc::channel(64);
        for s in self.snapshot.lock().unwrap().iter() {
            let _ = tx.try_send(Ok(event(SessionEventType::Snapshot, Some(s.clone()))));
        }
        let _ = tx.try_send(Ok(event(SessionEventType::Snapshot, None)));
        self.streams.lock().unwrap().push(tx);
        Ok(Response::new(ReceiverStream::new(rx)))
    }
    async fn complete_session(
        &self,
        _: Request<CompleteSessionRequest>,
    ) -> Result<Response<CompleteSessionResponse>, Status> {
        unimplemented()
    }
    async fn delete_session(
        &self,
        _: Request<DeleteSessionRequest>,
    ) -> Result<Response<DeleteSessionResponse>, Status> {
        unimplemented()
    }
    async fn list_versions(
        &self,
        _: Request<ListVersionsRequest>,
    ) -> Result<Response<ListVersionsResponse>, Status> {
        unimplemented()
    }
    async fn deploy_version(
        &self,
        _: Request<DeployVersionRequest>,
    ) -> Result<Response<PagerVersion>, Status> {
        unimplemented()
    }
    async fn activate_version(
        &self,
        _: Request<ActivateVersionRequest>,
    ) -> Result<Response<PagerVersion>, Status> {
        unimplemented()
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    path: PathBuf,
    shared: Arc<Shared>,
    endpoint: String,
    stop: tokio::sync::watch::Sender<bool>,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sup.sock");
    let endpoint = format!("unix:{}", path.display());
    let config = Settings {
        enabled: Some(true),
        supervisors: Some(vec![endpoint.clone()]),
        ..Default::default()
    }
    .resolve()
    .unwrap();
    let shared = Shared::new(config, Clock::System, None);
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(watch(shared.clone(), endpoint.clone(), stop_rx));
    Setup { _dir: dir, path, shared, endpoint, stop }
}

impl Setup {
    /// The watched session ids once the watcher is WATCHING and `want` holds (10 s at most).
    async fn wait(&self, want: impl Fn(&[String], u64) -> bool) -> Vec<String> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (conn, ids, reconnects) = {
                let mut st = self.shared.lock();
                let s = st.supervisor_mut(&self.endpoint).unwrap();
                (s.conn, s.inventory.sessions.keys().cloned().collect::<Vec<_>>(), s.reconnects)
            };
            if conn == ConnState::Watching && want(&ids, reconnects) {
                return ids;
            }
            assert!(tokio::time::Instant::now() < deadline, "never got there: {conn:?} {ids:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

#[tokio::test]
async fn the_snapshot_lists_every_session_and_changes_follow_in_order() {
    let t = setup();
    let fake = Fake::with(&["a", "b"]);
    let server = fake.serve(&t.path);
    assert_eq!(t.wait(|ids, _| ids.len() == 2).await, ["a", "b"]);
    fake.push(Ok(event(SessionEventType::Added, Some(serving("c")))));
    fake.push(Ok(event(SessionEventType::Removed, Some(serving("a")))));
    assert_eq!(t.wait(|ids, _| ids == ["b", "c"]).await, ["b", "c"]);
    assert_eq!(t.shared.lock().supervisor_mut(&t.endpoint).unwrap().inventory.active_version, "v1");
    t.stop.send_replace(true);
    server.abort();
}

#[tokio::test]
async fn a_supervisor_that_starts_late_is_watched_once_it_is_up() {
    let t = setup();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_ne!(t.shared.lock().supervisor_mut(&t.endpoint).unwrap().conn, ConnState::Watching);
    let fake = Fake::with(&["a"]);
    let server = fake.serve(&t.path);
    t.wait(|ids, _| ids == ["a"]).await;
    server.abort();
}

#[tokio::test]
async fn a_restarted_supervisor_is_listed_afresh() {
    let t = setup();
    let first = Fake::with(&["a", "b"]);
    let server = first.serve(&t.path);
    t.wait(|ids, _| ids.len() == 2).await;
    server.abort();
    first.hang_up();
    let second = Fake::with(&["c"]);
    let server = second.serve(&t.path);
    assert_eq!(t.wait(|ids, reconnects| ids == ["c"] && reconnects >= 1).await, ["c"]);
    let st = t.shared.lock();
    assert!(!st.supervisors[0].last_error.is_empty());
    drop(st);
    server.abort();
}

#[tokio::test]
async fn a_lagging_watcher_watches_again_and_re_lists() {
    let t = setup();
    let fake = Fake::with(&["a"]);
    let server = fake.serve(&t.path);
    t.wait(|ids, _| ids == ["a"]).await;
    fake.snapshot.lock().unwrap().push(serving("missed"));
    fake.push(Err(Status::resource_exhausted("watcher lagged: watch again")));
    let ids = t.wait(|ids, reconnects| ids.len() == 2 && reconnects >= 1).await;
    assert_eq!(ids, ["a", "missed"]);
    let error = t.shared.lock().supervisors[0].last_error.clone();
    assert!(error.contains("watch again"), "{error}");
    server.abort();
}

#[tokio::test]
async fn a_malformed_event_restarts_the_stream_instead_of_being_skipped() {
    let t = setup();
    let fake = Fake::with(&["a"]);
    let server = fake.serve(&t.path);
    t.wait(|ids, _| ids == ["a"]).await;
    fake.push(Ok(event(SessionEventType::Updated, None)));
    t.wait(|_, reconnects| reconnects >= 1).await;
    let error = t.shared.lock().supervisors[0].last_error.clone();
    assert!(error.contains("without a session"), "{error}");
    server.abort();
}

#[test]
fn the_backoff_doubles_up_to_a_ceiling() {
    assert_eq!(backoff(1), INITIAL_BACKOFF);
    assert_eq!(backoff(2), INITIAL_BACKOFF * 2);
    assert_eq!(backoff(3), INITIAL_BACKOFF * 4);
    assert_eq!(backoff(40), MAX_BACKOFF);
    assert_eq!(backoff(u32::MAX), MAX_BACKOFF);
}
