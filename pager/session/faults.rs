//! Serving a session's queued faults: one page for a random fault, a block and a read-ahead
//! stream for a sequential one (see `crate::read_ahead`); a discarded page faults back in as
//! zeros, one page, never a block.

use tracing::warn;

use super::{FillMode, Session, SessionError};
use crate::metrics::{self, METRICS};
use crate::page_copy::ZeroTest;
use crate::read_ahead::Plan;
use crate::sweep::Sweep;

/// Read-ahead chunks: the first after a sequential fault is small (the vCPU may reach it while
/// it is copied, and waits for the whole ioctl), later ones double up to 1 MiB.
const FIRST_STREAM_CHUNK: u64 = 64 << 10;
const MAX_STREAM_CHUNK: u64 = 1 << 20;
/// Blocks around random faults kept for [`Session::fill_around`] (more in one round are not
/// worth a longer wait for the next round's faults).
const MAX_AROUND_BLOCKS: usize = 64;

/// Read-ahead in progress: a sweep over the window, and the size of its next chunk.
#[derive(Debug)]
pub(super) struct Stream {
    sweep: Sweep,
    chunk: u64,
}

impl Session {
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
            Plan::Around { block } => {
                // The page alone now (its vCPU waits for nothing else); the rest of its block
                // after this round's faults, if the worker finds itself contended for.
                self.record_touch(ri, page, page + 1);
                if self.around.len() < MAX_AROUND_BLOCKS {
                    self.around.push((ri, block));
                }
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

    /// Copies the rest of the blocks around the random faults served since the last call
    /// (present and discarded pages are passed over, as for read-ahead): fewer faults for a
    /// vCPU that touches near where it touched, at the price of pages it may never touch.
    pub fn fill_around(&mut self) -> Result<(), SessionError> {
        let mut blocks = std::mem::take(&mut self.around);
        let mut result = Ok(());
        let mut bytes = 0;
        for (ri, block) in blocks.drain(..) {
            if self.unregistered {
                break;
            }
            match self.fill(ri, block.start, block.end, FillMode::Populate) {
                Ok(pages) => bytes += pages * self.regions[ri].region.page_size,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        metrics::add(&METRICS.read_ahead_bytes, bytes);
        // Blocks of faults served while these were filled (an EAGAIN read them) come next.
        if self.around.is_empty() {
            self.around = blocks;
        }
        result
    }

    /// Forgets the blocks around the faults served since the last call.
    pub fn skip_around(&mut self) {
        self.around.clear();
    }

    /// Whether blocks around served faults wait for [`Session::fill_around`].
    pub fn has_around(&self) -> bool {
        !self.around.is_empty()
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
        let done = self.sweep_step(&mut stream.sweep, stream.chunk);
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
}
