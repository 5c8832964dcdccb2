//! Synthetic snapshot memory files: every 4 KiB page is random bytes, an explicitly written page
//! of zeros, or a real sparse hole, chosen deterministically from a seed.
//!
//! The three kinds are what a pager meets in a real snapshot: dense guest data, pages the guest
//! zeroed (allocated in the file), and never-written memory (holes, which read as zeros). A
//! page's kind is a pure function of `(seed, page index)` ([`MemoryFileSpec::page_kind`]), and
//! the random bytes of each 2 MiB chunk come from a `SmallRng` seeded from `(seed, chunk)`, so
//! the same spec always produces the same file.
//!
//! A [`MemoryFileLayout`] lays the same kinds out in runs instead: consecutive pages of one kind,
//! as a real guest's memory has them (a freed buffer, an untouched heap), each run's length and
//! kind a pure function of `(seed, run index)`.

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
/// [`FILE_PAGE`] and a chunk's bytes as buffer lengths.
#[allow(clippy::cast_possible_truncation)] // 4096 and 2 MiB fit every usize
pub(crate) const PAGE_BYTES: usize = FILE_PAGE as usize;
#[allow(clippy::cast_possible_truncation)] // as above
const CHUNK_BYTES: usize = (FILE_PAGE * CHUNK_PAGES) as usize;
/// Salts keeping the kind choice and the content streams independent.
const KIND_SALT: u64 = 0x6b69_6e64_7361_6c74;
const DATA_SALT: u64 = 0x6461_7461_7361_6c74;
const RUN_LEN_SALT: u64 = 0x7275_6e6c_656e_6774;
const RUN_KIND_SALT: u64 = 0x7275_6e6b_696e_6473;

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
        self.kind_at(unit(mix(self.seed ^ KIND_SALT, index)))
    }

    /// The kind a uniform value `u` in [0, 1) picks with the spec's fractions.
    fn kind_at(&self, u: f64) -> PageKind {
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

    /// The same kinds laid out in runs of `run_pages` pages on average (0 or 1: page by page,
    /// this spec's own layout).
    pub fn in_runs(self, run_pages: u64) -> MemoryFileLayout {
        MemoryFileLayout { spec: self, run_pages }
    }
}

/// 53 random bits of `x` as a uniform value in [0, 1).
fn unit(x: u64) -> f64 {
    (x >> 11) as f64 / (1u64 << 53) as f64
}

/// A [`MemoryFileSpec`] whose kinds come in runs: the file is consecutive runs of whole pages,
/// each entirely random data, written zeros or a hole; a run's length is drawn uniformly from
/// `1..=2 * run_pages - 1` pages (mean `run_pages`) and its kind with the spec's fractions, so
/// the shares of zero pages and holes stay about the spec's. `run_pages` 0 or 1: page by page,
/// exactly [`write_memory_file`]'s file.
///
/// (A layout beside the spec rather than a field of it, so that every `MemoryFileSpec { .. }`
/// written before keeps meaning what it meant.)
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MemoryFileLayout {
    #[serde(flatten)]
    pub spec: MemoryFileSpec,
    /// Mean run length in pages; 0 or 1: page by page. Left out of the JSON when page by page,
    /// so such a layout describes itself exactly as its spec alone does.
    #[serde(default, skip_serializing_if = "page_by_page")]
    pub run_pages: u64,
}

fn page_by_page(run_pages: &u64) -> bool {
    *run_pages <= 1
}

impl From<MemoryFileSpec> for MemoryFileLayout {
    fn from(spec: MemoryFileSpec) -> Self {
        spec.in_runs(0)
    }
}

impl MemoryFileLayout {
    /// Checks the spec (any run length is valid).
    pub fn validate(&self) -> io::Result<()> {
        self.spec.validate()
    }

    /// The runs, in file order: `(pages, kind)`, the last one cut at the end of the file.
    /// Page by page: one run per page.
    pub fn runs(&self) -> Vec<(u64, PageKind)> {
        let pages = self.spec.pages();
        if page_by_page(&self.run_pages) {
            return (0..pages).map(|i| (1, self.spec.page_kind(i))).collect();
        }
        let longest = self.run_pages.saturating_mul(2) - 1;
        let mut runs = Vec::new();
        let (mut start, mut run) = (0u64, 0u64);
        while start < pages {
            // Uniform in 1..=longest (the modulo's bias is below 2^-50).
            let len = 1 + mix(self.spec.seed ^ RUN_LEN_SALT, run) % longest;
            let kind = self.spec.kind_at(unit(mix(self.spec.seed ^ RUN_KIND_SALT, run)));
            let len = len.min(pages - start);
            runs.push((len, kind));
            start += len;
            run += 1;
        }
        runs
    }

