//! A session's overlay pages (see `uffdpager::overlay`): where, in each region, the guest reads
//! the overlay memfd's bytes instead of the memory file's, and the choice of the copy source that
//! every fill makes (faults, read-ahead, graduation's sweep, copy threads). Overlay pages are
//! never left missing as zero pages: their snapshot page may be zero, their overlay is not.

use std::ops::Range;
use std::os::fd::OwnedFd;

use memmap2::Mmap;
use uffdpager::firecracker::Region;
use uffdpager::overlay::{self, OverlaySpan};

use crate::memory_file::MappedFile;

/// One overlay in region pages: pages `[pages.start, pages.end)` read from `data_offset` on.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PageSpan {
    pages: Range<u64>,
    data_offset: u64,
}

/// Why a handed-over session's overlays cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum OverlayOpenError {
    #[error("the handoff lists overlays without their memfd")]
    NoData,
    #[error(transparent)]
    Invalid(#[from] overlay::OverlayError),
    #[error("mapping the overlay memfd: {0}")]
    Map(std::io::Error),
}

/// The overlays of one session, by region (in the session's region order).
#[derive(Debug, Default)]
pub struct SessionOverlays {
    by_region: Vec<Vec<PageSpan>>,
    /// The memfd's bytes, mapped read-only (`None` without overlays).
    map: Option<Mmap>,
    /// The memfd itself, held as long as the session is served (and duplicated for a
    /// restarted supervisor's give-back).
    fd: Option<OwnedFd>,
    /// The spans as handed over, for the give-back.
    spans: Vec<OverlaySpan>,
    count: u32,
    bytes: u64,
}

impl SessionOverlays {
    /// Checks `spans` against `regions` (as the supervisor did) and the memfd's length, and maps
    /// the memfd. No spans: no overlays (a memfd sent anyway is closed).
    pub fn open(
        spans: &[OverlaySpan],
        fd: Option<OwnedFd>,
        regions: &[Region],
    ) -> Result<Self, OverlayOpenError> {
        if spans.is_empty() {
            return Ok(Self::default());
        }
        let fd = fd.ok_or(OverlayOpenError::NoData)?;
        overlay::check_regions(spans, regions)?;
        let file = std::fs::File::from(fd);
        let len = file.metadata().map_err(OverlayOpenError::Map)?.len();
        let need = overlay::data_len(spans);
        if len < need {
            return Err(overlay::OverlayError::ShortData { len, need }.into());
        }
        // SAFETY: the supervisor sealed the memfd against writes, shrinking and growing
        // (`uffdpager::overlay`), so the mapping's bytes never change and never go away under it.
        let map = unsafe { Mmap::map(&file) }.map_err(OverlayOpenError::Map)?;
        let mut by_region = vec![Vec::new(); regions.len()];
        for s in spans {
            for (ri, r) in regions.iter().enumerate() {
                if r.offset <= s.offset && s.end() <= r.offset + r.size {
                    let first = (s.offset - r.offset) / r.page_size;
                    let pages = first..first + s.len / r.page_size;
                    by_region[ri].push(PageSpan { pages, data_offset: s.data_offset });
                }
            }
        }
        for spans in &mut by_region {
            spans.sort_by_key(|s| s.pages.start);
        }
        Ok(Self {
            by_region,
            map: Some(map),
            fd: Some(OwnedFd::from(file)),
            spans: spans.to_vec(),
            count: u32::try_from(spans.len()).unwrap_or(u32::MAX),
            bytes: overlay::total_bytes(spans),
        })
    }

    /// The spans and a duplicate of the memfd, as a handoff carries them (none: no overlays).
    pub fn handoff_parts(&self) -> std::io::Result<(Vec<OverlaySpan>, Option<OwnedFd>)> {
        let fd = self.fd.as_ref().map(|f| f.try_clone()).transpose()?;
        Ok((self.spans.clone(), fd))
    }

    /// Overlays, and their bytes in all.
    pub fn figures(&self) -> (u32, u64) {
        (self.count, self.bytes)
    }

    /// The overlay holding page `p` of region `ri`: its end page, and the memfd offset of `p`.
    pub fn at(&self, ri: usize, p: u64, page_size: u64) -> Option<(u64, u64)> {
        let spans = self.by_region.get(ri)?;
        let i = spans.partition_point(|s| s.pages.start <= p).checked_sub(1)?;
        let s = &spans[i];
        (p < s.pages.end).then(|| (s.pages.end, s.data_offset + (p - s.pages.start) * page_size))
    }

    /// The first overlay page of region `ri` after `p`, if any.
    fn next_start_after(&self, ri: usize, p: u64) -> Option<u64> {
        let spans = self.by_region.get(ri)?;
        let i = spans.partition_point(|s| s.pages.start <= p);
        spans.get(i).map(|s| s.pages.start)
    }

