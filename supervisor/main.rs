//! `uffd-supervisor`: the one public entry point of a host's uffd pagers.
//!
//! It creates sessions and their VMM sockets, reads each VMM's Firecracker handshake, hands the
//! session to the active pager version (a child process), routes every per-session call to the
//! version that owns the session, streams the inventory, and keeps pager versions running
//! (respawn, drain, stop). See `docs/DESIGN.md` and the modules below:
//!
//! - `cli`: command line, `version_spec` the versions it names (flags, versions file);
//!   `api_access`: who may call (Unix-socket callers, TLS on TCP); `shutdown`: signals and the
//!   order of shutdown; `metrics`: `/metrics` (counters, gauges, the pagers' figures);
//! - `core`: shared state and per-session OS resources; `inventory`: the session records and
//!   their events, `session_record` one record, `lifecycle` a session's state and transitions;
//! - `sessions`: creating, looking up and deleting sessions; `session_connect`: a VMM's first
//!   connection (handshake, handoff); `session_view`: how a session is shown;
//!   `session_socket`, `memory_file`, `session_id`, `working_set`: what creating one checks;
//!   `refused_vmm`: what becomes of a VMM that will not be served;
//! - `runtime_dir`: the runtime directory's rules; `fd_limit`: descriptors and their limit;
//! - `complete`: CompleteSession; `monitor`: polling the pagers; `pager_health`: replacing a
//!   pager that says it cannot serve;
//! - `pagers`: one pager process, `pager_paths` its files, `pager_ready` waiting for its health,
//!   `pager_stop` stopping it, `pager_exit` how it ended, `pager_stderr` its log lines
//!   (`file_watch`: waiting on the log file), `pidfd` how it is watched and signalled,
//!   `process_group` what is left of it, `pager_binary` its binary's checks, `tuning` its flags;
//! - `versions`: the version table, `version_lifecycle` a version's state and transitions;
//!   `deploy`: deploy and activate; `version_process`: a version's process spawned, its exit
//!   handled, respawned; `drained`: stopping DRAINING versions that serve nothing; `readopt`:
//!   the sessions of a pager that died go to another one;
//! - `startup`: starting the versions; `recover`: taking over the pagers of an earlier run,
//!   `recover_sessions` their sessions; `runtime_state`: what is recorded for that in the
//!   runtime dir; `vmm_fds`: a session's descriptors taken back from its VMM when no pager
//!   serves it;
//! - `service`: the gRPC service; `status`: errors → gRPC codes.
//!
//! A crate of its own (`supervisor/`): it may depend on the protocol library (`uffdpager`) and
//! on nothing else of this workspace.

#![deny(unsafe_code)]

mod api_access;
mod cli;
mod complete;
mod core;
mod deploy;
mod drained;
mod fd_limit;
mod file_watch;
mod inventory;
mod lifecycle;
mod memory_file;
mod metrics;
mod monitor;
mod pager_binary;
mod pager_exit;
mod pager_health;
mod pager_paths;
mod pager_ready;
mod pager_stderr;
mod pager_stop;
mod pagers;
mod pidfd;
mod process_group;
mod readopt;
mod recover;
mod recover_sessions;
mod refused_vmm;
mod runtime_dir;
mod runtime_state;
mod service;
mod session_connect;
mod session_id;
mod session_record;
mod session_socket;
mod session_view;
mod sessions;
mod shutdown;
mod startup;
mod status;
mod tuning;
mod version_lifecycle;
mod version_process;
mod version_spec;
mod versions;
mod vmm_fds;
mod working_set;

use std::future::Future;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
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
use uffdpager::peer_auth::{checked_incoming, RequireAllowedCaller};

