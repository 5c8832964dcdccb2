//! One session's fault serving: its uffd, the page state of each region, and the steps the
//! worker's event loop calls. By job:
//! * `events`: reading the uffd's events and applying REMOVEs, before any fault queued with them;
//! * `faults`: serving queued faults, and the read-ahead a sequential one starts;
//! * `fill`: the fill loop (`UFFDIO_COPY`/`ZEROPAGE` with its `EAGAIN`/`EEXIST`/`ENOENT` rules),
//!   and the sweep's populate that runs on it;
//! * `handover`: what changes hands (adoption, give-back, unregister at graduation);
//! * `working_set`: recording first touches and prefetching a recording.
//!
//! The kernel's rules applied here (see `uffdpager::uffd_ops` and `userfaultfd(2)`):
//! * `UFFD_EVENT_REMOVE` (balloon `MADV_DONTNEED`) is applied before any fault queued with it is
//!   served: a removed page that faults again is zero-filled, never given snapshot data.
//! * While a REMOVE is unread, fills fail with `EAGAIN`: read the events, then retry from the
//!   bytes done, re-planning from the page state (the retried range may have been removed).
//! * `EEXIST`: the page is present already; wake its waiters, since our call woke nobody.

mod events;
mod faults;
mod fill;
mod handover;
mod working_set;

use std::collections::VecDeque;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Instant;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use tracing::{info, warn};
use uffdpager::handoff::VmmFd;
use uffdpager::removed_log::RemovedLog;
use uffdpager::uffd_msg::MSG_WORDS;
use userfaultfd::Uffd;

use crate::memory_file::MappedFile;
use crate::overlay::SessionOverlays;
use crate::read_ahead::ReadAhead;
pub use crate::region_pages::{RegionPages, ZeroSource};
use crate::registry::SessionShared;
use crate::remove_gate::RemoveGate;
pub use crate::session_error::{FillMode, SessionError};

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
    stream: Option<faults::Stream>,
    /// Blocks around random faults served this round, for `fill_around`.
    around: Vec<(usize, std::ops::Range<u64>)>,
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
    recorder: Option<crate::working_set::Recorder>,
    prefetch: Option<crate::working_set::Prefetch>,
    saving: Option<std::thread::JoinHandle<()>>,
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
            events: vec![0; events::EVENT_BATCH * MSG_WORDS],
            read_ahead: ReadAhead::default(),
            stream: None,
            around: Vec::new(),
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

    /// Serves random faults with the aligned block of `pages` 4 KiB pages around them when the
    /// worker is contended for (see `Session::fill_around`); 1: the page alone.
    pub fn with_fault_around(mut self, pages: u64) -> Self {
        self.read_ahead = ReadAhead::new(pages);
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

    /// Region index and page index of a guest address.
    pub fn locate(&self, addr: u64) -> Option<(usize, u64)> {
        let i = self.regions.partition_point(|r| r.region.base <= addr).checked_sub(1)?;
        let r = &self.regions[i].region;
        (addr < r.end()).then(|| (i, (addr - r.base) / r.page_size))
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
}

#[cfg(test)]
// The tests play the VMM on a real uffd (raw guest memory); their values are small and known.
#[allow(unsafe_code)]
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_possible_wrap)]
mod tests;
