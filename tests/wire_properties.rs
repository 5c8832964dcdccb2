//! Property tests of the two wire formats a pager's inputs arrive in: Firecracker's handshake
//! (`uffdpager::firecracker`) and the supervisor → pager handoff (`uffdpager::handoff`). Over
//! random and mutated inputs nothing panics, and every input either parses into something that
//! holds the format's invariants or is refused with a reason.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;

use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use proptest::prelude::*;
use uffdpager::firecracker::{self, GuestRegionUffdMapping, Region, PAGE_2M, PAGE_4K};
use uffdpager::handoff::{self, HandoffError, HandoffRequest};

/// What a real Firecracker 1.16.1 restore sent (docs/DESIGN.md).
const FIRECRACKER_1_16_1: &str = r#"[{"base_host_virt_addr":140337590829056,"size":536870912,"offset":0,"page_size":4096,"page_size_kib":4096}]"#;

/// The invariants of a validated handshake.
fn check_regions(regions: &[Region], file_len: u64) -> Result<(), TestCaseError> {
    prop_assert!(!regions.is_empty());
    for r in regions {
        prop_assert!(r.page_size == PAGE_4K || r.page_size == PAGE_2M, "{r:?}");
        prop_assert!(r.size > 0 && r.size % r.page_size == 0, "{r:?}");
        prop_assert!(r.base % r.page_size == 0 && r.offset % r.page_size == 0, "{r:?}");
        prop_assert!(r.offset.checked_add(r.size).is_some_and(|e| e <= file_len), "{r:?}");
    }
    for w in regions.windows(2) {
        prop_assert!(w[0].end() <= w[1].base, "sorted, not overlapping: {w:?}");
    }
    Ok(())
}

/// Parses and validates; an error must say something.
fn handshake_outcome(bytes: &[u8], file_len: u64) -> Result<(), TestCaseError> {
    match firecracker::parse_mappings(bytes).and_then(|m| firecracker::validate(&m, file_len)) {
        Ok(regions) => check_regions(&regions, file_len),
        Err(e) => {
            prop_assert!(!e.to_string().is_empty());
            Ok(())
        }
    }
}

fn page_size() -> impl Strategy<Value = Option<u64>> {
    prop_oneof![Just(Some(PAGE_4K)), Just(Some(PAGE_2M)), Just(None), any::<u64>().prop_map(Some),]
}

fn mapping() -> impl Strategy<Value = GuestRegionUffdMapping> {
    let value = || prop_oneof![(0u64..4096).prop_map(|p| p * PAGE_4K), any::<u64>()];
    (value(), value(), value(), page_size(), page_size()).prop_map(
        |(base, size, offset, page_size, page_size_kib)| GuestRegionUffdMapping {
            base_host_virt_addr: base,
            size,
            offset,
            page_size,
            page_size_kib,
        },
    )
}

proptest! {
    #[test]
    fn any_bytes_either_parse_as_a_handshake_or_are_refused_with_a_reason(
        bytes in prop::collection::vec(any::<u8>(), 0..512),
        file_len in any::<u64>(),
    ) {
        handshake_outcome(&bytes, file_len)?;
    }

    #[test]
    fn mutations_of_firecrackers_own_handshake_parse_or_are_refused_with_a_reason(
        edits in prop::collection::vec((0usize..107, any::<u8>(), 0u8..3), 1..6),
        file_len in prop_oneof![Just(536_870_912u64), any::<u64>()],
    ) {
        let mut bytes = FIRECRACKER_1_16_1.as_bytes().to_vec();
        for (at, byte, kind) in edits {
            let at = at.min(bytes.len().saturating_sub(1));
            match kind {
                0 if !bytes.is_empty() => bytes[at] = byte,
                1 => bytes.insert(at, byte),
                _ if !bytes.is_empty() => { bytes.remove(at); }
                _ => {}
            }
        }
        handshake_outcome(&bytes, file_len)?;
    }

    #[test]
    fn any_list_of_mappings_validates_into_sound_regions_or_is_refused(
        mappings in prop::collection::vec(mapping(), 0..6),
        file_len in prop_oneof![Just(1u64 << 30), any::<u64>()],
    ) {
        let json = serde_json::to_vec(&mappings).unwrap();
        handshake_outcome(&json, file_len)?;
    }
}

/// A connected `SOCK_SEQPACKET` pair, the handoff's socket type.
fn seqpacket_pair() -> (UnixStream, UnixStream) {
    let (a, b) = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)
        .expect("socketpair");
    (UnixStream::from(a), UnixStream::from(b))
}

fn some_fds(n: usize) -> Vec<OwnedFd> {
    (0..n).map(|_| OwnedFd::from(tempfile::tempfile().unwrap())).collect()
}

/// Sends `bytes` with `fds` descriptors and receives it as a pager does: either a request with
/// three or four descriptors, or a refusal that says why.
fn handoff_outcome(bytes: &[u8], fds: usize) -> Result<(), TestCaseError> {
    let (tx, rx) = seqpacket_pair();
    let owned = some_fds(fds);
    let attached: Vec<_> = owned.iter().map(|f| f.as_fd()).collect();
    uffdpager::scm::send_with_fds(tx.as_fd(), bytes, &attached).expect("send");
    match handoff::recv_session(&rx) {
        Ok((request, got)) => {
            prop_assert!((3..=4).contains(&fds), "{fds} descriptors accepted");
            prop_assert_eq!(got.removed_log.is_some(), fds == 4);
            prop_assert!(serde_json::to_vec(&request).is_ok());
        }
        Err(e) => {
            prop_assert!(!e.to_string().is_empty());
            if bytes.is_empty() && fds == 0 {
                prop_assert!(matches!(e, HandoffError::Closed), "{e}");
            }
        }
    }
    Ok(())
}

fn a_real_request() -> Vec<u8> {
    serde_json::to_vec(&HandoffRequest {
        session_id: "vm-1".into(),
        memory_file: "/snap/mem".into(),
        regions: vec![Region { base: 0x10000, size: 0x2000, offset: 0, page_size: 4096 }],
        vmm_pid: 42,
        connected_at_ms: 1,
        adopt: true,
        removed: vec![(0x10000, 0x11000)],
        overlays: vec![],
        faults: 3,
        vmm_fd: Default::default(),
        record_working_set: None,
        prefetch_working_set: Some("/snap/ws".into()),
    })
    .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn any_handoff_message_is_taken_or_refused_with_a_reason(
        bytes in prop::collection::vec(any::<u8>(), 0..1024),
        fds in 0usize..12,
    ) {
        handoff_outcome(&bytes, fds)?;
    }

    #[test]
    fn mutations_of_a_real_handoff_request_are_taken_or_refused_with_a_reason(
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
        fds in 0usize..12,
    ) {
        let mut bytes = a_real_request();
        for (at, byte) in edits {
            let i = at.index(bytes.len());
            bytes[i] = byte;
        }
        handoff_outcome(&bytes, fds)?;
    }
}

#[test]
fn a_real_request_with_its_descriptors_is_taken_whole() {
    let (tx, rx) = seqpacket_pair();
    let owned = some_fds(4);
    let attached: Vec<_> = owned.iter().map(|f| f.as_fd()).collect();
    uffdpager::scm::send_with_fds(tx.as_fd(), &a_real_request(), &attached).unwrap();
    let (request, fds) = handoff::recv_session(&rx).unwrap();
    assert_eq!(request.session_id, "vm-1");
    assert!(request.adopt && fds.removed_log.is_some());
}
