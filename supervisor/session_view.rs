//! How a session is shown through the API: its state's name in messages, and what its
//! handshake adds to its record (connection time, VMM pid, size, regions). Pure.

use uffdpager::api::{Region, Session, SessionState};
use uffdpager::handoff::HandoffRequest;

/// The API's spelling of a session state, for messages: the generated name without its
/// `SESSION_STATE_` prefix ("SERVING").
pub fn state_name(state: SessionState) -> &'static str {
    let name = state.as_str_name();
    name.strip_prefix("SESSION_STATE_").unwrap_or(name)
}

/// What a connected session shows of its handshake: connection time, VMM pid, size, and its
/// regions in memory-file order, the order Firecracker lists guest memory in (the handshake's
/// validation sorted them by host address).
pub fn show_connected(s: &mut Session, request: &HandoffRequest) {
    s.connected_at = Some(uffdpager::grpc::timestamp_ms(request.connected_at_ms));
    s.vmm_pid = request.vmm_pid;
    s.total_bytes = request.regions.iter().map(|r| r.size).sum();
    s.regions = regions_in_file_order(request.regions.iter().map(to_proto_region).collect());
}

/// Regions sorted by their offset in the memory file.
pub fn regions_in_file_order(mut regions: Vec<Region>) -> Vec<Region> {
    regions.sort_by_key(|r| r.offset);
    regions
}

pub fn to_proto_region(r: &uffdpager::firecracker::Region) -> Region {
    Region { base_host_virt_addr: r.base, size: r.size, offset: r.offset, page_size: r.page_size }
}
