//! The plan's rules, one table row each, and their interplay.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use uffdpager::api::SessionState;

use super::*;
use crate::config::Policy;
use crate::inventory::{Inventory, SessionKey, TrackedSession};

const NOW: u64 = 1_000_000;

/// One session: supervisor, id, version, state, age in seconds (None: no connected_at).
#[derive(Clone, Copy)]
struct S(&'static str, &'static str, &'static str, SessionState, Option<i64>);

use SessionState::{Completing, Ended, Failed, Graduated, Orphaned, Pending, Serving};

fn serving(sup: &'static str, id: &'static str, version: &'static str, age: i64) -> S {
    S(sup, id, version, Serving, Some(age))
}

struct Case {
    name: &'static str,
    /// Active version per supervisor ("" = unknown).
    active: &'static [(&'static str, &'static str)],
    sessions: Vec<S>,
    min_age: u64,
    ceiling: u32,
    backoff: u64,
    in_flight: &'static [(&'static str, &'static str)],
    /// (supervisor, session, seconds ago; negative: in the future).
    failed: &'static [(&'static str, &'static str, i64)],
    /// Expected plan, in order: (supervisor, session, class).
    want: &'static [(&'static str, &'static str, Class)],
    /// Expected holds, as (session id, a word of its reason).
    holds: &'static [(&'static str, &'static str)],
    /// `min_available_memory`, and the available memory each supervisor reported.
    min_memory: u64,
    memory: &'static [(&'static str, u64)],
}

impl Default for Case {
    fn default() -> Self {
        Case {
            name: "",
            active: &[("A", "v2"), ("B", "v2")],
            sessions: Vec::new(),
            min_age: 600,
            ceiling: 0,
            backoff: 300,
            in_flight: &[],
            failed: &[],
            want: &[],
            holds: &[],
            min_memory: 0,
            memory: &[],
        }
    }
}

fn at(secs_ago: i64) -> SystemTime {
    let now = UNIX_EPOCH + Duration::from_secs(NOW);
    if secs_ago >= 0 {
        now - Duration::from_secs(secs_ago.unsigned_abs())
    } else {
        now + Duration::from_secs(secs_ago.unsigned_abs())
    }
}

fn run(case: &Case) -> Plan {
    let mut invs: BTreeMap<&str, Inventory> = BTreeMap::new();
    for (sup, active) in case.active {
        invs.entry(sup).or_default().active_version = (*active).into();
    }
    for &S(sup, id, version, state, age) in &case.sessions {
        let s = TrackedSession {
            id: id.into(),
            pager_version: version.into(),
            state,
            outdated_flag: false,
            connected_at: age.map(at),
            total_bytes: 0,
            resident_bytes: 0,
        };
        invs.entry(sup).or_default().sessions.insert(id.into(), s);
    }
    for (sup, bytes) in case.memory {
        invs.entry(sup).or_default().available_memory = Some(*bytes);
    }
    let supervisors: Vec<(&str, &Inventory)> = invs.iter().map(|(k, v)| (*k, v)).collect();
    let policy = Policy {
        min_available_memory: case.min_memory,
        min_session_age: Duration::from_secs(case.min_age),
        max_active_sessions: case.ceiling,
        failure_backoff: Duration::from_secs(case.backoff),
        ..Policy::default()
    };
    let in_flight: HashSet<SessionKey> =
        case.in_flight.iter().map(|(s, id)| SessionKey::new(s, id)).collect();
    let failed_at: HashMap<SessionKey, SystemTime> =
        case.failed.iter().map(|(s, id, ago)| (SessionKey::new(s, id), at(*ago))).collect();
    plan(&PlanInput {
        supervisors: &supervisors,
        policy: &policy,
        now: at(0),
        in_flight: &in_flight,
        failed_at: &failed_at,
    })
}

