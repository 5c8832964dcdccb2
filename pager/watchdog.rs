//! The fault workers' watchdog: a worker that stops coming around its loop (blocked in a
//! syscall, looping inside one step) stops serving every VM it owns, so it must not go unseen.
//!
//! Each worker counts its loop's turns ([`Heartbeat`]). The watchdog pokes every worker's
//! eventfd each period, so an idle worker (asleep in `epoll_wait`) turns too, and reads the
//! counts: a worker whose count has not moved for [`Watchdog::limit`] is stalled. The verdict is
//! a pure function of the counts seen and when ([`StallDetector`]). While any worker is stalled
//! the pager's `grpc.health.v1` status is NOT_SERVING, so the supervisor, which polls it, kills
//! the process (after a bounded time) and hands its sessions to another one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;
use tracing::{error, info};
use uffdpager::api::pager_server::PagerServer;

use crate::service::PagerService;
use crate::Pager;

/// A worker's count of loop turns.
#[derive(Debug, Default)]
pub struct Heartbeat {
    turns: AtomicU64,
}

impl Heartbeat {
    /// One more turn of the worker's loop.
    pub fn beat(&self) {
        self.turns.fetch_add(1, Ordering::Relaxed);
    }

    pub fn turns(&self) -> u64 {
        self.turns.load(Ordering::Relaxed)
    }
}

/// When each worker's count last moved (pure: given the counts and the time).
#[derive(Debug)]
pub struct StallDetector {
    limit: Duration,
    /// Per worker: the count last seen, and when it was first seen at that value.
    seen: Vec<(u64, Instant)>,
}

impl StallDetector {
    pub fn new(workers: usize, limit: Duration, now: Instant) -> Self {
        Self { limit, seen: vec![(0, now); workers] }
    }

    /// Takes in the counts read at `now`; returns, per worker, how long it has been stalled
    /// (`None`: it turned within the limit).
    pub fn observe(&mut self, turns: &[u64], now: Instant) -> Vec<Option<Duration>> {
        self.seen
            .iter_mut()
            .zip(turns)
            .map(|((last, since), &count)| {
                if count != *last {
                    (*last, *since) = (count, now);
                }
                let still = now.saturating_duration_since(*since);
                (still >= self.limit).then_some(still)
            })
            .collect()
    }
}

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
    fn a_worker_that_turns_is_never_stalled() {
        let t0 = Instant::now();
        let mut d = StallDetector::new(1, LIMIT, t0);
        for s in 1..20u64 {
            assert_eq!(d.observe(&[s], t0 + Duration::from_secs(s)), vec![None]);
        }
    }

    #[test]
    fn a_worker_whose_count_stays_put_for_the_limit_is_stalled_until_it_turns() {
        let t0 = Instant::now();
        let mut d = StallDetector::new(2, LIMIT, t0);
        assert_eq!(d.observe(&[5, 1], t0 + Duration::from_secs(1)), vec![None, None]);
        assert_eq!(d.observe(&[5, 2], t0 + Duration::from_secs(3)), vec![None, None]);
        assert_eq!(
            d.observe(&[5, 3], t0 + Duration::from_secs(4)),
            vec![Some(Duration::from_secs(3)), None]
        );
        assert_eq!(
            d.observe(&[5, 4], t0 + Duration::from_secs(9)),
            vec![Some(Duration::from_secs(8)), None]
        );
        assert_eq!(d.observe(&[6, 5], t0 + Duration::from_secs(10)), vec![None, None]);
    }

    #[test]
    fn a_worker_seen_at_start_counts_from_the_start() {
        let t0 = Instant::now();
        let mut d = StallDetector::new(1, LIMIT, t0);
        assert_eq!(d.observe(&[0], t0 + LIMIT), vec![Some(LIMIT)]);
    }

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
