//! The VMs of the peer comparison: `uffd-vmsim run` processes, one per VM, driven over their
//! stdin/stdout (one JSON line per command). A separate process for every contender alike:
//! Firecracker's example handlers kill the process on the other end of their socket when they
//! panic (they do once their VMM leaves), so their VMM must never be this benchmark.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use vmsim::Report;

/// Seconds `uffd-vmsim` gives any one command before it exits with an error line: a contender
/// that stops serving fails the repetition instead of hanging the benchmark.
const COMMAND_TIMEOUT_S: u32 = 300;

/// One `uffd-vmsim run` process, restored (its handshake sent); killed and reaped on drop.
#[derive(Debug)]
pub struct VmProc {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl VmProc {
    /// Starts a VM of `memory_file`'s size on `socket` and waits for its `restored` line.
    pub fn restore(vmsim: &Path, socket: &Path, memory_file: &Path) -> anyhow::Result<Self> {
        let mut child = Command::new(vmsim)
            .arg("run")
            .arg("--socket")
            .arg(socket)
            .arg("--memory-file")
            .arg(memory_file)
            .arg("--command-timeout")
            .arg(COMMAND_TIMEOUT_S.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", vmsim.display()))?;
        let stdin = child.stdin.take().context("the VM's stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("the VM's stdout")?);
        let mut vm = Self { child, stdin, stdout };
        let line = vm.line().context("waiting for the VM to restore")?;
        if !line.contains("\"restored\"") {
            bail!("the VM did not restore: {line}");
        }
        Ok(vm)
    }

    fn line(&mut self) -> anyhow::Result<String> {
        let mut line = String::new();
        let n = self.stdout.read_line(&mut line).context("reading the VM's stdout")?;
        if n == 0 {
            let status = self.child.try_wait().ok().flatten();
            bail!("the VM exited (status {status:?})");
        }
        Ok(line)
    }

    /// Sends one command line (`random 4000 7`, `seq`).
    pub fn send(&mut self, command: &str) -> anyhow::Result<()> {
        writeln!(self.stdin, "{command}")
            .and_then(|()| self.stdin.flush())
            .context("writing to the VM's stdin")
    }

    /// The report answering the last command; an error if it failed or read wrong bytes.
    pub fn report(&mut self) -> anyhow::Result<Report> {
        let line = self.line()?;
        let v: serde_json::Value =
            serde_json::from_str(&line).with_context(|| format!("the VM said {line:?}"))?;
        if v["ok"] != serde_json::json!(true) {
            bail!("the VM's command failed: {}", line.trim());
        }
        let report: Report = serde_json::from_value(v["report"].clone())
            .with_context(|| format!("no report in {line:?}"))?;
        if report.mismatches > 0 {
            bail!("the VM read wrong bytes: {:?}", report.first_mismatches);
        }
        Ok(report)
    }

    /// Runs one command and returns its report.
    pub fn run(&mut self, command: &str) -> anyhow::Result<Report> {
        self.send(command)?;
        self.report()
    }
}

impl Drop for VmProc {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "exit");
        let _ = self.stdin.flush();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Firecracker example handler serving one VM (`HANDLER SOCKET MEMORY_FILE`); killed on drop.
#[derive(Debug)]
pub struct PeerHandler {
    child: Child,
    pub socket: PathBuf,
}

impl PeerHandler {
    /// Starts `binary` on a new socket in `dir` and waits until the socket listens.
    pub fn start(binary: &Path, dir: &Path, memory_file: &Path) -> anyhow::Result<Self> {
        let socket = dir.join(format!("peer-{}.sock", unique()));
        let child = Command::new(binary)
            .arg(&socket)
            .arg(memory_file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let mut handler = Self { child, socket };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !listening(&handler.socket) {
            if let Ok(Some(status)) = handler.child.try_wait() {
                bail!("{} exited with {status} before listening", binary.display());
            }
            if Instant::now() > deadline {
                bail!("{} did not listen on {}", binary.display(), handler.socket.display());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(handler)
    }
}

impl Drop for PeerHandler {
    /// Killed before its VM leaves: the handler panics once its VMM hangs up, and its panic
    /// hook kills that VMM's pid.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Whether a Unix socket bound at `path` is listening (`/proc/net/unix`: flag `__SO_ACCEPTCON`).
/// Connecting to find out would take the handler's one accept.
fn listening(path: &Path) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else { return false };
    let want = path.to_string_lossy();
    table.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() >= 8 && f[7] == want && f[3] == "00010000"
    })
}

fn unique() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listening_socket_is_found_in_proc_net_unix_and_an_absent_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        assert!(!listening(&path));
        let _l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        assert!(listening(&path));
    }
}
