//! The simulated VM: guest memory set up exactly as Firecracker sets it up when it restores a
//! snapshot with the `Uffd` memory backend, and the handshake that hands it to a pager.
//!
//! Firecracker's steps, in order (see its `docs/snapshotting/handling-page-faults-on-snapshot-resume.md`
//! and `vmm/src/persist.rs`): map every region `MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE`
//! (plus `MAP_HUGETLB | MAP_HUGE_2MB` for 2 MiB pages); create a non-blocking, close-on-exec
//! userfaultfd requiring `UFFD_FEATURE_EVENT_REMOVE`; register every region in MISSING mode;
//! connect to the backend's Unix socket; send ONE message, the JSON array of regions with the
//! uffd attached as `SCM_RIGHTS`; keep the socket open for the VM's life (its EOF tells the pager
//! the VMM is gone).

use std::fs::File;
use std::io;
use std::num::NonZeroUsize;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use userfaultfd::Uffd;

use uffdpager::uffd_ops::firecracker_uffd;

use uffdpager::firecracker::{self, Region, PAGE_2M, PAGE_4K};

use super::expect::{Check, PageState, PageStates};
use super::mapping::{FileImage, Mapping};
use super::smaps;

/// One guest memory region to restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestRegionSpec {
    /// Length in bytes; a multiple of `page_size`.
    pub size: u64,
    /// 4096, or 2 MiB for hugetlbfs-backed memory.
    pub page_size: u64,
    /// Offset of the region in the memory file; a multiple of `page_size`.
    pub offset: u64,
}

/// Why a VM could not be restored. Each variant names the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("no guest regions given")]
    NoRegions,
    #[error("region {index}: {reason}")]
    InvalidRegion { index: usize, reason: String },
    #[error("opening the memory file {path}: {cause}")]
    OpenMemoryFile { path: PathBuf, cause: io::Error },
    #[error("mapping the memory file {path}: {cause}")]
    MapMemoryFile { path: PathBuf, cause: io::Error },
    #[error("region {index}: file range {offset:#x}..{end:#x} lies past the end of the memory file ({file_len} bytes)")]
    PastEndOfFile { index: usize, offset: u64, end: u64, file_len: u64 },
    #[error("region {index}: mmap of {size} bytes failed: {cause}")]
    Mmap { index: usize, size: u64, cause: nix::errno::Errno },
    #[error("creating the userfaultfd failed: {0}")]
    CreateUffd(userfaultfd::Error),
    #[error("region {index}: UFFDIO_REGISTER failed: {cause}")]
    Register { index: usize, cause: userfaultfd::Error },
    #[error("connecting to the pager socket {path}: {cause}")]
    Connect { path: PathBuf, cause: io::Error },
    #[error("sending the handshake failed: {0}")]
    Handshake(nix::errno::Errno),
}

/// One mapped region of the guest.
#[derive(Debug)]
pub(crate) struct GuestRegion {
    pub(crate) map: Mapping,
    pub(crate) spec: GuestRegionSpec,
    /// Page size in bytes (as `usize`, validated).
    pub(crate) page_size: usize,
    /// Offset of the region in the memory file (validated to lie inside it).
    pub(crate) file_offset: usize,
    /// Global index of the region's first page.
    pub(crate) first_page: u64,
    /// Pages in the region.
    pub(crate) pages: u64,
}

/// Guest memory and what it must hold: shared by the VM and its background readers.
#[derive(Debug)]
pub(crate) struct Guest {
    pub(crate) regions: Vec<GuestRegion>,
    pub(crate) image: FileImage,
    pub(crate) states: PageStates,
    pub(crate) pages: u64,
}

/// One guest page, located.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PageRef<'a> {
    pub(crate) global: u64,
    pub(crate) region: usize,
    /// Byte offset in the region.
    pub(crate) offset: u64,
    pub(crate) memory: &'a [AtomicU64],
    pub(crate) snapshot: &'a [u8],
}

impl Guest {
    /// Guest memory of `pages` pages in `regions`, every page expected to hold the snapshot's
    /// bytes of `image`.
    fn new(regions: Vec<GuestRegion>, image: FileImage, pages: u64) -> Result<Guest, VmError> {
        let count = usize::try_from(pages)
            .map_err(|_| VmError::InvalidRegion { index: 0, reason: "too many pages".into() })?;
        Ok(Guest { regions, image, states: PageStates::new(count), pages })
    }