use crate::api_access::ApiAccess;
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
    match fd_limit::raise_nofile() {
        Ok(r) if r.before < r.now => {
            info!(before = r.before, now = r.now, "raised RLIMIT_NOFILE to its hard limit")
        }
        Ok(_) => {}
        Err(e) => warn!(error = %e, "cannot raise RLIMIT_NOFILE"),
    }
    let access = ApiAccess::from_settings(&cli)?;
    let mut config = Config::new(cli.runtime_dir.clone(), cli.finished_retention);
    config.max_sessions = cli.max_sessions;
    config.refused_vmm = cli.refused_vmm;
    let fds = fd_limit::nofile_limit();
    let per_session = 6u64;
    if fds < u64::try_from(config.max_sessions).unwrap_or(u64::MAX).saturating_mul(per_session) {
        warn!(
            rlimit_nofile = fds,
            max_sessions = config.max_sessions,
            "RLIMIT_NOFILE may run out before --max-sessions is reached (~{per_session} \
             descriptors per session); CreateSession then answers RESOURCE_EXHAUSTED",
        );
    }
    config.max_overlay_bytes = cli.max_overlay_bytes;
    config.pager_unhealthy_timeout = cli.pager_unhealthy_timeout;
    let uds_path = config.runtime_dir.join("supervisor.sock");
    prepare_runtime_dir(&config, &uds_path, access.group_gid())?;

    let specs = version_spec::version_specs(
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
    let (health, servers) = serve(&core, &uds_path, &access, stop_rx).await?;
    let monitor = tokio::spawn(monitor::run(core.clone()));
    let metrics = match cli.metrics_listen {
        Some(addr) => {
            let c = core.clone();
            let render: uffdpager::metrics::Render = Arc::new(move || {
                let c = c.clone();
                Box::pin(
                    async move { metrics::render(&c.inventory, &c.versions, &c.metrics).await },
                )
            });
            let (bound, task) = uffdpager::metrics::serve(addr, render, stop_rx_metrics).await?;
            info!(addr = %bound, "metrics served on /metrics");
            Some(task)
        }
        None => None,
    };
    info!(
        socket = %uds_path.display(),
        callers = %access.callers,
        tcp = ?cli.listen_tcp,
        tcp_mode = access.tcp_mode(),
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
    shutdown::settle_dying_pagers(&core).await;
    if !core.wait_adoptions(shutdown::ADOPTION_GRACE).await {
        warn!(
            grace = ?shutdown::ADOPTION_GRACE,
            "re-adoptions still under way; their sessions are left to the next supervisor"
        );
    }
    core.close_spawns();
    if !core.wait_spawns(core.config.ready_timeout + core.config.stop_grace).await {
        warn!("a pager is still starting; exiting anyway");
    }
    shutdown::stop_idle_pagers(&core).await;
    let _ = std::fs::remove_file(&uds_path);
    info!("uffd-supervisor stopped");
    Ok(())
}

/// Creates `DIR`, `DIR/sessions` and `DIR/pagers` (mode 0700) or checks them (see
/// `runtime_dir.rs`); with an API group, `DIR` becomes that group's and group-searchable (so
/// its members can reach the socket but list nothing); refuses a runtime directory that another
/// supervisor serves, and removes session sockets left by an earlier run.
fn prepare_runtime_dir(
    config: &Config,
    uds_path: &Path,
    api_group: Option<u32>,
) -> anyhow::Result<()> {
    runtime_dir::prepare(&config.runtime_dir, &[&config.sessions_dir, &config.pagers_dir])?;
    if let Some(gid) = api_group {
        let dir = &config.runtime_dir;
        std::os::unix::fs::chown(dir, None, Some(gid))
            .with_context(|| format!("giving {} to the API group", dir.display()))?;
        let mode = std::fs::metadata(dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .permissions()
            .mode();
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode((mode & 0o7777) | 0o010))
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

/// Starts the gRPC servers (Unix socket, and TCP if asked): Supervisor, health, reflection. The
/// Unix socket's callers are checked by their credentials (`access.callers`); the TCP listener
/// serves TLS with client certificates unless plain TCP was explicitly asked for.
async fn serve(
    core: &Arc<Core>,
    uds_path: &Path,
    access: &ApiAccess,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<(tonic_health::server::HealthReporter, Vec<ServerTask>)> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<SupervisorServer<SupervisorService>>().await;
    health.set_service_status("", ServingStatus::Serving).await;
    let (reflection_v1, reflection_v1alpha) = uffdpager::grpc::reflection_services();
    let supervisor = SupervisorServer::new(SupervisorService::new(core.clone()));
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let mut tasks = Vec::new();
    let uds = uffdpager::grpc::bind_api_uds(uds_path, access.group_gid())
        .with_context(|| format!("binding {}", uds_path.display()))?;
    let uds = checked_incoming(uds, access.callers.clone(), uds_path.display().to_string());
    let uds_router = Server::builder()
        .layer(RequireAllowedCaller)
        .add_service(supervisor.clone())
        .add_service(health_service.clone())
        .add_service(reflection_v1.clone())
        .add_service(reflection_v1alpha.clone());
    tasks.push(tokio::spawn(uds_router.serve_with_incoming_shutdown(uds, stopped(stop.clone()))));
    if let Some(tcp) = &access.tcp {
        let mut builder = Server::builder();
        if let Some(tls) = &tcp.tls {
            builder = builder.tls_config(tls.clone()).context("the TCP listener's TLS")?;
        }
        let tcp_router = builder
            .add_service(supervisor)
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha);
        let incoming =
            TcpIncoming::bind(tcp.addr).with_context(|| format!("listening on {}", tcp.addr))?;
        let incoming =
            uffdpager::accept_backoff::Backoff::new(incoming, format!("tcp {}", tcp.addr));
        tasks.push(tokio::spawn(tcp_router.serve_with_incoming_shutdown(incoming, stopped(stop))));
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
