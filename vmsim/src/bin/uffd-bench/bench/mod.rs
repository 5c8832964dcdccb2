//! `uffd-bench`'s modules: each baseline and each project figure, measured in one run on the
//! same memory files, then compared (see `report`).
//!
//! - [`baseline`]: memcpy and raw `UFFDIO_COPY` in this process.
//! - [`min_handler`]: the one-page-per-fault handler in a child process, and its VM.
//! - [`project`]: single-VM figures through the real supervisor and pager.
//! - [`sessions`]: many VMs through one pager: threads, memory, wall times, WatchSessions.
//! - [`peers`]: Firecracker's example handlers and the kernel's file mapping beside the project.
//! - [`hogs`]: CPU hogs beside the measurement (`--hogs N`).
//! - [`report`]: rows, targets, the table and the JSON line.
//! - `rounds`: one round of each group of figures, in the order `run` interleaves them.

#[allow(unsafe_code)]
pub mod baseline;
pub mod hogs;
#[allow(unsafe_code)]
pub mod memfiles;
#[allow(unsafe_code)]
pub mod min_handler;
pub mod peers;
#[allow(unsafe_code)]
pub mod placement;
pub mod procstat;
pub mod project;
pub mod report;
mod rounds;
pub mod sessions;
pub mod stats;
pub mod supervisor;
#[allow(unsafe_code)]
pub mod working_set;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use serde_json::{json, Value};

use self::memfiles::MemoryFiles;
use self::sessions::SessionsPlan;
use self::supervisor::Binaries;

/// Every figure measured, by name: the value of each repetition.
#[derive(Debug, Default, Clone)]
pub struct Figures {
    samples: BTreeMap<String, Vec<f64>>,
}

impl Figures {
    pub fn add(&mut self, name: &str, value: f64) {
        self.samples.entry(name.to_string()).or_default().push(value);
    }

    /// The median of the figure's repetitions.
    pub fn median(&self, name: &str) -> Option<f64> {
        stats::median(self.samples.get(name)?)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &[f64])> {
        self.samples.iter().map(|(k, v)| (k.as_str(), v.as_slice()))
    }
}

/// A part of the benchmark that `--only` can pick.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Group {
    /// memcpy_gbps
    Memcpy,
    /// raw_copy_gbps
    #[value(name = "raw_copy")]
    RawCopy,
    /// min_fault_us (+ p99, pinned variants), min_touch_all_gbps, touch_resident_gbps
    #[value(name = "min_handler")]
    MinHandler,
    /// fault_p50_us, fault_p99_us (VM and pager on min_fault_us's CPU), fault_free_* (unpinned)
    Fault,
    /// touch_all_gbps
    #[value(name = "touch_all")]
    TouchAll,
    /// complete_dense_gbps
    #[value(name = "complete_dense")]
    CompleteDense,
    /// complete_sparse_gbps (25% zero + 25% holes, in runs of 1-63 pages)
    #[value(name = "complete_sparse")]
    CompleteSparse,
    /// complete_scattered_gbps (25% zero + 25% holes, page by page)
    #[value(name = "complete_scattered")]
    CompleteScattered,
    /// stall_max_ms, stall_p99_ms
    Stall,
    /// rpc_complete_p50_ms
    Rpc,
    /// sessions_*, pager_threads_*, pager_*_per_session_kib, watch_snapshot_ms
    Sessions,
    /// peer_*: the project beside Firecracker's handlers and the file mapping, same VMs
    Peers,
    /// ws_*: a recorded random 25% working set replayed after restore, with and without
    /// prefetch, against the file-backed mapping; a differing workload; a cold file
    #[value(name = "working_set")]
    WorkingSet,
}

impl Group {
    /// The name `--only` takes.
    pub fn name(self) -> String {
        use clap::ValueEnum;
        self.to_possible_value().map(|v| v.get_name().to_string()).unwrap_or_default()
    }

    pub const ALL: [Group; 13] = [
        Group::Memcpy,
        Group::RawCopy,
        Group::MinHandler,
        Group::Fault,
        Group::TouchAll,
        Group::CompleteDense,
        Group::CompleteSparse,
        Group::CompleteScattered,
        Group::Stall,
        Group::Rpc,
        Group::Sessions,
        Group::Peers,
        Group::WorkingSet,
    ];
}

/// Everything one run does.
#[derive(Debug, Clone)]
pub struct Plan {
    pub groups: Vec<Group>,
    pub reps: usize,
    /// Whole runs, one after the other (the report gives the median over runs).
    pub runs: usize,
    /// Size of the big memory files and VMs.
    pub size: u64,
    /// Random pages touched per fault-latency repetition.
    pub fault_touches: u64,
    pub sessions: SessionsPlan,
    /// Small sessions completed per `rpc` repetition.
    pub rpc_sessions: usize,
    /// Where the temporary directory (memory files, runtime directories) goes.
    pub dir: PathBuf,
    /// Where memory files are kept between runs (`None`: in the temporary directory, removed).
    pub files_dir: Option<PathBuf>,
    pub bins: Binaries,
    pub peers: peers::PeersPlan,
    /// CPU hogs running beside the whole run.
    pub hogs: usize,
}

impl Plan {
    fn has(&self, g: Group) -> bool {
        self.groups.contains(&g)
    }
}

/// What the runs produced: each run's figures, and the errors of the parts that failed.
#[derive(Debug, Default)]
pub struct Outcome {
    pub runs: Vec<Figures>,
    pub errors: Vec<String>,
}

/// The run's files, removed on drop: drop it once the results are out (removing gigabytes can
/// be slow).
#[derive(Debug)]
pub struct Leftovers {
    files: MemoryFiles,
    work: tempfile::TempDir,
}

