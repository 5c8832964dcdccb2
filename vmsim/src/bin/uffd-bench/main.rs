//! `uffd-bench`: every baseline and every project figure in ONE run, on the same memory files,
//! and the ratios between them.
//!
//! ```text
//! cargo run --release --bin uffd-bench                 # full run (1 GiB, 1,000 sessions)
//! cargo run --release --bin uffd-bench -- --quick      # under a minute (256 MiB, 100 sessions)
//! cargo run --release --bin uffd-bench -- --json       # the table on stderr, one JSON line on stdout
//! cargo run --release --bin uffd-bench -- --only fault,min_handler --reps 5
//! ```
//!
//! Baselines measured by the benchmark itself: `memcpy_gbps`, `raw_copy_gbps` (in-process
//! `UFFDIO_COPY`), `min_fault_us` and `min_touch_all_gbps` (a one-page-per-fault handler in a
//! child process: this binary with `--min-handler`). The project: the real `uffd-supervisor`
//! and `uffd-pager` serving `vmsim` VMs. Run as root (userfaultfd).
//!
//! Under `cargo run`, the supervisor and pager binaries are rebuilt first (with the same
//! profile), so a pager just edited is the one measured; `--no-build` skips that.

mod bench;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Parser;
use serde_json::json;

use bench::sessions::SessionsPlan;
use bench::supervisor::Binaries;
use bench::{Group, Plan};

#[derive(Debug, Parser)]
#[command(name = "uffd-bench", about = "Baselines and the project's figures, in one run")]
struct Cli {
    /// Smaller sizes (256 MiB, 100 sessions): the whole run in under a minute.
    #[arg(long)]
    quick: bool,
    /// Print one JSON line with every figure, ratio and flag on stdout (the table goes to stderr).
    #[arg(long)]
    json: bool,
    /// Run only these parts (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Group>,
    /// Repetitions per figure (each figure is their median) [default: 3].
    #[arg(long)]
    reps: Option<usize>,
    /// Whole runs, one after the other: the table gives the median over runs of each run's
    /// figure, and the median of each run's ratio to its own baseline.
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Print the table as Markdown, with each run's value (for BENCHMARKS.md).
    #[arg(long)]
    markdown: bool,
    /// Size of the big memory files and VMs, MiB [default: 1024; --quick 256].
    #[arg(long)]
    size_mib: Option<u64>,
    /// VMs of the sessions scenario [default: 1000; --quick 100].
    #[arg(long)]
    sessions: Option<usize>,
    /// Size of each VM of the sessions scenario, MiB.
    #[arg(long, default_value_t = 16)]
    session_mib: u64,
    /// Random pages touched per fault-latency repetition [default: 20000; --quick 4000].
    #[arg(long)]
    fault_touches: Option<u64>,
    /// CompleteSession calls in flight at once in the sessions scenario.
    #[arg(long, default_value_t = 4)]
    complete_concurrency: usize,
    /// Directory for the run's temporary files (memory files must be on a disk, not tmpfs).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Keep the memory files in this directory and reuse them in later runs (saves writing and
    /// removing gigabytes on every run).
    #[arg(long)]
    files_dir: Option<PathBuf>,
    /// The pager binary [default: uffd-pager beside this executable].
    #[arg(long)]
    pager_binary: Option<PathBuf>,
    /// The supervisor binary [default: uffd-supervisor beside this executable].
    #[arg(long)]
    supervisor_binary: Option<PathBuf>,
    /// Do not rebuild the supervisor and pager under `cargo run`.
    #[arg(long)]
    no_build: bool,
    /// Show the supervisor's and pagers' logs.
    #[arg(long)]
    logs: bool,
    /// Exit with status 2 when a target is missed.
    #[arg(long)]
    check: bool,
    /// The directory of Firecracker's example handlers (`uffd_on_demand_handler`,
    /// `uffd_fault_all_handler`) for the `peers` figures [default: $UFFD_BENCH_PEERS; without
    /// either, the peer contenders are skipped and the report says so].
    #[arg(long)]
    peers_dir: Option<PathBuf>,
    /// CPU-burning processes running beside the whole measurement (a busy host).
    #[arg(long, default_value_t = 0)]
    hogs: usize,
    /// VMs at once in the peers' many-VMs figure (64 MiB each) [default: 50; --quick 10].
    #[arg(long)]
    many_vms: Option<usize>,
    /// Random touches of each VM in the many-VMs figure [default: 4000; --quick 1000].
    #[arg(long)]
    many_touches: Option<u64>,
    /// Peer workloads to run: random, touch_all, many [default: all].
    #[arg(long, value_delimiter = ',')]
    peer_workloads: Vec<String>,
    /// Peer contenders to run: project, on_demand, fault_all, file [default: all there are].
    #[arg(long, value_delimiter = ',')]
    contenders: Vec<String>,
    /// The uffd-vmsim binary (the peers' VMs) [default: uffd-vmsim beside this executable].
    #[arg(long)]
    vmsim_binary: Option<PathBuf>,

