//! Firecracker's `Uffd` memory-backend handshake: what a VMM sends, parsed and validated.
//!
//! The VMM connects to the session's Unix stream socket and sends ONE message: a JSON array of
//! `GuestRegionUffdMapping` objects with the userfaultfd attached as `SCM_RIGHTS`. `page_size` and
//! the deprecated `page_size_kib` are both in bytes (the latter's name notwithstanding); older
//! Firecrackers send only `page_size_kib`. See Firecracker's `docs/snapshotting/handling-page-faults-on-snapshot-resume.md`.
//!
//! Parsing and validation are pure functions, tested against the bytes a real Firecracker 1.16.1
//! sent; [`recv_handshake`] is the one I/O step.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use serde::{Deserialize, Serialize};

use crate::scm;

/// Page size of ordinary guest memory.
pub const PAGE_4K: u64 = 4096;
/// Page size of hugetlbfs-backed guest memory.
pub const PAGE_2M: u64 = 2 * 1024 * 1024;
/// Largest handshake accepted (a real one is ~110 bytes per region).
pub const MAX_HANDSHAKE_BYTES: usize = 64 * 1024;
/// Most regions accepted in one handshake.
pub const MAX_REGIONS: usize = 128;

/// One entry of the handshake, exactly as Firecracker serialises it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestRegionUffdMapping {
    pub base_host_virt_addr: u64,
    pub size: u64,
    pub offset: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_size: Option<u64>,
    /// Deprecated, and in bytes despite its name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_size_kib: Option<u64>,
}

/// A validated guest memory region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Region {
    /// Host virtual address of the region in the VMM's address space.
    pub base: u64,
    /// Length in bytes; a multiple of `page_size`.
    pub size: u64,
    /// Offset of the region in the memory file.
    pub offset: u64,
    /// 4096 or 2097152.
    pub page_size: u64,
}

impl Region {
    /// One past the last address.
    pub fn end(&self) -> u64 {
        self.base + self.size
    }

    /// Number of pages in the region.
    pub fn pages(&self) -> u64 {
        self.size / self.page_size
    }

    /// The Firecracker mapping that describes this region (both page-size fields set).
    pub fn to_mapping(&self) -> GuestRegionUffdMapping {
        GuestRegionUffdMapping {
            base_host_virt_addr: self.base,
            size: self.size,
            offset: self.offset,
            page_size: Some(self.page_size),
            page_size_kib: Some(self.page_size),
        }
    }
}

/// Why a handshake was refused. Each names what the VMM got wrong.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HandshakeError {
    #[error("the VMM closed the connection without sending a handshake")]
    Empty,
    #[error("handshake larger than {MAX_HANDSHAKE_BYTES} bytes")]
    TooLarge,
    #[error("handshake is not a JSON array of GuestRegionUffdMapping: {0}")]
    Json(String),
    #[error("handshake lists no regions")]
    NoRegions,
    #[error("handshake lists {0} regions; at most {MAX_REGIONS} are accepted")]
    TooManyRegions(usize),
    #[error("handshake carried no file descriptor (the uffd must be attached with SCM_RIGHTS)")]
    NoFd,
    #[error("handshake carried {0} file descriptors; exactly one (the uffd) is expected")]
    TooManyFds(usize),
    #[error("the file descriptor sent is not a userfaultfd")]
    NotUffd,
    #[error("region {index}: no page_size nor page_size_kib")]
    NoPageSize { index: usize },
    #[error("region {index}: page_size {page_size} and page_size_kib {page_size_kib} disagree")]
    PageSizeMismatch { index: usize, page_size: u64, page_size_kib: u64 },
    #[error("region {index}: page size {page_size} is neither 4096 nor 2097152")]
    BadPageSize { index: usize, page_size: u64 },
    #[error("region {index}: size is zero")]
    ZeroSize { index: usize },
    #[error("region {index}: {field} {value:#x} is not a multiple of the page size {page_size}")]
    Unaligned { index: usize, field: &'static str, value: u64, page_size: u64 },
    #[error("region {index}: address or file range overflows 64 bits")]
    Overflow { index: usize },
    #[error("regions {first} and {second} overlap in guest address space")]
    Overlap { first: usize, second: usize },
    #[error("region {index}: file range {offset:#x}..{end:#x} lies past the end of the memory file ({file_len} bytes)")]
    PastEndOfFile { index: usize, offset: u64, end: u64, file_len: u64 },
    #[error("receiving the handshake failed: {0}")]
    Recv(nix::errno::Errno),
}

impl HandshakeError {
    /// A short name of what was wrong (a metrics label: few values, no data in it).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Empty => "empty",
            Self::TooLarge => "too_large",
            Self::Json(_) => "bad_json",
            Self::NoRegions => "no_regions",
            Self::TooManyRegions(_) => "too_many_regions",
            Self::NoFd => "no_fd",
            Self::TooManyFds(_) => "too_many_fds",
            Self::NotUffd => "not_uffd",
            Self::NoPageSize { .. } | Self::PageSizeMismatch { .. } | Self::BadPageSize { .. } => {
                "bad_page_size"
            }
            Self::ZeroSize { .. } => "zero_size",
            Self::Unaligned { .. } => "unaligned",
            Self::Overflow { .. } => "overflow",
            Self::Overlap { .. } => "overlap",
            Self::PastEndOfFile { .. } => "past_end_of_file",
            Self::Recv(_) => "recv",
        }
    }
}

