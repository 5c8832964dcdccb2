//! What the controller knows of one supervisor's sessions, built from its WatchSessions stream.
//!
//! This is the one place where the supervisor's protobuf `Session` becomes the controller's
//! [`TrackedSession`]: the plan and the status only ever see the latter.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use uffdpager::api::{Session, SessionEvent, SessionEventType, SessionState};

/// One session, on one supervisor: the plan's key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionKey {
    /// The supervisor's endpoint, as configured.
    pub supervisor: String,
    /// The session id.
    pub session: String,
}

impl SessionKey {
    pub fn new(supervisor: &str, session: &str) -> Self {
        Self { supervisor: supervisor.into(), session: session.into() }
    }
}

/// The controller's view of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackedSession {
    pub id: String,
    pub pager_version: String,
    pub state: SessionState,
    /// The supervisor's `outdated` flag (used only when the active version is unknown).
    pub outdated_flag: bool,
    /// Handshake time on the supervisor's clock; the soak counts from here.
    pub connected_at: Option<SystemTime>,
    pub total_bytes: u64,
    pub resident_bytes: u64,
}

impl TrackedSession {
    /// From the supervisor's message.
    pub fn from_proto(s: &Session) -> Self {
        Self {
            id: s.id.clone(),
            pager_version: s.pager_version.clone(),
            state: SessionState::try_from(s.state).unwrap_or(SessionState::Unspecified),
            outdated_flag: s.outdated,
            connected_at: s.connected_at.as_ref().and_then(system_time),
            total_bytes: s.total_bytes,
            resident_bytes: s.resident_bytes,
        }
    }

    /// SERVING or COMPLETING: a pager serves the VM, so it counts toward the ceiling.
    pub fn is_live(&self) -> bool {
        matches!(self.state, SessionState::Serving | SessionState::Completing)
    }

    /// What the plan looks at; a change elsewhere (progress counters) needs no new scan.
    fn plan_relevant(&self) -> (&str, SessionState, bool, Option<SystemTime>) {
        (&self.pager_version, self.state, self.outdated_flag, self.connected_at)
    }
}

/// A protobuf timestamp as wall-clock time; `None` if unset or out of range.
pub fn system_time(t: &prost_types::Timestamp) -> Option<SystemTime> {
    if t.seconds == 0 && t.nanos == 0 {
        return None;
    }
    let secs = u64::try_from(t.seconds).ok()?;
    let nanos = u32::try_from(t.nanos).ok()?;
    UNIX_EPOCH.checked_add(Duration::new(secs, 0))?.checked_add(Duration::from_nanos(nanos.into()))
}

/// One supervisor's sessions and active version.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inventory {
    /// The supervisor's active pager version (empty: not known yet).
    pub active_version: String,
    pub sessions: BTreeMap<String, TrackedSession>,
    /// The supervisor's host's available memory, as it last reported it (ListSessions); `None`:
    /// not reported (yet).
    pub available_memory: Option<u64>,
}

/// Why an event could not be applied (the stream is then restarted, which re-lists).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EventError {
    #[error("a {0} event without a session")]
    MissingSession(&'static str),
    #[error("an event of unknown type {0}")]
    UnknownType(i32),
    #[error("a SNAPSHOT event after the snapshot had ended")]
    LateSnapshot,
}

impl Inventory {
    /// Whether `s` belongs to a pager version other than the active one. The active version of
    /// the latest event is trusted over the session's own flag, which may predate it; the flag
    /// is used only while the active version is unknown.
    pub fn is_outdated(&self, s: &TrackedSession) -> bool {
        if self.active_version.is_empty() {
            s.outdated_flag
        } else {
            !s.pager_version.is_empty() && s.pager_version != self.active_version
        }
    }

    /// Sessions SERVING or COMPLETING.
    pub fn live_count(&self) -> usize {
        self.sessions.values().filter(|s| s.is_live()).count()
    }

