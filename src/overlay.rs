//! Per-session overlay pages: bytes one session's guest reads at some offsets of the memory file
//! instead of the file's own (a network configuration, an identity, a mailbox), so that many VMs
//! restored from one snapshot each get pages of their own while the snapshot stays untouched.
//!
//! The supervisor checks the overlays at CreateSession ([`load`]: page aligned, whole pages,
//! inside the memory file, no overlaps, within a total, paths readable) and puts their bytes, one
//! after the other, into a sealed memfd (nobody can change or resize it afterwards). At the
//! handshake it checks them against the regions ([`check_regions`]: inside one region's file
//! range, aligned to its page size). The memfd travels with the session (one more descriptor of
//! the handoff, see `crate::handoff`), and the list of [`OverlaySpan`]s with the request; the
//! supervisor keeps its copy, so a pager that adopts the session after a crash gets it too.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};

use serde::{Deserialize, Serialize};

use crate::firecracker::Region;

/// Overlay offsets and lengths are multiples of this (and of a 2 MiB region's page size).
pub const OVERLAY_ALIGN: u64 = 4096;

/// One overlay: `len` bytes at `offset` of the memory file, found at `data_offset` of the
/// session's overlay memfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverlaySpan {
    pub offset: u64,
    pub len: u64,
    pub data_offset: u64,
}

impl OverlaySpan {
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// Where an overlay's bytes come from, as CreateSession gives them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OverlaySource {
    Data(Vec<u8>),
    /// A file read once, at CreateSession.
    Path(String),
    /// Neither was given.
    Missing,
}

/// One overlay of a CreateSession request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlayInput {
    pub offset: u64,
    pub source: OverlaySource,
}

/// Why an overlay was refused. Each names the overlay by its index in the request and its offset.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    #[error("overlay {index} (offset {offset}): neither data nor path is set")]
    NoSource { index: usize, offset: u64 },
    #[error("overlay {index} (offset {offset}): the offset is not a multiple of {OVERLAY_ALIGN}")]
    Unaligned { index: usize, offset: u64 },
    #[error("overlay {index} (offset {offset}): it holds no bytes")]
    Empty { index: usize, offset: u64 },
    #[error(
        "overlay {index} (offset {offset}): {len} bytes is not a whole number of \
         {OVERLAY_ALIGN}-byte pages"
    )]
    NotWholePages { index: usize, offset: u64, len: u64 },
    #[error(
        "overlay {index} (offset {offset}): bytes [{offset}, {end}) lie outside the memory file \
         ({file_len} bytes), so outside every region's file range"
    )]
    OutsideFile { index: usize, offset: u64, end: u64, file_len: u64 },
    #[error("overlay {index} (offset {offset}) overlaps overlay {other} (offset {other_offset})")]
    Overlap { index: usize, offset: u64, other: usize, other_offset: u64 },
    #[error(
        "the overlays hold {total} bytes, more than the {max} bytes a session may have \
         (the supervisor's --max-overlay-bytes)"
    )]
    TooLarge { total: u64, max: u64 },
    #[error("overlay {index} (offset {offset}): path {path:?} is not absolute")]
    PathNotAbsolute { index: usize, offset: u64, path: String },
    #[error("overlay {index} (offset {offset}): cannot read {path}: {source}")]
    Unreadable { index: usize, offset: u64, path: String, source: io::Error },
    #[error(
        "overlay {index} (offset {offset}): bytes [{offset}, {end}) lie in no single region's \
         file range"
    )]
    OutsideRegions { index: usize, offset: u64, end: u64 },
    #[error(
        "overlay {index} (offset {offset}, {len} bytes): not a whole number of the \
         {page_size}-byte pages of the region at file offset {region_offset}"
    )]
    RegionPages { index: usize, offset: u64, len: u64, page_size: u64, region_offset: u64 },
    #[error("the overlay data is {len} bytes, the overlays need {need}")]
    ShortData { len: u64, need: u64 },
    #[error("the overlay memfd: {0}")]
    Memfd(io::Error),
}

