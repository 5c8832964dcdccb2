//! Working-set recordings (issue 15): the order in which a VM first touched its pages, saved by
//! the pager that served it, and read back by a later session restored from the same snapshot,
//! whose pager then copies those pages in bulk before the VM asks for them.
//!
//! A recording holds **no page data**, only where pages are (memory-file offsets): a prefetch
//! always copies from the session's own memory file. So a stale or foreign recording can never
//! put wrong bytes in a guest; at worst it prefetches useless pages. It is refused anyway (a
//! recording is only worth its order), by the checks below.
//!
//! The file (version 1, little endian):
//!
//! ```text
//!  0  magic            8 bytes  "UFFDWSET"
//!  8  format version   u32      1
//! 12  region count     u32      R
//! 16  run count        u64      N
//! 24  memory file size u64      identity of the snapshot: its length,
//! 32  head crc32       u32        the CRC-32 of its first MiB (or all of it, if shorter),
//! 36  tail crc32       u32        the CRC-32 of its last MiB
//! 40  recorded at      u64      milliseconds since the Unix epoch
//! 48  regions          R x {file offset u64, size u64, page size u64}
//!  .  runs             N x {file offset u64, length u64}, in first-touch order
//!  .  checksum         u32      CRC-32 of every byte before it
//! ```
//!
//! Why size + content hashes, not (dev, ino, mtime): a snapshot is copied between hosts and
//! restored from backups, which changes its inode, device and mtime while its pages stay the
//! same (a recording must keep working there); and a snapshot rewritten in place keeps its
//! inode. The first MiB of guest memory holds the guest kernel's low memory (page tables, boot
//! data) and the last MiB its top allocations: two snapshots of one VM differ there. Two
//! different snapshots of one size with identical first and last MiB would pass: their
//! recording then only prefetches less useful pages, never wrong bytes (see above).

mod file_io;
mod run_recorder;

use std::io;
use std::os::unix::fs::FileExt;

pub use file_io::{check_path, read, write_atomically, PathError, ReadError};
pub use run_recorder::{PageRun, RunRecorder};

use crate::firecracker::Region;

/// The file's first 8 bytes.
pub const MAGIC: &[u8; 8] = b"UFFDWSET";
/// The format version this code writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Bytes of the memory file hashed at each end for its identity.
pub const IDENTITY_SPAN: u64 = 1 << 20;
/// The most runs a recording may hold (16 bytes each: 16 MiB).
pub const MAX_RUNS: usize = 1 << 20;
/// The most regions a recording may describe.
pub const MAX_REGIONS: usize = 64;

const HEADER_LEN: usize = 48;
const REGION_LEN: usize = 24;
const RUN_LEN: usize = 16;

/// Who a memory file is: what a recording must match to be used for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileIdentity {
    pub size: u64,
    pub head_crc: u32,
    pub tail_crc: u32,
}

impl FileIdentity {
    /// Reads the identity of an open memory file (`pread`: 2 MiB at most). Blocking.
    pub fn of(file: &std::fs::File) -> io::Result<Self> {
        let size = file.metadata()?.len();
        let span = size.min(IDENTITY_SPAN);
        let crc_at = |offset: u64| -> io::Result<u32> {
            let mut buf = vec![0u8; usize::try_from(span).map_err(io::Error::other)?];
            file.read_exact_at(&mut buf, offset)?;
            Ok(crc32fast::hash(&buf))
        };
        Ok(Self { size, head_crc: crc_at(0)?, tail_crc: crc_at(size - span)? })
    }

    /// Why `self` (the recording's) is not `current` (the memory file's), if it is not.
    pub fn mismatch(&self, current: &FileIdentity) -> Option<String> {
        if self.size != current.size {
            return Some(format!(
                "it was recorded for a memory file of {} bytes, this one has {}",
                self.size, current.size
            ));
        }
        if (self.head_crc, self.tail_crc) != (current.head_crc, current.tail_crc) {
            return Some(format!(
                "it was recorded for another memory file of the same size (content hashes {:08x}/{:08x}, this file's {:08x}/{:08x})",
                self.head_crc, self.tail_crc, current.head_crc, current.tail_crc
            ));
        }
        None
    }
}

