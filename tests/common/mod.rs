//! What the end-to-end tests share: a supervisor in a temporary runtime directory, memory files,
//! simulated VMs in child processes, and waiting on session states (never on fixed sleeps).

#![allow(dead_code)]

pub mod hostile;
pub mod hostile_vmm;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use testkit::{SupervisorOptions, SupervisorProcess, VmProcess};
use tonic::transport::Channel;
use uffdpager::api::supervisor_client::SupervisorClient;
use uffdpager::api::{CreateSessionRequest, GetSessionRequest, Session, SessionState};
use vmsim::memfile::{write_memory_file, MemoryFileSpec};

pub const STEP: Duration = Duration::from_secs(60);
/// The tests' pagers let go of a memory file 1 s after its last session (the default is 30 s),
/// so that the checks that a pager holds nothing once its VMs are gone need not wait out the
/// default; `tests/sessions.rs` checks the linger itself with the flag.
const PAGER_LINGER: (&str, &str) = ("UFFD_PAGER_MEMORY_FILE_LINGER_SECS", "1");
pub const MIB: u64 = 1 << 20;

pub struct Env {
    pub dir: tempfile::TempDir,
    pub sup: Option<SupervisorProcess>,
}

impl Env {
    pub async fn start() -> Self {
        Self::start_with(SupervisorOptions::default()).await
    }

    pub async fn start_with(opts: SupervisorOptions) -> Self {
        Self::start_with_env(opts, &[]).await
    }

    /// A supervisor with environment variables of its own (inherited by its pagers).
    pub async fn start_with_env(opts: SupervisorOptions, env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in_with_env(dir, &testkit::binary("uffd-supervisor"), opts, env).await
    }

    /// Starts `supervisor` (this build's, or a wrapper that execs it) in `dir`.
    pub async fn start_in(
        dir: tempfile::TempDir,
        supervisor: &Path,
        opts: SupervisorOptions,
    ) -> Self {
        Self::start_in_with_env(dir, supervisor, opts, &[]).await
    }

    async fn start_in_with_env(
        dir: tempfile::TempDir,
        supervisor: &Path,
        mut opts: SupervisorOptions,
        env: &[(&str, &str)],
    ) -> Self {
        opts.pager_binary.get_or_insert_with(|| testkit::binary("uffd-pager"));
        opts.show_logs = true;
        let env: Vec<(&str, &str)> =
            [PAGER_LINGER].into_iter().chain(env.iter().copied()).collect();
        let sup =
            SupervisorProcess::start_with_env(supervisor, &dir.path().join("run"), &opts, &env)
                .await
                .expect("supervisor starts");
        Self { dir, sup: Some(sup) }
    }

    /// [`Env::start_with`], the supervisor's log going to the file `log` (to read it back).
    pub async fn start_logging_to(mut opts: SupervisorOptions, log: &Path) -> Self {
        let dir = tempfile::tempdir().unwrap();
        opts.pager_binary.get_or_insert_with(|| testkit::binary("uffd-pager"));
        let sup = SupervisorProcess::start_logging_to(
            &testkit::binary("uffd-supervisor"),
            &dir.path().join("run"),
            &opts,
            log,
        )
        .await
        .unwrap_or_else(|e| {
            panic!("supervisor starts: {e}\n{}", std::fs::read_to_string(log).unwrap_or_default())
        });
        Self { dir, sup: Some(sup) }
    }

    pub fn sup(&self) -> &SupervisorProcess {
        self.sup.as_ref().expect("supervisor running")
    }

    pub fn client(&self) -> SupervisorClient<Channel> {
        self.sup().client()
    }

    pub fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    /// A memory file in the test's directory.
    pub fn memfile(&self, name: &str, size: u64, zero: f64, holes: f64) -> PathBuf {
        let path = self.dir.path().join(name);
        let spec =
            MemoryFileSpec { size, seed: size ^ 0x5eed, zero_fraction: zero, hole_fraction: holes };
        write_memory_file(&path, &spec).expect("memory file written");
        path
    }

    pub async fn create(&self, id: &str, memfile: &Path) -> Session {
        self.client()
            .create_session(CreateSessionRequest {
                session_id: id.into(),
                memory_file: memfile.display().to_string(),
                labels: Default::default(),
                ..Default::default()
            })
            .await
            .expect("CreateSession")
            .into_inner()
    }

    /// Creates a session and restores a simulated VM through it (regions as `uffd-vmsim
    /// --region` arguments; none: one region covering the file).
    pub async fn restore(&self, id: &str, memfile: &Path, regions: &[&str]) -> VmProcess {
        let s = self.create(id, memfile).await;
        let socket = PathBuf::from(s.socket_path);
        let memfile = memfile.to_path_buf();
        let regions: Vec<String> = regions.iter().map(|r| r.to_string()).collect();
        let vm = tokio::task::spawn_blocking(move || {
            let r: Vec<&str> = regions.iter().map(String::as_str).collect();
            VmProcess::restore(&testkit::binary("uffd-vmsim"), &socket, &memfile, &r, STEP)
        })
        .await
        .unwrap()
        .expect("VM restores");
        self.wait_state(id, SessionState::Serving).await;
        vm
    }

    /// CompleteSession, which must graduate the session; returns the answer.
    pub async fn graduate(&self, id: &str) -> uffdpager::api::CompleteSessionResponse {
        let done = self
            .client()
            .complete_session(uffdpager::api::CompleteSessionRequest { session_id: id.into() })
            .await
            .unwrap_or_else(|e| panic!("CompleteSession {id}: {e:?}"))
            .into_inner();
        assert_eq!(done.session.as_ref().unwrap().state(), SessionState::Graduated, "{done:?}");
        done
    }