    /// For pages `first..first + zero.len()` of region `ri`: overlay pages are not zero pages,
    /// whatever the memory file holds there.
    pub fn unmark_zero(&self, ri: usize, first: u64, zero: &mut [bool]) {
        let Some(spans) = self.by_region.get(ri) else { return };
        let end = first + zero.len() as u64;
        for s in spans.iter().filter(|s| s.pages.start < end && first < s.pages.end) {
            for p in s.pages.start.max(first)..s.pages.end.min(end) {
                zero[usize::try_from(p - first).expect("index fits")] = false;
            }
        }
    }

    /// The bytes to copy into pages `[p, end)` of region `ri` (`region`), from `p` on: the
    /// overlay's if `p` is an overlay page (up to the overlay's end), the memory file's otherwise
    /// (up to the next overlay). Returns where that source ends (`<= end`) and its bytes.
    pub fn source<'a>(
        &'a self,
        file: &'a MappedFile,
        ri: usize,
        region: &Region,
        p: u64,
        end: u64,
    ) -> (u64, &'a [u8]) {
        let ps = region.page_size;
        let (run_end, bytes, off) = match (self.at(ri, p, ps), &self.map) {
            (Some((overlay_end, data)), Some(map)) => (overlay_end.min(end), &map[..], data),
            _ => {
                let next = self.next_start_after(ri, p).unwrap_or(u64::MAX);
                (next.min(end), file.bytes(), region.offset + p * ps)
            }
        };
        let off = usize::try_from(off).expect("offset fits");
        let len = usize::try_from((run_end - p) * ps).expect("len fits");
        (run_end, &bytes[off..off + len])
    }
}

#[cfg(test)]
// Test values are small and known: plain `as` casts.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_possible_wrap)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::memory_file::MemoryFiles;

    const PS: u64 = 4096;

    fn region(offset: u64, pages: u64, ps: u64) -> Region {
        Region { base: 0x10_0000_0000 + offset, size: pages * ps, offset, page_size: ps }
    }

    fn overlays(spans: &[(u64, u64)], regions: &[Region]) -> SessionOverlays {
        let inputs = spans
            .iter()
            .enumerate()
            .map(|(i, &(offset, len))| overlay::OverlayInput {
                offset,
                source: overlay::OverlaySource::Data(vec![0xa0 + i as u8; len as usize]),
            })
            .collect();
        let o = overlay::load(inputs, 64 << 20, 64 << 20).unwrap().unwrap();
        SessionOverlays::open(&o.spans, Some(o.fd), regions).unwrap()
    }

    #[test]
    fn the_source_of_a_run_switches_at_each_overlay_edge() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&vec![1u8; 16 * PS as usize]).unwrap();
        let file = MemoryFiles::default().open(std::fs::File::open(f.path()).unwrap().into());
        let file = file.unwrap();
        let regions = [region(0, 16, PS)];
        let o = overlays(&[(4 * PS, 2 * PS), (10 * PS, PS)], &regions);
        assert_eq!(o.figures(), (2, 3 * PS));
        let (end, src) = o.source(&file, 0, &regions[0], 0, 16);
        assert_eq!((end, src.len() as u64, src[0]), (4, 4 * PS, 1));
        let (end, src) = o.source(&file, 0, &regions[0], 5, 16);
        assert_eq!((end, src.len() as u64, src[0]), (6, PS, 0xa0));
        let (end, src) = o.source(&file, 0, &regions[0], 10, 16);
        assert_eq!((end, src[0]), (11, 0xa1));
        let (end, _) = o.source(&file, 0, &regions[0], 11, 13);
        assert_eq!(end, 13);
        let mut zero = vec![true; 8];
        o.unmark_zero(0, 3, &mut zero);
        assert_eq!(zero, vec![true, false, false, true, true, true, true, false]);
    }

    #[test]
    fn overlays_of_2m_regions_count_in_2m_pages() {
        const M2: u64 = 2 << 20;
        let regions = [region(0, 4, PS), region(4 * PS, 3, M2)];
        let o = overlays(&[(4 * PS + M2, M2)], &regions);
        assert_eq!(o.at(1, 1, M2), Some((2, 0)));
        assert_eq!(o.at(1, 0, M2), None);
        assert_eq!(o.at(0, 1, PS), None);
    }

    #[test]
    fn overlays_the_regions_do_not_take_are_refused() {
        let regions = [region(0, 4, PS)];
        let inputs = vec![overlay::OverlayInput {
            offset: 8 * PS,
            source: overlay::OverlaySource::Data(vec![1; PS as usize]),
        }];
        let o = overlay::load(inputs, 64 << 20, 64 << 20).unwrap().unwrap();
        let e = SessionOverlays::open(&o.spans, Some(o.fd), &regions).unwrap_err();
        assert!(e.to_string().contains("no single region"), "{e}");
        let e = SessionOverlays::open(&o.spans, None, &regions).unwrap_err();
        assert!(matches!(e, OverlayOpenError::NoData), "{e}");
    }
}
