//! uffd-pager: serves the page faults of many Firecracker sessions from their snapshot memory
//! files, and graduates them (populate, then unregister) on request. One process per pager
//! version; sessions arrive from the supervisor over an SCM_RIGHTS handoff socket.
//!
//! A crate of its own (`pager/`): it may depend on the protocol library (`uffdpager`) and on
//! nothing else of this workspace; test support (`testkit`) only as a dev-dependency. Its one
//! C file (`guarded_read.c`) is compiled by its own `build.rs`.

mod busy;
mod complete;
mod completion_result;
mod copy_threads;
mod fault_inject;
#[allow(unsafe_code)]
mod file_extents;
mod follow;
#[allow(unsafe_code)]
mod guarded_read;
#[allow(unsafe_code)]
mod handoff;
mod heartbeat;
mod joined_deadline;
mod lifecycle;
#[allow(unsafe_code)]
mod memory_file;
mod metrics;
#[allow(unsafe_code)]
mod overlay;
mod page_copy;
mod pagemap;
mod read_ahead;
mod region_pages;
mod registry;
mod remove_gate;
mod service;
mod session;
mod session_error;
mod sweep;
#[allow(unsafe_code)]
mod thread_priority;
mod watchdog;
mod worker;
mod working_set;
mod working_set_figures;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tracing::{info, warn};
use uffdpager::api::pager_server::PagerServer;
use uffdpager::logging::LogFormat;
use uffdpager::peer_auth::{checked_incoming, CallerPolicy, RequireAllowedCaller};

use crate::copy_threads::CopyThreads;
use crate::memory_file::MemoryFiles;
use crate::registry::Registry;
use crate::session::ZeroSource;
use crate::worker::WorkerHandle;
use crate::working_set::RecordSettings;

/// The version this build reports unless `--version-label` says otherwise.
pub const BUILD_VERSION: &str = env!("CARGO_PKG_VERSION");

