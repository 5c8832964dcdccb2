//! A session changing hands: unregistered at graduation (the VM then runs on resident memory),
//! adopted from a pager that died (learning what is present, re-raising faults it never served),
//! and given back to a restarted supervisor.

use std::os::fd::AsFd;

use nix::errno::Errno;
use tracing::{debug, warn};
use uffdpager::handoff::{HandoffRequest, SessionFds};
use uffdpager::uffd_ops;

use super::{Session, SessionError};

impl Session {
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
