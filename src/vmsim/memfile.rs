//! Synthetic snapshot memory files: every 4 KiB page is random bytes, an explicitly written page
//! of zeros, or a real sparse hole, chosen deterministically from a seed.
//!
//! The three kinds are what a pager meets in a real snapshot: dense guest data, pages the guest
//! zeroed (allocated in the file), and never-written memory (holes, which read as zeros). A
//! page's kind is a pure function of `(seed, page index)` ([`MemoryFileSpec::page_kind`]), and
//! the random bytes of each 2 MiB chunk come from a `SmallRng` seeded from `(seed, chunk)`, so
//! the same spec always produces the same file.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};
use serde::{Deserialize, Serialize};

use super::mix;

/// Granularity of the file's page kinds.
pub const FILE_PAGE: u64 = 4096;
/// Pages generated and written per step (2 MiB).
const CHUNK_PAGES: u64 = 512;
/// Salts keeping the kind choice and the content streams independent.
const KIND_SALT: u64 = 0x6b69_6e64_7361_6c74;
const DATA_SALT: u64 = 0x6461_7461_7361_6c74;

/// What to generate.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MemoryFileSpec {
    /// File length in bytes; a multiple of 4096.
    pub size: u64,
    /// Seed of every choice and every random byte.
    pub seed: u64,
    /// Share of pages that are written zeros (allocated in the file).
    pub zero_fraction: f64,
    /// Share of pages that are sparse holes (never written).
    pub hole_fraction: f64,
}

/// The content of one 4 KiB page of a generated file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PageKind {
    /// Random bytes, never all zero (the first byte is forced odd).
    Random,
    /// Zero bytes, written (allocated).
    Zero,
    /// Not written: a sparse hole that reads as zeros.
    Hole,
}

/// How many pages of each kind a file has.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageCounts {
    pub random: u64,
    pub zero: u64,
    pub hole: u64,
}

impl MemoryFileSpec {
    /// Checks the spec: size a multiple of 4096, fractions within 0..=1 and summing to at most 1.
    pub fn validate(&self) -> io::Result<()> {
        let invalid = |msg: String| Err(io::Error::new(io::ErrorKind::InvalidInput, msg));
        if self.size % FILE_PAGE != 0 {
            return invalid(format!("size {} is not a multiple of {FILE_PAGE}", self.size));
        }
        for (name, f) in
            [("zero_fraction", self.zero_fraction), ("hole_fraction", self.hole_fraction)]
        {
            if !(0.0..=1.0).contains(&f) {
                return invalid(format!("{name} {f} is not within 0..=1"));
            }
        }
        if self.zero_fraction + self.hole_fraction > 1.0 {
            return invalid(format!(
                "zero_fraction {} + hole_fraction {} exceeds 1",
                self.zero_fraction, self.hole_fraction
            ));
        }
        Ok(())
    }

    /// Number of 4 KiB pages.
    pub fn pages(&self) -> u64 {
        self.size / FILE_PAGE
    }

    /// The kind of page `index`: a pure function of the seed and the index.
    pub fn page_kind(&self, index: u64) -> PageKind {
        // 53 random bits as a uniform value in [0, 1).
        let u = (mix(self.seed ^ KIND_SALT, index) >> 11) as f64 / (1u64 << 53) as f64;
        if u < self.hole_fraction {
            PageKind::Hole
        } else if u < self.hole_fraction + self.zero_fraction {
            PageKind::Zero
        } else {
            PageKind::Random
        }
    }

    /// Counts the pages of each kind (without generating the file).
    pub fn counts(&self) -> PageCounts {
        let mut counts = PageCounts::default();
        for index in 0..self.pages() {
            match self.page_kind(index) {
                PageKind::Random => counts.random += 1,
                PageKind::Zero => counts.zero += 1,
                PageKind::Hole => counts.hole += 1,
            }
        }
        counts
    }
}

