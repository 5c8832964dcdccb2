//! The supervisor's `/metrics` (`--metrics-listen`): its own counters, its inventory and version
//! table as gauges, the host's available memory, and every running pager's figures, asked over
//! the pager's gRPC socket at scrape time (`GetMetrics`) and labelled with its `version`.
//! The README's "Metrics" section lists every family.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tracing::debug;
use uffdpager::api;
use uffdpager::metrics::{labels, Exposition, HistogramValue, LabeledCounter};

use crate::inventory::Inventory;
use crate::session_record::state_of;
use crate::versions::Versions;

/// How long one pager gets to answer GetMetrics during a scrape.
const PAGER_SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);

/// Counters the supervisor keeps between scrapes, one field per family.
#[derive(Debug, Default)]
pub struct SupervisorMetrics {
    /// CreateSession calls that created a session.
    pub sessions_created: AtomicU64,
    /// VMM handshakes refused, by `reason`.
    pub handshake_refusals: LabeledCounter,
    /// Sessions re-adopted after their pager died, by the adopting `version`.
    pub readoptions: LabeledCounter,
    /// Pager processes respawned after an unexpected exit, by `version`.
    pub pager_restarts: LabeledCounter,
    /// Pager processes that exited, by `version` and `cause` (see [`exit_cause`]).
    pub pager_exits: LabeledCounter,
}

impl SupervisorMetrics {
    pub fn session_created(&self) {
        self.sessions_created.fetch_add(1, Ordering::Relaxed);
    }
}

/// The `cause` label of a pager exit: `stopped` when the supervisor asked for it, otherwise
/// from the exit status: `signal` (killed, crashed), `exit` (exited by itself), `unknown`.
pub fn exit_cause(asked: bool, status: &str) -> &'static str {
    if asked {
        "stopped"
    } else if status.starts_with("signal") {
        "signal"
    } else if status.starts_with("exit status") {
        "exit"
    } else {
        "unknown"
    }
}

/// A label value from a gRPC enum name: `SESSION_STATE_SERVING` → `serving`.
fn state_label(name: &str) -> String {
    name.to_ascii_lowercase()
}

/// One scrape's exposition, from the inventory, the version table and the counters (the
/// supervisor's shared state hands them in; this module does not know it).
pub async fn render(
    inventory: &Inventory,
    versions: &Versions,
    counters: &SupervisorMetrics,
) -> String {
    let mut out = Exposition::default();
    write_inventory(inventory, versions, &mut out);
    write_counters(counters, &mut out);
    if let Some(bytes) = host_available_memory() {
        out.gauge(
            "uffd_host_available_memory_bytes",
            "MemAvailable of the host (/proc/meminfo), as the controller's min_available_memory reads it.",
            Vec::new(),
            i64::try_from(bytes).unwrap_or(i64::MAX),
        );
    }
    let pagers: Vec<(String, Arc<crate::pagers::PagerProcess>)> = versions.read(|t| {
        t.entries
            .values()
            .filter_map(|e| e.process.clone().map(|p| (e.version.clone(), p)))
            .filter(|(_, p)| p.exit().is_none())
            .collect()
    });
    let asks = pagers.into_iter().map(|(version, process)| async move {
        let mut client = process.client();
        let answer = tokio::time::timeout(
            PAGER_SCRAPE_TIMEOUT,
            client.get_metrics(api::GetMetricsRequest {}),
        )
        .await;
        let figures = match answer {
            Ok(Ok(r)) => Some(r.into_inner()),
            Ok(Err(e)) => {
                debug!(version = %version, error = %e, "a pager did not answer GetMetrics");
                None
            }
            Err(_) => {
                debug!(version = %version, "a pager did not answer GetMetrics in time");
                None
            }
        };
        (version, figures)
    });
    out.declare_counter("uffd_pager_faults", "Faults pagers served.");
    for (version, figures) in futures_join_all(asks).await {
        out.gauge(
            "uffd_pager_up",
            "1 if the pager version's process answered GetMetrics during this scrape.",
            labels([("version", &version)]),
            i64::from(figures.is_some()),
        );
        if let Some(m) = figures {
            write_pager(&mut out, &version, &m);
        }
    }
    out.encode()
}

/// Runs the futures concurrently (a slow pager does not delay the others' answers).
async fn futures_join_all<F>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        if let Ok(v) = h.await {
            out.push(v);
        }
    }
    out
}

