//! The pager's figures for Prometheus: one struct of named atomic counters and two fixed-bucket
//! histograms, process-wide (one pager process is one version). The fault path only adds to
//! atomics (`Relaxed`: each figure is a count on its own, no ordering between them is read):
//! no allocation, no lock. The supervisor asks for a snapshot at scrape time (`GetMetrics`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use uffdpager::api;

use crate::completion_result::CompleteError;

/// Upper bounds of the fault-latency buckets, in nanoseconds: 5 µs to 100 ms.
const FAULT_BOUNDS_NS: [u64; 14] = [
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
];

/// Upper bounds of the completion-duration buckets, in nanoseconds: 10 ms to 10 min.
const COMPLETION_BOUNDS_NS: [u64; 12] = [
    10_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
    30_000_000_000,
    120_000_000_000,
    600_000_000_000,
];

/// A histogram over fixed bounds: one atomic count per bucket (the last one: above every
/// bound), and the sum in nanoseconds.
#[derive(Debug)]
pub struct Histogram<const N: usize> {
    bounds_ns: [u64; N],
    buckets: [AtomicU64; N],
    over: AtomicU64,
    sum_ns: AtomicU64,
}

impl<const N: usize> Histogram<N> {
    const fn new(bounds_ns: [u64; N]) -> Self {
        Self {
            bounds_ns,
            buckets: [const { AtomicU64::new(0) }; N],
            over: AtomicU64::new(0),
            sum_ns: AtomicU64::new(0),
        }
    }

    /// Counts one observation.
    pub fn observe(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = self.bounds_ns.partition_point(|&b| b < ns);
        match self.buckets.get(i) {
            Some(b) => b.fetch_add(1, Ordering::Relaxed),
            None => self.over.fetch_add(1, Ordering::Relaxed),
        };
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Cumulative counts, as Prometheus writes them.
    pub fn snapshot(&self) -> api::Histogram {
        let mut total = 0;
        let mut cumulative = Vec::with_capacity(N);
        for b in &self.buckets {
            total += b.load(Ordering::Relaxed);
            cumulative.push(total);
        }
        total += self.over.load(Ordering::Relaxed);
        api::Histogram {
            upper_bounds: self.bounds_ns.iter().map(|&ns| ns as f64 / 1e9).collect(),
            cumulative_counts: cumulative,
            sum: self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
            count: total,
        }
    }
}

/// How a completion ended (the `outcome` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Graduated,
    Cancelled,
    DeadlineExceeded,
    Failed,
    SessionEnded,
}

impl Outcome {
    const ALL: [Outcome; 5] = [
        Outcome::Graduated,
        Outcome::Cancelled,
        Outcome::DeadlineExceeded,
        Outcome::Failed,
        Outcome::SessionEnded,
    ];

    pub fn of(e: &CompleteError) -> Self {
        match e {
            CompleteError::Cancelled(_) => Outcome::Cancelled,
            CompleteError::DeadlineExceeded(_) => Outcome::DeadlineExceeded,
            CompleteError::Failed(_) => Outcome::Failed,
            CompleteError::SessionEnded(_) => Outcome::SessionEnded,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Graduated => "graduated",
            Outcome::Cancelled => "cancelled",
            Outcome::DeadlineExceeded => "deadline_exceeded",
            Outcome::Failed => "failed",
            Outcome::SessionEnded => "session_ended",
        }
    }
}

/// Every figure the pager exports.
#[derive(Debug)]
pub struct PagerMetrics {
    /// Faults read and served.
    pub faults: AtomicU64,
    /// From reading a fault to the copy (or wake) that resolved it.
    pub fault_latency: Histogram<14>,
    /// Bytes made present to serve faults (the faulting page, or a sequential fault's block).
    pub fault_bytes: AtomicU64,
    /// Bytes made present by background read-ahead.
    pub read_ahead_bytes: AtomicU64,
    /// Bytes made present by graduation (the worker's sweep and copy threads).
    pub completion_bytes: AtomicU64,
    /// Bytes graduation did not copy because the snapshot holds zeros there.
    pub zero_skipped_bytes: AtomicU64,
    /// REMOVE and UNMAP events read.
    pub remove_events: AtomicU64,
    /// Bytes those events discarded.
    pub remove_bytes: AtomicU64,
    /// Completions ended, indexed like [`Outcome::ALL`].
    completions: [AtomicU64; 5],
    /// Duration of completions that graduated.
    pub completion_duration: Histogram<12>,
    /// Guest memory of the sessions graduated.
    pub graduated_bytes: AtomicU64,
    /// Sessions served from the mapping of a lingering memory file.
    pub memory_file_reuses: AtomicU64,
}

