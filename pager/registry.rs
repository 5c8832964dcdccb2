//! The pager's table of sessions, shared between the gRPC side (tokio) and the fault workers
//! (OS threads). Figures are atomics the workers publish; a session's state changes under the
//! table's lock, so that two CompleteSession calls cannot both start a completion.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;
use uffdpager::api;
use uffdpager::firecracker::Region;
use uffdpager::grpc::timestamp_ms;

use crate::completion_result::CompletionResult;
use crate::lifecycle::{Change, Phase, Refused, SessionLifecycle};
use crate::working_set_figures::WorkingSetFigures;

/// What gRPC reads of a session while a worker serves it.
#[derive(Debug)]
pub struct SessionShared {
    pub id: String,
    pub memory_file: String,
    pub regions: Vec<Region>,
    pub vmm_pid: u32,
    pub connected_at_ms: u64,
    pub version: String,
    state: SessionLifecycle,
    resident: AtomicU64,
    removed: AtomicU64,
    zero: AtomicU64,
    faults: AtomicU64,
    overlay_faults: AtomicU64,
    overlay_count: AtomicU32,
    overlay_bytes: AtomicU64,
    graduated_at_ms: AtomicU64,
    error: Mutex<String>,
    /// The fault worker serving it: where its commands go (it changes when the session
    /// follows its vCPU to another worker, see `crate::follow`).
    worker: AtomicUsize,
    /// The session's working-set recording and prefetch (see `crate::working_set`).
    pub working_set: WorkingSetFigures,
}

impl SessionShared {
    pub fn new(
        id: String,
        memory_file: String,
        regions: Vec<Region>,
        vmm_pid: u32,
        connected_at_ms: u64,
        version: String,
    ) -> Self {
        Self {
            id,
            memory_file,
            regions,
            vmm_pid,
            connected_at_ms,
            version,
            state: SessionLifecycle::default(),
            resident: AtomicU64::new(0),
            removed: AtomicU64::new(0),
            zero: AtomicU64::new(0),
            faults: AtomicU64::new(0),
            overlay_faults: AtomicU64::new(0),
            overlay_count: AtomicU32::new(0),
            overlay_bytes: AtomicU64::new(0),
            graduated_at_ms: AtomicU64::new(0),
            error: Mutex::new(String::new()),
            worker: AtomicUsize::new(0),
            working_set: WorkingSetFigures::default(),
        }
    }

    /// The fault worker serving the session.
    pub fn worker(&self) -> usize {
        self.worker.load(Ordering::Acquire)
    }

    /// Records that `worker` serves the session from now on (once it has the session).
    pub fn set_worker(&self, worker: usize) {
        self.worker.store(worker, Ordering::Release);
    }

