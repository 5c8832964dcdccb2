//! The fill loop and REMOVE handling on a real userfaultfd over memory of this process: a
//! thread of the test faults as a vCPU would, another discards memory as a balloon would (its
//! `madvise` waits until the pager reads the REMOVE), and the test thread is the worker.

use std::fs::File;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use memmap2::MmapMut;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use uffdpager::firecracker::Region;
use uffdpager::handoff::VmmFd;
use uffdpager::uffd_ops;

use super::*;
use crate::memory_file::MemoryFiles;
use crate::registry::SessionShared;

const PS: u64 = 4096;
const PAGES: u64 = 64;
/// Long enough for any healthy step here; a thread still blocked then is frozen.
const FROZEN: Duration = Duration::from_secs(10);

/// The snapshot's byte for page `p` (never zero, so a zero-filled page is told apart).
fn snapshot_byte(p: u64) -> u8 {
    u8::try_from(p % 200).expect("below 200") + 1
}

struct Fixture {
    _file: Arc<tempfile::NamedTempFile>,
    /// The registered destination: this process's stand-in for guest memory. Declared after
    /// the session in `Served` so the session (and its uffd) goes first.
    dst: MmapMut,
    region: Region,
}

struct Served {
    session: Session,
    /// The VMM's end of its stream: held open, so the session sees its VMM alive.
    _vmm: UnixStream,
    f: Fixture,
}

/// A memory file of `pages` pages, page `p` filled with `snapshot_byte(p)`.
fn memory_file(pages: u64) -> Arc<tempfile::NamedTempFile> {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    for p in 0..pages {
        file.write_all(&vec![snapshot_byte(p); PS as usize]).unwrap();
    }
    Arc::new(file)
}

fn served() -> Served {
    served_from(memory_file(PAGES), PAGES)
}

/// A session serving a fresh registered region of `pages` pages from `file`.
fn served_from(file: Arc<tempfile::NamedTempFile>, pages: u64) -> Served {
    let mapped = MemoryFiles::default().open(File::open(file.path()).unwrap().into()).unwrap();
    let uffd = uffd_ops::firecracker_uffd(false).expect("userfaultfd");
    let dst = memmap2::MmapOptions::new()
        .len(usize::try_from(pages * PS).unwrap())
        .map_anon()
        .expect("destination region");
    uffd.register(dst.as_ptr() as *mut _, dst.len()).expect("register");
    let region = Region { base: dst.as_ptr() as u64, size: pages * PS, offset: 0, page_size: PS };
    let shared = Arc::new(SessionShared::new(
        "unit".into(),
        file.path().display().to_string(),
        vec![region],
        std::process::id(),
        0,
        "test".into(),
    ));
    let (ours, vmm) = UnixStream::pair().unwrap();
    let zero = Arc::new(ZeroSource::new(usize::try_from(PS).unwrap()).unwrap());
    let session = Session::new(
        shared,
        uffd,
        (OwnedFd::from(ours), VmmFd::Stream),
        mapped,
        &[],
        None,
        zero,
        0,
    );
    Served { session, _vmm: vmm, f: Fixture { _file: file, dst, region } }
}

impl Served {
    fn addr(&self, page: u64) -> u64 {
        self.f.region.base + page * PS
    }

    /// A "vCPU": reads the first byte of each page in turn, and sends what it read.
    fn reader(&self, pages: Vec<u64>) -> mpsc::Receiver<Vec<u8>> {
        let addrs: Vec<u64> = pages.iter().map(|&p| self.addr(p)).collect();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let bytes = addrs
                .into_iter()
                // SAFETY: each address is inside the fixture's mapping, which outlives this
                // thread's reads (the test waits for them, or drops the uffd first: then the
                // kernel serves the fault itself).
                .map(|a| unsafe { std::ptr::read_volatile(a as *const u8) })
                .collect();
            let _ = tx.send(bytes);
        });
        rx
    }

    /// A "balloon": discards `pages` pages from `first` (the call returns once the REMOVE is
    /// read); waits until the REMOVE is raised.
    fn discard(&self, first: u64, pages: u64) -> JoinHandle<()> {
        let (addr, len) = (self.addr(first), usize::try_from(pages * PS).unwrap());
        let discarding = std::thread::spawn(move || {
            // SAFETY: the range is inside the fixture's anonymous mapping, alive until the join.
            let r = unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_DONTNEED) };
            assert_eq!(r, 0, "madvise: {}", std::io::Error::last_os_error());
        });
        let raised = Instant::now();
        while uffd_ops::events_in_flight(&self.session.uffd) != Ok(true) {
            assert!(raised.elapsed() < FROZEN, "the REMOVE was never raised");
            std::thread::yield_now();
        }
        discarding
    }

    /// Waits until the uffd is readable, then reads its events into the session.
    fn read_events(&mut self) {
        let mut fds = [PollFd::new(self.session.uffd.as_fd(), PollFlags::POLLIN)];
        let n = poll(&mut fds, PollTimeout::from(10_000u16)).expect("poll");
        assert_eq!(n, 1, "no event within 10 s");
        self.session.drain_events().expect("drain");
    }

    fn pending_pages(&self) -> Vec<u64> {
        self.session.pending.iter().map(|&(a, _)| (a - self.f.region.base) / PS).collect()
    }
}