/// Parses the JSON payload of a handshake.
pub fn parse_mappings(bytes: &[u8]) -> Result<Vec<GuestRegionUffdMapping>, HandshakeError> {
    if bytes.is_empty() {
        return Err(HandshakeError::Empty);
    }
    if bytes.len() > MAX_HANDSHAKE_BYTES {
        return Err(HandshakeError::TooLarge);
    }
    serde_json::from_slice(bytes).map_err(|e| HandshakeError::Json(e.to_string()))
}

/// Validates mappings against the memory file's length: page sizes 4 KiB or 2 MiB, aligned,
/// non-empty, non-overlapping regions, each inside the file. Returns regions sorted by address.
pub fn validate(
    mappings: &[GuestRegionUffdMapping],
    file_len: u64,
) -> Result<Vec<Region>, HandshakeError> {
    if mappings.is_empty() {
        return Err(HandshakeError::NoRegions);
    }
    if mappings.len() > MAX_REGIONS {
        return Err(HandshakeError::TooManyRegions(mappings.len()));
    }
    let mut regions = Vec::with_capacity(mappings.len());
    for (index, m) in mappings.iter().enumerate() {
        let page_size = match (m.page_size, m.page_size_kib) {
            (Some(a), Some(b)) if a != b => {
                return Err(HandshakeError::PageSizeMismatch {
                    index,
                    page_size: a,
                    page_size_kib: b,
                })
            }
            (Some(a), _) | (None, Some(a)) => a,
            (None, None) => return Err(HandshakeError::NoPageSize { index }),
        };
        if page_size != PAGE_4K && page_size != PAGE_2M {
            return Err(HandshakeError::BadPageSize { index, page_size });
        }
        if m.size == 0 {
            return Err(HandshakeError::ZeroSize { index });
        }
        for (field, value) in
            [("base_host_virt_addr", m.base_host_virt_addr), ("size", m.size), ("offset", m.offset)]
        {
            if value % page_size != 0 {
                return Err(HandshakeError::Unaligned { index, field, value, page_size });
            }
        }
        let (Some(_), Some(file_end)) =
            (m.base_host_virt_addr.checked_add(m.size), m.offset.checked_add(m.size))
        else {
            return Err(HandshakeError::Overflow { index });
        };
        if file_end > file_len {
            return Err(HandshakeError::PastEndOfFile {
                index,
                offset: m.offset,
                end: file_end,
                file_len,
            });
        }
        regions.push((
            index,
            Region { base: m.base_host_virt_addr, size: m.size, offset: m.offset, page_size },
        ));
    }
    regions.sort_by_key(|(_, r)| r.base);
    for pair in regions.windows(2) {
        let ((i, a), (j, b)) = (&pair[0], &pair[1]);
        if a.end() > b.base {
            return Err(HandshakeError::Overlap { first: (*i).min(*j), second: (*i).max(*j) });
        }
    }
    Ok(regions.into_iter().map(|(_, r)| r).collect())
}

/// A handshake as received from a VMM, validated.
#[derive(Debug)]
pub struct Handshake {
    pub regions: Vec<Region>,
    pub uffd: OwnedFd,
    /// The VMM's pid from `SO_PEERCRED` (0 if the kernel did not say).
    pub vmm_pid: u32,
}

/// Reads the one handshake message from a connected VMM stream and validates it against the memory
/// file's length. Blocking: call it where blocking is fine (a blocking-pool thread).
pub fn recv_handshake(stream: BorrowedFd<'_>, file_len: u64) -> Result<Handshake, HandshakeError> {
    let vmm_pid = scm::peer_pid(stream).unwrap_or(0);
    let msg = scm::recv_with_fds(stream, MAX_HANDSHAKE_BYTES + 1).map_err(HandshakeError::Recv)?;
    if msg.truncated || msg.bytes.len() > MAX_HANDSHAKE_BYTES {
        return Err(HandshakeError::TooLarge);
    }
    let mappings = parse_mappings(&msg.bytes)?;
    let mut fds = msg.fds;
    let uffd = match fds.len() {
        0 => return Err(HandshakeError::NoFd),
        1 => fds.pop().expect("one fd"),
        n => return Err(HandshakeError::TooManyFds(n)),
    };
    if msg.fds_truncated {
        return Err(HandshakeError::TooManyFds(scm::MAX_FDS + 1));
    }
    if !scm::is_userfaultfd(uffd.as_fd()) {
        return Err(HandshakeError::NotUffd);
    }
    let regions = validate(&mappings, file_len)?;
    Ok(Handshake { regions, uffd, vmm_pid })
}

