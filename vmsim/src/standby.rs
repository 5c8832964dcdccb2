//! Standby: the guest's whole memory written to a new snapshot memory file, the way Firecracker
//! writes a Full snapshot (`PUT /snapshot/create` with `snapshot_type: Full`): one file, every
//! region's memory at that region's `offset`, the file as long as the end of the last region.
//! A VM restored from it (a new session on that file, the same regions) starts with exactly the
//! memory this one held.
//!
//! Two choices, both invisible to a VM restored from the file:
//! - A 4 KiB block that is all zeros is left as a hole (seeked over, never written), as a sparse
//!   copy would; Firecracker writes such blocks out. A hole reads as zeros, so the content is the
//!   same, the file takes less disk and the pager's hole detection (`SEEK_DATA`) skips it at the
//!   next graduation. Gaps between regions are holes too.
//! - Standby doubles as a full verify: each page is copied out of guest memory once, that copy is
//!   checked against what the page must hold (snapshot bytes, a written pattern, or zeros after
//!   balloon inflation), and that same copy is written. What the file holds is therefore exactly
//!   what was verified, and the report counts every page that did not hold what it must.
//!
//! The file appears at its path only once complete and synced: it is written as `PATH.partial`
//! (created exclusively), `fsync`ed, then hard-linked to `PATH`, which fails if `PATH` exists, so
//! standby never replaces a file (a memory file VMs are restored from above all), and a standby
//! that fails half-way leaves no file that could pass for a snapshot.
//!
//! Reading a page still missing from a VM that has not graduated faults it in through its pager,
//! as Firecracker's own snapshot does; after graduation the kernel supplies missing pages.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::expect::{expected, first_difference_in};
use super::guest::{Guest, PageRef, Vm};
use super::memfile::PAGE_BYTES;
use super::report::{Recorder, Report};
use super::workload::describe;

/// Bytes accumulated before one `pwrite`.
const RUN_MAX: usize = 8 << 20;

/// What a standby wrote.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    /// The new memory file.
    pub path: PathBuf,
    /// Its length: the end of the last region (`max(offset + size)`).
    pub bytes: u64,
    /// Guest bytes written (4 KiB blocks holding data).
    pub data_bytes: u64,
    /// Guest bytes left as holes (all-zero 4 KiB blocks).
    pub hole_bytes: u64,
    /// The regions, as `uffd-vmsim run --region` arguments: restore from the file with these.
    pub regions: Vec<String>,
    /// Wall time of the standby, verification and `fsync` included.
    pub elapsed_ms: f64,
}

/// Why a standby wrote no snapshot. Each variant names the file and the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum StandbyError {
    #[error("{0} already exists: standby writes a new memory file and never replaces one")]
    Exists(PathBuf),
    #[error("creating {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error("writing {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("syncing {path}: {source}")]
    Sync { path: PathBuf, source: io::Error },
    #[error("publishing {partial} as {path}: {source}")]
    Publish { partial: PathBuf, path: PathBuf, source: io::Error },
}

/// Where the file is written before it is complete: `PATH.partial`.
fn partial_path(path: &Path) -> PathBuf {
    let mut name = OsString::from(path.as_os_str());
    name.push(".partial");
    PathBuf::from(name)
}

impl Vm {
    /// Writes the guest's memory to the new file `path` (see the module's documentation) and
    /// verifies every page on the way. The caller pauses the workload first (the line protocol's
    /// `standby` stops the background reader); `&self` keeps the foreground from mutating.
    pub fn standby(&self, path: &Path) -> Result<(Report, SnapshotInfo), StandbyError> {
        let started = Instant::now();
        if fs::symlink_metadata(path).is_ok() {
            return Err(StandbyError::Exists(path.to_owned()));
        }
        let partial = partial_path(path);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&partial)
            .map_err(|source| StandbyError::Create { path: partial.clone(), source })?;
        let written = write_and_link(&self.guest, &file, &partial, path);
        // The partial name goes in every case: after the link, `path` names the file.
        if let Err(e) = fs::remove_file(&partial) {
            tracing::warn!(path = %partial.display(), %e, "removing the partial snapshot failed");
        }
        let (report, out) = written?;
        // The new name is durable once its directory is synced.
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| StandbyError::Sync { path: dir.to_owned(), source })?;
        let info = SnapshotInfo {
            path: path.to_owned(),
            bytes: out.len,
            data_bytes: out.data_bytes,
            hole_bytes: out.hole_bytes,
            regions: self.guest.regions.iter().map(|r| r.spec.to_string()).collect(),
            elapsed_ms: started.elapsed().as_secs_f64() * 1000.0,
        };
        tracing::info!(
            path = %path.display(),
            bytes = info.bytes,
            data_bytes = info.data_bytes,
            mismatches = report.mismatches,
            "standby: snapshot written"
        );
        Ok((report, info))
    }
}

/// Writes the guest into `file` (named `partial`), syncs it, and links it as `path`.
fn write_and_link(
    guest: &Guest,
    file: &File,
    partial: &Path,
    path: &Path,
) -> Result<(Report, Written), StandbyError> {
    let written = write_guest(guest, file)
        .map_err(|source| StandbyError::Write { path: partial.to_owned(), source })?;
    file.sync_all().map_err(|source| StandbyError::Sync { path: partial.to_owned(), source })?;
    // A hard link fails if `path` exists: no file is ever replaced, even one created since the
    // check in `standby`.
    fs::hard_link(partial, path).map_err(|source| match source.kind() {
        io::ErrorKind::AlreadyExists => StandbyError::Exists(path.to_owned()),
        _ => StandbyError::Publish { partial: partial.to_owned(), path: path.to_owned(), source },
    })?;
    Ok(written)
}

