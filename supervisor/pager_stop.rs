//! Stopping a pager: asked (Pager/Shutdown) first, then signalled (SIGTERM, SIGKILL), each
//! after a grace period; a pager that still serves sessions refuses and is left running.

use std::time::Duration;

use nix::sys::signal::Signal;
use tracing::warn;
use uffdpager::api::ShutdownRequest;

use crate::pager_exit::Exit;
use crate::pagers::{PagerProcess, CALL_TIMEOUT};

impl PagerProcess {
    /// Asks the pager to exit (Pager/Shutdown), then SIGTERM after `grace`, then SIGKILL after
    /// `grace` again; waits until it is reaped. A pager that refuses because it still serves
    /// sessions is left running: the refusal comes back as `Err` with its reason.
    pub async fn stop(&self, grace: Duration) -> Result<Exit, String> {
        if let Some(exit) = self.exit() {
            return Ok(exit);
        }
        let mut req = tonic::Request::new(ShutdownRequest { force: false });
        req.set_timeout(CALL_TIMEOUT);
        match self.client().shutdown(req).await {
            Ok(r) if r.get_ref().sessions_left > 0 => {
                return Err(format!("it still serves {} sessions", r.get_ref().sessions_left));
            }
            Ok(_) => {}
            Err(s) if s.code() == tonic::Code::FailedPrecondition => {
                return Err(s.message().to_string());
            }
            Err(s) => {
                warn!(
                    version = %self.version,
                    pid = self.pid,
                    error = %s.message(),
                    "Shutdown call failed; signalling the pager instead",
                );
            }
        }
        for signal in [Signal::SIGTERM, Signal::SIGKILL] {
            if let Ok(exit) = tokio::time::timeout(grace, self.wait_exit()).await {
                return Ok(exit);
            }
            warn!(
                version = %self.version,
                pid = self.pid,
                %signal,
                "pager still running; signalling it",
            );
            self.signal(signal);
        }
        Ok(self.wait_exit().await)
    }

    /// SIGKILL, then wait until reaped.
    pub async fn kill(&self) -> Exit {
        self.signal(Signal::SIGKILL);
        self.wait_exit().await
    }
}
