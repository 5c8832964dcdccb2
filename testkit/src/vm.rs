//! A simulated VM (`uffd-vmsim run`) in a child process, steered line by line.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::Duration;

use serde_json::Value;

/// The lines a child writes to its piped stdout, read by a thread of their own, so that a
/// caller can wait for the next one with a timeout (`recv_timeout`). Disconnected once the
/// child closes its stdout.
pub fn stdout_lines(child: &mut Child) -> Receiver<String> {
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    lines
}

#[derive(Debug, thiserror::Error)]
pub enum VmProcessError {
    #[error("starting uffd-vmsim: {0}")]
    Spawn(std::io::Error),
    #[error(
        "uffd-vmsim did not answer {cmd:?} within {timeout:?} (a page left unserved?); its \
         threads: {threads}"
    )]
    Timeout { cmd: String, timeout: Duration, threads: String },
    #[error("uffd-vmsim exited before answering {0:?}")]
    Exited(String),
    #[error("uffd-vmsim answered {cmd:?} with something that is not JSON: {line}")]
    NotJson { cmd: String, line: String },
    #[error("uffd-vmsim refused {cmd:?}: {error}")]
    Refused { cmd: String, error: String },
    #[error("writing to uffd-vmsim: {0}")]
    Write(std::io::Error),
}

/// A VM restored through `socket`, steered over stdin/stdout. Killed on drop.
#[derive(Debug)]
pub struct VmProcess {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    pub pid: u32,
    /// The first line: `{"ok":true,"cmd":"restored",...}`.
    pub restored: Value,
}

impl VmProcess {
    /// Starts `uffd-vmsim run --socket S --memory-file M <region args>` and waits (at most
    /// `timeout`) until it has restored.
    pub fn restore(
        vmsim: &Path,
        socket: &Path,
        memory_file: &Path,
        regions: &[&str],
        timeout: Duration,
    ) -> Result<Self, VmProcessError> {
        Self::restore_with_args(vmsim, socket, memory_file, regions, &[], &[], timeout)
    }

    /// Like [`VmProcess::restore`], expecting overlays (`--overlay OFFSET:FILE` each).
    pub fn restore_with_overlays(
        vmsim: &Path,
        socket: &Path,
        memory_file: &Path,
        regions: &[&str],
        overlays: &[(u64, &Path)],
        timeout: Duration,
    ) -> Result<Self, VmProcessError> {
        Self::restore_with_args(vmsim, socket, memory_file, regions, overlays, &[], timeout)
    }

    /// As [`VmProcess::restore_with_overlays`], with more `uffd-vmsim run` arguments
    /// (`--handshake-padding`).
    pub fn restore_with_args(
        vmsim: &Path,
        socket: &Path,
        memory_file: &Path,
        regions: &[&str],
        overlays: &[(u64, &Path)],
        args: &[&str],
        timeout: Duration,
    ) -> Result<Self, VmProcessError> {
        let mut cmd = Self::restore_command(vmsim, socket, memory_file, regions);
        for (offset, file) in overlays {
            cmd.arg("--overlay").arg(format!("{offset}:{}", file.display()));
        }
        cmd.args(args);
        Self::start(cmd, timeout)
    }

    /// The command line of [`VmProcess::restore`], to adjust (e.g. the uid it runs as) before
    /// [`VmProcess::start`].
    pub fn restore_command(
        vmsim: &Path,
        socket: &Path,
        memory_file: &Path,
        regions: &[&str],
    ) -> Command {
        let mut cmd = Command::new(vmsim);
        cmd.arg("run").arg("--socket").arg(socket).arg("--memory-file").arg(memory_file);
        for r in regions {
            cmd.arg("--region").arg(r);
        }
        cmd
    }

    /// Starts a `uffd-vmsim run` command line and waits (at most `timeout`) until it has
    /// restored.
    pub fn start(mut cmd: Command, timeout: Duration) -> Result<Self, VmProcessError> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(VmProcessError::Spawn)?;
        let lines = stdout_lines(&mut child);
        let pid = child.id();
        let stdin = child.stdin.take();
        let mut vm = Self { child, stdin, lines, pid, restored: Value::Null };
        vm.restored = vm.answer("restore", timeout)?;
        Ok(vm)
    }

    fn answer(&mut self, cmd: &str, timeout: Duration) -> Result<Value, VmProcessError> {
        let line = match self.lines.recv_timeout(timeout) {
            Ok(l) => l,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let threads = threads_of(self.pid);
                return Err(VmProcessError::Timeout { cmd: cmd.into(), timeout, threads });
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(VmProcessError::Exited(cmd.into()))
            }
        };
        let v: Value = serde_json::from_str(&line)
            .map_err(|_| VmProcessError::NotJson { cmd: cmd.into(), line: line.clone() })?;
        if v["ok"] != Value::Bool(true) {
            return Err(VmProcessError::Refused {
                cmd: cmd.into(),
                error: v["error"].as_str().unwrap_or("no error text").to_string(),
            });
        }
        Ok(v)
    }

    /// Sends one command and waits (at most `timeout`) for its JSON answer.
    pub fn command(&mut self, cmd: &str, timeout: Duration) -> Result<Value, VmProcessError> {
        let stdin = self.stdin.as_mut().ok_or_else(|| VmProcessError::Exited(cmd.into()))?;
        writeln!(stdin, "{cmd}").and_then(|()| stdin.flush()).map_err(VmProcessError::Write)?;
        self.answer(cmd, timeout)
    }

    /// Sends a command and returns its `report`, failing if it counted any mismatch.
    pub fn verified(&mut self, cmd: &str, timeout: Duration) -> Result<Value, VmProcessError> {
        let v = self.command(cmd, timeout)?;
        let report = v["report"].clone();
        if report["mismatches"].as_u64().unwrap_or(0) != 0 {
            return Err(VmProcessError::Refused {
                cmd: cmd.into(),
                error: format!("memory mismatches: {report}"),
            });
        }
        Ok(report)
    }

    /// Waits (at most `timeout`, polling) for the simulator to exit on its own or be killed;
    /// `None` if it still runs then.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Ends the VM: closes stdin (the simulator exits, closing its socket) and reaps it.
    pub fn exit(mut self) -> std::io::Result<std::process::ExitStatus> {
        drop(self.stdin.take());
        self.child.wait()
    }
}

impl Drop for VmProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where each thread of process `pid` waits, as the kernel says (`/proc/<pid>/task/<tid>/`:
/// `comm`, `wchan` and the innermost frames of `stack`): what a frozen VM is blocked in, a
/// fault nobody serves (`handle_userfault`) or a REMOVE nobody reads
/// (`userfaultfd_event_wait_completion`).
fn threads_of(pid: u32) -> String {
    let read = |path: std::path::PathBuf| std::fs::read_to_string(path).unwrap_or_default();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return format!("(process {pid} is gone)");
    };
    let mut out = Vec::new();
    for task in tasks.flatten() {
        let dir = task.path();
        let stack: Vec<String> = read(dir.join("stack"))
            .lines()
            .take(6)
            .filter_map(|l| l.split_whitespace().nth(1).map(str::to_string))
            .collect();
        out.push(format!(
            "{} {} wchan={} stack=[{}]",
            task.file_name().to_string_lossy(),
            read(dir.join("comm")).trim(),
            read(dir.join("wchan")).trim(),
            stack.join(" < ")
        ));
    }
    let registered = crate::smaps::uffd_registered_vmas(pid)
        .map_or_else(|e| format!("unknown ({e})"), |n| n.to_string());
    format!("{}; uffd-registered VMAs: {registered}", out.join("; "))
}