/// Totals of one written file.
#[derive(Debug, Default)]
struct Written {
    len: u64,
    data_bytes: u64,
    hole_bytes: u64,
}

/// Copies, verifies and writes every page of every region at its file offset.
fn write_guest(guest: &Guest, file: &File) -> io::Result<(Report, Written)> {
    let len = guest.regions.iter().map(|r| r.spec.offset + r.spec.size).max().unwrap_or(0);
    // Sized first: whatever is never written (zero blocks, gaps, the tail) stays a hole.
    file.set_len(len)?;
    let mut out = SparseWriter::new(file);
    let mut rec = Recorder::new("standby");
    for r in &guest.regions {
        let mut copy = vec![0u8; r.page_size];
        for global in r.first_page..r.first_page + r.pages {
            let Some(page) = guest.page(global) else {
                return Err(io::Error::other(format!("page {global} lies outside guest memory")));
            };
            let started = Instant::now();
            for (bytes, word) in copy.chunks_exact_mut(8).zip(page.memory) {
                bytes.copy_from_slice(&word.load(Ordering::Relaxed).to_ne_bytes());
            }
            let latency = started.elapsed();
            rec.verified(copy.len() as u64, latency, check_copy(guest, &page, &copy));
            out.write_at(r.spec.offset + page.offset, &copy)?;
        }
    }
    let (data_bytes, hole_bytes) = out.finish()?;
    Ok((rec.finish(), Written { len, data_bytes, hole_bytes }))
}

/// Checks a copy of a page against what the page must hold; describes a mismatch.
fn check_copy(guest: &Guest, page: &PageRef<'_>, copy: &[u8]) -> Option<String> {
    let state = usize::try_from(page.global).ok().and_then(|i| guest.states.get(i));
    // Only the foreground thread mutates page states and it is busy here: a state in flux is
    // a bug, reported as such rather than trusted.
    let Some(state) = state else {
        return Some(format!("page {}: its expected state was being changed", page.global));
    };
    let words = copy
        .chunks_exact(8)
        .map(|c| u64::from_ne_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]));
    first_difference_in(words, &expected(state, page.snapshot, page.global))
        .map(|diff| describe(page, state, diff))
}

/// Writes data blocks in long runs and seeks over all-zero 4 KiB blocks (holes).
#[derive(Debug)]
struct SparseWriter<'f> {
    file: &'f File,
    run_offset: u64,
    run: Vec<u8>,
    data_bytes: u64,
    hole_bytes: u64,
}

impl<'f> SparseWriter<'f> {
    fn new(file: &'f File) -> SparseWriter<'f> {
        SparseWriter { file, run_offset: 0, run: Vec::new(), data_bytes: 0, hole_bytes: 0 }
    }

    /// Writes `bytes` at `offset` (4 KiB-aligned), block by block.
    fn write_at(&mut self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        let mut at = offset;
        for block in bytes.chunks(PAGE_BYTES) {
            if is_zero(block) {
                self.flush()?;
                self.hole_bytes += block.len() as u64;
            } else {
                if !self.run.is_empty() && self.run_offset + self.run.len() as u64 != at {
                    self.flush()?;
                }
                if self.run.is_empty() {
                    self.run_offset = at;
                }
                self.run.extend_from_slice(block);
                if self.run.len() >= RUN_MAX {
                    self.flush()?;
                }
            }
            at += block.len() as u64;
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.run.is_empty() {
            self.file.write_all_at(&self.run, self.run_offset)?;
            self.data_bytes += self.run.len() as u64;
            self.run.clear();
        }
        Ok(())
    }

    /// Writes what is pending; returns (data bytes, hole bytes).
    fn finish(mut self) -> io::Result<(u64, u64)> {
        self.flush()?;
        Ok((self.data_bytes, self.hole_bytes))
    }
}

/// True when every byte is zero (word by word).
fn is_zero(block: &[u8]) -> bool {
    let mut words = block.chunks_exact(8);
    words.all(|c| c == [0u8; 8]) && words.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
// Test values are small and known: plain `as` casts.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_possible_wrap)]
mod tests {

    use super::*;
    use crate::memfile::tests::is_data;

    #[test]
    fn zero_blocks_become_holes_and_data_is_written_in_runs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let file = OpenOptions::new().create_new(true).read(true).write(true).open(&path).unwrap();
        file.set_len(64 << 10).unwrap();
        let mut page = vec![0u8; 16 << 10]; // four blocks: data, zero, data, data
        page[5] = 1;
        page[(8 << 10) + 4095] = 2;
        page[(12 << 10) + 8] = 3;
        let mut w = SparseWriter::new(&file);
        w.write_at(0, &page).unwrap();
        w.write_at(32 << 10, &page).unwrap();
        assert_eq!(w.finish().unwrap(), (24 << 10, 8 << 10));
        let bytes = fs::read(&path).unwrap();
        assert_eq!(&bytes[..16 << 10], &page[..]);
        assert_eq!(&bytes[32 << 10..48 << 10], &page[..]);
        assert!(bytes[16 << 10..32 << 10].iter().all(|&b| b == 0));
        for (offset, data) in [(0, true), (4 << 10, false), (8 << 10, true), (16 << 10, false)] {
            assert_eq!(is_data(&file, offset), data, "block at {offset:#x}");
        }
        assert!(!is_data(&file, 48 << 10), "the tail stays a hole");
    }

    #[test]
    fn the_partial_name_is_the_path_with_a_suffix() {
        assert_eq!(partial_path(Path::new("/a/b.mem")), Path::new("/a/b.mem.partial"));
        assert!(is_zero(&[0; 13]) && !is_zero(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]));
    }
}
