//! The fault workers' watchdog: a worker that stops coming around its loop (blocked in a
//! syscall, looping inside one step) stops serving every VM it owns, so it must not go unseen.
//!
//! Each worker counts its loop's turns (`crate::heartbeat`). The watchdog pokes every worker's
//! eventfd each period, so an idle worker (asleep in `epoll_wait`) turns too, and reads the
//! counts: a worker whose count has not moved for [`Watchdog::limit`] is stalled. The verdict is
//! a pure function of the counts seen and when ([`StallDetector`]). While any worker is stalled
//! the pager's `grpc.health.v1` status is NOT_SERVING, so the supervisor, which polls it, kills
//! the process (after a bounded time) and hands its sessions to another one.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;
use tracing::{error, info};
use uffdpager::api::pager_server::PagerServer;

use crate::heartbeat::StallDetector;
use crate::service::PagerService;
use crate::Pager;

/// The watchdog's settings.
#[derive(Debug, Clone, Copy)]
pub struct Watchdog {
    /// A worker whose loop has not turned for this long is stalled.
    pub limit: Duration,
}

impl Watchdog {
    /// How often workers are poked and their counts read.
    fn period(&self) -> Duration {
        (self.limit / 4).clamp(Duration::from_millis(10), Duration::from_millis(500))
    }

    /// Watches `workers` until the runtime stops, keeping `health` in step: NOT_SERVING while any
    /// worker is stalled. Logs one line when a worker stalls and one when it recovers.
    pub async fn run(self, pager: Arc<Pager>, health: HealthReporter) {
        let (workers, version) = (&pager.workers, &pager.version);
        let mut detector = StallDetector::new(workers.len(), self.limit, Instant::now());
        let mut stalled = vec![false; workers.len()];
        let mut tick = tokio::time::interval(self.period());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let turns: Vec<u64> = workers.iter().map(|w| w.heartbeat().turns()).collect();
            let verdicts = detector.observe(&turns, Instant::now());
            let before = stalled.iter().any(|s| *s);
            for (i, verdict) in verdicts.iter().enumerate() {
                match (verdict, stalled[i]) {
                    (Some(still), false) => {
                        error!(version = %version, worker = i, stalled_ms = u64::try_from(still.as_millis()).unwrap_or(u64::MAX),
                            "fault worker stalled: its VMs are not served; health is NOT_SERVING");
                        stalled[i] = true;
                    }
                    (None, true) => {
                        info!(version = %version, worker = i, "fault worker turns again");
                        stalled[i] = false;
                    }
                    _ => {}
                }
            }
            let now = stalled.iter().any(|s| *s);
            if now != before {
                let status = if now { ServingStatus::NotServing } else { ServingStatus::Serving };
                health.set_service_status("", status).await;
                health
                    .set_service_status(
                        <PagerServer<PagerService> as tonic::server::NamedService>::NAME,
                        status,
                    )
                    .await;
            }
            // An idle worker sleeps in epoll_wait: a poke makes it turn, a stalled one cannot.
            for w in workers.iter() {
                w.poke();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: Duration = Duration::from_secs(3);

    #[test]
    fn the_period_is_a_quarter_of_the_limit_within_bounds() {
        assert_eq!(Watchdog { limit: LIMIT }.period(), Duration::from_millis(500));
        assert_eq!(Watchdog { limit: Duration::from_secs(1) }.period(), Duration::from_millis(250));
        assert_eq!(
            Watchdog { limit: Duration::from_millis(1) }.period(),
            Duration::from_millis(10)
        );
    }
}
