//! A userfaultfd received from another process (a VMM's handshake, a supervisor's handoff):
//! checked before anything serves it, and made non-blocking.
//!
//! * **Features.** `/proc/self/fdinfo/<fd>` says what the uffd was created with, in the line
//!   `API:\t<api>:<features>:<ioctls>` (hex; `userfaultfd_show_fdinfo` in the kernel's
//!   `fs/userfaultfd.c`). Without `UFFD_FEATURE_EVENT_REMOVE` a balloon's `MADV_DONTNEED`
//!   zaps pages the pager believes present and never tells it; Firecracker always sets the
//!   feature, so such a uffd is refused.
//! * **Non-blocking.** A uffd created without `O_NONBLOCK` makes `read()` wait for an event; a
//!   fault worker that reads it with nothing queued would wait for ever, and every VM it serves
//!   with it. `fcntl(F_SETFL, O_NONBLOCK)` sets the flag on the open file description, which
//!   every duplicate of the fd shares (the VMM's too): what Firecracker does with its own uffd.
//!   Since the VMM can clear the flag again, the pager also reads with `RWF_NOWAIT`
//!   (`pager/events.rs`).

use std::os::fd::{AsRawFd, BorrowedFd};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};

/// `UFFD_FEATURE_EVENT_REMOVE` (`include/uapi/linux/userfaultfd.h`).
pub const FEATURE_EVENT_REMOVE: u64 = 1 << 3;

/// What `/proc/self/fdinfo/<fd>` says of a userfaultfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UffdInfo {
    /// The API version the uffd was opened with (`UFFD_API`, 0xaa).
    pub api: u64,
    /// The features enabled by `UFFDIO_API` (the kernel adds its own internal bit 31 once the
    /// API handshake is done).
    pub features: u64,
    /// The ioctls the uffd offers.
    pub ioctls: u64,
}

impl UffdInfo {
    /// Whether balloon discards (`MADV_DONTNEED`) are reported as `UFFD_EVENT_REMOVE`.
    pub fn reports_removes(&self) -> bool {
        self.features & FEATURE_EVENT_REMOVE != 0
    }
}

/// Why a received uffd is not served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UffdCheckError {
    #[error("reading the userfaultfd's fdinfo: {0}")]
    FdInfo(String),
    #[error(
        "the userfaultfd lacks UFFD_FEATURE_EVENT_REMOVE (features {features:#x}): balloon \
         discards would go unseen and discarded pages would never be served again (Firecracker \
         always enables it)"
    )]
    NoRemoveEvents { features: u64 },
    #[error("making the userfaultfd non-blocking: {0}")]
    NonBlocking(Errno),
}

/// Parses the `API:` line of a userfaultfd's fdinfo. `None` if there is none or it is malformed.
pub fn parse_fdinfo(text: &str) -> Option<UffdInfo> {
    let line = text.lines().find_map(|l| l.strip_prefix("API:"))?;
    let mut fields = line.trim().split(':').map(|f| u64::from_str_radix(f.trim(), 16));
    let (Some(Ok(api)), Some(Ok(features)), Some(Ok(ioctls)), None) =
        (fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return None;
    };
    Some(UffdInfo { api, features, ioctls })
}

/// Reads a userfaultfd's features from `/proc/self/fdinfo`.
pub fn uffd_info(fd: BorrowedFd<'_>) -> Result<UffdInfo, UffdCheckError> {
    let path = format!("/proc/self/fdinfo/{}", fd.as_raw_fd());
    let text = std::fs::read_to_string(&path)
        .map_err(|e| UffdCheckError::FdInfo(format!("{path}: {e}")))?;
    parse_fdinfo(&text)
        .ok_or_else(|| UffdCheckError::FdInfo(format!("{path} has no API line: {text:?}")))
}

/// Sets `O_NONBLOCK` on the fd's open file description (shared with every duplicate).
pub fn set_nonblocking(fd: BorrowedFd<'_>) -> Result<(), Errno> {
    let flags = OFlag::from_bits_retain(fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL)?);
    if !flags.contains(OFlag::O_NONBLOCK) {
        fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    }
    Ok(())
}

/// Whether `O_NONBLOCK` is set on the fd's open file description.
pub fn is_nonblocking(fd: BorrowedFd<'_>) -> Result<bool, Errno> {
    let flags = OFlag::from_bits_retain(fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL)?);
    Ok(flags.contains(OFlag::O_NONBLOCK))
}

/// Checks a received userfaultfd (the caller has checked it is one) and makes it non-blocking:
/// refused unless it reports balloon discards.
pub fn accept_received(fd: BorrowedFd<'_>) -> Result<UffdInfo, UffdCheckError> {
    let info = uffd_info(fd)?;
    if !info.reports_removes() {
        return Err(UffdCheckError::NoRemoveEvents { features: info.features });
    }
    set_nonblocking(fd).map_err(UffdCheckError::NonBlocking)?;
    Ok(info)
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    #[test]
    fn the_api_line_of_a_real_fdinfo_parses() {
        let text = "pos:\t0\nflags:\t02000000\nmnt_id:\t17\nino:\t34365\npending:\t0\ntotal:\t0\n\
                    API:\taa:80000008:80000000000001ff\n";
        let info = parse_fdinfo(text).unwrap();
        assert_eq!(
            info,
            UffdInfo { api: 0xaa, features: 0x8000_0008, ioctls: 0x8000_0000_0000_01ff }
        );
        assert!(info.reports_removes());
        let without = parse_fdinfo("API:\taa:80000000:1ff\n").unwrap();
        assert!(!without.reports_removes());
    }

    #[test]
    fn an_fdinfo_without_a_well_formed_api_line_does_not_parse() {
        for text in ["", "pos:\t0\n", "API:\taa:zz:1ff\n", "API:\taa:8\n", "API:\t1:2:3:4\n"] {
            assert_eq!(parse_fdinfo(text), None, "{text:?}");
        }
    }

    #[test]
    fn the_feature_bit_matches_the_kernel_header() {
        assert_eq!(FEATURE_EVENT_REMOVE, userfaultfd_sys::UFFD_FEATURE_EVENT_REMOVE);
    }

    #[test]
    fn a_blocking_uffd_with_remove_events_is_accepted_and_made_non_blocking() {
        let uffd = userfaultfd::UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(false)
            .user_mode_only(false)
            .require_features(userfaultfd::FeatureFlags::EVENT_REMOVE)
            .create()
            .expect("a userfaultfd");
        assert!(!is_nonblocking(uffd.as_fd()).unwrap());
        let info = accept_received(uffd.as_fd()).unwrap();
        assert!(info.reports_removes());
        assert!(is_nonblocking(uffd.as_fd()).unwrap());
    }

    #[test]
    fn a_uffd_without_remove_events_is_refused_and_left_as_it_was() {
        let uffd = userfaultfd::UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(false)
            .user_mode_only(false)
            .create()
            .expect("a userfaultfd");
        let err = accept_received(uffd.as_fd()).unwrap_err();
        assert!(matches!(err, UffdCheckError::NoRemoveEvents { .. }), "{err}");
        assert!(err.to_string().contains("UFFD_FEATURE_EVENT_REMOVE"), "{err}");
        assert!(!is_nonblocking(uffd.as_fd()).unwrap());
    }
}
