//! Copy threads: graduation's second pair of hands. While a VM being graduated is quiet (no fault
//! for a few completion steps), the worker that owns its session hands spans of the sweep
//! ("claims") to these threads, so the bulk copy also runs on the CPUs the fault workers leave
//! idle. On this machine two threads fill a uffd region 1.9x as fast as one (BENCHMARKS.md).
//!
//! A claim is planned by the worker, which owns the session's page state: the runs of pages that
//! were missing and not discarded when it was made. The copy thread copies their data pages
//! (zero pages and holes are left missing, as the sweep does) and reports back what it made
//! present and what it did not reach; the worker marks the first present and sweeps the second
//! itself. What keeps a copy from landing over memory the VMM discarded is the session's
//! [`RemoveGate`].
//!
//! The threads never block a fault: the worker keeps serving every fault itself, and a copy
//! thread's `UFFDIO_COPY` that meets a page the worker filled meanwhile passes over it (`EEXIST`).

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};

use nix::sys::eventfd::EventFd;
use tracing::warn;
use uffdpager::firecracker::Region;
use userfaultfd::Uffd;

use crate::memory_file::MappedFile;
use crate::overlay::SessionOverlays;
use crate::page_copy::{PageSource, Stop, ZeroTest};
use crate::remove_gate::RemoveGate;
use crate::session_error::SessionError;

/// Bytes a copy thread copies per `UFFDIO_COPY`, holding the session's gate: the longest a
/// worker waits for the gate before it reads a fault (~35 µs at 4 GB/s).
const COPY_CALL_BYTES: u64 = 128 << 10;

/// A span of one region for a copy thread: runs of pages missing and not discarded when planned.
#[derive(Debug)]
pub struct Claim {
    /// The completion it belongs to, so a late answer never counts for a later completion.
    pub completion: u64,
    pub token: u64,
    pub region_index: usize,
    pub region: Region,
    pub runs: Vec<Range<u64>>,
    pub uffd: Arc<Uffd>,
    pub file: Arc<MappedFile>,
    /// The session's overlays: their pages are copied from there, never left as zero pages.
    pub overlays: Arc<SessionOverlays>,
    pub gate: Arc<RemoveGate>,
    /// The gate's epoch the runs were planned under.
    pub epoch: u64,
    /// Set when the completion ends: the rest of the claim is not worth copying.
    pub stop: Arc<AtomicBool>,
    pub reply: Reply,
}

/// Where a copy thread answers: the owning worker's channel, and the eventfd that wakes it.
#[derive(Debug, Clone)]
pub struct Reply {
    pub tx: Sender<ClaimDone>,
    pub wake: Arc<EventFd>,
}

/// What a copy thread did with a claim.
#[derive(Debug)]
pub struct ClaimDone {
    pub completion: u64,
    pub token: u64,
    pub region_index: usize,
    /// The epoch the claim was planned under.
    pub epoch: u64,
    /// Pages now present: copied by this thread, or found present (`EEXIST`).
    pub present: Vec<Range<u64>>,
    /// Pages not reached (stopped by a removal, an `EAGAIN`, the completion's end or an error):
    /// the worker sweeps them again.
    pub undone: Vec<Range<u64>>,
    pub populated_bytes: u64,
    pub skipped_zero_bytes: u64,
    /// A copy that failed for good: the completion fails with it.
    pub error: Option<SessionError>,
}

/// A handle on the copy threads: cheap to clone, one per worker.
#[derive(Debug, Clone)]
pub struct CopyThreads {
    tx: Sender<Claim>,
    threads: usize,
}

