//! Following the vCPUs (`--follow-vcpus`): one fault worker pinned to each CPU the pager may
//! use, and each session served by the worker on the CPU its vCPU runs on. A vCPU and the worker
//! that serves it then ping-pong on one CPU, as Firecracker's handler process per VM does with
//! its VM: a fault's two wake-ups stay on that CPU, with no inter-processor interrupt, where a
//! worker on the other CPU pays one for each (BENCHMARKS.md, "Locality is the lever").
//!
//! A thread samples, every [`EVERY`], each session that faulted since the last sample: every
//! [`RESCAN_EVERY`] samples all its VMM's threads (`/proc/PID/task/TID/stat` and `schedstat`),
//! the one that ran most taken for its vCPU; in between that thread alone (two small reads),
//! whose CPU is the session's. A session seen beside another worker twice in a row moves there
//! (`crate::worker`'s `Command::Move`). The decisions are in [`plan`].

pub mod plan;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use crate::worker::Command;
use crate::Pager;
use plan::{ThreadSample, Tracked};

/// How often the vCPUs' CPUs are sampled: a vCPU the scheduler moves is followed within two
/// samples (50 ms).
pub const EVERY: Duration = Duration::from_millis(25);
/// Every this many samples of a session, all its VMM's threads are read again to find its vCPU.
pub const RESCAN_EVERY: u32 = 20;

/// The CPUs this process may run on, in order (its affinity mask).
pub fn allowed_cpus() -> nix::Result<Vec<usize>> {
    let set = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0))?;
    Ok((0..nix::sched::CpuSet::count()).filter(|&c| set.is_set(c).unwrap_or(false)).collect())
}

/// The worker pinned to the CPU process `pid`'s main thread last ran on, if one is.
pub fn worker_beside(pid: u32, worker_cpus: &[usize]) -> Option<usize> {
    if worker_cpus.is_empty() || pid == 0 {
        return None;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let cpu = plan::stat_cpu(&stat)?;
    worker_cpus.iter().position(|&c| c == cpu)
}

/// Thread `tid` of process `pid` as it stands now, if it still exists.
fn sample_thread(pid: u32, tid: u32) -> Option<ThreadSample> {
    let dir = format!("/proc/{pid}/task/{tid}");
    let cpu = plan::stat_cpu(&std::fs::read_to_string(format!("{dir}/stat")).ok()?)?;
    let run_ns =
        plan::schedstat_run_ns(&std::fs::read_to_string(format!("{dir}/schedstat")).ok()?)?;
    Some(ThreadSample { tid, cpu, run_ns })
}

/// The most threads of one VMM read in a scan: a VMM with more (a hostile one) costs the
/// follower no more than this, and is followed by its first ones.
const MAX_THREADS_READ: usize = 256;

/// The threads of process `pid` as they stand now, at most [`MAX_THREADS_READ`] (threads that
/// vanish while read are left out).
fn sample_all(pid: u32) -> std::io::Result<Vec<ThreadSample>> {
    let mut threads = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))?.take(MAX_THREADS_READ) {
        let tid = entry.ok().and_then(|e| e.file_name().to_str().and_then(|t| t.parse().ok()));
        if let Some(t) = tid.and_then(|tid| sample_thread(pid, tid)) {
            threads.push(t);
        }
    }
    Ok(threads)
}

/// What the follower keeps per session: its faults at the last sample, the thread taken for
/// its vCPU and the samples since all threads were read, and the plan's state.
#[derive(Debug, Default)]
struct Followed {
    faults: u64,
    vcpu: Option<u32>,
    since_scan: u32,
    tracked: Tracked,
}

impl Followed {
    /// The CPU the session's vCPU ran on since the last sample, if it ran.
    fn vcpu_cpu(&mut self, pid: u32) -> Option<usize> {
        let tid = self.vcpu.filter(|_| self.since_scan < RESCAN_EVERY);
        if let Some(t) = tid.and_then(|tid| sample_thread(pid, tid)) {
            self.since_scan += 1;
            let before = self.tracked.run_ns.insert(t.tid, t.run_ns);
            return before.is_some_and(|b| t.run_ns > b).then_some(t.cpu);
        }
        let threads = sample_all(pid).ok()?;
        let busiest = plan::busiest(&self.tracked.run_ns, &threads);
        self.tracked.run_ns = threads.iter().map(|t| (t.tid, t.run_ns)).collect();
        self.vcpu = busiest.map(|t| t.tid);
        self.since_scan = 0;
        busiest.map(|t| t.cpu)
    }
}

/// Samples every session once and moves those whose vCPU runs beside another worker.
fn step(pager: &Pager, worker_cpus: &[usize], followed: &mut HashMap<u64, Followed>) {
    let sessions: Vec<(u64, Arc<crate::registry::SessionShared>)> = pager
        .registry
        .lock()
        .values()
        .filter(|e| e.shared.is_live())
        .map(|e| (e.token, Arc::clone(&e.shared)))
        .collect();
    let live: HashSet<u64> = sessions.iter().map(|(t, _)| *t).collect();
    followed.retain(|token, _| live.contains(token));
    for (token, shared) in sessions {
        let f = followed.entry(token).or_default();
        let faults = shared.faults();
        if faults == f.faults || shared.vmm_pid == 0 {
            // A vCPU that does not fault needs no worker beside it.
            continue;
        }
        f.faults = faults;
        let cpu = f.vcpu_cpu(shared.vmm_pid);
        let serving = shared.worker();
        if let Some(to) = plan::decide(&mut f.tracked, serving, cpu, worker_cpus) {
            if let Some(w) = pager.workers.get(serving) {
                let _ = w.send(Command::Move { token, to });
            }
        }
    }
}

/// Starts the follower thread (it ends with the process).
pub fn spawn(pager: Arc<Pager>, worker_cpus: Vec<usize>) -> std::io::Result<()> {
    std::thread::Builder::new().name("follow".into()).spawn(move || {
        let mut followed = HashMap::new();
        loop {
            std::thread::sleep(EVERY);
            step(&pager, &worker_cpus, &mut followed);
        }
    })?;
    Ok(())
}
