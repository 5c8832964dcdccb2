//! Memory files, mapped once per file and shared by every session restored from it, so that the
//! kernel's page cache is the one cache across VMs and the pager's own memory does not grow with
//! the number of sessions.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex, Weak};

use memmap2::Mmap;
use uffdpager::pages::PageBitmap;

/// A memory file mapped read-only (`MAP_SHARED`: its pages are the page cache's).
#[derive(Debug)]
pub struct MappedFile {
    file: File,
    map: Mmap,
    key: (u64, u64),
    /// Which 4 KiB pages of the file hold only zeros, learned once and shared by every session
    /// restored from this file; made at the first bulk populate.
    zero_map: Mutex<Option<ZeroMap>>,
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

    /// For each page of `page_size` bytes at file offsets `offset + i * page_size`, `i < pages`:
    /// true if the page holds only zeros. Answers from the shared zero map: holes are known from
    /// the file's extents without reading them; a data page is read once, the first time anyone
    /// asks, and remembered. The caller has checked that the file is still long enough.
    ///
    /// The map assumes what a snapshot is: a file nobody writes while VMs are restored from it.
    pub fn zero_pages(&self, offset: u64, pages: u64, page_size: u64) -> Vec<bool> {
        self.classify(offset, pages, page_size, true)
    }

    /// Like [`Self::zero_pages`], but reads nothing: true for pages known to be zero (holes, and
    /// data pages some earlier call read).
    pub fn hole_pages(&self, offset: u64, pages: u64, page_size: u64) -> Vec<bool> {
        self.classify(offset, pages, page_size, false)
    }

    fn classify(&self, offset: u64, pages: u64, page_size: u64, read: bool) -> Vec<bool> {
        let sub = page_size / 4096;
        let mut guard = self.zero_map.lock().expect("zero map");
        let map = guard.get_or_insert_with(|| ZeroMap::new(&self.file, self.mapped_len()));
        let first = offset / 4096;
        let end = (first + pages * sub).min(map.known.len());
        for fp in (first..end).filter(|_| read) {
            prefetch_page(&self.map, fp + PREFETCH_PAGES_AHEAD);
            if !map.known.get(fp) {
                let o = usize::try_from(fp * 4096).expect("offset fits");
                if is_zero(&self.map[o..(o + 4096).min(self.map.len())]) {
                    map.zero.set(fp);
                }
                map.known.set(fp);
            }
        }
        (0..pages)
            .map(|i| {
                let fp = first + i * sub;
                (fp..fp + sub).all(|p| map.zero.get(p))
            })
            .collect()
    }
}

/// How far ahead of the page it tests the zero scan asks the CPU to load the next page's first
/// bytes: a dense page is told apart by its first word, so the scan is one cache miss per page,
/// and these overlap instead of coming one after the other.
const PREFETCH_PAGES_AHEAD: u64 = 8;

fn prefetch_page(map: &[u8], page: u64) {
    let Ok(at) = usize::try_from(page * 4096) else { return };
    if at >= map.len() {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint: it never faults (not even past a truncated file's end) and
    // changes no memory; `at` is inside the mapping.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(
            map.as_ptr().add(at).cast(),
        );
    }
}

/// Which 4 KiB pages of a memory file hold only zeros: `known` pages have been classified, and
/// of those, `zero` ones are zero. Holes are classified when the map is made.
#[derive(Debug)]
struct ZeroMap {
    known: PageBitmap,
    zero: PageBitmap,
}

impl ZeroMap {
    fn new(file: &File, len: u64) -> Self {
        let n = len.div_ceil(4096);
        let mut map = Self { known: PageBitmap::new(n), zero: PageBitmap::new(n) };
        let mut hole_start = 0u64;
        let data = crate::file_extents::data_extents(file, len);
        for (start, end) in data.into_iter().chain([(len, len)]) {
            // Pages wholly inside the hole [hole_start, start).
            let (first, last) = (hole_start.div_ceil(4096), start / 4096);
            if first < last {
                map.known.set_range(first..last);
                map.zero.set_range(first..last);
            }
            hole_start = end;
        }
        map
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
    fn holes_are_zero_without_being_read() {
        let mut f = tempfile::NamedTempFile::new_in("/var/tmp").unwrap();
        f.as_file_mut().set_len(4 << 20).unwrap();
        f.seek(SeekFrom::Start(2 << 20)).unwrap();
        f.write_all(&[1u8; 4096]).unwrap();
        f.flush().unwrap();
        let files = MemoryFiles::default();
        let m = files.open(File::open(f.path()).unwrap().into()).unwrap();
        let zero = m.zero_pages(0, 1024, 4096);
        assert_eq!(zero.iter().filter(|&&z| !z).count(), 1);
        assert!(!zero[512]);
        // The holes never entered the page cache: nothing read them.
        let mut resident = vec![0u8; 1024];
        // SAFETY: the mapping is 4 MiB = 1024 pages long and `resident` has one byte per page.
        let rc =
            unsafe { libc::mincore(m.bytes().as_ptr() as *mut _, 4 << 20, resident.as_mut_ptr()) };
        assert_eq!(rc, 0);
        let read: Vec<usize> = (0..1024).filter(|&p| resident[p] & 1 != 0 && p != 512).collect();
        assert!(read.is_empty(), "hole pages in the page cache: {read:?}");
    }
}
