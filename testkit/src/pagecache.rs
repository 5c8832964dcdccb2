//! A file's pages in the kernel's page cache: counting them (`mincore(2)` on a mapping of the
//! file, which maps without faulting anything in) and dropping them (`posix_fadvise(2)`
//! `DONTNEED` after a sync, so none is dirty), so that tests can show what is read from disk
//! and what is served from memory.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use memmap2::Mmap;
use nix::fcntl::{posix_fadvise, PosixFadviseAdvice};

/// How much of a file the page cache holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Residency {
    /// Pages (of the system's page size) in the page cache.
    pub resident: u64,
    /// Pages of the file.
    pub pages: u64,
}

impl Residency {
    /// True when every page of the file is cached.
    pub fn complete(&self) -> bool {
        self.resident == self.pages
    }

    /// The cached share, 0.0 ..= 1.0.
    pub fn fraction(&self) -> f64 {
        if self.pages == 0 {
            return 1.0;
        }
        self.resident as f64 / self.pages as f64
    }
}

/// Counts the pages of `path` that the page cache holds.
pub fn residency(path: &Path) -> io::Result<Residency> {
    let file = File::open(path)?;
    if file.metadata()?.len() == 0 {
        return Ok(Residency { resident: 0, pages: 0 });
    }
    // SAFETY: a read-only shared mapping that this function never reads through: mincore only
    // inspects the page tables and the page cache, so a concurrent truncation cannot fault here.
    let map = unsafe { Mmap::map(&file) }?;
    let page = page_size();
    let mut vec = vec![0u8; map.len().div_ceil(page)];
    // SAFETY: `map` is a live mapping of `map.len()` bytes at a page-aligned address, and `vec`
    // holds one byte per page of it, as mincore(2) requires; both outlive the call.
    let rc =
        unsafe { libc::mincore(map.as_ptr() as *mut libc::c_void, map.len(), vec.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let resident = vec.iter().filter(|&&b| b & 1 == 1).count() as u64;
    Ok(Residency { resident, pages: vec.len() as u64 })
}

/// Writes back and drops the page-cache pages of `path` (best effort: the kernel keeps pages
/// some process has mapped and is using). Afterwards, reading the file reads the disk.
pub fn evict(path: &Path) -> io::Result<()> {
    let file = File::open(path)?;
    file.sync_all()?;
    posix_fadvise(file.as_raw_fd(), 0, 0, PosixFadviseAdvice::POSIX_FADV_DONTNEED)
        .map_err(io::Error::from)
}

fn page_size() -> usize {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .and_then(|n| usize::try_from(n).ok())
        .unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn a_file_just_read_is_resident_and_an_evicted_one_is_not() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&vec![7u8; 1 << 20]).unwrap();
        f.flush().unwrap();
        std::fs::read(f.path()).unwrap();
        let r = residency(f.path()).unwrap();
        assert_eq!(r.pages, (1 << 20) / page_size() as u64);
        assert!(r.complete(), "{r:?}");
        evict(f.path()).unwrap();
        let after = residency(f.path()).unwrap();
        // tmpfs cannot drop a file's only copy; a disk file system does.
        assert!(after.resident <= r.resident, "{after:?}");
    }
}
