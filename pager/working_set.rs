//! Working sets (issue 15) on the pager's side: recording the order in which a session's VM first
//! touches its pages, and prefetching a recording in bulk (see `uffdpager::working_set` for the
//! file and why a recording can never put wrong bytes in a guest: it holds offsets, not data).
//!
//! **Recording** follows the fault path: each fault's page (or the block a sequential fault
//! gets) and each read-ahead chunk, coalesced into runs, at most `max_runs` of them, for the
//! first `record_for` after the handoff or until graduation begins or the session ends,
//! whichever comes first. Then a thread of its own saves it (the fault worker never waits on
//! the file system); a session that ends meanwhile publishes its final state once the file is
//! saved, so that whoever sees the session ended sees the recording's outcome too.
//!
//! **Prefetch** copies the recorded runs in recorded order on the session's fault worker, with
//! the same fill as faults and read-ahead (`Session::fill` in `Populate` mode: present pages are
//! passed over, discarded ranges are never written, overlay pages come from the overlay). Faults
//! come first: the worker serves every readable uffd before each prefetch step, a step is at most
//! the completion budget (`--complete-step-bytes`, 256 KiB), and within a step the session's own
//! uffd is polled every [`POLL_EVERY`] bytes, so a vCPU waits for at most one such copy.

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use tracing::{info, warn};
use uffdpager::api::{self, WorkingSetState};
use uffdpager::firecracker::Region;
use uffdpager::working_set::{self, FileIdentity, Recording, RunRecorder};

use crate::memory_file::MappedFile;
use crate::session::{FillMode, Session, SessionError};

/// Bytes a prefetch step copies between two looks at its session's uffd.
pub const POLL_EVERY: u64 = 64 << 10;

/// The pager's recording settings (`--record-working-set-secs`, `--record-working-set-max-runs`).
#[derive(Debug, Clone, Copy)]
pub struct RecordSettings {
    pub record_for: Duration,
    pub max_runs: usize,
}

impl Default for RecordSettings {
    fn default() -> Self {
        Self { record_for: Duration::from_secs(30), max_runs: 1 << 18 }
    }
}

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

/// A recording in progress.
#[derive(Debug)]
pub struct Recorder {
    path: PathBuf,
    runs: RunRecorder,
    until: Instant,
    bytes: u64,
}

impl Recorder {
    pub fn new(path: PathBuf, settings: RecordSettings) -> Self {
        Self {
            path,
            runs: RunRecorder::new(settings.max_runs),
            until: Instant::now() + settings.record_for,
            bytes: 0,
        }
    }

    /// When recording stops by itself.
    pub fn until(&self) -> Instant {
        self.until
    }
}

/// A prefetch in progress: the recorded runs as page ranges, and how far it got.
#[derive(Debug)]
pub struct Prefetch {
    runs: Vec<(usize, u64, u64)>,
    next: usize,
    /// First page of the current run not yet processed.
    at: u64,
    processed: u64,
    copied: u64,
    started: Instant,
}

/// Loads the recording at `path` for a session of `regions` served from `file`, checking that
/// it was made of this memory file and this layout. The reason on refusal. Blocking (reads the
/// recording and 2 MiB of the memory file).
pub fn load_prefetch(
    path: &str,
    file: &Arc<MappedFile>,
    regions: &[Region],
) -> Result<Prefetch, String> {
    let recording = working_set::read(std::path::Path::new(path)).map_err(|e| e.to_string())?;
    let identity = FileIdentity::of(file.file())
        .map_err(|e| format!("reading the memory file's identity: {e}"))?;
    recording.fits(&identity, regions).map_err(|e| format!("{path}: {e}"))?;
    read_ahead_in_file_order(file, &recording);
    let runs = recording.page_runs();
    Ok(Prefetch {
        at: runs.first().map_or(0, |r| r.1),
        runs,
        next: 0,
        processed: 0,
        copied: 0,
        started: Instant::now(),
    })
}

/// Runs closer than this in the memory file are read from it as one.
const FILE_GAP: u64 = 2 << 20;

