//! One session's fault serving: its uffd, the page state of each region, and the steps the
//! worker's event loop calls (drain events, serve faults, fill pages).
//!
//! The kernel's rules applied here (see `uffdpager::uffd_ops` and `userfaultfd(2)`):
//! * `UFFD_EVENT_REMOVE` (balloon `MADV_DONTNEED`) is applied before any fault queued with it is
//!   served: a removed page that faults again is zero-filled, never given snapshot data.
//! * While a REMOVE is unread, fills fail with `EAGAIN`: read the events, then retry from the
//!   bytes done, re-planning from the page state (the retried range may have been removed).
//! * `EEXIST`: the page is present already; wake its waiters, since our call woke nobody.

use std::collections::VecDeque;
use std::ops::Range;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use tracing::{debug, warn};
use uffdpager::removed_log::RemovedLog;
use uffdpager::uffd_ops::{self, FillOutcome};
use userfaultfd::{Event, EventBuffer, FaultKind, Uffd};

use crate::memory_file::MappedFile;
use crate::metrics::{self, METRICS};
use crate::overlay::SessionOverlays;
use crate::read_ahead::{Plan, ReadAhead};
pub use crate::region_pages::{RegionPages, ZeroSource};
use crate::registry::SessionShared;
use crate::remove_gate::RemoveGate;
use crate::sweep::{Sweep, ZeroTest};

/// Read-ahead in progress: a sweep over the window, and the size of its next chunk.
#[derive(Debug)]
struct Stream {
    sweep: Sweep,
    chunk: u64,
}

/// How long fills may keep answering `EAGAIN` with no event to read before the session is failed.
/// (A REMOVE's `mmap_changing` window lasts until the VMM's madvise thread runs again: normally
/// microseconds.)
const EAGAIN_GIVE_UP: Duration = Duration::from_secs(10);

/// Events read per `read()` of the uffd.
const EVENT_BATCH: usize = 64;

/// Read-ahead chunks: the first after a sequential fault is small (the vCPU may reach it while
/// it is copied, and waits for the whole ioctl), later ones double up to 1 MiB.
const FIRST_STREAM_CHUNK: u64 = 64 << 10;
const MAX_STREAM_CHUNK: u64 = 1 << 20;

/// Why a session cannot go on being served.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("the VMM's memory is gone ({0}): the VMM exited or unmapped its guest memory")]
    Gone(Errno),
    #[error("UFFDIO_COPY of {len} bytes at {addr:#x} failed: {errno}")]
    Fill { addr: u64, len: u64, errno: Errno },
    #[error("reading userfaultfd events failed: {0}")]
    ReadEvents(String),
    #[error("the kernel answered EAGAIN for {0:?} with no event to read")]
    Stuck(Duration),
    #[error("UFFDIO_UNREGISTER of {len} bytes at {addr:#x} failed: {errno}")]
    Unregister { addr: u64, len: u64, errno: Errno },
    #[error("memory file {file}: {error}")]
    StatFile { file: String, error: String },
    #[error("memory file {file} is {len} bytes now, shorter than the {need} bytes the regions need (truncated?)")]
    Truncated { file: String, len: u64, need: u64 },
}

/// How a fill treats pages the VMM discarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FillMode {
    /// A fault: removed pages are zero-filled (the guest must read zeros there).
    OnFault,
    /// A populate: removed pages are left alone (after unregister the kernel zero-fills them).
    Populate,
}

/// One served session, owned by one worker thread.
pub struct Session {
    pub shared: Arc<SessionShared>,
    pub uffd: Arc<Uffd>,
    /// Orders this worker's event reads with copy threads' copies (see `crate::remove_gate`).
    pub gate: Arc<RemoveGate>,
    pub vmm_stream: OwnedFd,
    pub file: Arc<MappedFile>,
    /// Pages this session reads from its overlays instead of the memory file.
    pub overlays: Arc<SessionOverlays>,
    pub regions: Vec<RegionPages>,
    /// Faults read and not yet served, with when they were read (for the latency histogram).
    pending: VecDeque<(u64, Instant)>,
    events: EventBuffer,
    /// Whether faults come in order, and the background read-ahead it started.
    read_ahead: ReadAhead,
    stream: Option<Stream>,
    faults: u64,
    /// Faults served from an overlay.
    overlay_faults: u64,
    unexpected_events: u64,
    zero: Arc<ZeroSource>,
    /// Where discarded ranges are recorded outside this process (see `uffdpager::removed_log`).
    removed_log: Option<RemovedLog>,
    /// Working sets (see `crate::working_set`): the recording in progress, the prefetch in
    /// progress, and the thread saving a finished recording.
    pub recorder: Option<crate::working_set::Recorder>,
    pub prefetch: Option<crate::working_set::Prefetch>,
    pub saving: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.shared.id)
            .field("regions", &self.regions.len())
            .field("pending", &self.pending.len())
            .field("faults", &self.faults)
            .finish_non_exhaustive()
    }
}

