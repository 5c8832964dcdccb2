//! The kernel's own file-backed guest memory, the ceiling of lazy restore: Firecracker's `File`
//! memory backend maps the snapshot's memory file `MAP_PRIVATE`, so a first touch is a minor
//! fault that maps the page-cache page (a write would copy it). Measured in this process on a
//! [`Vm::map_file`] VM, with the same workloads and the same reader as a `uffd-vmsim` VM: each
//! page is timed and compared in full with what it must hold.

use std::path::Path;
use std::sync::{Arc, Barrier};
use std::time::Instant;

use anyhow::{bail, Context};
use vmsim::{Amount, GuestRegionSpec, Report, Vm};

/// A file-backed VM of the whole file.
fn vm(path: &Path) -> anyhow::Result<Vm> {
    let size = std::fs::metadata(path).with_context(|| format!("{}", path.display()))?.len();
    let spec = GuestRegionSpec { size, page_size: 4096, offset: 0 };
    Vm::map_file(path, &[spec]).with_context(|| format!("mapping {}", path.display()))
}

/// The report, if every page read right.
fn clean(report: Report) -> anyhow::Result<Report> {
    if !report.is_clean() {
        bail!("the file-backed mapping read wrong bytes: {:?}", report.first_mismatches);
    }
    Ok(report)
}

/// `touches` distinct random pages (`uffd-vmsim`'s `random`).
pub fn random(path: &Path, touches: u64, seed: u64) -> anyhow::Result<Report> {
    clean(vm(path)?.read_random(Amount::Pages(touches), seed))
}

/// Every page once, in order.
pub fn sequential(path: &Path) -> anyhow::Result<Report> {
    clean(vm(path)?.read_sequential())
}

/// `vms` file-backed VMs at once (one thread each, started together): the wall time until the
/// last is done, and each VM's report.
pub fn many(
    path: &Path,
    vms: usize,
    touches: u64,
    seed: u64,
) -> anyhow::Result<(f64, Vec<Report>)> {
    let barrier = Arc::new(Barrier::new(vms + 1));
    let threads: Vec<_> = (0..vms)
        .map(|i| {
            let (path, barrier) = (path.to_path_buf(), Arc::clone(&barrier));
            std::thread::spawn(move || {
                // Mapped before the start, as a VM's memory is before it runs.
                let ready = vm(&path);
                barrier.wait();
                clean(ready?.read_random(Amount::Pages(touches), seed + i as u64))
            })
        })
        .collect();
    barrier.wait();
    let started = Instant::now();
    let mut runs = Vec::with_capacity(vms);
    for t in threads {
        runs.push(t.join().map_err(|_| anyhow::anyhow!("a file-backed VM panicked"))??);
    }
    Ok((started.elapsed().as_secs_f64(), runs))
}
