//! `uffd-supervisor`: the one public entry point of a host's uffd pagers.
//!
//! It creates sessions and their VMM sockets, reads each VMM's Firecracker handshake, hands the
//! session to the active pager version (a child process), routes every per-session call to the
//! version that owns the session, streams the inventory, and keeps pager versions running
//! (respawn, drain, stop). See `docs/DESIGN.md` and the modules below:
//!
//! - `cli`: command line; `shutdown`: signals and the order of shutdown;
//! - `core`: shared state and per-session OS resources; `inventory`: session records and events;
//! - `sessions`, `session_socket`, `memory_file`, `session_id`: creating and connecting sessions;
//! - `complete`: CompleteSession; `monitor`: polling the pagers;
//! - `pagers`: one pager process, `pager_stderr` its log lines, `pidfd` how it is watched and
//!   signalled; `versions`: the version table; `deploy`: versions over time (deploy, activate,
//!   respawn, drain); `readopt`: the sessions of a pager that died go to another one;
//! - `startup`: the versions to start (command line, versions file); `recover`: taking over the
//!   pagers of an earlier run; `runtime_state`: what is recorded for that in the runtime dir;
//! - `service`: the gRPC service; `status`: errors → gRPC codes.

#![deny(unsafe_code)]

mod cli;
mod complete;
mod core;
mod deploy;
mod inventory;
mod memory_file;
mod metrics;
mod monitor;
mod pager_binary;
mod pager_stderr;
mod pagers;
mod pidfd;
mod readopt;
mod recover;
mod runtime_state;
mod service;
mod session_id;
mod session_socket;
mod sessions;
mod shutdown;
mod startup;
mod status;
mod tuning;
mod versions;
mod working_set;

use std::future::Future;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Parser;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;
use tonic_health::ServingStatus;
use tracing::{error, info, warn};
use uffdpager::api::supervisor_server::SupervisorServer;

