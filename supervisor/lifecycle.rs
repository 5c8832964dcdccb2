//! A session's life as the supervisor tracks it: one type that owns the state and every
//! transition DESIGN's rules allow, each a method that refuses a wrong one with a typed error.
//! The gRPC state (`SessionState`) is produced from it by [`Lifecycle::state`], never set
//! directly. What used to be side flags are parts of the phases they qualify (a first handoff
//! in flight is `HandingOver`, a re-adoption in flight `Served { readopting }`); the one count
//! kept beside the phase is of CompleteSession calls in flight, which outlive any phase (a call
//! that began while the session was served still waits for its answer after it finished).
//!
//! ```text
//! Pending ─hand_over─▶ HandingOver ─serve─▶ Served ◀──────readopted────── Orphaned{adopting}
//!                          │                │   ▲                                ▲
//!                          │ orphan         │   └──readopted──┐                  │ begin_readopt
//!                          ▼                ▼ begin_readopt   │                  │
//!                      Orphaned ◀─orphan─ Served{readopting} ─┘        Orphaned ─┘
//! every phase but a terminal one ─finish / pager_reports─▶ Graduated | Ended | Failed
//! ```

use uffdpager::api::SessionState;

/// Where a session stands (see the module's diagram).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Created; its VMM has not connected (or its handshake is being read).
    Pending,
    /// The VMM's handshake was accepted and the first handoff to a pager is in flight: it
    /// cannot be deleted until the pager answers.
    HandingOver,
    /// A pager serves the VM's faults.
    Served {
        /// Its pager says a completion runs (one started before a supervisor restart).
        pager_completing: bool,
        /// Its pager died and the session is being handed to another one.
        readopting: bool,
    },
    /// No pager serves it now; the supervisor holds its descriptors for the next one.
    Orphaned {
        /// A handoff to a version that became available is in flight.
        adopting: bool,
    },
    Graduated,
    Ended,
    Failed,
}

/// A session's phase, and the CompleteSession calls in flight for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifecycle {
    phase: Phase,
    completions: u32,
}

/// What a transition was asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    HandOver,
    Serve,
    Orphan,
    BeginReadopt,
    Readopted,
    BeginCompletion,
    EndCompletion,
    PagerReports,
    Finish,
}

/// A transition the rules do not allow from the session's phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a session in phase {from:?} cannot take transition {transition:?}")]
pub struct Refused {
    pub from: Phase,
    pub transition: Transition,
}

/// How the supervisor itself finishes a session (graduation is its pager's word:
/// [`Lifecycle::pager_reports`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// Its VMM exited.
    Ended,
    /// Nothing can serve it any more.
    Failed,
}

const SERVED: Phase = Phase::Served { pager_completing: false, readopting: false };

impl Default for Lifecycle {
    fn default() -> Self {
        Self::new()
    }
}

impl Lifecycle {
    /// A session just created: PENDING.
    pub fn new() -> Self {
        Self { phase: Phase::Pending, completions: 0 }
    }

    /// A session read back after a supervisor restart, in the state recorded for it (an
    /// unknown value, from a newer build, reads as PENDING: nothing is assumed served).
    pub fn recovered(state: SessionState) -> Self {
        let phase = match state {
            SessionState::Serving => SERVED,
            SessionState::Completing => Phase::Served { pager_completing: true, readopting: false },
            SessionState::Orphaned => Phase::Orphaned { adopting: false },
            SessionState::Graduated => Phase::Graduated,
            SessionState::Ended => Phase::Ended,
            SessionState::Failed => Phase::Failed,
            SessionState::Pending | SessionState::Unspecified => Phase::Pending,
        };
        Self { phase, completions: 0 }
    }

    pub fn phase(self) -> Phase {
        self.phase
    }