    /// (internal) Burn CPU until killed (a `--hogs` child).
    #[arg(long, hide = true)]
    hog: bool,

    /// (internal) Run as the minimal handler, listening on this socket.
    #[arg(long, hide = true, requires = "memory_file")]
    min_handler: Option<PathBuf>,
    /// (internal) The minimal handler's memory file.
    #[arg(long, hide = true)]
    memory_file: Option<PathBuf>,
    /// (internal) Pin the minimal handler to this CPU.
    #[arg(long, hide = true)]
    cpu: Option<usize>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.hog {
        bench::hogs::burn();
    }
    if let (Some(socket), Some(file)) = (&cli.min_handler, &cli.memory_file) {
        return match bench::min_handler::serve(socket, file, cli.cpu) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("uffd-bench --min-handler: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    match run(&cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("uffd-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Rebuilds the project's binaries when running under `cargo run`, with this build's profile.
fn rebuild(cli: &Cli) -> anyhow::Result<()> {
    if cli.no_build {
        return Ok(());
    }
    let mut bins = Vec::new();
    if cli.supervisor_binary.is_none() {
        bins.push("uffd-supervisor");
    }
    if cli.pager_binary.is_none() {
        bins.push("uffd-pager");
    }
    if cli.vmsim_binary.is_none() {
        bins.push("uffd-vmsim");
    }
    if !bins.is_empty() && std::env::var_os("CARGO").is_some() {
        eprintln!("uffd-bench: building {}", bins.join(" and "));
    }
    testkit::build_sibling_binaries(&bins).map_err(anyhow::Error::msg)?;
    Ok(())
}

/// Which source the measured binaries came from, as far as git says: HEAD, and whether the
/// pager's sources differ from it (an optimisation in progress).
fn source_version() -> serde_json::Value {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
            .args(args)
            .stderr(std::process::Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    json!({
        "head": git(&["rev-parse", "--short", "HEAD"]),
        "pager_changed_since_head": git(&["status", "--porcelain", "--", "pager"]).map(|s| !s.is_empty()),
    })
}

fn run(cli: &Cli) -> anyhow::Result<ExitCode> {
    rebuild(cli)?;
    let bins = Binaries {
        supervisor: cli
            .supervisor_binary
            .clone()
            .unwrap_or_else(|| testkit::bin_path("uffd-supervisor")),
        pager: cli.pager_binary.clone().unwrap_or_else(|| testkit::bin_path("uffd-pager")),
        show_logs: cli.logs,
    };
    let vmsim = cli.vmsim_binary.clone().unwrap_or_else(|| testkit::bin_path("uffd-vmsim"));
    for b in [&bins.supervisor, &bins.pager, &vmsim] {
        if !b.is_file() {
            bail!("{} does not exist: build it first (cargo build --release)", b.display());
        }
    }
    let quick = cli.quick;
    let session_size = cli.session_mib << 20;
    let fault_touches = cli.fault_touches.unwrap_or(if quick { 4000 } else { 20000 });
    let env = std::env::var_os(bench::peers::PEERS_ENV);
    let peers = bench::peers::PeersPlan {
        source: bench::peers::PeerSource::resolve(cli.peers_dir.as_deref(), env.as_deref()),
        vmsim,
        touches: fault_touches,
        many_vms: cli.many_vms.unwrap_or(if quick { 10 } else { 50 }).max(1),
        many_touches: cli.many_touches.unwrap_or(if quick { 1000 } else { 4000 }),
        workloads: cli.peer_workloads.clone(),
        contenders: cli.contenders.clone(),
    };
    for w in &peers.workloads {
        if !["random", "touch_all", "many"].contains(&w.as_str()) {
            bail!("--peer-workloads: {w:?} is none of random, touch_all, many");
        }
    }
    for c in &peers.contenders {
        if bench::peers::Contender::ALL.iter().all(|k| k.name() != c) {
            bail!("--contenders: {c:?} is none of project, on_demand, fault_all, file");
        }
    }
    let plan = Plan {
        groups: if cli.only.is_empty() { Group::ALL.to_vec() } else { cli.only.clone() },
        reps: cli.reps.unwrap_or(3).max(1),
        runs: cli.runs.max(1),
        size: cli.size_mib.unwrap_or(if quick { 256 } else { 1024 }) << 20,
        fault_touches,
        sessions: SessionsPlan {
            count: cli.sessions.unwrap_or(if quick { 100 } else { 1000 }),
            size: session_size,
            touches: 16,
            watch_reps: if quick { 3 } else { 5 },
            complete_concurrency: cli.complete_concurrency,
        },
        rpc_sessions: if quick { 5 } else { 10 },
        dir: cli.dir.clone().unwrap_or_else(std::env::temp_dir),
        files_dir: cli.files_dir.clone(),
        bins,
        peers,
        hogs: cli.hogs,
    };
    if plan.size == 0 || session_size == 0 {
        bail!("sizes must be at least 1 MiB");
    }
    let flags = json!({
        "quick": quick,
        "reps": plan.reps,
        "runs": plan.runs,
        "size_mib": plan.size >> 20,
        "sessions": plan.sessions.count,
        "session_mib": cli.session_mib,
        "fault_touches": plan.fault_touches,
        "complete_concurrency": plan.sessions.complete_concurrency,
        "only": plan.groups.iter().map(|g| g.name()).collect::<Vec<_>>(),
        "pager_binary": plan.bins.pager.display().to_string(),
        "supervisor_binary": plan.bins.supervisor.display().to_string(),
        "dir": plan.dir.display().to_string(),
        "source": source_version(),
        "hogs": plan.hogs,
        "peers_dir": match &plan.peers.source {
            bench::peers::PeerSource::Found { on_demand, .. } =>
                on_demand.parent().map(|d| d.display().to_string()),
            bench::peers::PeerSource::Skipped(_) => None,
        },
        "many_vms": plan.peers.many_vms,
        "many_touches": plan.peers.many_touches,
        "peer_workloads": plan.peers.workloads,
        "contenders": plan.peers.contenders,
    });

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let started = std::time::Instant::now();
    let (outcome, leftovers) = runtime.block_on(bench::run(&plan))?;
    let rows = bench::report::evaluate(&outcome.runs);
    let mut table = if cli.markdown {
        bench::report::markdown(&rows, plan.reps, plan.runs)
    } else {
        bench::report::table(&rows, plan.reps, plan.runs)
    };
    let skipped = match &plan.peers.source {
        bench::peers::PeerSource::Skipped(why) if plan.groups.contains(&Group::Peers) => {
            Some(why.as_str())
        }
        _ => None,
    };
    let machine_state = if plan.hogs == 0 {
        "quiet: no hogs".to_string()
    } else {
        format!("beside {} CPU hogs", plan.hogs)
    };
    let note = match skipped {
        Some(why) => format!("{machine_state}; {why}"),
        None => machine_state,
    };
    if let Some(t) = bench::peers::report::table(&outcome.runs, cli.markdown, Some(&note)) {
        table.push('\n');
        table.push_str(&t);
    } else if let Some(why) = skipped {
        table.push_str(&format!("\n{why}\n"));
    }
    let mut flags = flags;
    flags["wall_s"] = json!((started.elapsed().as_secs_f64() * 10.0).round() / 10.0);
    if cli.json {
        eprint!("{table}");
        let line = bench::report::json_line(
            &outcome.runs,
            &rows,
            flags,
            bench::machine(),
            &outcome.errors,
        );
        let mut line: serde_json::Value =
            serde_json::from_str(&line).context("re-reading the JSON line")?;
        line["peers"] = bench::peers::report::json(&outcome.runs, skipped);
        println!("{line}");
    } else {
        print!("{table}");
        for e in &outcome.errors {
            println!("error: {e}");
        }
    }
    if plan.files_dir.is_none() {
        eprintln!("uffd-bench: removing the memory files");
    }
    leftovers.remove();
    if !outcome.errors.is_empty() {
        return Ok(ExitCode::FAILURE);
    }
    if cli.check && rows.iter().any(|e| e.pass == Some(false)) {
        return Ok(ExitCode::from(2));
    }
    Ok(ExitCode::SUCCESS)
}
