//! Thin, typed wrappers over the userfaultfd ioctls a pager uses.
//!
//! The kernel's contract, as written in `ioctl_userfaultfd(2)`
//! (<https://man7.org/linux/man-pages/man2/ioctl_userfaultfd.2.html>) and the kernel's
//! `Documentation/admin-guide/mm/userfaultfd.rst`, and what each outcome means here:
//!
//! * `UFFDIO_COPY` returning `EEXIST`: the first page of the range is already present (another
//!   fault or an earlier copy filled it). That page is done; nobody was woken by this call.
//! * `EAGAIN` with a count: the copy stopped part-way because the VMM's address space is changing
//!   (a non-cooperative event such as `UFFD_EVENT_REMOVE` is queued and unread). Read the events,
//!   apply them, then resume after the bytes done. The `userfaultfd` crate (0.9) reports a
//!   zero-progress `EAGAIN` as `PartiallyCopied` with `-EAGAIN` cast to usize: mapped to
//!   `Partial(0)` here.
//! * `ESRCH`: the uffd's address space has no users left (`mmget_not_zero` failed): the VMM
//!   exited. That is proof that its memory is gone.
//! * `ENOENT`: no registered mapping holds the whole range (`uffd_mfill_lock` /
//!   `validate_dst_vma` in the kernel's `mm/userfaultfd.c`): the VMM unmapped or unregistered
//!   it, or our own `UFFDIO_UNREGISTER` did. It says nothing about whether the VMM lives: never
//!   proof that a session is over (callers check the VMM's stream for that).
//! * `UFFDIO_ZEROPAGE` does not work on hugetlbfs regions: callers copy zeros there instead.
//! * A non-cooperative event (`UFFD_EVENT_REMOVE`, `UNMAP`, `REMAP`, `FORK`) holds the VMM's
//!   thread until the event is read. The kernel counts it in `ctx->mmap_changing` while it still
//!   holds the VMM's `mmap_lock`, but queues it only after dropping that lock
//!   (`userfaultfd_remove` in `fs/userfaultfd.c`): an event can appear *after* our
//!   `UFFDIO_UNREGISTER` returned and after a drain found the queue empty. `UFFDIO_ZEROPAGE`
//!   checks `mmap_changing` before it looks at its range, so a zero-length one answers `EAGAIN`
//!   while any event is in flight and `EINVAL` otherwise, touching nothing: see
//!   [`events_in_flight`].
//!
//! Every call names a destination in the VMM's address space, not in this process; the source is
//! read by the kernel with `copy_from_user`, so an unreadable source is `EFAULT`, never a signal.

use std::ffi::c_void;

use nix::errno::Errno;
use userfaultfd::Uffd;

/// Creates a userfaultfd the way Firecracker does: close-on-exec, non-blocking, with
/// `UFFD_FEATURE_EVENT_REMOVE`. `user_mode_only(false)` lets kernel-mode accesses fault too
/// (root, or access to `/dev/userfaultfd`).
pub fn firecracker_uffd(user_mode_only: bool) -> userfaultfd::Result<Uffd> {
    userfaultfd::UffdBuilder::new()
        .close_on_exec(true)
        .non_blocking(true)
        .user_mode_only(user_mode_only)
        .require_features(userfaultfd::FeatureFlags::EVENT_REMOVE)
        .create()
}

