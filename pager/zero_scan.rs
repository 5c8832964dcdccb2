//! The background zero scan: one thread per pager, at idle CPU and I/O priority, that learns
//! which data pages of each newly opened memory file hold only zeros, and maps its data pages
//! into the pager's page tables, so that a later graduation finds the answer in the file's zero
//! map instead of reading every page first, and copies from a mapping that is already there.
//!
//! It reads with `pread`, not through the mapping, so a memory file truncated under it fails
//! the scan of that file instead of raising SIGBUS in the pager.
//!
//! It runs only when a CPU would otherwise idle (`SCHED_IDLE`) and its reads wait behind every
//! other I/O (`IOPRIO_CLASS_IDLE`): it never takes time from a vCPU or from fault serving. A file
//! is scanned in chunks, holding the file only for the chunk, so a file whose sessions all end
//! is released mid-scan.

use std::sync::mpsc::{self, Sender};
use std::sync::{Mutex, Weak};

use tracing::{debug, warn};

use crate::memory_file::MappedFile;

/// Pages classified per chunk (2 MiB).
const CHUNK_PAGES: u64 = 512;

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
    while let Some(f) = file.upgrade() {
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
