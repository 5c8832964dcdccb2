//! What the hostile-case tests share: VMMs that connect and say nothing (in a child process of
//! their own, `uffd-vmsim silent`), a supervisor started under a descriptor limit, commands run
//! as another user, and what `/proc` says of a process (CPU time, threads, limits, liveness).

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The unprivileged user the planted-directory tests act as.
pub const NOBODY: u32 = 65534;

/// `uffd-vmsim silent`: one process holding a connection to each socket, sending nothing.
/// Killed on drop (which closes every connection).
pub struct SilentVmms {
    child: Child,
    pub pid: u32,
}

impl SilentVmms {
    /// Connects to every socket; returns once all are connected.
    pub fn connect(sockets: &[PathBuf]) -> Self {
        let mut child = Command::new(testkit::binary("uffd-vmsim"))
            .arg("silent")
            .args(sockets)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("uffd-vmsim silent starts");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(120)).expect("uffd-vmsim silent answers");
        let v: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|_| panic!("uffd-vmsim silent said {line:?}"));
        assert_eq!(v["connected"].as_u64(), Some(sockets.len() as u64), "{v}");
        let pid = child.id();
        Self { child, pid }
    }
}

impl Drop for SilentVmms {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// CPU time (user + system) process `pid` has used, in seconds (`/proc/<pid>/stat`).
pub fn cpu_seconds(pid: u32) -> f64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("the process runs");
    let rest = text.rsplit_once(')').expect("a stat line").1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the command name: state is field 3, utime 14 and stime 15 (proc(5)).
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100);
    ticks as f64 / hz as f64
}

/// Threads of process `pid` (`/proc/<pid>/task`).
pub fn threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task")).map(|d| d.count()).unwrap_or(0)
}

/// The soft and hard "Max open files" of process `pid` (`/proc/<pid>/limits`).
pub fn nofile_limits(pid: u32) -> (String, String) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("the process runs");
    let line = text.lines().find(|l| l.starts_with("Max open files")).expect("a nofile line");
    let mut values = line["Max open files".len()..].split_whitespace();
    (values.next().unwrap().to_string(), values.next().unwrap().to_string())
}

/// True while `pid` runs (a zombie does not run: it holds nothing).
pub fn running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|t| t.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next()))
        .is_some_and(|state| state != 'Z' && state != 'X')
}

/// A wrapper that starts this build's supervisor under an `RLIMIT_NOFILE` of `soft`:`hard`.
pub fn supervisor_with_nofile(dir: &Path, soft: u64, hard: u64) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("limited-supervisor");
    let body = format!(
        "#!/bin/sh\nulimit -S -n {soft} && ulimit -H -n {hard} || exit 97\nexec {} \"$@\"\n",
        testkit::binary("uffd-supervisor").display()
    );
    std::fs::write(&path, body).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// Runs `script` with `sh -c` as uid and gid [`NOBODY`]; fails the test unless it succeeds.
pub fn as_nobody(script: &str) {
    let out =
        Command::new("sh").arg("-c").arg(script).uid(NOBODY).gid(NOBODY).output().expect("sh runs");
    assert!(
        out.status.success(),
        "as uid {NOBODY}: {script}\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Kills the processes whose pids `files` name, at the end of a test whatever its outcome: a
/// test that finds a leak must not leave it running.
pub struct KillPidFiles(pub Vec<PathBuf>);

impl Drop for KillPidFiles {
    fn drop(&mut self) {
        for f in &self.0 {
            if let Some(pid) = std::fs::read_to_string(f).ok().and_then(|s| s.trim().parse().ok()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}