/// A user-mode-only uffd made with the system call itself, for an unprivileged process where
/// `/dev/userfaultfd` exists but is not open to it (a VMM running as its own uid): the
/// `userfaultfd` crate then fails instead of falling back to the system call, which Linux
/// (5.11+) allows any process for `UFFD_USER_MODE_ONLY` (userfaultfd(2),
/// `vm.unprivileged_userfaultfd`). Close-on-exec, non-blocking, `UFFD_FEATURE_EVENT_REMOVE`.
pub fn user_mode_uffd_by_syscall() -> std::io::Result<Uffd> {
    use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
    use userfaultfd_sys as sys;

    nix::ioctl_readwrite!(uffdio_api, sys::UFFDIO, sys::_UFFDIO_API, sys::uffdio_api);
    let mode = i32::try_from(sys::UFFD_USER_MODE_ONLY).map_err(std::io::Error::other)?;
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK | mode;
    // SAFETY: userfaultfd(2) takes only its flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(std::io::Error::other)?;
    // SAFETY: `fd` was just returned by the kernel and nothing else owns it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut api =
        sys::uffdio_api { api: sys::UFFD_API, features: sys::UFFD_FEATURE_EVENT_REMOVE, ioctls: 0 };
    // SAFETY: `owned` is a userfaultfd and `api` a valid uffdio_api the kernel fills in.
    unsafe { uffdio_api(owned.as_raw_fd(), &mut api) }?;
    // SAFETY: ownership of the descriptor moves into the `Uffd`, which closes it.
    Ok(unsafe { Uffd::from_raw_fd(owned.into_raw_fd()) })
}

/// What one `UFFDIO_COPY` / `UFFDIO_ZEROPAGE` achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FillOutcome {
    /// The whole range was filled (and woken, if asked).
    Done,
    /// The first `n` bytes were filled, then the kernel said `EAGAIN`: read pending events, then
    /// resume at `dst + n`. `n` may be 0.
    Partial(u64),
    /// The first page of the range was already present (`EEXIST`).
    Exists,
    /// The VMM's address space is gone (`ESRCH`): the session is over.
    Gone(Errno),
    /// No registered mapping holds the range (`ENOENT`): not proof that the VMM is gone.
    NoMapping,
}

fn errno_of(e: &userfaultfd::Error) -> Errno {
    match e {
        userfaultfd::Error::CopyFailed(errno) | userfaultfd::Error::ZeropageFailed(errno) => {
            Errno::from_raw(*errno as i32)
        }
        userfaultfd::Error::SystemError(errno) => Errno::from_raw(*errno as i32),
        _ => Errno::EIO,
    }
}

fn outcome_of_errno(errno: Errno) -> Result<FillOutcome, Errno> {
    match errno {
        Errno::EEXIST => Ok(FillOutcome::Exists),
        Errno::EAGAIN => Ok(FillOutcome::Partial(0)),
        Errno::ESRCH => Ok(FillOutcome::Gone(errno)),
        Errno::ENOENT => Ok(FillOutcome::NoMapping),
        other => Err(other),
    }
}

/// Interprets the crate's result of a copy of `len` bytes.
fn outcome_of_copy(result: userfaultfd::Result<usize>, len: u64) -> Result<FillOutcome, Errno> {
    match result {
        Ok(n) if n as u64 >= len => Ok(FillOutcome::Done),
        Ok(n) => Ok(FillOutcome::Partial(n as u64)),
        // A count larger than the request is the kernel's negative errno cast to usize: no
        // progress at all.
        Err(userfaultfd::Error::PartiallyCopied(n)) if (n as u64) < len => {
            Ok(FillOutcome::Partial(n as u64))
        }
        Err(userfaultfd::Error::PartiallyCopied(_)) => Ok(FillOutcome::Partial(0)),
        Err(e) => outcome_of_errno(errno_of(&e)),
    }
}

/// `UFFDIO_COPY`: copies `src` into the registered range at `dst` (in the uffd's address space).
/// `dst` must be page aligned and `src.len()` a multiple of the region's page size.
pub fn copy(uffd: &Uffd, src: &[u8], dst: u64, wake: bool) -> Result<FillOutcome, Errno> {
    let len = src.len() as u64;
    // SAFETY: the kernel reads `src` with copy_from_user (an unmapped source is EFAULT, not UB)
    // and writes only to missing pages of a range registered on `uffd`, which belongs to the
    // VMM's address space: no memory of this process that Rust code references is written.
    let result = unsafe { uffd.copy(src.as_ptr().cast(), dst as *mut c_void, src.len(), wake) };
    outcome_of_copy(result, len)
}

