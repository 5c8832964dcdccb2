//! Reading a session's uffd events: REMOVEs (balloon `MADV_DONTNEED`) and UNMAPs are recorded
//! outside this process and applied to the page state before any fault queued with them is
//! served; faults are queued for `faults`. Also waiting out an `EAGAIN` (a REMOVE in flight), and
//! settling every event raised before a graduation's unregister.

use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use tracing::{debug, warn};
use uffdpager::uffd_msg::{self, UffdMsg, MSG_WORDS};
use uffdpager::uffd_ops;

use super::{Session, SessionError};
use crate::metrics::{self, METRICS};

/// How long fills may keep answering `EAGAIN` with no event to read before the session is failed.
/// (A REMOVE's `mmap_changing` window lasts until the VMM's madvise thread runs again: normally
/// microseconds.)
const EAGAIN_GIVE_UP: Duration = Duration::from_secs(10);

/// Events read per `read()` of the uffd.
pub(super) const EVENT_BATCH: usize = 64;

impl Session {
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

    pub(super) fn apply_remove(&mut self, start: u64, end: u64) {
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

    /// After an `EAGAIN`: read and apply pending events. If there were none (the VMM's madvise
    /// thread has not yet left its `mmap_changing` window), yield, then wait on the uffd for up
    /// to a millisecond: woken at once by a new event, never a blind sleep loop.
    pub(super) fn await_events(&mut self, since: &mut Option<Instant>) -> Result<(), SessionError> {
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
}