fn join_within(t: JoinHandle<()>, what: &str) {
    let started = Instant::now();
    while !t.is_finished() {
        assert!(started.elapsed() < FROZEN, "{what}: still blocked after {FROZEN:?} (frozen)");
        std::thread::sleep(Duration::from_millis(5));
    }
    t.join().expect(what);
}

#[test]
fn a_random_fault_gets_the_snapshot_page_and_the_next_page_a_block() {
    let mut t = served();
    let read = t.reader(vec![10, 11]);
    t.read_events();
    assert_eq!(t.pending_pages(), [10]);
    t.session.serve_pending().unwrap();
    t.read_events();
    assert_eq!(t.pending_pages(), [11]);
    t.session.serve_pending().unwrap();
    assert_eq!(read.recv_timeout(FROZEN).expect("the reader is served"), [11, 12]);
    // The second fault was sequential: a block from it was copied, not one page.
    let present = t.session.regions[0].present_pages();
    assert!(present > 2, "{present} pages present");
    assert_eq!(t.f.dst[usize::try_from(12 * PS).unwrap()], snapshot_byte(12));
}

/// Fault-around: the faulting page is served alone (its vCPU is woken), and the rest of its
/// aligned block follows only when the worker asks for it (`fill_around`, under contention);
/// `skip_around` leaves the neighbours to fault.
#[test]
fn a_random_fault_serves_its_page_then_fills_its_block_only_when_asked() {
    let mut t = served();
    t.session = t.session.with_fault_around(16);
    let read = t.reader(vec![21]);
    t.read_events();
    t.session.serve_pending().unwrap();
    assert_eq!(read.recv_timeout(FROZEN).expect("the reader is served"), [snapshot_byte(21)]);
    assert_eq!(t.session.regions[0].present_pages(), 1, "the page alone before fill_around");
    assert!(t.session.has_around());
    t.session.fill_around().unwrap();
    assert!(!t.session.has_around());
    // The aligned block 16..32, every page with its snapshot bytes, nothing outside it.
    for p in 0..PAGES {
        assert_eq!(t.session.regions[0].present().get(p), (16..32).contains(&p), "page {p}");
    }
    for p in 16..32 {
        assert_eq!(t.f.dst[usize::try_from(p * PS).unwrap()], snapshot_byte(p), "page {p}");
    }
    // A fault far away whose block is skipped: its page alone is added.
    let read = t.reader(vec![50]);
    t.read_events();
    t.session.serve_pending().unwrap();
    read.recv_timeout(FROZEN).expect("the reader is served");
    t.session.skip_around();
    t.session.fill_around().unwrap();
    assert_eq!(t.session.regions[0].present_pages(), 17, "page 50 alone was added");
}

/// Fault-around never writes a discarded range: a page the balloon discarded in the block stays
/// missing (it faults back as zeros), the rest of the block is filled.
#[test]
fn fault_around_passes_over_discarded_pages() {
    let mut t = served();
    t.session = t.session.with_fault_around(16);
    let balloon = t.discard(36, 2);
    t.read_events();
    join_within(balloon, "the balloon's madvise");
    assert!(t.session.regions[0].removed.contains(36));
    let read = t.reader(vec![40]);
    t.read_events();
    t.session.serve_pending().unwrap();
    read.recv_timeout(FROZEN).expect("the reader is served");
    t.session.fill_around().unwrap();
    for p in 32..48 {
        let discarded = p == 36 || p == 37;
        assert_eq!(t.session.regions[0].present().get(p), !discarded, "page {p}");
    }
    let read = t.reader(vec![36, 35]);
    t.read_events();
    t.session.serve_pending().unwrap();
    assert_eq!(read.recv_timeout(FROZEN).expect("served"), [0, snapshot_byte(35)]);
}

