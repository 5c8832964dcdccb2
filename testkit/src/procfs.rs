//! A process's resources as `/proc` shows them (see `proc(5)`), so that tests can assert what a
//! supervisor or pager holds, rather than assume it: open descriptors by kind, mappings and
//! descriptors of given files, threads, resident memory, bytes read from storage.

use std::io;
use std::path::Path;

/// What a process holds. Counts are taken entry by entry, so a descriptor closed meanwhile may
/// be missed: compare figures over time (poll until they settle), never one reading.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Holdings {
    /// Open descriptors (`/proc/<pid>/fd`).
    pub fds: usize,
    /// Of which userfaultfds (`anon_inode:[userfaultfd]`).
    pub uffds: usize,
    /// Of which memfds (`/memfd:...`).
    pub memfds: usize,
    /// Of which sockets (`socket:[...]`).
    pub sockets: usize,
    /// Of which open files named in the `files` asked about.
    pub file_fds: usize,
    /// Mappings (`/proc/<pid>/maps` lines) of the `files` asked about.
    pub file_maps: usize,
    /// Threads (`Threads:` in `/proc/<pid>/status`).
    pub threads: usize,
}

impl Holdings {
    /// True when no figure is above `baseline`'s and none of `files` is open or mapped: the
    /// process holds nothing more than it did then. `thread_slack` threads more are allowed
    /// for a process whose thread pool varies on its own (tokio's blocking pool keeps a thread
    /// for 10 s after its last use, longer while something reuses it).
    pub fn within(&self, baseline: &Holdings, thread_slack: usize) -> bool {
        self.fds <= baseline.fds
            && self.uffds <= baseline.uffds
            && self.memfds <= baseline.memfds
            && self.sockets <= baseline.sockets
            && self.file_fds == 0
            && self.file_maps == 0
            && self.threads <= baseline.threads + thread_slack
    }
}

/// What process `pid` holds; `files`: the paths whose descriptors and mappings are counted.
pub fn holdings(pid: i32, files: &[&Path]) -> io::Result<Holdings> {
    let mut h = Holdings::default();
    let names: Vec<String> = files.iter().map(|p| p.display().to_string()).collect();
    let names_one = |text: &str| names.iter().any(|n| text.contains(n.as_str()));
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        // A descriptor closed between the listing and the readlink is simply not counted.
        let Ok(target) = entry.and_then(|e| std::fs::read_link(e.path())) else { continue };
        let target = target.to_string_lossy();
        h.fds += 1;
        if target == "anon_inode:[userfaultfd]" {
            h.uffds += 1;
        } else if target.starts_with("/memfd:") {
            h.memfds += 1;
        } else if target.starts_with("socket:") {
            h.sockets += 1;
        } else if names_one(&target) {
            h.file_fds += 1;
        }
    }
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    h.file_maps = maps.lines().filter(|l| names_one(l)).count();
    h.threads = usize::try_from(status_field(pid, "Threads")?).unwrap_or(usize::MAX);
    Ok(h)
}

/// The names of process `pid`'s threads (`/proc/<pid>/task/*/comm`), for diagnostics.
pub fn thread_names(pid: i32) -> io::Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        // A thread that ended between the listing and the read is simply not named.
        if let Ok(name) = entry.and_then(|e| std::fs::read_to_string(e.path().join("comm"))) {
            names.push(name.trim_end().to_owned());
        }
    }
    names.sort();
    Ok(names)
}

/// Resident memory of a process, in KiB (`/proc/<pid>/status`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Resident {
    /// `VmRSS`: all resident pages mapped.
    pub rss_kib: u64,
    /// `RssAnon`: private anonymous memory (heap, stacks): the process's own memory.
    pub anon_kib: u64,
    /// `RssFile`: file pages mapped (page-cache pages, shared with every other mapper; each
    /// counted once per process however many times it is mapped there).
    pub file_kib: u64,
    /// `RssShmem`: shared memory (memfds, tmpfs) mapped.
    pub shmem_kib: u64,
}

/// The resident memory of process `pid`.
pub fn resident(pid: i32) -> io::Result<Resident> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |name: &str| parse_field(&text, name).unwrap_or(0);
    Ok(Resident {
        rss_kib: kib("VmRSS"),
        anon_kib: kib("RssAnon"),
        file_kib: kib("RssFile"),
        shmem_kib: kib("RssShmem"),
    })
}

/// Bytes process `pid` (all its threads, living and dead) caused to be fetched from storage:
/// `read_bytes` in `/proc/<pid>/io`. Reads served from the page cache do not count; a page
/// fault on a mapped file that has to read the disk counts for the faulting process.
pub fn storage_read_bytes(pid: i32) -> io::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/io"))?;
    parse_field(&text, "read_bytes")
        .ok_or_else(|| io::Error::other(format!("no read_bytes in /proc/{pid}/io")))
}

fn status_field(pid: i32, name: &str) -> io::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    parse_field(&text, name)
        .ok_or_else(|| io::Error::other(format!("no {name} in /proc/{pid}/status")))
}

/// The number after `name:` on its line (`VmRSS:   1234 kB` gives 1234).
fn parse_field(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (key, rest) = line.split_once(':')?;
        (key.trim() == name).then(|| rest.split_whitespace().next()?.parse().ok())?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_read_by_exact_name() {
        let text = "Name:\tx\nRssAnon:\t  1024 kB\nRssFile:\t 8 kB\nThreads:\t3\n";
        assert_eq!(parse_field(text, "RssAnon"), Some(1024));
        assert_eq!(parse_field(text, "Threads"), Some(3));
        assert_eq!(parse_field(text, "Rss"), None);
        assert_eq!(parse_field("read_bytes: 4096\n", "read_bytes"), Some(4096));
    }

    #[test]
    fn this_process_shows_its_open_file_and_its_threads() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let pid = i32::try_from(std::process::id()).unwrap();
        let h = holdings(pid, &[file.path()]).unwrap();
        assert_eq!(h.file_fds, 1);
        assert_eq!(h.file_maps, 0);
        assert!(h.fds >= 1 && h.threads >= 1);
        assert_eq!(thread_names(pid).unwrap().len(), h.threads);
        assert!(!h.within(&Holdings { file_fds: 0, ..h }, 0), "an open file is not within");
        assert!(!h.within(&Holdings { threads: 0, file_fds: 0, ..h }, 0));
        let mem = resident(pid).unwrap();
        assert!(mem.rss_kib >= mem.anon_kib && mem.anon_kib > 0);
        storage_read_bytes(pid).unwrap();
    }
}
