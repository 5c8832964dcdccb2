//! The controller's `/metrics` (`metrics_listen`): its graduations, the sessions it tracks, its
//! plan and each supervisor's connection, written from its state at scrape time. The README's
//! "Metrics" section lists every family.

use std::collections::BTreeMap;

use uffdpager::metrics::{labels, Exposition};

use crate::plan::Hold;
use crate::state::{ConnState, Shared};

/// The `state` label of a supervisor's connection.
fn conn_label(c: ConnState) -> &'static str {
    match c {
        ConnState::NotWatched => "not_watched",
        ConnState::Connecting => "connecting",
        ConnState::Syncing => "syncing",
        ConnState::Watching => "watching",
        ConnState::Backoff => "backoff",
    }
}

/// The `reason` label of a hold.
fn hold_label(h: &Hold) -> &'static str {
    match h {
        Hold::InFlight => "in_flight",
        Hold::CompletingElsewhere => "completing_elsewhere",
        Hold::NoConnectedAt => "no_connected_at",
        Hold::Soaking { .. } => "soaking",
        Hold::Backoff { .. } => "failure_backoff",
        Hold::UnderCeiling { .. } => "under_ceiling",
        Hold::LowMemory { .. } => "low_memory",
        Hold::Orphaned => "orphaned",
    }
}

const CONN_STATES: [ConnState; 5] = [
    ConnState::NotWatched,
    ConnState::Connecting,
    ConnState::Syncing,
    ConnState::Watching,
    ConnState::Backoff,
];

/// One scrape's exposition.
pub fn render(shared: &Shared) -> String {
    let now = shared.now();
    let st = shared.lock();
    let plan = if shared.config.enabled { Some(st.plan(&shared.config, now)) } else { None };
    let c = &st.counters;
    let mut out = Exposition::default();
    out.gauge(
        "uffd_controller_enabled",
        "1 if the controller graduates sessions (enabled), 0 if it is a no-op.",
        Vec::new(),
        i64::from(shared.config.enabled),
    );
    out.counter(
        "uffd_controller_graduations_started",
        "CompleteSession calls started (dry run: graduations recorded).",
        Vec::new(),
        c.started,
    );
    const OK: &str =
        "Graduation attempts that succeeded, by result (graduated, already_graduated, dry_run).";
    for (result, n) in [
        ("graduated", c.graduated),
        ("already_graduated", c.already_graduated),
        ("dry_run", c.dry_run),
    ] {
        out.counter("uffd_controller_graduations_succeeded", OK, labels([("result", result)]), n);
    }
    const FAILED: &str = "Graduation attempts that failed (the session keeps serving), by reason (timed_out, failed, not_graduatable).";
    for (reason, n) in
        [("timed_out", c.timed_out), ("failed", c.failed), ("not_graduatable", c.not_graduatable)]
    {
        out.counter("uffd_controller_graduations_failed", FAILED, labels([("reason", reason)]), n);
    }
    out.gauge(
        "uffd_controller_graduations_in_flight",
        "CompleteSession calls in flight now.",
        Vec::new(),
        i64::try_from(st.in_flight.len()).unwrap_or(i64::MAX),
    );
    out.counter("uffd_controller_scans", "Plans computed by the loop.", Vec::new(), c.scans);
    out.counter(
        "uffd_controller_watch_events",
        "WatchSessions events received, over every supervisor.",
        Vec::new(),
        c.watch_events,
    );
    for s in &st.supervisors {
        let sup = s.endpoint.as_str();
        out.gauge(
            "uffd_controller_tracked_sessions",
            "Sessions in the controller's view of each supervisor (its last complete inventory).",
            labels([("supervisor", sup)]),
            i64::try_from(s.inventory.sessions.len()).unwrap_or(i64::MAX),
        );
        for conn in CONN_STATES {
            out.gauge(
                "uffd_controller_supervisor_state",
                "1 for each supervisor's connection state (watching: in sync, used by the plan).",
                labels([("supervisor", sup), ("state", conn_label(conn))]),
                i64::from(s.conn == conn),
            );
        }
        out.counter(
            "uffd_controller_supervisor_reconnects",
            "Attempts to watch a supervisor again after the first.",
            labels([("supervisor", sup)]),
            s.reconnects,
        );
        if let Some(bytes) = s.inventory.available_memory {
            out.gauge(
                "uffd_controller_supervisor_available_memory_bytes",
                "The host's available memory as each supervisor last reported it (read with min_available_memory set).",
                labels([("supervisor", sup)]),
                i64::try_from(bytes).unwrap_or(i64::MAX),
            );
        }
    }
    if let Some(plan) = plan {
        out.gauge(
            "uffd_controller_plan_backlog",
            "Sessions the plan would graduate now (in flight not counted).",
            Vec::new(),
            i64::try_from(plan.graduate.len()).unwrap_or(i64::MAX),
        );
        let mut held: BTreeMap<&str, i64> = BTreeMap::new();
        for h in &plan.held {
            *held.entry(hold_label(&h.hold)).or_insert(0) += 1;
        }
        for (reason, n) in held {
            out.gauge(
                "uffd_controller_plan_held",
                "Live sessions the plan holds back, by reason.",
                labels([("reason", reason)]),
                n,
            );
        }
    }
    drop(st);
    out.encode()
}