fn cases() -> Vec<Case> {
    vec![
        Case { name: "nothing to watch, nothing to do", ..Default::default() },
        Case {
            name: "a host with less available memory than min_available_memory graduates nothing, outdated or not",
            sessions: vec![serving("A", "a1", "v1", 900), serving("A", "a2", "v2", 900), serving("B", "b1", "v1", 900)],
            min_memory: 1 << 30,
            memory: &[("A", (1 << 30) - 1), ("B", 1 << 30)],
            want: &[("B", "b1", Class::Outdated)],
            holds: &[("a1", "host memory"), ("a2", "min_available_memory")],
            ..Default::default()
        },
        Case {
            name: "a supervisor that has not reported its memory is held while min_available_memory is set",
            sessions: vec![serving("A", "a1", "v2", 900)],
            min_memory: 1,
            holds: &[("a1", "not reported")],
            ..Default::default()
        },
        Case {
            name: "with min_available_memory 0 memory is not looked at",
            sessions: vec![serving("A", "a1", "v2", 900)],
            memory: &[("A", 0)],
            want: &[("A", "a1", Class::Soaked)],
            ..Default::default()
        },
        Case {
            name: "low memory holds only soaked candidates: young sessions still say soaking",
            sessions: vec![serving("A", "a1", "v2", 10)],
            min_memory: 1 << 30,
            memory: &[("A", 1)],
            holds: &[("a1", "soaking")],
            ..Default::default()
        },
        Case {
            name: "only SERVING sessions are candidates; COMPLETING ones are held",
            sessions: vec![
                S("A", "p", "v2", Pending, None),
                S("A", "g", "v2", Graduated, Some(9000)),
                S("A", "e", "v2", Ended, Some(9000)),
                S("A", "f", "v2", Failed, Some(9000)),
                S("A", "c", "v2", Completing, Some(9000)),
                serving("A", "s", "v2", 9000),
            ],
            want: &[("A", "s", Class::Soaked)],
            holds: &[("c", "COMPLETING")],
            ..Default::default()
        },
        Case {
            name: "an ORPHANED session is held, not graduated, and not counted as serving",
            ceiling: 1,
            sessions: vec![S("A", "o", "v2", Orphaned, Some(9000)), serving("A", "s", "v2", 9000)],
            holds: &[("o", "ORPHANED"), ("s", "under the ceiling")],
            ..Default::default()
        },
        Case {
            name: "soak is at least min_session_age, counted from connected_at",
            sessions: vec![
                serving("A", "young", "v2", 599),
                serving("A", "exact", "v2", 600),
                S("A", "future", "v2", Serving, Some(-60)),
                S("A", "unknown", "v2", Serving, None),
            ],
            want: &[("A", "exact", Class::Soaked)],
            holds: &[("young", "1s to go"), ("future", "soaking"), ("unknown", "connected_at")],
            ..Default::default()
        },
        Case {
            name: "a zero soak makes every SERVING session eligible at once",
            min_age: 0,
            sessions: vec![serving("A", "new", "v2", 0)],
            want: &[("A", "new", Class::Soaked)],
            ..Default::default()
        },
        Case {
            name: "sessions in flight are not planned again",
            sessions: vec![serving("A", "a", "v2", 900), serving("A", "b", "v2", 800)],
            in_flight: &[("A", "a")],
            want: &[("A", "b", Class::Soaked)],
            holds: &[("a", "in flight")],
            ..Default::default()
        },
        Case {
            name: "a failure holds a session for failure_backoff, then it is retried",
            sessions: vec![
                serving("A", "recent", "v2", 900),
                serving("A", "expired", "v2", 900),
                serving("A", "long-ago", "v2", 900),
                serving("A", "clock-stepped-back", "v2", 900),
            ],
            failed: &[
                ("A", "recent", 299),
                ("A", "expired", 300),
                ("A", "long-ago", 5000),
                ("A", "clock-stepped-back", -10),
            ],
            want: &[("A", "expired", Class::Soaked), ("A", "long-ago", Class::Soaked)],
            holds: &[("recent", "retry in 1s"), ("clock-stepped-back", "retry in 5m")],
            ..Default::default()
        },
        Case {
            name: "a failure on one supervisor does not hold a namesake on another",
            sessions: vec![serving("A", "x", "v2", 900), serving("B", "x", "v2", 900)],
            failed: &[("A", "x", 1)],
            want: &[("B", "x", Class::Soaked)],
            ..Default::default()
        },
        Case {
            name: "time-based weaning: every soaked session, oldest first",
            sessions: vec![
                serving("A", "mid", "v2", 2000),
                serving("B", "oldest", "v2", 3000),
                serving("A", "newest", "v2", 1000),
            ],
            want: &[
                ("B", "oldest", Class::Soaked),
                ("A", "mid", Class::Soaked),
                ("A", "newest", Class::Soaked),
            ],
            ..Default::default()
        },
        Case {
            name: "outdated sessions come first even when younger, oldest first among them",
            sessions: vec![
                serving("A", "cur-old", "v2", 9000),
                serving("A", "out-young", "v1", 700),
                serving("B", "out-old", "v1", 800),
            ],
            want: &[
                ("B", "out-old", Class::Outdated),
                ("A", "out-young", Class::Outdated),
                ("A", "cur-old", Class::Soaked),
            ],
            ..Default::default()
        },
        Case {
            name: "outdated sessions still soak first",
            sessions: vec![serving("A", "out", "v1", 10)],
            want: &[],
            holds: &[("out", "soaking")],
            ..Default::default()
        },
        Case {
            name: "the ceiling graduates exactly the oldest sessions above it",
            ceiling: 3,
            sessions: (1..=6)
                .map(|i| {
                    serving("A", ["s1", "s2", "s3", "s4", "s5", "s6"][i - 1], "v2", 1000 * i as i64)
                })
                .collect(),
            want: &[
                ("A", "s6", Class::Ceiling),
                ("A", "s5", Class::Ceiling),
                ("A", "s4", Class::Ceiling),
            ],
            holds: &[
                ("s1", "under the ceiling"),
                ("s2", "3 serving stay"),
                ("s3", "max_active_sessions 3"),
            ],
            ..Default::default()
        },
        Case {
            name: "at or under the ceiling nothing current graduates",
            ceiling: 3,
            sessions: vec![
                serving("A", "a", "v2", 900),
                serving("A", "b", "v2", 900),
                serving("A", "c", "v2", 900),
            ],
            want: &[],
            holds: &[("a", "under the ceiling"), ("b", "under"), ("c", "under")],
            ..Default::default()
        },
        Case {
            name: "soaking sessions count as serving, so the oldest soaked ones make room",
            ceiling: 3,
            sessions: vec![
                serving("A", "old1", "v2", 900),
                serving("A", "old2", "v2", 800),
                serving("A", "young1", "v2", 10),
                serving("A", "young2", "v2", 10),
                serving("A", "young3", "v2", 10),
            ],
            want: &[("A", "old1", Class::Ceiling), ("A", "old2", Class::Ceiling)],
            ..Default::default()
        },
        Case {
            name: "outdated sessions graduate whatever the ceiling",
            ceiling: 10,
            sessions: vec![
                serving("A", "o1", "v1", 900),
                serving("A", "o2", "v1", 700),
                serving("A", "c1", "v2", 900),
            ],
            want: &[("A", "o1", Class::Outdated), ("A", "o2", Class::Outdated)],
            ..Default::default()
        },
        Case {
            name: "graduating outdated sessions counts toward the ceiling",
            ceiling: 3,
            sessions: vec![
                serving("A", "o1", "v1", 9000),
                serving("A", "o2", "v1", 9000),
                serving("A", "c1", "v2", 6000),
                serving("A", "c2", "v2", 5000),
                serving("A", "c3", "v2", 4000),
                serving("A", "c4", "v2", 3000),
                serving("A", "c5", "v2", 2000),
                serving("A", "c6", "v2", 1000),
            ],
            want: &[
                ("A", "o1", Class::Outdated),
                ("A", "o2", Class::Outdated),
                ("A", "c1", Class::Ceiling),
                ("A", "c2", Class::Ceiling),
                ("A", "c3", Class::Ceiling),
            ],
            ..Default::default()
        },
        Case {
            name: "sessions in flight or COMPLETING count as already leaving",
            ceiling: 3,
            sessions: vec![
                serving("A", "a", "v2", 9000),
                S("A", "b", "v2", Completing, Some(8000)),
                serving("A", "c", "v2", 7000),
                serving("A", "d", "v2", 6000),
                serving("A", "e", "v2", 5000),
                serving("A", "f", "v2", 4000),
            ],
            in_flight: &[("A", "a")],
            want: &[("A", "c", Class::Ceiling)],
            holds: &[("a", "in flight"), ("b", "COMPLETING"), ("d", "under")],
            ..Default::default()
        },
        Case {
            name: "sessions in backoff stay, so the next oldest make room",
            ceiling: 2,
            sessions: vec![
                serving("A", "a", "v2", 9000),
                serving("A", "b", "v2", 8000),
                serving("A", "c", "v2", 7000),
                serving("A", "d", "v2", 6000),
            ],
            failed: &[("A", "a", 10)],
            want: &[("A", "b", Class::Ceiling), ("A", "c", Class::Ceiling)],
            holds: &[("a", "backoff"), ("d", "under")],
            ..Default::default()
        },
        Case {
            name: "the ceiling is per supervisor",
            ceiling: 2,
            sessions: vec![
                serving("A", "a1", "v2", 900),
                serving("A", "a2", "v2", 800),
                serving("A", "a3", "v2", 700),
                serving("A", "a4", "v2", 650),
                serving("B", "b1", "v2", 9000),
                serving("B", "b2", "v2", 9000),
            ],
            want: &[("A", "a1", Class::Ceiling), ("A", "a2", Class::Ceiling)],
            ..Default::default()
        },
        Case {
            name: "each supervisor's own active version decides what is outdated",
            active: &[("A", "v2"), ("B", "v1")],
            ceiling: 5,
            sessions: vec![serving("A", "a", "v1", 900), serving("B", "b", "v1", 900)],
            want: &[("A", "a", Class::Outdated)],
            ..Default::default()
        },
        Case {
            name: "ties are broken by supervisor, then session id",
            sessions: vec![
                serving("B", "a", "v2", 900),
                serving("A", "b", "v2", 900),
                serving("A", "a", "v2", 900),
            ],
            want: &[
                ("A", "a", Class::Soaked),
                ("A", "b", Class::Soaked),
                ("B", "a", Class::Soaked),
            ],
            ..Default::default()
        },
    ]
}

