//! Counting uffd-registered VMAs in `/proc/<pid>/smaps`: the kernel's own word on whether a VM
//! still depends on its pager. A VMA registered in MISSING mode shows `um` in its `VmFlags`
//! (see `proc(5)`); after graduation (`UFFDIO_UNREGISTER` of every region) none is left.

use std::io;

/// Counts the VMAs of process `pid` registered with a userfaultfd in MISSING mode.
pub fn uffd_registered_vmas(pid: u32) -> io::Result<usize> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    Ok(count_uffd_missing_vmas(&text, None))
}

/// Like [`uffd_registered_vmas`], counting only VMAs that overlap one of `ranges`
/// (`[start, end)` host addresses), e.g. one VM's regions in a process that holds several.
pub fn uffd_registered_vmas_in(pid: u32, ranges: &[(u64, u64)]) -> io::Result<usize> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    Ok(count_uffd_missing_vmas(&text, Some(ranges)))
}

/// Parses the `start-end` address range of a VMA header line, if `line` is one.
fn vma_range(line: &str) -> Option<(u64, u64)> {
    let (range, _) = line.split_once(' ')?;
    let (start, end) = range.split_once('-')?;
    Some((u64::from_str_radix(start, 16).ok()?, u64::from_str_radix(end, 16).ok()?))
}

/// Counts, in smaps text, the VMAs whose `VmFlags` contain `um`, restricted to VMAs overlapping
/// `ranges` when given.
pub fn count_uffd_missing_vmas(smaps: &str, ranges: Option<&[(u64, u64)]>) -> usize {
    let mut current: Option<(u64, u64)> = None;
    let mut count = 0;
    for line in smaps.lines() {
        if let Some(flags) = line.strip_prefix("VmFlags:") {
            let wanted = match (ranges, current) {
                (None, _) => true,
                (Some(ranges), Some((s, e))) => ranges.iter().any(|&(a, b)| s < b && a < e),
                (Some(_), None) => false,
            };
            if wanted && flags.split_whitespace().any(|f| f == "um") {
                count += 1;
            }
        } else if let Some(range) = vma_range(line) {
            current = Some(range);
        }
    }
    count
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
7f0000000000-7f0000200000 rw-p 00000000 00:00 0 
Size:               2048 kB
Rss:                   0 kB
VmFlags: rd wr mr mw me ac nr um 
7f0000200000-7f0000400000 rw-p 00000000 00:00 0 
Size:               2048 kB
VmFlags: rd wr mr mw me ac nr 
7f0000400000-7f0000600000 rw-p 00000000 00:00 0 
Size:               2048 kB
VmFlags: rd wr mr mw me ac nr um uw 
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
Size:                132 kB
VmFlags: rd wr mr mw me gd ac 
";

    #[test]
    fn counts_vmas_flagged_uffd_missing() {
        assert_eq!(count_uffd_missing_vmas(SAMPLE, None), 2);
        assert_eq!(count_uffd_missing_vmas("", None), 0);
    }

    #[test]
    fn counts_only_vmas_overlapping_the_given_ranges() {
        let first = [(0x7f00_0000_0000, 0x7f00_0000_1000)];
        assert_eq!(count_uffd_missing_vmas(SAMPLE, Some(&first)), 1);
        let second = [(0x7f00_0020_0000, 0x7f00_0040_0000)];
        assert_eq!(count_uffd_missing_vmas(SAMPLE, Some(&second)), 0);
        assert_eq!(count_uffd_missing_vmas(SAMPLE, Some(&[])), 0);
    }

    #[test]
    fn this_process_can_be_inspected() {
        uffd_registered_vmas(std::process::id()).unwrap();
        assert!(uffd_registered_vmas(u32::MAX).is_err());
    }
}