/// A session's checked overlays: where they go, and the sealed memfd holding their bytes.
#[derive(Debug)]
pub struct Overlays {
    pub spans: Vec<OverlaySpan>,
    pub fd: OwnedFd,
}

impl Overlays {
    /// Bytes of every overlay together.
    pub fn bytes(&self) -> u64 {
        total_bytes(&self.spans)
    }
}

/// Bytes of `spans` together.
pub fn total_bytes(spans: &[OverlaySpan]) -> u64 {
    spans.iter().map(|s| s.len).sum()
}

/// Checks the overlays of a CreateSession request against the memory file's length and the
/// per-session total, reads the ones given by path, and puts every overlay's bytes into a sealed
/// memfd. `None` without overlays. Blocking (reads files): run it on a blocking-pool thread.
pub fn load(
    inputs: Vec<OverlayInput>,
    file_len: u64,
    max_total: u64,
) -> Result<Option<Overlays>, OverlayError> {
    if inputs.is_empty() {
        return Ok(None);
    }
    // Lengths first (a path's from its metadata), so that nothing is read past the total.
    let mut spans = Vec::with_capacity(inputs.len());
    let mut data_offset = 0;
    for (index, input) in inputs.iter().enumerate() {
        let offset = input.offset;
        let len = match &input.source {
            OverlaySource::Data(d) => d.len() as u64,
            OverlaySource::Path(path) => {
                if !std::path::Path::new(path).is_absolute() {
                    return Err(OverlayError::PathNotAbsolute {
                        index,
                        offset,
                        path: path.clone(),
                    });
                }
                let unreadable =
                    |source| OverlayError::Unreadable { index, offset, path: path.clone(), source };
                let meta = std::fs::metadata(path).map_err(unreadable)?;
                if !meta.is_file() {
                    return Err(unreadable(io::Error::other("not a regular file")));
                }
                meta.len()
            }
            OverlaySource::Missing => return Err(OverlayError::NoSource { index, offset }),
        };
        spans.push(OverlaySpan { offset, len, data_offset });
        data_offset = data_offset.saturating_add(len);
    }
    check_spans(&spans, file_len, max_total)?;
    let memfd = new_memfd().map_err(OverlayError::Memfd)?;
    let mut file = File::from(memfd);
    for (index, (input, span)) in inputs.into_iter().zip(&spans).enumerate() {
        match input.source {
            OverlaySource::Data(d) => file.write_all(&d).map_err(OverlayError::Memfd)?,
            OverlaySource::Path(path) => {
                let unreadable = |source| OverlayError::Unreadable {
                    index,
                    offset: span.offset,
                    path: path.clone(),
                    source,
                };
                let mut src = File::open(&path).map_err(unreadable)?;
                // Exactly the length checked above: a file that changed meanwhile is refused.
                let copied =
                    io::copy(&mut (&mut src).take(span.len), &mut file).map_err(unreadable)?;
                let mut more = [0u8; 1];
                if copied != span.len || src.read(&mut more).map_err(unreadable)? != 0 {
                    return Err(unreadable(io::Error::other("the file changed while read")));
                }
            }
            OverlaySource::Missing => unreachable!("refused above"),
        }
    }
    let fd = seal(OwnedFd::from(file)).map_err(OverlayError::Memfd)?;
    Ok(Some(Overlays { spans, fd }))
}

