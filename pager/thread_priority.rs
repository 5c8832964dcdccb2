//! Scheduling classes for the pager's helper threads, so that they take CPU time from neither a
//! vCPU nor fault serving, and the CPU of a fault worker that follows its vCPUs. Each call
//! applies to the calling thread and is best effort: refused, the thread runs at normal
//! priority (or anywhere), and says so in the log.

use tracing::warn;

/// `SCHED_IDLE` and the idle I/O class: runs only on a CPU that would otherwise idle, and reads
/// behind every other I/O (the background zero scan).
pub fn idle() {
    set_policy(libc::SCHED_IDLE, "SCHED_IDLE");
    const IOPRIO_WHO_PROCESS: libc::c_long = 1;
    const IOPRIO_CLASS_IDLE: libc::c_long = 3;
    const IOPRIO_CLASS_SHIFT: libc::c_long = 13;
    // SAFETY: ioprio_set takes three integers; who = 0 is the calling thread.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_ioprio_set,
            IOPRIO_WHO_PROCESS,
            0,
            IOPRIO_CLASS_IDLE << IOPRIO_CLASS_SHIFT,
        )
    };
    if rc != 0 {
        warn!(error = %std::io::Error::last_os_error(), thread = ?thread(), "idle I/O priority refused");
    }
}

/// `SCHED_BATCH` at nice 19: a thread that holds a lock fault serving may wait for (a copy
/// thread holds a session's remove gate around each copy). It yields to a waking vCPU
/// (`SCHED_BATCH` never preempts on wake-up, and nice 19 weighs 1/68 of a vCPU's nice 0), yet,
/// unlike `SCHED_IDLE`, is never starved outright on a busy host, so a worker waiting for the
/// lock waits at most a share of one short copy.
pub fn background() {
    set_policy(libc::SCHED_BATCH, "SCHED_BATCH");
    // SAFETY: setpriority takes integers; PRIO_PROCESS with who = 0 is the calling thread on
    // Linux. Lowering one's own priority is always allowed.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) };
    if rc != 0 {
        warn!(error = %std::io::Error::last_os_error(), thread = ?thread(), "nice 19 refused");
    }
}

/// A fault worker's niceness: -10 while it only serves faults, 0 while it also copies in bulk
/// (read-ahead windows, graduation sweeps).
///
/// One worker serves the faults of many vCPUs, each of which waits, blocked, until the worker
/// runs: on a busy CPU it should weigh what the vCPUs it serves weigh together, not what one of
/// them does (nice -10 weighs ~9x a nice-0 thread; a handler process per VM, as Firecracker's
/// example has, gets that weight by being one thread per VM). Bulk copies are background work
/// that must not take CPU from the vCPUs, so they run at the vCPUs' own weight. Refused (no
/// `CAP_SYS_NICE`), the worker stays where it is and says so once.
#[derive(Debug, Default)]
pub struct WorkerNice {
    current: Option<i32>,
    refused: bool,
}

impl WorkerNice {
    /// Nice while serving faults only.
    pub const SERVING: i32 = -10;
    /// Nice while copying in bulk too.
    pub const BULK: i32 = 0;

    /// Sets the calling thread's niceness for the work at hand (a system call only on change).
    pub fn set(&mut self, bulk: bool) {
        let nice = if bulk { Self::BULK } else { Self::SERVING };
        if self.refused || self.current == Some(nice) {
            return;
        }
        // SAFETY: setpriority takes integers; PRIO_PROCESS with who = 0 is the calling thread
        // on Linux.
        let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
        if rc != 0 {
            self.refused = true;
            warn!(error = %std::io::Error::last_os_error(), thread = ?thread(), nice, "fault worker priority refused");
            return;
        }
        self.current = Some(nice);
    }
}

fn set_policy(policy: libc::c_int, name: &str) {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 is the calling thread; `param` is a valid sched_param (priority 0 is the
    // only one SCHED_IDLE and SCHED_BATCH accept).
    let rc = unsafe { libc::sched_setscheduler(0, policy, &param) };
    if rc != 0 {
        warn!(error = %std::io::Error::last_os_error(), thread = ?thread(), policy = name, "scheduling policy refused");
    }
}

fn thread() -> Option<String> {
    std::thread::current().name().map(str::to_owned)
}

/// Pins the calling thread (fault worker `index`, `--follow-vcpus`) to `cpu`; refused, it runs
/// anywhere and says so.
pub fn pin_to_cpu(cpu: usize, index: usize) {
    let mut set = nix::sched::CpuSet::new();
    let pinned = set
        .set(cpu)
        .and_then(|()| nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set));
    match pinned {
        Ok(()) => tracing::info!(worker = index, cpu, "fault worker pinned"),
        Err(e) => warn!(worker = index, cpu, error = %e, "pinning the fault worker refused"),
    }
}