#[derive(Debug, Parser)]
#[command(
    name = "uffd-pager",
    version,
    about = "Userfaultfd pager for Firecracker snapshot memory"
)]
struct Cli {
    /// Print the version label this process would serve as, and exit.
    #[arg(long)]
    print_version: bool,
    /// Unix socket of the `uffdpager.v1.Pager` gRPC service.
    #[arg(long, required_unless_present = "print_version")]
    grpc_socket: Option<PathBuf>,
    /// Unix SOCK_SEQPACKET socket on which the supervisor hands sessions over.
    #[arg(long, required_unless_present = "print_version")]
    handoff_socket: Option<PathBuf>,
    /// Version label to serve as (lets one build run as several versions).
    #[arg(long, default_value = BUILD_VERSION)]
    version_label: String,
    /// Threads serving faults (fixed: it does not grow with sessions). Default 2; with
    /// `--follow-vcpus`, one per CPU this process may use (the two exclude each other).
    #[arg(long)]
    fault_threads: Option<usize>,
    /// Pin one fault worker to each CPU this process may use, and serve each session by the
    /// worker on the CPU its vCPU runs on (sampled every 25 ms from /proc; a session moves
    /// once its vCPU is seen on another worker's CPU twice in a row). A fault's wake-ups then
    /// stay on one CPU (see README, "Following the vCPUs").
    #[arg(long, env = "UFFD_PAGER_FOLLOW_VCPUS")]
    follow_vcpus: bool,
    /// Bytes a completion populates between two checks for faults while faults come in (it
    /// grows to 8 MiB while none do): the longest a fault waits behind a completion.
    #[arg(long, default_value_t = 256 << 10)]
    complete_step_bytes: u64,
    /// Microseconds a fault worker keeps polling after a fault before it sleeps (0: never).
    #[arg(long, default_value_t = 50)]
    fault_spin_us: u64,
    /// KiB served around a random fault while a fault worker is contended for (faults of more
    /// than one VM in one round): the rest of the aligned block holding the faulting page is
    /// copied after the round's faults, so a vCPU that touches near its last touch does not
    /// fault again. A power of two, 4 to 2048; 4 (the default) serves the page alone. It makes
    /// memory resident that the guest did not touch (see BENCHMARKS.md for when 64 pays).
    #[arg(long, default_value_t = 4)]
    fault_around_kib: u64,
    /// Seconds a memory file stays mapped after its last session ended, its pages in the
    /// pager's page tables and its zero pages known, for the next session restored from the
    /// same snapshot (0: let go at once). At most 16 such files are kept, the longest idle go
    /// first, a deleted one at once; a file changed since (length, modification or change
    /// time) is mapped afresh.
    #[arg(long, env = "UFFD_PAGER_MEMORY_FILE_LINGER_SECS", default_value_t = 30)]
    memory_file_linger_secs: u64,
    /// Threads that help graduate quiet VMs by copying beside the fault workers (0: none).
    /// Default: one fewer than the CPUs this process may use, at most 4.
    #[arg(long)]
    copy_threads: Option<usize>,
    /// A fault worker whose loop has not turned for this long is stalled: the pager's health
    /// is NOT_SERVING while one is (the supervisor then replaces the process).
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    stall_timeout: Duration,
    /// Seconds a session asked to record its working set records first touches for (it stops
    /// earlier at graduation or at the session's end).
    #[arg(long, default_value_t = 30)]
    record_working_set_secs: u64,
    /// Most runs of pages a working-set recording holds (16 bytes each in the file).
    #[arg(long, default_value_t = 1 << 18)]
    record_working_set_max_runs: usize,
    /// Log line format on stderr (filter with RUST_LOG; default info). The supervisor reads
    /// text lines (it takes their level): leave it `text` under a supervisor.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

/// Everything the gRPC service and the handoff listener share.
#[derive(Debug)]
pub struct Pager {
    pub version: String,
    pub started_at: SystemTime,
    pub handoff_socket: PathBuf,
    pub registry: Registry,
    pub memory_files: MemoryFiles,
    pub workers: Vec<WorkerHandle>,
    /// With `--follow-vcpus`, the CPU each worker is pinned to (empty: they run anywhere).
    pub worker_cpus: Vec<usize>,
    pub zero: Arc<ZeroSource>,
    /// 4 KiB pages of the block served around a random fault under contention (1: none).
    pub fault_around_pages: u64,
    /// How sessions asked to record their working set record it.
    pub record: RecordSettings,
    /// Set to true to stop the process (Shutdown RPC).
    pub shutdown: watch::Sender<bool>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if cli.print_version {
        println!("{}", cli.version_label);
        return Ok(());
    }
    uffdpager::logging::init(cli.log_format);
    let grpc_socket = cli.grpc_socket.clone().context("--grpc-socket is required")?;
    let handoff_socket = cli.handoff_socket.clone().context("--handoff-socket is required")?;
    // With --follow-vcpus, worker i is pinned to worker_cpus[i].
    let worker_cpus = if cli.follow_vcpus {
        anyhow::ensure!(
            cli.fault_threads.is_none(),
            "--fault-threads and --follow-vcpus exclude each other: following puts one fault worker on each CPU"
        );
        follow::allowed_cpus().context("reading this process's CPU affinity")?
    } else {
        Vec::new()
    };
    let fault_threads =
        if worker_cpus.is_empty() { cli.fault_threads.unwrap_or(2) } else { worker_cpus.len() };
    anyhow::ensure!(fault_threads > 0, "--fault-threads must be at least 1");
    anyhow::ensure!(cli.complete_step_bytes >= 4096, "--complete-step-bytes must be at least 4096");
    anyhow::ensure!(
        cli.fault_around_kib.is_power_of_two() && (4..=2048).contains(&cli.fault_around_kib),
        "--fault-around-kib must be a power of two from 4 to 2048, not {}",
        cli.fault_around_kib
    );

