//! 2 MiB hugepages for hugetlbfs-backed guest regions: checking (and, as root, reserving) them
//! so that tests can skip with a message where the machine has none.

use std::path::Path;

const POOL: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB";

fn read_counter(name: &str) -> Option<u64> {
    std::fs::read_to_string(Path::new(POOL).join(name)).ok()?.trim().parse().ok()
}

/// 2 MiB hugepages free and not reserved by some mapping.
pub fn free_hugepages() -> Option<u64> {
    let free = read_counter("free_hugepages")?;
    let reserved = read_counter("resv_hugepages").unwrap_or(0);
    Some(free.saturating_sub(reserved))
}

/// True when at least `n_pages` 2 MiB hugepages are free. If fewer are, tries to grow the pool
/// (`nr_hugepages`, which needs root) by the shortfall first; the kernel may grant less than
/// asked when memory is fragmented.
pub fn hugepages_available(n_pages: u64) -> bool {
    let Some(free) = free_hugepages() else {
        tracing::info!("no 2 MiB hugepage pool on this machine");
        return false;
    };
    if free >= n_pages {
        return true;
    }
    let Some(total) = read_counter("nr_hugepages") else {
        return false;
    };
    let wanted = total + (n_pages - free);
    if let Err(e) = std::fs::write(Path::new(POOL).join("nr_hugepages"), wanted.to_string()) {
        tracing::info!(%e, wanted, "could not grow the 2 MiB hugepage pool");
        return false;
    }
    let now = free_hugepages().unwrap_or(0);
    tracing::info!(requested = n_pages, free = now, "grew the 2 MiB hugepage pool");
    now >= n_pages
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asking_for_no_hugepages_needs_only_a_pool() {
        assert_eq!(hugepages_available(0), free_hugepages().is_some());
    }
}