impl CopyThreads {
    /// Starts `threads` copy threads (none if 0: then nobody takes claims).
    pub fn spawn(threads: usize) -> std::io::Result<Option<Self>> {
        if threads == 0 {
            return Ok(None);
        }
        let (tx, rx) = mpsc::channel::<Claim>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads {
            let rx = Arc::clone(&rx);
            std::thread::Builder::new().name(format!("copy-{i}")).spawn(move || serve(&rx))?;
        }
        Ok(Some(Self { tx, threads }))
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Queues a claim; gives it back if every copy thread has stopped.
    pub fn send(&self, claim: Claim) -> Result<(), Box<Claim>> {
        self.tx.send(claim).map_err(|e| Box::new(e.0))
    }
}

/// A copy thread: takes claims until every sender is gone.
fn serve(rx: &Mutex<Receiver<Claim>>) {
    crate::thread_priority::background();
    loop {
        let claim = {
            let rx = rx.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            match rx.recv() {
                Ok(claim) => claim,
                Err(_) => return,
            }
        };
        let reply = claim.reply.clone();
        let done = copy_claim(claim);
        if reply.tx.send(done).is_ok() {
            if let Err(e) = reply.wake.write(1) {
                warn!(error = %e, "waking a fault worker after a copy failed");
            }
        }
    }
}

/// Copies a claim's data pages, in order, until done or told to stop.
fn copy_claim(claim: Claim) -> ClaimDone {
    let mut done = ClaimDone {
        completion: claim.completion,
        token: claim.token,
        region_index: claim.region_index,
        epoch: claim.epoch,
        present: Vec::new(),
        undone: Vec::new(),
        populated_bytes: 0,
        skipped_zero_bytes: 0,
        error: None,
    };
    let mut runs = claim.runs.iter().cloned();
    for run in runs.by_ref() {
        if let Err(stopped_at) = copy_run(&claim, run.clone(), &mut done) {
            done.undone.push(stopped_at..run.end);
            break;
        }
    }
    done.undone.extend(runs);
    done
}

/// Copies the data pages of one run (zero pages and holes are left missing, as the sweep does);
/// `Err(page)` if it stopped at `page`.
fn copy_run(claim: &Claim, run: Range<u64>, done: &mut ClaimDone) -> Result<(), u64> {
    let ps = claim.region.page_size;
    let source = PageSource { file: &claim.file, overlays: &claim.overlays };
    let parts =
        source.zero_parts(claim.region_index, &claim.region, run, ZeroTest::HolesAndZeroPages);
    for (part, is_zero) in parts {
        if is_zero {
            done.skipped_zero_bytes += (part.end - part.start) * ps;
            continue;
        }
        copy_data(claim, &source, part, done)?;
    }
    Ok(())
}

/// Copies pages `[first, end)` with the one copy loop ([`PageSource::copy_run`]),
/// [`COPY_CALL_BYTES`] per call, each under the gate and only while the claim still holds (its
/// completion goes on, and nothing was discarded since it was planned). `Err(page)` where it
/// stopped: a REMOVE in flight is the worker's to read (it sweeps the rest then); a page found
/// present was filled by the worker for a fault, which woke its waiter.
fn copy_data(
    claim: &Claim,
    source: &PageSource<'_>,
    pages: Range<u64>,
    done: &mut ClaimDone,
) -> Result<(), u64> {
    let r = claim.region;
    let ps = r.page_size;
    let call_pages = (COPY_CALL_BYTES / ps).max(1);
    let mut p = pages.start;
    loop {
        let enter = || {
            let held = claim.gate.lock();
            let holds = !claim.stop.load(Ordering::Acquire) && claim.gate.epoch() == claim.epoch;
            holds.then_some(held)
        };
        let copied = |c: Range<u64>| {
            done.populated_bytes += (c.end - c.start) * ps;
            mark(done, c);
        };
        let stopped = source.copy_run(
            &claim.uffd,
            claim.region_index,
            &r,
            p..pages.end,
            call_pages,
            enter,
            copied,
        );
        let (at, stop) = match stopped {
            Ok(()) => return Ok(()),
            Err(stopped) => stopped,
        };
        match stop {
            Stop::Exists => {
                mark(done, at..at + 1);
                p = at + 1;
            }
            Stop::Refused | Stop::Again => return Err(at),
            Stop::Gone(errno) => {
                done.error = Some(SessionError::Gone(errno));
                return Err(at);
            }
            Stop::NoMapping { addr, len } => {
                // Not proof that the VMM is gone: the completion fails, the session serves on.
                done.error = Some(SessionError::NoMapping { op: "UFFDIO_COPY", addr, len });
                return Err(at);
            }
            Stop::Failed { addr, len, errno } => {
                done.error = Some(SessionError::Fill { addr, len, errno });
                return Err(at);
            }
        }
    }
}

/// Adds `pages` to the present runs, merging with the last one when they touch.
fn mark(done: &mut ClaimDone, pages: Range<u64>) {
    if pages.is_empty() {
        return;
    }
    match done.present.last_mut() {
        Some(last) if last.end == pages.start => last.end = pages.end,
        _ => done.present.push(pages),
    }
}

#[cfg(test)]
// A claim of one run is a vector of one range here, not a range of pages spelled wrong.
#[allow(clippy::single_range_in_vec_init)]
// Test values are small and known: plain `as` casts.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_possible_wrap)]
mod tests {
    use std::fs::File;
    use std::io::Write;

