//! Collecting first touches while a session records: pure bookkeeping with a cap, turned into
//! memory-file runs when the recording is saved.

use super::FileRun;
use crate::firecracker::Region;

/// A run of pages of one region, by page index: `[first, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRun {
    pub region: usize,
    pub first: u64,
    pub end: u64,
}

/// Collects first touches in order, coalescing a touch that continues the last run into it
/// (a vCPU reading memory in order gives one run, not one entry per page), with a cap on
/// entries: bounded memory however the VM behaves. Pure.
#[derive(Debug, Clone)]
pub struct RunRecorder {
    runs: Vec<PageRun>,
    cap: usize,
    /// Touches refused because the cap was reached.
    dropped: u64,
}

impl RunRecorder {
    pub fn new(cap: usize) -> Self {
        Self { runs: Vec::new(), cap, dropped: 0 }
    }

    /// Records pages `[first, end)` of `region`, touched now. Returns false when the cap
    /// refused them.
    pub fn push(&mut self, region: usize, first: u64, end: u64) -> bool {
        if first >= end {
            return true;
        }
        if let Some(last) = self.runs.last_mut() {
            if last.region == region && (last.first..=last.end).contains(&first) {
                // Continues (or lies inside) the last run.
                last.end = last.end.max(end);
                return true;
            }
        }
        if self.runs.len() >= self.cap {
            self.dropped += 1;
            return false;
        }
        self.runs.push(PageRun { region, first, end });
        true
    }

    pub fn runs(&self) -> &[PageRun] {
        &self.runs
    }

    /// Whether the cap has been reached.
    pub fn full(&self) -> bool {
        self.runs.len() >= self.cap
    }

    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// The runs as memory-file runs of `regions`.
    pub fn file_runs(&self, regions: &[Region]) -> Vec<FileRun> {
        self.runs
            .iter()
            .filter_map(|r| {
                let reg = regions.get(r.region)?;
                Some(FileRun {
                    offset: reg.offset + r.first * reg.page_size,
                    len: (r.end - r.first) * reg.page_size,
                })
            })
            .collect()
    }
}
