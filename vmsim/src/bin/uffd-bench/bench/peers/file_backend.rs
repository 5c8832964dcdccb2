//! The kernel's own file-backed guest memory, the ceiling of lazy restore: Firecracker's `File`
//! memory backend maps the snapshot's memory file `MAP_PRIVATE`, so a first touch is a minor
//! fault that maps the page-cache page (a write would copy it). Measured in this process, with
//! the same touches and the same verification as a `uffd-vmsim` VM: each page is compared in
//! full with the file's bytes (read through a second, pre-faulted mapping), and the time of that
//! first touch-and-compare is the page's latency.

use std::fs::File;
use std::path::Path;
use std::sync::{Arc, Barrier};
use std::time::Instant;

use anyhow::{bail, Context};
use memmap2::{Mmap, MmapMut, MmapOptions};
use rand::rngs::SmallRng;
use rand::SeedableRng;
use vmsim::report::LatencyHistogram;

const PAGE: usize = 4096;

/// What one file-backed VM measured.
#[derive(Debug, Clone, Copy)]
pub struct FileRun {
    pub p50_us: f64,
    pub p99_us: f64,
    pub bytes: u64,
    pub elapsed_s: f64,
}

/// A fresh `MAP_PRIVATE` mapping of the file (the guest) and a populated read-only one (what
/// the guest must read).
fn map(path: &Path) -> anyhow::Result<(MmapMut, Mmap)> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: the benchmark writes its memory files before measuring and never changes them
    // while mapped; the private mapping's writes (none here) would stay in this process.
    let guest = unsafe { MmapOptions::new().map_copy(&file) }.context("mapping MAP_PRIVATE")?;
    // SAFETY: as above.
    let expected = unsafe { MmapOptions::new().populate().map(&file) }.context("mapping")?;
    Ok((guest, expected))
}

/// Touches `pages` (page indices) of a fresh mapping, in order, timing and verifying each.
fn touch(maps: (MmapMut, Mmap), pages: impl Iterator<Item = usize>) -> anyhow::Result<FileRun> {
    let (guest, expected) = maps;
    let mut hist = LatencyHistogram::default();
    let mut bytes = 0u64;
    let started = Instant::now();
    for p in pages {
        let range = p * PAGE..(p + 1) * PAGE;
        let t = Instant::now();
        let same = std::hint::black_box(&guest[range.clone()]) == &expected[range];
        hist.record(t.elapsed());
        if !same {
            bail!("the file-backed mapping read wrong bytes at page {p}");
        }
        bytes += PAGE as u64;
    }
    let elapsed_s = started.elapsed().as_secs_f64();
    let us = |q| hist.quantile_ns(q) as f64 / 1000.0;
    Ok(FileRun { p50_us: us(0.5), p99_us: us(0.99), bytes, elapsed_s })
}

fn pages_of(path: &Path) -> anyhow::Result<usize> {
    let len = std::fs::metadata(path).with_context(|| format!("{}", path.display()))?.len();
    usize::try_from(len / PAGE as u64).context("file size")
}

/// `touches` distinct random pages (the same sampling as `uffd-vmsim`'s `random`).
pub fn random(path: &Path, touches: u64, seed: u64) -> anyhow::Result<FileRun> {
    let total = pages_of(path)?;
    let k = usize::try_from(touches).context("touches")?.min(total);
    let picked = rand::seq::index::sample(&mut SmallRng::seed_from_u64(seed), total, k);
    touch(map(path)?, picked.into_iter())
}

/// Every page once, in order.
pub fn sequential(path: &Path) -> anyhow::Result<FileRun> {
    touch(map(path)?, 0..pages_of(path)?)
}

/// `vms` file-backed VMs at once (one thread each, started together): the wall time until the
/// last is done, and each VM's run.
pub fn many(
    path: &Path,
    vms: usize,
    touches: u64,
    seed: u64,
) -> anyhow::Result<(f64, Vec<FileRun>)> {
    let barrier = Arc::new(Barrier::new(vms + 1));
    let threads: Vec<_> = (0..vms)
        .map(|i| {
            let (path, barrier) = (path.to_path_buf(), Arc::clone(&barrier));
            std::thread::spawn(move || {
                // Mapped before the start, as a VM's memory is before it runs.
                let ready = pages_of(&path).and_then(|t| Ok((t, map(&path)?)));
                barrier.wait();
                let (total, maps) = ready?;
                let k = usize::try_from(touches).unwrap_or(usize::MAX).min(total);
                let mut rng = SmallRng::seed_from_u64(seed + i as u64);
                let picked = rand::seq::index::sample(&mut rng, total, k);
                touch(maps, picked.into_iter())
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
