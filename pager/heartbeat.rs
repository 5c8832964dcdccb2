//! A fault worker's count of its loop's turns, and the pure verdict on whether a worker has
//! stalled (its count stayed put for the limit): what the workers and the watchdog share.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

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
}
