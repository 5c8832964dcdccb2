//! Zero elision in graduation: pages whose snapshot content is zero (written zero pages and file
//! holes) are not copied into the VM. After graduation the kernel supplies zeros for them, so
//! the VM reads zeros there and its resident set is smaller than its size by the zero share.

mod common;

use common::{vm_cmd, Env, MIB, STEP};
use uffdpager::api::{CompleteSessionRequest, SessionState};
use vmsim::memfile::MemoryFileSpec;

/// Sum of `Rss:` (bytes) of the VMAs of process `pid` that overlap `[start, end)`.
fn rss_of_range(pid: u32, start: u64, end: u64) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).expect("smaps readable");
    let mut inside = false;
    let mut kib = 0;
    for line in smaps.lines() {
        let header = line.split_once(' ').and_then(|(range, _)| {
            let (a, b) = range.split_once('-')?;
            Some((u64::from_str_radix(a, 16).ok()?, u64::from_str_radix(b, 16).ok()?))
        });
        if let Some((a, b)) = header {
            inside = a < end && start < b;
        } else if let Some(rss) = line.strip_prefix("Rss:") {
            if inside {
                kib += rss.trim().trim_end_matches("kB").trim().parse::<u64>().expect("Rss in kB");
            }
        }
    }
    kib * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graduated_vm_reads_zeros_in_holes_and_zero_pages_and_its_resident_set_leaves_them_out() {
    let env = Env::start().await;
    let size = 64 * MIB;
    let mem = env.memfile("sparse.mem", size, 0.25, 0.25);
    // The same spec `Env::memfile` wrote: how many pages hold data.
    let spec =
        MemoryFileSpec { size, seed: size ^ 0x5eed, zero_fraction: 0.25, hole_fraction: 0.25 };
    let counts = spec.counts();
    let data_bytes = counts.random * 4096;
    let zero_bytes = (counts.zero + counts.hole) * 4096;
    assert!(zero_bytes > size / 3, "the file is about half zeros: {counts:?}");

    let mut vm = env.restore("sparse", &mem, &[]).await;
    let region = &vm.restored["regions"][0];
    let base = region["base"].as_u64().expect("region base");
    assert_eq!(region["size"].as_u64(), Some(size));
    assert_eq!(rss_of_range(vm.pid, base, base + size), 0, "nothing touched yet");

    let done = env
        .client()
        .complete_session(CompleteSessionRequest { session_id: "sparse".into() })
        .await
        .expect("CompleteSession")
        .into_inner();
    assert_eq!(done.session.as_ref().unwrap().state(), SessionState::Graduated, "{done:?}");
    assert!(done.populated_bytes <= data_bytes, "zero pages were copied: {done:?}");
    let smaps = tokio::task::block_in_place(|| vm.command("smaps", STEP)).unwrap();
    assert_eq!(smaps["registered_vmas"], 0, "{smaps}");

    // Resident now: exactly the data pages (within 1% of the size, for the kernel's leeway).
    let margin = size / 100;
    let rss = rss_of_range(vm.pid, base, base + size);
    assert!(
        rss.abs_diff(data_bytes) <= margin,
        "resident {} MiB after graduation, the data pages are {} MiB of {} MiB",
        rss / MIB,
        data_bytes / MIB,
        size / MIB
    );

    // Every byte reads as the memory file says, zeros included; reading the zero pages maps the
    // kernel's shared zero page, which allocates nothing.
    let all = vm_cmd(&mut vm, "verify").await;
    assert_eq!(all["pages_verified"].as_u64(), Some(size / 4096), "{all}");
    let rss_after = rss_of_range(vm.pid, base, base + size);
    assert!(
        rss_after.abs_diff(data_bytes) <= margin,
        "resident {} MiB after reading every page, the data pages are {} MiB",
        rss_after / MIB,
        data_bytes / MIB
    );
}
