//! One pager process: started, watched until healthy (`pager_ready.rs`), its log (stderr,
//! written to a file) forwarded line by line (the last lines kept for error messages), reaped
//! when it exits, stopped gracefully on request (`pager_stop.rs`). A pager found running by a
//! restarted supervisor (not its child) is watched and signalled through a pidfd instead
//! (`pidfd.rs`, `recover.rs`).
//!
//! Children are started in their own process group with `kill_on_drop(false)`: a Ctrl-C to the
//! supervisor's terminal or the supervisor's own exit must not take the pagers down with it, since
//! every VM they serve would freeze on its next page fault. Once a pager exits, whatever is left
//! of its group is stopped too (`process_group.rs`): a failed deploy or a stopped version leaves
//! no process behind.

use std::io;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use nix::sys::signal::Signal;
use tokio::process::Command;
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::transport::Channel;
use tracing::{debug, info, warn};
use uffdpager::api::pager_client::PagerClient;

use crate::pager_exit::{Exit, PagerError};
use crate::pager_paths::PagerPaths;
use crate::pager_stderr::{follow_log, LastWords, LogSource};
use crate::pidfd::PidFd;

/// Deadline of one call made while starting or stopping a pager.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// A running (or exited) pager child.
#[derive(Debug)]
pub struct PagerProcess {
    pub version: String,
    pub pid: u32,
    pub paths: PagerPaths,
    pub started_at: SystemTime,
    pub started: Instant,
    channel: Channel,
    last_words: LastWords,
    exit: watch::Receiver<Option<Exit>>,
    /// It has exited: its pid may name another process now.
    reaped: Arc<AtomicBool>,
    pidfd: Option<Arc<PidFd>>,
    /// Why the supervisor killed it, if it did (its exit is reported with this).
    kill_reason: std::sync::Mutex<Option<String>>,
}

impl PagerProcess {
    /// Starts `binary` as pager `version` and waits until its health check says SERVING.
    /// On failure the child is killed and reaped, and the error carries its last words.
    pub async fn start(
        version: &str,
        binary: &Path,
        args: &[String],
        paths: PagerPaths,
        ready_timeout: Duration,
    ) -> Result<Arc<Self>, PagerError> {
        let prepare = |path: &Path| {
            let path = path.display().to_string();
            move |source| PagerError::Prepare { path, source }
        };
        crate::runtime_dir::ensure_private_dir(&paths.dir)
            .map_err(|e| prepare(&paths.dir)(io::Error::other(e.to_string())))?;
        // A stale socket would answer the health check for a process that is not this one.
        for p in [&paths.grpc_socket, &paths.handoff_socket] {
            match std::fs::remove_file(p) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(prepare(p)(e)),
                _ => {}
            }
        }
        let log = open_log(&paths.log_file).map_err(prepare(&paths.log_file))?;
        let mut child = Command::new(binary)
            .arg("--grpc-socket")
            .arg(&paths.grpc_socket)
            .arg("--handoff-socket")
            .arg(&paths.handoff_socket)
            .arg("--version-label")
            .arg(version)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .kill_on_drop(false)
            .process_group(0)
            .spawn()
            .map_err(|source| PagerError::Spawn { binary: binary.display().to_string(), source })?;
        let pid = child.id().unwrap_or(0);
        info!(version = %version, pid, binary = %binary.display(), "pager started");
        // Opened before the child can be reaped, so it names this child and no other process.
        let pidfd = match PidFd::open(pid) {
            Ok(fd) => Some(Arc::new(fd)),
            Err(e) => {
                debug!(version = %version, pid, error = %e, "no pidfd: signals go by pid");
                None
            }
        };