    /// Applies one event that follows the snapshot. Returns whether anything the plan looks at
    /// changed.
    pub fn apply(&mut self, event: &SessionEvent) -> Result<bool, EventError> {
        let mut changed = false;
        if !event.active_version.is_empty() && event.active_version != self.active_version {
            self.active_version.clone_from(&event.active_version);
            changed = true;
        }
        let kind = SessionEventType::try_from(event.r#type)
            .map_err(|_| EventError::UnknownType(event.r#type))?;
        let name = match kind {
            SessionEventType::Snapshot => return Err(EventError::LateSnapshot),
            SessionEventType::Unspecified => return Err(EventError::UnknownType(event.r#type)),
            SessionEventType::Added => "ADDED",
            SessionEventType::Updated => "UPDATED",
            SessionEventType::Removed => "REMOVED",
        };
        let session = event.session.as_ref().ok_or(EventError::MissingSession(name))?;
        if kind == SessionEventType::Removed {
            return Ok(self.sessions.remove(&session.id).is_some() || changed);
        }
        let new = TrackedSession::from_proto(session);
        let relevant = match self.sessions.get(&new.id) {
            Some(old) => old.plan_relevant() != new.plan_relevant(),
            None => true,
        };
        self.sessions.insert(new.id.clone(), new);
        Ok(changed || relevant)
    }
}

/// An inventory being received: the SNAPSHOT events up to the end marker.
#[derive(Debug, Default)]
pub struct SnapshotBuilder {
    inventory: Inventory,
}

impl SnapshotBuilder {
    /// Takes one event of the snapshot. Returns the complete inventory at the end marker.
    pub fn push(&mut self, event: &SessionEvent) -> Result<Option<Inventory>, EventError> {
        if !event.active_version.is_empty() {
            self.inventory.active_version.clone_from(&event.active_version);
        }
        match SessionEventType::try_from(event.r#type) {
            Ok(SessionEventType::Snapshot) => match &event.session {
                Some(s) => {
                    let s = TrackedSession::from_proto(s);
                    self.inventory.sessions.insert(s.id.clone(), s);
                    Ok(None)
                }
                None => Ok(Some(std::mem::take(&mut self.inventory))),
            },
            // Some supervisor might skip the marker; a change means the snapshot is over.
            Ok(SessionEventType::Added | SessionEventType::Updated | SessionEventType::Removed) => {
                let mut done = std::mem::take(&mut self.inventory);
                done.apply(event)?;
                Ok(Some(done))
            }
            _ => Err(EventError::UnknownType(event.r#type)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(id: &str, version: &str, state: SessionState, connected_secs: i64) -> Session {
        Session {
            id: id.into(),
            pager_version: version.into(),
            state: state as i32,
            connected_at: Some(prost_types::Timestamp { seconds: connected_secs, nanos: 5 }),
            ..Default::default()
        }
    }

    fn event(kind: SessionEventType, s: Option<Session>, active: &str) -> SessionEvent {
        SessionEvent { r#type: kind as i32, session: s, active_version: active.into() }
    }

    #[test]
    fn a_snapshot_ends_at_the_marker_with_every_session() {
        let mut b = SnapshotBuilder::default();
        let s = session("a", "v1", SessionState::Serving, 100);
        assert_eq!(b.push(&event(SessionEventType::Snapshot, Some(s), "v1")), Ok(None));
        let inv = b.push(&event(SessionEventType::Snapshot, None, "v1")).unwrap().unwrap();
        assert_eq!(inv.active_version, "v1");
        let a = &inv.sessions["a"];
        assert_eq!(a.connected_at, Some(UNIX_EPOCH + Duration::new(100, 5)));
        assert!(a.is_live());
    }

    #[test]
    fn changes_apply_in_order_and_say_whether_the_plan_cares() {
        let mut inv = Inventory::default();
        let added = event(
            SessionEventType::Added,
            Some(session("a", "v1", SessionState::Pending, 0)),
            "v1",
        );
        assert_eq!(inv.apply(&added), Ok(true));
        let serving = session("a", "v1", SessionState::Serving, 10);
        assert_eq!(
            inv.apply(&event(SessionEventType::Updated, Some(serving.clone()), "v1")),
            Ok(true)
        );
        let progress = Session { resident_bytes: 4096, ..serving.clone() };
        assert_eq!(inv.apply(&event(SessionEventType::Updated, Some(progress), "v1")), Ok(false));
        assert_eq!(inv.sessions["a"].resident_bytes, 4096);
        assert_eq!(
            inv.apply(&event(SessionEventType::Updated, Some(serving.clone()), "v2")),
            Ok(true)
        );
        assert!(inv.is_outdated(&inv.sessions["a"]));
        assert_eq!(inv.apply(&event(SessionEventType::Removed, Some(serving), "v2")), Ok(true));
        assert!(inv.sessions.is_empty());
    }

    #[test]
    fn malformed_events_are_errors_not_panics() {
        let mut inv = Inventory::default();
        assert_eq!(
            inv.apply(&event(SessionEventType::Added, None, "")),
            Err(EventError::MissingSession("ADDED"))
        );
        assert_eq!(
            inv.apply(&event(SessionEventType::Snapshot, None, "")),
            Err(EventError::LateSnapshot)
        );
        let odd = SessionEvent { r#type: 99, ..Default::default() };
        assert_eq!(inv.apply(&odd), Err(EventError::UnknownType(99)));
        assert!(SnapshotBuilder::default().push(&odd).is_err());
    }

    #[test]
    fn the_active_version_beats_a_stale_outdated_flag() {
        let mut inv = Inventory::default();
        let mut s = TrackedSession::from_proto(&session("a", "v1", SessionState::Serving, 1));
        s.outdated_flag = true;
        assert!(inv.is_outdated(&s), "no active version known: the flag decides");
        inv.active_version = "v1".into();
        assert!(!inv.is_outdated(&s), "rolled back to v1: no longer outdated");
    }

    #[test]
    fn unset_or_negative_timestamps_are_no_time() {
        assert_eq!(system_time(&prost_types::Timestamp::default()), None);
        assert_eq!(system_time(&prost_types::Timestamp { seconds: -5, nanos: 0 }), None);
        assert_eq!(system_time(&prost_types::Timestamp { seconds: 1, nanos: -1 }), None);
    }
}
