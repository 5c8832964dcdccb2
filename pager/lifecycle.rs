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

use std::sync::atomic::{AtomicI32, Ordering};

use uffdpager::api::SessionState;

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
#[error("a session that is {} cannot take {change:?}", from.as_str_name())]
pub struct Refused {
    pub from: SessionState,
    pub change: Change,
}

/// Where `change` takes a session in state `from`, if the rules allow it (pure; the table).
pub fn next(from: SessionState, change: Change) -> Option<SessionState> {
    use SessionState::*;
    match (from, change) {
        (Serving, Change::BeginCompletion) => Some(Completing),
        (Completing, Change::CompletionFailed) => Some(Serving),
        (Completing, Change::Graduate) => Some(Graduated),
        (Serving | Completing, Change::End) => Some(Ended),
        _ => None,
    }
}

/// A session's state, changed only through [`SessionLifecycle::change`].
#[derive(Debug)]
pub struct SessionLifecycle(AtomicI32);

impl Default for SessionLifecycle {
    fn default() -> Self {
        Self(AtomicI32::new(SessionState::Serving as i32))
    }
}

impl SessionLifecycle {
    pub fn state(&self) -> SessionState {
        decode(self.0.load(Ordering::Acquire))
    }

    /// Applies `change` if the current state allows it; returns the new state.
    pub fn change(&self, change: Change) -> Result<SessionState, Refused> {
        let mut current = self.0.load(Ordering::Acquire);
        loop {
            let from = decode(current);
            let to = next(from, change).ok_or(Refused { from, change })?;
            match self.0.compare_exchange(current, to as i32, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Ok(to),
                Err(now) => current = now,
            }
        }
    }
}

fn decode(raw: i32) -> SessionState {
    SessionState::try_from(raw).unwrap_or(SessionState::Unspecified)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_and_change_follows_the_table() {
        use SessionState::*;
        let allowed = [
            (Serving, Change::BeginCompletion, Completing),
            (Completing, Change::CompletionFailed, Serving),
            (Completing, Change::Graduate, Graduated),
            (Serving, Change::End, Ended),
            (Completing, Change::End, Ended),
        ];
        let states =
            [Unspecified, Pending, Serving, Completing, Graduated, Ended, Failed, Orphaned];
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
    fn a_graduated_session_never_changes_and_a_refusal_says_why() {
        let l = SessionLifecycle::default();
        assert_eq!(l.change(Change::BeginCompletion), Ok(SessionState::Completing));
        assert_eq!(l.change(Change::Graduate), Ok(SessionState::Graduated));
        for change in [Change::BeginCompletion, Change::CompletionFailed, Change::End] {
            let refused = l.change(change).unwrap_err();
            assert_eq!(refused, Refused { from: SessionState::Graduated, change });
        }
        assert_eq!(l.state(), SessionState::Graduated);
        let text = Refused { from: SessionState::Ended, change: Change::Graduate }.to_string();
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