impl Session {
    pub fn new(
        shared: Arc<SessionShared>,
        uffd: Uffd,
        vmm_stream: OwnedFd,
        file: Arc<MappedFile>,
        removed: &[(u64, u64)],
        removed_log: Option<RemovedLog>,
        zero: Arc<ZeroSource>,
    ) -> Self {
        let regions = shared.regions.iter().copied().map(RegionPages::new).collect();
        let mut s = Self {
            shared,
            uffd: Arc::new(uffd),
            gate: Arc::default(),
            vmm_stream,
            file,
            overlays: Arc::default(),
            regions,
            pending: VecDeque::new(),
            events: EventBuffer::new(EVENT_BATCH),
            read_ahead: ReadAhead::default(),
            stream: None,
            faults: 0,
            overlay_faults: 0,
            unexpected_events: 0,
            zero,
            removed_log: None,
            recorder: None,
            prefetch: None,
            saving: None,
        };
        // Ranges discarded while an earlier pager served the session stay discarded.
        let logged = removed_log.as_ref().map(RemovedLog::ranges).unwrap_or_default();
        for &(start, end) in removed.iter().chain(&logged) {
            s.apply_remove(start, end);
        }
        s.removed_log = removed_log;
        s.publish();
        s
    }

    /// Gives the session its overlays (pages served from them instead of the memory file), before
    /// it serves anything.
    pub fn with_overlays(mut self, overlays: SessionOverlays) -> Self {
        let (count, bytes) = overlays.figures();
        self.shared.set_overlays(count, bytes);
        self.overlays = Arc::new(overlays);
        self
    }

    pub fn id(&self) -> &str {
        &self.shared.id
    }

