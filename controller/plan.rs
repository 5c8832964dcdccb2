//! The plan: which sessions to graduate next, in order, and why. A pure function of what the
//! controller knows (every watched supervisor's inventory and active version), the policy, the
//! time, the completions in flight and the recent failures; no I/O, no clock.
//!
//! The rules (DESIGN.md, "Controller policy"):
//! - Only SERVING sessions are candidates (an ORPHANED one is held: no pager serves it). A
//!   candidate must be soaked
//!   (`now - connected_at >= min_session_age`; `connected_at` is the supervisor's clock, so the
//!   soak survives a controller restart), not in flight, and not failed within
//!   `failure_backoff`.
//! - Outdated-version sessions graduate once soaked whatever the ceiling, before any other.
//! - Then, with `max_active_sessions == 0`, every soaked session (time-based weaning); with
//!   N > 0, per supervisor, only the oldest soaked sessions needed to bring its serving count
//!   down to N.
//! - Oldest (`connected_at`) first within each class; ties by supervisor, then session id.
//!
//! The serving count of a supervisor counts its SERVING and COMPLETING sessions. Those already
//! leaving do not need replacing by another graduation: the sessions in flight, the COMPLETING
//! ones (a completion someone else started), and the outdated ones this plan graduates. A
//! leaving session whose completion fails is back in the count at the next scan, so this errs
//! toward graduating too few for a moment, never too many.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::time::{Duration, SystemTime};

use uffdpager::api::SessionState;

use crate::config::Policy;
use crate::inventory::{Inventory, SessionKey};

/// Why a session is in the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Its pager version is not the active one.
    Outdated,
    /// `max_active_sessions` > 0 and its supervisor serves more than that.
    Ceiling,
    /// `max_active_sessions` == 0: every soaked session graduates.
    Soaked,
}

/// One graduation the plan asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    pub key: SessionKey,
    pub pager_version: String,
    pub class: Class,
    pub age: Duration,
    /// For an operator: "outdated version v1 (active v2), soaked 12m 3s".
    pub reason: String,
}

/// Why a live session is left alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hold {
    /// This controller's CompleteSession is running.
    InFlight,
    /// COMPLETING, but not by this controller.
    CompletingElsewhere,
    /// SERVING without a `connected_at`: its age is unknown.
    NoConnectedAt,
    /// Younger than `min_session_age`.
    Soaking { age: Duration, left: Duration },
    /// Its last graduation failed less than `failure_backoff` ago.
    Backoff { retry_in: Duration },
    /// Current version, and the supervisor is at or under the ceiling without it.
    UnderCeiling { staying: usize, ceiling: u32 },
    /// Its supervisor's host has less available memory than `min_available_memory` (graduation
    /// turns page-cache memory into private memory), or has not said how much (`None`).
    LowMemory { available: Option<u64>, min: u64 },
    /// ORPHANED: no pager version serves it right now (the supervisor hands it to the next one
    /// available); nothing to graduate until then.
    Orphaned,
}

impl fmt::Display for Hold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Hold::InFlight => write!(f, "graduation in flight"),
            Hold::CompletingElsewhere => {
                write!(f, "COMPLETING (a completion this controller did not start)")
            }
            Hold::NoConnectedAt => write!(f, "no connected_at: its age is unknown"),
            Hold::Soaking { age, left } => {
                write!(f, "soaking: {} old, {} to go", fmt_age(*age), fmt_age(*left))
            }
            Hold::Backoff { retry_in } => {
                write!(
                    f,
                    "failure backoff: the last graduation failed; retry in {}",
                    fmt_age(*retry_in)
                )
            }
            Hold::UnderCeiling { staying, ceiling } => write!(
                f,
                "under the ceiling: {staying} serving stay <= max_active_sessions {ceiling}"
            ),
            Hold::LowMemory { available: Some(a), min } => write!(
                f,
                "host memory: {a} bytes available < min_available_memory {min}: graduation \
                 would turn page cache into private memory"
            ),
            Hold::LowMemory { available: None, min } => write!(
                f,
                "host memory: the supervisor has not reported its available memory \
                 (min_available_memory {min})"
            ),
            Hold::Orphaned => write!(
                f,
                "ORPHANED: no pager version serves it now; it graduates once one adopts it"
            ),
        }
    }
}

/// A live session the plan leaves alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub key: SessionKey,
    pub pager_version: String,
    pub hold: Hold,
}

/// The plan: graduations in order, and the live sessions held back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub graduate: Vec<Planned>,
    pub held: Vec<Held>,
}

/// Everything the plan depends on.
#[derive(Debug, Clone, Copy)]
pub struct PlanInput<'a> {
    /// Each supervisor in sync (endpoint, inventory). One that is reconnecting is left out: its
    /// inventory may be stale and it could not be called anyway.
    pub supervisors: &'a [(&'a str, &'a Inventory)],
    pub policy: &'a Policy,
    pub now: SystemTime,
    pub in_flight: &'a HashSet<SessionKey>,
    /// When each session's last graduation failed.
    pub failed_at: &'a HashMap<SessionKey, SystemTime>,
}

/// An age as an operator reads it: whole seconds ("12m 3s", "0s").
pub fn fmt_age(d: Duration) -> String {
    humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
}

/// `now - then`, zero if `then` is in the future (clock skew between hosts).
fn since(now: SystemTime, then: SystemTime) -> Duration {
    now.duration_since(then).unwrap_or(Duration::ZERO)
}

