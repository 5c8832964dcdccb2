//! A session's working-set recording and prefetch (see `crate::working_set`): recording follows
//! the fault path; prefetch copies the recorded runs with the fill faults use, in `Populate`
//! mode (present pages are passed over, discarded ranges are never written), and yields to any
//! fault that is waiting.

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use tracing::{info, warn};
use uffdpager::api::WorkingSetState;

use super::{FillMode, Session, SessionError};
use crate::working_set::{Prefetch, RecordSettings, Recorder, POLL_EVERY};

impl Session {
    /// Starts recording (unless the session was adopted: what it touched before is unknown).
    pub fn start_recording(&mut self, path: Option<&str>, adopt: bool, settings: RecordSettings) {
        let Some(path) = path else { return };
        let ws = &self.shared.working_set;
        if adopt {
            ws.set_record(
                WorkingSetState::Skipped,
                "the session was re-adopted by another pager: its first touches before that are unknown",
            );
            return;
        }
        ws.set_record(WorkingSetState::Running, format!("recording to {path}"));
        self.recorder = Some(Recorder::new(PathBuf::from(path), settings));
    }

    /// Starts a prefetch (or records why it is skipped).
    pub fn start_prefetch(&mut self, loaded: Option<Result<Prefetch, String>>) {
        let ws = &self.shared.working_set;
        match loaded {
            None => {}
            Some(Ok(p)) => {
                ws.set_prefetch_total(p.total_bytes(|ri| self.regions[ri].region.page_size));
                ws.set_prefetch(WorkingSetState::Running, String::new());
                self.prefetch = Some(p);
            }
            Some(Err(reason)) => {
                warn!(session = %self.shared.id, version = %self.shared.version, %reason, "working-set prefetch skipped");
                ws.set_prefetch(WorkingSetState::Skipped, reason);
            }
        }
    }

    /// Notes pages `[first, end)` of region `ri` as first touched now (a fault's or read-ahead's).
    pub fn record_touch(&mut self, ri: usize, first: u64, end: u64) {
        let Some(rec) = &mut self.recorder else { return };
        if let Some(bytes) = rec.touch(ri, first..end, self.regions[ri].region.page_size) {
            self.shared.working_set.set_recorded(bytes);
        }
    }

    /// The time the recording stops by itself, if one runs.
    pub fn recording_until(&self) -> Option<Instant> {
        self.recorder.as_ref().map(Recorder::until)
    }

    /// Stops recording (deadline, graduation or end) and saves it on a thread of its own.
    pub fn finish_recording(&mut self, why: &'static str) {
        let Some(rec) = self.recorder.take() else { return };
        match rec.save(Arc::clone(&self.shared), Arc::clone(&self.file), why) {
            Ok(h) => self.saving = Some(h),
            Err(e) => self
                .shared
                .working_set
                .set_record(WorkingSetState::Failed, format!("starting the save thread: {e}")),
        }
    }

    /// The thread saving the recording, if it may still run.
    pub fn take_saving(&mut self) -> Option<JoinHandle<()>> {
        self.saving.take()
    }

    pub fn prefetching(&self) -> bool {
        self.prefetch.is_some()
    }

    /// Copies up to `budget` bytes of the recording, in recorded order, stopping early when a
    /// fault is waiting. Returns whether prefetch goes on.
    pub fn prefetch_step(&mut self, budget: u64) -> Result<bool, SessionError> {
        let Some(mut p) = self.prefetch.take() else { return Ok(false) };
        let result = self.prefetch_some(&mut p, budget);
        let ws = &self.shared.working_set;
        let (processed, copied) = p.progress();
        ws.set_prefetch_progress(processed, copied);
        self.publish();
        match result {
            Ok(true) => {
                self.prefetch = Some(p);
                Ok(true)
            }
            Ok(false) => {
                info!(session = %self.shared.id, version = %self.shared.version, processed, copied,
                    ms = u64::try_from(p.elapsed().as_millis()).unwrap_or(u64::MAX), "working-set prefetch done");
                ws.set_prefetch(WorkingSetState::Done, String::new());
                Ok(false)
            }
            Err(e) => {
                ws.set_prefetch(WorkingSetState::Failed, e.to_string());
                Err(e)
            }
        }
    }

    fn prefetch_some(&mut self, p: &mut Prefetch, budget: u64) -> Result<bool, SessionError> {
        let mut left = budget;
        let mut since_poll = 0;
        loop {
            let Some((ri, pages)) = p.next_span(|ri| left / self.regions[ri].region.page_size)
            else {
                return Ok(false);
            };
            if left == 0 {
                return Ok(true);
            }
            let ps = self.regions[ri].region.page_size;
            let count = pages.end - pages.start;
            let copied = self.fill(ri, pages.start, pages.end, FillMode::Populate)?;
            p.advance(count, copied, ps);
            left = left.saturating_sub(count * ps);
            since_poll += copied * ps;
            // A fault read while a copy waited out an EAGAIN, or one waiting now: serve it first.
            if self.has_pending() {
                return Ok(true);
            }
            if since_poll >= POLL_EVERY {
                since_poll = 0;
                let mut fds = [PollFd::new(self.uffd.as_fd(), PollFlags::POLLIN)];
                if poll(&mut fds, PollTimeout::ZERO).is_ok_and(|n| n > 0) {
                    return Ok(true);
                }
            }
        }
    }
}