/// The memory files mapped at one moment (see `crate::memory_file::MemoryFiles::figures`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryFileFigures {
    /// Files some session is restored from.
    pub in_use: u64,
    /// Files no session holds, kept mapped for the next restore.
    pub lingering: u64,
    /// Length of the lingering files' mappings.
    pub lingering_bytes: u64,
}

/// The process's figures.
pub static METRICS: PagerMetrics = PagerMetrics {
    faults: AtomicU64::new(0),
    fault_latency: Histogram::new(FAULT_BOUNDS_NS),
    fault_bytes: AtomicU64::new(0),
    read_ahead_bytes: AtomicU64::new(0),
    completion_bytes: AtomicU64::new(0),
    zero_skipped_bytes: AtomicU64::new(0),
    remove_events: AtomicU64::new(0),
    remove_bytes: AtomicU64::new(0),
    completions: [const { AtomicU64::new(0) }; 5],
    completion_duration: Histogram::new(COMPLETION_BOUNDS_NS),
    graduated_bytes: AtomicU64::new(0),
    memory_file_reuses: AtomicU64::new(0),
};

/// Adds `n` to a counter.
pub fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

impl PagerMetrics {
    /// Counts a completion that ended.
    pub fn completion_ended(&self, outcome: Outcome) {
        let i = Outcome::ALL.iter().position(|&o| o == outcome).expect("every outcome is listed");
        self.completions[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a graduation: its duration and the guest memory it graduated.
    pub fn graduated(&self, duration: Duration, total_bytes: u64) {
        self.completion_ended(Outcome::Graduated);
        self.completion_duration.observe(duration);
        add(&self.graduated_bytes, total_bytes);
    }

    /// Everything, for GetMetrics, with the memory files mapped now.
    pub fn snapshot(&self, files: MemoryFileFigures) -> api::PagerMetrics {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let completions: HashMap<String, u64> = Outcome::ALL
            .iter()
            .zip(&self.completions)
            .map(|(o, c)| (o.as_str().to_string(), load(c)))
            .collect();
        api::PagerMetrics {
            faults: load(&self.faults),
            fault_latency_seconds: Some(self.fault_latency.snapshot()),
            fault_bytes: load(&self.fault_bytes),
            read_ahead_bytes: load(&self.read_ahead_bytes),
            completion_bytes: load(&self.completion_bytes),
            zero_skipped_bytes: load(&self.zero_skipped_bytes),
            remove_events: load(&self.remove_events),
            remove_bytes: load(&self.remove_bytes),
            memory_file_read_bytes: storage_read_bytes(),
            completions,
            completion_duration_seconds: Some(self.completion_duration.snapshot()),
            graduated_bytes: load(&self.graduated_bytes),
            memory_files_in_use: files.in_use,
            memory_files_lingering: files.lingering,
            memory_file_lingering_bytes: files.lingering_bytes,
            memory_file_reuses: load(&self.memory_file_reuses),
        }
    }
}

/// `read_bytes` of `/proc/self/io`: bytes this process caused to be read from storage (its
/// memory-file reads that missed the page cache; page-cache hits cost nothing here). 0 if the
/// file cannot be read.
fn storage_read_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|text| parse_read_bytes(&text))
        .unwrap_or(0)
}

fn parse_read_bytes(io: &str) -> Option<u64> {
    io.lines().find_map(|l| l.strip_prefix("read_bytes:")).and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_the_first_bucket_at_least_as_large() {
        let h = Histogram::new([10, 100, 1000]);
        for ns in [1, 10, 11, 100, 5000] {
            h.observe(Duration::from_nanos(ns));
        }
        let s = h.snapshot();
        assert_eq!(s.cumulative_counts, [2, 4, 4]);
        assert_eq!(s.count, 5);
        assert_eq!(s.upper_bounds, [1e-8, 1e-7, 1e-6]);
        assert!((s.sum - 5122e-9).abs() < 1e-12, "{}", s.sum);
    }

    #[test]
    fn read_bytes_is_read_from_proc_self_io() {
        let io = "rchar: 10\nwchar: 3\nsyscr: 1\nsyscw: 1\nread_bytes: 4096\nwrite_bytes: 0\n";
        assert_eq!(parse_read_bytes(io), Some(4096));
        assert_eq!(parse_read_bytes("rchar: 1\n"), None);
    }

    #[test]
    fn every_outcome_is_reported_even_at_zero() {
        METRICS.completion_ended(Outcome::Cancelled);
        let s = METRICS.snapshot(MemoryFileFigures::default());
        assert_eq!(s.completions.len(), Outcome::ALL.len());
        assert!(s.completions["cancelled"] >= 1);
    }
}
