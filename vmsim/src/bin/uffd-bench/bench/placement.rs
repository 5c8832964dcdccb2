//! Thread placement: on a machine of two shared vCPUs, whether a fault's wake-up stays on one
//! CPU or crosses to the other changes its latency tenfold (see DESIGN.md, "Facts measured").

use anyhow::{bail, Context};

/// Number of CPUs this process may run on.
pub fn cpus() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// The one CPU the pinned fault-latency figures run on (`min_fault_us` and the project's
/// `fault_p50_us` alike): CPU 1 where there are two or more, `None` on a machine of one CPU
/// (where everything runs on that one CPU anyway).
pub fn one_cpu() -> Option<usize> {
    (cpus() >= 2).then_some(1)
}

/// The set holding only `cpu`.
fn only(cpu: usize) -> anyhow::Result<libc::cpu_set_t> {
    if cpu >= libc::CPU_SETSIZE as usize {
        bail!("CPU {cpu} is out of range");
    }
    // SAFETY: `cpu_set_t` is a plain bit array for which all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu < CPU_SETSIZE` (checked above), so CPU_SET writes inside `set`.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    Ok(set)
}

/// `sched_setaffinity` of thread `tid` (0: the calling thread).
fn set_affinity(tid: i32, set: &libc::cpu_set_t) -> std::io::Result<()> {
    // SAFETY: `set` is a valid cpu_set_t of the size passed; the kernel only reads it.
    let rc = unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), set) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `sched_getaffinity` of thread `tid`.
fn get_affinity(tid: i32) -> std::io::Result<libc::cpu_set_t> {
    // SAFETY: as in `only`: all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, writable cpu_set_t of the size passed.
    let rc =
        unsafe { libc::sched_getaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(set)
}

/// Pins the calling thread to CPU `cpu`.
pub fn pin_current_thread(cpu: usize) -> anyhow::Result<()> {
    set_affinity(0, &only(cpu)?).with_context(|| format!("sched_setaffinity(CPU {cpu})"))
}

/// The thread ids of process `pid` (`/proc/<pid>/task`).
fn threads(pid: i32) -> anyhow::Result<Vec<i32>> {
    let dir = format!("/proc/{pid}/task");
    let mut tids: Vec<i32> = std::fs::read_dir(&dir)
        .with_context(|| format!("listing {dir}"))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    tids.sort_unstable();
    Ok(tids)
}

/// The name of thread `tid` of process `pid` (empty if it is gone).
fn thread_name(pid: i32, tid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm"))
        .map(|s| s.trim_end().to_string())
        .unwrap_or_default()
}

/// Every thread of another process pinned to one CPU, until [`PinnedProcess::release`] or drop,
/// which give each thread back the affinity it had (a thread started meanwhile gets the
/// process's main thread's): so the figures measured afterwards see the process as it was, also
/// when the measurement in between failed.
#[derive(Debug)]
pub struct PinnedProcess {
    pid: i32,
    /// Each thread pinned, with its affinity before.
    before: Vec<(i32, libc::cpu_set_t)>,
    /// The main thread's affinity before (for threads started while pinned).
    main: libc::cpu_set_t,
    released: bool,
}

/// A thread that exited since its id was listed.
fn gone(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(libc::ESRCH)
}

impl PinnedProcess {
    /// Pins the threads of process `pid` whose name (`comm`) starts with `prefix` (every thread:
    /// `""`) to CPU `cpu`, listing its threads again until no new one shows up (a thread may
    /// start while the others are pinned).
    pub fn pin_named(pid: i32, cpu: usize, prefix: &str) -> anyhow::Result<Self> {
        let set = only(cpu)?;
        let main =
            get_affinity(pid).with_context(|| format!("sched_getaffinity of process {pid}"))?;
        let mut pinned = Self { pid, before: Vec::new(), main, released: false };
        for _ in 0..10 {
            let new: Vec<i32> = threads(pid)?
                .into_iter()
                .filter(|tid| pinned.before.iter().all(|(t, _)| t != tid))
                .filter(|tid| prefix.is_empty() || thread_name(pid, *tid).starts_with(prefix))
                .collect();
            if new.is_empty() {
                return Ok(pinned);
            }
            for tid in new {
                let before = match get_affinity(tid) {
                    Ok(s) => s,
                    Err(e) if gone(&e) => continue,
                    Err(e) => return Err(e).context(format!("sched_getaffinity of thread {tid}")),
                };
                pinned.before.push((tid, before));
                match set_affinity(tid, &set) {
                    Ok(()) => {}
                    Err(e) if gone(&e) => {}
                    Err(e) => {
                        return Err(e)
                            .context(format!("pinning thread {tid} of {pid} to CPU {cpu}"))
                    }
                }
            }
        }
        bail!("process {pid} kept starting threads while they were being pinned")
    }

    /// Gives every thread its affinity back.
    pub fn release(mut self) -> anyhow::Result<()> {
        self.released = true;
        self.restore()
    }

    fn restore(&self) -> anyhow::Result<()> {
        let mut failed = Vec::new();
        // The process may be gone (killed after an error): nothing to restore then.
        let tids = threads(self.pid).unwrap_or_default();
        for tid in tids {
            let before = self.before.iter().find(|(t, _)| *t == tid).map_or(&self.main, |(_, s)| s);
            match set_affinity(tid, before) {
                Ok(()) => {}
                Err(e) if gone(&e) => {}
                Err(e) => failed.push(format!("thread {tid}: {e}")),
            }
        }
        if !failed.is_empty() {
            bail!("restoring the affinity of process {}: {}", self.pid, failed.join(", "));
        }
        Ok(())
    }
}

impl Drop for PinnedProcess {
    fn drop(&mut self) {
        if !self.released {
            if let Err(e) = self.restore() {
                eprintln!("uffd-bench: {e:#}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pins the threads of this very process (this test's thread and a helper thread) and
    /// checks that release gives back what each had.
    #[test]
    fn pinning_a_process_is_undone_on_release_and_on_drop() {
        let pid = nix::unistd::getpid().as_raw();
        let tid = || nix::unistd::gettid().as_raw();
        let mine = tid();
        let before = get_affinity(mine).unwrap();
        let cpu = one_cpu().unwrap_or(0);
        for release in [true, false] {
            let pinned = PinnedProcess::pin_named(pid, cpu, "").unwrap();
            assert!(pinned.before.iter().any(|(t, _)| *t == mine));
            let now = get_affinity(mine).unwrap();
            // SAFETY: CPU_COUNT only reads the set.
            assert_eq!(unsafe { libc::CPU_COUNT(&now) }, 1);
            // SAFETY: CPU_ISSET only reads the set; `cpu` is within CPU_SETSIZE (pinned to it).
            assert!(unsafe { libc::CPU_ISSET(cpu, &now) });
            if release {
                pinned.release().unwrap();
            } else {
                drop(pinned);
            }
            let after = get_affinity(mine).unwrap();
            // SAFETY: CPU_EQUAL only reads both sets.
            assert!(unsafe { libc::CPU_EQUAL(&before, &after) });
        }
    }
}
