//! The controller's shared state: a handle ([`Shared`]) paired with the watchers that fill it,
//! the runner that acts on it, and the service that reports it. Everything sits behind one
//! mutex that is never held across an await.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;

use crate::config::Config;
use crate::inventory::{Inventory, SessionKey};
use crate::plan::{plan, Plan, PlanInput};

/// The wall clock the plan reads. Soak ages compare with the supervisors' `connected_at`, so the
/// loop uses the system's wall clock; tests use one that follows tokio's (pausable) time.
#[derive(Debug, Clone)]
pub enum Clock {
    System,
    /// `wall` at tokio instant `since`, advancing with tokio time (tests only).
    #[cfg(test)]
    Tokio {
        wall: SystemTime,
        since: tokio::time::Instant,
    },
}

impl Clock {
    /// A clock that starts at `wall` now and follows tokio's time.
    #[cfg(test)]
    pub fn tokio_at(wall: SystemTime) -> Self {
        Clock::Tokio { wall, since: tokio::time::Instant::now() }
    }

    pub fn now(&self) -> SystemTime {
        match self {
            Clock::System => SystemTime::now(),
            #[cfg(test)]
            Clock::Tokio { wall, since } => *wall + since.elapsed(),
        }
    }
}

/// Where one supervisor's WatchSessions stream stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// The controller is disabled.
    NotWatched,
    Connecting,
    /// Receiving the snapshot.
    Syncing,
    /// Snapshot complete, following changes: the only state the plan uses.
    Watching,
    /// Waiting before the next attempt.
    Backoff,
}

/// One watched supervisor.
#[derive(Debug, Clone)]
pub struct SupervisorState {
    pub endpoint: String,
    pub conn: ConnState,
    /// The last complete inventory (kept, for display, while reconnecting).
    pub inventory: Inventory,
    pub watching_since: Option<SystemTime>,
    pub last_error: String,
    /// Attempts to watch again after the first.
    pub reconnects: u64,
    pub events: u64,
}

/// A CompleteSession call in flight.
#[derive(Debug, Clone)]
pub struct InFlight {
    pub pager_version: String,
    pub reason: String,
    pub started_at: SystemTime,
    pub started: tokio::time::Instant,
    /// Calls in flight, this one included, when it started.
    pub in_flight_at_start: u32,
}

/// How a graduation attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutcomeKind {
    Graduated,
    AlreadyGraduated,
    TimedOut,
    Failed,
    NotGraduatable,
    DryRun,
}

impl OutcomeKind {
    /// Whether the session stays SERVING and is retried after the failure backoff.
    pub fn is_failure(self) -> bool {
        matches!(self, OutcomeKind::TimedOut | OutcomeKind::Failed | OutcomeKind::NotGraduatable)
    }
}

/// One finished graduation attempt.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub seq: u64,
    pub key: SessionKey,
    pub pager_version: String,
    pub result: OutcomeKind,
    pub reason: String,
    pub error: String,
    pub started_at: SystemTime,
    pub finished_at: SystemTime,
    pub duration: Duration,
    pub in_flight_at_start: u32,
    pub populated_bytes: u64,
}

/// Counters since start.
#[derive(Debug, Clone, Default)]
pub struct Counters {
    /// Plans computed by the loop.
    pub scans: u64,
    /// CompleteSession calls started.
    pub started: u64,
    /// Calls answered OK with a fresh graduation.
    pub graduated: u64,
    /// Calls answered OK for a session that had already graduated.
    pub already_graduated: u64,
    /// Calls that hit `completion_timeout`.
    pub timed_out: u64,
    /// Calls that failed otherwise (the session keeps serving).
    pub failed: u64,
    /// Calls refused with FAILED_PRECONDITION or NOT_FOUND.
    pub not_graduatable: u64,
    /// Dry run: graduations recorded instead of called.
    pub dry_run: u64,
    /// WatchSessions events received.
    pub watch_events: u64,
    /// Attempts to watch again, over every supervisor.
    pub reconnects: u64,
    /// Most calls in flight at once.
    pub peak_in_flight: u32,
}

/// Everything the controller knows.
#[derive(Debug)]
pub struct State {
    /// In configuration order.
    pub supervisors: Vec<SupervisorState>,
    pub in_flight: HashMap<SessionKey, InFlight>,
    /// When each session's last graduation failed (until `failure_backoff` has passed).
    pub failed_at: HashMap<SessionKey, SystemTime>,
    /// Dry run: sessions recorded as graduated; the plan treats them as gone.
    pub dry_run_done: HashSet<SessionKey>,
    /// The last outcomes, oldest first.
    pub outcomes: VecDeque<Outcome>,
    pub counters: Counters,
    pub last_scan_at: Option<SystemTime>,
    next_seq: u64,
    history: usize,
}