/// Checks overlays against the memory file: each page aligned, whole pages, inside the file; no
/// two overlapping; their total at most `max_total`.
pub fn check_spans(
    spans: &[OverlaySpan],
    file_len: u64,
    max_total: u64,
) -> Result<(), OverlayError> {
    for (index, s) in spans.iter().enumerate() {
        let offset = s.offset;
        if offset % OVERLAY_ALIGN != 0 {
            return Err(OverlayError::Unaligned { index, offset });
        }
        if s.len == 0 {
            return Err(OverlayError::Empty { index, offset });
        }
        if s.len % OVERLAY_ALIGN != 0 {
            return Err(OverlayError::NotWholePages { index, offset, len: s.len });
        }
        match offset.checked_add(s.len) {
            Some(end) if end <= file_len => {}
            end => {
                let end = end.unwrap_or(u64::MAX);
                return Err(OverlayError::OutsideFile { index, offset, end, file_len });
            }
        }
    }
    let mut order: Vec<usize> = (0..spans.len()).collect();
    order.sort_by_key(|&i| spans[i].offset);
    for pair in order.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        if spans[b].offset < spans[a].end() {
            let (index, other) = (a.max(b), a.min(b));
            return Err(OverlayError::Overlap {
                index,
                offset: spans[index].offset,
                other,
                other_offset: spans[other].offset,
            });
        }
    }
    let total = spans.iter().fold(0u64, |t, s| t.saturating_add(s.len));
    if total > max_total {
        return Err(OverlayError::TooLarge { total, max: max_total });
    }
    Ok(())
}

/// Checks overlays against a session's regions: each lies inside one region's file range, and
/// its offset and length are multiples of that region's page size (2 MiB pages in 2 MiB units).
pub fn check_regions(spans: &[OverlaySpan], regions: &[Region]) -> Result<(), OverlayError> {
    for (index, s) in spans.iter().enumerate() {
        let (offset, end) = (s.offset, s.end());
        let Some(r) = regions.iter().find(|r| r.offset <= offset && end <= r.offset + r.size)
        else {
            return Err(OverlayError::OutsideRegions { index, offset, end });
        };
        if (offset - r.offset) % r.page_size != 0 || s.len % r.page_size != 0 {
            return Err(OverlayError::RegionPages {
                index,
                offset,
                len: s.len,
                page_size: r.page_size,
                region_offset: r.offset,
            });
        }
    }
    Ok(())
}

/// Bytes an overlay memfd must hold at least for `spans`.
pub fn data_len(spans: &[OverlaySpan]) -> u64 {
    spans.iter().map(|s| s.data_offset.saturating_add(s.len)).max().unwrap_or(0)
}

/// A sealed memfd holding `bytes` (a restarted supervisor rebuilds a session's overlay memfd
/// from the copy in its runtime directory).
pub fn memfd_of(bytes: &[u8]) -> io::Result<OwnedFd> {
    let mut file = File::from(new_memfd()?);
    file.write_all(bytes)?;
    seal(OwnedFd::from(file))
}

fn new_memfd() -> io::Result<OwnedFd> {
    use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
    memfd_create(
        c"uffd-overlays",
        MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING,
    )
    .map_err(io::Error::from)
}

