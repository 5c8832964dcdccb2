//! A `uffd-supervisor` child process with its own runtime directory.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};
use tonic::transport::Channel;

use uffdpager::api::supervisor_client::SupervisorClient;
use uffdpager::grpc::uds_channel;

/// How to start a supervisor.
#[derive(Debug, Clone, Default)]
pub struct SupervisorOptions {
    /// `--pager-binary`; default: the `uffd-pager` beside the supervisor.
    pub pager_binary: Option<PathBuf>,
    /// Extra command-line arguments.
    pub args: Vec<String>,
    /// Inherit stderr (logs visible) instead of discarding it.
    pub show_logs: bool,
}

/// A running supervisor; killed (SIGKILL) and reaped on drop. Its pager children are left to the
/// caller (they outlive a supervisor by design): use [`SupervisorProcess::stop`] to end them too.
#[derive(Debug)]
pub struct SupervisorProcess {
    child: Child,
    pub runtime_dir: PathBuf,
    pub socket: PathBuf,
}

impl SupervisorProcess {
    /// Starts `binary` with `--runtime-dir dir` and waits until it answers health.
    pub async fn start(binary: &Path, dir: &Path, opts: &SupervisorOptions) -> io::Result<Self> {
        Self::start_with_env(binary, dir, opts, &[]).await
    }

    /// As [`SupervisorProcess::start`], with environment variables set on the supervisor (its
    /// pagers inherit them: the pager's fault-injection hooks are set this way).
    pub async fn start_with_env(
        binary: &Path,
        dir: &Path,
        opts: &SupervisorOptions,
        env: &[(&str, &str)],
    ) -> io::Result<Self> {
        let stderr = if opts.show_logs { Stdio::inherit() } else { Stdio::null() };
        Self::spawn(binary, dir, opts, stderr, env).await
    }

    /// [`SupervisorProcess::start`], its stderr (the log) going to `log`.
    pub async fn start_logging_to(
        binary: &Path,
        dir: &Path,
        opts: &SupervisorOptions,
        log: &Path,
    ) -> io::Result<Self> {
        Self::spawn(binary, dir, opts, Stdio::from(std::fs::File::create(log)?), &[]).await
    }

    async fn spawn(
        binary: &Path,
        dir: &Path,
        opts: &SupervisorOptions,
        stderr: Stdio,
        env: &[(&str, &str)],
    ) -> io::Result<Self> {
        let mut cmd = Command::new(binary);
        cmd.arg("--runtime-dir").arg(dir);
        if let Some(p) = &opts.pager_binary {
            cmd.arg("--pager-binary").arg(p);
        }
        cmd.args(&opts.args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .kill_on_drop(true);
        let mut child = cmd.spawn()?;
        let socket = dir.join("supervisor.sock");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait()? {
                return Err(io::Error::other(format!("supervisor exited at start: {status}")));
            }
            if socket.exists() && health_ok(&socket).await {
                break;
            }
            if Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "supervisor did not become healthy",
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Self { child, runtime_dir: dir.to_path_buf(), socket })
    }

    pub fn client(&self) -> SupervisorClient<Channel> {
        SupervisorClient::new(uds_channel(&self.socket))
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Sends SIGTERM and waits for the exit.
    pub async fn terminate(&mut self) -> io::Result<std::process::ExitStatus> {
        if let Some(pid) = self.child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(i32::try_from(pid).map_err(io::Error::other)?),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        self.child.wait().await
    }

    /// Sends SIGKILL and waits for the exit (its pagers are left running, as after a crash).
    pub async fn kill(&mut self) -> io::Result<std::process::ExitStatus> {
        let _ = self.child.start_kill();
        self.child.wait().await
    }

    /// Kills the supervisor and every pager process it started (found by their pid files).
    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
        for pid in pager_pids(&self.runtime_dir) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Pids in `DIR/pagers/*/pid`.
pub fn pager_pids(dir: &Path) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir(dir.join("pagers")) else { return Vec::new() };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read_to_string(e.path().join("pid")).ok())
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

/// True when the gRPC server on `socket` answers health `SERVING` within two seconds.
pub async fn health_ok(socket: &Path) -> bool {
    let mut client = tonic_health::pb::health_client::HealthClient::new(uds_channel(socket));
    let req = tonic_health::pb::HealthCheckRequest { service: String::new() };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), client.check(req)).await,
        Ok(Ok(r)) if r.get_ref().status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    )
}
