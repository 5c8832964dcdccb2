//! A graduated VM's whole life, through the real binaries: restore from snapshot S0, served on
//! demand (reads, writes, a balloon discard), graduated while a reader runs, new writes on pages
//! never touched before graduation (no pager serves them any more: the kernel must), standby to
//! a new snapshot S1, S1 restored on a new session of another pager version, every byte as the
//! VM held it, graduated again, exit; and afterwards the supervisor and the pagers hold nothing
//! of it (fds, mappings, threads, counted in /proc).

// Test values are small and known: plain `as` casts.
#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_possible_wrap)]

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{
    holdings, vm_cmd, vm_cmd_within, wait_holdings_within, Env, MIB, STEP,
    SUPERVISOR_THREAD_SLACK as SLACK,
};
use testkit::{SupervisorOptions, VmProcess};
use uffdpager::api::{
    CompleteSessionRequest, CompleteSessionResponse, DeleteSessionRequest, ListVersionsRequest,
    PagerVersion, SessionState, VersionState,
};
use vmsim::expect::pattern_word;
use vmsim::GuestRegionSpec;

/// How long a write to pages never touched before graduation may take before the test calls
/// the page unserved (it takes milliseconds when the kernel serves it).
const UNSERVED: Duration = Duration::from_secs(20);

/// The guest: two regions with a 4 MiB gap between them in the memory file, as Firecracker lays
/// out a VM with a memory hole. Offsets below are within a region.
const REGIONS: [(u64, u64); 2] = [(16 * MIB, 0), (8 * MIB, 20 * MIB)];
/// Where S0 is a hole (region 0's last 4 MiB): pages whose snapshot content is zero, which no
/// pager copies at graduation; the kernel supplies them afterwards.
const S0_HOLE: (u64, u64) = (12 * MIB, 4 * MIB);
/// S1's length: the end of the last region.
const S1_LEN: u64 = 28 * MIB;

/// What a range of guest memory must hold at standby.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Content {
    /// S0's bytes (read, or populated by graduation).
    S0,
    /// Zeros (ballooned, or a hole of S0 never written).
    Zero,
    /// The pattern the guest wrote with this generation.
    Gen(u32),
}

/// The life's plan in 2 MiB steps, `(region, offset, content at standby, what happened)`. The
/// working set before graduation is region 0's first 8 MiB: everything else is never touched
/// by the guest until after graduation.
const PLAN: [(usize, u64, Content, &str); 12] = [
    (0, 0, Content::S0, "read before graduation"),
    (0, 2 * MIB, Content::Zero, "read, then ballooned"),
    (0, 4 * MIB, Content::Gen(1), "read, then written"),
    (0, 6 * MIB, Content::S0, "read, and by the reader during graduation"),
    (0, 8 * MIB, Content::S0, "never touched: populated by graduation"),
    (0, 10 * MIB, Content::Gen(2), "never touched, written after graduation"),
    (0, 12 * MIB, Content::Gen(2), "S0 hole never touched, written after graduation"),
    (0, 14 * MIB, Content::Zero, "S0 hole never touched"),
    (1, 0, Content::Zero, "ballooned, never touched"),
    (1, 2 * MIB, Content::Gen(3), "ballooned, never touched, written after graduation"),
    (1, 4 * MIB, Content::S0, "never touched: populated by graduation"),
    (1, 6 * MIB, Content::Gen(4), "never touched, written after graduation"),
];

/// Page arithmetic of the guest for one page size.
#[derive(Debug, Clone, Copy)]
struct Guest {
    page: u64,
}

impl Guest {
    fn regions(&self) -> Vec<String> {
        let suffix = if self.page == 2 * MIB { ":2M" } else { "" };
        REGIONS
            .iter()
            .map(|(size, off)| format!("{}M@{}M{suffix}", size / MIB, off / MIB))
            .collect()
    }

    /// Global index of the page at `offset` in `region`.
    fn page_at(&self, region: usize, offset: u64) -> u64 {
        let before: u64 = REGIONS[..region].iter().map(|(size, _)| size / self.page).sum();
        before + offset / self.page
    }

    fn pages(&self, bytes: u64) -> u64 {
        bytes / self.page
    }

    fn total_pages(&self) -> u64 {
        self.pages(REGIONS.iter().map(|(size, _)| size).sum())
    }

