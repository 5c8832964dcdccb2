//! Fault workers: a small, fixed number of OS threads, each serving the faults of many sessions
//! from one epoll set, so the pager's thread count does not grow with sessions. Each session is
//! owned by one worker (no locks on the fault path). The gRPC side talks to a worker over a
//! channel plus an eventfd that wakes its epoll.
//!
//! A completion runs on the worker that owns the session, one budget of pages at a time; between
//! budgets the worker polls every session's uffd without blocking, so faults (of that VM and of
//! every other) are served while a sweep runs.

mod background;
mod completions;
mod handle;
mod moves;

use std::collections::HashMap;
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::EventFd;
use tracing::{error, info, warn};
use uffdpager::handoff::VmmFd;

use crate::busy::Busy;
use crate::complete::Completion;
use crate::completion_result::CompleteError;
use crate::copy_threads::{ClaimDone, CopyThreads, Reply};
use crate::heartbeat::Heartbeat;
use crate::lifecycle::Change;
use crate::registry::SessionShared;
use crate::session::{Session, SessionError};
use crate::thread_priority::WorkerNice;

pub use handle::{Command, Peers, WorkerHandle};

/// The epoll token of the worker's eventfd (a session's tokens are `token << 1` and `| 1`).
const WAKE: u64 = u64::MAX;
/// The largest completion step, reached while no fault comes in (unless the smallest is larger).
const MAX_STEP_BYTES: u64 = 8 << 20;

struct Worker {
    /// This worker's index among the pager's workers.
    index: usize,
    /// The other workers, to hand a session to one (see `moves`).
    peers: Peers,
    /// Sessions handed to another worker, and when: commands for them still arriving here are
    /// passed on (see `moves`).
    moved: HashMap<u64, (usize, Instant)>,
    epoll: Epoll,
    wake: Arc<EventFd>,
    rx: Receiver<Command>,
    sessions: HashMap<u64, Session>,
    /// Completions in progress, served round-robin one budget at a time.
    completions: Vec<(u64, Completion)>,
    /// Whether some completion has pages for this worker to copy (else they wait for copy
    /// threads, or there are none).
    working: bool,
    copies: Option<CopyThreads>,
    /// Where copy threads answer this worker's claims.
    reply: Reply,
    claims_rx: Receiver<ClaimDone>,
    /// Sessions with read-ahead in progress, served round-robin one chunk at a time.
    streams: Vec<u64>,
    /// Sessions whose faults this round left blocks around them to fill (see
    /// `Worker::fill_around_blocks`).
    around: Vec<u64>,
    /// Sessions prefetching a working set, served round-robin one budget at a time.
    prefetches: Vec<u64>,
    /// When each session recording its working set stops recording.
    record_deadlines: Vec<(Instant, u64)>,
    version: String,
    budget: u64,
    /// The current completion step (adapts between `budget` and `MAX_STEP_BYTES`).
    step: u64,
    /// How long to keep polling after a fault before sleeping in epoll_wait.
    spin: Duration,
    /// Counted at every turn of the loop (see `crate::watchdog`).
    heartbeat: Arc<Heartbeat>,
}