    pub async fn get(&self, id: &str) -> Session {
        self.client()
            .get_session(GetSessionRequest { session_id: id.into() })
            .await
            .expect("GetSession")
            .into_inner()
    }

    /// Waits (at most a minute) until the session is in `state`.
    pub async fn wait_state(&self, id: &str, state: SessionState) -> Session {
        let deadline = Instant::now() + STEP;
        loop {
            let s = self.get(id).await;
            if s.state() == state {
                return s;
            }
            assert!(Instant::now() < deadline, "session {id} never reached {state:?}: {s:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The gRPC socket of the one pager process running.
    pub fn pager_socket(&self) -> PathBuf {
        let dir = self.run_dir().join("pagers");
        let mut found: Vec<PathBuf> = std::fs::read_dir(&dir)
            .expect("pagers dir")
            .flatten()
            .map(|e| e.path().join("grpc.sock"))
            .filter(|p| p.exists())
            .collect();
        assert_eq!(found.len(), 1, "one pager expected: {found:?}");
        found.pop().unwrap()
    }

    /// The one pager's GetMetrics, asked on its own socket.
    pub async fn pager_metrics(&self) -> uffdpager::api::PagerMetrics {
        let channel = uffdpager::grpc::uds_channel(&self.pager_socket());
        uffdpager::api::pager_client::PagerClient::new(channel)
            .get_metrics(uffdpager::api::GetMetricsRequest {})
            .await
            .expect("the pager's GetMetrics")
            .into_inner()
    }

    /// Pid of the one pager child.
    pub fn pager_pid(&self) -> i32 {
        let pids = testkit::pager_pids(&self.run_dir());
        assert_eq!(pids.len(), 1, "one pager expected: {pids:?}");
        pids[0]
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(sup) = self.sup.take() {
            // Kill the supervisor and its pagers: a test leaves no process behind.
            let dir = sup.runtime_dir.clone();
            drop(sup);
            for pid in testkit::pager_pids(&dir) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// Number of open fds of a process.
/// A pager of this build run with `flags` added: a script in `dir` to give the supervisor as
/// its `--pager-binary`.
pub fn pager_with_flags(dir: &Path, flags: &str) -> PathBuf {
    let pager = dir.join("pager");
    let script =
        format!("#!/bin/sh\nexec '{}' \"$@\" {flags}\n", testkit::binary("uffd-pager").display());
    std::fs::write(&pager, script).unwrap();
    std::fs::set_permissions(&pager, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    pager
}

pub fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// Runs a blocking VM command off the async runtime.
pub async fn vm_cmd(vm: &mut VmProcess, cmd: &str) -> serde_json::Value {
    tokio::task::block_in_place(|| vm.verified(cmd, STEP)).unwrap_or_else(|e| panic!("{cmd}: {e}"))
}

/// Threads the supervisor may hold beyond a baseline taken with no session: tokio's blocking
/// pool grows by a thread per blocking operation running at once (memory-file opens,
/// handshakes, and the `tokio::fs` reads of its follower of each pager's log file, every few
/// hundred milliseconds) and, kept warm by those followers, may not shrink back while they run.
/// It is bounded, not per session: a thread leaked per session still shows, above all where
/// twenty sessions come and go (`tests/shared_page_cache.rs`).
pub const SUPERVISOR_THREAD_SLACK: usize = 4;

/// Waits (at most a minute, polling) until process `pid` holds no more than `baseline` (plus
/// `thread_slack` threads) and none of `files` (see `Holdings::within`); returns what it holds
/// then. A process that exited holds nothing (`None`).
pub async fn wait_holdings_within(
    who: &str,
    pid: i32,
    baseline: &testkit::procfs::Holdings,
    thread_slack: usize,
    files: &[&Path],
) -> Option<testkit::procfs::Holdings> {
    let deadline = Instant::now() + STEP;
    loop {
        let Ok(now) = testkit::procfs::holdings(pid, files) else {
            return None; // exited
        };
        if now.within(baseline, thread_slack) {
            return Some(now);
        }
        assert!(
            Instant::now() < deadline,
            "{who} (pid {pid}) still holds more than before the VMs: now {now:?}, before \
             {baseline:?}; threads now: {:?}",
            testkit::procfs::thread_names(pid)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What process `pid` holds now (it must be running).
pub fn holdings(pid: i32, files: &[&Path]) -> testkit::procfs::Holdings {
    testkit::procfs::holdings(pid, files).unwrap_or_else(|e| panic!("reading /proc/{pid}: {e}"))
}

/// Runs a VM command with its own deadline, failing with `what` if it does not answer in time.
pub async fn vm_cmd_within(
    vm: &mut VmProcess,
    cmd: &str,
    limit: Duration,
    what: &str,
) -> serde_json::Value {
    tokio::task::block_in_place(|| vm.verified(cmd, limit))
        .unwrap_or_else(|e| panic!("{what}: `{cmd}` failed: {e}"))
}

/// Runs a grpcurl command line through `sh`; fails the test with its output unless it succeeds.
pub fn grpcurl(args: &str) -> String {
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(args)
        .output()
        .expect("grpcurl runs (scripts/setup.sh installs it)");
    assert!(
        out.status.success(),
        "{args}\nexit {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// DeployVersion of `binary` as `label`.
pub async fn deploy(
    env: &Env,
    binary: &Path,
    label: &str,
) -> Result<uffdpager::api::PagerVersion, tonic::Status> {
    env.client()
        .deploy_version(uffdpager::api::DeployVersionRequest {
            binary_path: binary.display().to_string(),
            version: label.into(),
        })
        .await
        .map(tonic::Response::into_inner)
}
