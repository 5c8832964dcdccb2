//! The `uffd-vmsim` binary's command line and line protocol, checked without a pager: a test
//! listener takes the handshake itself and commands that would touch guest memory are only used
//! where a fault left unserved is the point (the command timeout).

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use uffdpager::firecracker::recv_handshake;
use vmsim::Reply;

fn vmsim_binary() -> std::path::PathBuf {
    testkit::binary("uffd-vmsim")
}
const WAIT: Duration = Duration::from_secs(30);

/// A running `uffd-vmsim run`, its stdout read line by line on a thread (so a test never hangs).
struct Sim {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

impl Sim {
    fn start(args: &[&str]) -> Sim {
        let mut child = Command::new(vmsim_binary())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Sim { child, stdin, lines }
    }

    fn reply(&self) -> Reply {
        let line = self.lines.recv_timeout(WAIT).expect("a reply line");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not a reply: {line:?}: {e}"))
    }

    fn send(&mut self, line: &str) -> Reply {
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
        self.reply()
    }

    /// Waits for the child to exit, with a deadline.
    fn status(mut self) -> i32 {
        drop(self.stdin.take());
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(self.child.wait());
        });
        rx.recv_timeout(WAIT).expect("child exits").unwrap().code().unwrap_or(-1)
    }
}

fn make_memfile(path: &Path, size: &str) {
    let out = Command::new(vmsim_binary())
        .args(["make-memfile", path.to_str().unwrap(), "--size", size, "--seed", "5"])
        .stderr(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.lines().count(), 1, "{text}");
    let line: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(line["ok"], true);
    assert_eq!(line["cmd"], "make-memfile");
}

#[test]
fn make_memfile_writes_the_file_and_prints_one_json_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mem");
    make_memfile(&path, "1M");
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 1 << 20);
    let out = Command::new(vmsim_binary())
        .args(["make-memfile", path.to_str().unwrap(), "--size", "4097"])
        .stderr(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let reply: Reply = serde_json::from_slice(&out.stdout).unwrap();
    assert!(!reply.ok && reply.error.unwrap().contains("multiple of 4096"));
}

#[test]
fn a_restore_with_no_pager_listening_fails_with_one_error_line() {
    let dir = tempfile::tempdir().unwrap();
    let mem = dir.path().join("mem");
    make_memfile(&mem, "1M");
    let sock = dir.path().join("none.sock");
    let sim = Sim::start(&[
        "run",
        "--socket",
        sock.to_str().unwrap(),
        "--memory-file",
        mem.to_str().unwrap(),
    ]);
    let reply = sim.reply();
    assert_eq!((reply.ok, reply.cmd.as_str()), (false, "restored"));
    assert!(reply.error.unwrap().contains("connecting"));
    assert_eq!(sim.status(), 1);
}

#[test]
fn run_sends_the_handshake_answers_each_line_and_closes_the_socket_at_exit() {
    let dir = tempfile::tempdir().unwrap();
    let mem = dir.path().join("mem");
    make_memfile(&mem, "1M");
    let sock = dir.path().join("vm.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let (s, m) = (sock.to_str().unwrap(), mem.to_str().unwrap());
    let mut sim = Sim::start(&[
        "run",
        "--socket",
        s,
        "--memory-file",
        m,
        "--region",
        "512K",
        "--region",
        "256K@768K",
    ]);
    let restored = sim.reply();
    assert!(restored.ok && restored.cmd == "restored", "{restored:?}");
    assert_eq!(restored.pid, Some(sim.child.id()));
    assert_eq!(restored.pages, Some(192));
    let (stream, _) = listener.accept().unwrap();
    let hs = recv_handshake(stream.as_fd(), 1 << 20).unwrap();
    assert_eq!(hs.vmm_pid, sim.child.id());
    let sent = restored.regions.unwrap();
    let mut sent_sorted = sent.clone();
    sent_sorted.sort_by_key(|r| r.base);
    assert_eq!(hs.regions, sent_sorted);
    assert_eq!((sent[1].offset, sent[1].size), (768 << 10, 256 << 10));

    let smaps = sim.send("smaps");
    assert!(smaps.ok && smaps.registered_vmas.unwrap() >= 1, "{smaps:?}");
    let bad = sim.send("fly away");
    assert_eq!((bad.ok, bad.cmd.as_str()), (false, "fly"));
    let bad = sim.send("write 1 2 0");
    assert!(!bad.ok && bad.error.unwrap().contains("generation"));
    let bad = sim.send("balloon 4 0 4K");
    assert!(!bad.ok && bad.error.unwrap().contains("region 4"));
    let stop = sim.send("reader-stop");
    assert!(!stop.ok);
    let exit = sim.send("exit");
    assert!(exit.ok && exit.cmd == "exit");
    assert_eq!(sim.status(), 0);
    // The VMM is gone: its end of the socket reads EOF.
    let eof = uffdpager::scm::recv_with_fds(stream.as_fd(), 16).unwrap();
    assert!(eof.bytes.is_empty());
}

#[test]
fn a_command_stuck_on_an_unserved_fault_times_out_with_status_3() {
    let dir = tempfile::tempdir().unwrap();
    let mem = dir.path().join("mem");
    make_memfile(&mem, "256K");
    let sock = dir.path().join("vm.sock");
    let _listener = UnixListener::bind(&sock).unwrap();
    let (s, m) = (sock.to_str().unwrap(), mem.to_str().unwrap());
    let mut sim =
        Sim::start(&["run", "--socket", s, "--memory-file", m, "--command-timeout", "0.3"]);
    assert!(sim.reply().ok);
    let stuck = sim.send("verify");
    assert_eq!((stuck.ok, stuck.cmd.as_str()), (false, "verify"));
    assert!(stuck.error.unwrap().contains("timed out"));
    assert_eq!(sim.status(), 3);
}

#[test]
fn a_workload_list_runs_and_exits_without_waiting_for_stdin() {
    let dir = tempfile::tempdir().unwrap();
    let mem = dir.path().join("mem");
    make_memfile(&mem, "256K");
    let sock = dir.path().join("vm.sock");
    let _listener = UnixListener::bind(&sock).unwrap();
    let (s, m) = (sock.to_str().unwrap(), mem.to_str().unwrap());
    let sim =
        Sim::start(&["run", "--socket", s, "--memory-file", m, "--workload", "smaps,write:0:1:0"]);
    assert!(sim.reply().ok);
    let smaps = sim.reply();
    assert_eq!(smaps.cmd, "smaps");
    assert!(!sim.reply().ok);
    assert_eq!(sim.reply().cmd, "exit");
    assert_eq!(sim.status(), 1, "a failed workload command fails the run");
}