/// A guest memory region as a recording describes it: where it lies in the memory file (guest
/// addresses change from one restore to the next).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordedRegion {
    pub offset: u64,
    pub size: u64,
    pub page_size: u64,
}

impl From<&Region> for RecordedRegion {
    fn from(r: &Region) -> Self {
        Self { offset: r.offset, size: r.size, page_size: r.page_size }
    }
}

/// A run of pages first touched together: `len` bytes from `offset` of the memory file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileRun {
    pub offset: u64,
    pub len: u64,
}

/// A whole recording.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recording {
    pub identity: FileIdentity,
    pub recorded_at_ms: u64,
    pub regions: Vec<RecordedRegion>,
    pub runs: Vec<FileRun>,
}

/// Why a recording cannot be used. Each says what is wrong with the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("it is {0} bytes long, shorter than a recording's header")]
    TooShort(usize),
    #[error("it is not a working-set recording (no UFFDWSET magic)")]
    BadMagic,
    #[error("its format version {0} is not supported (this pager reads version {FORMAT_VERSION})")]
    UnsupportedVersion(u32),
    #[error("it lists {count} {what}, more than the {max} allowed")]
    TooMany { what: &'static str, count: u64, max: usize },
    #[error("it is {got} bytes long, but its header announces {expected} (truncated?)")]
    Length { expected: u64, got: usize },
    #[error("its checksum does not match (stored {stored:08x}, computed {computed:08x}): the file is corrupt")]
    Checksum { stored: u32, computed: u32 },
    #[error("region {index} is not valid: {why}")]
    BadRegion { index: usize, why: String },
    #[error("run {index} ({len} bytes at offset {offset}) is not valid: {why}")]
    BadRun { index: usize, offset: u64, len: u64, why: &'static str },
}

/// Why a recording does not fit a session.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FitError {
    #[error("{0}")]
    OtherSnapshot(String),
    #[error("it was recorded with regions {recorded:?}, the VMM restored {current:?}")]
    Layout { recorded: Vec<RecordedRegion>, current: Vec<RecordedRegion> },
}

