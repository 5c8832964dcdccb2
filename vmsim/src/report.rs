//! What a workload measured: pages verified, mismatches, and the latency of every page access
//! (a "stall": the first touch of a page through its whole-page compare), kept in a bounded
//! log-bucketed histogram so a reader can run for hours.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Most mismatch descriptions a report keeps.
pub const MAX_MISMATCH_DETAILS: usize = 8;

/// The result of one workload.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Which workload ran (`read-random`, `read-seq`, `write`, `balloon`, `verify`, `reader`).
    pub workload: String,
    /// Pages read and compared against their expectation.
    pub pages_verified: u64,
    /// Pages that did not hold what they must.
    pub mismatches: u64,
    /// The first few mismatches: page, region, offset, expected state, first differing word.
    pub first_mismatches: Vec<String>,
    /// Bytes read by verification.
    pub bytes_read: u64,
    /// Pages written with a pattern.
    pub pages_written: u64,
    /// Pages discarded by balloon inflation.
    pub pages_removed: u64,
    /// Page reads retried because the page changed while being read (background reader only).
    pub retries: u64,
    /// Wall time of the workload.
    pub elapsed_ms: f64,
    /// Page accesses timed (the stall figures below are over these).
    pub stall_samples: u64,
    /// Longest page access, in microseconds.
    pub stall_max_us: f64,
    /// 99th percentile page access, in microseconds (log buckets: within ~6%).
    pub stall_p99_us: f64,
    /// Median page access, in microseconds (log buckets: within ~6%).
    pub stall_p50_us: f64,
}

impl Report {
    /// True when every page read held what it must.
    pub fn is_clean(&self) -> bool {
        self.mismatches == 0
    }
}

/// Sub-buckets per power of two (16: about 6% resolution).
const SUB_BITS: u32 = 4;
const SUB: u64 = 1 << SUB_BITS;
/// Buckets covering every `u64` nanosecond value.
#[allow(clippy::cast_possible_truncation)] // 61 * 16
const BUCKETS: usize = ((64 - SUB_BITS + 1) as usize) * (SUB as usize);

/// A latency histogram with logarithmic buckets (bounded memory, ~6% resolution).
#[derive(Debug, Clone)]
pub struct LatencyHistogram {
    counts: Vec<u64>,
    total: u64,
    max_ns: u64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram { counts: vec![0; BUCKETS], total: 0, max_ns: 0 }
    }
}

// Below `SUB` the value is its own bucket, and every bucket index is below `BUCKETS` (976).
#[allow(clippy::cast_possible_truncation)]
fn bucket_of(ns: u64) -> usize {
    if ns < SUB {
        return ns as usize;
    }
    let top = 63 - ns.leading_zeros(); // >= SUB_BITS
    let sub = (ns >> (top - SUB_BITS)) & (SUB - 1);
    ((u64::from(top - SUB_BITS + 1) * SUB) + sub) as usize
}

/// Lowest value and width of a bucket.
fn bucket_range(index: usize) -> (u64, u64) {
    let index = index as u64;
    if index < SUB {
        return (index, 1);
    }
    let shift = index / SUB - 1;
    let sub = index % SUB;
    ((SUB + sub) << shift, 1 << shift)
}

impl LatencyHistogram {
    /// Records one latency.
    pub fn record(&mut self, latency: Duration) {
        let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        self.counts[bucket_of(ns)] += 1;
        self.total += 1;
        self.max_ns = self.max_ns.max(ns);
    }

    /// Number of latencies recorded.
    pub fn count(&self) -> u64 {
        self.total
    }

    /// Longest latency recorded, in nanoseconds.
    pub fn max_ns(&self) -> u64 {
        self.max_ns
    }

    /// The `q` quantile (0.0 ..= 1.0) in nanoseconds: the middle of its bucket, at most the max.
    // The rank is `q` (clamped to 0..=1) times the count: non-negative, at most `total`.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    pub fn quantile_ns(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).max(1);
        if rank >= self.total {
            return self.max_ns;
        }
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let (low, width) = bucket_range(i);
                return (low + width / 2).min(self.max_ns);
            }
        }
        self.max_ns
    }
}