    /// Every page's kind, in file order.
    pub fn page_kinds(&self) -> Vec<PageKind> {
        self.runs().into_iter().flat_map(|(n, kind)| (0..n).map(move |_| kind)).collect()
    }

    /// Counts the pages of each kind (without generating the file).
    pub fn counts(&self) -> PageCounts {
        let mut counts = PageCounts::default();
        for (n, kind) in self.runs() {
            match kind {
                PageKind::Random => counts.random += n,
                PageKind::Zero => counts.zero += n,
                PageKind::Hole => counts.hole += n,
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
    write_kinds(path, spec, |index| spec.page_kind(index))
}

/// Writes the memory file `layout` describes to `path` (created or truncated); page by page,
/// this is [`write_memory_file`] of its spec. The random bytes are the same stream as there
/// (per 2 MiB chunk), only the kinds differ.
pub fn write_memory_file_layout(path: &Path, layout: &MemoryFileLayout) -> io::Result<()> {
    if page_by_page(&layout.run_pages) {
        return write_memory_file(path, &layout.spec);
    }
    layout.validate()?;
    let kinds = layout.page_kinds();
    write_kinds(path, &layout.spec, |index| {
        kinds[usize::try_from(index).expect("a page of the in-memory layout")]
    })
}

/// Writes a file of `spec.size` bytes whose page `index` is of kind `kind(index)`.
fn write_kinds(
    path: &Path,
    spec: &MemoryFileSpec,
    kind: impl Fn(u64) -> PageKind,
) -> io::Result<()> {
    spec.validate()?;
    let file = File::create(path)?;
    file.set_len(spec.size)?;
    let page = PAGE_BYTES;
    let mut buf = vec![0u8; CHUNK_BYTES];
    let pages = spec.pages();
    let mut first = 0;
    while first < pages {
        let n = CHUNK_PAGES.min(pages - first);
        let kinds: Vec<PageKind> = (first..first + n).map(&kind).collect();
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
// Test values are small and known: plain `as` casts.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_possible_wrap)]
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

    /// `write_memory_file` and `MemoryFileSpec::page_kind` as they were before layouts in runs
    /// existed, verbatim but for the names: the page-by-page file must stay exactly this.
    fn write_page_by_page_as_before(path: &Path, spec: &MemoryFileSpec) -> io::Result<()> {
        let page_kind = |index: u64| {
            let u = (mix(spec.seed ^ KIND_SALT, index) >> 11) as f64 / (1u64 << 53) as f64;
            if u < spec.hole_fraction {
                PageKind::Hole
            } else if u < spec.hole_fraction + spec.zero_fraction {
                PageKind::Zero
            } else {
                PageKind::Random
            }
        };
        spec.validate()?;
        let file = File::create(path)?;
        file.set_len(spec.size)?;
        let page = PAGE_BYTES;
        let mut buf = vec![0u8; CHUNK_BYTES];
        let pages = spec.pages();
        let mut first = 0;
        while first < pages {
            let n = CHUNK_PAGES.min(pages - first);
            let kinds: Vec<PageKind> = (first..first + n).map(page_kind).collect();
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

    /// The file's bytes and, per page, whether it is data (not a hole).
    fn contents(path: &Path) -> (Vec<u8>, Vec<bool>) {
        let file = File::open(path).unwrap();
        let len = file.metadata().unwrap().len();
        let data = (0..len / FILE_PAGE).map(|i| is_data(&file, i * FILE_PAGE)).collect();
        (std::fs::read(path).unwrap(), data)
    }

    /// Where the kind changes from one page to the next.
    fn kind_changes(kinds: &[PageKind]) -> usize {
        kinds.windows(2).filter(|w| w[0] != w[1]).count()
    }

    #[test]
    fn a_layout_page_by_page_is_the_file_as_before_byte_for_byte_and_hole_for_hole() {
        let dir = tempfile::tempdir().unwrap();
        let before = dir.path().join("before");
        for spec in [spec(5), MemoryFileSpec { size: 3 << 20, ..spec(6) }] {
            write_page_by_page_as_before(&before, &spec).unwrap();
            let expected = contents(&before);
            for (name, layout) in [("0", spec.in_runs(0)), ("1", spec.in_runs(1))] {
                let path = dir.path().join(name);
                write_memory_file_layout(&path, &layout).unwrap();
                assert!(contents(&path) == expected, "run_pages {name}: the file differs");
                let kinds: Vec<PageKind> = (0..spec.pages()).map(|i| spec.page_kind(i)).collect();
                assert_eq!(layout.page_kinds(), kinds);
                assert_eq!(layout.counts(), spec.counts());
            }
            write_memory_file(&dir.path().join("spec"), &spec).unwrap();
            assert!(contents(&dir.path().join("spec")) == expected);
        }
        // Page by page, a layout describes itself as its spec does (old stamps still match);
        // in runs it does not (they are rewritten), and it reads back as it was written.
        let s = spec(5);
        let described = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::to_string(&s.in_runs(1)).unwrap(), described);
        assert_eq!(serde_json::from_str::<MemoryFileLayout>(&described).unwrap(), s.in_runs(0));
        let runs = serde_json::to_string(&s.in_runs(32)).unwrap();
        assert_ne!(runs, described);
        assert_eq!(serde_json::from_str::<MemoryFileLayout>(&runs).unwrap(), s.in_runs(32));
    }

    #[test]
    fn a_layout_in_runs_has_runs_of_1_to_2n_minus_1_pages_with_the_specs_shares() {
        // The sizes and seed of uffd-bench's sparse file (--quick and full).
        for size in [256 << 20, 1 << 30] {
            let layout = MemoryFileSpec { size, ..spec(2) }.in_runs(32);
            let runs = layout.runs();
            let (last, whole) = runs.split_last().unwrap();
            assert!(whole.iter().all(|(n, _)| (1..=63).contains(n)), "a run outside 1..=63");
            assert!((1..=63).contains(&last.0));
            assert_eq!(runs.iter().map(|(n, _)| n).sum::<u64>(), layout.spec.pages());
            let mean = layout.spec.pages() as f64 / runs.len() as f64;
            assert!((30.0..34.0).contains(&mean), "mean run {mean} pages");
            let c = layout.counts();
            let pages = layout.spec.pages() as f64;
            let (zero, hole) = (c.zero as f64 / pages, c.hole as f64 / pages);
            assert!((zero + hole - 0.5).abs() <= 0.05, "{c:?}");
            assert!((zero - 0.25).abs() <= 0.05 && (hole - 0.25).abs() <= 0.05, "{c:?}");
            // Far fewer kind changes than page by page (about 0.6 per run against 0.6 per page).
            let changes = kind_changes(&layout.page_kinds());
            let scattered = kind_changes(&layout.spec.in_runs(1).page_kinds());
            assert!(changes * 16 < scattered, "{changes} changes in runs, {scattered} scattered");
        }
    }

    #[test]
    fn a_file_in_runs_holds_its_kinds_holes_are_real_and_the_seed_decides() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("runs");
        let layout = MemoryFileSpec { size: 8 << 20, ..spec(11) }.in_runs(32);
        write_memory_file_layout(&path, &layout).unwrap();
        let (data, allocated) = contents(&path);
        assert_eq!(data.len() as u64, layout.spec.size);
        let kinds = layout.page_kinds();
        for (index, kind) in kinds.iter().enumerate() {
            let bytes = &data[index * FILE_PAGE as usize..(index + 1) * FILE_PAGE as usize];
            let all_zero = bytes.iter().all(|&b| b == 0);
            match kind {
                PageKind::Random => assert!(!all_zero && allocated[index], "random page {index}"),
                PageKind::Zero => assert!(all_zero && allocated[index], "zero page {index}"),
                PageKind::Hole => assert!(all_zero && !allocated[index], "hole page {index}"),
            }
        }
        // Runs: in 2,048 pages, a few dozen kind changes rather than over a thousand.
        let scattered = kind_changes(&layout.spec.in_runs(1).page_kinds());
        let changes = kind_changes(&kinds);
        assert!(changes < 128 && scattered > 512, "{changes} in runs, {scattered} scattered");
        assert!(kinds.contains(&PageKind::Zero) && kinds.contains(&PageKind::Hole));
        // The file system agrees that holes are not allocated: blocks for the data pages only.
        use std::os::unix::fs::MetadataExt;
        let blocks = std::fs::metadata(&path).unwrap().blocks() * 512;
        let written = allocated.iter().filter(|&&a| a).count() as u64 * FILE_PAGE;
        assert!(blocks < layout.spec.size && blocks >= written, "{blocks} bytes allocated");
        // The same layout again: the same file; another seed: another.
        let again = dir.path().join("again");
        write_memory_file_layout(&again, &layout).unwrap();
        assert!(contents(&again) == (data, allocated));
        let other = MemoryFileLayout { spec: MemoryFileSpec { seed: 12, ..layout.spec }, ..layout };
        assert_ne!(other.page_kinds(), kinds);
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
