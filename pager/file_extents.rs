//! Where a file holds data: its data extents, from `FS_IOC_FIEMAP` (hundreds of extents per
//! call), else from `SEEK_DATA`/`SEEK_HOLE` (two calls per extent), else the whole file. Every
//! byte outside the extents reads as zero without being read.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use nix::errno::Errno;
use nix::unistd::{lseek, Whence};

/// `_IOWR('f', 11, struct fiemap)`.
const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
/// The extent is the file's last.
const FIEMAP_EXTENT_LAST: u32 = 0x1;
/// Extents asked for per call.
const EXTENTS_PER_CALL: usize = 512;
/// [`EXTENTS_PER_CALL`] as the kernel's `fm_extent_count` takes it.
const EXTENTS_PER_CALL_U32: u32 = 512;
const _: () = assert!(EXTENTS_PER_CALL_U32 as usize == EXTENTS_PER_CALL);

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct FiemapExtent {
    fe_logical: u64,
    fe_physical: u64,
    fe_length: u64,
    fe_reserved64: [u64; 2],
    fe_flags: u32,
    fe_reserved: [u32; 3],
}

#[repr(C)]
struct Fiemap {
    fm_start: u64,
    fm_length: u64,
    fm_flags: u32,
    fm_mapped_extents: u32,
    fm_extent_count: u32,
    fm_reserved: u32,
    fm_extents: [FiemapExtent; EXTENTS_PER_CALL],
}

/// The data extents of the first `len` bytes of `file`, sorted, as `[start, end)` byte ranges
/// (clipped to `len`; adjacent extents merged).
pub fn data_extents(file: &File, len: u64) -> Vec<(u64, u64)> {
    let raw =
        fiemap(file, len).or_else(|_| seek_extents(file, len)).unwrap_or_else(|_| vec![(0, len)]);
    merge(raw, len)
}

fn fiemap(file: &File, len: u64) -> io::Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    let mut map = Box::new(Fiemap {
        fm_start: 0,
        fm_length: 0,
        fm_flags: 0,
        fm_mapped_extents: 0,
        fm_extent_count: 0,
        fm_reserved: 0,
        fm_extents: [FiemapExtent::default(); EXTENTS_PER_CALL],
    });
    let mut start = 0;
    while start < len {
        map.fm_start = start;
        map.fm_length = len - start;
        map.fm_flags = 0;
        map.fm_mapped_extents = 0;
        map.fm_extent_count = EXTENTS_PER_CALL_U32;
        // SAFETY: `map` is a valid, writable `struct fiemap` followed by room for exactly
        // `fm_extent_count` extents; the kernel writes no more than that.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_FIEMAP, &mut *map as *mut Fiemap) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = (map.fm_mapped_extents as usize).min(EXTENTS_PER_CALL);
        if n == 0 {
            break;
        }
        let mut last = false;
        for e in &map.fm_extents[..n] {
            out.push((e.fe_logical, e.fe_logical.saturating_add(e.fe_length)));
            last |= e.fe_flags & FIEMAP_EXTENT_LAST != 0;
        }
        let next = out.last().map_or(len, |&(_, end)| end);
        if last || next <= start {
            break;
        }
        start = next;
    }
    Ok(out)
}

fn seek_extents(file: &File, len: u64) -> Result<Vec<(u64, u64)>, Errno> {
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut pos = 0u64;
    while pos < len {
        let data =
            match lseek(fd, i64::try_from(pos).map_err(|_| Errno::EOVERFLOW)?, Whence::SeekData) {
                Ok(d) => u64::try_from(d).map_err(|_| Errno::EINVAL)?,
                Err(Errno::ENXIO) => break, // no data after `pos`
                Err(e) => return Err(e),
            };
        let hole = lseek(fd, i64::try_from(data).map_err(|_| Errno::EOVERFLOW)?, Whence::SeekHole)
            .map(|h| u64::try_from(h).unwrap_or(len))?;
        if hole <= data {
            out.push((data, len));
            break;
        }
        out.push((data, hole));
        pos = hole;
    }
    Ok(out)
}

/// Sorts, clips to `[0, len)` and merges overlapping or adjacent ranges.
fn merge(mut ranges: Vec<(u64, u64)>, len: u64) -> Vec<(u64, u64)> {
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (s, e) in ranges {
        let (s, e) = (s.min(len), e.min(len));
        if s >= e {
            continue;
        }
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

    #[test]
    fn merge_clips_sorts_and_joins() {
        assert_eq!(merge(vec![(10, 20), (0, 5), (5, 8), (18, 40)], 30), vec![(0, 8), (10, 30)]);
        assert_eq!(merge(vec![(40, 50)], 30), vec![]);
    }

    fn holey_file() -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new_in("/var/tmp").unwrap();
        f.as_file_mut().set_len(8 << 20).unwrap();
        for at in [1u64 << 20, (1 << 20) + 4096, 5 << 20] {
            f.seek(SeekFrom::Start(at)).unwrap();
            f.write_all(&[1u8; 4096]).unwrap();
        }
        f.flush().unwrap();
        f
    }

    #[test]
    fn fiemap_and_seek_agree_on_a_file_with_holes() {
        let f = holey_file();
        let len = 8 << 20;
        let seek = merge(seek_extents(f.as_file(), len).unwrap(), len);
        let all = data_extents(f.as_file(), len);
        assert_eq!(all, seek);
        // Both data ranges are covered, and most of the file is hole.
        for at in [1u64 << 20, (1 << 20) + 4096, 5 << 20] {
            assert!(all.iter().any(|&(s, e)| s <= at && at + 4096 <= e), "{at}: {all:?}");
        }
        assert!(all.iter().map(|(s, e)| e - s).sum::<u64>() < 4 << 20, "{all:?}");
    }
}