    /// S1 as it must be, computed from S0 and the plan alone (not from the simulator's
    /// bookkeeping): S0's bytes, write patterns (`pattern_word` of each page, generation and
    /// word), zeros; zeros in the gap between regions.
    fn expected_s1(&self, s0: &[u8]) -> Vec<u8> {
        let mut image = vec![0u8; S1_LEN as usize];
        for (region, offset, content, _) in PLAN {
            let start = (REGIONS[region].1 + offset) as usize;
            let range = start..start + 2 * MIB as usize;
            match content {
                Content::S0 => image[range.clone()].copy_from_slice(&s0[range]),
                Content::Zero => {}
                Content::Gen(gen) => {
                    for (i, page) in image[range].chunks_mut(self.page as usize).enumerate() {
                        let global = self.page_at(region, offset) + i as u64;
                        for (w, bytes) in page.chunks_mut(8).enumerate() {
                            bytes.copy_from_slice(&pattern_word(global, gen, w).to_ne_bytes());
                        }
                    }
                }
            }
        }
        image
    }
}

/// Compares S1 with its expected image, 2 MiB step by step, naming the first step that differs.
fn assert_s1_is(s1: &[u8], expected: &[u8]) {
    assert_eq!(s1.len(), expected.len(), "S1's length");
    for (region, offset, content, what) in PLAN {
        let start = (REGIONS[region].1 + offset) as usize;
        let range = start..start + 2 * MIB as usize;
        if s1[range.clone()] != expected[range.clone()] {
            let at = range.clone().find(|&i| s1[i] != expected[i]).unwrap_or(start);
            panic!(
                "S1 differs at file offset {at:#x}: region {region} +{offset:#x} should hold \
                 {content:?} ({what})"
            );
        }
    }
    assert!(s1[16 * MIB as usize..20 * MIB as usize].iter().all(|&b| b == 0), "the gap");
}

async fn complete(env: &Env, id: &str) -> CompleteSessionResponse {
    env.client()
        .complete_session(CompleteSessionRequest { session_id: id.into() })
        .await
        .unwrap_or_else(|e| panic!("CompleteSession {id}: {e:?}"))
        .into_inner()
}

async fn delete(env: &Env, id: &str) {
    env.client()
        .delete_session(DeleteSessionRequest { session_id: id.into() })
        .await
        .unwrap_or_else(|e| panic!("DeleteSession {id}: {e:?}"));
}

async fn version(env: &Env, name: &str) -> PagerVersion {
    let versions = env.client().list_versions(ListVersionsRequest {}).await.unwrap().into_inner();
    versions
        .versions
        .into_iter()
        .find(|v| v.version == name)
        .unwrap_or_else(|| panic!("version {name} not listed"))
}

async fn exit_vm(vm: VmProcess) {
    let status = tokio::task::block_in_place(|| vm.exit()).expect("the VM exits");
    assert!(status.success(), "uffd-vmsim exited with {status}");
}

/// Restores a VM from `memfile` through a new session `id`, with `regions`.
async fn restore(env: &Env, id: &str, memfile: &Path, regions: &[String]) -> VmProcess {
    let regions: Vec<&str> = regions.iter().map(String::as_str).collect();
    env.restore(id, memfile, &regions).await
}

