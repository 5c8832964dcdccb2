//! The in-process baselines, measured on the same memory file as the project:
//!
//! - `memcpy_gbps`: copying the mapped, page-cache-warm file into pre-faulted anonymous memory:
//!   what moving the bytes costs with no page allocation and no userfaultfd at all.
//! - `raw_copy_gbps`: `UFFDIO_COPY` of the file, 2 MiB at a time, into a fresh anonymous region
//!   registered MISSING on a uffd of this process: the kernel's own ceiling for filling guest
//!   memory through a uffd (page allocation, zeroing avoided, copy, page-table install). A
//!   pager's completion cannot beat it for dense data; it can for sparse data, by not copying
//!   zero pages at all.

use std::fs::File;
use std::hint::black_box;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context};
use memmap2::{Mmap, MmapMut};
use uffdpager::uffd_ops::{self, FillOutcome};
use userfaultfd::UffdBuilder;

use super::stats::gbps;

/// Bytes per `UFFDIO_COPY` of the raw-copy baseline.
pub const RAW_COPY_CHUNK: usize = 2 << 20;

/// A memory file mapped read-only and shared: its pages are the page cache's.
#[derive(Debug)]
pub struct MappedFile {
    map: Mmap,
}

impl MappedFile {
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: the benchmark's memory files are written before they are mapped and never
        // changed or truncated while mapped (they live in the benchmark's own temporary
        // directory), so the mapping's bytes never change underneath a `&[u8]`.
        let map =
            unsafe { Mmap::map(&file) }.with_context(|| format!("mapping {}", path.display()))?;
        Ok(Self { map })
    }

    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// Reads one byte per page so that the mapping's page-table entries exist: later copies
    /// measure copying, not minor faults on the source.
    pub fn touch(&self) -> u64 {
        self.map.iter().step_by(4096).map(|&b| u64::from(b)).sum()
    }
}

/// `memcpy_gbps` of each repetition: the file's bytes into pre-faulted anonymous memory.
pub fn memcpy(src: &MappedFile, reps: usize) -> anyhow::Result<Vec<f64>> {
    let bytes = src.bytes();
    let mut dst = MmapMut::map_anon(bytes.len()).context("mapping the destination")?;
    // Pre-fault the destination, and copy once untimed (warms both sides' page tables).
    dst.iter_mut().step_by(4096).for_each(|b| *b = 1);
    dst.copy_from_slice(bytes);
    let mut out = Vec::with_capacity(reps);
    for _ in 0..reps {
        let started = Instant::now();
        dst.copy_from_slice(black_box(bytes));
        black_box(&dst[..]);
        out.push(gbps(bytes.len() as u64, started.elapsed().as_secs_f64()));
    }
    if dst[..] != bytes[..] {
        bail!("memcpy baseline: the copy differs from the file");
    }
    Ok(out)
}

/// `raw_copy_gbps` of each repetition: `UFFDIO_COPY` of the file in [`RAW_COPY_CHUNK`] runs
/// into a fresh registered region (mapped and unmapped around each repetition, untimed).
pub fn raw_copy(src: &MappedFile, reps: usize) -> anyhow::Result<Vec<f64>> {
    let bytes = src.bytes();
    let mut out = Vec::with_capacity(reps);
    for _ in 0..reps {
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .create()
            .context("creating a userfaultfd")?;
        let mut dst = MmapMut::map_anon(bytes.len()).context("mapping the destination")?;
        let base = dst.as_mut_ptr();
        uffd.register(base.cast(), bytes.len()).context("UFFDIO_REGISTER")?;
        let base = base as u64;
        let started = Instant::now();
        for (i, chunk) in bytes.chunks(RAW_COPY_CHUNK).enumerate() {
            let dst_addr = base + (i * RAW_COPY_CHUNK) as u64;
            let mut done = 0usize;
            while done < chunk.len() {
                // No thread of this process waits on these pages: no wake needed.
                match uffd_ops::copy(&uffd, &chunk[done..], dst_addr + done as u64, false) {
                    Ok(FillOutcome::Done) => done = chunk.len(),
                    // Nothing changes this address space meanwhile, but resume as the contract says.
                    Ok(FillOutcome::Partial(n)) => done += usize::try_from(n).unwrap_or(0),
                    Ok(other) => bail!("UFFDIO_COPY into a fresh region answered {other:?}"),
                    Err(errno) => bail!("UFFDIO_COPY failed: {errno}"),
                }
            }
        }
        out.push(gbps(bytes.len() as u64, started.elapsed().as_secs_f64()));
        // Every page is present now: reading the region cannot fault.
        if dst[..] != bytes[..] {
            bail!("raw copy baseline: the region differs from the file");
        }
        drop(uffd);
        drop(dst);
    }
    Ok(out)
}