/// `UFFDIO_ZEROPAGE`: maps zero pages at `dst..dst+len` (not for hugetlbfs ranges).
pub fn zeropage(uffd: &Uffd, dst: u64, len: u64, wake: bool) -> Result<FillOutcome, Errno> {
    let len_usize = usize::try_from(len).map_err(|_| Errno::EINVAL)?;
    // SAFETY: as for `copy`: the kernel fills only missing pages of a registered range of the
    // uffd's (the VMM's) address space.
    match unsafe { uffd.zeropage(dst as *mut c_void, len_usize, wake) } {
        Ok(n) if n as u64 >= len => Ok(FillOutcome::Done),
        Ok(n) => Ok(FillOutcome::Partial(n as u64)),
        Err(e) => outcome_of_errno(errno_of(&e)),
    }
}

/// Whether a non-cooperative event is raised and not yet read, queued or about to be (see the
/// module's notes): a `UFFDIO_ZEROPAGE` of an empty range, which the kernel refuses with `EAGAIN`
/// while `mmap_changing` is set and with `EINVAL` (an empty range) otherwise. It maps nothing.
pub fn events_in_flight(uffd: &Uffd) -> Result<bool, Errno> {
    use std::os::fd::AsRawFd;
    use userfaultfd_sys as sys;

    nix::ioctl_readwrite!(
        uffdio_zeropage,
        sys::UFFDIO,
        sys::_UFFDIO_ZEROPAGE,
        sys::uffdio_zeropage
    );
    let mut probe = sys::uffdio_zeropage {
        range: sys::uffdio_range { start: 0, len: 0 },
        mode: sys::UFFDIO_ZEROPAGE_MODE_DONTWAKE,
        zeropage: 0,
    };
    // SAFETY: `uffd` is a userfaultfd and `probe` a valid uffdio_zeropage the kernel may write its
    // result into; an empty range maps nothing.
    match unsafe { uffdio_zeropage(uffd.as_raw_fd(), &mut probe) } {
        Err(Errno::EAGAIN) => Ok(true),
        Err(Errno::EINVAL) => Ok(false),
        Err(other) => Err(other),
        // No kernel maps an empty range; should one, nothing was mapped and nothing is pending.
        Ok(_) => Ok(false),
    }
}

/// `UFFDIO_WAKE`: wakes threads blocked on faults in `start..start+len`.
pub fn wake(uffd: &Uffd, start: u64, len: u64) -> Result<(), Errno> {
    let len = usize::try_from(len).map_err(|_| Errno::EINVAL)?;
    uffd.wake(start as *mut c_void, len).map_err(|e| errno_of(&e))
}