    /// The state gRPC shows.
    pub fn state(self) -> SessionState {
        match self.phase {
            Phase::Pending | Phase::HandingOver => SessionState::Pending,
            Phase::Served { pager_completing, .. } => {
                if self.completions > 0 || pager_completing {
                    SessionState::Completing
                } else {
                    SessionState::Serving
                }
            }
            Phase::Orphaned { .. } => SessionState::Orphaned,
            Phase::Graduated => SessionState::Graduated,
            Phase::Ended => SessionState::Ended,
            Phase::Failed => SessionState::Failed,
        }
    }

    /// GRADUATED, ENDED or FAILED: nothing more happens to the session.
    pub fn is_terminal(self) -> bool {
        matches!(self.phase, Phase::Graduated | Phase::Ended | Phase::Failed)
    }

    /// A pager serves it (SERVING or COMPLETING), possibly one that just died (`readopting`).
    pub fn is_served(self) -> bool {
        matches!(self.phase, Phase::Served { .. })
    }

    /// A handoff of it is in flight: a first one, a re-adoption or an adoption of an orphan.
    pub fn handing_off(self) -> bool {
        matches!(
            self.phase,
            Phase::HandingOver
                | Phase::Served { readopting: true, .. }
                | Phase::Orphaned { adopting: true }
        )
    }

    /// CompleteSession calls in flight.
    pub fn completions(self) -> u32 {
        self.completions
    }

    fn refuse(self, transition: Transition) -> Refused {
        Refused { from: self.phase, transition }
    }

    fn go(&mut self, transition: Transition, to: Option<Phase>) -> Result<(), Refused> {
        match to {
            Some(phase) => {
                self.phase = phase;
                Ok(())
            }
            None => Err(self.refuse(transition)),
        }
    }

    /// The VMM's handshake was accepted: the first handoff begins.
    pub fn hand_over(&mut self) -> Result<(), Refused> {
        let to = matches!(self.phase, Phase::Pending).then_some(Phase::HandingOver);
        self.go(Transition::HandOver, to)
    }

    /// The first pager answered that it serves the session.
    pub fn serve(&mut self) -> Result<(), Refused> {
        let to = matches!(self.phase, Phase::HandingOver).then_some(SERVED);
        self.go(Transition::Serve, to)
    }

    /// No version can serve it now: after a first handoff, a re-adoption or an adoption that
    /// found no pager.
    pub fn orphan(&mut self) -> Result<(), Refused> {
        let to = self.handing_off().then_some(Phase::Orphaned { adopting: false });
        self.go(Transition::Orphan, to)
    }

    /// A handoff to another pager begins: its pager died, or a version became available for
    /// an orphan. Refused while one is in flight (it stays with the task handing it over).
    pub fn begin_readopt(&mut self) -> Result<(), Refused> {
        let to = match self.phase {
            Phase::Served { pager_completing, readopting: false } => {
                Some(Phase::Served { pager_completing, readopting: true })
            }
            Phase::Orphaned { adopting: false } => Some(Phase::Orphaned { adopting: true }),
            _ => None,
        };
        self.go(Transition::BeginReadopt, to)
    }

    /// The adopter answered that it serves the session.
    pub fn readopted(&mut self) -> Result<(), Refused> {
        let to = match self.phase {
            Phase::Served { pager_completing, readopting: true } => {
                Some(Phase::Served { pager_completing, readopting: false })
            }
            Phase::Orphaned { adopting: true } => Some(SERVED),
            _ => None,
        };
        self.go(Transition::Readopted, to)
    }

    /// A CompleteSession call begins (COMPLETING): only for a served session that is not being
    /// handed over.
    pub fn begin_completion(&mut self) -> Result<(), Refused> {
        if !matches!(self.phase, Phase::Served { readopting: false, .. }) {
            return Err(self.refuse(Transition::BeginCompletion));
        }
        self.completions += 1;
        Ok(())
    }

