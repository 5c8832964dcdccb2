//! Which guest pages are already present in the VMM, read from `/proc/<vmm>/pagemap` when a
//! pager adopts a session whose previous pager died: without it the adopter would believe every
//! page missing and learn otherwise one `EEXIST` at a time during completion.
//!
//! Each 4 KiB virtual page has one 64-bit entry: bit 63 "present in RAM", bit 62 "swapped"
//! (`Documentation/admin-guide/mm/pagemap.rst`). A swapped page is not missing either: touching
//! it swaps it in without a userfault. Hugetlb pages show one entry per 4 KiB piece.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

const PRESENT: u64 = 1 << 63;
const SWAPPED: u64 = 1 << 62;

/// True when a pagemap entry says the page is backed (in RAM or swap).
pub fn is_backed(entry: u64) -> bool {
    entry & (PRESENT | SWAPPED) != 0
}

/// Reads the entries of `pages` pages of `page_size` bytes starting at `base` in process `pid`,
/// and calls `backed(i)` for every page whose first 4 KiB piece is backed.
pub fn for_each_backed(
    pid: u32,
    base: u64,
    pages: u64,
    page_size: u64,
    mut backed: impl FnMut(u64),
) -> io::Result<()> {
    let file = File::open(format!("/proc/{pid}/pagemap"))?;
    let step = page_size / 4096;
    // Read in chunks of 64 Ki entries (512 KiB), whatever the region's size.
    const CHUNK: u64 = 1 << 16;
    let total = pages * step;
    let mut buf = vec![0u8; usize::try_from(CHUNK.min(total.max(1)) * 8).expect("chunk fits")];
    let mut done = 0;
    while done < total {
        let n = CHUNK.min(total - done);
        let bytes = &mut buf[..usize::try_from(n * 8).expect("chunk fits")];
        file.read_exact_at(bytes, (base / 4096 + done) * 8)?;
        for (k, e) in bytes.chunks_exact(8).enumerate() {
            let idx = done + k as u64;
            if idx % step == 0 && is_backed(u64::from_ne_bytes(e.try_into().expect("8 bytes"))) {
                backed(idx / step);
            }
        }
        done += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn touched_pages_of_this_process_read_as_backed() {
        let mut map = memmap2::MmapMut::map_anon(16 * 4096).unwrap();
        map[3 * 4096] = 1;
        map[7 * 4096 + 5] = 1;
        let mut seen = Vec::new();
        for_each_backed(std::process::id(), map.as_ptr() as u64, 16, 4096, |p| seen.push(p))
            .unwrap();
        assert_eq!(seen, vec![3, 7]);
    }

    #[test]
    fn entries_decode_present_and_swapped() {
        assert!(is_backed(PRESENT | 42));
        assert!(is_backed(SWAPPED));
        assert!(!is_backed(0x1234));
    }
}