impl State {
    pub fn supervisor_mut(&mut self, endpoint: &str) -> Option<&mut SupervisorState> {
        self.supervisors.iter_mut().find(|s| s.endpoint == endpoint)
    }

    /// The plan over every supervisor in sync, as of `now`.
    pub fn plan(&self, config: &Config, now: SystemTime) -> Plan {
        let mut pruned: Vec<(&str, Inventory)> = Vec::new();
        let mut borrowed: Vec<(&str, &Inventory)> = Vec::new();
        for s in self.supervisors.iter().filter(|s| s.conn == ConnState::Watching) {
            if self.dry_run_done.iter().any(|k| k.supervisor == s.endpoint) {
                let mut inv = s.inventory.clone();
                inv.sessions
                    .retain(|id, _| !self.dry_run_done.contains(&SessionKey::new(&s.endpoint, id)));
                pruned.push((&s.endpoint, inv));
            } else {
                borrowed.push((&s.endpoint, &s.inventory));
            }
        }
        borrowed.extend(pruned.iter().map(|(e, inv)| (*e, inv)));
        let in_flight: HashSet<SessionKey> = self.in_flight.keys().cloned().collect();
        plan(&PlanInput {
            supervisors: &borrowed,
            policy: &config.policy,
            now,
            in_flight: &in_flight,
            failed_at: &self.failed_at,
        })
    }

    /// The next outcome's sequence number.
    pub fn next_seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }

    /// Keeps an outcome (dropping the oldest beyond the history) and counts it.
    pub fn record(&mut self, outcome: Outcome) {
        let c = &mut self.counters;
        match outcome.result {
            OutcomeKind::Graduated => c.graduated += 1,
            OutcomeKind::AlreadyGraduated => c.already_graduated += 1,
            OutcomeKind::TimedOut => c.timed_out += 1,
            OutcomeKind::Failed => c.failed += 1,
            OutcomeKind::NotGraduatable => c.not_graduatable += 1,
            OutcomeKind::DryRun => c.dry_run += 1,
        }
        while self.outcomes.len() >= self.history {
            self.outcomes.pop_front();
        }
        self.outcomes.push_back(outcome);
    }

    /// Forgets failures older than the backoff, and dry-run records of sessions gone.
    pub fn expire(&mut self, now: SystemTime, backoff: Duration) {
        self.failed_at.retain(|_, at| now.duration_since(*at).map_or(true, |d| d < backoff));
        let supervisors = &self.supervisors;
        self.dry_run_done.retain(|k| {
            supervisors.iter().find(|s| s.endpoint == k.supervisor).is_some_and(|s| {
                s.conn != ConnState::Watching || s.inventory.sessions.contains_key(&k.session)
            })
        });
    }
}

/// The handle shared by the watchers, the runner and the service.
#[derive(Debug)]
pub struct Shared {
    pub config: Config,
    pub clock: Clock,
    pub started_at: SystemTime,
    /// Wakes the runner for a scan (stream events, reconnects).
    pub wake: Notify,
    /// TLS (client certificate, CA) for `https://` supervisors.
    pub supervisor_tls: Option<tonic::transport::ClientTlsConfig>,
    state: Mutex<State>,
}

impl Shared {
    /// The state of a controller with `config`; it dials `https://` supervisors with
    /// `supervisor_tls`.
    pub fn new(
        config: Config,
        clock: Clock,
        supervisor_tls: Option<tonic::transport::ClientTlsConfig>,
    ) -> Arc<Self> {
        let conn = if config.enabled { ConnState::Connecting } else { ConnState::NotWatched };
        let supervisors = config
            .supervisors
            .iter()
            .map(|e| SupervisorState {
                endpoint: e.clone(),
                conn,
                inventory: Inventory::default(),
                watching_since: None,
                last_error: String::new(),
                reconnects: 0,
                events: 0,
            })
            .collect();
        let state = State {
            supervisors,
            in_flight: HashMap::new(),
            failed_at: HashMap::new(),
            dry_run_done: HashSet::new(),
            outcomes: VecDeque::new(),
            counters: Counters::default(),
            last_scan_at: None,
            next_seq: 0,
            history: config.outcome_history.max(1),
        };
        Arc::new(Self {
            started_at: clock.now(),
            clock,
            config,
            wake: Notify::new(),
            supervisor_tls,
            state: Mutex::new(state),
        })
    }

    /// Locks the state. A panic elsewhere while it was held (there should be none) leaves data
    /// that is still consistent field by field, so the poison is ignored.
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Wall-clock now.
    pub fn now(&self) -> SystemTime {
        self.clock.now()
    }
}
