//! The `uffdpager.v1.Supervisor` gRPC service: a thin layer that turns requests into calls on
//! [`Core`] and domain errors into statuses (through `status.rs`).

use std::sync::Arc;

use tokio::sync::{broadcast, mpsc, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use uffdpager::api::supervisor_server::Supervisor;
use uffdpager::api::{
    ActivateVersionRequest, CompleteSessionRequest, CompleteSessionResponse, CreateSessionRequest,
    DeleteSessionRequest, DeleteSessionResponse, DeployVersionRequest, GetSessionRequest,
    ListSessionsRequest, ListSessionsResponse, ListVersionsRequest, ListVersionsResponse,
    PagerVersion, Session, SessionEvent, WatchSessionsRequest,
};

use crate::core::{until_true, Core};
use crate::inventory::Inventory;
use crate::status::ServiceError;
use uffdpager::grpc::parse_grpc_timeout;

/// Events buffered between a watcher's task and its HTTP/2 stream.
const STREAM_BUFFER: usize = 64;

/// The Supervisor service over the shared [`Core`].
#[derive(Debug, Clone)]
pub struct SupervisorService {
    core: Arc<Core>,
}

impl SupervisorService {
    pub fn new(core: Arc<Core>) -> Self {
        Self { core }
    }
}

/// The stream of one watcher: the snapshot, its end marker, then every change in order. A
/// watcher that falls more than the inventory's capacity behind gets RESOURCE_EXHAUSTED and the
/// stream ends; it also ends when `closing` turns true (shutdown) or the client goes away.
pub fn event_stream(
    inventory: &Inventory,
    mut closing: watch::Receiver<bool>,
) -> ReceiverStream<Result<SessionEvent, Status>> {
    let (snapshot, mut events) = inventory.watch();
    let (tx, rx) = mpsc::channel(STREAM_BUFFER);
    tokio::spawn(async move {
        for event in snapshot {
            if tx.send(Ok(event)).await.is_err() {
                return;
            }
        }
        loop {
            let next = tokio::select! {
                _ = tx.closed() => return,
                _ = until_true(&mut closing) => return,
                next = events.recv() => next,
            };
            match next {
                Ok(event) => {
                    if tx.send(Ok(event)).await.is_err() {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    let _ = tx.send(Err(ServiceError::WatcherLagged(n).into())).await;
                    return;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    });
    ReceiverStream::new(rx)
}

/// The caller's deadline, from its `grpc-timeout` header.
fn deadline<T>(req: &Request<T>) -> Option<Instant> {
    let value = req.metadata().get("grpc-timeout")?.to_str().ok()?;
    parse_grpc_timeout(value).and_then(|t| Instant::now().checked_add(t))
}

#[tonic::async_trait]
impl Supervisor for SupervisorService {
    async fn create_session(
        &self,
        request: Request<CreateSessionRequest>,
    ) -> Result<Response<Session>, Status> {
        Ok(Response::new(self.core.create_session(request.into_inner()).await?))
    }

    async fn get_session(
        &self,
        request: Request<GetSessionRequest>,
    ) -> Result<Response<Session>, Status> {
        Ok(Response::new(self.core.get_session(request.into_inner()).await?))
    }

    async fn list_sessions(
        &self,
        _request: Request<ListSessionsRequest>,
    ) -> Result<Response<ListSessionsResponse>, Status> {
        Ok(Response::new(self.core.list_sessions()))
    }

    type WatchSessionsStream = ReceiverStream<Result<SessionEvent, Status>>;

    async fn watch_sessions(
        &self,
        _request: Request<WatchSessionsRequest>,
    ) -> Result<Response<Self::WatchSessionsStream>, Status> {
        if self.core.is_closing() {
            return Err(ServiceError::ShuttingDown.into());
        }
        Ok(Response::new(event_stream(&self.core.inventory, self.core.closing())))
    }

    async fn complete_session(
        &self,
        request: Request<CompleteSessionRequest>,
    ) -> Result<Response<CompleteSessionResponse>, Status> {
        let deadline = deadline(&request);
        let id = request.into_inner().session_id;
        Ok(Response::new(self.core.complete_session(id, deadline).await?))
    }

    async fn delete_session(
        &self,
        request: Request<DeleteSessionRequest>,
    ) -> Result<Response<DeleteSessionResponse>, Status> {
        let session = self.core.delete_session(request.into_inner().session_id).await?;
        Ok(Response::new(DeleteSessionResponse { session: Some(session) }))
    }

    async fn list_versions(
        &self,
        _request: Request<ListVersionsRequest>,
    ) -> Result<Response<ListVersionsResponse>, Status> {
        let (versions, active_version) = self.core.list_versions();
        Ok(Response::new(ListVersionsResponse { versions, active_version }))
    }

    async fn deploy_version(
        &self,
        request: Request<DeployVersionRequest>,
    ) -> Result<Response<PagerVersion>, Status> {
        let req = request.into_inner();
        let core = self.core.clone();
        // In a task of its own: a client that gives up must not leave a version half started.
        let deployed =
            tokio::spawn(async move { core.deploy_version(&req.binary_path, &req.version).await })
                .await
                .map_err(|e| ServiceError::Internal(format!("the deploy task failed: {e}")))?;
        Ok(Response::new(deployed?))
    }

    async fn activate_version(
        &self,
        request: Request<ActivateVersionRequest>,
    ) -> Result<Response<PagerVersion>, Status> {
        Ok(Response::new(self.core.activate_version(&request.into_inner().version).await?))
    }
}

#[cfg(test)]
mod tests {
    use tokio_stream::StreamExt;
    use uffdpager::api::{SessionEventType, SessionState};

    use super::*;

    fn add(inv: &Inventory, id: &str) {
        inv.insert_with(id, || {
            Ok::<_, ()>(Session { state: SessionState::Pending as i32, ..Default::default() })
        })
        .unwrap();
    }

    fn kind(e: &SessionEvent) -> SessionEventType {
        SessionEventType::try_from(e.r#type).unwrap()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_watch_stream_sends_the_snapshot_the_marker_then_changes() {
        let inv = Inventory::default();
        add(&inv, "a");
        let (_closing_tx, closing) = watch::channel(false);
        let mut stream = event_stream(&inv, closing);
        add(&inv, "b");
        let first = stream.next().await.unwrap().unwrap();
        assert_eq!(
            (kind(&first), first.session.unwrap().id.as_str()),
            (SessionEventType::Snapshot, "a")
        );
        let marker = stream.next().await.unwrap().unwrap();
        assert_eq!(kind(&marker), SessionEventType::Snapshot);
        assert!(marker.session.is_none());
        let added = stream.next().await.unwrap().unwrap();
        assert_eq!(
            (kind(&added), added.session.unwrap().id.as_str()),
            (SessionEventType::Added, "b")
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_watcher_that_lags_gets_resource_exhausted_and_the_stream_ends() {
        let inv = Inventory::new(4);
        let (_closing_tx, closing) = watch::channel(false);
        let mut stream = event_stream(&inv, closing);
        // The forwarding task has not run yet (one thread, no await): these overflow its buffer.
        for i in 0..10 {
            add(&inv, &format!("s{i}"));
        }
        let marker = stream.next().await.unwrap().unwrap();
        assert!(marker.session.is_none());
        let err = stream.next().await.unwrap().unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        assert!(err.message().contains("watch again"), "{}", err.message());
        assert!(stream.next().await.is_none());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn watch_streams_end_when_the_supervisor_shuts_down() {
        let inv = Inventory::default();
        let (closing_tx, closing) = watch::channel(false);
        let mut stream = event_stream(&inv, closing);
        assert!(stream.next().await.unwrap().unwrap().session.is_none());
        closing_tx.send_replace(true);
        assert!(stream.next().await.is_none());
    }
}