    /// The page with global index `global` (pages count region by region, in the order given).
    pub(crate) fn page(&self, global: u64) -> Option<PageRef<'_>> {
        let index = self.regions.partition_point(|r| r.first_page + r.pages <= global);
        let r = self.regions.get(index)?;
        let local = usize::try_from(global - r.first_page).ok()?;
        let start = local * r.page_size;
        let memory = r.map.words().get(start / 8..(start + r.page_size) / 8)?;
        let snapshot =
            self.image.bytes().get(r.file_offset + start..r.file_offset + start + r.page_size)?;
        Some(PageRef { global, region: index, offset: start as u64, memory, snapshot })
    }

    /// Checks one page against its state (seqlocked: safe while another thread mutates).
    pub(crate) fn check(&self, page: &PageRef<'_>) -> Check {
        let index = usize::try_from(page.global).unwrap_or(usize::MAX);
        self.states.check(index, page.memory, page.snapshot, page.global)
    }
}

/// A restored VM: guest memory registered with a uffd that a pager serves. Dropping it unmaps the
/// memory (once background readers are done) and closes the socket: the VMM's EOF.
#[derive(Debug)]
pub struct Vm {
    pub(crate) guest: Arc<Guest>,
    regions: Vec<Region>,
    /// Kept for the VM's life, as Firecracker keeps it (none for the `File` backend).
    _uffd: Option<Uffd>,
    /// Kept open for the VM's life: closing it is how a VMM says it is gone (none for the
    /// `File` backend, which has no pager).
    _stream: Option<UnixStream>,
}

/// Creates the uffd the way Firecracker does. `user_mode_only(false)` lets kernel-mode accesses
/// fault too (root, or `/dev/userfaultfd`); where that is refused, fall back to user-mode only
/// (the crate's way, then the system call's, which an unprivileged uid may always use).
fn create_uffd() -> Result<Uffd, VmError> {
    firecracker_uffd(false).or_else(|e| {
        tracing::warn!(%e, "userfaultfd with kernel faults refused; retrying user-mode only");
        firecracker_uffd(true).or_else(|e| {
            uffdpager::uffd_ops::user_mode_uffd_by_syscall().map_err(|syscall| {
                tracing::warn!(%syscall, "user-mode-only userfaultfd(2) refused too");
                VmError::CreateUffd(e)
            })
        })
    })
}

/// Validates one region: page size, alignment, non-empty, inside the memory file.
fn check_region(index: usize, spec: &GuestRegionSpec, file_len: u64) -> Result<(), VmError> {
    let invalid = |reason: String| Err(VmError::InvalidRegion { index, reason });
    if spec.page_size != PAGE_4K && spec.page_size != PAGE_2M {
        return invalid(format!("page size {} is neither 4096 nor 2097152", spec.page_size));
    }
    if spec.size == 0 {
        return invalid("size is zero".into());
    }
    if spec.size % spec.page_size != 0 || spec.offset % spec.page_size != 0 {
        return invalid(format!(
            "size {:#x} and offset {:#x} must be multiples of the page size {}",
            spec.size, spec.offset, spec.page_size
        ));
    }
    match spec.offset.checked_add(spec.size) {
        Some(end) if end <= file_len => Ok(()),
        end => Err(VmError::PastEndOfFile {
            index,
            offset: spec.offset,
            end: end.unwrap_or(u64::MAX),
            file_len,
        }),
    }
}

/// Opens the memory file, checks every region against it and maps it read-only (with
/// `overlays` laid over it): what the guest's pages must hold.
fn open_memory_file(
    memory_file: &Path,
    regions: &[GuestRegionSpec],
    overlays: &[(u64, Vec<u8>)],
) -> Result<(File, FileImage), VmError> {
    if regions.is_empty() {
        return Err(VmError::NoRegions);
    }
    let file = File::open(memory_file)
        .map_err(|cause| VmError::OpenMemoryFile { path: memory_file.to_owned(), cause })?;
    let map_err = |cause| VmError::MapMemoryFile { path: memory_file.to_owned(), cause };
    let file_len = file.metadata().map_err(map_err)?.len();
    for (index, spec) in regions.iter().enumerate() {
        check_region(index, spec, file_len)?;
    }
    let image = FileImage::map_with_overlays(&file, overlays).map_err(map_err)?;
    Ok((file, image))
}