/// `UFFDIO_UNREGISTER`: stops userfaultfd handling of `start..start+len`. From then on the kernel
/// serves faults there itself, zero-filling missing pages: call it only after a full populate.
pub fn unregister(uffd: &Uffd, start: u64, len: u64) -> Result<(), Errno> {
    let len = usize::try_from(len).map_err(|_| Errno::EINVAL)?;
    uffd.unregister(start as *mut c_void, len).map_err(|e| errno_of(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_mode_uffd_by_the_system_call_is_non_blocking_and_close_on_exec() {
        use std::os::fd::AsRawFd;
        let uffd = user_mode_uffd_by_syscall().expect("userfaultfd(2) with UFFD_USER_MODE_ONLY");
        let fl = nix::fcntl::fcntl(uffd.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL).unwrap();
        assert_ne!(fl & libc::O_NONBLOCK, 0, "non-blocking");
        let fd = nix::fcntl::fcntl(uffd.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFD).unwrap();
        assert_ne!(fd & libc::FD_CLOEXEC, 0, "close-on-exec");
    }

    /// A REMOVE raised by a thread of ours (its `madvise` waits until the event is read) is in
    /// flight after the range is unregistered, and no longer once read: the probe the graduation
    /// relies on to read every event before it lets go of a uffd.
    #[test]
    fn an_unread_remove_is_in_flight_past_unregister_until_it_is_read() {
        use std::os::fd::AsFd;
        let uffd = firecracker_uffd(false).expect("a userfaultfd");
        let len = 16 * 4096;
        let mut map = memmap2::MmapMut::map_anon(len).expect("anonymous memory");
        let base = map.as_mut_ptr() as u64;
        uffd.register(map.as_mut_ptr().cast(), len).expect("register");
        assert_eq!(events_in_flight(&uffd), Ok(false), "nothing raised yet");

        let discard = std::thread::spawn(move || {
            // SAFETY: the range is this test's own anonymous mapping, alive until the join.
            let r = unsafe { libc::madvise(base as *mut c_void, 4 * 4096, libc::MADV_DONTNEED) };
            assert_eq!(r, 0, "madvise");
        });
        let raised = std::time::Instant::now();
        while events_in_flight(&uffd) != Ok(true) {
            assert!(raised.elapsed() < std::time::Duration::from_secs(10), "the REMOVE never came");
            std::thread::yield_now();
        }
        unregister(&uffd, base, len as u64).expect("unregister");
        assert_eq!(events_in_flight(&uffd), Ok(true), "the REMOVE is still unread");

        let mut msg = [0u64; crate::uffd_msg::MSG_WORDS];
        let read = loop {
            // SAFETY: `msg` is a local buffer of one message, read only after the call returns.
            match unsafe { crate::uffd_msg::read_into(uffd.as_fd(), msg.as_mut_ptr().cast(), 32) } {
                Ok(0) => std::thread::yield_now(),
                other => break other,
            }
        };
        assert_eq!(read, Ok(1), "one event read");
        discard.join().expect("the madvise returns once its REMOVE is read");
        assert_eq!(events_in_flight(&uffd), Ok(false), "nothing in flight once read");
        drop(map);
    }

    #[test]
    fn a_full_copy_is_done_and_a_short_one_partial() {
        assert_eq!(outcome_of_copy(Ok(8192), 8192), Ok(FillOutcome::Done));
        assert_eq!(outcome_of_copy(Ok(4096), 8192), Ok(FillOutcome::Partial(4096)));
    }

    #[test]
    fn a_zero_progress_eagain_is_partial_zero_not_a_huge_count() {
        let minus_eagain = (-(libc::EAGAIN as i64)) as usize;
        assert_eq!(
            outcome_of_copy(Err(userfaultfd::Error::PartiallyCopied(minus_eagain)), 8192),
            Ok(FillOutcome::Partial(0))
        );
        assert_eq!(
            outcome_of_copy(Err(userfaultfd::Error::PartiallyCopied(4096)), 8192),
            Ok(FillOutcome::Partial(4096))
        );
    }

    #[test]
    fn eexist_means_present_esrch_gone_and_enoent_no_mapping() {
        // The `userfaultfd` crate reports errors with the nix version it was built with.
        let e = |x: i32| userfaultfd::Error::CopyFailed(nix027::errno::Errno::from_i32(x));
        assert_eq!(outcome_of_copy(Err(e(libc::EEXIST)), 4096), Ok(FillOutcome::Exists));
        assert_eq!(outcome_of_copy(Err(e(libc::ESRCH)), 4096), Ok(FillOutcome::Gone(Errno::ESRCH)));
        assert_eq!(outcome_of_copy(Err(e(libc::ENOENT)), 4096), Ok(FillOutcome::NoMapping));
        assert_eq!(outcome_of_copy(Err(e(libc::EFAULT)), 4096), Err(Errno::EFAULT));
    }
}
