//! Memory files, mapped once per file and shared by every session restored from it, so that the
//! kernel's page cache is the one cache across VMs and the pager's own memory does not grow with
//! the number of sessions.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex, Weak};

use memmap2::Mmap;
use nix::unistd::{lseek, Whence};
use uffdpager::pages::PageBitmap;

/// A memory file mapped read-only (`MAP_SHARED`: its pages are the page cache's).
#[derive(Debug)]
pub struct MappedFile {
    file: File,
    map: Mmap,
    key: (u64, u64),
    /// Which 4 KiB pages of the file hold only zeros, learned once and shared by every session
    /// restored from this file (a zero page is read in full to know it; a hole maps a page-cache
    /// page): `(known, zero)` bitmaps, allocated at the first completion.
    zero_map: Mutex<Option<(PageBitmap, PageBitmap)>>,
}

impl MappedFile {
    /// The file's bytes as mapped at open time.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// Length when mapped.
    pub fn mapped_len(&self) -> u64 {
        self.map.len() as u64
    }

    /// The file's length now. Reading the mapping past it would raise SIGBUS, so callers that
    /// read the mapping from user space (zero detection) check this first.
    pub fn current_len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    /// The start of the next data extent at or after `offset`, or `None` past the last one
    /// (`SEEK_DATA`; file systems without hole support report all data).
    pub fn next_data(&self, offset: u64) -> Option<u64> {
        let off = i64::try_from(offset).ok()?;
        match lseek(self.file.as_raw_fd(), off, Whence::SeekData) {
            Ok(pos) => u64::try_from(pos).ok(),
            Err(_) => None,
        }
    }

    /// For each page of `page_size` bytes at file offsets `offset + i * page_size`, `i < pages`:
    /// true if the page holds only zeros. Answers from the shared zero map where it can, reads
    /// the mapping where it must (after checking the file is still long enough), and records
    /// what it read.
    pub fn zero_pages(&self, offset: u64, pages: u64, page_size: u64) -> Vec<bool> {
        let sub = page_size / 4096;
        let mut guard = self.zero_map.lock().expect("zero map");
        let (known, zero) = guard.get_or_insert_with(|| {
            let n = self.mapped_len().div_ceil(4096);
            (PageBitmap::new(n), PageBitmap::new(n))
        });
        (0..pages)
            .map(|i| {
                let first = (offset + i * page_size) / 4096;
                (first..first + sub).all(|fp| {
                    if !known.get(fp) {
                        let o = usize::try_from(fp * 4096).expect("offset fits");
                        if is_zero(&self.map[o..o + 4096]) {
                            zero.set(fp);
                        }
                        known.set(fp);
                    }
                    zero.get(fp)
                })
            })
            .collect()
    }

    /// The start of the next hole at or after `offset` (`SEEK_HOLE`; the file's end counts).
    pub fn next_hole(&self, offset: u64) -> u64 {
        let Ok(off) = i64::try_from(offset) else { return offset };
        match lseek(self.file.as_raw_fd(), off, Whence::SeekHole) {
            Ok(pos) => u64::try_from(pos).unwrap_or(offset),
            Err(_) => self.mapped_len(),
        }
    }
}

/// The open memory files, keyed by (device, inode).
#[derive(Debug, Default)]
pub struct MemoryFiles {
    open: Mutex<HashMap<(u64, u64), Weak<MappedFile>>>,
}

impl MemoryFiles {
    /// The shared mapping of the file behind `fd` (mapping it if no session holds it yet).
    pub fn open(&self, fd: OwnedFd) -> io::Result<Arc<MappedFile>> {
        let file = File::from(fd);
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"));
        }
        let key = (meta.dev(), meta.ino());
        let mut open = self.open.lock().expect("memory file table");
        open.retain(|_, w| w.strong_count() > 0);
        if let Some(existing) = open.get(&key).and_then(Weak::upgrade) {
            if existing.mapped_len() == meta.len() {
                return Ok(existing);
            }
        }
        // SAFETY: the mapping is read-only and shared with the page cache. Another process could
        // truncate the file under it; reads then fault with SIGBUS. Callers read it only through
        // UFFDIO_COPY (the kernel turns that into EFAULT) or after checking `current_len`.
        let map = unsafe { Mmap::map(&file)? };
        let mapped = Arc::new(MappedFile { file, map, key, zero_map: Mutex::new(None) });
        open.insert(mapped.key, Arc::downgrade(&mapped));
        Ok(mapped)
    }

    /// Number of files currently mapped.
    pub fn count(&self) -> usize {
        self.open
            .lock()
            .expect("memory file table")
            .values()
            .filter(|w| w.strong_count() > 0)
            .count()
    }
}

/// True when every byte of `bytes` is zero. Checks the first word first: dense pages answer at once.
pub fn is_zero(bytes: &[u8]) -> bool {
    // SAFETY: u128 has no invalid bit patterns; align_to only reinterprets the aligned middle.
    let (head, body, tail) = unsafe { bytes.align_to::<u128>() };
    head.iter().all(|&b| b == 0)
        && body.first().is_none_or(|&w| w == 0)
        && body.chunks(16).all(|c| c.iter().fold(0, |acc, &w| acc | w) == 0)
        && tail.iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

    #[test]
    fn is_zero_sees_a_single_nonzero_byte_anywhere() {
        let mut page = vec![0u8; 4096 + 3];
        assert!(is_zero(&page[1..]));
        for i in [1, 17, 2048, 4095, 4098] {
            page[i] = 1;
            assert!(!is_zero(&page[1..]), "byte {i}");
            page[i] = 0;
        }
    }

    #[test]
    fn two_sessions_of_one_file_share_one_mapping() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&[7u8; 8192]).unwrap();
        let files = MemoryFiles::default();
        let a = files.open(File::open(f.path()).unwrap().into()).unwrap();
        let b = files.open(File::open(f.path()).unwrap().into()).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(files.count(), 1);
        drop((a, b));
        assert_eq!(files.count(), 0);
    }

    #[test]
    fn zero_pages_are_learned_once_and_answered_for_any_page_size() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let mut data = vec![0u8; 8 * 4096];
        data[4096 + 7] = 1; // page 1 is data, the rest zero
        f.write_all(&data).unwrap();
        let files = MemoryFiles::default();
        let m = files.open(File::open(f.path()).unwrap().into()).unwrap();
        assert_eq!(m.zero_pages(0, 4, 4096), vec![true, false, true, true]);
        assert_eq!(m.zero_pages(4096, 2, 4096), vec![false, true]);
        assert_eq!(m.zero_pages(0, 2, 4 * 4096), vec![false, true]);
    }

    #[test]
    fn holes_are_found_with_seek_data() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.as_file_mut().set_len(4 << 20).unwrap();
        f.seek(SeekFrom::Start(2 << 20)).unwrap();
        f.write_all(&[1u8; 4096]).unwrap();
        f.flush().unwrap();
        let files = MemoryFiles::default();
        let m = files.open(File::open(f.path()).unwrap().into()).unwrap();
        assert_eq!(m.next_data(0), Some(2 << 20));
        assert!(m.next_hole(2 << 20) >= (2 << 20) + 4096);
        assert_eq!(m.next_data((2 << 20) + (1 << 20)), None);
    }
}
