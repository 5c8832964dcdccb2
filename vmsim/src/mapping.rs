//! The simulator's raw memory: guest regions mapped the way Firecracker maps them, and the memory
//! file mapped read-only. This is the only module of `vmsim` that uses `unsafe`.
//!
//! Guest memory is only ever accessed through `&[AtomicU64]` ([`Mapping::words`]): the memory is
//! changed behind the program's back (the pager's `UFFDIO_COPY`, the kernel zapping pages on
//! `MADV_DONTNEED`) and read by several threads while one thread writes it, so no `&[u8]` or
//! `&mut` view of it ever exists. Atomic words make those concurrent accesses defined behaviour;
//! the seqlock in `expect` turns them into consistent page reads.

use std::ffi::c_void;
use std::fs::File;
use std::io;
use std::num::NonZeroUsize;
use std::ptr::NonNull;
use std::sync::atomic::AtomicU64;

use memmap2::Mmap;
use nix::errno::Errno;
use nix::sys::mman::{madvise, mmap, mmap_anonymous, munmap, MapFlags, MmapAdvise, ProtFlags};

use uffdpager::firecracker::PAGE_2M;

/// A private mapping of guest memory owned by this value (unmapped on drop): anonymous (the
/// `Uffd` backend's) or of the memory file (the `File` backend's).
#[derive(Debug)]
pub(crate) struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
    /// Mapped from the memory file: a discarded page reads the file again, not zeros.
    file_backed: bool,
}

// SAFETY: a `Mapping` is plain memory owned by this value, like a `Box<[AtomicU64]>`: it has no
// thread affinity, and every access through it is an atomic word access (`words`) or a syscall
// on the whole range, so sharing it between threads is sound.
unsafe impl Send for Mapping {}
// SAFETY: see `Send` above: `&Mapping` only hands out `&[AtomicU64]` and performs syscalls.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes `MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE`, plus
    /// `MAP_HUGETLB | MAP_HUGE_2MB` when `page_size` is 2 MiB: what Firecracker does for guest
    /// memory restored with the `Uffd` backend.
    pub(crate) fn anonymous(len: NonZeroUsize, page_size: u64) -> Result<Mapping, Errno> {
        let mut flags = MapFlags::MAP_PRIVATE | MapFlags::MAP_NORESERVE;
        if page_size == PAGE_2M {
            flags |= MapFlags::MAP_HUGETLB | MapFlags::MAP_HUGE_2MB;
        }
        // SAFETY: a fresh anonymous mapping at an address the kernel picks cannot alias any
        // memory this program already uses; we own it from here and unmap it exactly once in
        // `Drop`.
        let ptr = unsafe {
            mmap_anonymous(None, len, ProtFlags::PROT_READ | ProtFlags::PROT_WRITE, flags)
        }?;
        Ok(Mapping { ptr: ptr.cast(), len: len.get(), file_backed: false })
    }

    /// Maps `len` bytes of `file` from `offset` `MAP_PRIVATE`, readable and writable: what
    /// Firecracker does for guest memory restored with the `File` backend. A first read maps
    /// the page-cache page; a first write copies it, and the file is never written.
    pub(crate) fn file_private(
        file: &File,
        offset: u64,
        len: NonZeroUsize,
    ) -> Result<Mapping, Errno> {
        let offset = libc::off_t::try_from(offset).map_err(|_| Errno::EOVERFLOW)?;
        // SAFETY: a fresh mapping at an address the kernel picks cannot alias any memory this
        // program already uses; private, so the program's writes never reach the file. The
        // file is a snapshot memory file, immutable while VMs restore from it (a truncation
        // underneath would SIGBUS a read: an accepted failure of a misused test tool, as for
        // `FileImage`). We own the mapping from here and unmap it exactly once in `Drop`.
        let ptr = unsafe {
            mmap(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_PRIVATE,
                file,
                offset,
            )
        }?;
        Ok(Mapping { ptr: ptr.cast(), len: len.get(), file_backed: true })
    }

    /// Whether the memory is mapped from the memory file.
    pub(crate) fn file_backed(&self) -> bool {
        self.file_backed
    }

    /// Host virtual address of the first byte.
    pub(crate) fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    /// Start pointer, for `UFFDIO_REGISTER`.
    pub(crate) fn as_ptr(&self) -> *mut c_void {
        self.ptr.as_ptr().cast()
    }

    /// Length in bytes.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The whole mapping as atomic 64-bit words.
    pub(crate) fn words(&self) -> &[AtomicU64] {
        // SAFETY: the mapping is `len` bytes, page-aligned (so aligned for `AtomicU64`, which has
        // the size and layout of `u64`), readable and writable, and stays mapped while `self`
        // is borrowed. All accesses from this program go through atomics, so no non-atomic access
        // races with them; the kernel filling or zapping pages underneath is outside the memory
        // model, like a device writing to memory. Touching a word may block on a userfault: that
        // is the point of the simulator.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().cast::<AtomicU64>(), self.len / 8) }
    }

    /// `madvise(MADV_DONTNEED)` on `len` bytes at `offset`: what balloon inflation makes the VMM
    /// do. The pages then read as zeros (after the pager, told by `UFFD_EVENT_REMOVE`, serves
    /// the next fault). Blocks until the pager has read the REMOVE event.
    pub(crate) fn discard(&self, offset: usize, len: usize) -> Result<(), Errno> {
        if self.file_backed {
            // Discarded pages of a private file mapping read the file again, not zeros.
            return Err(Errno::EOPNOTSUPP);
        }
        let end = offset.checked_add(len).ok_or(Errno::EINVAL)?;
        if end > self.len || len == 0 {
            return Err(Errno::EINVAL);
        }
        // SAFETY: `offset < end <= self.len`, so the address is inside this mapping and non-null.
        let start = unsafe { NonNull::new_unchecked(self.ptr.as_ptr().add(offset)) };
        // SAFETY: the range lies inside our own private anonymous mapping. MADV_DONTNEED only
        // replaces its contents by zero-fill-on-demand; since this program accesses guest memory
        // only through atomics (no outstanding `&[u8]`), that change is like a concurrent store.
        unsafe { madvise(start.cast(), len, MmapAdvise::MADV_DONTNEED) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly the mapping `anonymous` or `file_private` created,
        // unmapped only here; `&self.words()` borrows cannot outlive `self`.
        if let Err(e) = unsafe { munmap(self.ptr.cast(), self.len) } {
            tracing::warn!(%e, "munmap of guest memory failed");
        }
    }
}

