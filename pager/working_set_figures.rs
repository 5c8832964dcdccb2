//! What gRPC shows of a session's working-set recording and prefetch (GetSession,
//! WatchSessions): atomics the worker publishes and the session table reads (a leaf).

use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::Mutex;

use uffdpager::api::{self, WorkingSetState};

/// What gRPC shows of a session's recording and prefetch.
#[derive(Debug, Default)]
pub struct WorkingSetFigures {
    prefetch_state: AtomicI32,
    prefetched: AtomicU64,
    prefetch_total: AtomicU64,
    prefetch_copied: AtomicU64,
    prefetch_reason: Mutex<String>,
    record_state: AtomicI32,
    recorded: AtomicU64,
    record_reason: Mutex<String>,
}

impl WorkingSetFigures {
    pub fn set_prefetch(&self, state: WorkingSetState, reason: impl Into<String>) {
        *self.prefetch_reason.lock().expect("prefetch reason") = reason.into();
        self.prefetch_state.store(state as i32, Ordering::Release);
    }

    pub fn set_record(&self, state: WorkingSetState, reason: impl Into<String>) {
        *self.record_reason.lock().expect("record reason") = reason.into();
        self.record_state.store(state as i32, Ordering::Release);
    }

    pub fn set_prefetch_total(&self, bytes: u64) {
        self.prefetch_total.store(bytes, Ordering::Relaxed);
    }

    /// Bytes of the recording processed (present, copied or passed over) and copied so far.
    pub fn set_prefetch_progress(&self, processed: u64, copied: u64) {
        self.prefetched.store(processed, Ordering::Relaxed);
        self.prefetch_copied.store(copied, Ordering::Relaxed);
    }

    pub fn set_recorded(&self, bytes: u64) {
        self.recorded.store(bytes, Ordering::Relaxed);
    }

    pub fn record_state(&self) -> WorkingSetState {
        WorkingSetState::try_from(self.record_state.load(Ordering::Acquire)).unwrap_or_default()
    }

    /// Copies the figures into a Session message.
    pub fn fill(&self, s: &mut api::Session) {
        s.prefetch_state = self.prefetch_state.load(Ordering::Acquire);
        s.prefetched_bytes = self.prefetched.load(Ordering::Relaxed);
        s.prefetch_total_bytes = self.prefetch_total.load(Ordering::Relaxed);
        s.prefetch_copied_bytes = self.prefetch_copied.load(Ordering::Relaxed);
        s.prefetch_reason = self.prefetch_reason.lock().expect("prefetch reason").clone();
        s.record_state = self.record_state.load(Ordering::Acquire);
        s.recorded_bytes = self.recorded.load(Ordering::Relaxed);
        s.record_reason = self.record_reason.lock().expect("record reason").clone();
    }
}
