//! The session inventory: every session's public record, and the stream of changes to it.
//!
//! A handle paired with its service (like tonic-health's reporter): [`Inventory`] is cheap to
//! clone, shares one state behind a mutex, and is pure bookkeeping (no sockets, no processes),
//! so its event ordering is tested by calling its methods directly.
//!
//! Events: every change is broadcast in the order it was made, under the same lock as the change
//! itself. A watcher takes its snapshot and subscribes under that lock too, so it sees each change
//! exactly once, either in the snapshot or as an event. State changes (and any field other than
//! the counters) are sent at once; counter-only changes (`resident_bytes`, `removed_bytes`,
//! `zero_bytes`, `faults`) at most once per [`COUNTER_EVENT_INTERVAL`] per session, the latest
//! values being sent by [`Inventory::flush_counters`] once the interval has passed.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::broadcast;
use tokio::time::Instant;
use uffdpager::api::{Session, SessionEvent, SessionEventType};

use crate::lifecycle::Phase;
use crate::session_record::{is_live, is_terminal, state_of, Record};

/// Least time between two counter-only UPDATED events of one session.
pub const COUNTER_EVENT_INTERVAL: Duration = Duration::from_secs(1);

/// Events buffered per watcher before a slow one is cut off.
pub const DEFAULT_EVENT_CAPACITY: usize = 4096;

/// Why an insertion failed.
#[derive(Debug)]
pub enum InsertError<E> {
    Exists,
    /// `live` sessions (not yet finished) are listed already: the cap is reached.
    Full {
        live: usize,
    },
    Make(E),
}

#[derive(Debug)]
struct Entry {
    record: Record,
    last_event: Instant,
    counters_unsent: bool,
    finished_at: Option<Instant>,
}

#[derive(Debug)]
struct State {
    sessions: BTreeMap<String, Entry>,
    active_version: String,
    events: broadcast::Sender<SessionEvent>,
}

impl State {
    fn emit(&self, kind: SessionEventType, session: Option<Session>) {
        // No receiver is not an error: nobody watches.
        let _ = self.events.send(SessionEvent {
            r#type: kind as i32,
            session,
            active_version: self.active_version.clone(),
        });
    }
}

/// The shared session inventory.
#[derive(Debug, Clone)]
pub struct Inventory {
    state: Arc<Mutex<State>>,
}

impl Default for Inventory {
    fn default() -> Self {
        Self::new(DEFAULT_EVENT_CAPACITY)
    }
}

