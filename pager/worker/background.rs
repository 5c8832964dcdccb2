//! A worker's background work between faults, each a budget at a time and each after the
//! session's queued faults: read-ahead streams, working-set prefetches, and the recordings whose
//! time is up.

use std::time::Instant;

use nix::sys::epoll::EpollTimeout;
use tracing::warn;

use super::Worker;

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

    /// One prefetch step (the completion budget) for each session prefetching a working set,
    /// each after its queued faults. A failed step stops that prefetch only: the faults that
    /// follow meet the same failure and decide the session's fate.
    pub(super) fn step_prefetches(&mut self) {
        let mut i = 0;
        while i < self.prefetches.len() {
            let token = self.prefetches[i];
            self.serve_queued(token);
            let Some(s) = self.sessions.get_mut(&token) else {
                self.prefetches.swap_remove(i);
                continue;
            };
            let going = match s.prefetch_step(self.budget) {
                Ok(going) => going,
                Err(e) => {
                    warn!(session = %s.id(), version = %self.version, error = %e, "working-set prefetch stopped");
                    false
                }
            };
            if going {
                i += 1;
            } else {
                self.prefetches.swap_remove(i);
            }
            self.serve_queued(token);
        }
    }

    /// One read-ahead chunk for each session streaming. A failed chunk stops its read-ahead
    /// only: the faults that follow meet the same failure and decide the session's fate.
    pub(super) fn step_streams(&mut self) {
        let mut i = 0;
        while i < self.streams.len() {
            let token = self.streams[i];
            let Some(s) = self.sessions.get_mut(&token) else {
                self.streams.swap_remove(i);
                continue;
            };
            let going = match s.stream_step() {
                Ok(going) => going,
                Err(e) => {
                    warn!(session = %s.id(), version = %self.version, error = %e, "read-ahead stopped");
                    false
                }
            };
            if going {
                i += 1;
            } else {
                self.streams.swap_remove(i);
            }
            self.serve_queued(token);
        }
    }
}
