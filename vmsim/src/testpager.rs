//! A minimal pager for the simulator's own tests (the real one lives in `pager/`): it accepts
//! one VMM, receives Firecracker's handshake, serves MISSING faults with `UFFDIO_COPY` from the
//! memory file, zero-fills pages removed by `UFFD_EVENT_REMOVE`, and can graduate the VM
//! (populate every missing page, then `UFFDIO_UNREGISTER`).
//!
//! The kernel's contract, as used here (see `ioctl_userfaultfd(2)`):
//! - `UFFDIO_COPY` of a page already present fails with EEXIST: that page is done (wake the
//!   range in case a fault on it still sleeps).
//! - While a REMOVE event is unread, copies fail with EAGAIN: read the events, then retry.
//! - A page removed must come back as zeros, so REMOVE is applied before later faults are served.

use std::collections::{HashSet, VecDeque};
use std::ffi::c_void;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, FromRawFd, IntoRawFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use memmap2::Mmap;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::EventFd;
use userfaultfd::{Event, EventBuffer, Uffd};

use uffdpager::firecracker::{recv_handshake, Region};

/// How the test pager misbehaves, to prove the simulator catches it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) enum Fault {
    /// A correct pager.
    #[default]
    None,
    /// Reads REMOVE events but serves removed pages from the snapshot anyway.
    IgnoreRemoves,
}

/// What the pager did.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Stats {
    pub(crate) faults: u64,
    pub(crate) removes: u64,
    pub(crate) zero_served: u64,
    pub(crate) graduated: bool,
}

enum Ctl {
    Graduate(mpsc::Sender<Result<(), String>>),
}

/// The pager thread and its control channel.
pub(crate) struct TestPager {
    ctl: mpsc::Sender<Ctl>,
    wake: Arc<EventFd>,
    thread: JoinHandle<Result<Stats, String>>,
}

impl TestPager {
    /// Serves the first VMM that connects to `listener`, from `memory_file`.
    pub(crate) fn spawn(listener: UnixListener, memory_file: PathBuf, fault: Fault) -> TestPager {
        let (ctl, rx) = mpsc::channel();
        let wake = Arc::new(EventFd::new().expect("eventfd"));
        let thread_wake = wake.clone();
        let thread = std::thread::Builder::new()
            .name("test-pager".into())
            .spawn(move || serve(listener, memory_file, fault, &rx, &thread_wake))
            .expect("spawn test pager");
        TestPager { ctl, wake, thread }
    }

    /// Populates every missing page, then unregisters every region.
    pub(crate) fn graduate(&self) -> Result<(), String> {
        let (tx, rx) = mpsc::channel();
        self.ctl.send(Ctl::Graduate(tx)).map_err(|_| "pager gone".to_string())?;
        self.wake.write(1).map_err(|e| e.to_string())?;
        rx.recv().map_err(|_| "pager gone".to_string())?
    }

    /// Waits for the pager to end (it ends at the VMM's EOF).
    pub(crate) fn join(self) -> Result<Stats, String> {
        self.thread.join().map_err(|_| "test pager panicked".to_string())?
    }
}

/// What became of one copy.
enum Copied {
    Done,
    /// A REMOVE event is unread: read events, then retry.
    Again,
}

struct Server {
    uffd: Uffd,
    regions: Vec<Region>,
    image: Mmap,
    zeros: Vec<u8>,
    removed: HashSet<u64>,
    pending: VecDeque<u64>,
    events: EventBuffer,
    fault: Fault,
    stats: Stats,
}

impl Server {
    fn region_of(&self, addr: u64) -> Result<Region, String> {
        self.regions
            .iter()
            .find(|r| r.base <= addr && addr < r.end())
            .copied()
            .ok_or_else(|| format!("fault at {addr:#x} outside every region"))
    }

    /// Reads every queued event: faults are queued, removals recorded.
    fn read_events(&mut self) -> Result<(), String> {
        loop {
            let mut got = Vec::new();
            for event in self.uffd.read_events(&mut self.events).map_err(|e| e.to_string())? {
                got.push(event.map_err(|e| e.to_string())?);
            }
            if got.is_empty() {
                return Ok(());
            }
            for event in got {
                match event {
                    Event::Pagefault { addr, .. } => {
                        self.stats.faults += 1;
                        self.pending.push_back(addr as u64);
                    }
                    Event::Remove { start, end } => {
                        self.stats.removes += 1;
                        let (start, end) = (start as u64, end as u64);
                        let r = self.region_of(start)?;
                        let mut page = start & !(r.page_size - 1);
                        while page < end {
                            self.removed.insert(page);
                            page += r.page_size;
                        }
                    }
                    other => return Err(format!("unexpected event {other:?}")),
                }
            }
        }
    }

