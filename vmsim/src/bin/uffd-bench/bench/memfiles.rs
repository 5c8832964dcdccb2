//! The run's memory files, written once into its temporary directory on the real disk and read
//! once so that every baseline and the project read the same bytes from a warm page cache.
//!
//! - dense: every page random (the baselines, faults, touch-all, dense completion, stalls);
//! - sparse: 25% written zero pages + 25% holes in runs of 1-63 pages (mean 32 pages, 128 KiB),
//!   each run all data, all zero or all hole (sparse completion);
//! - scattered: 25% written zero pages + 25% holes chosen page by page (scattered completion);
//! - small: one VM of the sessions scenario, 25% zero pages + 25% holes, page by page.
//!
//! Removing a big file can take a minute on a disk mounted with `discard` (this machine's root
//! is): the files are removed after the results are printed, and `--files-dir` keeps them for
//! the next run instead (each is reused when its spec, stamped beside it, matches).

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context};
use memmap2::Mmap;
use vmsim::{write_memory_file_layout, MemoryFileLayout, MemoryFileSpec};

use super::Group;

/// Mean run length of the sparse file, in pages: runs of 1..=63 pages (mean 128 KiB).
pub const SPARSE_RUN_PAGES: u64 = 32;

/// Size of each VM of the peer comparison's many-VMs figure (issue 15: 50 VMs x 64 MiB).
pub const MANY_VM_SIZE: u64 = 64 << 20;

/// The files this run needs (`None`: no group selected needs it). Removed on drop unless kept.
#[derive(Debug)]
pub struct MemoryFiles {
    pub dense: Option<PathBuf>,
    pub sparse: Option<PathBuf>,
    pub scattered: Option<PathBuf>,
    pub small: Option<PathBuf>,
    /// One VM of the peer comparison's many-VMs figure: dense, [`MANY_VM_SIZE`].
    pub many: Option<PathBuf>,
    /// Kept for later runs (`--files-dir`): not removed on drop.
    keep: bool,
    /// The files mapped and locked in memory for the run (see [`lock_in_page_cache`]).
    _locked: Vec<Mmap>,
}

impl MemoryFiles {
    /// Writes (or, when `keep`, reuses) and warms the files that `groups` need, in `dir`.
    pub fn create(
        dir: &Path,
        groups: &[Group],
        size: u64,
        small: u64,
        keep: bool,
    ) -> anyhow::Result<Self> {
        use Group::*;
        let needs = |gs: &[Group]| gs.iter().any(|g| groups.contains(g));
        let dense_spec = MemoryFileSpec { size, seed: 1, zero_fraction: 0.0, hole_fraction: 0.0 };
        // Sparse and scattered: the same spec, in runs of 1..=63 pages and page by page.
        let sparse_spec =
            MemoryFileSpec { size, seed: 2, zero_fraction: 0.25, hole_fraction: 0.25 };
        let many_spec =
            MemoryFileSpec { size: MANY_VM_SIZE, seed: 4, zero_fraction: 0.0, hole_fraction: 0.0 };
        let small_spec =
            MemoryFileSpec { size: small, seed: 3, zero_fraction: 0.25, hole_fraction: 0.25 };
        // A page-by-page layout describes itself as its spec alone did: files kept from runs
        // before layouts existed are reused; the sparse file, now in runs, is rewritten.
        let locked = std::cell::RefCell::new(Vec::new());
        let make = |name: &str, layout: MemoryFileLayout, wanted: bool| -> anyhow::Result<_> {
            if !wanted {
                return Ok(None);
            }
            let spec = &layout.spec;
            let path = dir.join(format!("{name}-{}M-{}.mem", spec.size >> 20, spec.seed));
            let stamp = path.with_extension("spec.json");
            let described = serde_json::to_string(&layout).context("describing a memory file")?;
            let reusable = keep
                && std::fs::read_to_string(&stamp).is_ok_and(|s| s == described)
                && std::fs::metadata(&path).is_ok_and(|m| m.len() == spec.size);
            if !reusable {
                write_memory_file_layout(&path, &layout)
                    .with_context(|| format!("writing {}", path.display()))?;
                if keep {
                    std::fs::write(&stamp, described)
                        .with_context(|| format!("writing {}", stamp.display()))?;
                }
            }
            warm(&path)?;
            locked.borrow_mut().push(lock_in_page_cache(&path)?);
            Ok(Some(path))
        };
        Ok(Self {
            dense: make(
                "dense",
                dense_spec.into(),
                needs(&[Memcpy, RawCopy, MinHandler, Fault, TouchAll, CompleteDense, Stall, Peers]),
            )?,
            sparse: make(
                "sparse",
                sparse_spec.in_runs(SPARSE_RUN_PAGES),
                needs(&[CompleteSparse]),
            )?,
            scattered: make("scattered", sparse_spec.in_runs(1), needs(&[CompleteScattered]))?,
            small: make("small", small_spec.into(), needs(&[Rpc, Sessions]))?,
            many: make("many", many_spec.into(), needs(&[Peers]))?,
            keep,
            _locked: locked.into_inner(),
        })
    }
}

impl Drop for MemoryFiles {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        for p in [&self.dense, &self.sparse, &self.scattered, &self.small, &self.many]
            .into_iter()
            .flatten()
        {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Maps the file and locks the mapping (`mlock`): its page-cache pages stay resident for the
/// run. Machines like this one reclaim cold page cache proactively (DAMON `pageout`), and a
/// memory file evicted between two repetitions turns a copy into disk reads: repetitions
/// measured at a quarter of the others' speed, for the baselines and the project alike.
fn lock_in_page_cache(path: &Path) -> anyhow::Result<Mmap> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: the benchmark's memory files are written before they are mapped and never changed
    // while mapped; this mapping is only held, never read through a reference.
    let map = unsafe { Mmap::map(&file) }.with_context(|| format!("mapping {}", path.display()))?;
    map.lock().with_context(|| format!("locking {} in memory (mlock)", path.display()))?;
    Ok(map)
}

/// Reads the whole file once, so that its pages are in the page cache.
pub fn warm(path: &Path) -> anyhow::Result<u64> {
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut buf = vec![0u8; 4 << 20];
    let mut total = 0u64;
    loop {
        let n = file.read(&mut buf).with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            return Ok(total);
        }
        total += n as u64;
    }
}

/// Fails with a clear message where this process cannot create a userfaultfd the way
/// Firecracker does (kernel faults included: root, or access to `/dev/userfaultfd`).
pub fn check_userfaultfd() -> anyhow::Result<()> {
    uffdpager::uffd_ops::firecracker_uffd(false).map(drop).map_err(|e| {
        anyhow!(
            "this process cannot create a userfaultfd ({e}); uffd-bench restores VMs the way \
                 Firecracker does and needs root, or read-write access to /dev/userfaultfd \
                 (Linux 6.1+), or vm.unprivileged_userfaultfd=1"
        )
    })
}

/// True when `path` is on tmpfs (memory, not a disk's page cache).
pub fn is_tmpfs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
        .unwrap_or(false)
}
