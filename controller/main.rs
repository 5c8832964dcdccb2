//! `uffd-controller`: graduates sessions off their pagers under a policy, so that old pager
//! versions drain to zero and exit, and the number of live pager sessions stays bounded.
//!
//! How it is built, one job per module:
//! - `cli` / `config`: a TOML file and flags over it; defaults from DESIGN.md; every setting
//!   checked in one place, with errors that name it.
//! - `inventory`: the controller's view of one supervisor's sessions (the one protobuf →
//!   domain conversion).
//! - `watch`: one task per supervisor keeps its WatchSessions stream open; every (re)connection
//!   re-lists, and the plan ignores a supervisor until its snapshot is complete.
//! - `plan`: the pure function (inventories, policy, now, in flight, failures) → ordered
//!   graduations with reasons, plus why every other live session is held.
//! - `runner`: the scan loop (tick + stream events), at most `max_concurrent` CompleteSession
//!   calls at once, each with `completion_timeout` as its gRPC deadline, every outcome recorded,
//!   failures held back for `failure_backoff`.
//! - `state` / `status` / `service`: the shared state, its protobuf form, and the Controller
//!   API (GetStatus, Plan) with health and reflection.
//!
//! Choices worth knowing:
//! - Soak ages use the supervisor's `connected_at` against this host's wall clock, so a restart
//!   of the controller does not restart the soak (clocks are assumed roughly in sync).
//! - Failures and in-flight calls are kept in memory only: after a restart a failed session may
//!   be retried at once. The supervisor's own state (COMPLETING) still prevents a duplicate.
//! - Sessions in flight, COMPLETING ones, and outdated ones being graduated count as already
//!   leaving when the ceiling works out how many more must go (see `plan`).
//! - Disabled is a strict no-op: no stream is opened and no call made; the API still answers
//!   and says "disabled".
//!
//! A crate of its own (`controller/`): it may depend on the protocol library (`uffdpager`) and
//! on nothing else of this workspace.

mod cli;
mod config;
mod inventory;
mod metrics;
mod plan;
mod runner;
mod service;
mod state;
mod status;
mod watch;

use std::future::Future;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch as signal_watch;
use tonic::transport::server::Router;
use tonic::transport::Server;
use tracing::{error, info, warn};
use uffdpager::api::controller_server::ControllerServer;
use uffdpager::peer_auth::{checked_incoming, ApiGroup, CallerPolicy, RequireAllowedCaller};
use uffdpager::tls::TcpSecurity;

use crate::cli::Cli;
use crate::config::{Config, Settings};
use crate::runner::{GrpcCompleter, Runner};
use crate::service::ControllerService;
use crate::state::{Clock, Shared};

/// How long the gRPC servers get to finish their calls at shutdown.
const SERVER_GRACE: Duration = Duration::from_secs(5);

fn main() -> ExitCode {
    let cli = Cli::parse();
    uffdpager::logging::init(cli.log_format);
    let runtime =
        match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                error!(error = %e, "cannot start the async runtime");
                return ExitCode::FAILURE;
            }
        };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!(error = format!("{e:#}"), "uffd-controller cannot run");
            ExitCode::FAILURE
        }
    }
}

/// The effective configuration: defaults, then the file, then the flags.
fn load_config(cli: &Cli) -> anyhow::Result<Config> {
    let file = match &cli.config {
        Some(path) => Settings::load(path)?,
        None => Settings::default(),
    };
    Ok(file.overlay(cli.settings()).resolve()?)
}

fn log_config(c: &Config) {
    let p = &c.policy;
    info!(
        mode = status::mode(c),
        supervisors = ?c.supervisors,
        min_session_age = ?p.min_session_age,
        max_concurrent = p.max_concurrent,
        max_active_sessions = p.max_active_sessions,
        scan_interval = ?p.scan_interval,
        completion_timeout = ?p.completion_timeout,
        failure_backoff = ?p.failure_backoff,
        min_available_memory = p.min_available_memory,
        metrics_listen = ?c.metrics_listen,
        dry_run = c.dry_run,
        listen = %c.listen.display(),
        api_group = c.api_group.as_deref().unwrap_or(""),
        listen_tcp = ?c.listen_tcp,
        tcp_mode = match &c.listen_security {
            None => "none",
            Some(TcpSecurity::Tls(_)) => "tls (client certificates required)",
            Some(TcpSecurity::Plaintext) => "plaintext (insecure, loopback)",
        },
        supervisor_tls = c.supervisor_tls.is_some(),
        "uffd-controller starting"
    );
    if !c.enabled {
        info!("controller {}; enable it with `enabled = true` or --enabled", status::DISABLED);
    }
}

/// The services this server advertises through reflection (the descriptor set describes every
/// `uffdpager.v1` service; the Supervisor and Pager ones are not served here).
const ADVERTISED: [&str; 4] = [
    "uffdpager.v1.Controller",
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

fn reflection() -> tonic_reflection::server::Builder<'static> {
    ADVERTISED.iter().fold(
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(uffdpager::api::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET),
        |b, name| b.with_service_name(*name),
    )
}

