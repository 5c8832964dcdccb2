//! The controller's state as the Controller API reports it: the one place where its domain
//! types become protobuf messages.

use std::time::{Duration, SystemTime};

use uffdpager::api::{
    ConnectionState, ControllerConfig, ControllerCounters, ControllerStatus, GraduationOutcome,
    HeldSession, InFlightGraduation, OutcomeResult, PlanClass, PlanResponse, PlannedGraduation,
    TrackedSession as ProtoTracked, WatchedSupervisor,
};

use crate::config::Config;
use crate::inventory::SessionKey;
use crate::plan::Class;
use crate::state::{ConnState, Counters, Outcome, OutcomeKind, Shared, State};

/// Disabled, as the log and GetStatus say it.
pub const DISABLED: &str = "disabled: watches nothing, graduates nothing";

/// One line saying what the controller does.
pub fn mode(config: &Config) -> &'static str {
    match (config.enabled, config.dry_run) {
        (false, _) => DISABLED,
        (true, true) => "enabled, dry run: records what it would graduate, calls nothing",
        (true, false) => "enabled",
    }
}

fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration::try_from(d).unwrap_or(prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: 0,
    })
}

fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    uffdpager::grpc::timestamp(t)
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// The effective configuration.
pub fn config(c: &Config) -> ControllerConfig {
    let p = &c.policy;
    ControllerConfig {
        enabled: c.enabled,
        min_session_age: Some(duration(p.min_session_age)),
        max_concurrent: p.max_concurrent,
        max_active_sessions: p.max_active_sessions,
        scan_interval: Some(duration(p.scan_interval)),
        completion_timeout: Some(duration(p.completion_timeout)),
        failure_backoff: Some(duration(p.failure_backoff)),
        supervisors: c.supervisors.clone(),
        dry_run: c.dry_run,
        outcome_history: count(c.outcome_history),
    }
}

fn conn_state(c: ConnState) -> ConnectionState {
    match c {
        ConnState::NotWatched => ConnectionState::NotWatched,
        ConnState::Connecting => ConnectionState::Connecting,
        ConnState::Syncing => ConnectionState::Syncing,
        ConnState::Watching => ConnectionState::Watching,
        ConnState::Backoff => ConnectionState::Backoff,
    }
}

fn result(k: OutcomeKind) -> OutcomeResult {
    match k {
        OutcomeKind::Graduated => OutcomeResult::Graduated,
        OutcomeKind::AlreadyGraduated => OutcomeResult::AlreadyGraduated,
        OutcomeKind::TimedOut => OutcomeResult::TimedOut,
        OutcomeKind::Failed => OutcomeResult::Failed,
        OutcomeKind::NotGraduatable => OutcomeResult::NotGraduatable,
        OutcomeKind::DryRun => OutcomeResult::DryRun,
    }
}

fn class(c: Class) -> PlanClass {
    match c {
        Class::Outdated => PlanClass::Outdated,
        Class::Ceiling => PlanClass::Ceiling,
        Class::Soaked => PlanClass::Soaked,
    }
}

fn outcome(o: &Outcome) -> GraduationOutcome {
    GraduationOutcome {
        seq: o.seq,
        supervisor: o.key.supervisor.clone(),
        session_id: o.key.session.clone(),
        pager_version: o.pager_version.clone(),
        result: result(o.result) as i32,
        reason: o.reason.clone(),
        error: o.error.clone(),
        started_at: Some(timestamp(o.started_at)),
        finished_at: Some(timestamp(o.finished_at)),
        duration: Some(duration(o.duration)),
        in_flight_at_start: o.in_flight_at_start,
        populated_bytes: o.populated_bytes,
    }
}

fn counters(c: &Counters) -> ControllerCounters {
    ControllerCounters {
        scans: c.scans,
        started: c.started,
        graduated: c.graduated,
        already_graduated: c.already_graduated,
        timed_out: c.timed_out,
        failed: c.failed,
        not_graduatable: c.not_graduatable,
        dry_run: c.dry_run,
        watch_events: c.watch_events,
        reconnects: c.reconnects,
        peak_in_flight: c.peak_in_flight,
    }
}