fn write_inventory(inventory: &Inventory, versions: &Versions, out: &mut Exposition) {
    let (sessions, active) = inventory.list();
    let mut by: std::collections::BTreeMap<(String, String), i64> = Default::default();
    for s in &sessions {
        let state = state_label(state_of(s).as_str_name().trim_start_matches("SESSION_STATE_"));
        *by.entry((state, s.pager_version.clone())).or_insert(0) += 1;
    }
    const SESSIONS: &str =
        "Sessions listed, by state and pager version (finished ones until their retention ends).";
    for ((state, version), n) in by {
        out.gauge("uffd_sessions", SESSIONS, labels([("state", &state), ("version", &version)]), n);
    }
    let versions: Vec<(String, String)> = versions.read(|t| {
        t.entries
            .values()
            .map(|e| {
                (
                    e.version.clone(),
                    state_label(
                        e.lifecycle.state().as_str_name().trim_start_matches("VERSION_STATE_"),
                    ),
                )
            })
            .collect()
    });
    let mut by_state: std::collections::BTreeMap<String, i64> = Default::default();
    for (_, state) in &versions {
        *by_state.entry(state.clone()).or_insert(0) += 1;
    }
    for (state, n) in by_state {
        out.gauge("uffd_versions", "Pager versions, by state.", labels([("state", &state)]), n);
    }
    for (version, state) in &versions {
        out.gauge(
            "uffd_version_info",
            "1 for each pager version, with its state; active: the version new sessions go to.",
            labels([
                ("version", version),
                ("state", state),
                ("active", if *version == active { "true" } else { "false" }),
            ]),
            1,
        );
    }
}

fn write_counters(m: &SupervisorMetrics, out: &mut Exposition) {
    out.counter(
        "uffd_sessions_created",
        "Sessions created (CreateSession).",
        Vec::new(),
        m.sessions_created.load(Ordering::Relaxed),
    );
    m.handshake_refusals.write(
        out,
        "uffd_handshake_refusals",
        "VMM handshakes refused (the session FAILED), by reason.",
        &["reason"],
    );
    m.readoptions.write(
        out,
        "uffd_readoptions",
        "Sessions re-adopted after their pager died, by the adopting version.",
        &["version"],
    );
    m.pager_restarts.write(
        out,
        "uffd_pager_restarts",
        "Pager processes respawned after an unexpected exit, by version.",
        &["version"],
    );
    m.pager_exits.write(
        out,
        "uffd_pager_exits",
        "Pager processes that exited, by version and cause (stopped, signal, exit, unknown).",
        &["version", "cause"],
    );
}

fn histogram(h: Option<&api::Histogram>) -> HistogramValue {
    let Some(h) = h else { return HistogramValue::default() };
    HistogramValue {
        buckets: h.upper_bounds.iter().copied().zip(h.cumulative_counts.iter().copied()).collect(),
        sum: h.sum,
        count: h.count,
    }
}

