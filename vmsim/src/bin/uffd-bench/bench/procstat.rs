//! A process's thread count and resident memory, from `/proc/<pid>/status` (see `proc(5)`):
//! `Threads`, `VmRSS` and its parts `RssAnon` (the process's own memory: heap, stacks),
//! `RssFile` (mapped file pages, here the page cache of memory files, shared with every other
//! mapper) and `RssShmem`.

use std::io;

/// What `/proc/<pid>/status` says about a process's threads and memory (bytes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ProcStatus {
    pub threads: u64,
    pub vm_rss: u64,
    pub rss_anon: u64,
    pub rss_file: u64,
    pub rss_shmem: u64,
}

impl ProcStatus {
    /// Reads the status of process `pid`.
    pub fn of(pid: i32) -> io::Result<Self> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        parse(&text).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, format!("/proc/{pid}/status: no Threads"))
        })
    }
}

/// Parses the text of a status file; `None` if it has no `Threads:` line.
pub fn parse(text: &str) -> Option<ProcStatus> {
    let mut status = ProcStatus::default();
    let mut threads = None;
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else { continue };
        let mut words = value.split_whitespace();
        let number: Option<u64> = words.next().and_then(|w| w.parse().ok());
        // Sizes are in kB (KiB, in fact); counts have no unit.
        let kib = number.map(|n| n * 1024);
        match key {
            "Threads" => threads = number,
            "VmRSS" => status.vm_rss = kib.unwrap_or(0),
            "RssAnon" => status.rss_anon = kib.unwrap_or(0),
            "RssFile" => status.rss_file = kib.unwrap_or(0),
            "RssShmem" => status.rss_shmem = kib.unwrap_or(0),
            _ => {}
        }
    }
    status.threads = threads?;
    Some(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "Name:\tuffd-pager\nUmask:\t0022\nState:\tS (sleeping)\n\
VmPeak:\t  123456 kB\nVmRSS:\t    9000 kB\nRssAnon:\t    3000 kB\nRssFile:\t    5000 kB\n\
RssShmem:\t    1000 kB\nThreads:\t7\nSigQ:\t0/94000\n";

    #[test]
    fn reads_threads_and_resident_memory_in_bytes() {
        let s = parse(SAMPLE).unwrap();
        assert_eq!(s.threads, 7);
        assert_eq!(s.vm_rss, 9000 * 1024);
        assert_eq!(s.rss_anon, 3000 * 1024);
        assert_eq!(s.rss_file, 5000 * 1024);
        assert_eq!(s.rss_shmem, 1000 * 1024);
    }

    #[test]
    fn a_status_without_threads_is_refused() {
        assert_eq!(parse("Name:\tx\nVmRSS:\t1 kB\n"), None);
    }

    #[test]
    fn this_process_can_be_read() {
        let me = ProcStatus::of(i32::try_from(std::process::id()).unwrap()).unwrap();
        assert!(me.threads >= 1 && me.vm_rss > 0);
    }
}