    /// Copies the content page `page` must get: zeros if removed, else the snapshot's bytes.
    fn copy_page(&mut self, page: u64) -> Result<Copied, String> {
        let r = self.region_of(page)?;
        let ps = usize::try_from(r.page_size).map_err(|e| e.to_string())?;
        let zero = self.removed.contains(&page) && self.fault != Fault::IgnoreRemoves;
        let src = if zero {
            self.stats.zero_served += 1;
            &self.zeros[..ps]
        } else {
            let at = usize::try_from(r.offset + (page - r.base)).map_err(|e| e.to_string())?;
            self.image.get(at..at + ps).ok_or("region past the file")?
        };
        // SAFETY: `page` is a page-aligned address inside a region the VMM registered with this
        // uffd (the handshake was validated), `src` is `ps` readable bytes of our own memory
        // (the file mapping or the zero buffer), and the kernel copies into the VMM's memory
        // only where no page is present yet.
        match unsafe { self.uffd.copy(src.as_ptr().cast(), page as *mut c_void, ps, true) } {
            Ok(n) if n == ps => Ok(Copied::Done),
            Ok(n) => Err(format!("short copy of {n} bytes at {page:#x}")),
            Err(userfaultfd::Error::CopyFailed(e)) if e as i32 == libc::EEXIST => {
                self.uffd.wake(page as *mut c_void, ps).map_err(|e| e.to_string())?;
                Ok(Copied::Done)
            }
            // EAGAIN, whatever the count the crate reports.
            Err(userfaultfd::Error::PartiallyCopied(_)) => Ok(Copied::Again),
            Err(e) => Err(format!("UFFDIO_COPY at {page:#x}: {e}")),
        }
    }

    /// Serves queued faults until done or until a REMOVE must be read first.
    fn serve_pending(&mut self) -> Result<(), String> {
        while let Some(&addr) = self.pending.front() {
            let r = self.region_of(addr)?;
            match self.copy_page(addr & !(r.page_size - 1))? {
                Copied::Done => {
                    self.pending.pop_front();
                }
                Copied::Again => return Ok(()),
            }
        }
        Ok(())
    }

    /// Populates every page neither present nor removed, serving faults between pages, then
    /// unregisters (only after the full populate: an early unregister would zero-fill pages
    /// still missing).
    fn graduate(&mut self) -> Result<(), String> {
        for r in self.regions.clone() {
            let mut page = r.base;
            while page < r.end() {
                if !self.removed.contains(&page) {
                    while let Copied::Again = self.copy_page(page)? {
                        self.read_events()?;
                        self.serve_pending()?;
                    }
                }
                page += r.page_size;
                self.read_events()?;
                self.serve_pending()?;
            }
        }
        for r in &self.regions {
            self.uffd
                .unregister(r.base as *mut c_void, r.size as usize)
                .map_err(|e| e.to_string())?;
        }
        self.stats.graduated = true;
        Ok(())
    }
}

fn serve(
    listener: UnixListener,
    memory_file: PathBuf,
    fault: Fault,
    ctl: &mpsc::Receiver<Ctl>,
    wake: &EventFd,
) -> Result<Stats, String> {
    let (mut stream, _) = listener.accept().map_err(|e| e.to_string())?;
    let file = File::open(&memory_file).map_err(|e| e.to_string())?;
    let len = file.metadata().map_err(|e| e.to_string())?.len();
    let hs = recv_handshake(stream.as_fd(), len).map_err(|e| e.to_string())?;
    // SAFETY: `into_raw_fd` gives up the `OwnedFd`'s ownership, which the `Uffd` takes over; the
    // fd is a userfaultfd (checked by `recv_handshake`).
    let uffd = unsafe { Uffd::from_raw_fd(hs.uffd.into_raw_fd()) };
    // SAFETY: the test's memory file is not modified while the test runs.
    let image = unsafe { Mmap::map(&file) }.map_err(|e| e.to_string())?;
    let mut server = Server {
        uffd,
        regions: hs.regions,
        image,
        zeros: vec![0; uffdpager::firecracker::PAGE_2M as usize],
        removed: HashSet::new(),
        pending: VecDeque::new(),
        events: EventBuffer::new(64),
        fault,
        stats: Stats::default(),
    };
    loop {
        let (uffd_ready, vmm_ready, wake_ready) = {
            let mut fds = [
                PollFd::new(server.uffd.as_fd(), PollFlags::POLLIN),
                PollFd::new(stream.as_fd(), PollFlags::POLLIN),
                PollFd::new(wake.as_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, PollTimeout::NONE) {
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(format!("poll: {e}")),
                Ok(_) => {}
            }
            let ready = |fd: &PollFd<'_>| fd.revents().is_some_and(|r| !r.is_empty());
            (ready(&fds[0]), ready(&fds[1]), ready(&fds[2]))
        };
        if uffd_ready {
            server.read_events()?;
            server.serve_pending()?;
        }
        if wake_ready {
            wake.read().map_err(|e| e.to_string())?;
            while let Ok(Ctl::Graduate(reply)) = ctl.try_recv() {
                let _ = reply.send(server.graduate());
            }
        }
        if vmm_ready {
            let mut byte = [0u8; 1];
            if matches!(stream.read(&mut byte), Ok(0) | Err(_)) {
                return Ok(server.stats);
            }
        }
    }
}