fn write_pager(out: &mut Exposition, version: &str, m: &api::PagerMetrics) {
    let v = || labels([("version", version)]);
    out.counter("uffd_pager_faults", "Faults pagers served.", v(), m.faults);
    out.histogram(
        "uffd_pager_fault_latency_seconds",
        "From reading a fault off the uffd to the copy (or wake) that resolved it.",
        v(),
        histogram(m.fault_latency_seconds.as_ref()),
    );
    const COPIED: &str =
        "Bytes pagers made present in guest memory, by cause (fault, read_ahead, completion).";
    for (cause, bytes) in [
        ("fault", m.fault_bytes),
        ("read_ahead", m.read_ahead_bytes),
        ("completion", m.completion_bytes),
    ] {
        out.counter(
            "uffd_pager_copied_bytes",
            COPIED,
            labels([("version", version), ("cause", cause)]),
            bytes,
        );
    }
    out.counter(
        "uffd_pager_zero_skipped_bytes",
        "Bytes graduation left to the kernel because the snapshot holds zeros there.",
        v(),
        m.zero_skipped_bytes,
    );
    out.counter(
        "uffd_pager_remove_events",
        "UFFD_EVENT_REMOVE/UNMAP events read (balloon discards).",
        v(),
        m.remove_events,
    );
    out.counter(
        "uffd_pager_removed_bytes",
        "Bytes those REMOVE/UNMAP events discarded.",
        v(),
        m.remove_bytes,
    );
    out.counter(
        "uffd_pager_memory_file_read_bytes",
        "Bytes the pager read from storage (/proc/PID/io read_bytes: memory-file reads that missed the page cache).",
        v(),
        m.memory_file_read_bytes,
    );
    let mut outcomes: Vec<_> = m.completions.iter().collect();
    outcomes.sort();
    for (outcome, n) in outcomes {
        out.counter(
            "uffd_pager_completions",
            "Completions (CompleteSession) that ended, by outcome.",
            labels([("version", version), ("outcome", outcome)]),
            *n,
        );
    }
    out.histogram(
        "uffd_pager_completion_duration_seconds",
        "Duration of completions that graduated their session.",
        v(),
        histogram(m.completion_duration_seconds.as_ref()),
    );
    out.counter(
        "uffd_pager_graduated_bytes",
        "Guest memory (total_bytes) of the sessions graduated.",
        v(),
        m.graduated_bytes,
    );
    for (state, files) in
        [("in_use", m.memory_files_in_use), ("lingering", m.memory_files_lingering)]
    {
        out.gauge(
            "uffd_pager_memory_files",
            "Memory files the pager has mapped, by state (in_use: some session is restored from it; lingering: none is, kept mapped for the next restore).",
            labels([("version", version), ("state", state)]),
            i64::try_from(files).unwrap_or(i64::MAX),
        );
    }
    out.gauge(
        "uffd_pager_memory_file_lingering_bytes",
        "Length of the lingering memory files' mappings (their page cache pages stay reclaimable).",
        v(),
        i64::try_from(m.memory_file_lingering_bytes).unwrap_or(i64::MAX),
    );
    out.counter(
        "uffd_pager_memory_file_reuses",
        "Sessions served from the mapping of a lingering memory file (no new mapping, no new zero scan).",
        v(),
        m.memory_file_reuses,
    );
}

/// The host's available memory: `MemAvailable` of `/proc/meminfo`.
pub fn host_available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    uffdpager::metrics::parse_mem_available(&text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_causes_come_from_who_asked_and_the_status() {
        assert_eq!(exit_cause(true, "signal: 15 (SIGTERM)"), "stopped");
        assert_eq!(exit_cause(false, "signal: 9 (SIGKILL)"), "signal");
        assert_eq!(exit_cause(false, "exit status: 3"), "exit");
        assert_eq!(exit_cause(false, "unknown exit (its waiter stopped)"), "unknown");
    }

    #[test]
    fn pager_figures_are_written_with_their_version() {
        let mut out = Exposition::default();
        let m = api::PagerMetrics {
            faults: 7,
            fault_latency_seconds: Some(api::Histogram {
                upper_bounds: vec![0.001, 0.01],
                cumulative_counts: vec![5, 7],
                sum: 0.02,
                count: 7,
            }),
            completion_bytes: 4096,
            completions: [("graduated".to_string(), 1)].into_iter().collect(),
            memory_files_in_use: 2,
            memory_files_lingering: 1,
            memory_file_lingering_bytes: 1 << 20,
            memory_file_reuses: 3,
            ..Default::default()
        };
        write_pager(&mut out, "v1", &m);
        let text = out.encode();
        assert!(text.contains("uffd_pager_faults_total{version=\"v1\"} 7\n"), "{text}");
        assert!(
            text.contains(
                "uffd_pager_fault_latency_seconds_bucket{version=\"v1\",le=\"0.001\"} 5\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "uffd_pager_copied_bytes_total{version=\"v1\",cause=\"completion\"} 4096\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("uffd_pager_completions_total{version=\"v1\",outcome=\"graduated\"} 1\n"),
            "{text}"
        );
        for sample in [
            "uffd_pager_memory_files{version=\"v1\",state=\"in_use\"} 2\n",
            "uffd_pager_memory_files{version=\"v1\",state=\"lingering\"} 1\n",
            "uffd_pager_memory_file_lingering_bytes{version=\"v1\"} 1048576\n",
            "uffd_pager_memory_file_reuses_total{version=\"v1\"} 3\n",
        ] {
            assert!(text.contains(sample), "{sample} in {text}");
        }
    }
}
