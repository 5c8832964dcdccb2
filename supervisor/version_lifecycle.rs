//! A pager version's life as the supervisor tracks it: one type that owns the version's state
//! and every transition `deploy.rs`, `recover.rs` and shutdown take, each a method that refuses
//! a wrong one with a typed error. The gRPC state (`VersionState`) is produced from it by
//! [`VersionLifecycle::state`] where the API and `/metrics` are built, never set directly.
//! What used to be side flags are parts of the phases they qualify: a stop asked for is
//! `stopping` (its process's exit is then expected), a standby version is `Draining { standby }`,
//! and a version that died and waits for its respawn (STARTING with no process) is `Respawning`.
//!
//! | transition | from | to | when |
//! | --- | --- | --- | --- |
//! | `spawned` | Respawning, Starting | Starting | a process is recorded |
//! | `become_active` | Starting | Active | DeployVersion, once healthy |
//! | `stand_by` | Starting | Draining{standby} | startup, beside the active one |
//! | `activate` | Active, Draining (not stopping) | Active | ActivateVersion, recovery |
//! | `respawned` | Starting | Active if still active, else Draining | a respawn ran |
//! | `step_down` | Active; Respawning | Draining; Exited | another one became active |
//! | `fail_to_start` | Starting | Failed | its first process did not start |
//! | `begin_stop` | Starting, Active, Draining | the same, stopping | drained, shutdown |
//! | `stop_refused` | stopping | the same, not stopping | the pager said no |
//! | `stopped` | stopping | Exited | the exit asked for |
//! | `died` | Starting, Active, Draining (not stopping) | Respawning or Failed | unasked exit |
//! | `give_up` | Respawning | Failed | respawns failed too often in a row |
//!
//! Every other (transition, phase) pair is refused ([`VersionRefused`]); the table test below
//! lists them all. The `stopping` qualifier is kept through `become_active`, `stand_by`,
//! `respawned` and `step_down`, as the flag it replaces was.
//!
//! A version read back from an earlier run starts [`VersionLifecycle::taken_over`]: DRAINING
//! (recovery then activates the one recorded as active).

use uffdpager::api::VersionState;

/// Where a version stands (see the module's table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionPhase {
    /// Spawned or being spawned, not yet healthy (or respawned, not yet back in its role).
    Starting { stopping: bool },
    /// Its process died; a respawn is due (no process runs).
    Respawning,
    /// New sessions go to it; one version at a time.
    Active { stopping: bool },
    /// Serves the sessions it has and gets no new ones; stopped once it has none, unless it is a
    /// `standby` (a roll-back target started beside the active one, kept until first activated).
    Draining { standby: bool, stopping: bool },
    /// Stopped on purpose (or its respawn cancelled).
    Exited,
    /// Would not start, died while not active, or died too often in a row.
    Failed,
}

/// What a transition was asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionTransition {
    Spawned,
    BecomeActive,
    StandBy,
    Activate,
    Respawned,
    StepDown,
    FailToStart,
    BeginStop,
    StopRefused,
    Stopped,
    Died,
    GiveUp,
}

/// A transition the rules do not allow from the version's phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a pager version in phase {from:?} cannot take transition {transition:?}")]
pub struct VersionRefused {
    pub from: VersionPhase,
    pub transition: VersionTransition,
}

/// A version's phase and its transitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VersionLifecycle {
    phase: VersionPhase,
}

impl Default for VersionLifecycle {
    fn default() -> Self {
        Self::new()
    }
}

impl VersionLifecycle {
    /// A version about to be started: STARTING.
    pub fn new() -> Self {
        Self { phase: VersionPhase::Starting { stopping: false } }
    }

    /// A version whose process an earlier run left running: DRAINING.
    pub fn taken_over() -> Self {
        Self { phase: VersionPhase::Draining { standby: false, stopping: false } }
    }

    #[cfg(test)]
    pub fn phase(self) -> VersionPhase {
        self.phase
    }

    /// The state gRPC (and `/metrics`) shows.
    pub fn state(self) -> VersionState {
        match self.phase {
            VersionPhase::Starting { .. } | VersionPhase::Respawning => VersionState::Starting,
            VersionPhase::Active { .. } => VersionState::Active,
            VersionPhase::Draining { .. } => VersionState::Draining,
            VersionPhase::Exited => VersionState::Exited,
            VersionPhase::Failed => VersionState::Failed,
        }
    }