/// Seals a memfd against every change: its bytes and length stay what the checks saw.
fn seal(fd: OwnedFd) -> io::Result<OwnedFd> {
    use nix::fcntl::{fcntl, FcntlArg, SealFlag};
    let seals = SealFlag::F_SEAL_WRITE
        | SealFlag::F_SEAL_SHRINK
        | SealFlag::F_SEAL_GROW
        | SealFlag::F_SEAL_SEAL;
    fcntl(fd.as_raw_fd(), FcntlArg::F_ADD_SEALS(seals)).map_err(io::Error::from)?;
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(offset: u64, len: u64) -> OverlaySpan {
        OverlaySpan { offset, len, data_offset: 0 }
    }

    fn data(offset: u64, len: usize, byte: u8) -> OverlayInput {
        OverlayInput { offset, source: OverlaySource::Data(vec![byte; len]) }
    }

    #[test]
    fn overlays_are_put_one_after_the_other_into_a_sealed_memfd() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ov");
        std::fs::write(&path, vec![2u8; 8192]).unwrap();
        let inputs = vec![
            data(4096, 4096, 1),
            OverlayInput { offset: 16384, source: OverlaySource::Path(path.display().to_string()) },
        ];
        let o = load(inputs, 1 << 20, 1 << 20).unwrap().unwrap();
        assert_eq!(
            o.spans,
            vec![
                OverlaySpan { offset: 4096, len: 4096, data_offset: 0 },
                OverlaySpan { offset: 16384, len: 8192, data_offset: 4096 },
            ]
        );
        assert_eq!(o.bytes(), 12288);
        // The descriptor's file position is past the bytes written: read from the start.
        let mut bytes = vec![0u8; 12288];
        let f = File::from(o.fd.try_clone().unwrap());
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut bytes, 0).unwrap();
        assert_eq!(f.metadata().unwrap().len(), 12288);
        assert_eq!(&bytes[..4096], &[1u8; 4096][..]);
        assert_eq!(&bytes[4096..], &[2u8; 8192][..]);
        let err = File::from(o.fd).write_all(b"x").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPERM), "sealed: {err}");
    }

    #[test]
    fn no_overlays_make_no_memfd() {
        assert!(load(vec![], 4096, 0).unwrap().is_none());
    }

    #[test]
    fn each_invalid_overlay_is_refused_naming_it_and_the_reason() {
        let cases: Vec<(Vec<OverlaySpan>, &str)> = vec![
            (
                vec![span(4096, 4096), span(100, 4096)],
                "overlay 1 (offset 100): the offset is not a multiple",
            ),
            (vec![span(0, 0)], "overlay 0 (offset 0): it holds no bytes"),
            (vec![span(0, 100)], "100 bytes is not a whole number of 4096-byte pages"),
            (
                vec![span(1 << 20, 4096)],
                "overlay 0 (offset 1048576): bytes [1048576, 1052672) lie outside the memory file",
            ),
            (
                vec![span(0, 8192), span(4096, 4096)],
                "overlay 1 (offset 4096) overlaps overlay 0 (offset 0)",
            ),
            (
                vec![span(0, 8192), span(8192, 8192)],
                "the overlays hold 16384 bytes, more than the 12288",
            ),
        ];
        for (spans, want) in cases {
            let e = check_spans(&spans, 1 << 20, 12288).unwrap_err().to_string();
            assert!(e.contains(want), "{spans:?}: {e}");
        }
        assert!(check_spans(&[span(0, 4096), span(4096, 8192)], 1 << 20, 12288).is_ok());
    }

    #[test]
    fn an_unreadable_or_relative_path_is_refused_naming_the_overlay() {
        let missing = OverlayInput {
            offset: 8192,
            source: OverlaySource::Path("/nonexistent/overlay".into()),
        };
        let e = load(vec![data(0, 4096, 1), missing], 1 << 20, 1 << 20).unwrap_err().to_string();
        assert!(e.starts_with("overlay 1 (offset 8192): cannot read /nonexistent/overlay"), "{e}");
        let relative = OverlayInput { offset: 0, source: OverlaySource::Path("ov".into()) };
        let e = load(vec![relative], 1 << 20, 1 << 20).unwrap_err().to_string();
        assert!(e.contains("is not absolute"), "{e}");
        let none = OverlayInput { offset: 0, source: OverlaySource::Missing };
        let e = load(vec![none], 1 << 20, 1 << 20).unwrap_err().to_string();
        assert!(e.contains("neither data nor path"), "{e}");
    }

    #[test]
    fn overlays_must_lie_in_one_region_and_fill_whole_pages_of_it() {
        const M2: u64 = 2 << 20;
        let regions = [
            Region { base: 0x10_0000_0000, size: 4 << 20, offset: 0, page_size: 4096 },
            Region { base: 0x20_0000_0000, size: 4 << 20, offset: 4 << 20, page_size: M2 },
        ];
        assert!(check_regions(&[span(4096, 4096), span(4 << 20, M2)], &regions).is_ok());
        let e = check_regions(&[span((4 << 20) + 4096, 4096)], &regions).unwrap_err().to_string();
        assert!(e.contains("overlay 0") && e.contains("2097152-byte pages"), "{e}");
        let e = check_regions(&[span((4 << 20) - 4096, 8192)], &regions).unwrap_err().to_string();
        assert!(e.contains("no single region's file range"), "{e}");
        let e = check_regions(&[span(8 << 20, 4096)], &regions).unwrap_err().to_string();
        assert!(e.contains("no single region"), "{e}");
    }
}