/// Sends a handshake the way Firecracker does: the JSON array and the uffd in one `sendmsg`.
pub fn send_handshake(
    stream: BorrowedFd<'_>,
    mappings: &[GuestRegionUffdMapping],
    uffd: BorrowedFd<'_>,
) -> Result<(), nix::errno::Errno> {
    let json = serde_json::to_vec(mappings).expect("mappings serialise");
    scm::send_with_fds(stream, &json, &[uffd])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a real Firecracker 1.16.1 restore sent (107 bytes, one uffd).
    const FIRECRACKER_1_16_1: &str = r#"[{"base_host_virt_addr":140337590829056,"size":536870912,"offset":0,"page_size":4096,"page_size_kib":4096}]"#;

    fn m(base: u64, size: u64, offset: u64, ps: u64) -> GuestRegionUffdMapping {
        GuestRegionUffdMapping {
            base_host_virt_addr: base,
            size,
            offset,
            page_size: Some(ps),
            page_size_kib: None,
        }
    }

    #[test]
    fn parses_what_firecracker_1_16_1_sent() {
        assert_eq!(FIRECRACKER_1_16_1.len(), 107);
        let maps = parse_mappings(FIRECRACKER_1_16_1.as_bytes()).unwrap();
        let regions = validate(&maps, 536870912).unwrap();
        assert_eq!(
            regions,
            vec![Region { base: 140337590829056, size: 536870912, offset: 0, page_size: 4096 }]
        );
    }

    #[test]
    fn accepts_legacy_page_size_kib_in_bytes() {
        let maps = parse_mappings(br#"[{"base_host_virt_addr":2097152,"size":4194304,"offset":0,"page_size_kib":2097152}]"#).unwrap();
        assert_eq!(validate(&maps, 4194304).unwrap()[0].page_size, PAGE_2M);
    }

    #[test]
    fn cannot_parse_malformed_json_or_empty_message() {
        assert!(matches!(parse_mappings(b"{not json"), Err(HandshakeError::Json(_))));
        assert!(matches!(parse_mappings(br#"{"size":1}"#), Err(HandshakeError::Json(_))));
        assert_eq!(parse_mappings(b""), Err(HandshakeError::Empty));
        assert_eq!(validate(&[], 0), Err(HandshakeError::NoRegions));
    }

    #[test]
    fn refuses_a_page_size_of_12345() {
        assert_eq!(
            validate(&[m(0, 12345 * 4, 0, 12345)], 1 << 30),
            Err(HandshakeError::BadPageSize { index: 0, page_size: 12345 })
        );
    }

    #[test]
    fn refuses_missing_or_disagreeing_page_sizes() {
        let mut x = m(0, 4096, 0, 4096);
        x.page_size = None;
        assert_eq!(validate(&[x], 4096), Err(HandshakeError::NoPageSize { index: 0 }));
        x.page_size = Some(4096);
        x.page_size_kib = Some(2097152);
        assert!(matches!(validate(&[x], 4096), Err(HandshakeError::PageSizeMismatch { .. })));
    }

    #[test]
    fn refuses_unaligned_empty_and_overflowing_regions() {
        assert!(matches!(
            validate(&[m(100, 4096, 0, 4096)], 8192),
            Err(HandshakeError::Unaligned { field: "base_host_virt_addr", .. })
        ));
        assert!(matches!(
            validate(&[m(0, 4097, 0, 4096)], 8192),
            Err(HandshakeError::Unaligned { field: "size", .. })
        ));
        assert!(matches!(
            validate(&[m(0, 4096, 1, 4096)], 8192),
            Err(HandshakeError::Unaligned { field: "offset", .. })
        ));
        assert!(matches!(
            validate(&[m(0, PAGE_2M, 4096, PAGE_2M)], 1 << 30),
            Err(HandshakeError::Unaligned { field: "offset", .. })
        ));
        assert_eq!(validate(&[m(0, 0, 0, 4096)], 8192), Err(HandshakeError::ZeroSize { index: 0 }));
        assert_eq!(
            validate(&[m(u64::MAX - 4095, 8192, 0, 4096)], u64::MAX),
            Err(HandshakeError::Overflow { index: 0 })
        );
    }

    #[test]
    fn refuses_overlapping_regions_whatever_their_order() {
        let maps = [m(0x20000, 0x2000, 0, 4096), m(0x10000, 0x11000, 0x2000, 4096)];
        assert_eq!(validate(&maps, 1 << 20), Err(HandshakeError::Overlap { first: 0, second: 1 }));
        let touching = [m(0x20000, 0x2000, 0, 4096), m(0x10000, 0x10000, 0x2000, 4096)];
        assert_eq!(validate(&touching, 1 << 20).unwrap()[0].base, 0x10000);
    }

    #[test]
    fn refuses_a_region_past_the_end_of_the_memory_file() {
        assert_eq!(
            validate(&[m(0, 8192, 4096, 4096)], 8192),
            Err(HandshakeError::PastEndOfFile {
                index: 0,
                offset: 4096,
                end: 12288,
                file_len: 8192
            })
        );
    }

    #[test]
    fn a_region_serialises_back_to_firecrackers_shape() {
        let r = Region { base: 140337590829056, size: 536870912, offset: 0, page_size: 4096 };
        assert_eq!(serde_json::to_string(&[r.to_mapping()]).unwrap(), FIRECRACKER_1_16_1);
    }
}