/// Writes the memory file `spec` describes to `path` (created or truncated).
///
/// The file is first sized with `set_len`, so every page that is never written stays a real
/// hole; the other pages are written in runs of consecutive non-hole pages with `pwrite`,
/// generated 2 MiB at a time.
pub fn write_memory_file(path: &Path, spec: &MemoryFileSpec) -> io::Result<()> {
    spec.validate()?;
    let file = File::create(path)?;
    file.set_len(spec.size)?;
    let page = FILE_PAGE as usize;
    let mut buf = vec![0u8; page * CHUNK_PAGES as usize];
    let pages = spec.pages();
    let mut first = 0;
    while first < pages {
        let n = CHUNK_PAGES.min(pages - first);
        let kinds: Vec<PageKind> = (first..first + n).map(|i| spec.page_kind(i)).collect();
        if kinds.contains(&PageKind::Random) {
            let chunk_seed = mix(spec.seed ^ DATA_SALT, first / CHUNK_PAGES);
            SmallRng::seed_from_u64(chunk_seed).fill_bytes(&mut buf[..kinds.len() * page]);
        }
        for (i, kind) in kinds.iter().enumerate() {
            let bytes = &mut buf[i * page..(i + 1) * page];
            match kind {
                PageKind::Random => bytes[0] |= 1,
                PageKind::Zero => bytes.fill(0),
                PageKind::Hole => {}
            }
        }
        // Write each run of consecutive non-hole pages with one pwrite.
        let mut i = 0;
        while i < kinds.len() {
            if kinds[i] == PageKind::Hole {
                i += 1;
                continue;
            }
            let start = i;
            while i < kinds.len() && kinds[i] != PageKind::Hole {
                i += 1;
            }
            let offset = (first + start as u64) * FILE_PAGE;
            file.write_all_at(&buf[start * page..i * page], offset)?;
        }
        first += n;
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use std::os::fd::AsRawFd;

    use nix::unistd::{lseek, Whence};

    use super::*;

    fn spec(seed: u64) -> MemoryFileSpec {
        MemoryFileSpec { size: 4 << 20, seed, zero_fraction: 0.25, hole_fraction: 0.25 }
    }

    /// True when the 4 KiB page at `offset` holds data (is not inside a hole).
    pub(crate) fn is_data(file: &File, offset: u64) -> bool {
        let off = i64::try_from(offset).unwrap();
        match lseek(file.as_raw_fd(), off, Whence::SeekData) {
            Ok(next) => next == off,
            Err(nix::errno::Errno::ENXIO) => false,
            Err(e) => panic!("SEEK_DATA: {e}"),
        }
    }

    #[test]
    fn page_kinds_follow_the_requested_shares() {
        let counts = spec(1).counts();
        assert_eq!(counts.random + counts.zero + counts.hole, 1024);
        for n in [counts.zero, counts.hole] {
            assert!((200..=312).contains(&n), "{counts:?}");
        }
        assert!((440..=584).contains(&counts.random), "{counts:?}");
    }

    #[test]
    fn the_file_holds_exactly_the_kinds_the_spec_says_and_holes_are_real() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mem");
        let spec = spec(7);
        write_memory_file(&path, &spec).unwrap();
        let file = File::open(&path).unwrap();
        assert_eq!(file.metadata().unwrap().len(), spec.size);
        let data = std::fs::read(&path).unwrap();
        for index in 0..spec.pages() {
            let offset = index * FILE_PAGE;
            let bytes = &data[offset as usize..(offset + FILE_PAGE) as usize];
            let all_zero = bytes.iter().all(|&b| b == 0);
            match spec.page_kind(index) {
                PageKind::Random => {
                    assert!(!all_zero, "random page {index} is all zero");
                    assert!(is_data(&file, offset), "random page {index} is a hole");
                }
                PageKind::Zero => {
                    assert!(all_zero, "zero page {index}");
                    assert!(is_data(&file, offset), "zero page {index} was not written");
                }
                PageKind::Hole => {
                    assert!(all_zero, "hole page {index}");
                    assert!(!is_data(&file, offset), "hole page {index} is allocated");
                }
            }
        }
        // Random pages are dense: about half their bits are set.
        let ones: u64 = data.iter().map(|b| u64::from(b.count_ones())).sum();
        let random_bytes = spec.counts().random * FILE_PAGE;
        let share = ones as f64 / (random_bytes * 8) as f64;
        assert!((0.45..0.55).contains(&share), "{share}");
    }

    #[test]
    fn the_same_seed_gives_the_same_file_and_another_seed_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, c) = (dir.path().join("a"), dir.path().join("b"), dir.path().join("c"));
        write_memory_file(&a, &spec(3)).unwrap();
        write_memory_file(&b, &spec(3)).unwrap();
        write_memory_file(&c, &spec(4)).unwrap();
        let (a, b, c) =
            (std::fs::read(a).unwrap(), std::fs::read(b).unwrap(), std::fs::read(c).unwrap());
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn an_all_random_file_has_no_zero_page_and_an_all_hole_file_no_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m");
        let dense =
            MemoryFileSpec { size: 1 << 20, seed: 9, zero_fraction: 0.0, hole_fraction: 0.0 };
        write_memory_file(&path, &dense).unwrap();
        let data = std::fs::read(&path).unwrap();
        assert!(data.chunks(4096).all(|p| p.iter().any(|&b| b != 0)));
        let sparse = MemoryFileSpec { hole_fraction: 1.0, ..dense };
        write_memory_file(&path, &sparse).unwrap();
        let file = File::open(&path).unwrap();
        assert!(!is_data(&file, 0));
        assert_eq!(file.metadata().unwrap().len(), 1 << 20);
    }

    #[test]
    fn invalid_specs_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m");
        let ok = spec(1);
        for bad in [
            MemoryFileSpec { size: 4097, ..ok },
            MemoryFileSpec { zero_fraction: -0.1, ..ok },
            MemoryFileSpec { hole_fraction: f64::NAN, ..ok },
            MemoryFileSpec { zero_fraction: 0.6, hole_fraction: 0.6, ..ok },
        ] {
            let err = write_memory_file(&path, &bad).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{bad:?}");
        }
        assert!(!path.exists());
    }
}
