//! Whether a fault worker may poll after a fault (`--fault-spin-us`): only while it has a CPU
//! to itself. Polling saves the next fault a cross-CPU wake-up when a CPU would otherwise idle;
//! on a busy CPU each poll yields, and a yield hands the CPU to a CPU-bound thread for the rest
//! of its time slice (beside two CPU hogs, 1% of random first touches waited 8 ms: two
//! scheduler ticks), while a worker asleep in `epoll_wait` is woken at once, ahead of them. So a
//! worker polls only while its affinity (and cgroup quota) allows more than one CPU and no more
//! threads are runnable on the machine than it has CPUs (`/proc/loadavg`'s running count, the
//! worker itself included), asked at most every [`Busy::RECHECK`].

use std::time::{Duration, Instant};

/// Whether polling is allowed: more than one CPU allowed, and no more runnable threads than
/// CPUs (so the poll takes no CPU another thread is waiting for).
pub fn may_poll(allowed_cpus: usize, running: Option<u64>) -> bool {
    let Ok(cpus) = u64::try_from(allowed_cpus) else { return false };
    cpus > 1 && running.is_none_or(|r| r <= cpus)
}

/// The running count of `/proc/loadavg` (`0.50 0.40 0.30 3/456 12345`: 3), if it parses.
pub fn running(loadavg: &str) -> Option<u64> {
    loadavg.split_whitespace().nth(3)?.split_once('/')?.0.parse().ok()
}

/// A worker's cached answer.
#[derive(Debug, Default)]
pub struct Busy {
    checked: Option<(Instant, bool)>,
}

impl Busy {
    /// How long an answer is kept (the operator's `taskset`, a host growing busy).
    pub const RECHECK: Duration = Duration::from_millis(10);

    /// Whether this worker may poll at `now`.
    pub fn may_poll(&mut self, now: Instant) -> bool {
        match self.checked {
            Some((at, yes)) if now.saturating_duration_since(at) < Self::RECHECK => yes,
            _ => {
                // The calling thread's affinity (and any cgroup CPU quota).
                let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
                let load = std::fs::read_to_string("/proc/loadavg").ok();
                let yes = may_poll(cpus, load.as_deref().and_then(running));
                self.checked = Some((now, yes));
                yes
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_running_count_is_read_from_loadavg() {
        assert_eq!(running("0.50 0.40 0.30 3/456 12345\n"), Some(3));
        assert_eq!(running("garbage"), None);
    }

    #[test]
    fn a_worker_polls_only_with_a_cpu_to_spare_and_nobody_waiting_for_one() {
        assert!(may_poll(2, Some(1)), "only the worker runs");
        assert!(may_poll(2, Some(2)), "the worker and one vCPU: a CPU each");
        assert!(!may_poll(2, Some(4)), "two CPU hogs beside them");
        assert!(!may_poll(1, Some(1)), "one CPU: polling only delays the vCPU sharing it");
        assert!(may_poll(4, None), "no loadavg: decide from the affinity alone");
    }
}