/// The freeze issue 12 item 2 found: a sequential fault's block is filled with `Populate`
/// (discarded pages skipped), and a REMOVE of the faulting page read while the block is copied
/// (the copy says EAGAIN) left its thread waiting for ever. It must read zeros.
#[test]
fn a_faulting_page_discarded_while_its_block_is_copied_reads_zeros() {
    let mut t = served();
    let read = t.reader(vec![20, 21]);
    t.read_events();
    t.session.serve_pending().unwrap();
    t.read_events();
    assert_eq!(t.pending_pages(), [21], "the vCPU waits on page 21");
    // The balloon discards page 21 now: the REMOVE is raised (mmap_changing) and unread.
    let balloon = t.discard(21, 1);
    t.session.serve_pending().unwrap();
    let bytes = read.recv_timeout(FROZEN).expect("the vCPU waiting on page 21 is woken");
    assert_eq!(bytes, [snapshot_byte(20), 0], "a discarded page reads zeros");
    join_within(balloon, "the balloon's madvise");
    assert!(t.session.regions[0].removed.contains(21) || t.session.regions[0].present().get(21));
}

/// A REMOVE raised before the unregister is read by `settle_events`, so the VMM's `madvise`
/// returns; faults read after the unregister are not filled (the unregister woke them).
#[test]
fn settling_after_the_unregister_reads_every_remove_raised_before_it() {
    let mut t = served();
    let balloon = t.discard(5, 4);
    t.session.unregister_all().unwrap();
    assert_eq!(uffd_ops::events_in_flight(&t.session.uffd), Ok(true), "the REMOVE is unread");
    t.session.settle_events().unwrap();
    assert_eq!(uffd_ops::events_in_flight(&t.session.uffd), Ok(false));
    join_within(balloon, "the balloon's madvise");
    // Unregistered memory is the kernel's: a read gets a zero page, with no pager involved.
    let read = t.reader(vec![30]);
    assert_eq!(read.recv_timeout(FROZEN).expect("no fault to serve"), [0]);
}

/// The threads of this process blocked in `handle_userfault` among `tids`.
fn blocked_in_userfault(tids: &[i32]) -> Vec<i32> {
    tids.iter()
        .copied()
        .filter(|tid| {
            std::fs::read_to_string(format!("/proc/self/task/{tid}/wchan"))
                .is_ok_and(|w| w.contains("handle_userfault"))
        })
        .collect()
}

/// The kernel wakes an unregistered range's faults before it clears the registration, so a
/// fault taken under the per-VMA lock in between would wait for ever without the wake that
/// follows each unregister. Four "vCPUs" fault on random pages while the test thread serves
/// them and unregisters; none may be left blocked (without the extra wake, about one round in
/// twenty leaves one).
#[test]
fn no_faulting_thread_is_left_blocked_by_an_unregister_that_races_it() {
    use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
    const ROUNDS: usize = 300;
    // Enough pages that faults keep coming for the whole round (each page faults once).
    const MANY: u64 = 8192;
    let file = memory_file(MANY);
    for round in 0..ROUNDS {
        let mut t = served_from(Arc::clone(&file), MANY);
        let stop = Arc::new(AtomicBool::new(false));
        let tids: Arc<[AtomicI32; 4]> = Arc::new(Default::default());
        let base = t.f.region.base;
        let vcpus: Vec<JoinHandle<()>> = (0..4u64)
            .map(|i| {
                let (stop, tids) = (Arc::clone(&stop), Arc::clone(&tids));
                std::thread::spawn(move || {
                    tids[usize::try_from(i).unwrap()]
                        .store(nix::unistd::gettid().as_raw(), Ordering::Release);
                    let mut x = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
                    while !stop.load(Ordering::Relaxed) {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let addr = base + (x % MANY) * PS;
                        // SAFETY: inside the fixture's mapping, which outlives this thread (the
                        // test joins it before the fixture drops).
                        let _ = unsafe { std::ptr::read_volatile(addr as *const u8) };
                    }
                })
            })
            .collect();
        // Serve for a moment, then unregister while faults are still coming.
        let started = Instant::now();
        while started.elapsed() < Duration::from_millis(2) {
            let mut fds = [PollFd::new(t.session.uffd.as_fd(), PollFlags::POLLIN)];
            if poll(&mut fds, PollTimeout::from(1u16)).unwrap_or(0) > 0 {
                t.session.on_readable().expect("serve");
            }
        }
        t.session.unregister_all().expect("unregister");
        let ids: Vec<i32> = tids.iter().map(|t| t.load(Ordering::Acquire)).collect();
        std::thread::sleep(Duration::from_millis(20));
        let blocked = blocked_in_userfault(&ids);
        stop.store(true, Ordering::Relaxed);
        // Dropping the session closes the only uffd: the kernel then releases any waiter, so a
        // failing round still joins its threads.
        drop(t.session);
        for v in vcpus {
            v.join().unwrap();
        }
        assert!(blocked.is_empty(), "round {round}: threads {blocked:?} left in handle_userfault");
    }
}

