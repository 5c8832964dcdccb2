//! A hostile VMM (`uffd-hostile-vmm`) in a child process: started against a session socket,
//! steered by lines on its stdin, answering JSON lines on stdout.

use std::io::Write;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::Duration;

use serde_json::Value;

pub struct HostileVmm {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    pub pid: u32,
}

impl HostileVmm {
    /// Starts it against `socket` with `args`, and waits for its handshake to be sent.
    pub fn start(socket: &Path, args: &[&str]) -> (Self, Value) {
        let mut child = Command::new(testkit::binary("uffd-hostile-vmm"))
            .arg("--socket")
            .arg(socket)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("uffd-hostile-vmm starts");
        let lines = testkit::stdout_lines(&mut child);
        let pid = child.id();
        let stdin = child.stdin.take();
        let mut vmm = Self { child, stdin, lines, pid };
        let sent = vmm.next(Duration::from_secs(30));
        assert_eq!(sent["step"], "handshake-sent", "{sent}");
        (vmm, sent)
    }

    /// The next JSON line (at most `timeout`); `Value::Null` if it exited without one.
    pub fn next(&mut self, timeout: Duration) -> Value {
        match self.lines.recv_timeout(timeout) {
            Ok(line) => serde_json::from_str(&line).unwrap_or_else(|_| panic!("not JSON: {line}")),
            Err(mpsc::RecvTimeoutError::Disconnected) => Value::Null,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                panic!("uffd-hostile-vmm said nothing within {timeout:?}")
            }
        }
    }

    /// Tells it to go on with its part.
    pub fn go(&mut self) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "go").and_then(|()| stdin.flush()).expect("writing to uffd-hostile-vmm");
    }

    /// Waits (at most `timeout`) until it has exited.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(std::time::Instant::now() < deadline, "uffd-hostile-vmm did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for HostileVmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
