//! The gRPC side's handle on one fault worker: starting its thread, and the commands it takes
//! over a channel plus the eventfd that wakes its epoll.

use std::collections::HashMap;
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
use nix::sys::eventfd::{EfdFlags, EventFd};
use uffdpager::handoff::{HandoffRequest, SessionFds};

use super::{Worker, WAKE};
use crate::complete::Completion;
use crate::copy_threads::{CopyThreads, Reply};
use crate::heartbeat::Heartbeat;
use crate::session::Session;

/// Work for a worker thread.
#[derive(Debug)]
pub enum Command {
    /// Start serving a session; answer once its fds are in the epoll set.
    Add { token: u64, session: Box<Session>, adopt: bool, reply: Sender<Result<(), String>> },
    /// Start graduating a session.
    Complete { token: u64, completion: Box<Completion> },
    /// Stop serving a session and release it (operator's forced end).
    Drop { token: u64, reason: String },
    /// Duplicates of a session's descriptors, for a restarted supervisor.
    GiveBack { token: u64, reply: Sender<Result<(HandoffRequest, SessionFds), String>> },
    /// Hand a session to worker `to`, whose CPU its vCPU runs on (see `crate::follow`), once
    /// it has nothing in progress here.
    Move { token: u64, to: usize },
    /// A session another worker handed over: serve it from here on.
    Moved { token: u64, session: Box<Session> },
    /// Release every session and exit the thread.
    Shutdown,
}

impl Command {
    /// The session a command is about, if one.
    pub(super) fn token(&self) -> Option<u64> {
        match self {
            Command::Add { token, .. }
            | Command::Complete { token, .. }
            | Command::Drop { token, .. }
            | Command::GiveBack { token, .. }
            | Command::Move { token, .. }
            | Command::Moved { token, .. } => Some(*token),
            Command::Shutdown => None,
        }
    }
}

/// The gRPC side's handle on one worker thread.
#[derive(Debug)]
pub struct WorkerHandle {
    /// Its command channel and eventfd.
    peer: Peer,
    heartbeat: Arc<Heartbeat>,
    thread: Option<JoinHandle<()>>,
}

/// One worker's way to reach another: to hand it a session, or a command for a session it
/// handed over.
#[derive(Debug, Clone)]
pub struct Peer {
    tx: Sender<Command>,
    wake: Arc<EventFd>,
}

impl Peer {
    /// Sends `command`; it comes back if the worker has stopped.
    pub fn send(&self, command: Command) -> Result<(), Command> {
        self.tx.send(command).map_err(|e| e.0)?;
        // A full eventfd counter still wakes the worker; nothing else can fail here.
        let _ = self.wake.write(1);
        Ok(())
    }
}

/// Every worker's [`Peer`], known once all are started.
pub type Peers = Arc<OnceLock<Vec<Peer>>>;

impl WorkerHandle {
    /// Starts a worker thread. `budget` is the completion step in bytes; `copies`, if any, take
    /// claims of completions while their VM is quiet.
    ///
    /// `cpu`, if given, is the one CPU the worker runs on (`--follow-vcpus`); `peers` reach the
    /// other workers.
    pub fn spawn(
        index: usize,
        version: String,
        budget: u64,
        spin: Duration,
        copies: Option<CopyThreads>,
        cpu: Option<usize>,
        peers: Peers,
    ) -> std::io::Result<Self> {
        let wake = Arc::new(EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?);
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        epoll.add(wake.as_ref(), EpollEvent::new(EpollFlags::EPOLLIN, WAKE))?;
        let (tx, rx) = mpsc::channel();
        let (claims_tx, claims_rx) = mpsc::channel();
        let reply = Reply { tx: claims_tx, wake: Arc::clone(&wake) };
        let worker_wake = Arc::clone(&wake);
        let heartbeat = Arc::new(Heartbeat::default());
        let beats = Arc::clone(&heartbeat);
        let thread =
            std::thread::Builder::new().name(format!("fault-{index}")).spawn(move || {
                if let Some(cpu) = cpu {
                    crate::thread_priority::pin_to_cpu(cpu, index);
                }
                Worker {
                    index,
                    peers,
                    moved: HashMap::new(),
                    epoll,
                    wake: worker_wake,
                    rx,
                    sessions: HashMap::new(),
                    completions: Vec::new(),
                    working: false,
                    copies,
                    reply,
                    claims_rx,
                    streams: Vec::new(),
                    around: Vec::new(),
                    prefetches: Vec::new(),
                    record_deadlines: Vec::new(),
                    version,
                    budget,
                    step: budget,
                    spin,
                    heartbeat: beats,
                }
                .run()
            })?;
        Ok(Self { peer: Peer { tx, wake }, heartbeat, thread: Some(thread) })
    }

    /// How another worker reaches this one.
    pub fn peer(&self) -> Peer {
        self.peer.clone()
    }

    /// The worker's count of loop turns, for the watchdog.
    pub fn heartbeat(&self) -> &Heartbeat {
        &self.heartbeat
    }

    /// Wakes the worker so that it turns once (the watchdog's poke; harmless if it is busy).
    pub fn poke(&self) {
        let _ = self.peer.wake.write(1);
    }

    pub fn send(&self, command: Command) -> Result<(), String> {
        self.peer.tx.send(command).map_err(|_| "fault worker has stopped".to_string())?;
        self.peer.wake.write(1).map_err(|e| format!("waking fault worker: {e}"))?;
        Ok(())
    }

    /// Stops the thread and waits for it.
    pub fn shutdown(&mut self) {
        let _ = self.send(Command::Shutdown);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}
