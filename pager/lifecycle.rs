//! A served session's life in the pager, and the one place it changes:
//!
//! ```text
//! SERVING ──begin_completion──▶ COMPLETING ──graduate──▶ GRADUATED
//!    ▲                              │
//!    └──────completion_failed───────┘
//! SERVING | COMPLETING ──end──▶ ENDED
//! ```
//!
//! The state is shared between the worker that serves the session and the gRPC service that
//! answers for it, so it is an atomic; every change is a compare-and-swap from a state the rules
//! allow, and a change from any other state is refused with a typed error. Graduated and ended
//! sessions never change again.

use std::sync::atomic::{AtomicU8, Ordering};

use uffdpager::api::SessionState;

/// Where a served session is in its life (the gRPC `SessionState` is made from it, at the edge:
/// [`Phase::to_proto`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Serving,
    Completing,
    Graduated,
    Ended,
}

impl Phase {
    const ALL: [Phase; 4] = [Phase::Serving, Phase::Completing, Phase::Graduated, Phase::Ended];

    /// The state gRPC shows.
    pub fn to_proto(self) -> SessionState {
        match self {
            Phase::Serving => SessionState::Serving,
            Phase::Completing => SessionState::Completing,
            Phase::Graduated => SessionState::Graduated,
            Phase::Ended => SessionState::Ended,
        }
    }

    /// Whether the session is still served (its VM depends on this pager).
    pub fn is_live(self) -> bool {
        matches!(self, Phase::Serving | Phase::Completing)
    }

    fn code(self) -> u8 {
        match self {
            Phase::Serving => 0,
            Phase::Completing => 1,
            Phase::Graduated => 2,
            Phase::Ended => 3,
        }
    }

    fn of_code(code: u8) -> Phase {
        Phase::ALL.into_iter().find(|p| p.code() == code).unwrap_or(Phase::Ended)
    }
}

/// A change to a session's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    BeginCompletion,
    CompletionFailed,
    Graduate,
    End,
}

/// A change the rules do not allow from the session's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a session that is {} cannot take {change:?}", from.to_proto().as_str_name())]
pub struct Refused {
    pub from: Phase,
    pub change: Change,
}

/// Where `change` takes a session in phase `from`, if the rules allow it (pure; the table).
pub fn next(from: Phase, change: Change) -> Option<Phase> {
    use Phase::*;
    match (from, change) {
        (Serving, Change::BeginCompletion) => Some(Completing),
        (Completing, Change::CompletionFailed) => Some(Serving),
        (Completing, Change::Graduate) => Some(Graduated),
        (Serving | Completing, Change::End) => Some(Ended),
        _ => None,
    }
}

/// A session's phase, changed only through [`SessionLifecycle::change`].
#[derive(Debug)]
pub struct SessionLifecycle(AtomicU8);

impl Default for SessionLifecycle {
    fn default() -> Self {
        Self(AtomicU8::new(Phase::Serving.code()))
    }
}

impl SessionLifecycle {
    pub fn phase(&self) -> Phase {
        Phase::of_code(self.0.load(Ordering::Acquire))
    }

    /// Applies `change` if the current phase allows it; returns the new phase.
    pub fn change(&self, change: Change) -> Result<Phase, Refused> {
        let mut current = self.0.load(Ordering::Acquire);
        loop {
            let from = Phase::of_code(current);
            let to = next(from, change).ok_or(Refused { from, change })?;
            match self.0.compare_exchange(current, to.code(), Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Ok(to),
                Err(now) => current = now,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_and_change_follows_the_table() {
        use Phase::*;
        let allowed = [
            (Serving, Change::BeginCompletion, Completing),
            (Completing, Change::CompletionFailed, Serving),
            (Completing, Change::Graduate, Graduated),
            (Serving, Change::End, Ended),
            (Completing, Change::End, Ended),
        ];
        let states = Phase::ALL;
        let changes =
            [Change::BeginCompletion, Change::CompletionFailed, Change::Graduate, Change::End];
        for from in states {
            for change in changes {
                let want = allowed.iter().find(|(f, c, _)| *f == from && *c == change);
                assert_eq!(next(from, change), want.map(|r| r.2), "{from:?} {change:?}");
            }
        }
    }

    #[test]
    fn each_phase_is_one_grpc_state_and_its_code_reads_back() {
        let states: Vec<SessionState> = Phase::ALL.iter().map(|p| p.to_proto()).collect();
        assert_eq!(
            states,
            [
                SessionState::Serving,
                SessionState::Completing,
                SessionState::Graduated,
                SessionState::Ended
            ]
        );
        for p in Phase::ALL {
            assert_eq!(Phase::of_code(p.code()), p);
            assert_eq!(p.is_live(), matches!(p, Phase::Serving | Phase::Completing));
        }
    }

    #[test]
    fn a_graduated_session_never_changes_and_a_refusal_says_why() {
        let l = SessionLifecycle::default();
        assert_eq!(l.change(Change::BeginCompletion), Ok(Phase::Completing));
        assert_eq!(l.change(Change::Graduate), Ok(Phase::Graduated));
        for change in [Change::BeginCompletion, Change::CompletionFailed, Change::End] {
            let refused = l.change(change).unwrap_err();
            assert_eq!(refused, Refused { from: Phase::Graduated, change });
        }
        assert_eq!(l.phase(), Phase::Graduated);
        let text = Refused { from: Phase::Ended, change: Change::Graduate }.to_string();
        assert!(text.contains("SESSION_STATE_ENDED") && text.contains("Graduate"), "{text}");
    }

    #[test]
    fn two_threads_racing_one_completion_start_get_one_success() {
        let l = std::sync::Arc::new(SessionLifecycle::default());
        let racers: Vec<_> = (0..2)
            .map(|_| {
                let l = std::sync::Arc::clone(&l);
                std::thread::spawn(move || l.change(Change::BeginCompletion).is_ok())
            })
            .collect();
        let won: usize = racers.into_iter().map(|t| usize::from(t.join().unwrap())).sum();
        assert_eq!(won, 1);
    }
}