#[test]
fn every_rule_of_the_plan_holds() {
    for case in cases() {
        let plan = run(&case);
        let got: Vec<(&str, &str, Class)> = plan
            .graduate
            .iter()
            .map(|p| (p.key.supervisor.as_str(), p.key.session.as_str(), p.class))
            .collect();
        assert_eq!(got, case.want, "{}", case.name);
        for (id, word) in case.holds {
            let held = plan.held.iter().find(|h| h.key.session == *id);
            let reason = held.map(|h| h.hold.to_string()).unwrap_or_default();
            assert!(
                reason.contains(word),
                "{}: {id} held for {reason:?}, wanted {word:?}",
                case.name
            );
        }
        for p in &plan.graduate {
            assert!(
                !plan.held.iter().any(|h| h.key == p.key),
                "{}: {:?} both planned and held",
                case.name,
                p.key
            );
        }
    }
}

#[test]
fn every_live_or_orphaned_session_is_either_planned_or_held() {
    for case in cases() {
        let plan = run(&case);
        let live =
            case.sessions.iter().filter(|s| matches!(s.3, Serving | Completing | Orphaned)).count();
        assert_eq!(plan.graduate.len() + plan.held.len(), live, "{}", case.name);
    }
}

#[test]
fn reasons_say_why_in_words() {
    let case = Case {
        ceiling: 1,
        sessions: vec![
            serving("A", "o", "v1", 723),
            serving("A", "c1", "v2", 900),
            serving("A", "c2", "v2", 800),
        ],
        ..Default::default()
    };
    let plan = run(&case);
    assert_eq!(plan.graduate[0].reason, "outdated version v1 (active v2), soaked 12m 3s");
    assert_eq!(
        plan.graduate[1].reason,
        "ceiling: 3 serving, 2 staying after 1 already leaving > max_active_sessions 1, oldest soaked (15m)"
    );
    let weaning = run(&Case { sessions: vec![serving("A", "c", "v2", 600)], ..Default::default() });
    assert_eq!(
        weaning.graduate[0].reason,
        "soaked 10m, time-based weaning (max_active_sessions 0)"
    );
    let unknown = run(&Case {
        active: &[("A", "")],
        sessions: vec![serving("A", "c", "v2", 600)],
        ..Default::default()
    });
    assert_eq!(unknown.graduate[0].class, Class::Soaked, "no active version, no outdated flag");
}

#[test]
fn the_outdated_flag_decides_while_the_active_version_is_unknown() {
    let inv = Inventory {
        available_memory: None,
        active_version: String::new(),
        sessions: [(
            "x".to_string(),
            TrackedSession {
                id: "x".into(),
                pager_version: "v1".into(),
                state: Serving,
                outdated_flag: true,
                connected_at: Some(at(900)),
                total_bytes: 0,
                resident_bytes: 0,
            },
        )]
        .into(),
    };
    let sups = [("A", &inv)];
    let policy = Policy { max_active_sessions: 5, ..Policy::default() };
    let p = plan(&PlanInput {
        supervisors: &sups,
        policy: &policy,
        now: at(0),
        in_flight: &HashSet::new(),
        failed_at: &HashMap::new(),
    });
    assert_eq!(p.graduate[0].class, Class::Outdated);
    assert!(p.graduate[0].reason.contains("active unknown"), "{}", p.graduate[0].reason);
}