    /// A CompleteSession call ended, however it went, in whatever phase the session is now; the
    /// last one makes a served session SERVING again (a completion the pager ran of its own
    /// has ended with it). Refused when no call is in flight.
    pub fn end_completion(&mut self) -> Result<(), Refused> {
        if self.completions == 0 {
            return Err(self.refuse(Transition::EndCompletion));
        }
        self.completions -= 1;
        if let Phase::Served { pager_completing, .. } = &mut self.phase {
            if self.completions == 0 {
                *pager_completing = false;
            }
        }
        Ok(())
    }

    /// Takes in the state the session's pager reports: a terminal one finishes the session;
    /// COMPLETING or SERVING says whether the pager runs a completion of its own. Only for a
    /// served session (an orphan's or a finished session's last owner has no say).
    pub fn pager_reports(&mut self, reported: SessionState) -> Result<(), Refused> {
        let Phase::Served { readopting, .. } = self.phase else {
            return Err(self.refuse(Transition::PagerReports));
        };
        self.phase = match reported {
            SessionState::Graduated => Phase::Graduated,
            SessionState::Ended => Phase::Ended,
            SessionState::Failed => Phase::Failed,
            SessionState::Completing => Phase::Served { pager_completing: true, readopting },
            SessionState::Serving => Phase::Served { pager_completing: false, readopting },
            _ => self.phase,
        };
        Ok(())
    }