/// Health (SERVING), reflection (v1 and v1alpha: PyPI's grpcurl speaks only v1alpha) and the
/// Controller service, on `server`.
async fn router<L: Clone>(
    shared: &Arc<Shared>,
    mut server: Server<L>,
) -> anyhow::Result<Router<L>> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<ControllerServer<ControllerService>>().await;
    let reflection_v1 = reflection().build_v1().context("building reflection v1")?;
    let reflection_v1alpha = reflection().build_v1alpha().context("building reflection v1alpha")?;
    Ok(server
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(ControllerServer::new(ControllerService::new(shared.clone()))))
}

/// Resolves when SIGTERM or SIGINT arrives; installed before anything starts.
fn shutdown_signal() -> anyhow::Result<impl Future<Output = &'static str>> {
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        }
    })
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let config = load_config(&cli)?;
    let signaled = shutdown_signal()?;
    log_config(&config);
    // Everything that reads a file or a group is resolved before anything listens.
    let callers =
        CallerPolicy::with_group(config.api_group.as_deref().map(ApiGroup::resolve).transpose()?);
    let tcp_tls = match &config.listen_security {
        Some(TcpSecurity::Tls(files)) => Some(uffdpager::tls::server_config(files)?),
        _ => None,
    };
    let supervisor_tls =
        config.supervisor_tls.as_ref().map(uffdpager::tls::client_config).transpose()?;
    let shared = Shared::new(config, Clock::System, supervisor_tls.clone());
    let config = &shared.config;

    let (stop_tx, stop_rx) = signal_watch::channel(false);
    let stopped = |mut rx: signal_watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let mut servers = tokio::task::JoinSet::new();
    check_listen_dir(&config.listen)?;
    let uds = uffdpager::grpc::bind_api_uds(&config.listen, callers.group.as_ref().map(|g| g.gid))
        .with_context(|| format!("listening on unix:{}", config.listen.display()))?;
    let uds = checked_incoming(uds, callers.clone(), config.listen.display().to_string());
    let uds_server = router(&shared, Server::builder().layer(RequireAllowedCaller))
        .await?
        .serve_with_incoming_shutdown(uds, stopped(stop_rx.clone()));
    servers.spawn(uds_server);
    info!(listen = %config.listen.display(), callers = %callers, "Controller API listening");
    if let Some(addr) = config.listen_tcp {
        let tcp = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening on {addr}"))?;
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(tcp);
        let mut server = Server::builder();
        if let Some(tls) = &tcp_tls {
            server = server.tls_config(tls.clone()).context("the TCP listener's TLS")?;
        }
        servers.spawn(
            router(&shared, server)
                .await?
                .serve_with_incoming_shutdown(incoming, stopped(stop_rx.clone())),
        );
        let tls = if tcp_tls.is_some() { "tls" } else { "plaintext" };
        info!(listen_tcp = %addr, tls, "Controller API listening on TCP");
    }

    let metrics_server = match config.metrics_listen {
        Some(addr) => {
            let s = shared.clone();
            let render: uffdpager::metrics::Render = Arc::new(move || {
                let s = s.clone();
                Box::pin(async move { metrics::render(&s) })
            });
            let (bound, task) = uffdpager::metrics::serve(addr, render, stop_rx.clone()).await?;
            info!(addr = %bound, "metrics served on /metrics");
            Some(task)
        }
        None => None,
    };

    let mut watchers = tokio::task::JoinSet::new();
    if config.enabled {
        for endpoint in &config.supervisors {
            watchers.spawn(watch::watch(shared.clone(), endpoint.clone(), stop_rx.clone()));
        }
    }

    let runner = Runner::new(shared.clone(), GrpcCompleter { tls: supervisor_tls });
    let loop_done = runner.run(async move {
        let name = signaled.await;
        info!(signal = name, "shutting down");
    });
    tokio::select! {
        () = loop_done => {}
        Some(ended) = servers.join_next() => {
            // A server that ends before shutdown has failed: say why and stop.
            stop_tx.send_replace(true);
            let reason = match ended {
                Ok(Ok(())) => "it stopped".to_string(),
                Ok(Err(e)) => e.to_string(),
                Err(e) => e.to_string(),
            };
            remove_socket(&config.listen);
            anyhow::bail!("the Controller API server ended: {reason}");
        }
    }
    stop_tx.send_replace(true);
    while watchers.join_next().await.is_some() {}
    if let Some(task) = metrics_server {
        // A scraper's open connection must not hold the shutdown up.
        let _ = tokio::time::timeout(SERVER_GRACE, task).await;
    }
    let drained =
        tokio::time::timeout(SERVER_GRACE, async { while servers.join_next().await.is_some() {} })
            .await;
    if drained.is_err() {
        warn!(grace = ?SERVER_GRACE, "Controller API calls still running; exiting anyway");
    }
    remove_socket(&config.listen);
    info!("uffd-controller stopped");
    Ok(())
}

/// The directory of the API socket must exist: the controller creates no directory (an
/// operator's typo must not leave a stray one, owned by root, behind).
fn check_listen_dir(socket: &Path) -> anyhow::Result<()> {
    let dir = match socket.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => anyhow::bail!(
            "--listen unix:{}: {} is not a directory",
            socket.display(),
            dir.display()
        ),
        Err(e) => anyhow::bail!(
            "--listen unix:{}: its directory {} cannot be used ({e}); the controller creates no \
             directory: create it first, or choose a socket path in an existing one",
            socket.display(),
            dir.display()
        ),
    }
}

fn remove_socket(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            warn!(path = %path.display(), error = %e, "cannot remove the API socket");
        }
    }
}