/// Maps every region (checked already) with `map`, numbering their pages globally; the
/// regions and the guest's page count.
fn map_regions(
    regions: &[GuestRegionSpec],
    mut map: impl FnMut(&GuestRegionSpec, NonZeroUsize) -> Result<Mapping, nix::errno::Errno>,
) -> Result<(Vec<GuestRegion>, u64), VmError> {
    let mut mapped = Vec::with_capacity(regions.len());
    let mut first_page = 0;
    for (index, spec) in regions.iter().enumerate() {
        // These fit in usize: the region lies inside the memory file, which is mapped.
        let (Ok(size), Ok(file_offset), Ok(page_size)) = (
            usize::try_from(spec.size),
            usize::try_from(spec.offset),
            usize::try_from(spec.page_size),
        ) else {
            return Err(VmError::InvalidRegion { index, reason: "too large".into() });
        };
        let len = NonZeroUsize::new(size)
            .ok_or(VmError::InvalidRegion { index, reason: "size is zero".into() })?;
        let map =
            map(spec, len).map_err(|cause| VmError::Mmap { index, size: spec.size, cause })?;
        let pages = spec.size / spec.page_size;
        mapped.push(GuestRegion { map, spec: *spec, page_size, file_offset, first_page, pages });
        first_page += pages;
    }
    Ok((mapped, first_page))
}

/// The regions as a VMM describes them (with their host addresses).
fn described(mapped: &[GuestRegion]) -> Vec<Region> {
    mapped
        .iter()
        .map(|r| Region {
            base: r.map.addr(),
            size: r.spec.size,
            offset: r.spec.offset,
            page_size: r.spec.page_size,
        })
        .collect()
}

impl Vm {
    /// Restores a VM from `memory_file` whose memory a pager listening on `socket` serves.
    /// Returns once the handshake is sent: the pager may not have read it yet, and the first
    /// page touched then waits for it.
    pub fn restore(
        socket: &Path,
        memory_file: &Path,
        regions: &[GuestRegionSpec],
    ) -> Result<Vm, VmError> {
        Self::restore_with_overlays(socket, memory_file, regions, &[])
    }

    /// Like [`Vm::restore`], for a session given overlay pages: the guest expects `overlays`
    /// (`(offset in the memory file, bytes)`) where the file has other bytes, and still checks
    /// every byte it reads.
    pub fn restore_with_overlays(
        socket: &Path,
        memory_file: &Path,
        regions: &[GuestRegionSpec],
        overlays: &[(u64, Vec<u8>)],
    ) -> Result<Vm, VmError> {
        Self::restore_padded(socket, memory_file, regions, overlays, 0)
    }

    /// As [`Vm::restore_with_overlays`], with `padding` bytes of JSON whitespace before the
    /// handshake's array: still one valid message, as large as a hostile (or a very many-region)
    /// VMM would send.
    pub fn restore_padded(
        socket: &Path,
        memory_file: &Path,
        regions: &[GuestRegionSpec],
        overlays: &[(u64, Vec<u8>)],
        padding: usize,
    ) -> Result<Vm, VmError> {
        let (_, image) = open_memory_file(memory_file, regions, overlays)?;

        // 1. Map guest memory.
        let (mapped, pages) =
            map_regions(regions, |spec, len| Mapping::anonymous(len, spec.page_size))?;
        let guest = Guest::new(mapped, image, pages)?;

        // 2. Create the uffd and register every region for MISSING faults.
        let uffd = create_uffd()?;
        for (index, r) in guest.regions.iter().enumerate() {
            uffd.register(r.map.as_ptr(), r.map.len())
                .map_err(|cause| VmError::Register { index, cause })?;
        }

        // 3. Connect and send the handshake: the JSON array plus the uffd, in one sendmsg.
        let stream = UnixStream::connect(socket)
            .map_err(|cause| VmError::Connect { path: socket.to_owned(), cause })?;
        let described = described(&guest.regions);
        let mappings: Vec<_> = described.iter().map(Region::to_mapping).collect();
        if padding == 0 {
            firecracker::send_handshake(stream.as_fd(), &mappings, uffd.as_fd())
                .map_err(VmError::Handshake)?;
        } else {
            let mut json = vec![b' '; padding];
            json.extend(serde_json::to_vec(&mappings).expect("mappings serialise"));
            uffdpager::scm::send_with_fds(stream.as_fd(), &json, &[uffd.as_fd()])
                .map_err(VmError::Handshake)?;
        }
        tracing::info!(
            socket = %socket.display(),
            regions = described.len(),
            pages = guest.pages,
            "restored: handshake sent"
        );
        Ok(Vm {
            guest: Arc::new(guest),
            regions: described,
            _uffd: Some(uffd),
            _stream: Some(stream),
        })
    }