impl Leftovers {
    /// Removes the files (now rather than whenever the value is dropped).
    pub fn remove(self) {
        let Leftovers { files, work } = self;
        drop(files);
        drop(work);
    }
}

fn note(msg: &str) {
    eprintln!("uffd-bench: {msg}");
}

/// Runs the plan: files first, then the baselines, then the project, then many sessions.
pub async fn run(plan: &Plan) -> anyhow::Result<(Outcome, Leftovers)> {
    memfiles::check_userfaultfd()?;
    let work = tempfile::Builder::new()
        .prefix("uffd-bench-")
        .tempdir_in(&plan.dir)
        .with_context(|| format!("creating a temporary directory in {}", plan.dir.display()))?;
    let dir = work.path().to_path_buf();
    if memfiles::is_tmpfs(&dir) {
        note("warning: the memory files are on tmpfs, not on a disk's page cache");
    }
    let mut out = Outcome::default();
    let started = Instant::now();
    let files = {
        let (groups, size, small) = (plan.groups.clone(), plan.size, plan.sessions.size);
        let (files_dir, keep) = match &plan.files_dir {
            Some(d) => (d.clone(), true),
            None => (dir.clone(), false),
        };
        std::fs::create_dir_all(&files_dir)
            .with_context(|| format!("creating {}", files_dir.display()))?;
        tokio::task::spawn_blocking(move || {
            MemoryFiles::create(&files_dir, &groups, size, small, keep)
        })
        .await
        .context("memory file task")??
    };
    note(&format!("memory files written and warm in {:.1}s", started.elapsed().as_secs_f64()));
    let hogs = hogs::Hogs::start(plan.hogs)?;
    if hogs.count() > 0 {
        note(&format!("{} CPU hogs running beside the measurement", hogs.count()));
    }
    if plan.has(Group::Peers) {
        if let peers::PeerSource::Skipped(why) = &plan.peers.source {
            note(why);
        }
    }

    for run in 0..plan.runs {
        if plan.runs > 1 {
            note(&format!("run {} of {}", run + 1, plan.runs));
        }
        let mut figures = Figures::default();
        let errors = &mut out.errors;
        rounds::baselines(plan, &files, &dir, &mut figures, errors).await;
        rounds::project(plan, &files, &dir, &mut figures, errors).await;
        if plan.has(Group::WorkingSet) {
            let r = rounds::working_set_figures(plan, &dir, run, &mut figures).await;
            record(errors, "working_set", r);
        }
        if plan.has(Group::Sessions) {
            if let Some(small) = &files.small {
                let (count, mib) = (plan.sessions.count, plan.sessions.size >> 20);
                note(&format!("sessions: {count} VMs of {mib} MiB"));
                let runtime_dir = dir.join(format!("run-sessions-{run}"));
                let r =
                    sessions::run(&plan.bins, &runtime_dir, small, &plan.sessions, &mut figures)
                        .await;
                record(errors, "sessions", r);
            }
        }
        if plan.has(Group::Peers) {
            let r = rounds::peer_figures(plan, &files, &dir, run, &mut figures).await;
            record(errors, "peers", r);
        }
        out.runs.push(figures);
    }
    drop(hogs);
    Ok((out, Leftovers { files, work }))
}

fn record(errors: &mut Vec<String>, what: &str, result: anyhow::Result<()>) {
    if let Err(e) = result {
        note(&format!("{what} failed: {e:#}"));
        errors.push(format!("{what}: {e:#}"));
    }
}

/// A suffix that tells this process's runtime directories apart.
fn unique_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// The figures a group just measured, for progress lines.
fn latest(f: &Figures, g: Group) -> String {
    let names: &[&str] = match g {
        Group::Fault => &["fault_p50_us", "fault_p99_us", "fault_free_p50_us", "fault_free_p99_us"],
        Group::TouchAll => &["touch_all_gbps"],
        Group::CompleteDense => &["complete_dense_gbps"],
        Group::CompleteSparse => &["complete_sparse_gbps"],
        Group::CompleteScattered => &["complete_scattered_gbps"],
        Group::Stall => &["stall_max_ms", "stall_p99_ms", "complete_with_reader_gbps"],
        Group::Rpc => &["rpc_complete_p50_ms"],
        Group::WorkingSet => &[
            "ws_on_demand_ms",
            "ws_prefetch_ms",
            "ws_prefetch_fresh_ms",
            "ws_file_ms",
            "ws_file_bare_ms",
            "ws_differs_ms",
            "ws_on_demand_faults",
            "ws_prefetch_faults",
            "ws_cold_on_demand_ms",
            "ws_cold_prefetch_ms",
            "ws_prefetch_done_ms",
            "ws_after_prefetch_ms",
            "ws_cold_cached_fraction",
        ],
        _ => &[],
    };
    names
        .iter()
        .filter_map(|n| {
            let v = f.iter().find(|(k, _)| k == n)?.1.last()?;
            Some(format!("{n} {v:.2}"))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The machine, for the JSON line and BENCHMARKS.md.
pub fn machine() -> Value {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name").map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    let mem_kib: u64 = read("/proc/meminfo")
        .lines()
        .find_map(|l| {
            l.strip_prefix("MemTotal:").and_then(|m| m.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0);
    json!({
        "nproc": placement::cpus(),
        "kernel": read("/proc/sys/kernel/osrelease").trim(),
        "cpu": cpu,
        "mem_gib": (mem_kib as f64 / (1024.0 * 1024.0) * 10.0).round() / 10.0,
    })
}
