//! `uffdpager.v1.Pager`: the per-version half of the Supervisor API.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tracing::info;
use uffdpager::api::{self, pager_server};
use uffdpager::grpc::{grpc_timeout, timestamp};

use crate::complete::Completion;
use crate::completion_result::{CompleteError, CompletionReport, CompletionResult};
use crate::joined_deadline::JoinedDeadline;
use crate::lifecycle::{Change, Phase};
use crate::registry::CompletionWatch;
use crate::worker::Command;
use crate::Pager;

#[derive(Debug, Clone)]
pub struct PagerService {
    pub pager: Arc<Pager>,
}

fn not_found(id: &str) -> Status {
    Status::not_found(format!("no session {id:?} on this pager"))
}

/// The one place a completion failure becomes a gRPC status.
fn complete_status(e: &CompleteError) -> Status {
    match e {
        CompleteError::Cancelled(_) => Status::cancelled(e.to_string()),
        CompleteError::DeadlineExceeded(_) => Status::deadline_exceeded(e.to_string()),
        CompleteError::Failed(_) => Status::unavailable(e.to_string()),
        CompleteError::SessionEnded(_) => Status::failed_precondition(e.to_string()),
    }
}

/// Decrements the waiter count when a caller stops waiting; the last one cancels the completion.
struct WaiterGuard {
    waiters: Arc<AtomicUsize>,
    cancel: Arc<AtomicBool>,
}

impl Drop for WaiterGuard {
    fn drop(&mut self) {
        if self.waiters.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.cancel.store(true, Ordering::Release);
        }
    }
}

fn response(session: api::Session, report: &CompletionReport) -> api::CompleteSessionResponse {
    let secs = report.duration.as_secs_f64();
    let gbps = if secs > 0.0 { report.populated_bytes as f64 / secs / 1e9 } else { 0.0 };
    api::CompleteSessionResponse {
        session: Some(session),
        already_graduated: false,
        populated_bytes: report.populated_bytes,
        already_resident_bytes: report.already_resident_bytes,
        skipped_zero_bytes: report.skipped_zero_bytes,
        skipped_removed_bytes: report.skipped_removed_bytes,
        faults_during: report.faults_during,
        duration: prost_types::Duration::try_from(report.duration).ok(),
        message: format!(
            "graduated: {} bytes populated in {:.3} s ({gbps:.2} GB/s), {} zero bytes and {} removed bytes skipped",
            report.populated_bytes, secs, report.skipped_zero_bytes, report.skipped_removed_bytes
        ),
    }
}

#[tonic::async_trait]
impl pager_server::Pager for PagerService {
    async fn get_info(
        &self,
        _: Request<api::GetInfoRequest>,
    ) -> Result<Response<api::PagerInfo>, Status> {
        let p = &self.pager;
        Ok(Response::new(api::PagerInfo {
            version: p.version.clone(),
            pid: std::process::id(),
            started_at: Some(timestamp(p.started_at)),
            session_count: u32::try_from(p.registry.live_count()).unwrap_or(u32::MAX),
            fault_threads: u32::try_from(p.workers.len()).unwrap_or(u32::MAX),
            handoff_socket: p.handoff_socket.display().to_string(),
            fault_worker_cpus: p
                .worker_cpus
                .iter()
                .map(|&c| u32::try_from(c).unwrap_or(u32::MAX))
                .collect(),
        }))
    }

    async fn list_sessions(
        &self,
        _: Request<api::ListSessionsRequest>,
    ) -> Result<Response<api::ListSessionsResponse>, Status> {
        Ok(Response::new(api::ListSessionsResponse {
            sessions: self.pager.registry.snapshot(),
            active_version: String::new(),
            host_available_memory_bytes: None,
        }))
    }

    async fn get_session(
        &self,
        request: Request<api::GetSessionRequest>,
    ) -> Result<Response<api::Session>, Status> {
        let id = request.into_inner().session_id;
        let reg = self.pager.registry.lock();
        let entry = reg.get(&id).ok_or_else(|| not_found(&id))?;
        Ok(Response::new(entry.shared.to_proto()))
    }