use crate::cli::{Cli, Resolved};
use crate::core::{Config, Core};
use crate::service::SupervisorService;
use crate::shutdown::Signals;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match cli.resolve() {
        Ok(s) => s,
        Err(e) => {
            uffdpager::logging::init(cli.settings.log_format.unwrap_or_default());
            error!(error = %e, "uffd-supervisor cannot start");
            return ExitCode::FAILURE;
        }
    };
    uffdpager::logging::init(settings.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            error!(error = %e, "cannot start the tokio runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!(error = format!("{e:#}"), "uffd-supervisor failed");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Resolved) -> anyhow::Result<()> {
    let mut signals = Signals::install().context("installing the signal handlers")?;
    let mut config = Config::new(cli.runtime_dir.clone(), cli.finished_retention);
    config.max_overlay_bytes = cli.max_overlay_bytes;
    let uds_path = config.runtime_dir.join("supervisor.sock");
    prepare_runtime_dir(&config, &uds_path)?;

    let specs = startup::version_specs(
        &cli.pager_binary,
        cli.pager_version.as_deref(),
        cli.versions_config.as_deref(),
        cli.versions.clone(),
    )?;

    let core = Core::new(config);
    // Pagers an earlier run left serving are taken over first, then the listed versions that do
    // not run yet are started. A signal meanwhile is not lost: it is handled once serving (a
    // pager half started must not be abandoned).
    let recovered = core.recover().await;
    startup::start_versions(&core, &specs, &recovered).await?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let stop_rx_metrics = stop_rx.clone();
    let (health, servers) = serve(&core, &uds_path, cli.listen_tcp, stop_rx).await?;
    let monitor = tokio::spawn(monitor::run(core.clone()));
    let metrics = match cli.metrics_listen {
        Some(addr) => {
            let c = core.clone();
            let render: uffdpager::metrics::Render =
                Arc::new(move || Box::pin(metrics::render(c.clone())));
            let (bound, task) = uffdpager::metrics::serve(addr, render, stop_rx_metrics).await?;
            info!(addr = %bound, "metrics served on /metrics");
            Some(task)
        }
        None => None,
    };
    info!(
        socket = %uds_path.display(),
        tcp = ?cli.listen_tcp,
        active_version = %core.inventory.active_version(),
        "uffd-supervisor serving"
    );

    let mut servers = servers;
    let (reason, finished) = tokio::select! {
        sig = signals.recv() => (sig.to_string(), None),
        (index, ended) = first_to_end(&mut servers) => {
            let which = if index == 0 { "Unix socket" } else { "TCP" };
            (format!("the {which} gRPC server stopped: {ended}"), Some(index))
        }
    };
    if let Some(index) = finished {
        servers.remove(index); // a finished JoinHandle must not be polled again
    }
    info!(reason, "shutting down");

    core.begin_closing();
    health.set_service_status("", ServingStatus::NotServing).await;
    health.set_not_serving::<SupervisorServer<SupervisorService>>().await;
    stop_tx.send_replace(true);
    shutdown::drain(
        async {
            for s in servers {
                let _ = s.await;
            }
        },
        shutdown::DRAIN_GRACE,
    )
    .await;
    let _ = monitor.await;
    if let Some(task) = metrics {
        // A scraper's open connection must not hold the shutdown up.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), task).await;
    }
    core.close_all_sockets();
    shutdown::stop_idle_pagers(&core).await;
    let _ = std::fs::remove_file(&uds_path);
    info!("uffd-supervisor stopped");
    Ok(())
}

/// Creates `DIR`, `DIR/sessions` and `DIR/pagers` (mode 0700), refuses a runtime directory that
/// another supervisor serves, and removes session sockets left by an earlier run.
fn prepare_runtime_dir(config: &Config, uds_path: &Path) -> anyhow::Result<()> {
    for dir in [&config.runtime_dir, &config.sessions_dir, &config.pagers_dir] {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("setting the mode of {}", dir.display()))?;
    }
    let len = uds_path.as_os_str().len();
    if len > session_socket::MAX_SOCKET_PATH {
        bail!(
            "{} is {len} bytes long, too long for a Unix socket: use a shorter --runtime-dir",
            uds_path.display()
        );
    }
    if std::os::unix::net::UnixStream::connect(uds_path).is_ok() {
        bail!(
            "another uffd-supervisor serves {}: one runtime directory, one supervisor",
            uds_path.display()
        );
    }
    let mut stale = 0;
    for entry in std::fs::read_dir(&config.sessions_dir)
        .with_context(|| format!("reading {}", config.sessions_dir.display()))?
        .flatten()
    {
        if entry.file_type().is_ok_and(|t| t.is_socket())
            && std::fs::remove_file(entry.path()).is_ok()
        {
            stale += 1;
        }
    }
    if stale > 0 {
        warn!(
            count = stale,
            dir = %config.sessions_dir.display(),
            "removed session sockets left by an earlier run",
        );
    }
    Ok(())
}

type ServerTask = JoinHandle<Result<(), tonic::transport::Error>>;

/// Starts the gRPC servers (Unix socket, and TCP if asked): Supervisor, health, reflection.
async fn serve(
    core: &Arc<Core>,
    uds_path: &Path,
    tcp: Option<std::net::SocketAddr>,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<(tonic_health::server::HealthReporter, Vec<ServerTask>)> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<SupervisorServer<SupervisorService>>().await;
    health.set_service_status("", ServingStatus::Serving).await;
    let (reflection_v1, reflection_v1alpha) = uffdpager::grpc::reflection_services();
    let supervisor = SupervisorServer::new(SupervisorService::new(core.clone()));
    let router = || {
        Server::builder()
            .add_service(supervisor.clone())
            .add_service(health_service.clone())
            .add_service(reflection_v1.clone())
            .add_service(reflection_v1alpha.clone())
    };
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let mut tasks = Vec::new();
    let uds = uffdpager::grpc::bind_uds(uds_path)
        .with_context(|| format!("binding {}", uds_path.display()))?;
    tasks.push(tokio::spawn(router().serve_with_incoming_shutdown(uds, stopped(stop.clone()))));
    if let Some(addr) = tcp {
        let incoming = TcpIncoming::bind(addr).with_context(|| format!("listening on {addr}"))?;
        tasks.push(tokio::spawn(router().serve_with_incoming_shutdown(incoming, stopped(stop))));
    }
    Ok((health, tasks))
}

/// Waits for the first server task to end: its index and how it ended.
async fn first_to_end(tasks: &mut [ServerTask]) -> (usize, String) {
    let (index, ended) = std::future::poll_fn(|cx| {
        for (i, t) in tasks.iter_mut().enumerate() {
            if let std::task::Poll::Ready(r) = std::pin::Pin::new(t).poll(cx) {
                return std::task::Poll::Ready((i, r));
            }
        }
        std::task::Poll::Pending
    })
    .await;
    let ended = match ended {
        Ok(Ok(())) => "without error".to_string(),
        Ok(Err(e)) => format!("{e:#}"),
        Err(e) => format!("its task failed: {e}"),
    };
    (index, ended)
}
