//! Waiting for a pager that starts to be healthy: its `grpc.health.v1` check polled until it
//! says SERVING, the process exits, or the deadline passes (the error then carries its last
//! words).

use std::time::Duration;

use tokio::time::Instant;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::pager_exit::PagerError;
use crate::pagers::{PagerProcess, CALL_TIMEOUT};

/// Pause between two health checks while a pager starts.
const READY_POLL: Duration = Duration::from_millis(50);

impl PagerProcess {
    /// Polls its health check until SERVING; Err if it exits first or the deadline passes.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<(), PagerError> {
        let deadline = Instant::now() + timeout;
        let mut exit = self.exit_changes();
        loop {
            if let Some(exit) = self.exit() {
                return Err(PagerError::Exited { version: self.version.clone(), exit });
            }
            // A fresh channel per attempt: the socket appears only once the pager has bound it.
            let mut health =
                HealthClient::new(uffdpager::grpc::uds_channel(&self.paths.grpc_socket));
            let mut req = tonic::Request::new(HealthCheckRequest { service: String::new() });
            req.set_timeout(CALL_TIMEOUT.min(deadline.saturating_duration_since(Instant::now())));
            let last = match health.check(req).await {
                Ok(r) if r.get_ref().status == ServingStatus::Serving as i32 => return Ok(()),
                Ok(r) => format!("health status {:?}", r.get_ref().status()),
                Err(s) => s.message().to_string(),
            };
            if Instant::now() >= deadline {
                let words = self.last_words();
                let words = if words.is_empty() {
                    String::new()
                } else {
                    format!("; its last words: {}", words.join(" | "))
                };
                return Err(PagerError::NotReady {
                    version: self.version.clone(),
                    timeout,
                    last,
                    words,
                });
            }
            tokio::select! {
                _ = tokio::time::sleep(READY_POLL) => {}
                _ = exit.changed() => {}
            }
        }
    }
}
