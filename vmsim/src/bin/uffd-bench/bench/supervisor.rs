//! The project under test: a real `uffd-supervisor` (which starts the real `uffd-pager`) in a
//! runtime directory of the benchmark's own, and simulated VMs restored through its sessions in
//! this process (cheaper and quieter than child processes for latency measurement).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use testkit::{pager_pids, SupervisorOptions, SupervisorProcess};
use tonic::transport::Channel;
use uffdpager::api::supervisor_client::SupervisorClient;
use uffdpager::api::{
    CompleteSessionRequest, CompleteSessionResponse, CreateSessionRequest, GetSessionRequest,
    Session, SessionState,
};
use vmsim::{run_with_deadline, GuestRegionSpec, Vm};

/// How long one VM step (restore, a workload, a verify) may take before the benchmark gives up
/// on it (a pager that stops serving would block it forever).
pub const VM_STEP: Duration = Duration::from_secs(300);

/// Which binaries to run.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub supervisor: PathBuf,
    pub pager: PathBuf,
    pub show_logs: bool,
}

/// The pagers let go of a memory file 1 s after its last session (their default is 30 s), so
/// that the cold-file figures can drop the file from the page cache (pages a process maps
/// cannot be dropped) without waiting out the default. Every other figure restores its next VM
/// within a second of the last, so it measures what the default gives. A pager build without
/// the setting ignores it.
const LINGER: (&str, &str) = ("UFFD_PAGER_MEMORY_FILE_LINGER_SECS", "1");

/// A running supervisor and its pagers: all killed on drop, so an early error leaves nothing
/// behind.
#[derive(Debug)]
pub struct Project {
    sup: Option<SupervisorProcess>,
    runtime_dir: PathBuf,
    client: SupervisorClient<Channel>,
}

impl Project {
    pub async fn start(bins: &Binaries, runtime_dir: &Path) -> anyhow::Result<Self> {
        let opts = SupervisorOptions {
            pager_binary: Some(bins.pager.clone()),
            args: Vec::new(),
            show_logs: bins.show_logs,
        };
        let sup =
            SupervisorProcess::start_with_env(&bins.supervisor, runtime_dir, &opts, &[LINGER])
                .await
                .with_context(|| format!("starting {}", bins.supervisor.display()))?;
        let client = sup.client();
        Ok(Self { sup: Some(sup), runtime_dir: runtime_dir.to_path_buf(), client })
    }

    pub fn client(&self) -> SupervisorClient<Channel> {
        self.client.clone()
    }

    /// The pid of the one pager process (waits a little for it to write its pid file).
    pub async fn pager_pid(&self) -> anyhow::Result<i32> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let live: Vec<i32> = pager_pids(&self.runtime_dir)
                .into_iter()
                .filter(|pid| Path::new(&format!("/proc/{pid}")).exists())
                .collect();
            match live.as_slice() {
                [pid] => return Ok(*pid),
                [] if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                _ => bail!("expected one live pager process, found {live:?}"),
            }
        }
    }

    pub async fn create(&self, id: &str, memory_file: &Path) -> anyhow::Result<Session> {
        let s = self
            .client()
            .create_session(CreateSessionRequest {
                session_id: id.into(),
                memory_file: memory_file.display().to_string(),
                labels: Default::default(),
                ..Default::default()
            })
            .await
            .with_context(|| format!("CreateSession {id}"))?
            .into_inner();
        Ok(s)
    }

    pub async fn get(&self, id: &str) -> anyhow::Result<Session> {
        Ok(self
            .client()
            .get_session(GetSessionRequest { session_id: id.into() })
            .await
            .with_context(|| format!("GetSession {id}"))?
            .into_inner())
    }

    /// Waits until session `id` is in `state` (failing at once if it ended or failed).
    pub async fn wait_state(&self, id: &str, state: SessionState) -> anyhow::Result<Session> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let s = self.get(id).await?;
            if s.state() == state {
                return Ok(s);
            }
            if matches!(s.state(), SessionState::Failed | SessionState::Ended) {
                bail!("session {id} is {:?} ({}), not {state:?}", s.state(), s.error);
            }
            if Instant::now() > deadline {
                bail!("session {id} did not reach {state:?}: {s:?}");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Creates a session and restores a VM of `size` bytes (one 4 KiB-page region from offset
    /// 0) through it; returns once the session is served.
    pub async fn restore(&self, id: &str, memory_file: &Path, size: u64) -> anyhow::Result<Vm> {
        let s = self.create(id, memory_file).await?;
        let socket = PathBuf::from(s.socket_path);
        let file = memory_file.to_path_buf();
        let spec = GuestRegionSpec { size, page_size: 4096, offset: 0 };
        let vm = tokio::task::spawn_blocking(move || Vm::restore(&socket, &file, &[spec]))
            .await
            .context("restore task")?
            .with_context(|| format!("restoring VM {id}"))?;
        self.wait_state(id, SessionState::Serving).await?;
        Ok(vm)
    }

    /// CompleteSession, timed by the client (round trip through the supervisor). Fails unless
    /// the session graduated.
    pub async fn complete(&self, id: &str) -> anyhow::Result<(CompleteSessionResponse, Duration)> {
        let started = Instant::now();
        let done = self
            .client()
            .complete_session(CompleteSessionRequest { session_id: id.into() })
            .await
            .with_context(|| format!("CompleteSession {id}"))?
            .into_inner();
        let elapsed = started.elapsed();
        let state = done.session.as_ref().map(Session::state);
        if state != Some(SessionState::Graduated) {
            bail!("CompleteSession {id} answered state {state:?}: {}", done.message);
        }
        Ok((done, elapsed))
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        // Dropping the supervisor kills it; its pagers outlive it by design: kill them too.
        drop(self.sup.take());
        for pid in pager_pids(&self.runtime_dir) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Runs blocking VM work (which a broken pager could block forever) off the async runtime,
/// bounded by [`VM_STEP`].
pub async fn on_vm<T, F>(what: &str, work: F) -> anyhow::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    tokio::task::spawn_blocking(move || run_with_deadline(VM_STEP, work))
        .await
        .with_context(|| format!("{what}: task"))?
        .context(what.to_string())
}