fn tracked(st: &State, config: &Config, now: SystemTime) -> Vec<ProtoTracked> {
    let mut out = Vec::new();
    for sup in &st.supervisors {
        for s in sup.inventory.sessions.values() {
            let key = SessionKey::new(&sup.endpoint, &s.id);
            let retry_after = st
                .failed_at
                .get(&key)
                .map(|at| *at + config.policy.failure_backoff)
                .filter(|t| *t > now);
            out.push(ProtoTracked {
                supervisor: sup.endpoint.clone(),
                session_id: s.id.clone(),
                pager_version: s.pager_version.clone(),
                state: s.state as i32,
                outdated: sup.inventory.is_outdated(s),
                connected_at: s.connected_at.map(timestamp),
                age: s.connected_at.map(|c| duration(now.duration_since(c).unwrap_or_default())),
                in_flight: st.in_flight.contains_key(&key),
                retry_after: retry_after.map(timestamp),
                total_bytes: s.total_bytes,
                resident_bytes: s.resident_bytes,
                dry_run_graduated: st.dry_run_done.contains(&key),
            });
        }
    }
    out
}

/// GetStatus.
pub fn status(shared: &Shared) -> ControllerStatus {
    let now = shared.now();
    let c = &shared.config;
    let st = shared.lock();
    let supervisors = st
        .supervisors
        .iter()
        .map(|s| WatchedSupervisor {
            endpoint: s.endpoint.clone(),
            state: conn_state(s.conn) as i32,
            active_version: s.inventory.active_version.clone(),
            sessions: count(s.inventory.sessions.len()),
            serving: count(s.inventory.live_count()),
            watching_since: s.watching_since.map(timestamp),
            last_error: s.last_error.clone(),
            reconnects: s.reconnects,
            events: s.events,
        })
        .collect();
    let mut in_flight: Vec<InFlightGraduation> = st
        .in_flight
        .iter()
        .map(|(k, f)| InFlightGraduation {
            supervisor: k.supervisor.clone(),
            session_id: k.session.clone(),
            pager_version: f.pager_version.clone(),
            reason: f.reason.clone(),
            started_at: Some(timestamp(f.started_at)),
            elapsed: Some(duration(f.started.elapsed())),
        })
        .collect();
    in_flight.sort_by(|a, b| (&a.supervisor, &a.session_id).cmp(&(&b.supervisor, &b.session_id)));
    ControllerStatus {
        enabled: c.enabled,
        dry_run: c.dry_run,
        mode: mode(c).to_string(),
        config: Some(config(c)),
        supervisors,
        sessions: tracked(&st, c, now),
        in_flight,
        outcomes: st.outcomes.iter().map(outcome).collect(),
        counters: Some(counters(&st.counters)),
        started_at: Some(timestamp(shared.started_at)),
        last_scan_at: st.last_scan_at.map(timestamp),
        now: Some(timestamp(now)),
    }
}

/// Plan: what the next scan would do, computed exactly as the loop computes it.
pub fn plan(shared: &Shared) -> PlanResponse {
    let now = shared.now();
    let c = &shared.config;
    let mut resp = PlanResponse {
        enabled: c.enabled,
        dry_run: c.dry_run,
        now: Some(timestamp(now)),
        ..Default::default()
    };
    if !c.enabled {
        resp.note = DISABLED.to_string();
        return resp;
    }
    let st = shared.lock();
    let max = usize::try_from(c.policy.max_concurrent).unwrap_or(usize::MAX);
    let slots = max.saturating_sub(st.in_flight.len());
    resp.slots = count(slots);
    if !st.supervisors.iter().any(|s| s.conn == ConnState::Watching) {
        resp.note = "no supervisor is in sync yet: nothing to plan".to_string();
    }
    let plan = st.plan(c, now);
    resp.graduations = plan
        .graduate
        .into_iter()
        .enumerate()
        .map(|(i, p)| PlannedGraduation {
            supervisor: p.key.supervisor,
            session_id: p.key.session,
            pager_version: p.pager_version,
            class: class(p.class) as i32,
            reason: p.reason,
            age: Some(duration(p.age)),
            starts_next_scan: i < slots,
        })
        .collect();
    resp.held = plan
        .held
        .into_iter()
        .map(|h| HeldSession {
            supervisor: h.key.supervisor,
            session_id: h.key.session,
            pager_version: h.pager_version,
            reason: h.hold.to_string(),
        })
        .collect();
    resp
}