    /// Bytes present in guest memory.
    pub fn resident_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.present_pages() * r.region.page_size).sum()
    }

    /// Publishes the figures that gRPC reads.
    pub fn publish(&self) {
        let removed = self.regions.iter().map(|r| r.removed_missing() * r.region.page_size).sum();
        self.shared.set_figures(self.resident_bytes(), removed, self.faults, self.overlay_faults);
    }

    /// Reads every queued event: REMOVEs are applied at once, faults queued. Returns the count.
    pub fn drain_events(&mut self) -> Result<usize, SessionError> {
        let gate = Arc::clone(&self.gate);
        let _held = gate.lock();
        let mut total = 0;
        loop {
            let batch: Vec<userfaultfd::Result<Event>> = self
                .uffd
                .read_events(&mut self.events)
                .map_err(|e| SessionError::ReadEvents(e.to_string()))?
                .collect();
            let n = batch.len();
            total += n;
            let read_at = Instant::now();
            for event in batch {
                self.apply_event(event, read_at);
            }
            // A short batch means the queue is empty: skip the read that would say EAGAIN.
            if n < EVENT_BATCH {
                return Ok(total);
            }
        }
    }

    fn apply_event(&mut self, event: userfaultfd::Result<Event>, read_at: Instant) {
        match event {
            Ok(Event::Pagefault { kind: FaultKind::Missing, addr, .. }) => {
                self.pending.push_back((addr as u64, read_at));
            }
            // The VMM discarded (balloon) or unmapped guest memory: record it outside this process
            // first, then apply it, before any fault queued with it is served.
            Ok(Event::Remove { start, end } | Event::Unmap { start, end }) => {
                self.gate.removed();
                metrics::add(&METRICS.remove_events, 1);
                metrics::add(&METRICS.remove_bytes, (end as u64).saturating_sub(start as u64));
                self.log_remove(start as u64, end as u64);
                self.apply_remove(start as u64, end as u64);
            }
            Ok(other) => {
                // Fork/remap and write-protect or minor faults are features Firecracker never
                // enables; count them and say so, never drop them silently.
                self.unexpected_events += 1;
                warn!(session = %self.shared.id, event = ?other, "unexpected userfaultfd event");
            }
            Err(e) => {
                self.unexpected_events += 1;
                warn!(session = %self.shared.id, error = %e, "unreadable userfaultfd event");
            }
        }
    }

    fn log_remove(&mut self, start: u64, end: u64) {
        if let Some(log) = &mut self.removed_log {
            if let Err(e) = log.append(start, end) {
                self.unexpected_events += 1;
                warn!(session = %self.shared.id, error = %e, "recording a removed range failed");
            }
        }
    }

    fn apply_remove(&mut self, start: u64, end: u64) {
        for r in &mut self.regions {
            let (base, rend, ps) = (r.region.base, r.region.end(), r.region.page_size);
            let (s, e) = (start.max(base), end.min(rend));
            if s >= e {
                continue;
            }
            let first = (s - base) / ps;
            let last = (e - base).div_ceil(ps);
            r.remove(first, last);
            debug!(session = %self.shared.id, start = s, end = e, "range removed");
        }
    }

    /// Region index and page index of a guest address.
    pub fn locate(&self, addr: u64) -> Option<(usize, u64)> {
        let i = self.regions.partition_point(|r| r.region.base <= addr).checked_sub(1)?;
        let r = &self.regions[i].region;
        (addr < r.end()).then(|| (i, (addr - r.base) / r.page_size))
    }

    /// Serves every queued fault.
    pub fn serve_pending(&mut self) -> Result<(), SessionError> {
        while let Some((addr, read_at)) = self.pending.pop_front() {
            self.faults += 1;
            let bytes = self.serve_fault(addr)?;
            METRICS.fault_latency.observe(read_at.elapsed());
            metrics::add(&METRICS.faults, 1);
            metrics::add(&METRICS.fault_bytes, bytes);
        }
        Ok(())
    }

    /// Serves one fault: returns the bytes it made present.
    fn serve_fault(&mut self, addr: u64) -> Result<u64, SessionError> {
        let Some((ri, page)) = self.locate(addr) else {
            self.unexpected_events += 1;
            warn!(session = %self.shared.id, addr, "fault outside every region");
            return Ok(0);
        };
        let r = &self.regions[ri];
        let ps = r.region.page_size;
        if r.present().get(page) {
            // Already served (two vCPUs faulted on one page, or a block covered it).
            self.wake(r.region.base + page * ps, ps)?;
            return Ok(0);
        }
        if r.removed.contains(page) {
            // A discarded page faults back in as zeros, one page: never a block (an overlay
            // page too: the VMM discarded it).
            return Ok(self.fill(ri, page, page + 1, FillMode::OnFault)? * ps);
        }
        if self.overlays.at(ri, page, ps).is_some() {
            self.overlay_faults += 1;
        }
        let region_pages = r.region.pages();
        let plan = if ps == uffdpager::firecracker::PAGE_4K {
            self.read_ahead.on_fault(ri, page, region_pages)
        } else {
            Plan::OnePage
        };
        match plan {
            Plan::OnePage => {
                self.record_touch(ri, page, page + 1);
                Ok(self.fill(ri, page, page + 1, FillMode::OnFault)? * ps)
            }
            Plan::Sequential { now, stream } => {
                self.record_touch(ri, now.start, now.end);
                // `Populate` past the faulting page: present and discarded pages are
                // skipped (a discarded range is never given snapshot data).
                let filled = self.fill(ri, now.start, now.end, FillMode::Populate)?;
                if !stream.is_empty() {
                    let sweep = Sweep::within(ri, stream.start, stream.end, ZeroTest::Holes);
                    self.stream = Some(Stream { sweep, chunk: FIRST_STREAM_CHUNK });
                }
                Ok(filled * ps)
            }
        }
    }

    /// Whether read-ahead is in progress.
    pub fn streaming(&self) -> bool {
        self.stream.is_some()
    }

    /// Copies the next chunk of the read-ahead window (holes are left to fault).
    /// Returns whether read-ahead goes on.
    pub fn stream_step(&mut self) -> Result<bool, SessionError> {
        let Some(mut stream) = self.stream.take() else { return Ok(false) };
        let before = stream.sweep.counts().populated_bytes;
        let from = stream.sweep.position();
        let done = stream.sweep.step(self, stream.chunk);
        if let (Some((ri, first)), Some((_, end))) = (from, stream.sweep.position()) {
            self.record_touch(ri, first, end);
        }
        metrics::add(&METRICS.read_ahead_bytes, stream.sweep.counts().populated_bytes - before);
        // What GetSession shows follows the stream, not just the faults.
        self.publish();
        if done? {
            return Ok(false);
        }
        stream.chunk = (stream.chunk * 2).min(MAX_STREAM_CHUNK);
        self.stream = Some(stream);
        Ok(true)
    }

    /// Fails with `Truncated` unless the memory file still covers every region: a sweep over a
    /// truncated file fails here at once, rather than page by page as its copies meet the end.
    pub fn check_file_length(&self) -> Result<(), SessionError> {
        let need = self.regions.iter().map(|r| r.region.offset + r.region.size).max().unwrap_or(0);
        let file = || self.shared.memory_file.clone();
        let len = self
            .file
            .current_len()
            .map_err(|e| SessionError::StatFile { file: file(), error: e.to_string() })?;
        if len < need || self.file.mapped_len() < need {
            return Err(SessionError::Truncated { file: file(), len, need });
        }
        Ok(())
    }

    /// Handles a readable uffd: drain, then serve, then publish.
    pub fn on_readable(&mut self) -> Result<(), SessionError> {
        self.drain_events()?;
        self.serve_pending()?;
        self.publish();
        Ok(())
    }

    /// True if faults are queued.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    fn wake(&self, addr: u64, len: u64) -> Result<(), SessionError> {
        match uffd_ops::wake(&self.uffd, addr, len) {
            Ok(()) => Ok(()),
            Err(e @ (Errno::ESRCH | Errno::ENOENT)) => Err(SessionError::Gone(e)),
            // A wake that finds nothing to wake is not an error worth failing a VM for.
            Err(e) => {
                debug!(session = %self.shared.id, addr, error = %e, "wake failed");
                Ok(())
            }
        }
    }

    /// Fills pages `[first, end)` of region `ri`: present pages are skipped; removed pages are
    /// zero-filled (`OnFault`) or skipped (`Populate`); the rest get the memory file's bytes.
    /// Returns the number of pages this call made present.
    pub fn fill(
        &mut self,
        ri: usize,
        first: u64,
        end: u64,
        mode: FillMode,
    ) -> Result<u64, SessionError> {
        let mut p = first;
        let mut filled = 0;
        let mut eagain_since: Option<Instant> = None;
        while p < end {
            let r = &self.regions[ri];
            if r.present().get(p) {
                p = r.present().next_clear(p).unwrap_or(end).min(end);
                continue;
            }
            let removed_end = r.removed.span_end(p);
            let zero = match (removed_end, mode) {
                (Some(e), FillMode::Populate) => {
                    p = e.min(end);
                    continue;
                }
                (Some(_), FillMode::OnFault) => true,
                (None, _) => false,
            };
            let ps = r.region.page_size;
            // One run of missing pages of the same kind.
            let mut run_end = r.present().next_set_before(p, end);
            run_end = match removed_end {
                Some(e) => run_end.min(e),
                None => run_end.min(r.removed.next_start_after(p).unwrap_or(u64::MAX)),
            };
            if zero && ps != uffdpager::firecracker::PAGE_4K {
                run_end = p + 1; // zeros for hugepages are copied one page at a time
            }
            let addr = r.region.base + p * ps;
            // The copy source: this session's overlay, or the memory file (up to the next edge
            // between the two).
            let src = (!zero).then(|| {
                let (src_end, src) = self.overlays.source(&self.file, ri, &r.region, p, run_end);
                run_end = src_end;
                src
            });
            let len = (run_end - p) * ps;
            let result = if let Some(src) = src {
                uffd_ops::copy(&self.uffd, src, addr, true)
            } else if ps == uffdpager::firecracker::PAGE_4K {
                uffd_ops::zeropage(&self.uffd, addr, len, true)
            } else {
                uffd_ops::copy(&self.uffd, self.zero.bytes(ps), addr, true)
            };
            let outcome = result.map_err(|errno| SessionError::Fill { addr, len, errno })?;
            match outcome {
                FillOutcome::Done => {
                    filled += self.regions[ri].mark_present(p, run_end);
                    p = run_end;
                    eagain_since = None;
                }
                FillOutcome::Partial(bytes) => {
                    let done = bytes / ps;
                    filled += self.regions[ri].mark_present(p, p + done);
                    p += done;
                    self.await_events(&mut eagain_since)?;
                }
                FillOutcome::Exists => {
                    self.regions[ri].mark_present(p, p + 1);
                    self.wake(addr, ps)?;
                    p += 1;
                }
                FillOutcome::Gone(e) => return Err(SessionError::Gone(e)),
            }
        }
        Ok(filled)
    }

    /// Marks pages a copy thread made present, for a claim planned under gate epoch `epoch`.
    /// If memory was discarded since, discarded pages are not marked: a copy made before the
    /// REMOVE was read was zapped with it (see `crate::remove_gate`). Returns the pages marked.
    pub fn mark_copied(&mut self, ri: usize, runs: &[Range<u64>], epoch: u64) -> u64 {
        let removed_since = self.gate.epoch() != epoch;
        let Some(r) = self.regions.get_mut(ri) else { return 0 };
        let mut marked = 0;
        for run in runs {
            if !removed_since {
                marked += r.mark_present(run.start, run.end);
                continue;
            }
            for p in run.clone() {
                if !r.removed.contains(p) {
                    marked += r.mark_present(p, p + 1);
                }
            }
        }
        marked
    }

    /// After an `EAGAIN`: read and apply pending events. If there were none (the VMM's madvise
    /// thread has not yet left its `mmap_changing` window), yield, then wait on the uffd for up
    /// to a millisecond: woken at once by a new event, never a blind sleep loop.
    fn await_events(&mut self, since: &mut Option<Instant>) -> Result<(), SessionError> {
        if self.drain_events()? > 0 {
            *since = None;
            return Ok(());
        }
        let started = *since.get_or_insert_with(Instant::now);
        let waited = started.elapsed();
        if waited > EAGAIN_GIVE_UP {
            return Err(SessionError::Stuck(waited));
        }
        if waited < Duration::from_micros(200) {
            std::thread::yield_now();
        } else {
            let mut fds = [PollFd::new(self.uffd.as_fd(), PollFlags::POLLIN)];
            let _ = poll(&mut fds, PollTimeout::from(1u16));
        }
        Ok(())
    }

    /// Unregisters every region. Only after a full populate (else missing pages would be
    /// zero-filled by the kernel: silent guest memory corruption).
    pub fn unregister_all(&mut self) -> Result<(), SessionError> {
        for r in &self.regions {
            let (addr, len) = (r.region.base, r.region.size);
            match uffd_ops::unregister(&self.uffd, addr, len) {
                Ok(()) => {}
                Err(errno @ (Errno::ESRCH | Errno::ENOENT)) => {
                    return Err(SessionError::Gone(errno))
                }
                Err(errno) => return Err(SessionError::Unregister { addr, len, errno }),
            }
        }
        Ok(())
    }

    /// After re-adoption: learns which pages the VMM already has (so completion does not meet
    /// them one EEXIST at a time). Best effort: without it, EEXIST still marks them present.
    pub fn learn_present_from_pagemap(&mut self) {
        let pid = self.shared.vmm_pid;
        let mut learned = 0;
        for r in &mut self.regions {
            let (base, pages, ps) = (r.region.base, r.region.pages(), r.region.page_size);
            let mut backed = Vec::new();
            if let Err(e) =
                crate::pagemap::for_each_backed(pid, base, pages, ps, |p| backed.push(p))
            {
                warn!(session = %self.shared.id, vmm_pid = pid, error = %e, "reading the VMM's pagemap");
                return;
            }
            for p in backed {
                learned += r.mark_present(p, p + 1);
            }
        }
        debug!(session = %self.shared.id, pages = learned, "present pages learned from pagemap");
        self.publish();
    }

    /// Wakes every registered range once: after re-adoption, faults the previous pager read but
    /// never served are raised again (a woken thread re-faults if its page is still missing).
    pub fn wake_all(&mut self) -> Result<(), SessionError> {
        for i in 0..self.regions.len() {
            let r = self.regions[i].region;
            self.wake(r.base, r.size)?;
        }
        Ok(())
    }

    /// Userfaultfd events that are not part of Firecracker's contract.
    pub fn unexpected_events(&self) -> u64 {
        self.unexpected_events
    }

    /// Faults served so far.
    pub fn faults(&self) -> u64 {
        self.faults
    }

    /// Approximate heap bytes this session's bookkeeping holds.
    pub fn heap_bytes(&self) -> usize {
        self.regions.iter().map(|r| r.present().heap_bytes()).sum::<usize>()
            + self.pending.capacity() * 8
            + 64 * 32
    }

    /// The VMM stream, for EOF detection.
    pub fn vmm_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.vmm_stream.as_fd()
    }
}
