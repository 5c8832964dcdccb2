//! A VMM the supervisor will not serve is not left hanging.
//!
//! Firecracker touches guest memory while `PUT /snapshot/load` runs: once it has sent its
//! handshake it waits in the kernel for a page that only the handler can supply. If the
//! handshake is refused (regions past the memory file's end, a bad page size...) or no pager
//! takes the session, nothing will ever serve that page, and the VMM hangs for ever. Firecracker's
//! docs (`handling-page-faults-on-snapshot-resume.md`, Caveats) make the handler responsible for
//! signalling Firecracker, by the pid `SO_PEERCRED` gives, when it cannot serve it. So by default
//! (`--refused-vmm kill`) such a VMM is sent SIGKILL through a pidfd of the process that
//! connected (`SO_PEERPIDFD`: never another process that got its pid since). With
//! `--refused-vmm keep` the operator's own tooling deals with it. The FAILED session's `error`
//! says which happened, and its `vmm_pid` names the process.
//!
//! [`verdict`] is the decision alone, tested as a function; [`stop`] carries it out.

use std::io;
use std::os::fd::BorrowedFd;
use std::time::Duration;

use clap::ValueEnum;
use nix::sys::signal::Signal;

use crate::pidfd::PidFd;

/// How long a VMM sent SIGKILL has to exit before the record says it did not.
const EXIT_WAIT: Duration = Duration::from_secs(5);

/// What to do with a VMM whose session failed before it was served (`--refused-vmm`, or
/// `refused_vmm = "kill" | "keep"` in the config file).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum RefusedVmm {
    /// Send it SIGKILL (through a pidfd), so that it does not hang on its first page fault.
    #[default]
    Kill,
    /// Leave it running: the operator's tooling stops it.
    Keep,
}

/// What becomes of a refused VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Send it SIGKILL.
    Stop,
    /// Leave it, for this reason (it goes into the session's `error`).
    Leave(&'static str),
}

/// Whether to stop the VMM `vmm_pid` whose session failed before it was served. `sent_nothing`:
/// it closed the connection without sending a byte (nothing of it waits for us); `own_pid`: this
/// supervisor's pid (a process never signals itself).
pub fn verdict(policy: RefusedVmm, vmm_pid: u32, own_pid: u32, sent_nothing: bool) -> Verdict {
    if sent_nothing {
        return Verdict::Leave("it closed the connection without sending anything");
    }
    match vmm_pid {
        0 => Verdict::Leave("its pid is unknown (SO_PEERCRED gave none)"),
        1 => Verdict::Leave("it is pid 1"),
        p if p == own_pid => Verdict::Leave("it is this supervisor itself"),
        _ if policy == RefusedVmm::Keep => Verdict::Leave("--refused-vmm keep"),
        _ => Verdict::Stop,
    }
}

/// A pidfd of the VMM at the other end of `stream` (pid `vmm_pid`), taken when it connects, so
/// that a later [`apply`] reaches that process and no other.
pub fn peer_pidfd(stream: BorrowedFd<'_>, vmm_pid: u32) -> io::Result<PidFd> {
    PidFd::of_peer(stream, vmm_pid)
}

/// Carries out `verdict` on the VMM `vmm_pid` (through `pidfd`, taken when it connected).
/// Returns what to add to the session's error.
pub async fn apply(verdict: Verdict, pidfd: &io::Result<PidFd>, vmm_pid: u32) -> String {
    match (verdict, pidfd) {
        (Verdict::Leave(why), _) => format!("the VMM (pid {vmm_pid}) was left running ({why})"),
        (Verdict::Stop, Ok(pidfd)) => stop(pidfd).await,
        (Verdict::Stop, Err(e)) => {
            format!("the VMM (pid {vmm_pid}) could not be stopped: no pidfd of it ({e})")
        }
    }
}

/// Sends SIGKILL through `pidfd` and waits (a few seconds at most) for the process to exit.
async fn stop(pidfd: &PidFd) -> String {
    let pid = pidfd.pid();
    match pidfd.send_signal(Signal::SIGKILL) {
        Ok(true) => {}
        Ok(false) => return format!("the VMM (pid {pid}) had exited already"),
        Err(e) => return format!("the VMM (pid {pid}) could not be stopped: SIGKILL failed ({e})"),
    }
    if tokio::time::timeout(EXIT_WAIT, pidfd.wait_exit()).await.is_ok() {
        format!("the VMM (pid {pid}) was stopped with SIGKILL, so that it does not hang waiting for its memory")
    } else {
        format!("the VMM (pid {pid}) was sent SIGKILL but had not exited {EXIT_WAIT:?} later")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_vmm_is_stopped_unless_the_operator_keeps_it_or_it_cannot_be_told() {
        use RefusedVmm::{Keep, Kill};
        assert_eq!(verdict(Kill, 4242, 100, false), Verdict::Stop);
        assert_eq!(verdict(Keep, 4242, 100, false), Verdict::Leave("--refused-vmm keep"));
        assert!(
            matches!(verdict(Kill, 4242, 100, true), Verdict::Leave(w) if w.contains("without sending"))
        );
        assert!(matches!(verdict(Kill, 0, 100, false), Verdict::Leave(w) if w.contains("unknown")));
        assert!(matches!(verdict(Kill, 1, 100, false), Verdict::Leave(w) if w.contains("pid 1")));
        assert!(
            matches!(verdict(Kill, 100, 100, false), Verdict::Leave(w) if w.contains("itself"))
        );
    }

    #[tokio::test]
    async fn stopping_a_vmm_kills_it_waits_for_its_exit_and_says_so() {
        let mut child = std::process::Command::new("sleep").arg("300").spawn().unwrap();
        let pid = child.id();
        let said = stop(&PidFd::open(pid).unwrap()).await;
        assert_eq!(
            said,
            format!(
                "the VMM (pid {pid}) was stopped with SIGKILL, so that it does not hang waiting \
                 for its memory"
            )
        );
        let status = child.wait().unwrap();
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(9));
    }

    #[tokio::test]
    async fn a_kept_vmm_is_left_alone_and_the_record_says_why() {
        let none = Err(io::Error::from_raw_os_error(libc::ESRCH));
        let said = apply(Verdict::Leave("--refused-vmm keep"), &none, 77).await;
        assert_eq!(said, "the VMM (pid 77) was left running (--refused-vmm keep)");
        let said = apply(Verdict::Stop, &none, 77).await;
        assert!(said.starts_with("the VMM (pid 77) could not be stopped: no pidfd"), "{said}");
    }
}
