//! Memory files, mapped once per file and shared by every session restored from it, so that the
//! kernel's page cache is the one cache across VMs and the pager's own memory does not grow with
//! the number of sessions. A file whose last session ended stays mapped for a while (`linger`)
//! for the next session restored from it.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use memmap2::Mmap;
use uffdpager::pages::{flag_runs, PageBitmap};

// The scan reads with `pread` (no unsafe code), though its parent maps files.
#[deny(unsafe_code)]
pub mod zero_scan;

pub mod linger;

use linger::Stamp;
use tracing::info;

use crate::metrics::{self, MemoryFileFigures, METRICS};
use zero_scan::ZeroScanner;

/// Runs shorter than this are not worth a [`MappedFile::map_ahead`] call.
const MAP_AHEAD_MIN_BYTES: u64 = 64 << 10;

/// A memory file mapped read-only (`MAP_SHARED`: its pages are the page cache's).
#[derive(Debug)]
pub struct MappedFile {
    file: File,
    map: Mmap,
    /// The file as it was when mapped.
    stamp: Stamp,
    /// Which 4 KiB pages of the file hold only zeros, learned once and shared by every session
    /// restored from this file; made at the first bulk populate.
    zero_map: Mutex<Option<ZeroMap>>,
    /// No session holds the file (it lingers): the background scan stops at its next chunk.
    idle: AtomicBool,
    /// The background scan stopped because the file was idle; a session taking the file again
    /// queues the scan again (see [`MappedFile::park_scan`]).
    scan_parked: AtomicBool,
    /// The background scan holds the file for a chunk (that hold is not a session's).
    scan_holds: AtomicBool,
}

/// The background scan's hold on a file for one chunk ([`MappedFile::scan_hold`]).
#[derive(Debug)]
pub struct ScanHold<'a>(&'a MappedFile);

impl Drop for ScanHold<'_> {
    fn drop(&mut self) {
        self.0.scan_holds.store(false, Ordering::Release);
    }
}

impl MappedFile {
    /// Whether the background scan stops here, the file being idle (a lingering file is not
    /// read in the background: nobody may restore from it again). The scan marks itself parked
    /// first, then looks again: a session taking the file meanwhile takes the parked mark back
    /// and queues the scan anew, or the scan takes it back and goes on; never both, never none.
    pub fn park_scan(&self) -> bool {
        if !self.idle.load(Ordering::Acquire) {
            return false;
        }
        self.scan_parked.store(true, Ordering::Release);
        if self.idle.load(Ordering::Acquire) {
            return true;
        }
        !self.scan_parked.swap(false, Ordering::AcqRel)
    }