    use memmap2::MmapMut;
    use nix::sys::eventfd::EfdFlags;

    use super::*;
    use crate::memory_file::MemoryFiles;
    use uffdpager::uffd_ops::{self, FillOutcome};

    const PAGES: u64 = 64;
    const PS: u64 = 4096;

    /// A memory file of `pages` pages of `ps` bytes whose every fourth page is zeros (the rest:
    /// page index + 1), and a registered anonymous region of the same size in this process
    /// (hugetlb for 2 MiB pages).
    struct Fixture {
        _file: tempfile::NamedTempFile,
        mapped: Arc<MappedFile>,
        uffd: Arc<Uffd>,
        dst: MmapMut,
        region: Region,
    }

    fn page_byte(p: u64) -> u8 {
        if p % 4 == 0 {
            0
        } else {
            (p + 1) as u8
        }
    }

    fn fixture(pages: u64, ps: u64) -> Fixture {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        for p in 0..pages {
            file.write_all(&vec![page_byte(p); ps as usize]).unwrap();
        }
        let mapped = MemoryFiles::default().open(File::open(file.path()).unwrap().into()).unwrap();
        let uffd = uffd_ops::firecracker_uffd(false).expect("userfaultfd");
        let mut options = memmap2::MmapOptions::new();
        options.len((pages * ps) as usize);
        if ps != PS {
            options.huge(Some(ps.trailing_zeros() as u8));
        }
        let dst = options.map_anon().expect("destination region");
        uffd.register(dst.as_ptr() as *mut _, dst.len()).unwrap();
        let region =
            Region { base: dst.as_ptr() as u64, size: pages * ps, offset: 0, page_size: ps };
        Fixture { _file: file, mapped, uffd: Arc::new(uffd), dst, region }
    }

    fn claim(f: &Fixture, gate: &Arc<RemoveGate>, runs: Vec<Range<u64>>) -> Claim {
        let (tx, _rx) = mpsc::channel();
        let wake = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK).unwrap();
        Claim {
            completion: 1,
            token: 1,
            region_index: 0,
            region: f.region,
            runs,
            uffd: Arc::clone(&f.uffd),
            file: Arc::clone(&f.mapped),
            overlays: Arc::default(),
            gate: Arc::clone(gate),
            epoch: gate.epoch(),
            stop: Arc::default(),
            reply: Reply { tx, wake: Arc::new(wake) },
        }
    }

    /// Pages of the region backed in this process (never reads a missing page: that would
    /// block on a fault nobody serves).
    fn backed(f: &Fixture) -> Vec<u64> {
        let (pages, ps) = (f.region.pages(), f.region.page_size);
        let mut backed = Vec::new();
        crate::pagemap::for_each_backed(std::process::id(), f.region.base, pages, ps, |p| {
            backed.push(p)
        })
        .unwrap();
        backed
    }