        let last_words = LastWords::default();
        let (gone_tx, gone) = watch::channel(false);
        let source =
            LogSource { version: version.to_string(), pid, last_words: last_words.clone() };
        let follower = tokio::spawn(follow_log(paths.log_file.clone(), 0, source, gone));
        let (exit_tx, exit) = watch::channel(None);
        let reaped = Arc::new(AtomicBool::new(false));
        {
            let (last_words, reaped) = (last_words.clone(), reaped.clone());
            let (watched, version) = (pidfd.clone(), version.to_string());
            tokio::spawn(async move {
                // Seen exited through its pidfd but not yet reaped (a zombie keeps its pid, the
                // group's id, from being reused): the rest of its group is stopped first.
                if let Some(pidfd) = watched {
                    pidfd.wait_exit().await;
                    crate::process_group::sweep(&version, pid).await;
                }
                let status = child.wait().await;
                reaped.store(true, Ordering::SeqCst);
                gone_tx.send_replace(true);
                let _ = tokio::time::timeout(CALL_TIMEOUT, follower).await;
                let status = match status {
                    Ok(s) => s.to_string(),
                    Err(e) => format!("waiting for it failed: {e}"),
                };
                let last_words = last_words.get();
                let _ = exit_tx.send(Some(Exit { status, last_words }));
            });
        }

        let process = Arc::new(Self {
            version: version.to_string(),
            pid,
            channel: uffdpager::grpc::uds_channel(&paths.grpc_socket),
            paths,
            started_at: SystemTime::now(),
            started: Instant::now(),
            last_words,
            exit,
            reaped,
            pidfd,
            kill_reason: Default::default(),
        });
        let written = crate::runtime_dir::create_private_file(&process.paths.pid_file, false)
            .and_then(|mut f| std::io::Write::write_all(&mut f, format!("{pid}\n").as_bytes()));
        if let Err(e) = written {
            warn!(
                version = %version,
                pid,
                path = %process.paths.pid_file.display(),
                error = %e,
                "cannot write the pid file",
            );
        }
        if let Err(e) = process.wait_ready(ready_timeout).await {
            process.kill().await;
            process.paths.remove_files();
            return Err(e);
        }
        info!(version = %version, pid, "pager is ready");
        Ok(process)
    }

    /// A pager left running by an earlier supervisor (see `recover.rs`): not a child of this
    /// one, so it is watched through its pidfd instead of reaped, and its log is followed from
    /// its current end. `started_at` is what the pager reports.
    pub fn recovered(
        version: &str,
        pidfd: PidFd,
        paths: PagerPaths,
        started_at: SystemTime,
    ) -> Arc<Self> {
        let pid = pidfd.pid();
        let pidfd = Arc::new(pidfd);
        let last_words = LastWords::default();
        let (gone_tx, gone) = watch::channel(false);
        let from = std::fs::metadata(&paths.log_file).map_or(0, |m| m.len());
        let source =
            LogSource { version: version.to_string(), pid, last_words: last_words.clone() };
        let follower = tokio::spawn(follow_log(paths.log_file.clone(), from, source, gone));
        let (exit_tx, exit) = watch::channel(None);
        let reaped = Arc::new(AtomicBool::new(false));
        {
            let (last_words, reaped, pidfd) = (last_words.clone(), reaped.clone(), pidfd.clone());
            let version = version.to_string();
            tokio::spawn(async move {
                pidfd.wait_exit().await;
                // Not our child: init may have reaped it already; what is left of its group still
                // keeps the group's id from being reused.
                crate::process_group::sweep(&version, pid).await;
                reaped.store(true, Ordering::SeqCst);
                gone_tx.send_replace(true);
                let _ = tokio::time::timeout(CALL_TIMEOUT, follower).await;
                let status = "exited (its status is unknown: it is not a child of this supervisor \
                              run, which found it running at startup)"
                    .to_string();
                let _ = exit_tx.send(Some(Exit { status, last_words: last_words.get() }));
            });
        }
        Arc::new(Self {
            version: version.to_string(),
            pid,
            channel: uffdpager::grpc::uds_channel(&paths.grpc_socket),
            paths,
            started_at,
            started: Instant::now(),
            last_words,
            exit,
            reaped,
            pidfd: Some(pidfd),
            kill_reason: Default::default(),
        })
    }

    /// The channel to the pager's gRPC socket (for its health service too).
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// Records why the supervisor is about to kill it.
    pub fn set_kill_reason(&self, reason: String) {
        *self.kill_reason.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
    }

    /// Why the supervisor killed it, if it did.
    pub fn kill_reason(&self) -> Option<String> {
        self.kill_reason.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// A client of the pager's gRPC API.
    pub fn client(&self) -> PagerClient<Channel> {
        PagerClient::new(self.channel.clone())
    }

    /// True once it has exited, even if its exit has not been taken in yet (its pidfd says so
    /// at once; the reaping and `exit` follow a moment later).
    pub fn has_exited(&self) -> bool {
        self.exit.borrow().is_some() || self.pidfd.as_ref().is_some_and(|p| p.has_exited())
    }

    /// How it exited, if it did.
    pub fn exit(&self) -> Option<Exit> {
        self.exit.borrow().clone()
    }

    /// Waits until it has exited (and been reaped).
    pub async fn wait_exit(&self) -> Exit {
        let mut rx = self.exit.clone();
        let exit = rx.wait_for(Option::is_some).await.ok().and_then(|e| e.clone());
        exit.unwrap_or_else(|| self.unknown_exit())
    }

    fn unknown_exit(&self) -> Exit {
        Exit { status: "unknown exit (its waiter stopped)".into(), last_words: self.last_words() }
    }

    /// Its exit as it is taken in (None until then), to wait on.
    pub fn exit_changes(&self) -> watch::Receiver<Option<Exit>> {
        self.exit.clone()
    }

    /// Its last lines on stderr.
    pub fn last_words(&self) -> Vec<String> {
        self.last_words.get()
    }

    /// Sends `signal`, through its pidfd if it has one; never once it has been reaped.
    pub fn signal(&self, signal: Signal) {
        // Once it has exited, the pid may belong to another process: never signal it then.
        if self.reaped.load(Ordering::SeqCst) {
            return;
        }
        if let Some(pidfd) = &self.pidfd {
            if let Err(e) = pidfd.send_signal(signal) {
                debug!(version = %self.version, pid = self.pid, %signal, error = %e, "signal not delivered");
            }
            return;
        }
        let Ok(pid) = i32::try_from(self.pid) else { return };
        if pid <= 0 {
            return;
        }
        if let Err(e) = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal) {
            debug!(version = %self.version, pid, %signal, error = %e, "signal not delivered");
        }
    }
}

