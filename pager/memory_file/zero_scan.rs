//! The background zero scan: one thread per pager, at idle CPU and I/O priority, that learns
//! which data pages of each newly opened memory file hold only zeros, and maps its data pages
//! into the pager's page tables, so that a later graduation finds the answer in the file's zero
//! map instead of reading every page first, and copies from a mapping that is already there.
//!
//! It reads with `pread`, not through the mapping, so a memory file truncated under it fails
//! the scan of that file instead of raising SIGBUS in the pager.
//!
//! It runs only when a CPU would otherwise idle (`SCHED_IDLE`) and its reads wait behind every
//! other I/O (`IOPRIO_CLASS_IDLE`). A file is scanned in chunks, holding the file only for the
//! chunk, so a file whose sessions all end is released mid-scan; one that lingers (no session
//! holds it) is not read on: the scan parks, and goes on when a session takes the file again.
//!
//! It also pauses while faults come in ([`QUIET`] after the last fault any worker served), and
//! reads 128 KiB per call: `SCHED_IDLE` alone did not keep it off the faults' way. On this
//! `PREEMPT_NONE` kernel a thread inside a system call is not preempted until it returns, and a
//! fault worker polling after a fault yields its CPU, which the scheduler may give to the scan
//! (`SCHED_IDLE` is a weight in the fair class, not a class below it): with 2 MiB reads, 1% of
//! random first touches on a 1 GiB VM waited ~470 µs, one `pread` of 2 MiB (see BENCHMARKS.md).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use super::MappedFile;

/// Pages classified per chunk (128 KiB): one `pread` (~40 µs here), the longest a fault waits for
/// the scan to leave a CPU.
const CHUNK_PAGES: u64 = 32;

/// How long after the last fault the scan waits before reading again.
pub const QUIET: Duration = Duration::from_millis(20);

/// When a fault worker last served a fault, in nanoseconds since [`epoch`] (0: never).
static LAST_FAULT_NS: AtomicU64 = AtomicU64::new(0);

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Called by fault workers after serving faults (`at`: when): the scan pauses for [`QUIET`].
pub fn note_fault(at: Instant) {
    let since = at.saturating_duration_since(epoch());
    let ns = u64::try_from(since.as_nanos()).unwrap_or(u64::MAX).max(1);
    LAST_FAULT_NS.store(ns, Ordering::Relaxed);
}

/// How long the scan must still wait, `since_fault` after the last fault (`None`: no fault yet).
pub fn pause_left(since_fault: Option<Duration>) -> Option<Duration> {
    let since = since_fault?;
    (since < QUIET).then(|| QUIET - since)
}

fn since_last_fault() -> Option<Duration> {
    let ns = LAST_FAULT_NS.load(Ordering::Relaxed);
    (ns != 0).then(|| epoch().elapsed().saturating_sub(Duration::from_nanos(ns)))
}

/// The handle that queues files for the scan thread.
#[derive(Debug)]
pub struct ZeroScanner {
    tx: Mutex<Sender<Weak<MappedFile>>>,
}

impl ZeroScanner {
    /// Starts the scan thread.
    pub fn start() -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Weak<MappedFile>>();
        std::thread::Builder::new().name("zero-scan".into()).spawn(move || {
            crate::thread_priority::idle();
            while let Ok(file) = rx.recv() {
                scan(&file);
            }
        })?;
        Ok(Self { tx: Mutex::new(tx) })
    }

    /// Queues a file (scanned after those queued before it).
    pub fn enqueue(&self, file: Weak<MappedFile>) {
        let _ = self.tx.lock().expect("zero scan queue").send(file);
    }
}

/// Scans from the file's start, as graduation does: the scan runs on an idle CPU while a vCPU
/// and graduation use the others, and stays ahead of a graduation that started at once (it
/// classifies faster than pages are copied), so graduation finds the pages known and mapped.
fn scan(file: &Weak<MappedFile>) {
    let mut page = 0;
    let mut buf = Vec::with_capacity(usize::try_from(CHUNK_PAGES * 4096).expect("fits"));
    loop {
        // Not while faults come in: the file is not held while waiting.
        while let Some(left) = pause_left(since_last_fault()) {
            std::thread::sleep(left);
        }
        let Some(f) = file.upgrade() else { return };
        let _hold = f.scan_hold();
        if f.park_scan() {
            debug!(page, "memory file zero scan parked: no session holds the file");
            return;
        }
        let pages = f.mapped_len().div_ceil(4096);
        if page >= pages {
            debug!(pages, "memory file zero scan finished");
            return;
        }
        let end = (page + CHUNK_PAGES).min(pages);
        if let Err(e) = f.learn_zero_pages_by_pread(page, end, &mut buf) {
            warn!(error = %e, "memory file zero scan stopped");
            return;
        }
        // Map the chunk's data into the pager's page tables now, off the copy's path
        // (`MADV_POPULATE_READ` answers EFAULT, never a signal, past a truncated end).
        f.populate_data(page, end);
        page = end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scan_waits_until_faults_have_been_quiet_for_a_while() {
        assert_eq!(pause_left(None), None);
        assert_eq!(pause_left(Some(QUIET)), None);
        assert_eq!(pause_left(Some(QUIET / 4)), Some(QUIET - QUIET / 4));
        note_fault(Instant::now());
        let left = pause_left(since_last_fault()).expect("a fault just now");
        assert!(left <= QUIET);
    }
}
