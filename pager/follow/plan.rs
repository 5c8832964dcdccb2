//! The decisions of following the vCPUs, pure: where a VMM's faulting thread runs (read from
//! `/proc`), and whether its session moves to another worker.

use std::collections::HashMap;

/// One thread of a VMM as `/proc/PID/task/TID/{stat,schedstat}` show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThreadSample {
    pub tid: u32,
    /// The CPU it last ran on (`stat` field 39).
    pub cpu: usize,
    /// Nanoseconds it has run (`schedstat` field 1).
    pub run_ns: u64,
}

/// The CPU a task last ran on: field 39 of `/proc/PID/task/TID/stat`. The command name (field
/// 2) is in parentheses and may hold spaces and parentheses itself, so fields are counted from
/// its last `)`.
pub fn stat_cpu(stat: &str) -> Option<usize> {
    let after = &stat[stat.rfind(')')? + 1..];
    // Field 3 (state) is the first after the name; field 39 is the 37th.
    after.split_whitespace().nth(36)?.parse().ok()
}

/// Nanoseconds a task has run: the first field of `/proc/PID/task/TID/schedstat`.
pub fn schedstat_run_ns(schedstat: &str) -> Option<u64> {
    schedstat.split_whitespace().next()?.parse().ok()
}

/// The thread that ran most since `before` (run time per tid), if any ran: the thread that
/// touches guest memory is the one that runs (a vCPU), where a VMM's other threads mostly wait.
pub fn busiest(before: &HashMap<u32, u64>, now: &[ThreadSample]) -> Option<ThreadSample> {
    now.iter()
        .filter_map(|t| {
            let ran = t.run_ns.saturating_sub(before.get(&t.tid).copied().unwrap_or(t.run_ns));
            (ran > 0).then_some((ran, *t))
        })
        .max_by_key(|&(ran, _)| ran)
        .map(|(_, t)| t)
}

/// How many samples in a row must see a session's vCPU on another worker's CPU before it moves:
/// a vCPU the scheduler moves for a moment is not followed.
pub const SAMPLES_TO_MOVE: u32 = 2;

/// What the follower remembers of one session between samples.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tracked {
    /// Run time per VMM thread at the last sample.
    pub run_ns: HashMap<u32, u64>,
    /// The worker its vCPU was seen beside, and in how many samples in a row.
    pub seen: Option<(usize, u32)>,
}

/// Where a session goes, given the worker that serves it, the CPU its vCPU ran on in this
/// sample (if it ran), and the CPU of each worker: `Some(worker)` to move it there now. A vCPU
/// on a CPU no worker is pinned to stays where it is, as does one seen elsewhere fewer than
/// [`SAMPLES_TO_MOVE`] times in a row.
pub fn decide(
    tracked: &mut Tracked,
    serving: usize,
    vcpu_cpu: Option<usize>,
    worker_cpus: &[usize],
) -> Option<usize> {
    let beside = vcpu_cpu.and_then(|cpu| worker_cpus.iter().position(|&c| c == cpu));
    let Some(target) = beside.filter(|&w| w != serving) else {
        if vcpu_cpu.is_some() {
            tracked.seen = None;
        }
        return None;
    };
    let count = match tracked.seen {
        Some((w, n)) if w == target => n + 1,
        _ => 1,
    };
    if count >= SAMPLES_TO_MOVE {
        tracked.seen = None;
        Some(target)
    } else {
        tracked.seen = Some((target, count));
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_is_field_39_counted_after_the_last_parenthesis() {
        let stat =
            "4242 (fc_vcpu 0) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 \
                    24 25 26 27 28 29 30 31 32 33 34 35 1 0 0";
        assert_eq!(stat_cpu(stat), Some(1));
        let tricky = "7 (a) b) (c) R 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 \
                      24 25 26 27 28 29 30 31 32 33 34 35 3 0";
        assert_eq!(stat_cpu(tricky), Some(3));
        assert_eq!(stat_cpu("7 (short) R 1 2 3"), None);
        assert_eq!(stat_cpu("no parenthesis"), None);
        assert_eq!(schedstat_run_ns("123456 789 10\n"), Some(123_456));
        assert_eq!(schedstat_run_ns(""), None);
    }

    #[test]
    fn the_busiest_thread_since_the_last_sample_is_taken_for_the_vcpu() {
        let before = HashMap::from([(1, 1_000), (2, 5_000)]);
        let now = [
            ThreadSample { tid: 1, cpu: 0, run_ns: 1_500 },
            ThreadSample { tid: 2, cpu: 1, run_ns: 9_000 },
            // New since the last sample: no run time to compare with yet.
            ThreadSample { tid: 3, cpu: 0, run_ns: 90_000 },
        ];
        assert_eq!(busiest(&before, &now), Some(now[1]));
        let idle = [ThreadSample { tid: 1, cpu: 0, run_ns: 1_000 }];
        assert_eq!(busiest(&before, &idle), None, "nothing ran: no CPU");
        assert_eq!(busiest(&HashMap::new(), &now), None);
    }

    #[test]
    fn a_session_moves_once_its_vcpu_is_seen_beside_another_worker_twice_in_a_row() {
        let cpus = [0, 1];
        let mut t = Tracked::default();
        assert_eq!(decide(&mut t, 0, Some(1), &cpus), None, "seen once");
        assert_eq!(decide(&mut t, 0, None, &cpus), None, "a sample in which it did not run");
        assert_eq!(decide(&mut t, 0, Some(1), &cpus), Some(1), "seen twice in a row");
        assert_eq!(t.seen, None);

        let mut t = Tracked::default();
        assert_eq!(decide(&mut t, 0, Some(1), &cpus), None);
        assert_eq!(decide(&mut t, 0, Some(0), &cpus), None, "back beside its worker");
        assert_eq!(decide(&mut t, 0, Some(1), &cpus), None, "the count starts again");
        assert_eq!(decide(&mut t, 0, Some(1), &cpus), Some(1));

        let mut t = Tracked::default();
        assert_eq!(decide(&mut t, 1, Some(1), &cpus), None, "beside its worker already");
        assert_eq!(decide(&mut t, 0, Some(7), &[0, 1]), None, "no worker on that CPU");
        assert_eq!(decide(&mut t, 0, Some(7), &[0, 1]), None);
        let three = [4, 5, 6];
        assert_eq!(decide(&mut t, 0, Some(6), &three), None);
        assert_eq!(decide(&mut t, 0, Some(6), &three), Some(2), "the worker pinned to CPU 6");
    }
}