/// The memory file, mapped read-only: what every guest page must hold until the guest changes it.
#[derive(Debug)]
pub(crate) struct FileImage {
    map: Mmap,
}

impl FileImage {
    /// Maps `file` read-only and shared.
    pub(crate) fn map(file: &File) -> io::Result<FileImage> {
        // SAFETY: a snapshot memory file is immutable while VMs restore from it (the contract of
        // every user of this simulator); nothing in this program writes it. Were it truncated
        // underneath, reads past the new end would fault with SIGBUS, which is an accepted
        // failure of a misused test tool, not silent corruption.
        let map = unsafe { Mmap::map(file) }?;
        Ok(FileImage { map })
    }

    /// Maps `file` privately and lays `overlays` (`(offset, bytes)`, inside the file) over it:
    /// the image of a session given overlay pages. Copy-on-write: only the overlay pages get
    /// memory of their own, and the file is never written.
    pub(crate) fn map_with_overlays(
        file: &File,
        overlays: &[(u64, Vec<u8>)],
    ) -> io::Result<FileImage> {
        if overlays.is_empty() {
            return Self::map(file);
        }
        // SAFETY: as in `map`; a private mapping's writes go to anonymous copies of its pages,
        // never to the file.
        let mut map = unsafe { memmap2::MmapOptions::new().map_copy(file) }?;
        for (offset, bytes) in overlays {
            let start = usize::try_from(*offset).map_err(io::Error::other)?;
            let dst = start
                .checked_add(bytes.len())
                .and_then(|end| map.get_mut(start..end))
                .ok_or_else(|| {
                    io::Error::other(format!("overlay at {offset} lies past the end of the file"))
                })?;
            dst.copy_from_slice(bytes);
        }
        Ok(FileImage { map: map.make_read_only()? })
    }

    /// The file's bytes.
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.map
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering::Relaxed;

    use super::*;

    #[test]
    fn anonymous_memory_reads_as_zero_until_written_and_again_after_discard() {
        let map = Mapping::anonymous(NonZeroUsize::new(4 * 4096).unwrap(), 4096).unwrap();
        assert_eq!(map.len(), 16384);
        assert_eq!(map.addr() % 4096, 0);
        let words = map.words();
        assert_eq!(words.len(), 2048);
        words[600].store(42, Relaxed);
        assert_eq!(words[600].load(Relaxed), 42);
        map.discard(4096, 4096).unwrap();
        assert_eq!(words[600].load(Relaxed), 0);
        assert_eq!(map.discard(4096, 4 * 4096), Err(Errno::EINVAL));
        assert_eq!(map.discard(usize::MAX, 4096), Err(Errno::EINVAL));
    }
}