    #[test]
    fn a_claim_copies_its_data_pages_and_leaves_zero_pages_missing() {
        let f = fixture(PAGES, PS);
        let gate = Arc::new(RemoveGate::default());
        let done = copy_claim(claim(&f, &gate, vec![0..20, 40..PAGES]));
        assert!(done.error.is_none() && done.undone.is_empty(), "{done:?}");
        let data: Vec<u64> = (0..20).chain(40..PAGES).filter(|p| page_byte(*p) != 0).collect();
        assert_eq!(backed(&f), data);
        assert_eq!(done.populated_bytes, data.len() as u64 * PS);
        assert_eq!(done.skipped_zero_bytes, (44 - data.len() as u64) * PS);
        let present: Vec<u64> = done.present.iter().flat_map(|r| r.clone()).collect();
        assert_eq!(present, data);
        for p in data {
            let at = (p * PS) as usize;
            assert!(f.dst[at..at + PS as usize].iter().all(|&b| b == page_byte(p)), "page {p}");
        }
    }

    #[test]
    fn a_claim_planned_before_a_removal_copies_nothing_and_hands_its_runs_back() {
        let f = fixture(PAGES, PS);
        let gate = Arc::new(RemoveGate::default());
        let c = claim(&f, &gate, vec![1..4, 5..8]);
        {
            // As the worker does when it reads a REMOVE.
            let _held = gate.lock();
            gate.removed();
        }
        let done = copy_claim(c);
        assert!(done.error.is_none(), "{done:?}");
        assert_eq!(done.undone, vec![1..4, 5..8]);
        assert!(done.present.is_empty() && done.populated_bytes == 0, "{done:?}");
        assert_eq!(backed(&f), Vec::<u64>::new());
    }

    #[test]
    fn a_claim_of_an_ended_completion_stops() {
        let f = fixture(PAGES, PS);
        let gate = Arc::new(RemoveGate::default());
        let c = claim(&f, &gate, vec![1..4]);
        c.stop.store(true, Ordering::Release);
        let done = copy_claim(c);
        assert_eq!(done.undone, vec![1..4]);
        assert_eq!(backed(&f), Vec::<u64>::new());
    }

    #[test]
    fn a_page_the_worker_filled_meanwhile_is_passed_over() {
        let f = fixture(PAGES, PS);
        let src = vec![0xeeu8; PS as usize];
        let at = f.region.base + 2 * PS;
        assert_eq!(uffd_ops::copy(&f.uffd, &src, at, false), Ok(FillOutcome::Done));
        let gate = Arc::new(RemoveGate::default());
        let done = copy_claim(claim(&f, &gate, vec![1..4]));
        assert!(done.error.is_none() && done.undone.is_empty(), "{done:?}");
        assert_eq!(done.present, vec![1..4]);
        assert_eq!(done.populated_bytes, 2 * PS, "pages 1 and 3 were copied; 2 was present");
        assert_eq!(backed(&f), vec![1, 2, 3]);
        assert_eq!(f.dst[(2 * PS) as usize], 0xee, "the present page was left as it was");
    }

    #[test]
    fn a_claim_of_2m_pages_copies_whole_hugepages_and_leaves_zero_ones_missing() {
        const HUGE: u64 = 2 << 20;
        // The fixture maps 4 hugepages (its source is a plain file); one of slack.
        let Some(_hugepages) =
            testkit::reserve_hugepages_for_test("copy_threads::a_claim_of_2m_pages", 5)
        else {
            return;
        };
        let f = fixture(4, HUGE);
        let gate = Arc::new(RemoveGate::default());
        let done = copy_claim(claim(&f, &gate, vec![0..4]));
        assert!(done.error.is_none() && done.undone.is_empty(), "{done:?}");
        assert_eq!(backed(&f), vec![1, 2, 3], "page 0 is zeros in the file");
        assert_eq!(done.populated_bytes, 3 * HUGE);
        assert_eq!(done.skipped_zero_bytes, HUGE);
        for p in 1..4u64 {
            let (first, last) = ((p * HUGE) as usize, ((p + 1) * HUGE) as usize - 1);
            assert_eq!((f.dst[first], f.dst[last]), (page_byte(p), page_byte(p)), "page {p}");
        }
    }
}
