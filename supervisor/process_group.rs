//! A pager's process group: nothing of it outlives the pager.
//!
//! Pagers start in a process group of their own (`process_group(0)`: its id is the pager's pid),
//! so that a Ctrl-C to the supervisor's terminal does not reach them. A pager may start processes
//! of its own (a wrapper script's `sleep 300 &`); when the pager (the group's leader) exits,
//! for whatever reason (a failed deploy killed, a drained version stopped, a crash), those are
//! signalled as a group: SIGTERM, then SIGKILL after a grace period, and `/proc` is read until no
//! member is left running (a zombie holds nothing and counts as gone).
//!
//! The sweep runs while the leader is still a zombie (its exit seen through its pidfd, before it
//! is reaped): as long as it is, its pid, and so the group id, cannot be given to another process.
//! [`parse_stat`] is the one pure step (`/proc/<pid>/stat`), tested as a function.

use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::time::Instant;
use tracing::{error, info, warn};

/// How long the rest of a group has to exit after SIGTERM, before SIGKILL.
pub const GROUP_GRACE: Duration = Duration::from_secs(2);
/// How long to wait for the group to be gone after SIGKILL.
const KILL_WAIT: Duration = Duration::from_secs(5);
/// Between two readings of `/proc`.
const POLL: Duration = Duration::from_millis(50);

/// The fields of `/proc/<pid>/stat` the sweep needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    pub pid: i32,
    /// `R`, `S`, `D`, `Z`, ...
    pub state: char,
    pub pgrp: i32,
}

/// Parses `/proc/<pid>/stat`: `pid (comm) state ppid pgrp ...`. The command name may hold
/// spaces and parentheses, so the fields are read after its last `)`.
pub fn parse_stat(text: &str) -> Option<Stat> {
    let (head, rest) = text.rsplit_once(')')?;
    let pid = head.split_once(" (")?.0.trim().parse().ok()?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let _ppid = fields.next()?;
    let pgrp = fields.next()?.parse().ok()?;
    Some(Stat { pid, state, pgrp })
}

/// The processes of group `pgid` still running (zombies left out), from `/proc`.
pub fn members(pgid: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        // A process that exits between the listing and the read is simply not counted.
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        if let Some(s) = parse_stat(&text) {
            if s.pgrp == pgid && s.state != 'Z' && s.state != 'X' {
                out.push(s.pid);
            }
        }
    }
    out.sort_unstable();
    out
}

async fn wait_empty(pgid: i32, limit: Duration) -> Vec<i32> {
    let deadline = Instant::now() + limit;
    loop {
        let left = members(pgid);
        if left.is_empty() || Instant::now() >= deadline {
            return left;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Ends what is left of the process group of the pager `leader` (pid = group id) once the
/// leader has exited: SIGTERM, [`GROUP_GRACE`], SIGKILL; returns the pids that were found.
pub async fn sweep(version: &str, leader: u32) -> Vec<i32> {
    let Ok(pgid) = i32::try_from(leader) else { return Vec::new() };
    if pgid <= 1 {
        return Vec::new();
    }
    let found = members(pgid);
    if found.is_empty() {
        return found;
    }
    warn!(
        version = %version,
        pid = leader,
        members = ?found,
        "the pager left processes of its group running; stopping them (SIGTERM)",
    );
    let _ = killpg(Pid::from_raw(pgid), Signal::SIGTERM);
    let left = wait_empty(pgid, GROUP_GRACE).await;
    if left.is_empty() {
        info!(version = %version, pid = leader, "the pager's process group is gone");
        return found;
    }
    warn!(version = %version, pid = leader, members = ?left, "still running after SIGTERM: SIGKILL");
    let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
    let left = wait_empty(pgid, KILL_WAIT).await;
    if left.is_empty() {
        info!(version = %version, pid = leader, "the pager's process group is gone");
    } else {
        error!(version = %version, pid = leader, members = ?left, "processes of the pager's group survive SIGKILL");
    }
    found
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::CommandExt;

    use super::*;

    #[test]
    fn stat_lines_parse_whatever_the_command_name_holds() {
        let s = parse_stat("4242 (sleep) S 1 4240 4240 0 -1 4194560 95 0 0 0").unwrap();
        assert_eq!(s, Stat { pid: 4242, state: 'S', pgrp: 4240 });
        let odd = parse_stat("77 (a) b (c) Z 1 70 70 0").unwrap();
        assert_eq!(odd, Stat { pid: 77, state: 'Z', pgrp: 70 });
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (x) R"), None);
    }

    #[tokio::test]
    async fn the_rest_of_a_group_is_stopped_after_its_leader_exits() {
        let d = tempfile::tempdir().unwrap();
        let pidfile = d.path().join("child");
        // A leader that leaves a child of its group behind, one that ignores SIGTERM.
        let script = format!("trap '' TERM; sleep 300 & echo $! > {}; exit 0", pidfile.display());
        let mut leader = std::process::Command::new("sh")
            .args(["-c", &script])
            .process_group(0)
            .spawn()
            .unwrap();
        let pgid = i32::try_from(leader.id()).unwrap();
        leader.wait().unwrap();
        let child: i32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
        assert_eq!(members(pgid), vec![child]);
        let found = sweep("v1", leader.id()).await;
        assert_eq!(found, vec![child]);
        assert!(members(pgid).is_empty(), "nothing of the group runs");
    }
}
