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
use tracing::{debug, info, warn};
use uffdpager::handoff::{HandoffRequest, SessionFds, VmmFd};
use uffdpager::removed_log::RemovedLog;
use uffdpager::uffd_msg::{self, UffdMsg, MSG_WORDS};
use uffdpager::uffd_ops::{self, FillOutcome};
use userfaultfd::Uffd;

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
    #[error("the VMM's memory is gone ({0}: its address space has no users): the VMM exited")]
    Gone(Errno),
    #[error("the VMM is gone: {0}")]
    VmmGone(String),
    #[error(
        "{op} of {len} bytes at {addr:#x} found no registered mapping there (ENOENT), though \
         the VMM runs and its regions are registered"
    )]
    NoMapping { op: &'static str, addr: u64, len: u64 },
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
    /// The VMM's stream (EOF: gone), or a pidfd of the VMM (readable: gone); see `vmm_kind`.
    pub vmm_stream: OwnedFd,
    pub vmm_kind: VmmFd,
    pub file: Arc<MappedFile>,
    /// Pages this session reads from its overlays instead of the memory file.
    pub overlays: Arc<SessionOverlays>,
    pub regions: Vec<RegionPages>,
    /// Faults read and not yet served, with when they were read (for the latency histogram).
    pending: VecDeque<(u64, Instant)>,
    /// Where events are read when the session has no removed-ranges log (else: its read slot).
    events: Vec<u64>,
    /// Whether faults come in order, and the background read-ahead it started.
    read_ahead: ReadAhead,
    stream: Option<Stream>,
    faults: u64,
    /// Faults served from an overlay.
    overlay_faults: u64,
    unexpected_events: u64,
    /// Every region is unregistered (graduation): faults read from now on were woken by the
    /// unregister and find resident memory or the kernel's zero pages; they are not filled.
    unregistered: bool,
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
    /// A session as handed over: `vmm` is the VMM's stream or pidfd (`vmm_kind`); `faults` the
    /// faults earlier pagers served (the figure goes on from there).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        shared: Arc<SessionShared>,
        uffd: Uffd,
        (vmm_stream, vmm_kind): (OwnedFd, VmmFd),
        file: Arc<MappedFile>,
        removed: &[(u64, u64)],
        removed_log: Option<RemovedLog>,
        zero: Arc<ZeroSource>,
        faults: u64,
    ) -> Self {
        let regions = shared.regions.iter().copied().map(RegionPages::new).collect();
        let mut s = Self {
            shared,
            uffd: Arc::new(uffd),
            gate: Arc::default(),
            vmm_stream,
            vmm_kind,
            file,
            overlays: Arc::default(),
            regions,
            pending: VecDeque::new(),
            events: vec![0; EVENT_BATCH * MSG_WORDS],
            read_ahead: ReadAhead::default(),
            stream: None,
            faults,
            overlay_faults: 0,
            unexpected_events: 0,
            unregistered: false,
            zero,
            removed_log: None,
            recorder: None,
            prefetch: None,
            saving: None,
        };
        // Ranges discarded while an earlier pager served the session stay discarded, those it
        // had read into the log's slot but not yet recorded (it died in between) included.
        let mut removed_log = removed_log;
        if let Some(log) = &mut removed_log {
            match log.recover_slot() {
                Ok(left) if !left.is_empty() => {
                    info!(session = %s.shared.id, messages = left.len(), "took over events an earlier pager read but never handled");
                }
                Ok(_) => {}
                Err(e) => {
                    warn!(session = %s.shared.id, error = %e, "recovering the log's read slot failed")
                }
            }
        }
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
    ///
    /// Events are read into the removed-ranges log's read slot, and the slot is cleared only
    /// once the batch's REMOVEs are appended to the log (see `uffdpager::removed_log`): a pager
    /// killed at any point in between loses no discarded range.
    pub fn drain_events(&mut self) -> Result<usize, SessionError> {
        let gate = Arc::clone(&self.gate);
        let _held = gate.lock();
        let mut total = 0;
        loop {
            let batch = self.read_batch()?;
            let n = batch.len();
            total += n;
            if batch.iter().any(|m| m.removed_range().is_some()) {
                crate::fault_inject::after_remove_read();
            }
            let read_at = Instant::now();
            for msg in batch {
                self.apply_msg(msg, read_at);
            }
            if let Some(log) = &self.removed_log {
                log.clear_slot(n);
            }
            // A short batch means the queue is empty: skip the read that would say EAGAIN.
            if n < EVENT_BATCH {
                return Ok(total);
            }
        }
    }

    /// One `read(2)` of up to [`EVENT_BATCH`] events: into the log's read slot, or a buffer of
    /// this session's own when it has no log.
    fn read_batch(&mut self) -> Result<Vec<UffdMsg>, SessionError> {
        let failed = |e: nix::errno::Errno| SessionError::ReadEvents(e.to_string());
        let uffd = self.uffd.as_fd();
        if let Some(log) = &self.removed_log {
            let n = log.read_into_slot(uffd, EVENT_BATCH).map_err(failed)?;
            return Ok((0..n).filter_map(|i| log.slot_message(i)).collect());
        }
        let n = uffd_msg::read_into_words(uffd, &mut self.events).map_err(failed)?;
        Ok(self
            .events
            .chunks_exact(MSG_WORDS)
            .take(n)
            .filter_map(|w| UffdMsg::decode([w[0], w[1], w[2], w[3]]))
            .collect())
    }

    fn apply_msg(&mut self, msg: UffdMsg, read_at: Instant) {
        match msg {
            m @ UffdMsg::Pagefault { addr, .. } if m.is_missing_fault() => {
                self.pending.push_back((addr, read_at));
            }
            // The VMM discarded (balloon) or unmapped guest memory: record it outside this process
            // first, then apply it, before any fault queued with it is served.
            UffdMsg::Remove { start, end } | UffdMsg::Unmap { start, end } => {
                self.gate.removed();
                metrics::add(&METRICS.remove_events, 1);
                metrics::add(&METRICS.remove_bytes, end.saturating_sub(start));
                self.log_remove(start, end);
                self.apply_remove(start, end);
            }
            other => {
                // Fork/remap and write-protect or minor faults are features Firecracker never
                // enables; count them and say so, never drop them silently (a fork's uffd is
                // closed here).
                uffd_msg::close_forked(&other);
                self.unexpected_events += 1;
                warn!(session = %self.shared.id, event = ?other, "unexpected userfaultfd event");
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

    /// Serves every queued fault. A fault whose range no registered mapping holds (`ENOENT`,
    /// with the VMM still there) is dropped with a warning: not a reason to stop serving the
    /// others.
    pub fn serve_pending(&mut self) -> Result<(), SessionError> {
        if self.unregistered {
            // `UFFDIO_UNREGISTER` woke every fault of the ranges; a fill would only say ENOENT.
            self.pending.clear();
            return Ok(());
        }
        while let Some((addr, read_at)) = self.pending.pop_front() {
            self.faults += 1;
            let bytes = match self.serve_fault(addr) {
                Err(SessionError::NoMapping { op, addr: at, len }) => {
                    self.unexpected_events += 1;
                    warn!(session = %self.shared.id, op, addr = at, len,
                        "a fault's page is in no registered mapping (ENOENT) while the VMM runs; the fault is dropped");
                    // Its thread may still wait (a mapping that changed under the fill): woken,
                    // it faults again where the kernel or a new event says what to do.
                    if let Some((ri, page)) = self.locate(addr) {
                        let r = &self.regions[ri].region;
                        self.wake(r.base + page * r.page_size, r.page_size)?;
                    }
                    0
                }
                other => other?,
            };
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
            // Believed present, yet faulted: two vCPUs faulted on one page, a block covered
            // it, or the page went missing without an event telling us (a zap that landed
            // after our fill, a VMM remapping its memory). Only a wake would leave the last
            // kinds faulting for ever (a spin), so the page is filled again: the kernel says
            // EEXIST if it is present (then the fill wakes its waiters), and fills it if not.
            self.regions[ri].forget_present(page);
            return Ok(self.fill(ri, page, page + 1, FillMode::OnFault)? * ps);
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
                let mut filled = self.fill(ri, now.start, now.end, FillMode::Populate)?;
                // A REMOVE read while the block was copied (EAGAIN) may have discarded the
                // faulting page before its copy: `Populate` skipped it, and its thread still
                // waits. It reads zeros now (a fill that wakes it).
                if !self.regions[ri].present().get(page) {
                    filled += self.fill(ri, page, page + 1, FillMode::OnFault)?;
                }
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
            Err(e @ Errno::ESRCH) => Err(SessionError::Gone(e)),
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
        let mut no_mapping_tries = 0;
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
                FillOutcome::NoMapping => {
                    // ENOENT is no proof that the VMM is gone. An UNMAP or REMOVE read now
                    // explains it (the loop plans the range again, twice at most); then proof
                    // is asked of the VMM's stream (EOF) before giving up on the range.
                    no_mapping_tries += 1;
                    if no_mapping_tries <= 2 {
                        self.drain_events()?;
                        continue;
                    }
                    if let Some(why) = self.vmm_gone() {
                        return Err(SessionError::VmmGone(why));
                    }
                    let op = if zero && ps == uffdpager::firecracker::PAGE_4K {
                        "UFFDIO_ZEROPAGE"
                    } else {
                        "UFFDIO_COPY"
                    };
                    return Err(SessionError::NoMapping { op, addr, len });
                }
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
    ///
    /// Each region is woken once more after its unregister: the kernel wakes a range's faults
    /// *before* it clears the range's registration, and a fault taken under the per-VMA lock
    /// meanwhile queues itself after that wake and would wait for ever (measured on 6.18: a
    /// thread left blocked in `handle_userfault` in about 6 % of unregisters under 4 faulting
    /// threads; none with the extra wake).
    pub fn unregister_all(&mut self) -> Result<(), SessionError> {
        for i in 0..self.regions.len() {
            let (addr, len) = (self.regions[i].region.base, self.regions[i].region.size);
            match uffd_ops::unregister(&self.uffd, addr, len) {
                Ok(()) => {}
                Err(errno @ Errno::ESRCH) => return Err(SessionError::Gone(errno)),
                Err(errno) => return Err(SessionError::Unregister { addr, len, errno }),
            }
            self.wake(addr, len)?;
        }
        self.unregistered = true;
        Ok(())
    }

    /// After `unregister_all`: reads events until none is in flight, so that no VMM thread is
    /// left waiting for a REMOVE nobody reads once this session lets go of its uffd (a `madvise`
    /// blocks until its event is read, and the VMM's copy of the uffd keeps it open). An event
    /// raised before the unregister may be queued only after it returned (see
    /// `uffdpager::uffd_ops::events_in_flight`); none can be raised after it. Gives up with
    /// `Stuck` after [`EAGAIN_GIVE_UP`] of events that keep coming (ranges the pager never
    /// registered).
    pub fn settle_events(&mut self) -> Result<(), SessionError> {
        let started = Instant::now();
        loop {
            self.drain_events()?;
            self.serve_pending()?;
            match uffd_ops::events_in_flight(&self.uffd) {
                Ok(false) => return Ok(()),
                Ok(true) => {}
                Err(e @ Errno::ESRCH) => return Err(SessionError::Gone(e)),
                Err(e) => {
                    return Err(SessionError::ReadEvents(format!(
                        "probing for events in flight: {e}"
                    )))
                }
            }
            let waited = started.elapsed();
            if waited > EAGAIN_GIVE_UP {
                return Err(SessionError::Stuck(waited));
            }
            // The event is being queued by a VMM thread that has just dropped its mmap_lock:
            // wait for it on the uffd (woken at once when it is queued).
            let mut fds = [PollFd::new(self.uffd.as_fd(), PollFlags::POLLIN)];
            let _ = poll(&mut fds, PollTimeout::from(1u16));
        }
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

    /// Proof that the VMM is gone, if there is some: its stream has reached EOF (it never
    /// closes it while it runs), or its pidfd is readable (it exited).
    pub fn vmm_gone(&self) -> Option<String> {
        // nix has no POLLRDHUP: the peer's shutdown of its end (its exit).
        let rdhup = PollFlags::from_bits_retain(libc::POLLRDHUP);
        let (asked, proof) = match self.vmm_kind {
            VmmFd::Stream => (rdhup, "its stream reached EOF (the VMM exited)"),
            VmmFd::Pidfd => (PollFlags::POLLIN, "its pidfd is readable (the VMM exited)"),
        };
        let mut fds = [PollFd::new(self.vmm_stream.as_fd(), asked)];
        match poll(&mut fds, PollTimeout::ZERO) {
            Ok(n) if n > 0 => {
                let got = fds[0].revents().unwrap_or(PollFlags::empty());
                got.intersects(asked | PollFlags::POLLHUP | PollFlags::POLLERR)
                    .then(|| proof.to_string())
            }
            _ => None,
        }
    }

    /// The VMM stream (or pidfd), for detecting the VMM's exit.
    pub fn vmm_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.vmm_stream.as_fd()
    }

    /// The session as a handoff would describe it, and duplicates of its descriptors: what a
    /// restarted supervisor asks for back (see `uffdpager::handoff`'s give-back).
    pub fn give_back(&self) -> std::io::Result<(HandoffRequest, SessionFds)> {
        let shared = &self.shared;
        let (overlays, overlay) = self.overlays.handoff_parts()?;
        let request = HandoffRequest {
            session_id: shared.id.clone(),
            memory_file: shared.memory_file.clone(),
            regions: shared.regions.clone(),
            vmm_pid: shared.vmm_pid,
            connected_at_ms: shared.connected_at_ms,
            adopt: false,
            removed: vec![],
            overlays,
            faults: self.faults,
            vmm_fd: self.vmm_kind,
            // A working-set recording or prefetch is not carried on past a supervisor restart:
            // an adopter after one serves on demand.
            record_working_set: None,
            prefetch_working_set: None,
        };
        let fds = SessionFds {
            uffd: self.uffd.as_fd().try_clone_to_owned()?,
            memory_file: self.file.fd().try_clone_to_owned()?,
            vmm_stream: self.vmm_stream.try_clone()?,
            removed_log: self
                .removed_log
                .as_ref()
                .map(|l| l.fd().try_clone_to_owned())
                .transpose()?,
            overlay,
        };
        Ok((request, fds))
    }
}

#[cfg(test)]
#[path = "session_tests.rs"]
// The tests play the VMM on a real uffd (raw guest memory); their values are small and known.
#[allow(unsafe_code)]
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_possible_wrap)]
mod tests;