impl Recording {
    /// The bytes of the file.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(
            HEADER_LEN + self.regions.len() * REGION_LEN + self.runs.len() * RUN_LEN + 4,
        );
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        b.extend_from_slice(&u32::try_from(self.regions.len()).unwrap_or(u32::MAX).to_le_bytes());
        b.extend_from_slice(&(self.runs.len() as u64).to_le_bytes());
        b.extend_from_slice(&self.identity.size.to_le_bytes());
        b.extend_from_slice(&self.identity.head_crc.to_le_bytes());
        b.extend_from_slice(&self.identity.tail_crc.to_le_bytes());
        b.extend_from_slice(&self.recorded_at_ms.to_le_bytes());
        for r in &self.regions {
            for v in [r.offset, r.size, r.page_size] {
                b.extend_from_slice(&v.to_le_bytes());
            }
        }
        for run in &self.runs {
            b.extend_from_slice(&run.offset.to_le_bytes());
            b.extend_from_slice(&run.len.to_le_bytes());
        }
        let crc = crc32fast::hash(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parses and checks a file's bytes: every field, the checksum, every run inside one region
    /// and aligned to its pages.
    pub fn decode(b: &[u8]) -> Result<Self, FormatError> {
        if b.len() < HEADER_LEN + 4 {
            return Err(FormatError::TooShort(b.len()));
        }
        if &b[..8] != MAGIC {
            return Err(FormatError::BadMagic);
        }
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        let version = u32_at(8);
        if version != FORMAT_VERSION {
            return Err(FormatError::UnsupportedVersion(version));
        }
        let (nregions, nruns) = (u64::from(u32_at(12)), u64_at(16));
        let at_most = |count: u64, what: &'static str, max: usize| {
            usize::try_from(count).ok().filter(|n| *n <= max).ok_or(FormatError::TooMany {
                what,
                count,
                max,
            })
        };
        let (regions_count, runs_count) =
            (at_most(nregions, "regions", MAX_REGIONS)?, at_most(nruns, "runs", MAX_RUNS)?);
        let expected =
            (HEADER_LEN as u64) + nregions * REGION_LEN as u64 + nruns * RUN_LEN as u64 + 4;
        if b.len() as u64 != expected {
            return Err(FormatError::Length { expected, got: b.len() });
        }
        let body = b.len() - 4;
        let (stored, computed) = (u32_at(body), crc32fast::hash(&b[..body]));
        if stored != computed {
            return Err(FormatError::Checksum { stored, computed });
        }
        let identity =
            FileIdentity { size: u64_at(24), head_crc: u32_at(32), tail_crc: u32_at(36) };
        let mut at = HEADER_LEN;
        let mut regions = Vec::new();
        for index in 0..regions_count {
            let r = RecordedRegion {
                offset: u64_at(at),
                size: u64_at(at + 8),
                page_size: u64_at(at + 16),
            };
            at += REGION_LEN;
            check_region(&r, identity.size, regions.last())
                .map_err(|why| FormatError::BadRegion { index, why })?;
            regions.push(r);
        }
        let mut runs = Vec::new();
        for index in 0..runs_count {
            let run = FileRun { offset: u64_at(at), len: u64_at(at + 8) };
            at += RUN_LEN;
            check_run(&run, &regions).map_err(|why| FormatError::BadRun {
                index,
                offset: run.offset,
                len: run.len,
                why,
            })?;
            runs.push(run);
        }
        Ok(Self { identity, recorded_at_ms: u64_at(40), regions, runs })
    }

    /// Checks that the recording was made for this memory file and this region layout.
    pub fn fits(&self, file: &FileIdentity, regions: &[Region]) -> Result<(), FitError> {
        if let Some(why) = self.identity.mismatch(file) {
            return Err(FitError::OtherSnapshot(why));
        }
        let current: Vec<RecordedRegion> = regions.iter().map(RecordedRegion::from).collect();
        if current != self.regions {
            return Err(FitError::Layout { recorded: self.regions.clone(), current });
        }
        Ok(())
    }

    /// Bytes of every run.
    pub fn total_bytes(&self) -> u64 {
        self.runs.iter().map(|r| r.len).sum()
    }

    /// The runs as page ranges of the regions (the same layout: see [`Recording::fits`]):
    /// `(region index, first page, end page)`, in recorded order.
    pub fn page_runs(&self) -> Vec<(usize, u64, u64)> {
        self.runs
            .iter()
            .filter_map(|run| {
                let i = self.regions.iter().position(|r| contains(r, run))?;
                let r = &self.regions[i];
                let first = (run.offset - r.offset) / r.page_size;
                Some((i, first, first + run.len / r.page_size))
            })
            .collect()
    }
}

fn contains(r: &RecordedRegion, run: &FileRun) -> bool {
    run.offset >= r.offset && run.offset.saturating_add(run.len) <= r.offset + r.size
}

fn check_region(
    r: &RecordedRegion,
    file_size: u64,
    previous: Option<&RecordedRegion>,
) -> Result<(), String> {
    if r.page_size != 4096 && r.page_size != 2 << 20 {
        return Err(format!("page size {} is neither 4 KiB nor 2 MiB", r.page_size));
    }
    if r.size == 0 || r.size % r.page_size != 0 || r.offset % r.page_size != 0 {
        return Err(format!(
            "{} bytes at offset {} are not whole {}-byte pages",
            r.size, r.offset, r.page_size
        ));
    }
    if r.offset.checked_add(r.size).is_none_or(|end| end > file_size) {
        return Err(format!("it ends past the memory file's {file_size} bytes"));
    }
    if previous.is_some_and(|p| p.offset + p.size > r.offset) {
        return Err("it overlaps or precedes the region before it".into());
    }
    Ok(())
}

fn check_run(run: &FileRun, regions: &[RecordedRegion]) -> Result<(), &'static str> {
    if run.len == 0 {
        return Err("it is empty");
    }
    let Some(r) = regions.iter().find(|r| contains(r, run)) else {
        return Err("it lies in no single region");
    };
    if run.offset % r.page_size != 0 || run.len % r.page_size != 0 {
        return Err("it is not whole pages of its region");
    }
    Ok(())
}

#[cfg(test)]
mod tests;