    /// The session finishes: its VMM is gone, or nothing can serve it.
    pub fn finish(&mut self, how: Finish) -> Result<(), Refused> {
        let to = (!self.is_terminal()).then_some(match how {
            Finish::Ended => Phase::Ended,
            Finish::Failed => Phase::Failed,
        });
        self.go(Transition::Finish, to)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(phase: Phase, completions: u32) -> Lifecycle {
        Lifecycle { phase, completions }
    }

    fn served(pager_completing: bool, readopting: bool) -> Phase {
        Phase::Served { pager_completing, readopting }
    }

    const ORPHAN: Phase = Phase::Orphaned { adopting: false };
    const ADOPTING: Phase = Phase::Orphaned { adopting: true };

    fn all_phases() -> Vec<Phase> {
        vec![
            Phase::Pending,
            Phase::HandingOver,
            served(false, false),
            served(true, false),
            served(false, true),
            served(true, true),
            ORPHAN,
            ADOPTING,
            Phase::Graduated,
            Phase::Ended,
            Phase::Failed,
        ]
    }

    type Step = fn(&mut Lifecycle) -> Result<(), Refused>;

    fn steps() -> Vec<(Transition, Step)> {
        use Transition as T;
        vec![
            (T::HandOver, Lifecycle::hand_over),
            (T::Serve, Lifecycle::serve),
            (T::Orphan, Lifecycle::orphan),
            (T::BeginReadopt, Lifecycle::begin_readopt),
            (T::Readopted, Lifecycle::readopted),
            (T::BeginCompletion, Lifecycle::begin_completion),
            (T::EndCompletion, Lifecycle::end_completion),
            (T::PagerReports, |l| l.pager_reports(SessionState::Graduated)),
            (T::Finish, |l| l.finish(Finish::Failed)),
        ]
    }

    /// Every allowed (transition, from) with where it goes; every pair not listed is refused.
    /// Each row holds for no call in flight and for one (the count goes on but for the
    /// completion transitions themselves).
    fn allowed(transition: Transition, from: Phase, completions: u32) -> Option<Lifecycle> {
        use Phase::*;
        use Transition as T;
        let same = |phase| Some(at(phase, completions));
        match (transition, from) {
            (T::HandOver, Pending) => same(HandingOver),
            (T::Serve, HandingOver) => same(served(false, false)),
            (
                T::Orphan,
                HandingOver | Served { readopting: true, .. } | Orphaned { adopting: true },
            ) => same(ORPHAN),
            (T::BeginReadopt, Served { pager_completing, readopting: false }) => {
                same(served(pager_completing, true))
            }
            (T::BeginReadopt, Orphaned { adopting: false }) => same(ADOPTING),
            (T::Readopted, Served { pager_completing, readopting: true }) => {
                same(served(pager_completing, false))
            }
            (T::Readopted, Orphaned { adopting: true }) => same(served(false, false)),
            (T::BeginCompletion, Served { readopting: false, .. }) => {
                Some(at(from, completions + 1))
            }
            (T::EndCompletion, Served { readopting, pager_completing }) if completions > 0 => {
                let pager_completing = pager_completing && completions > 1;
                Some(at(served(pager_completing, readopting), completions - 1))
            }
            (T::EndCompletion, _) if completions > 0 => Some(at(from, completions - 1)),
            (T::PagerReports, Served { .. }) => same(Graduated),
            (T::Finish, f) if !matches!(f, Graduated | Ended | Failed) => same(Failed),
            _ => None,
        }
    }

    #[test]
    fn every_allowed_transition_goes_where_the_rules_say_and_every_other_is_refused() {
        let mut allowed_count = 0;
        for (transition, step) in steps() {
            for from in all_phases() {
                for completions in [0, 1, 2] {
                    let mut l = at(from, completions);
                    let got = step(&mut l);
                    match allowed(transition, from, completions) {
                        Some(to) => {
                            allowed_count += 1;
                            assert_eq!(got, Ok(()), "{transition:?} from {from:?}/{completions}");
                            assert_eq!(l, to, "{transition:?} from {from:?}/{completions}");
                        }
                        None => {
                            assert_eq!(got, Err(Refused { from, transition }), "{from:?}");
                            assert_eq!(l, at(from, completions), "a refusal changes nothing");
                        }
                    }
                }
            }
        }
        // Not a table that allows nothing (or everything): 9 transitions x 11 phases x 3 counts.
        assert!((60..200).contains(&allowed_count), "{allowed_count} allowed");
    }

    #[test]
    fn grpc_shows_pending_serving_completing_and_orphaned_from_the_phases_they_stand_for() {
        assert_eq!(at(Phase::Pending, 0).state(), SessionState::Pending);
        assert_eq!(at(Phase::HandingOver, 0).state(), SessionState::Pending);
        assert_eq!(at(served(false, false), 0).state(), SessionState::Serving);
        assert_eq!(at(served(false, true), 0).state(), SessionState::Serving);
        assert_eq!(at(served(false, true), 1).state(), SessionState::Completing);
        assert_eq!(at(served(true, false), 0).state(), SessionState::Completing);
        assert_eq!(at(ADOPTING, 1).state(), SessionState::Orphaned);
        assert_eq!(at(Phase::Graduated, 1).state(), SessionState::Graduated);
        for phase in all_phases() {
            let state = at(phase, 0).state();
            assert_eq!(Lifecycle::recovered(state).state(), state, "{phase:?} round-trips");
        }
    }

    #[test]
    fn the_pager_says_whether_it_completes_and_how_the_session_finished() {
        let mut l = at(served(false, false), 0);
        l.pager_reports(SessionState::Completing).unwrap();
        assert_eq!(l.state(), SessionState::Completing);
        l.pager_reports(SessionState::Serving).unwrap();
        assert_eq!(l.state(), SessionState::Serving);
        // A call in flight keeps it COMPLETING whatever the pager says.
        let mut l = at(served(false, false), 1);
        l.pager_reports(SessionState::Serving).unwrap();
        assert_eq!(l.state(), SessionState::Completing);
        l.pager_reports(SessionState::Ended).unwrap();
        assert_eq!(l, at(Phase::Ended, 1), "the call still waits for its answer");
        l.end_completion().unwrap();
        assert_eq!(l, at(Phase::Ended, 0));
    }

    #[test]
    fn handing_off_is_any_handoff_in_flight() {
        let off: Vec<_> = all_phases().into_iter().filter(|&p| at(p, 0).handing_off()).collect();
        assert_eq!(off, [Phase::HandingOver, served(false, true), served(true, true), ADOPTING]);
    }
}