impl Inventory {
    /// An empty inventory whose watchers may fall `capacity` events behind.
    pub fn new(capacity: usize) -> Self {
        let (events, _) = broadcast::channel(capacity.max(1));
        Self {
            state: Arc::new(Mutex::new(State {
                sessions: BTreeMap::new(),
                active_version: String::new(),
                events,
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere must not take the whole API down: the state stays usable.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn active_version(&self) -> String {
        self.lock().active_version.clone()
    }

    /// Inserts the session that `make` builds, if `id` is free; `make` runs under the lock, so a
    /// duplicate never gets as far as binding its socket. Sends ADDED.
    pub fn insert_with<E>(
        &self,
        id: &str,
        make: impl FnOnce() -> Result<Session, E>,
    ) -> Result<Session, InsertError<E>> {
        self.insert_capped(id, usize::MAX, make)
    }

    /// As [`Inventory::insert_with`], unless `cap` sessions that have not finished (PENDING,
    /// SERVING, COMPLETING) are listed already: counted under the same lock as the insertion, so
    /// that concurrent creations never pass the cap together.
    pub fn insert_capped<E>(
        &self,
        id: &str,
        cap: usize,
        make: impl FnOnce() -> Result<Session, E>,
    ) -> Result<Session, InsertError<E>> {
        let mut st = self.lock();
        if st.sessions.contains_key(id) {
            return Err(InsertError::Exists);
        }
        if cap != usize::MAX {
            let live = st.sessions.values().filter(|e| !is_terminal(e.record.state())).count();
            if live >= cap {
                return Err(InsertError::Full { live });
            }
        }
        let mut session = make().map_err(InsertError::Make)?;
        session.id = id.to_string();
        session.outdated = outdated(&session, &st.active_version);
        let now = Instant::now();
        let finished_at = is_terminal(state_of(&session)).then_some(now);
        let record = Record::new(session.clone());
        st.sessions.insert(
            id.to_string(),
            Entry { record, last_event: now, counters_unsent: false, finished_at },
        );
        st.emit(SessionEventType::Added, Some(session.clone()));
        Ok(session)
    }

    pub fn get(&self, id: &str) -> Option<Session> {
        self.lock().sessions.get(id).map(|e| e.record.session.clone())
    }

    pub fn record(&self, id: &str) -> Option<Record> {
        self.lock().sessions.get(id).map(|e| e.record.clone())
    }

    /// Every session (ordered by id) and the active version.
    pub fn list(&self) -> (Vec<Session>, String) {
        let st = self.lock();
        (
            st.sessions.values().map(|e| e.record.session.clone()).collect(),
            st.active_version.clone(),
        )
    }

    /// Records of the sessions that `version` owns.
    pub fn records_of_version(&self, version: &str) -> Vec<Record> {
        self.lock()
            .sessions
            .values()
            .filter(|e| e.record.session.pager_version == version)
            .map(|e| e.record.clone())
            .collect()
    }

    /// Sessions that `version` serves now (SERVING or COMPLETING).
    pub fn live_count(&self, version: &str) -> u32 {
        let n = self
            .lock()
            .sessions
            .values()
            .filter(|e| e.record.session.pager_version == version && is_live(e.record.state()))
            .count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// Sessions being handed to a pager right now: a first handoff, or a re-adoption (their
    /// pager died, or they were ORPHANED).
    pub fn handing_off_count(&self) -> usize {
        self.lock().sessions.values().filter(|e| e.record.handing_off()).count()
    }

    /// Sessions waiting for a pager: their VMM connected, and no pager serves them yet (a first
    /// handoff in flight) or any more (ORPHANED).
    pub fn awaiting_pager_count(&self) -> usize {
        self.lock()
            .sessions
            .values()
            .filter(|e| {
                matches!(e.record.lifecycle().phase(), Phase::HandingOver | Phase::Orphaned { .. })
            })
            .count()
    }

    /// ORPHANED sessions not being handed over yet.
    pub fn orphans(&self) -> Vec<Record> {
        self.lock()
            .sessions
            .values()
            .filter(|e| e.record.lifecycle().phase() == Phase::Orphaned { adopting: false })
            .map(|e| e.record.clone())
            .collect()
    }

    /// Changes a record with `f` and sends UPDATED if anything visible changed (see the module
    /// doc for counters). Returns `f`'s result and the session as it now is; None if unknown.
    pub fn modify<R>(&self, id: &str, f: impl FnOnce(&mut Record) -> R) -> Option<(R, Session)> {
        let mut guard = self.lock();
        let st = &mut *guard;
        let entry = st.sessions.get_mut(id)?;
        let before = entry.record.session.clone();
        let result = f(&mut entry.record);
        // The public state is the lifecycle's, whatever `f` wrote into the view.
        entry.record.session.state = entry.record.lifecycle().state() as i32;
        let session = &mut entry.record.session;
        session.id = before.id.clone();
        session.outdated = outdated(session, &st.active_version);
        let session = session.clone();
        if session != before {
            let now = Instant::now();
            if is_terminal(state_of(&session)) && entry.finished_at.is_none() {
                entry.finished_at = Some(now);
            }
            let due = now.duration_since(entry.last_event) >= COUNTER_EVENT_INTERVAL;
            if without_counters(&session) != without_counters(&before) || due {
                entry.last_event = now;
                entry.counters_unsent = false;
                st.emit(SessionEventType::Updated, Some(session.clone()));
            } else {
                entry.counters_unsent = true;
            }
        }
        Some((result, session))
    }

    /// Removes a session if `check` allows it, sending REMOVED. None if unknown.
    pub fn remove_if<E>(
        &self,
        id: &str,
        check: impl FnOnce(&Record) -> Result<(), E>,
    ) -> Option<Result<Session, E>> {
        let mut st = self.lock();
        let entry = st.sessions.get(id)?;
        if let Err(e) = check(&entry.record) {
            return Some(Err(e));
        }
        let entry = st.sessions.remove(id)?;
        st.emit(SessionEventType::Removed, Some(entry.record.session.clone()));
        Some(Ok(entry.record.session))
    }

    /// Sends the counter changes held back by the rate limit, where the interval has passed.
    pub fn flush_counters(&self) {
        let mut guard = self.lock();
        let st = &mut *guard;
        let now = Instant::now();
        for entry in st.sessions.values_mut() {
            if entry.counters_unsent
                && now.duration_since(entry.last_event) >= COUNTER_EVENT_INTERVAL
            {
                entry.counters_unsent = false;
                entry.last_event = now;
                let _ = st.events.send(SessionEvent {
                    r#type: SessionEventType::Updated as i32,
                    session: Some(entry.record.session.clone()),
                    active_version: st.active_version.clone(),
                });
            }
        }
    }

    /// Forgets the sessions that finished at least `retention` ago, sending REMOVED for each.
    pub fn prune_finished(&self, retention: Duration) -> Vec<Session> {
        let mut st = self.lock();
        let now = Instant::now();
        let expired: Vec<String> = st
            .sessions
            .iter()
            .filter(|(_, e)| {
                e.record.completions() == 0
                    && e.finished_at.is_some_and(|t| now.duration_since(t) >= retention)
            })
            .map(|(id, _)| id.clone())
            .collect();
        let mut removed = Vec::with_capacity(expired.len());
        for id in expired {
            if let Some(entry) = st.sessions.remove(&id) {
                st.emit(SessionEventType::Removed, Some(entry.record.session.clone()));
                removed.push(entry.record.session);
            }
        }
        removed
    }

    /// Makes `version` the active one; every session whose `outdated` flips gets UPDATED.
    pub fn set_active_version(&self, version: &str) {
        let mut guard = self.lock();
        let st = &mut *guard;
        if st.active_version == version {
            return;
        }
        st.active_version = version.to_string();
        let now = Instant::now();
        for entry in st.sessions.values_mut() {
            let session = &mut entry.record.session;
            let flag = outdated(session, version);
            if session.outdated != flag {
                session.outdated = flag;
                entry.last_event = now;
                entry.counters_unsent = false;
                let _ = st.events.send(SessionEvent {
                    r#type: SessionEventType::Updated as i32,
                    session: Some(session.clone()),
                    active_version: version.to_string(),
                });
            }
        }
    }

    /// A watcher's start: one SNAPSHOT event per session, then the end-of-snapshot marker (a
    /// SNAPSHOT without a session), and a receiver of every later event. Taken under one lock.
    pub fn watch(&self) -> (Vec<SessionEvent>, broadcast::Receiver<SessionEvent>) {
        let st = self.lock();
        let snapshot = |session| SessionEvent {
            r#type: SessionEventType::Snapshot as i32,
            session,
            active_version: st.active_version.clone(),
        };
        let mut events: Vec<SessionEvent> =
            st.sessions.values().map(|e| snapshot(Some(e.record.session.clone()))).collect();
        events.push(snapshot(None));
        (events, st.events.subscribe())
    }
}

/// True when a session belongs to a version other than the active one.
fn outdated(session: &Session, active: &str) -> bool {
    !session.pager_version.is_empty() && session.pager_version != active
}

/// The session with its rate-limited counters zeroed, to tell counter-only changes apart.
fn without_counters(session: &Session) -> Session {
    Session { resident_bytes: 0, removed_bytes: 0, zero_bytes: 0, faults: 0, ..session.clone() }
}

#[cfg(test)]
#[path = "inventory_tests.rs"]
mod tests;