/// REMOVE handling: a page the balloon discarded after it was served faults back in as zeros,
/// never as the snapshot's bytes (the guest freed it; its old contents are gone).
#[test]
fn a_page_discarded_after_it_was_served_faults_back_in_as_zeros() {
    let mut t = served();
    let read = t.reader(vec![40]);
    t.read_events();
    t.session.serve_pending().unwrap();
    assert_eq!(read.recv_timeout(FROZEN).expect("served"), [snapshot_byte(40)]);
    let balloon = t.discard(40, 1);
    t.read_events();
    join_within(balloon, "the balloon's madvise");
    assert!(t.session.regions[0].removed.contains(40));
    let again = t.reader(vec![40, 41]);
    t.read_events();
    assert_eq!(t.pending_pages(), [40], "the discarded page faults again");
    t.session.serve_pending().unwrap();
    t.read_events();
    t.session.serve_pending().unwrap();
    assert_eq!(again.recv_timeout(FROZEN).expect("served"), [0, snapshot_byte(41)]);
}

/// The fill loop meeting an unread REMOVE: the copy answers EAGAIN, the loop reads the event
/// (the balloon's `madvise` returns), re-plans from the page state, and never writes the
/// discarded range in `Populate` mode; every other page gets the snapshot's bytes.
#[test]
fn a_populate_that_meets_an_unread_remove_reads_it_and_skips_the_discarded_pages() {
    let mut t = served();
    let balloon = t.discard(30, 4);
    let filled = t.session.fill(0, 0, PAGES, FillMode::Populate).unwrap();
    join_within(balloon, "the balloon's madvise");
    assert_eq!(filled, PAGES - 4);
    let r = &t.session.regions[0];
    for p in 0..PAGES {
        let discarded = (30..34).contains(&p);
        assert_eq!(r.present().get(p), !discarded, "page {p}");
        assert_eq!(r.removed.contains(p), discarded, "page {p}");
        if !discarded {
            assert_eq!(t.f.dst[usize::try_from(p * PS).unwrap()], snapshot_byte(p), "page {p}");
        }
    }
    // Once unregistered, the discarded pages are the kernel's zero pages.
    t.session.unregister_all().unwrap();
    t.session.settle_events().unwrap();
    assert_eq!(t.reader(vec![31, 29]).recv_timeout(FROZEN).unwrap(), [0, snapshot_byte(29)]);
}

/// The sweep's populate runs on the fill loop: a whole-VM sweep leaves nothing missing but
/// discarded pages, and counts what it copied.
#[test]
fn a_sweep_populates_every_page_but_the_discarded_ones() {
    use crate::page_copy::ZeroTest;
    use crate::sweep::Sweep;
    let mut t = served();
    let balloon = t.discard(3, 2);
    t.read_events();
    join_within(balloon, "the balloon's madvise");
    let mut sweep = Sweep::all_regions(ZeroTest::HolesAndZeroPages);
    let mut steps = 0;
    while !t.session.sweep_step(&mut sweep, 16 * PS).unwrap() {
        steps += 1;
        assert!(steps < 100, "the sweep never ends");
    }
    assert!(steps >= 3, "a budget of 16 pages takes several steps ({steps})");
    assert_eq!(sweep.counts().populated_bytes, (PAGES - 2) * PS);
    assert_eq!(t.session.regions[0].present_pages(), PAGES - 2);
    assert!(!t.session.regions[0].present().get(3) && !t.session.regions[0].present().get(4));
}