async fn the_whole_life(guest: Guest) {
    let env = Env::start_with(SupervisorOptions {
        args: vec!["--pager-version".into(), "v1".into()],
        ..SupervisorOptions::default()
    })
    .await;
    let s0 = env.memfile("s0.mem", 32 * MIB, 0.2, 0.2);
    punch_hole(&s0, S0_HOLE.0, S0_HOLE.1);
    let s1 = env.dir.path().join("s1.mem");
    let files = [s0.as_path(), s1.as_path()];
    let supervisor = i32::try_from(env.sup().pid().unwrap()).unwrap();
    let v1 = i32::try_from(version(&env, "v1").await.pid).unwrap();
    let (sup_before, v1_before) = (holdings(supervisor, &files), holdings(v1, &files));

    // 1. Restore from S0; served on demand: reads, writes, balloon (working set: 0..8M).
    let mut vm = restore(&env, "life-a", &s0, &guest.regions()).await;
    let working_set = guest.pages(8 * MIB);
    let read = vm_cmd(&mut vm, &format!("read-range 0 {working_set}")).await;
    assert_eq!(read["pages_verified"], working_set, "{read}");
    vm_cmd(&mut vm, &format!("write {} {} 1", guest.page_at(0, 4 * MIB), guest.pages(2 * MIB)))
        .await;
    vm_cmd(&mut vm, &format!("balloon 0 {} {}", 2 * MIB, 2 * MIB)).await;
    vm_cmd(&mut vm, &format!("balloon 1 0 {}", 4 * MIB)).await;

    // 2. Graduate while a reader verifies the working set.
    vm_cmd(&mut vm, &format!("reader-start 7 0 {working_set}")).await;
    let done = complete(&env, "life-a").await;
    let reader = vm_cmd(&mut vm, "reader-stop").await;
    assert!(reader["pages_verified"].as_u64().unwrap() > 0, "{reader}");
    assert_eq!(done.session.as_ref().unwrap().state(), SessionState::Graduated, "{done:?}");
    // The hole and the untouched balloon were left to the kernel, not copied.
    assert!(done.skipped_zero_bytes >= S0_HOLE.1, "{done:?}");
    assert!(done.skipped_removed_bytes >= 4 * MIB, "{done:?}");
    let smaps = tokio::task::block_in_place(|| vm.command("smaps", STEP)).unwrap();
    assert_eq!(smaps["registered_vmas"], 0, "still registered after graduation: {smaps}");

    // 3. Writes to pages never touched before graduation: some populated by graduation, some
    //    holes of S0, some ballooned. Nobody but the kernel can serve the last two kinds now.
    for (region, offset, len, gen) in
        [(0, 10 * MIB, 4 * MIB, 2), (1, 2 * MIB, 2 * MIB, 3), (1, 6 * MIB, 2 * MIB, 4)]
    {
        let cmd = format!("write {} {} {gen}", guest.page_at(region, offset), guest.pages(len));
        let what = "a write to pages never touched before graduation did not complete: a page \
                    is left unserved (no pager serves it any more; the kernel must)";
        let started = Instant::now();
        let w = vm_cmd_within(&mut vm, &cmd, UNSERVED, what).await;
        assert_eq!(w["pages_written"], guest.pages(len), "{w}");
        eprintln!("never-touched write `{cmd}`: {:?}", started.elapsed());
    }

    // 4. Standby to S1: every page verified as it is written, then the VM exits.
    let cmd = format!("standby {}", s1.display());
    let standby = tokio::task::block_in_place(|| vm.command(&cmd, STEP)).expect("standby");
    let (report, snapshot) = (&standby["report"], &standby["snapshot"]);
    assert_eq!(
        report["mismatches"], 0,
        "standby found pages not as the VM must hold them: {report}"
    );
    assert_eq!(report["pages_verified"], guest.total_pages(), "{report}");
    assert_eq!(snapshot["bytes"], S1_LEN, "{snapshot}");
    eprintln!("standby: {snapshot}");
    exit_vm(vm).await;
    let s1_regions: Vec<GuestRegionSpec> = snapshot["regions"]
        .as_array()
        .expect("the regions to restore with")
        .iter()
        .map(|r| r.as_str().unwrap().parse().unwrap())
        .collect();
    let wanted: Vec<GuestRegionSpec> = guest.regions().iter().map(|r| r.parse().unwrap()).collect();
    assert_eq!(s1_regions, wanted);
    let meta = std::fs::metadata(&s1).expect("S1 written");
    assert_eq!(meta.len(), S1_LEN);
    // Zero blocks are holes: the ballooned ranges, S0's unwritten hole and the gap (10 MiB).
    assert!(meta.blocks() * 512 <= S1_LEN - 10 * MIB, "S1 is not sparse: {} blocks", meta.blocks());
    let s0_bytes = std::fs::read(&s0).unwrap();
    assert_s1_is(&std::fs::read(&s1).unwrap(), &guest.expected_s1(&s0_bytes));

    // 5. Nothing of VM A is left in the supervisor or in pager v1.
    assert_eq!(env.get("life-a").await.state(), SessionState::Graduated);
    delete(&env, "life-a").await;
    let sup_after =
        wait_holdings_within("supervisor", supervisor, &sup_before, SLACK, &files).await;
    let v1_after = wait_holdings_within("pager v1", v1, &v1_before, 0, &files).await;
    eprintln!("after VM A: supervisor {sup_after:?} (before {sup_before:?})");
    eprintln!("after VM A: pager v1 {v1_after:?} (before {v1_before:?})");

    // 6. A new pager version; v1, serving nothing, drains and exits.
    let pager = &testkit::binary("uffd-pager");
    let v2 = common::deploy(&env, pager, "v2").await.expect("DeployVersion v2");
    assert_eq!(v2.state(), VersionState::Active);
    let deadline = Instant::now() + STEP;
    while version(&env, "v1").await.state() != VersionState::Exited {
        assert!(Instant::now() < deadline, "v1 never exited: {:?}", version(&env, "v1").await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let v2 = i32::try_from(v2.pid).unwrap();
    let (sup_before, v2_before) = (holdings(supervisor, &files), holdings(v2, &files));

    // 7. Restore S1 on a new session (served by v2): every page reads as VM A held it.
    let regions: Vec<String> = s1_regions.iter().map(ToString::to_string).collect();
    let mut vm = restore(&env, "life-b", &s1, &regions).await;
    assert_eq!(env.get("life-b").await.pager_version, "v2");
    let all = vm_cmd(&mut vm, "verify").await;
    assert_eq!(all["pages_verified"], guest.total_pages(), "{all}");

    // 8. Its own life: writes, a balloon, graduation under a reader, exit.
    vm_cmd(&mut vm, "write 0 4 5").await;
    vm_cmd(&mut vm, &format!("balloon 0 {} {}", 6 * MIB, 2 * MIB)).await;
    vm_cmd(&mut vm, "reader-start 3").await;
    let done = complete(&env, "life-b").await;
    assert_eq!(done.session.as_ref().unwrap().state(), SessionState::Graduated, "{done:?}");
    vm_cmd(&mut vm, "reader-stop").await;
    let smaps = tokio::task::block_in_place(|| vm.command("smaps", STEP)).unwrap();
    assert_eq!(smaps["registered_vmas"], 0, "{smaps}");
    vm_cmd(&mut vm, "verify").await;
    exit_vm(vm).await;
    delete(&env, "life-b").await;

    // 9. Nothing of VM B is left either.
    let sup_after =
        wait_holdings_within("supervisor", supervisor, &sup_before, SLACK, &files).await;
    let v2_after = wait_holdings_within("pager v2", v2, &v2_before, 0, &files).await;
    eprintln!("after VM B: supervisor {sup_after:?} (before {sup_before:?})");
    eprintln!("after VM B: pager v2 {v2_after:?} (before {v2_before:?})");
}

/// Makes `len` bytes at `offset` of `path` a hole (they read as zeros).
fn punch_hole(path: &Path, offset: u64, len: u64) {
    use nix::fcntl::{fallocate, FallocateFlags};
    use std::os::fd::AsRawFd;
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    fallocate(
        file.as_raw_fd(),
        FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
        i64::try_from(offset).unwrap(),
        i64::try_from(len).unwrap(),
    )
    .expect("punching a hole in S0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_4k_vm_lives_graduates_stands_by_and_restores_byte_for_byte_and_nothing_leaks() {
    the_whole_life(Guest { page: 4096 }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_2m_hugepage_vm_lives_graduates_stands_by_and_restores_byte_for_byte_and_nothing_leaks() {
    // VM A's 12 hugepages (24 MiB) may not all be back in the pool when VM B takes its 12, and
    // VM A's own copy in flight at graduation can take one more: 24 and 4 of slack.
    let Some(_hugepages) = testkit::reserve_hugepages_for_test("lifecycle::a_2m_vm", 28) else {
        return;
    };
    the_whole_life(Guest { page: 2 * MIB }).await;
}

/// A VM that touched nothing before graduation writes every one of its pages afterwards: those
/// the pager populated, holes and zero pages of the snapshot, ballooned ones. Each write must
/// complete within the deadline; a page left registered with no pager would block it forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_to_every_page_never_touched_before_graduation_complete_within_a_deadline() {
    let env = Env::start().await;
    let mem = env.memfile("mem", 32 * MIB, 0.25, 0.25);
    let mut vm = env.restore("untouched", &mem, &["16M@0", "16M@16M"]).await;
    vm_cmd(&mut vm, &format!("balloon 1 {} {}", 4 * MIB, 4 * MIB)).await;
    let done = complete(&env, "untouched").await;
    assert_eq!(done.session.as_ref().unwrap().state(), SessionState::Graduated, "{done:?}");
    assert!(done.skipped_zero_bytes > 0 && done.skipped_removed_bytes == 4 * MIB, "{done:?}");
    let pages = 32 * MIB / 4096;
    let started = Instant::now();
    let w = vm_cmd_within(
        &mut vm,
        &format!("write 0 {pages} 1"),
        UNSERVED,
        "a page never touched before graduation is left unserved",
    )
    .await;
    assert_eq!(w["pages_written"], pages, "{w}");
    eprintln!("{pages} never-touched pages written after graduation in {:?}", started.elapsed());
    let all = vm_cmd(&mut vm, "verify").await;
    assert_eq!(all["pages_verified"], pages, "{all}");
}