    async fn complete_session(
        &self,
        request: Request<api::CompleteSessionRequest>,
    ) -> Result<Response<api::CompleteSessionResponse>, Status> {
        let deadline = grpc_timeout(&request).map(|t| Instant::now() + t);
        let id = request.into_inner().session_id;
        let (watch, shared) = {
            let mut reg = self.pager.registry.lock();
            let entry = reg.get_mut(&id).ok_or_else(|| not_found(&id))?;
            let shared = Arc::clone(&entry.shared);
            match shared.phase() {
                Phase::Graduated => {
                    return Ok(Response::new(api::CompleteSessionResponse {
                        session: Some(shared.to_proto()),
                        already_graduated: true,
                        message: "already graduated: nothing to do".into(),
                        ..Default::default()
                    }));
                }
                Phase::Completing => {
                    let w = entry
                        .completion
                        .clone()
                        .ok_or_else(|| Status::internal("completion without a watch"))?;
                    w.waiters.fetch_add(1, Ordering::AcqRel);
                    // It keeps its own deadline: the completion lasts until the latest one.
                    w.deadline.extend(deadline);
                    (w, shared)
                }
                Phase::Serving => {
                    let (tx, rx) = watch::channel(None);
                    let cancel = Arc::new(AtomicBool::new(false));
                    let joined = Arc::new(JoinedDeadline::new(deadline));
                    let w = CompletionWatch {
                        result: rx,
                        waiters: Arc::new(AtomicUsize::new(1)),
                        cancel: Arc::clone(&cancel),
                        deadline: Arc::clone(&joined),
                    };
                    // Refused only if the session ended since the match above read it.
                    shared
                        .change(Change::BeginCompletion)
                        .map_err(|e| Status::failed_precondition(format!("session {id}: {e}")))?;
                    let completion = Completion::new(joined, cancel, tx);
                    if let Err(e) = self.pager.workers[entry.worker()].send(Command::Complete {
                        token: entry.token,
                        completion: Box::new(completion),
                    }) {
                        let _ = shared.change(Change::CompletionFailed);
                        return Err(Status::unavailable(e));
                    }
                    entry.completion = Some(w.clone());
                    info!(session = %id, version = %self.pager.version, "completion started");
                    (w, shared)
                }
                other => {
                    return Err(Status::failed_precondition(format!(
                        "session {id} is {}: only a serving session can graduate",
                        other.to_proto().as_str_name()
                    )))
                }
            }
        };
        let _guard =
            WaiterGuard { waiters: Arc::clone(&watch.waiters), cancel: Arc::clone(&watch.cancel) };
        let mut rx = watch.result.clone();
        let result: CompletionResult = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| Status::internal("the fault worker dropped the completion"))?
            .clone()
            .expect("waited for Some");
        match result {
            Ok(report) => Ok(Response::new(response(shared.to_proto(), &report))),
            Err(e) => Err(complete_status(&e)),
        }
    }

    async fn end_session(
        &self,
        request: Request<api::EndSessionRequest>,
    ) -> Result<Response<api::EndSessionResponse>, Status> {
        let req = request.into_inner();
        let mut reg = self.pager.registry.lock();
        let entry = reg.get(&req.session_id).ok_or_else(|| not_found(&req.session_id))?;
        if entry.shared.is_live() {
            if !req.force {
                return Err(Status::failed_precondition(format!(
                    "session {} is {}: ending it would freeze its VM (force to insist)",
                    req.session_id,
                    entry.shared.phase().to_proto().as_str_name()
                )));
            }
            self.pager.workers[entry.worker()]
                .send(Command::Drop {
                    token: entry.token,
                    reason: "ended by EndSession(force)".into(),
                })
                .map_err(Status::unavailable)?;
        }
        let entry = reg.remove(&req.session_id).expect("present");
        info!(session = %req.session_id, version = %self.pager.version, force = req.force, "session forgotten");
        Ok(Response::new(api::EndSessionResponse { session: Some(entry.shared.to_proto()) }))
    }

    async fn get_metrics(
        &self,
        _: Request<api::GetMetricsRequest>,
    ) -> Result<Response<api::PagerMetrics>, Status> {
        let files = self.pager.memory_files.figures();
        Ok(Response::new(crate::metrics::METRICS.snapshot(files)))
    }

    async fn shutdown(
        &self,
        request: Request<api::ShutdownRequest>,
    ) -> Result<Response<api::ShutdownResponse>, Status> {
        let force = request.into_inner().force;
        let live = self.pager.registry.live_count();
        if live > 0 && !force {
            return Err(Status::failed_precondition(format!(
                "{live} sessions are being served: shutting down would freeze their VMs (force to insist)"
            )));
        }
        info!(version = %self.pager.version, live, force, "shutdown requested");
        self.pager.shutdown.send_replace(true);
        Ok(Response::new(api::ShutdownResponse {
            sessions_left: u32::try_from(live).unwrap_or(u32::MAX),
        }))
    }
}
