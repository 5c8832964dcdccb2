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

//!
//! This module holds the recording and the prefetch cursor; the session drives them
//! (`crate::session`'s `working_set`).

use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::{info, warn};
use uffdpager::api::WorkingSetState;
use uffdpager::firecracker::Region;
use uffdpager::working_set::{self, FileIdentity, Recording, RunRecorder};

use crate::memory_file::MappedFile;
use crate::registry::SessionShared;

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

    /// Notes `pages` of region `ri` (of `page_size`) as first touched now. The bytes recorded so
    /// far if they grew (a run the recording had no room for is dropped, and counted).
    pub fn touch(&mut self, ri: usize, pages: std::ops::Range<u64>, page_size: u64) -> Option<u64> {
        let len = pages.end - pages.start;
        self.runs.push(ri, pages.start, pages.end).then(|| {
            self.bytes += len * page_size;
            self.bytes
        })
    }

    /// Saves the recording of `shared`'s session, made of `file`, on a thread of its own (the
    /// fault worker never waits on the file system), and publishes the outcome (`why`: what
    /// ended the recording).
    pub fn save(
        self,
        shared: Arc<SessionShared>,
        file: Arc<MappedFile>,
        why: &'static str,
    ) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new().name("ws-save".into()).spawn(move || {
            crate::fault_inject::before_working_set_save();
            let rec = self;
            let ws = &shared.working_set;
            let regions = &shared.regions;
            let saved = FileIdentity::of(file.file()).and_then(|identity| {
                let recording = Recording {
                    identity,
                    recorded_at_ms: uffdpager::grpc::now_ms(),
                    regions: regions.iter().map(Into::into).collect(),
                    runs: rec.runs.file_runs(regions),
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
        })
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

impl Prefetch {
    /// Bytes of the recording, for regions of `page_size(ri)`.
    pub fn total_bytes(&self, page_size: impl Fn(usize) -> u64) -> u64 {
        self.runs.iter().map(|&(ri, a, b)| (b - a) * page_size(ri)).sum()
    }

    /// The next span to copy, at most `max_pages(ri)` pages (at least one): region and pages.
    /// `None` once the recording is done.
    pub fn next_span(
        &self,
        max_pages: impl Fn(usize) -> u64,
    ) -> Option<(usize, std::ops::Range<u64>)> {
        let &(ri, _, end) = self.runs.get(self.next)?;
        let pages = max_pages(ri).max(1).min(end - self.at);
        Some((ri, self.at..self.at + pages))
    }

    /// Moves past the span [`Self::next_span`] gave, of which `copied` pages were copied (the
    /// rest were present or discarded).
    pub fn advance(&mut self, pages: u64, copied: u64, page_size: u64) {
        self.at += pages;
        self.processed += pages * page_size;
        self.copied += copied * page_size;
        if self.runs.get(self.next).is_some_and(|&(_, _, end)| self.at >= end) {
            self.next += 1;
            self.at = self.runs.get(self.next).map_or(0, |r| r.1);
        }
    }

    /// Bytes processed (copied, or found present or discarded) and copied so far.
    pub fn progress(&self) -> (u64, u64) {
        (self.processed, self.copied)
    }

    /// How long the prefetch has run.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
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