    let copy_threads = cli.copy_threads.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(0, |n| n.get().saturating_sub(1)).min(4)
    });
    let copies = CopyThreads::spawn(copy_threads).context("starting copy threads")?;
    let peers = crate::worker::Peers::default();
    let workers = (0..fault_threads)
        .map(|i| {
            WorkerHandle::spawn(
                i,
                cli.version_label.clone(),
                cli.complete_step_bytes,
                Duration::from_micros(cli.fault_spin_us),
                copies.clone(),
                worker_cpus.get(i).copied(),
                Arc::clone(&peers),
            )
        })
        .collect::<Result<Vec<_>, _>>()
        .context("starting fault workers")?;
    let _ = peers.set(workers.iter().map(WorkerHandle::peer).collect());
    // Copy threads stop once every worker (each holds a handle) has stopped.
    drop(copies);
    let (shutdown, mut shutdown_rx) = watch::channel(false);
    let pager = Arc::new(Pager {
        version: cli.version_label.clone(),
        started_at: SystemTime::now(),
        handoff_socket: handoff_socket.clone(),
        registry: Registry::default(),
        memory_files: MemoryFiles::with_background_scan(Duration::from_secs(
            cli.memory_file_linger_secs,
        ))
        .context("starting the zero scan thread")?,
        workers,
        worker_cpus: worker_cpus.clone(),
        zero: Arc::new(ZeroSource::new(2 << 20).context("mapping the zero source")?),
        fault_around_pages: cli.fault_around_kib / 4,
        record: RecordSettings {
            record_for: Duration::from_secs(cli.record_working_set_secs),
            max_runs: cli.record_working_set_max_runs.min(uffdpager::working_set::MAX_RUNS),
        },
        shutdown,
    });

    if !worker_cpus.is_empty() {
        follow::spawn(Arc::clone(&pager), worker_cpus.clone())
            .context("starting the thread that follows the vCPUs")?;
    }

    let listener = uffdpager::handoff::bind_listener(&handoff_socket)
        .with_context(|| format!("binding handoff socket {}", handoff_socket.display()))?;
    {
        let pager = Arc::clone(&pager);
        std::thread::Builder::new()
            .name("handoff".into())
            .spawn(move || handoff::serve(listener, pager))
            .context("starting the handoff thread")?;
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let version = cli.version_label.clone();
    let result = runtime.block_on(async {
        let incoming = uffdpager::grpc::bind_uds(&grpc_socket)
            .with_context(|| format!("binding gRPC socket {}", grpc_socket.display()))?;
        // Only the supervisor (this process's uid, or root) may call a pager.
        let incoming = checked_incoming(
            incoming,
            CallerPolicy::owner_only(),
            grpc_socket.display().to_string(),
        );
        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<PagerServer<service::PagerService>>().await;
        let (reflection_v1, reflection_v1alpha) = uffdpager::grpc::reflection_services();
        let service = service::PagerService { pager: Arc::clone(&pager) };
        let watchdog = watchdog::Watchdog { limit: cli.stall_timeout };
        tokio::spawn(watchdog.run(Arc::clone(&pager), health.clone()));
        let files = Arc::clone(&pager);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(files.memory_files.sweep_every());
            loop {
                every.tick().await;
                files.memory_files.sweep(std::time::Instant::now());
            }
        });
        let mut sigterm = signal(SignalKind::terminate()).context("SIGTERM handler")?;
        let mut sigint = signal(SignalKind::interrupt()).context("SIGINT handler")?;
        info!(version = %version, pid = std::process::id(), grpc = %grpc_socket.display(),
            handoff = %handoff_socket.display(), fault_threads = pager.workers.len(), copy_threads,
            follow_vcpus = !pager.worker_cpus.is_empty(), "pager serving");
        let stop = async move {
            let why = tokio::select! {
                _ = sigterm.recv() => "SIGTERM",
                _ = sigint.recv() => "SIGINT",
                _ = shutdown_rx.wait_for(|s| *s) => "Shutdown RPC",
            };
            info!(version = %version, why, "pager stopping");
        };
        tonic::transport::Server::builder()
            .layer(RequireAllowedCaller)
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(PagerServer::new(service))
            .serve_with_incoming_shutdown(incoming, stop)
            .await
            .context("gRPC server")
    });
    runtime.shutdown_timeout(Duration::from_secs(2));
    let live = pager.registry.live_count();
    if live > 0 {
        warn!(version = %cli.version_label, live, "exiting with sessions still served: their VMs need another pager");
    }
    let _ = std::fs::remove_file(&grpc_socket);
    let _ = std::fs::remove_file(&handoff_socket);
    info!(version = %cli.version_label, "pager exited");
    // Worker threads are stopped by dropping the handles (with `pager`), which releases sessions.
    drop(pager);
    result
}
