//! CPU hogs beside the measurement (`--hogs N`): N child processes (this binary with `--hog`)
//! that burn CPU at normal priority for the whole run, the way other tenants of a host do. A
//! host full of VMs is never idle, and a pager whose threads compete with the vCPUs shows it
//! only when the CPUs are busy.

use std::process::{Child, Command, Stdio};

use anyhow::Context;

/// The running hogs; killed and reaped on drop.
#[derive(Debug, Default)]
pub struct Hogs {
    children: Vec<Child>,
}

impl Hogs {
    pub fn start(n: usize) -> anyhow::Result<Self> {
        let mut hogs = Self::default();
        for _ in 0..n {
            // This very executable, even if a build replaced the file since it started.
            let child = Command::new("/proc/self/exe")
                .arg("--hog")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .context("starting a CPU hog")?;
            hogs.children.push(child);
        }
        Ok(hogs)
    }

    pub fn count(&self) -> usize {
        self.children.len()
    }
}

impl Drop for Hogs {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The hog itself: spins until killed (its parent kills it; it also stops once the parent is
/// gone, so an aborted benchmark leaves no hog behind).
pub fn burn() -> ! {
    let parent = std::os::unix::process::parent_id();
    let mut x = 0u64;
    loop {
        for _ in 0..10_000_000u64 {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
        if std::os::unix::process::parent_id() != parent {
            std::process::exit(0);
        }
    }
}