/// Asks the kernel to read the recorded ranges of the memory file into the page cache, in file
/// order and merged across small gaps (`POSIX_FADV_WILLNEED`: the reads are started, not waited
/// for): a cold memory file is then read in large sequential requests, not one 4 KiB random
/// read per recorded page as the copies in recorded order would ask. On a thread of its own (a
/// request queue that is full blocks the caller): the handoff does not wait. Best effort.
fn read_ahead_in_file_order(file: &Arc<MappedFile>, recording: &Recording) {
    use std::os::fd::AsRawFd;
    let mut spans: Vec<(u64, u64)> =
        recording.runs.iter().map(|r| (r.offset, r.offset + r.len)).collect();
    spans.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (a, b) in spans {
        match merged.last_mut() {
            Some(last) if a <= last.1 + FILE_GAP => last.1 = last.1.max(b),
            _ => merged.push((a, b)),
        }
    }
    let file = Arc::clone(file);
    let _ = std::thread::Builder::new().name("ws-readahead".into()).spawn(move || {
        for (a, b) in merged {
            let (Ok(off), Ok(len)) = (i64::try_from(a), i64::try_from(b - a)) else { continue };
            let _ = nix::fcntl::posix_fadvise(
                file.file().as_raw_fd(),
                off,
                len,
                nix::fcntl::PosixFadviseAdvice::POSIX_FADV_WILLNEED,
            );
        }
    });
}

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
                let total: u64 = p
                    .runs
                    .iter()
                    .map(|&(ri, a, b)| (b - a) * self.regions[ri].region.page_size)
                    .sum();
                ws.prefetch_total.store(total, Ordering::Relaxed);
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
        if rec.runs.push(ri, first, end) {
            rec.bytes += (end - first) * self.regions[ri].region.page_size;
            self.shared.working_set.recorded.store(rec.bytes, Ordering::Relaxed);
        }
    }

    /// The time the recording stops by itself, if one runs.
    pub fn recording_until(&self) -> Option<Instant> {
        self.recorder.as_ref().map(Recorder::until)
    }

    /// Stops recording (deadline, graduation or end) and saves it on a thread of its own.
    pub fn finish_recording(&mut self, why: &'static str) {
        let Some(rec) = self.recorder.take() else { return };
        let shared = Arc::clone(&self.shared);
        let file = Arc::clone(&self.file);
        let regions = shared.regions.clone();
        let handle = std::thread::Builder::new().name("ws-save".into()).spawn(move || {
            let ws = &shared.working_set;
            let saved = FileIdentity::of(file.file()).and_then(|identity| {
                let recording = Recording {
                    identity,
                    recorded_at_ms: uffdpager::grpc::now_ms(),
                    regions: regions.iter().map(Into::into).collect(),
                    runs: rec.runs.file_runs(&regions),
                };
                working_set::write_atomically(&rec.path, &recording).map(|()| recording)
            });
            match saved {
                Ok(r) => {
                    info!(session = %shared.id, version = %shared.version, path = %rec.path.display(), why,
                        runs = r.runs.len(), bytes = r.total_bytes(), dropped = rec.runs.dropped(), "working set saved");
                    ws.set_record(WorkingSetState::Done, format!("saved to {} ({why})", rec.path.display()));
                }
                Err(e) => {
                    warn!(session = %shared.id, version = %shared.version, path = %rec.path.display(), error = %e, "saving the working set failed");
                    ws.set_record(WorkingSetState::Failed, format!("saving to {}: {e}", rec.path.display()));
                }
            }
        });
        match handle {
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
        ws.prefetched.store(p.processed, Ordering::Relaxed);
        ws.prefetch_copied.store(p.copied, Ordering::Relaxed);
        self.publish();
        match result {
            Ok(true) => {
                self.prefetch = Some(p);
                Ok(true)
            }
            Ok(false) => {
                info!(session = %self.shared.id, version = %self.shared.version, processed = p.processed, copied = p.copied,
                    ms = u64::try_from(p.started.elapsed().as_millis()).unwrap_or(u64::MAX), "working-set prefetch done");
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
        while let Some(&(ri, _, end)) = p.runs.get(p.next) {
            if left == 0 {
                return Ok(true);
            }
            let ps = self.regions[ri].region.page_size;
            let pages = (left / ps).max(1).min(end - p.at);
            let copied = self.fill(ri, p.at, p.at + pages, FillMode::Populate)?;
            p.at += pages;
            p.processed += pages * ps;
            p.copied += copied * ps;
            left = left.saturating_sub(pages * ps);
            since_poll += copied * ps;
            if p.at >= end {
                p.next += 1;
                p.at = p.runs.get(p.next).map_or(0, |r| r.1);
            }
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
        Ok(false)
    }
}
