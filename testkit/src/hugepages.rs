//! 2 MiB hugepages for hugetlbfs-backed guest regions: a test's share of the machine's pool.
//!
//! A new machine starts with an empty pool (`nr_hugepages` 0), and cargo runs test binaries (and
//! the tests inside one) in parallel, so "is the pool big enough?" is the wrong question: two
//! tests that each find 16 free pages can both start VMs that need 16. Each test instead *adds*
//! what it holds at its peak to the pool for as long as it runs ([`HugepageReservation`]), under
//! an exclusive lock on the pool, and takes it away again when it ends.
//!
//! A guest region maps its hugepages `MAP_NORESERVE`, so nothing is reserved at `mmap`: the pages
//! come out of the free pool when the pager copies into them, and a pager whose copy finds the
//! pool empty fails with `ENOMEM`. That is why the count must be a test's peak, every VM of it.

use std::{fs::File, path::Path};

use nix::fcntl::{Flock, FlockArg};

const POOL: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB";

/// Why a share of the hugepage pool could not be had.
#[derive(Debug, thiserror::Error)]
pub enum HugepageError {
    #[error("this machine has no 2 MiB hugepage pool ({POOL}): {0}")]
    NoPool(#[source] std::io::Error),
    #[error("locking the 2 MiB hugepage pool: {0}")]
    Lock(#[source] std::io::Error),
    #[error("reading {name} of the 2 MiB hugepage pool: {source}")]
    Read {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("growing the 2 MiB hugepage pool to {wanted} pages (needs root): {source}")]
    Grow {
        wanted: u64,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the kernel granted {granted} of the {asked} 2 MiB hugepages asked for (memory too \
         fragmented or too small)"
    )]
    Shortfall { asked: u64, granted: u64 },
}

fn read_counter(name: &'static str) -> Result<u64, HugepageError> {
    let text = std::fs::read_to_string(Path::new(POOL).join(name))
        .map_err(|source| HugepageError::Read { name, source })?;
    text.trim().parse().map_err(|e| HugepageError::Read {
        name,
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
    })
}

fn write_pool_size(pages: u64) -> std::io::Result<()> {
    std::fs::write(Path::new(POOL).join("nr_hugepages"), pages.to_string())
}

/// 2 MiB hugepages free and not reserved by some mapping.
pub fn free_hugepages() -> Option<u64> {
    let free = read_counter("free_hugepages").ok()?;
    let reserved = read_counter("resv_hugepages").unwrap_or(0);
    Some(free.saturating_sub(reserved))
}

/// The pool's directory, locked (`flock`, exclusive) until dropped: the pool size is read and
/// written by every test binary at once.
struct PoolLock {
    _held: Flock<File>,
}

impl PoolLock {
    fn take() -> Result<Self, HugepageError> {
        let dir = File::open(POOL).map_err(HugepageError::NoPool)?;
        Flock::lock(dir, FlockArg::LockExclusive)
            .map(|held| Self { _held: held })
            .map_err(|(_, e)| HugepageError::Lock(e.into()))
    }
}

/// `pages` 2 MiB hugepages added to the machine's pool for as long as this value lives, and taken
/// out of it again when it is dropped. Needs root.
#[derive(Debug)]
pub struct HugepageReservation {
    pages: u64,
}

impl HugepageReservation {
    /// Grows the pool by `pages`. Fails, leaving the pool as it was, where the kernel grants less.
    pub fn new(pages: u64) -> Result<Self, HugepageError> {
        let _lock = PoolLock::take()?;
        let before = read_counter("nr_hugepages")?;
        let wanted = before + pages;
        write_pool_size(wanted).map_err(|source| HugepageError::Grow { wanted, source })?;
        let now = read_counter("nr_hugepages")?;
        if now < wanted {
            let _ = write_pool_size(before);
            return Err(HugepageError::Shortfall {
                asked: pages,
                granted: now.saturating_sub(before),
            });
        }
        tracing::info!(pages, pool = now, "reserved 2 MiB hugepages");
        Ok(Self { pages })
    }

    /// How many pages this reservation added to the pool.
    pub fn pages(&self) -> u64 {
        self.pages
    }
}

impl Drop for HugepageReservation {
    fn drop(&mut self) {
        // Pages still in use when the pool shrinks become surplus pages, freed on release.
        let Ok(_lock) = PoolLock::take() else { return };
        if let Ok(total) = read_counter("nr_hugepages") {
            let _ = write_pool_size(total.saturating_sub(self.pages));
        }
    }
}

/// For tests: `pages` hugepages for the rest of the test, or, where the machine cannot give them,
/// a failure under CI (`CI` set: a test must never pass by skipping there) and elsewhere a loud
/// `SKIPPED` line and `None`.
pub fn reserve_for_test(test: &str, pages: u64) -> Option<HugepageReservation> {
    match HugepageReservation::new(pages) {
        Ok(r) => Some(r),
        Err(e) => {
            crate::machine_lacks(test, &format!("{pages} 2 MiB hugepages: {e}"));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reservation_adds_its_pages_to_the_pool_while_it_lives() {
        let Some(r) = reserve_for_test("hugepages::a_reservation_adds_its_pages", 2) else {
            return;
        };
        assert_eq!(r.pages(), 2);
        // Other test binaries may hold shares of their own meanwhile, but none uses ours.
        assert!(free_hugepages().unwrap() >= 2, "the two pages reserved are free");
    }
}