    /// Marks the scan's hold of this file until the guard drops, so that [`MemoryFiles::sweep`]
    /// does not take it for a session's: a scan starved of CPU (it runs at idle priority) would
    /// otherwise keep a file no session holds from ever being seen idle.
    pub fn scan_hold(&self) -> ScanHold<'_> {
        self.scan_holds.store(true, Ordering::Release);
        ScanHold(self)
    }

    /// Holders of the file other than the table and the background scan: its sessions (and
    /// what they lent it to), given the `Arc`'s strong count.
    fn session_holds(&self, strong: usize) -> usize {
        let scan = usize::from(self.scan_holds.load(Ordering::Acquire));
        strong.saturating_sub(1 + scan)
    }

    /// Whether the file has been deleted (no name links to it any more).
    fn unlinked(&self) -> bool {
        self.file.metadata().is_ok_and(|m| m.nlink() == 0)
    }

    /// The file's bytes as mapped at open time.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// The file's descriptor (to give a session's descriptors back to a supervisor).
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.file)
    }

    /// The open file (for `pread`s that must not fault on the mapping).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Length when mapped.
    pub fn mapped_len(&self) -> u64 {
        self.map.len() as u64
    }

    /// The file's length now (a session whose regions it no longer covers cannot be served).
    pub fn current_len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    /// Maps `[offset, offset + len)` of the file into this process's page tables in one call
    /// (`MADV_POPULATE_READ`), instead of one page fault per 16 pages as the bulk copy or the
    /// zero test first reads them. Best effort: an error (a file truncated under the range
    /// answers `EFAULT`, where a read would raise SIGBUS) leaves the reads to find it.
    pub fn populate(&self, offset: u64, len: u64) {
        let start = usize::try_from(offset).unwrap_or(usize::MAX).min(self.map.len()) & !4095;
        let end =
            usize::try_from(offset.saturating_add(len)).unwrap_or(usize::MAX).min(self.map.len());
        if start >= end {
            return;
        }
        // SAFETY: `[start, end)` lies inside this mapping (clipped above) and starts on a page
        // boundary; MADV_POPULATE_READ only faults pages in and changes no data.
        unsafe {
            libc::madvise(
                self.map.as_ptr().add(start) as *mut libc::c_void,
                end - start,
                libc::MADV_POPULATE_READ,
            );
        }
    }

    /// Classifies the data pages of `[first, end)` (4 KiB pages) not yet known, reading them
    /// through the mapping without holding the zero map's lock, then records them. The read is
    /// guarded (`crate::guarded_read`): a file truncated under the mapping makes it fail, never
    /// raise SIGBUS.
    pub fn learn_zero_pages(&self, first: u64, end: u64) -> io::Result<()> {
        let unknown = self.unknown_pages(first, end);
        if unknown.is_empty() {
            return Ok(());
        }
        match crate::guarded_read::classify_pages(&self.map, &unknown) {
            Ok(zero) => {
                self.record(&unknown, &zero);
                Ok(())
            }
            Err(i) => {
                let need = ((unknown[i] + 1) * 4096).min(self.mapped_len());
                Err(truncated(self.current_len().unwrap_or(0), need))
            }
        }
    }

    /// Like [`Self::learn_zero_pages`], but reads with `pread` into `buf`: a file truncated
    /// meanwhile makes a short read (an error here), never a signal. Each run of unknown pages
    /// is read in one call; holes, known already, are not read (a read of a hole would fill the
    /// page cache with zeros).
    pub fn learn_zero_pages_by_pread(
        &self,
        first: u64,
        end: u64,
        buf: &mut Vec<u8>,
    ) -> io::Result<()> {
        let unknown = self.unknown_pages(first, end);
        let mut zero = Vec::with_capacity(unknown.len());
        let mut i = 0;
        while i < unknown.len() {
            let run = unknown[i..].iter().zip(unknown[i]..).take_while(|(&p, q)| p == *q).count();
            let (off, len) = (unknown[i] * 4096, run * 4096);
            buf.resize(len, 0);
            self.file.read_exact_at(buf, off).map_err(|e| match e.kind() {
                io::ErrorKind::UnexpectedEof => {
                    truncated(self.current_len().unwrap_or(0), off + len as u64)
                }
                _ => e,
            })?;
            let pages: Vec<u64> = (0..run as u64).collect();
            // The buffer cannot be truncated under the read: the guard never fires here.
            let in_run = crate::guarded_read::classify_pages(buf, &pages)
                .map_err(|_| io::Error::other("the zero test could not run"))?;
            zero.extend(in_run);
            i += run;
        }
        self.record(&unknown, &zero);
        Ok(())
    }

    /// Before a run is tested for zeros and copied: maps its data pages (not its holes) into this
    /// process's page tables in a few calls, so that neither the zero test nor the copy takes a
    /// page fault per 16 pages on the way. Runs under [`MAP_AHEAD_MIN_BYTES`] are left to
    /// those faults.
    pub fn map_ahead(&self, offset: u64, len: u64) {
        if len >= MAP_AHEAD_MIN_BYTES {
            self.populate_data(offset / 4096, (offset + len).div_ceil(4096));
        }
    }

    /// Maps the non-zero pages of `[first, end)` (4 KiB pages, as the zero map knows them) into
    /// this process's page tables, one call per run: holes are left unmapped (mapping one would
    /// fill the page cache with zeros).
    pub fn populate_data(&self, first: u64, end: u64) {
        let zero = self.hole_pages(first * 4096, end - first, 4096);
        for (run, is_zero) in flag_runs(first, &zero) {
            if !is_zero {
                self.populate(run.start * 4096, (run.end - run.start) * 4096);
            }
        }
    }

    /// The pages of `[first, end)` the zero map does not know yet (making the map if need be).
    fn unknown_pages(&self, first: u64, end: u64) -> Vec<u64> {
        let mut guard = self.zero_map.lock().expect("zero map");
        let map = guard.get_or_insert_with(|| ZeroMap::new(&self.file, self.mapped_len()));
        (first..end.min(map.known.len())).filter(|&p| !map.known.get(p)).collect()
    }

    fn record(&self, pages: &[u64], zero: &[bool]) {
        let mut guard = self.zero_map.lock().expect("zero map");
        let map = guard.as_mut().expect("made by unknown_pages");
        for (&p, &z) in pages.iter().zip(zero) {
            map.known.set(p);
            if z {
                map.zero.set(p);
            }
        }
    }

    /// For each page of `page_size` bytes at file offsets `offset + i * page_size`, `i < pages`:
    /// true if the page holds only zeros. Answers from the shared zero map: holes are known from
    /// the file's extents without reading them; a data page is read once, the first time anyone
    /// asks, and remembered.
    ///
    /// The map assumes what a snapshot is: a file nobody writes while VMs are restored from it.
    pub fn zero_pages(&self, offset: u64, pages: u64, page_size: u64) -> Vec<bool> {
        let first = offset / 4096;
        // In a file now shorter than the range, unknown pages count as data, and copying them
        // fails cleanly (UFFDIO_COPY answers EFAULT past the end).
        let _ = self.learn_zero_pages(first, first + pages * (page_size / 4096));
        self.hole_pages(offset, pages, page_size)
    }

    /// Like [`Self::zero_pages`], but reads nothing: true for pages known to be zero (holes, and
    /// data pages some earlier call read); pages not known yet count as data.
    pub fn hole_pages(&self, offset: u64, pages: u64, page_size: u64) -> Vec<bool> {
        let sub = page_size / 4096;
        let mut guard = self.zero_map.lock().expect("zero map");
        let map = guard.get_or_insert_with(|| ZeroMap::new(&self.file, self.mapped_len()));
        let first = offset / 4096;
        (0..pages)
            .map(|i| {
                let fp = first + i * sub;
                (fp..fp + sub).all(|p| map.zero.get(p))
            })
            .collect()
    }
}