/// Opens (afresh) the pager's log file, in append mode, for its stderr; never through a symlink.
fn open_log(path: &Path) -> io::Result<std::fs::File> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    crate::runtime_dir::create_private_file(path, true)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[tokio::test]
    async fn a_child_that_dies_at_once_is_reported_with_its_last_words() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("pager");
        std::fs::write(&p, "#!/bin/sh\necho 'cannot bind socket' >&2\nexit 7\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        let paths = PagerPaths::new(d.path(), "v1");
        let err =
            PagerProcess::start("v1", &p, &[], paths, Duration::from_secs(5)).await.unwrap_err();
        let text = err.to_string();
        assert!(text.contains("exited before it was ready"), "{text}");
        assert!(text.contains("exit status: 7") && text.contains("cannot bind socket"), "{text}");
    }

    #[tokio::test]
    async fn a_child_that_never_gets_healthy_is_killed_after_the_deadline() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("pager");
        std::fs::write(&p, "#!/bin/sh\necho 'starting slowly' >&2\nexec sleep 30\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        let paths = PagerPaths::new(d.path(), "v1");
        let err = PagerProcess::start("v1", &p, &[], paths.clone(), Duration::from_millis(300))
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("was not healthy within"), "{text}");
        assert!(text.contains("starting slowly"), "{text}");
        assert!(!paths.pid_file.exists());
    }
}
