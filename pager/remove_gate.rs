//! The rule that lets a second thread copy into a VM's memory: no copy may land in a range after
//! the VMM's REMOVE of it was read.
//!
//! A VMM's `MADV_DONTNEED` (balloon) raises `UFFD_EVENT_REMOVE` and waits until the pager reads
//! it; only then does the kernel zap the range. While the event is unread, copies answer
//! `EAGAIN`. A copy already running when the event is raised is not stopped, though, and once
//! the event is read nothing orders a copy against the zap: a copy that lands after it leaves
//! snapshot bytes where the guest discarded memory. The worker that owns a session reads its
//! events in order with its own copies, so it never has that race. A copy thread does, unless
//! both agree on this gate:
//!
//! * the worker holds the lock while it reads the session's events, and bumps the epoch (still
//!   holding it) when one of them removes or unmaps memory;
//! * a copy thread holds the lock around each `UFFDIO_COPY`, and before it checks that the epoch
//!   is still the one its span was planned under. If it is not, it stops and hands the rest of
//!   its span back to the worker, which plans it again with the removal known.
//!
//! So every copy of a copy thread either ended before the event was read (and the zap, which
//! comes after, clears it) or is never made. A copy thread's call is short (a few hundred KiB),
//! which bounds how long the worker may wait for the lock before it reads a fault.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

/// One session's gate between its worker's event reads and copy threads' copies.
#[derive(Debug, Default)]
pub struct RemoveGate {
    lock: Mutex<()>,
    /// Bumped each time a REMOVE or UNMAP is read (with `lock` held).
    epoch: AtomicU64,
}

impl RemoveGate {
    /// Held by the worker while it reads events, by a copy thread around each copy.
    pub fn lock(&self) -> MutexGuard<'_, ()> {
        // A copy thread that panicked while holding the lock left no state behind it to mend.
        self.lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records that a REMOVE or UNMAP was read; the caller holds [`Self::lock`].
    pub fn removed(&self) {
        self.epoch.fetch_add(1, Ordering::Release);
    }

    /// How many removals were read so far.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }
}
