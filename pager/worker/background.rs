//! A worker's background work between faults, each a budget at a time and each after the
//! session's queued faults: read-ahead streams, working-set prefetches, and the recordings whose
//! time is up.

use std::time::Instant;

use nix::sys::epoll::{EpollEvent, EpollTimeout};
use tracing::warn;

use super::{Worker, WAKE};

impl Worker {
    /// How long epoll may sleep: until the next recording is due to stop, or for ever.
    pub(super) fn record_timeout(&self) -> EpollTimeout {
        let Some(next) = self.record_deadlines.iter().map(|d| d.0).min() else {
            return EpollTimeout::NONE;
        };
        let ms = next.saturating_duration_since(Instant::now()).as_millis() + 1;
        EpollTimeout::from(u16::try_from(ms).unwrap_or(u16::MAX))
    }

    /// Stops and saves the recordings whose time is up.
    pub(super) fn finish_due_recordings(&mut self) {
        if self.record_deadlines.is_empty() {
            return;
        }
        let now = Instant::now();
        let sessions = &mut self.sessions;
        self.record_deadlines.retain(|&(at, token)| {
            if at > now {
                return true;
            }
            if let Some(s) = sessions.get_mut(&token) {
                s.finish_recording("its recording time was up");
            }
            false
        });
    }

    /// After a round's faults, the blocks around them. When faults of more than one session
    /// came in the round, the worker is contended for: every fault is a vCPU that sleeps, waits
    /// behind others' and is woken again, so each fault saved is worth far more than the copy
    /// of a page the vCPU may never touch, and the rest of each fault's block is filled. A lone
    /// faulting VM gets its pages one at a time: its next fault is served at once, not behind
    /// a block.
    pub(super) fn fill_around_blocks(&mut self) {
        if self.around.is_empty() {
            return;
        }
        let tokens = std::mem::take(&mut self.around);
        let contended = tokens.len() > 1;
        for &token in &tokens {
            let Some(s) = self.sessions.get_mut(&token) else { continue };
            if !contended {
                s.skip_around();
                continue;
            }
            // A failed fill stops this work only, as for read-ahead: the faults that follow
            // meet the same failure and decide the session's fate.
            if let Err(e) = s.fill_around() {
                warn!(session = %s.id(), version = %self.version, error = %e, "filling around faults stopped");
            }
            self.serve_queued(token);
            // Faults that came in meanwhile go before the next session's blocks.
            self.serve_ready_faults();
        }
        // Sessions whose queued faults were served just now wait for the next round.
        if self.around.is_empty() {
            self.around = tokens;
            self.around.clear();
        }
    }

    /// Serves the faults of every session whose uffd is readable now, without waiting. Other
    /// events (commands, a VMM's exit) stay ready for the loop's next wait (epoll is
    /// level-triggered).
    fn serve_ready_faults(&mut self) {
        let mut events = [EpollEvent::empty(); 64];
        let Ok(n) = self.epoll.wait(&mut events, EpollTimeout::ZERO) else { return };
        for ev in &events[..n] {
            let data = ev.data();
            if data != WAKE && data & 1 == 0 {
                self.on_uffd(data >> 1);
            }
        }
    }

    /// One prefetch step (the completion budget) for each session prefetching a working set.
    pub(super) fn step_prefetches(&mut self) {
        self.step_each(Background::Prefetch);
    }

    /// One read-ahead chunk for each session streaming.
    pub(super) fn step_streams(&mut self) {
        self.step_each(Background::ReadAhead);
    }

    /// One step of `work` for each session doing it, round-robin, each step after the session's
    /// queued faults and followed by those its step read. A failed step stops that work only:
    /// the faults that follow meet the same failure and decide the session's fate.
    fn step_each(&mut self, work: Background) {
        let mut i = 0;
        while i < self.background(work).len() {
            let token = self.background(work)[i];
            self.serve_queued(token);
            let budget = self.budget;
            let Some(s) = self.sessions.get_mut(&token) else {
                self.background(work).swap_remove(i);
                continue;
            };
            let step = match work {
                Background::Prefetch => s.prefetch_step(budget),
                Background::ReadAhead => s.stream_step(),
            };
            let going = step.unwrap_or_else(|e| {
                warn!(session = %s.id(), version = %self.version, error = %e, "{} stopped", work.name());
                false
            });
            if going {
                i += 1;
            } else {
                self.background(work).swap_remove(i);
            }
            self.serve_queued(token);
        }
    }

    fn background(&mut self, work: Background) -> &mut Vec<u64> {
        match work {
            Background::Prefetch => &mut self.prefetches,
            Background::ReadAhead => &mut self.streams,
        }
    }
}

/// Work a worker does a step at a time for a session, between faults.
#[derive(Debug, Clone, Copy)]
enum Background {
    ReadAhead,
    Prefetch,
}

impl Background {
    fn name(self) -> &'static str {
        match self {
            Background::ReadAhead => "read-ahead",
            Background::Prefetch => "working-set prefetch",
        }
    }
}
