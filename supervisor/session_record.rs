//! A session's record as the inventory keeps it: the public view (`Session`) and its
//! [`Lifecycle`], kept in step, and the predicates on a session's public state.

use tokio::time::Instant;
use uffdpager::api::{Session, SessionState};

use crate::lifecycle::{Lifecycle, Refused};

/// A session's record: the public view plus what the supervisor needs to order its own work.
/// Its state changes only through [`Record::step`], which applies a [`Lifecycle`] transition
/// and shows the resulting state in the public view.
#[derive(Debug, Clone)]
pub struct Record {
    pub session: Session,
    lifecycle: Lifecycle,
    /// When the supervisor marked it SERVING (a pager that does not list it after that lost it).
    pub serving_since: Option<Instant>,
}

impl Record {
    /// A record of `session`, in the state its public view holds (PENDING when created, the
    /// recorded one when read back after a restart).
    pub fn new(session: Session) -> Self {
        let lifecycle = Lifecycle::recovered(state_of(&session));
        let mut r = Self { session, lifecycle, serving_since: None };
        r.session.state = r.lifecycle.state() as i32;
        r
    }

    pub fn state(&self) -> SessionState {
        self.lifecycle.state()
    }

    pub fn lifecycle(&self) -> Lifecycle {
        self.lifecycle
    }

    /// Applies one transition (see [`Lifecycle`]); a refused one changes nothing.
    pub fn step(
        &mut self,
        transition: impl FnOnce(&mut Lifecycle) -> Result<(), Refused>,
    ) -> Result<(), Refused> {
        let result = transition(&mut self.lifecycle);
        self.session.state = self.lifecycle.state() as i32;
        result
    }

    /// A handoff of the session is in flight (see [`Lifecycle::handing_off`]).
    pub fn handing_off(&self) -> bool {
        self.lifecycle.handing_off()
    }

    /// CompleteSession calls in flight.
    pub fn completions(&self) -> u32 {
        self.lifecycle.completions()
    }
}

/// The state of a session (UNSPECIFIED for a value this build does not know).
pub fn state_of(session: &Session) -> SessionState {
    SessionState::try_from(session.state).unwrap_or(SessionState::Unspecified)
}

/// GRADUATED, ENDED or FAILED: nothing more happens to the session.
pub fn is_terminal(state: SessionState) -> bool {
    matches!(state, SessionState::Graduated | SessionState::Ended | SessionState::Failed)
}

/// SERVING or COMPLETING: a pager serves the VM's faults.
pub fn is_live(state: SessionState) -> bool {
    matches!(state, SessionState::Serving | SessionState::Completing)
}

/// Connected, and a pager serves it or one will: SERVING, COMPLETING or ORPHANED.
pub fn is_held(state: SessionState) -> bool {
    is_live(state) || state == SessionState::Orphaned
}