    /// A VM whose guest memory is the memory file itself, mapped `MAP_PRIVATE` region by
    /// region: Firecracker's `File` memory backend, which needs no pager (a first touch is the
    /// kernel's minor fault on the page cache). The same workloads and checks run on it as on
    /// a restored VM, so it is the ceiling a pager is measured against with the same reader;
    /// balloon inflation is refused (a discarded page would read the file again). 4 KiB pages
    /// only, as Firecracker's `File` backend.
    pub fn map_file(memory_file: &Path, regions: &[GuestRegionSpec]) -> Result<Vm, VmError> {
        let (file, image) = open_memory_file(memory_file, regions, &[])?;
        if let Some(index) = regions.iter().position(|r| r.page_size != PAGE_4K) {
            let reason = "the File backend maps 4 KiB pages only".into();
            return Err(VmError::InvalidRegion { index, reason });
        }
        let (mapped, pages) =
            map_regions(regions, |spec, len| Mapping::file_private(&file, spec.offset, len))?;
        let guest = Guest::new(mapped, image, pages)?;
        let described = described(&guest.regions);
        Ok(Vm { guest: Arc::new(guest), regions: described, _uffd: None, _stream: None })
    }

    /// The regions as sent in the handshake (with their host addresses).
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// Number of guest pages (each region counted in its own page size).
    pub fn pages(&self) -> u64 {
        self.guest.pages
    }

    /// Guest bytes.
    pub fn total_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }

    /// The pid of the VMM (this process), as `SO_PEERCRED` shows it to the pager.
    pub fn pid(&self) -> u32 {
        std::process::id()
    }

    /// What page `page` must hold now (`None` for no such page).
    pub fn page_state(&self, page: u64) -> Option<PageState> {
        self.guest.states.get(usize::try_from(page).ok()?)
    }

    /// The global index of the page holding byte `offset` of region `region`.
    pub fn page_index(&self, region: usize, offset: u64) -> Option<u64> {
        let r = self.guest.regions.get(region)?;
        (offset < r.spec.size).then(|| r.first_page + offset / r.spec.page_size)
    }

    /// How many VMAs of this VM's guest memory are still registered with a uffd in MISSING
    /// mode (`um` in `/proc/self/smaps`). After graduation it is 0.
    pub fn uffd_registered_vmas(&self) -> io::Result<usize> {
        let ranges: Vec<(u64, u64)> = self.regions.iter().map(|r| (r.base, r.end())).collect();
        smaps::uffd_registered_vmas_in(self.pid(), &ranges)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_are_checked_against_the_file_before_anything_is_mapped() {
        let ok = GuestRegionSpec { size: 8192, page_size: 4096, offset: 4096 };
        assert!(check_region(0, &ok, 12288).is_ok());
        assert!(matches!(
            check_region(0, &ok, 8192),
            Err(VmError::PastEndOfFile { end: 12288, .. })
        ));
        let bad_ps = GuestRegionSpec { page_size: 8192, ..ok };
        assert!(matches!(
            check_region(1, &bad_ps, 1 << 20),
            Err(VmError::InvalidRegion { index: 1, .. })
        ));
        let empty = GuestRegionSpec { size: 0, ..ok };
        assert!(matches!(check_region(0, &empty, 1 << 20), Err(VmError::InvalidRegion { .. })));
        let unaligned = GuestRegionSpec { size: 4096, page_size: PAGE_2M, offset: 0 };
        assert!(matches!(check_region(0, &unaligned, 1 << 30), Err(VmError::InvalidRegion { .. })));
        let overflow = GuestRegionSpec { size: 4096, page_size: 4096, offset: u64::MAX - 4095 };
        assert!(matches!(check_region(0, &overflow, 1 << 30), Err(VmError::PastEndOfFile { .. })));
    }

    #[test]
    fn restore_fails_cleanly_without_a_pager_listening() {
        let dir = tempfile::tempdir().unwrap();
        let mem = dir.path().join("mem");
        std::fs::write(&mem, vec![1u8; 8192]).unwrap();
        let spec = GuestRegionSpec { size: 8192, page_size: 4096, offset: 0 };
        let err = Vm::restore(&dir.path().join("nobody.sock"), &mem, &[spec]).unwrap_err();
        assert!(matches!(err, VmError::Connect { .. }), "{err}");
        let err = Vm::restore(&dir.path().join("nobody.sock"), &dir.path().join("none"), &[spec])
            .unwrap_err();
        assert!(matches!(err, VmError::OpenMemoryFile { .. }), "{err}");
        assert!(matches!(Vm::restore(&mem, &mem, &[]), Err(VmError::NoRegions)));
    }
}