    pub fn total_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }

    pub fn phase(&self) -> Phase {
        self.state.phase()
    }

    /// Changes the session's state (see `crate::lifecycle`); a graduation is timestamped.
    pub fn change(&self, change: Change) -> Result<Phase, Refused> {
        let to = self.state.change(change)?;
        if to == Phase::Graduated {
            let _ = self.graduated_at_ms.compare_exchange(
                0,
                uffdpager::grpc::now_ms(),
                Ordering::AcqRel,
                Ordering::Acquire,
            );
        }
        Ok(to)
    }

    pub fn is_live(&self) -> bool {
        self.phase().is_live()
    }

    pub fn set_figures(&self, resident: u64, removed: u64, faults: u64, overlay_faults: u64) {
        self.resident.store(resident, Ordering::Relaxed);
        self.removed.store(removed, Ordering::Relaxed);
        self.faults.store(faults, Ordering::Relaxed);
        self.overlay_faults.store(overlay_faults, Ordering::Relaxed);
    }

    /// Faults served, as last published.
    pub fn faults(&self) -> u64 {
        self.faults.load(Ordering::Relaxed)
    }

    /// The session's overlays: how many, and their bytes in all.
    pub fn set_overlays(&self, count: u32, bytes: u64) {
        self.overlay_count.store(count, Ordering::Relaxed);
        self.overlay_bytes.store(bytes, Ordering::Relaxed);
    }

    pub fn set_zero_bytes(&self, zero: u64) {
        self.zero.store(zero, Ordering::Relaxed);
    }

    pub fn set_error(&self, error: impl Into<String>) {
        *self.error.lock().expect("session error") = error.into();
    }

    pub fn to_proto(&self) -> api::Session {
        let graduated = self.graduated_at_ms.load(Ordering::Acquire);
        let mut s = api::Session {
            id: self.id.clone(),
            pager_version: self.version.clone(),
            state: self.phase().to_proto() as i32,
            outdated: false,
            memory_file: self.memory_file.clone(),
            socket_path: String::new(),
            created_at: None,
            connected_at: Some(timestamp_ms(self.connected_at_ms)),
            graduated_at: (graduated > 0).then(|| timestamp_ms(graduated)),
            total_bytes: self.total_bytes(),
            resident_bytes: self.resident.load(Ordering::Relaxed),
            removed_bytes: self.removed.load(Ordering::Relaxed),
            faults: self.faults.load(Ordering::Relaxed),
            regions: self
                .regions
                .iter()
                .map(|r| api::Region {
                    base_host_virt_addr: r.base,
                    size: r.size,
                    offset: r.offset,
                    page_size: r.page_size,
                })
                .collect(),
            labels: Default::default(),
            vmm_uid: None,
            error: self.error.lock().expect("session error").clone(),
            vmm_pid: self.vmm_pid,
            zero_bytes: self.zero.load(Ordering::Relaxed),
            overlay_count: self.overlay_count.load(Ordering::Relaxed),
            overlay_bytes: self.overlay_bytes.load(Ordering::Relaxed),
            overlay_faults: self.overlay_faults.load(Ordering::Relaxed),
            fault_worker: u32::try_from(self.worker()).unwrap_or(u32::MAX),
            ..Default::default()
        };
        self.working_set.fill(&mut s);
        s
    }
}

/// A completion in flight: its result (once known) and who waits for it.
#[derive(Debug, Clone)]
pub struct CompletionWatch {
    pub result: watch::Receiver<Option<CompletionResult>>,
    /// Callers waiting; the last one to give up cancels the completion.
    pub waiters: Arc<AtomicUsize>,
    pub cancel: Arc<std::sync::atomic::AtomicBool>,
    /// The latest of the waiters' deadlines (a joining caller extends it).
    pub deadline: Arc<crate::joined_deadline::JoinedDeadline>,
}

/// One row of the table.
#[derive(Debug)]
pub struct Entry {
    pub shared: Arc<SessionShared>,
    pub token: u64,
    pub completion: Option<CompletionWatch>,
}

impl Entry {
    /// The fault worker serving the session: where its commands go.
    pub fn worker(&self) -> usize {
        self.shared.worker()
    }
}

#[derive(Debug, Default)]
pub struct Registry {
    sessions: Mutex<HashMap<String, Entry>>,
    next_token: AtomicU64,
}

impl Registry {
    pub fn lock(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        self.sessions.lock().expect("session table")
    }

    pub fn next_token(&self) -> u64 {
        self.next_token.fetch_add(1, Ordering::Relaxed)
    }

    /// Sessions still being served.
    pub fn live_count(&self) -> usize {
        self.lock().values().filter(|e| e.shared.is_live()).count()
    }

    /// Live sessions per worker, to place a new one on the least loaded.
    pub fn least_loaded_worker(&self, workers: usize) -> usize {
        let mut load = vec![0usize; workers];
        for e in self.lock().values().filter(|e| e.shared.is_live()) {
            if let Some(l) = load.get_mut(e.worker()) {
                *l += 1;
            }
        }
        (0..workers).min_by_key(|&w| load[w]).unwrap_or(0)
    }

    pub fn snapshot(&self) -> Vec<api::Session> {
        let mut v: Vec<_> = self.lock().values().map(|e| e.shared.to_proto()).collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }
}