    /// The state's name as the API spells it (for messages): `STARTING`, `ACTIVE`...
    pub fn name(self) -> &'static str {
        self.state().as_str_name().trim_start_matches("VERSION_STATE_")
    }

    /// A stop was asked for: its process's exit is expected.
    pub fn is_stopping(self) -> bool {
        matches!(
            self.phase,
            VersionPhase::Starting { stopping: true }
                | VersionPhase::Active { stopping: true }
                | VersionPhase::Draining { stopping: true, .. }
        )
    }

    /// STARTING: being (re)started.
    pub fn is_starting(self) -> bool {
        matches!(self.phase, VersionPhase::Starting { .. } | VersionPhase::Respawning)
    }

    /// ACTIVE.
    pub fn is_active(self) -> bool {
        matches!(self.phase, VersionPhase::Active { .. })
    }

    /// ACTIVE or DRAINING: it may be handed sessions (if its process runs and is not stopping).
    pub fn takes_sessions(self) -> bool {
        matches!(self.phase, VersionPhase::Active { .. } | VersionPhase::Draining { .. })
    }

    /// STARTING, ACTIVE or DRAINING: a version of that label cannot be deployed again.
    pub fn is_running(self) -> bool {
        !matches!(self.phase, VersionPhase::Exited | VersionPhase::Failed)
    }

    /// DRAINING and not a standby: to be stopped once it serves nothing.
    pub fn drains(self) -> bool {
        matches!(self.phase, VersionPhase::Draining { standby: false, .. })
    }

    /// Died, its respawn due.
    pub fn awaits_respawn(self) -> bool {
        self.phase == VersionPhase::Respawning
    }

    fn go(
        &mut self,
        transition: VersionTransition,
        to: Option<VersionPhase>,
    ) -> Result<(), VersionRefused> {
        match to {
            Some(phase) => {
                self.phase = phase;
                Ok(())
            }
            None => Err(VersionRefused { from: self.phase, transition }),
        }
    }

    /// A process of the version was recorded: a respawn's is STARTING until it is back in its
    /// role; a first start's already is.
    pub fn spawned(&mut self) -> Result<(), VersionRefused> {
        let to = match self.phase {
            VersionPhase::Respawning => Some(VersionPhase::Starting { stopping: false }),
            p @ VersionPhase::Starting { .. } => Some(p),
            _ => None,
        };
        self.go(VersionTransition::Spawned, to)
    }

    /// Healthy after DeployVersion (or as the active version at startup): ACTIVE.
    pub fn become_active(&mut self) -> Result<(), VersionRefused> {
        let to = match self.phase {
            VersionPhase::Starting { stopping } => Some(VersionPhase::Active { stopping }),
            _ => None,
        };
        self.go(VersionTransition::BecomeActive, to)
    }

    /// Healthy at startup beside the active version: DRAINING, kept while idle.
    pub fn stand_by(&mut self) -> Result<(), VersionRefused> {
        let to = match self.phase {
            VersionPhase::Starting { stopping } => {
                Some(VersionPhase::Draining { standby: true, stopping })
            }
            _ => None,
        };
        self.go(VersionTransition::StandBy, to)
    }

    /// ActivateVersion (or recovery's recorded active version): a running version that is not
    /// being stopped becomes ACTIVE (a standby no longer is one).
    pub fn activate(&mut self) -> Result<(), VersionRefused> {
        let to = match self.phase {
            VersionPhase::Active { stopping: false }
            | VersionPhase::Draining { stopping: false, .. } => {
                Some(VersionPhase::Active { stopping: false })
            }
            _ => None,
        };
        self.go(VersionTransition::Activate, to)
    }

    /// A respawned process runs: back to ACTIVE if the version still is the active one, else
    /// DRAINING.
    pub fn respawned(&mut self, is_active: bool) -> Result<(), VersionRefused> {
        let to = match self.phase {
            VersionPhase::Starting { stopping } if is_active => {
                Some(VersionPhase::Active { stopping })
            }
            VersionPhase::Starting { stopping } => {
                Some(VersionPhase::Draining { standby: false, stopping })
            }
            _ => None,
        };
        self.go(VersionTransition::Respawned, to)
    }

    /// Another version became active: this one drains if it was ACTIVE, or its due respawn is
    /// cancelled (EXITED).
    pub fn step_down(&mut self) -> Result<(), VersionRefused> {
        let to = match self.phase {
            VersionPhase::Active { stopping } => {
                Some(VersionPhase::Draining { standby: false, stopping })
            }
            VersionPhase::Respawning => Some(VersionPhase::Exited),
            _ => None,
        };
        self.go(VersionTransition::StepDown, to)
    }

    /// Its first process did not start (or not become healthy): FAILED.
    pub fn fail_to_start(&mut self) -> Result<(), VersionRefused> {
        let to =
            matches!(self.phase, VersionPhase::Starting { .. }).then_some(VersionPhase::Failed);
        self.go(VersionTransition::FailToStart, to)
    }

    /// A stop of its process is asked for (drained, or shutdown): its exit becomes expected.
    pub fn begin_stop(&mut self) -> Result<(), VersionRefused> {
        self.set_stopping(VersionTransition::BeginStop, false, true)
    }

    /// The pager refused to stop: it runs on, in the phase it had.
    pub fn stop_refused(&mut self) -> Result<(), VersionRefused> {
        self.set_stopping(VersionTransition::StopRefused, true, false)
    }

    fn set_stopping(
        &mut self,
        transition: VersionTransition,
        from: bool,
        to: bool,
    ) -> Result<(), VersionRefused> {
        let next = match self.phase {
            VersionPhase::Starting { stopping } if stopping == from => {
                Some(VersionPhase::Starting { stopping: to })
            }
            VersionPhase::Active { stopping } if stopping == from => {
                Some(VersionPhase::Active { stopping: to })
            }
            VersionPhase::Draining { standby, stopping } if stopping == from => {
                Some(VersionPhase::Draining { standby, stopping: to })
            }
            _ => None,
        };
        self.go(transition, next)
    }

    /// Its process exited after a stop was asked for: EXITED.
    pub fn stopped(&mut self) -> Result<(), VersionRefused> {
        let to = self.is_stopping().then_some(VersionPhase::Exited);
        self.go(VersionTransition::Stopped, to)
    }

    /// Its process died unasked: a respawn is due (`respawn`), or it is FAILED.
    pub fn died(&mut self, respawn: bool) -> Result<(), VersionRefused> {
        let to = match self.phase {
            VersionPhase::Starting { stopping: false }
            | VersionPhase::Active { stopping: false }
            | VersionPhase::Draining { stopping: false, .. } => {
                Some(if respawn { VersionPhase::Respawning } else { VersionPhase::Failed })
            }
            _ => None,
        };
        self.go(VersionTransition::Died, to)
    }

    /// Its respawns failed too often in a row: FAILED.
    pub fn give_up(&mut self) -> Result<(), VersionRefused> {
        let to = self.awaits_respawn().then_some(VersionPhase::Failed);
        self.go(VersionTransition::GiveUp, to)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use VersionPhase as P;
    use VersionTransition as T;

    fn at(phase: VersionPhase) -> VersionLifecycle {
        VersionLifecycle { phase }
    }

    fn all_phases() -> Vec<VersionPhase> {
        let mut out = Vec::new();
        for stopping in [false, true] {
            out.push(P::Starting { stopping });
            out.push(P::Active { stopping });
            for standby in [false, true] {
                out.push(P::Draining { standby, stopping });
            }
        }
        out.extend([P::Respawning, P::Exited, P::Failed]);
        out
    }

    type Step = fn(&mut VersionLifecycle) -> Result<(), VersionRefused>;

    fn steps() -> Vec<(VersionTransition, &'static str, Step)> {
        vec![
            (T::Spawned, "", VersionLifecycle::spawned),
            (T::BecomeActive, "", VersionLifecycle::become_active),
            (T::StandBy, "", VersionLifecycle::stand_by),
            (T::Activate, "", VersionLifecycle::activate),
            (T::Respawned, "active", |l| l.respawned(true)),
            (T::Respawned, "not active", |l| l.respawned(false)),
            (T::StepDown, "", VersionLifecycle::step_down),
            (T::FailToStart, "", VersionLifecycle::fail_to_start),
            (T::BeginStop, "", VersionLifecycle::begin_stop),
            (T::StopRefused, "", VersionLifecycle::stop_refused),
            (T::Stopped, "", VersionLifecycle::stopped),
            (T::Died, "respawn", |l| l.died(true)),
            (T::Died, "no respawn", |l| l.died(false)),
            (T::GiveUp, "", VersionLifecycle::give_up),
        ]
    }

    /// Every allowed (transition, from) with where it goes; every pair not listed is refused.
    fn allowed(
        transition: VersionTransition,
        how: &str,
        from: VersionPhase,
    ) -> Option<VersionPhase> {
        match (transition, from) {
            (T::Spawned, P::Respawning) => Some(P::Starting { stopping: false }),
            (T::Spawned, P::Starting { stopping }) => Some(P::Starting { stopping }),
            (T::BecomeActive, P::Starting { stopping }) => Some(P::Active { stopping }),
            (T::StandBy, P::Starting { stopping }) => Some(P::Draining { standby: true, stopping }),
            (T::Activate, P::Active { stopping: false } | P::Draining { stopping: false, .. }) => {
                Some(P::Active { stopping: false })
            }
            (T::Respawned, P::Starting { stopping }) if how == "active" => {
                Some(P::Active { stopping })
            }
            (T::Respawned, P::Starting { stopping }) => {
                Some(P::Draining { standby: false, stopping })
            }
            (T::StepDown, P::Active { stopping }) => Some(P::Draining { standby: false, stopping }),
            (T::StepDown, P::Respawning) => Some(P::Exited),
            (T::FailToStart, P::Starting { .. }) => Some(P::Failed),
            (T::BeginStop, P::Starting { stopping: false }) => Some(P::Starting { stopping: true }),
            (T::BeginStop, P::Active { stopping: false }) => Some(P::Active { stopping: true }),
            (T::BeginStop, P::Draining { standby, stopping: false }) => {
                Some(P::Draining { standby, stopping: true })
            }
            (T::StopRefused, P::Starting { stopping: true }) => {
                Some(P::Starting { stopping: false })
            }
            (T::StopRefused, P::Active { stopping: true }) => Some(P::Active { stopping: false }),
            (T::StopRefused, P::Draining { standby, stopping: true }) => {
                Some(P::Draining { standby, stopping: false })
            }
            (
                T::Stopped,
                P::Starting { stopping: true }
                | P::Active { stopping: true }
                | P::Draining { stopping: true, .. },
            ) => Some(P::Exited),
            (
                T::Died,
                P::Starting { stopping: false }
                | P::Active { stopping: false }
                | P::Draining { stopping: false, .. },
            ) => Some(if how == "respawn" { P::Respawning } else { P::Failed }),
            (T::GiveUp, P::Respawning) => Some(P::Failed),
            _ => None,
        }
    }

    #[test]
    fn every_allowed_transition_goes_where_the_rules_say_and_every_other_is_refused() {
        let mut allowed_count = 0;
        for (transition, how, step) in steps() {
            for from in all_phases() {
                let mut l = at(from);
                let got = step(&mut l);
                match allowed(transition, how, from) {
                    Some(to) => {
                        allowed_count += 1;
                        assert_eq!(got, Ok(()), "{transition:?} ({how}) from {from:?}");
                        assert_eq!(l.phase(), to, "{transition:?} ({how}) from {from:?}");
                    }
                    None => {
                        assert_eq!(
                            got,
                            Err(VersionRefused { from, transition }),
                            "{transition:?} ({how}) from {from:?}"
                        );
                        assert_eq!(l, at(from), "a refusal changes nothing");
                    }
                }
            }
        }
        // Not a table that allows nothing (or everything): 14 steps x 11 phases.
        assert!((30..100).contains(&allowed_count), "{allowed_count} allowed");
    }

    #[test]
    fn grpc_shows_starting_for_a_version_being_started_or_respawned() {
        let cases = [
            (P::Starting { stopping: false }, VersionState::Starting),
            (P::Starting { stopping: true }, VersionState::Starting),
            (P::Respawning, VersionState::Starting),
            (P::Active { stopping: true }, VersionState::Active),
            (P::Draining { standby: true, stopping: false }, VersionState::Draining),
            (P::Exited, VersionState::Exited),
            (P::Failed, VersionState::Failed),
        ];
        for (phase, state) in cases {
            assert_eq!(at(phase).state(), state, "{phase:?}");
        }
        assert_eq!(VersionLifecycle::new().name(), "STARTING");
        assert_eq!(VersionLifecycle::taken_over().name(), "DRAINING");
    }

    #[test]
    fn a_deployed_version_drains_when_another_is_deployed_then_stops() {
        let mut l = VersionLifecycle::new();
        l.become_active().unwrap();
        l.step_down().unwrap();
        assert!(l.drains());
        l.begin_stop().unwrap();
        assert!(l.is_stopping() && l.begin_stop().is_err(), "one stop at a time");
        l.stopped().unwrap();
        assert_eq!(l.state(), VersionState::Exited);
    }

    #[test]
    fn an_active_version_that_dies_is_respawned_back_to_active() {
        let mut l = VersionLifecycle::new();
        l.become_active().unwrap();
        l.died(true).unwrap();
        assert!(l.awaits_respawn() && l.is_starting());
        l.spawned().unwrap();
        l.respawned(true).unwrap();
        assert!(l.is_active());
    }

    #[test]
    fn a_standby_version_is_kept_until_activated_then_drains_like_any_other() {
        let mut l = VersionLifecycle::new();
        l.stand_by().unwrap();
        assert!(l.takes_sessions() && !l.drains());
        l.activate().unwrap();
        l.step_down().unwrap();
        assert!(l.drains());
    }
}