fn truncated(len: u64, need: u64) -> io::Error {
    io::Error::other(format!("the file is {len} bytes now, {need} expected (truncated?)"))
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

/// The mapped memory files, keyed by (device, inode): those sessions hold, and those none has
/// held for less than the linger.
#[derive(Debug, Default)]
pub struct MemoryFiles {
    open: Mutex<HashMap<(u64, u64), Held>>,
    /// Mappings of files rewritten since, which sessions restored before the rewrite still hold
    /// (the table maps the file afresh for new sessions); gone with their last session.
    superseded: Mutex<Vec<Weak<MappedFile>>>,
    /// How long a file no session holds stays mapped (zero: until the next [`Self::sweep`]).
    linger: Duration,
    /// Learns each new file's zero pages in the background (none: only on demand).
    scanner: Option<ZeroScanner>,
}

/// A mapped file in the table, and since when no session has held it.
#[derive(Debug)]
struct Held {
    file: Arc<MappedFile>,
    idle_since: Option<Instant>,
}

impl MemoryFiles {
    /// The table, files kept `linger` after their last session, with the background zero
    /// scan's thread started (a fixed thread from the pager's start, like the fault workers).
    pub fn with_background_scan(linger: Duration) -> io::Result<Self> {
        Ok(Self { linger, scanner: Some(ZeroScanner::start()?), ..Self::default() })
    }

    /// The shared mapping of the file behind `fd`: the one mapped already if the file is
    /// unchanged since (length, modification and change times), else a new one.
    pub fn open(&self, fd: OwnedFd) -> io::Result<Arc<MappedFile>> {
        let file = File::from(fd);
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"));
        }
        let (key, stamp) = ((meta.dev(), meta.ino()), Stamp::of(&meta));
        let mut open = self.open.lock().expect("memory file table");
        if let Some(held) = open.get_mut(&key) {
            if held.file.stamp == stamp && held.file.mapped_len() == meta.len() {
                let lingering = held.file.session_holds(Arc::strong_count(&held.file)) == 0;
                held.idle_since = None;
                held.file.idle.store(false, Ordering::Release);
                if held.file.scan_parked.swap(false, Ordering::AcqRel) {
                    if let Some(scanner) = &self.scanner {
                        scanner.enqueue(Arc::downgrade(&held.file));
                    }
                }
                if lingering {
                    metrics::add(&METRICS.memory_file_reuses, 1);
                    info!(
                        dev = key.0,
                        inode = key.1,
                        "memory file mapped still: served from the earlier mapping"
                    );
                }
                return Ok(Arc::clone(&held.file));
            }
        }
        // SAFETY: the mapping is read-only and shared with the page cache. Another process could
        // truncate the file under it; reads then fault with SIGBUS. It is read only through
        // UFFDIO_COPY (the kernel turns that into EFAULT) and `crate::guarded_read` (which turns
        // the SIGBUS into an error).
        let map = unsafe { Mmap::map(&file)? };
        let mapped = Arc::new(MappedFile {
            file,
            map,
            stamp,
            zero_map: Mutex::new(None),
            idle: AtomicBool::new(false),
            scan_parked: AtomicBool::new(false),
            scan_holds: AtomicBool::new(false),
        });
        // A file changed since its earlier mapping: its sessions keep that one, new ones get this.
        if let Some(old) = open.insert(key, Held { file: Arc::clone(&mapped), idle_since: None }) {
            if old.file.session_holds(Arc::strong_count(&old.file)) > 0 {
                let mut superseded = self.superseded.lock().expect("superseded memory files");
                superseded.retain(|w| w.strong_count() > 0);
                superseded.push(Arc::downgrade(&old.file));
            }
        }
        if let Some(scanner) = &self.scanner {
            scanner.enqueue(Arc::downgrade(&mapped));
        }
        Ok(mapped)
    }

    /// Notes which files no session holds any more, and lets go of those idle for the linger
    /// (or beyond [`linger::MAX_IDLE_FILES`]). Called periodically (`Self::sweep_every`).
    pub fn sweep(&self, now: Instant) {
        let mut open = self.open.lock().expect("memory file table");
        let (mut idle, mut deleted) = (Vec::new(), Vec::new());
        for (key, held) in open.iter_mut() {
            if held.file.session_holds(Arc::strong_count(&held.file)) > 0 {
                held.idle_since = None;
            } else if held.file.unlinked() {
                // A snapshot deleted meanwhile: its disk space is freed once no fd holds it.
                deleted.push(*key);
            } else {
                held.file.idle.store(true, Ordering::Release);
                idle.push((*key, *held.idle_since.get_or_insert(now)));
            }
        }
        self.superseded.lock().expect("superseded memory files").retain(|w| w.strong_count() > 0);
        let release = linger::release(&idle, now, self.linger, linger::MAX_IDLE_FILES);
        for key in deleted.into_iter().chain(release) {
            open.remove(&key);
            if !self.linger.is_zero() {
                info!(
                    dev = key.0,
                    inode = key.1,
                    linger_s = self.linger.as_secs_f64(),
                    "memory file let go: no session restored from it since its last ended"
                );
            }
        }
    }

    /// How often [`Self::sweep`] should run: a file is let go between one and two periods
    /// after its linger.
    pub fn sweep_every(&self) -> Duration {
        (self.linger / 4).clamp(Duration::from_millis(100), Duration::from_secs(1))
    }

    /// Number of files currently mapped (held by sessions or lingering), a rewritten file's
    /// earlier mapping that sessions still hold included.
    pub fn count(&self) -> usize {
        let open = self.open.lock().expect("memory file table").len();
        open + self.superseded_in_use()
    }

    /// The mappings of rewritten files that sessions still hold.
    fn superseded_in_use(&self) -> usize {
        let superseded = self.superseded.lock().expect("superseded memory files");
        superseded
            .iter()
            .filter_map(Weak::upgrade)
            .filter(|f| f.session_holds(Arc::strong_count(f)) > 0) // this upgrade in the table's stead
            .count()
    }

    /// The files mapped now: in use by sessions, and lingering (with their mappings' length).
    pub fn figures(&self) -> MemoryFileFigures {
        let open = self.open.lock().expect("memory file table");
        let mut figures = MemoryFileFigures::default();
        for held in open.values() {
            if held.file.session_holds(Arc::strong_count(&held.file)) > 0 {
                figures.in_use += 1;
            } else {
                figures.lingering += 1;
                figures.lingering_bytes += held.file.mapped_len();
            }
        }
        drop(open);
        figures.in_use += self.superseded_in_use() as u64;
        figures
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

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
        files.sweep(Instant::now());
        assert_eq!(files.count(), 0, "no linger: let go at the sweep after the last session");
    }

    #[test]
    fn a_file_whose_sessions_ended_lingers_and_a_rewritten_one_is_mapped_afresh() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&[7u8; 8192]).unwrap();
        let linger = Duration::from_secs(30);
        let files = MemoryFiles { linger, ..MemoryFiles::default() };
        let a = files.open(File::open(f.path()).unwrap().into()).unwrap();
        let weak = Arc::downgrade(&a);
        drop(a);
        let t0 = Instant::now();
        files.sweep(t0);
        assert_eq!(files.count(), 1, "idle, within its linger");
        let idle = weak.upgrade().unwrap();
        assert!(idle.park_scan(), "no background reading of a file no session holds");
        drop(idle);
        let b = files.open(File::open(f.path()).unwrap().into()).unwrap();
        assert!(weak.upgrade().is_some_and(|w| Arc::ptr_eq(&w, &b)), "the same mapping again");
        assert!(!b.scan_parked.load(Ordering::Acquire), "taken again: the scan is queued anew");
        assert!(!b.park_scan(), "held by a session: the scan goes on");

        std::thread::sleep(Duration::from_millis(20));
        f.as_file().write_all_at(&[8u8; 4096], 0).unwrap();
        let c = files.open(File::open(f.path()).unwrap().into()).unwrap();
        assert!(!Arc::ptr_eq(&b, &c), "rewritten in place: mapped afresh");
        assert_eq!(&c.bytes()[..4], &[8, 8, 8, 8]);
        let both = MemoryFileFigures { in_use: 2, lingering: 0, lingering_bytes: 0 };
        assert_eq!(files.figures(), both, "the earlier mapping, still held, is counted too");
        assert_eq!(files.count(), 2);
        drop(c);
        let old_held = MemoryFileFigures { in_use: 1, lingering: 1, lingering_bytes: 8192 };
        assert_eq!(files.figures(), old_held);
        drop(b);
        files.sweep(t0 + linger / 2);
        let lingering = MemoryFileFigures { in_use: 0, lingering: 1, lingering_bytes: 8192 };
        assert_eq!(files.figures(), lingering, "the earlier mapping gone with its last session");
        assert_eq!(files.count(), 1);
        files.sweep(t0 + linger * 2);
        assert_eq!(files.count(), 0, "let go once idle for its linger");
    }

    #[test]
    fn the_figures_tell_files_in_use_from_lingering_ones_and_count_reuses() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&[7u8; 8192]).unwrap();
        let mut g = tempfile::NamedTempFile::new().unwrap();
        g.write_all(&[7u8; 3 * 4096]).unwrap();
        let files = MemoryFiles { linger: Duration::from_secs(30), ..MemoryFiles::default() };
        let a = files.open(File::open(f.path()).unwrap().into()).unwrap();
        let b = files.open(File::open(g.path()).unwrap().into()).unwrap();
        let shared = files.open(File::open(g.path()).unwrap().into()).unwrap();
        let in_use = MemoryFileFigures { in_use: 2, lingering: 0, lingering_bytes: 0 };
        assert_eq!(files.figures(), in_use, "a file two sessions share counts once");
        drop((b, shared));
        let idle = MemoryFileFigures { in_use: 1, lingering: 1, lingering_bytes: 3 * 4096 };
        assert_eq!(files.figures(), idle, "lingering before any sweep saw it");
        // The scan holds its own reference while it reads a chunk.
        let scanning = Arc::clone(&a);
        let scan = scanning.scan_hold();
        let reuses = METRICS.memory_file_reuses.load(Ordering::Relaxed);
        let again = files.open(File::open(g.path()).unwrap().into()).unwrap();
        assert!(METRICS.memory_file_reuses.load(Ordering::Relaxed) > reuses, "a reuse counted");
        assert_eq!(files.figures(), in_use);
        drop((a, again));
        let lingering = MemoryFileFigures { in_use: 0, lingering: 2, lingering_bytes: 5 * 4096 };
        assert_eq!(files.figures(), lingering, "the scan's hold is not a session's");
        drop(scan);
    }

    #[test]
    fn the_background_scans_hold_is_not_a_sessions() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&[7u8; 8192]).unwrap();
        let files = MemoryFiles { linger: Duration::from_secs(30), ..MemoryFiles::default() };
        let scan = files.open(File::open(f.path()).unwrap().into()).unwrap();
        let hold = scan.scan_hold();
        files.sweep(Instant::now());
        assert!(scan.park_scan(), "only the scan holds it: idle, and the scan parks");
        drop(hold);
        let session = files.open(File::open(f.path()).unwrap().into()).unwrap();
        let _hold = scan.scan_hold();
        files.sweep(Instant::now());
        assert!(!session.park_scan(), "a session holds it beside the scan");
    }

    #[test]
    fn a_deleted_file_is_let_go_at_once_whatever_its_linger() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&[7u8; 8192]).unwrap();
        let files = MemoryFiles { linger: Duration::from_secs(30), ..MemoryFiles::default() };
        drop(files.open(File::open(f.path()).unwrap().into()).unwrap());
        files.sweep(Instant::now());
        assert_eq!(files.count(), 1, "lingering");
        f.close().unwrap();
        files.sweep(Instant::now());
        assert_eq!(files.count(), 0, "deleted: its space is freed now, not in 30 s");
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
    fn pages_learned_in_the_background_are_answered_without_reading() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let mut data = vec![0u8; 8 * 4096];
        data[4096 + 7] = 1;
        data[6 * 4096] = 1;
        f.write_all(&data).unwrap();
        let files = MemoryFiles::default();
        let m = files.open(File::open(f.path()).unwrap().into()).unwrap();
        m.learn_zero_pages(0, 8).unwrap();
        let zero = m.hole_pages(0, 8, 4096);
        assert_eq!(zero, vec![true, false, true, true, true, true, false, true]);
    }

    #[test]
    fn the_background_read_of_a_truncated_file_fails_without_a_signal() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&[3u8; 64 * 4096]).unwrap();
        let files = MemoryFiles::default();
        let m = files.open(File::open(f.path()).unwrap().into()).unwrap();
        let mut buf = Vec::new();
        m.learn_zero_pages_by_pread(0, 8, &mut buf).unwrap();
        f.as_file().set_len(16 * 4096).unwrap();
        let e = m.learn_zero_pages_by_pread(8, 64, &mut buf).unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");
        assert_eq!(m.hole_pages(0, 8, 4096), vec![false; 8]);
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