/// A soaked, idle, not-backing-off SERVING session.
#[derive(Debug)]
struct Candidate {
    key: SessionKey,
    version: String,
    connected_at: SystemTime,
    age: Duration,
}

fn oldest_first(list: &mut [Candidate]) {
    list.sort_by(|a, b| a.connected_at.cmp(&b.connected_at).then_with(|| a.key.cmp(&b.key)));
}

/// The hold of every candidate of a supervisor whose host is short of memory, if it is.
fn low_memory(policy: &Policy, inv: &Inventory) -> Option<Hold> {
    let min = policy.min_available_memory;
    match inv.available_memory {
        _ if min == 0 => None,
        Some(a) if a >= min => None,
        available => Some(Hold::LowMemory { available, min }),
    }
}

/// Computes the plan.
pub fn plan(input: &PlanInput<'_>) -> Plan {
    let policy = input.policy;
    let mut outdated: Vec<(Candidate, String)> = Vec::new();
    let mut current: Vec<(Candidate, Class, String)> = Vec::new();
    let mut held = Vec::new();
    for &(endpoint, inv) in input.supervisors {
        let mut serving = 0usize;
        let mut leaving = 0usize;
        let mut old_here = Vec::new();
        let mut cur_here = Vec::new();
        // Not terminal, not graduatable, not served: held, and not in the serving count.
        for s in inv.sessions.values().filter(|s| s.state == SessionState::Orphaned) {
            held.push(Held {
                key: SessionKey::new(endpoint, &s.id),
                pager_version: s.pager_version.clone(),
                hold: Hold::Orphaned,
            });
        }
        for s in inv.sessions.values().filter(|s| s.is_live()) {
            serving += 1;
            let key = SessionKey::new(endpoint, &s.id);
            let hold =
                |hold| Held { key: key.clone(), pager_version: s.pager_version.clone(), hold };
            if input.in_flight.contains(&key) {
                leaving += 1;
                held.push(hold(Hold::InFlight));
                continue;
            }
            if s.state == SessionState::Completing {
                leaving += 1;
                held.push(hold(Hold::CompletingElsewhere));
                continue;
            }
            let Some(connected_at) = s.connected_at else {
                held.push(hold(Hold::NoConnectedAt));
                continue;
            };
            let age = since(input.now, connected_at);
            if age < policy.min_session_age {
                held.push(hold(Hold::Soaking { age, left: policy.min_session_age - age }));
                continue;
            }
            if let Some(&failed) = input.failed_at.get(&key) {
                let elapsed = since(input.now, failed);
                if elapsed < policy.failure_backoff {
                    held.push(hold(Hold::Backoff { retry_in: policy.failure_backoff - elapsed }));
                    continue;
                }
            }
            let c = Candidate { key, version: s.pager_version.clone(), connected_at, age };
            if inv.is_outdated(s) {
                old_here.push(c);
            } else {
                cur_here.push(c);
            }
        }
        if let Some(low) = low_memory(policy, inv) {
            for c in old_here.into_iter().chain(cur_here) {
                held.push(Held { key: c.key, pager_version: c.version, hold: low.clone() });
            }
            continue;
        }
        let active = if inv.active_version.is_empty() { "unknown" } else { &inv.active_version };
        let staying = serving.saturating_sub(leaving + old_here.len());
        for c in old_here {
            let reason = format!(
                "outdated version {} (active {active}), soaked {}",
                c.version,
                fmt_age(c.age)
            );
            outdated.push((c, reason));
        }
        if policy.max_active_sessions == 0 {
            for c in cur_here {
                let reason = format!(
                    "soaked {}, time-based weaning (max_active_sessions 0)",
                    fmt_age(c.age)
                );
                current.push((c, Class::Soaked, reason));
            }
            continue;
        }
        let ceiling = policy.max_active_sessions;
        let need = staying.saturating_sub(usize::try_from(ceiling).unwrap_or(usize::MAX));
        oldest_first(&mut cur_here);
        let above = if staying == serving {
            format!("{serving} serving")
        } else {
            format!(
                "{serving} serving, {staying} staying after {} already leaving",
                serving - staying
            )
        };
        for (i, c) in cur_here.into_iter().enumerate() {
            if i < need {
                let reason = format!(
                    "ceiling: {above} > max_active_sessions {ceiling}, oldest soaked ({})",
                    fmt_age(c.age)
                );
                current.push((c, Class::Ceiling, reason));
            } else {
                held.push(Held {
                    key: c.key,
                    pager_version: c.version,
                    hold: Hold::UnderCeiling { staying: staying - need, ceiling },
                });
            }
        }
    }
    outdated.sort_by(|a, b| {
        a.0.connected_at.cmp(&b.0.connected_at).then_with(|| a.0.key.cmp(&b.0.key))
    });
    current.sort_by(|a, b| {
        a.0.connected_at.cmp(&b.0.connected_at).then_with(|| a.0.key.cmp(&b.0.key))
    });
    let graduate = outdated
        .into_iter()
        .map(|(c, reason)| (c, Class::Outdated, reason))
        .chain(current)
        .map(|(c, class, reason)| Planned {
            key: c.key,
            pager_version: c.version,
            class,
            age: c.age,
            reason,
        })
        .collect();
    held.sort_by(|a, b| a.key.cmp(&b.key));
    Plan { graduate, held }
}

#[cfg(test)]
#[path = "plan_tests.rs"]
// Test values are small and known: plain `as` casts.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_possible_wrap)]
mod tests;
