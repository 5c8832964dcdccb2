//! Page state of one region (present, discarded) and the source of zero bytes: the
//! bookkeeping a session keeps per region, apart from the fault loop that uses it.

use uffdpager::firecracker::Region;
use uffdpager::pages::{PageBitmap, RangeSet};

/// Page state of one region.
#[derive(Debug)]
pub struct RegionPages {
    pub region: Region,
    /// Changed only through `mark_present` and `remove`, which keep `present_pages` with it.
    present: PageBitmap,
    pub removed: RangeSet,
    /// Set bits of `present`, counted as they change (published after every fault).
    present_pages: u64,
    /// Pages in `removed` that are not present.
    removed_missing: u64,
}

impl RegionPages {
    pub fn new(region: Region) -> Self {
        Self {
            region,
            present: PageBitmap::new(region.pages()),
            removed: RangeSet::new(),
            present_pages: 0,
            removed_missing: 0,
        }
    }

    /// Which pages are present in guest memory.
    pub fn present(&self) -> &PageBitmap {
        &self.present
    }

    /// How many pages are present.
    pub fn present_pages(&self) -> u64 {
        self.present_pages
    }

    /// Pages the VMM discarded that have not been faulted in again.
    pub fn removed_missing(&self) -> u64 {
        self.removed_missing
    }

    /// Marks `[first, end)` present; returns how many pages became present.
    pub fn mark_present(&mut self, first: u64, end: u64) -> u64 {
        let mut n = 0;
        let any_removed = !self.removed.is_empty();
        for p in first..end {
            if self.present.set(p) {
                n += 1;
                if any_removed && self.removed.contains(p) {
                    self.removed_missing -= 1;
                }
            }
        }
        self.present_pages += n;
        n
    }

    /// Marks `page` missing again (a fault on it says it may be): the next fill finds out.
    pub fn forget_present(&mut self, page: u64) {
        if self.present.clear(page) {
            self.present_pages -= 1;
            if self.removed.contains(page) {
                self.removed_missing += 1;
            }
        }
    }

    /// Applies a REMOVE of pages `[first, end)`.
    pub fn remove(&mut self, first: u64, end: u64) {
        for p in first..end {
            let was_present = self.present.clear(p);
            self.present_pages -= u64::from(was_present);
            if was_present || !self.removed.contains(p) {
                self.removed_missing += 1;
            }
        }
        self.removed.insert(first..end);
    }
}

/// A source of zero bytes for hugepage zero-fills (`UFFDIO_ZEROPAGE` does not work on hugetlbfs):
/// an anonymous mapping never written, so reading it allocates nothing.
#[derive(Debug)]
pub struct ZeroSource {
    map: memmap2::Mmap,
}

impl ZeroSource {
    pub fn new(len: usize) -> std::io::Result<Self> {
        let map = memmap2::MmapOptions::new().len(len).map_anon()?.make_read_only()?;
        Ok(Self { map })
    }

    pub fn bytes(&self, len: u64) -> &[u8] {
        &self.map[..usize::try_from(len).expect("len fits")]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_removed_present_page_counts_as_removed_once() {
        let mut r =
            RegionPages::new(Region { base: 0, size: 16 * 4096, offset: 0, page_size: 4096 });
        r.mark_present(0, 4);
        r.remove(2, 6);
        assert_eq!(r.present.count_ones(), 2);
        assert_eq!(r.present_pages(), 2);
        assert_eq!(r.removed_missing, 4);
        r.remove(3, 8);
        assert_eq!(r.removed_missing, 6);
        r.mark_present(5, 6);
        assert_eq!(r.removed_missing, 5);
        r.remove(5, 6);
        assert_eq!(r.removed_missing, 6);
    }

    #[test]
    fn a_page_forgotten_is_counted_missing_again() {
        let mut r =
            RegionPages::new(Region { base: 0, size: 16 * 4096, offset: 0, page_size: 4096 });
        r.mark_present(0, 4);
        r.remove(3, 4);
        r.mark_present(3, 4);
        assert_eq!((r.present_pages(), r.removed_missing()), (4, 0));
        r.forget_present(3);
        r.forget_present(1);
        r.forget_present(9);
        assert_eq!((r.present_pages(), r.removed_missing()), (2, 1));
        assert!(!r.present().get(1) && !r.present().get(3));
    }
}