/// Accumulates a [`Report`] while a workload runs.
#[derive(Debug)]
pub(crate) struct Recorder {
    report: Report,
    hist: LatencyHistogram,
    started: Instant,
}

impl Recorder {
    pub(crate) fn new(workload: &str) -> Recorder {
        Recorder {
            report: Report { workload: workload.to_owned(), ..Report::default() },
            hist: LatencyHistogram::default(),
            started: Instant::now(),
        }
    }

    /// A page read and compared; `mismatch` describes it if it did not match.
    pub(crate) fn verified(&mut self, bytes: u64, latency: Duration, mismatch: Option<String>) {
        self.report.pages_verified += 1;
        self.report.bytes_read += bytes;
        self.hist.record(latency);
        if let Some(m) = mismatch {
            self.report.mismatches += 1;
            if self.report.first_mismatches.len() < MAX_MISMATCH_DETAILS {
                self.report.first_mismatches.push(m);
            }
        }
    }

    /// A page written.
    pub(crate) fn written(&mut self, latency: Duration) {
        self.report.pages_written += 1;
        self.hist.record(latency);
    }

    /// Pages discarded.
    pub(crate) fn removed(&mut self, pages: u64) {
        self.report.pages_removed += pages;
    }

    /// A page read to be retried.
    pub(crate) fn retried(&mut self) {
        self.report.retries += 1;
    }

    pub(crate) fn pages_verified(&self) -> u64 {
        self.report.pages_verified
    }

    pub(crate) fn finish(self) -> Report {
        let us = |ns: u64| ns as f64 / 1000.0;
        Report {
            elapsed_ms: self.started.elapsed().as_secs_f64() * 1000.0,
            stall_samples: self.hist.count(),
            stall_max_us: us(self.hist.max_ns()),
            stall_p99_us: us(self.hist.quantile_ns(0.99)),
            stall_p50_us: us(self.hist.quantile_ns(0.50)),
            ..self.report
        }
    }
}

#[cfg(test)]
// Test values are small and known: plain `as` casts.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_possible_wrap)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_and_cover_every_value() {
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(15), 15);
        assert_eq!(bucket_of(16), 16);
        assert_eq!(bucket_of(31), 31);
        assert_eq!(bucket_of(32), 32);
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
        for i in 0..BUCKETS {
            let (low, width) = bucket_range(i);
            assert_eq!(bucket_of(low), i);
            assert_eq!(bucket_of(low + (width - 1)), i);
        }
    }

    #[test]
    fn quantiles_are_within_the_bucket_resolution() {
        let mut h = LatencyHistogram::default();
        assert_eq!(h.quantile_ns(0.5), 0);
        for us in 1..=1000u64 {
            h.record(Duration::from_micros(us));
        }
        assert_eq!(h.count(), 1000);
        assert_eq!(h.max_ns(), 1_000_000);
        let p50 = h.quantile_ns(0.5) as f64;
        let p99 = h.quantile_ns(0.99) as f64;
        assert!((p50 / 500_000.0 - 1.0).abs() < 0.07, "{p50}");
        assert!((p99 / 990_000.0 - 1.0).abs() < 0.07, "{p99}");
        assert_eq!(h.quantile_ns(1.0), 1_000_000);
    }

    #[test]
    fn a_recorder_keeps_only_the_first_mismatches() {
        let mut r = Recorder::new("verify");
        for i in 0..20 {
            r.verified(4096, Duration::from_micros(2), (i % 2 == 0).then(|| format!("page {i}")));
        }
        r.written(Duration::from_micros(5));
        r.removed(3);
        let report = r.finish();
        assert_eq!(report.workload, "verify");
        assert_eq!(report.pages_verified, 20);
        assert_eq!(report.mismatches, 10);
        assert_eq!(report.first_mismatches.len(), MAX_MISMATCH_DETAILS);
        assert_eq!(report.first_mismatches[1], "page 2");
        assert_eq!(report.bytes_read, 20 * 4096);
        assert_eq!((report.pages_written, report.pages_removed, report.stall_samples), (1, 3, 21));
        assert!(!report.is_clean());
        assert!(report.stall_max_us >= 5.0);
    }
}