impl Worker {
    fn run(mut self) {
        let mut events = vec![EpollEvent::empty(); 256];
        let mut last_fault: Option<Instant> = None;
        let mut busy = Busy::default();
        let mut nice = WorkerNice::default();
        loop {
            self.heartbeat.beat();
            nice.set(self.working || !self.streams.is_empty() || !self.completions.is_empty());
            // Right after a fault, poll instead of sleeping for a short while: a vCPU touching
            // memory faults again within microseconds, and a sleeping worker costs it a
            // cross-CPU wake-up (tens of µs on a VM host) on top of its own. Each poll yields,
            // so a vCPU runnable on this CPU is not held up. A worker allowed only one CPU does
            // not poll: there is no other CPU whose wake-up polling could save, and a vCPU
            // sharing that CPU measurably loses time to it (see BENCHMARKS.md); nor does a
            // worker on a busy machine (see `crate::busy`).
            // One clock read for both questions, and none once the window has passed (a clock
            // read costs ~170 ns on this VM host's TSC).
            let spinning = match last_fault {
                Some(t) if !self.spin.is_zero() => {
                    let now = Instant::now();
                    let within = now.saturating_duration_since(t) < self.spin;
                    if !within {
                        last_fault = None;
                    }
                    within && busy.may_poll(now)
                }
                _ => false,
            };
            if spinning {
                std::thread::yield_now();
            }
            let idle =
                !self.working && self.streams.is_empty() && self.prefetches.is_empty() && !spinning;
            let timeout = if idle { self.record_timeout() } else { EpollTimeout::ZERO };
            let n = match self.epoll.wait(&mut events, timeout) {
                Ok(n) => n,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    error!(version = %self.version, error = %e, "epoll_wait failed; fault worker stops");
                    return;
                }
            };
            let mut faulted = false;
            for ev in &events[..n] {
                let data = ev.data();
                if data == WAKE {
                    let _ = self.wake.read();
                    if !self.take_commands() {
                        self.release_all();
                        return;
                    }
                    continue;
                }
                let token = data >> 1;
                if data & 1 == 0 {
                    faulted = true;
                    self.on_uffd(token);
                } else {
                    self.end(
                        token,
                        Release::Ended,
                        "the VMM exited (EOF on its socket, or its pidfd)".into(),
                    );
                }
            }
            if faulted {
                let now = Instant::now();
                last_fault = Some(now);
                crate::memory_file::zero_scan::note_fault(now);
            }
            self.fill_around_blocks();
            self.take_claims_done();
            self.step_completions(faulted);
            self.step_streams();
            self.step_prefetches();
            self.finish_due_recordings();
        }
    }

    /// Applies queued commands; false on Shutdown.
    fn take_commands(&mut self) -> bool {
        while let Ok(cmd) = self.rx.try_recv() {
            let Some(cmd) = self.pass_on_if_moved(cmd) else { continue };
            match cmd {
                Command::Add { token, session, adopt, reply } => {
                    let _ = reply.send(self.add(token, *session, adopt));
                }
                Command::Complete { token, completion } => {
                    if let Some(s) = self.sessions.get_mut(&token) {
                        // Graduation touches every page: the first touches end here.
                        s.finish_recording("graduation began");
                        self.completions.push((token, *completion));
                    } else {
                        completion.fail(CompleteError::SessionEnded(
                            "the session is no longer served".into(),
                        ));
                    }
                }
                Command::Drop { token, reason } => self.end(token, Release::Ended, reason),
                Command::GiveBack { token, reply } => {
                    let answer = match self.sessions.get(&token) {
                        Some(s) => s.give_back().map_err(|e| format!("duplicating: {e}")),
                        None => Err("the session is no longer served".to_string()),
                    };
                    let _ = reply.send(answer);
                }
                Command::Move { token, to } => self.move_session(token, to),
                Command::Moved { token, session } => self.take_moved(token, *session),
                Command::Shutdown => {
                    // Sessions handed here still in the channel are released with the rest.
                    while let Ok(cmd) = self.rx.try_recv() {
                        if let Command::Moved { token, session } = cmd {
                            self.take_moved(token, *session);
                        }
                    }
                    return false;
                }
            }
        }
        true
    }

    fn add(&mut self, token: u64, mut session: Session, adopt: bool) -> Result<(), String> {
        self.watch(token, &session)?;
        if adopt {
            session.learn_present_from_pagemap();
            if let Err(e) = session.wake_all() {
                warn!(session = %session.id(), version = %self.version, error = %e, "waking adopted session");
            }
        }
        info!(session = %session.id(), version = %self.version, adopt, regions = session.regions.len(), "serving session");
        self.serve(token, session);
        Ok(())
    }

    /// Puts a session's uffd and VMM descriptor in this worker's epoll set.
    fn watch(&self, token: u64, session: &Session) -> Result<(), String> {
        self.epoll
            .add(&session.uffd, EpollEvent::new(EpollFlags::EPOLLIN, token << 1))
            .map_err(|e| format!("adding the uffd to epoll: {e}"))?;
        // A stream says the VMM is gone with EOF; a pidfd by turning readable.
        let gone = match session.vmm_kind {
            VmmFd::Stream => EpollFlags::EPOLLRDHUP,
            VmmFd::Pidfd => EpollFlags::EPOLLIN,
        };
        if let Err(e) = self.epoll.add(session.vmm_fd(), EpollEvent::new(gone, (token << 1) | 1)) {
            let _ = self.epoll.delete(&session.uffd);
            return Err(format!("adding the VMM stream to epoll: {e}"));
        }
        Ok(())
    }

    /// Serves a session whose descriptors are watched: its prefetch and recording deadline
    /// join this worker's, and the faults queued meanwhile are served.
    fn serve(&mut self, token: u64, session: Session) {
        if session.prefetching() {
            self.prefetches.push(token);
        }
        if let Some(at) = session.recording_until() {
            self.record_deadlines.push((at, token));
        }
        self.sessions.insert(token, session);
        // Faults may have queued before the uffd joined the epoll set.
        self.on_uffd(token);
    }

    fn on_uffd(&mut self, token: u64) {
        let Some(s) = self.sessions.get_mut(&token) else { return };
        match s.on_readable() {
            Ok(()) => {
                if s.streaming() && !self.streams.contains(&token) {
                    self.streams.push(token);
                }
                if s.has_around() && !self.around.contains(&token) {
                    self.around.push(token);
                }
            }
            Err(e) => self.fail_session(token, e),
        }
    }

    /// Ends a session whose fault serving failed.
    fn fail_session(&mut self, token: u64, e: SessionError) {
        let state = match e {
            SessionError::Gone(_) | SessionError::VmmGone(_) => Release::Ended,
            _ => Release::Failed,
        };
        self.end(token, state, e.to_string());
    }

    /// Serves faults that a bulk step read from the uffd while waiting out an `EAGAIN`: their
    /// uffd will not turn readable again for them.
    fn serve_queued(&mut self, token: u64) {
        let Some(s) = self.sessions.get_mut(&token) else { return };
        if s.has_pending() {
            self.on_uffd(token);
        }
    }

    /// Stops serving a session: out of epoll, fds closed, final state published.
    fn end(&mut self, token: u64, state: Release, reason: String) {
        let Some(mut s) = self.sessions.remove(&token) else { return };
        s.finish_recording("the session ended");
        self.record_deadlines.retain(|d| d.1 != token);
        let _ = self.epoll.delete(&s.uffd);
        let _ = self.epoll.delete(s.vmm_fd());
        if let Some(pos) = self.completions.iter().position(|(t, _)| *t == token) {
            let (_, c) = self.completions.swap_remove(pos);
            c.fail(CompleteError::SessionEnded(reason.clone()));
        }
        s.publish();
        let error = if state == Release::Graduated { String::new() } else { reason.clone() };
        match s.take_saving() {
            // Whoever sees the session end sees its recording's outcome too: the final state is
            // published once the recording is saved (on a thread of its own, not this worker).
            Some(saving) if !saving.is_finished() => {
                let shared = Arc::clone(&s.shared);
                let (err, st) = (error.clone(), state);
                let spawned = std::thread::Builder::new().name("ws-end".into()).spawn(move || {
                    let _ = saving.join();
                    shared.set_error(err);
                    publish_end(&shared, st);
                });
                if let Err(e) = spawned {
                    warn!(session = %s.id(), version = %self.version, error = %e, "waiting for the working set's save");
                    s.shared.set_error(error);
                    publish_end(&s.shared, state);
                }
            }
            _ => {
                s.shared.set_error(error);
                publish_end(&s.shared, state);
            }
        }
        if s.unexpected_events() > 0 {
            warn!(session = %s.id(), version = %self.version, count = s.unexpected_events(), "session saw unexpected userfaultfd events");
        }
        info!(session = %s.id(), version = %self.version, state = ?state, reason = %reason, faults = s.faults(), "session released");
        drop(s);
    }

    fn release_all(&mut self) {
        let tokens: Vec<u64> = self.sessions.keys().copied().collect();
        for t in tokens {
            self.end(t, Release::Ended, "the pager shut down".into());
        }
    }
}

/// Why a worker lets go of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Release {
    /// Its completion finished: every page resident, every region unregistered.
    Graduated,
    /// Its VMM exited, an operator dropped it, or the pager shuts down.
    Ended,
    /// Serving it failed (the VMM's memory is still there): it ends, with the error.
    Failed,
}

/// Publishes how a released session ended: ENDED is made here (for a failure too, with its
/// error); GRADUATED was made by the completion's finish, before its callers were answered.
fn publish_end(shared: &SessionShared, state: Release) {
    if state != Release::Graduated {
        let _ = shared.change(Change::End);
    }
}
