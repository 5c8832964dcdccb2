//! Issue 2 end to end: simulated VMs restored through the real supervisor and pager, served byte
//! for byte, graduated while they run.

mod common;

use std::time::Duration;

use common::{fd_count, vm_cmd, Env, MIB};
use tonic::Code;
use uffdpager::api::{CompleteSessionRequest, SessionState};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_region_vm_reads_the_memory_file_byte_for_byte_and_keeps_its_writes() {
    let env = Env::start().await;
    let mem = env.memfile("mem", 32 * MIB, 0.2, 0.2);
    // Two regions at different offsets of one memory file, as Firecracker lays out a VM with a
    // memory hole.
    let mut vm = env.restore("two-regions", &mem, &["8M@0", "8M@16M"]).await;
    let pages = (16 * MIB) / 4096;
    let r = vm_cmd(&mut vm, &format!("read-random {}", pages / 4)).await;
    assert!(r["pages_verified"].as_u64().unwrap() >= pages / 4, "{r}");
    vm_cmd(&mut vm, "write 100 300 1").await;
    vm_cmd(&mut vm, &format!("write {} 10 2", pages - 20)).await;
    vm_cmd(&mut vm, &format!("read-random {}", pages / 4)).await;
    let all = vm_cmd(&mut vm, "verify").await;
    assert_eq!(all["pages_verified"].as_u64().unwrap(), pages, "{all}");

    let s = env.get("two-regions").await;
    assert_eq!(s.state(), SessionState::Serving);
    assert_eq!(s.vmm_pid, vm.pid);
    assert_eq!(s.regions.len(), 2);
    assert_eq!(s.regions[1].offset, 16 * MIB);
    assert_eq!(s.total_bytes, 16 * MIB);
    assert!(s.connected_at.is_some());
    // The supervisor polls the pager's figures; wait until they show the verify pass.
    let s = wait_until(&env, "two-regions", |s| s.resident_bytes > 0 && s.faults > 0).await;
    assert!(s.resident_bytes <= s.total_bytes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ballooned_range_reads_zero_before_and_after_graduation() {
    let env = Env::start().await;
    let mem = env.memfile("mem", 16 * MIB, 0.0, 0.0);
    let mut vm = env.restore("balloon", &mem, &[]).await;
    vm_cmd(&mut vm, "read-random 2000").await;
    // Discard 2 MiB the VM has partly touched, then 1 MiB it never touched.
    vm_cmd(&mut vm, &format!("balloon 0 {} {}", MIB, 2 * MIB)).await;
    vm_cmd(&mut vm, &format!("balloon 0 {} {}", 8 * MIB, MIB)).await;
    let before = wait_until(&env, "balloon", |s| s.removed_bytes == 3 * MIB).await;
    assert!(before.resident_bytes < 16 * MIB, "{before:?}");
    // Reading the discarded ranges faults them back in as zeros.
    vm_cmd(&mut vm, "verify").await;
    // Discard the first range again: completion must not bring snapshot data back into it.
    vm_cmd(&mut vm, &format!("balloon 0 {} {}", MIB, 2 * MIB)).await;

    let done = env
        .client()
        .complete_session(CompleteSessionRequest { session_id: "balloon".into() })
        .await
        .expect("CompleteSession")
        .into_inner();
    assert_eq!(done.session.as_ref().unwrap().state(), SessionState::Graduated);
    assert!(done.skipped_removed_bytes >= 2 * MIB, "{done:?}");
    vm_cmd(&mut vm, "verify").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn complete_session_while_a_reader_runs_graduates_every_page_and_answers_ok_again() {
    let env = Env::start().await;
    let mem = env.memfile("mem", 64 * MIB, 0.25, 0.25);
    let mut vm = env.restore("live", &mem, &["32M@0", "32M@32M"]).await;
    vm_cmd(&mut vm, "read-random 1000").await;
    vm_cmd(&mut vm, "write 5000 100 3").await;
    vm_cmd(&mut vm, "reader-start 9").await;

    let mut client = env.client();
    let done = client
        .complete_session(CompleteSessionRequest { session_id: "live".into() })
        .await
        .expect("CompleteSession")
        .into_inner();
    let reader = vm_cmd(&mut vm, "reader-stop").await;
    assert!(reader["pages_verified"].as_u64().unwrap() > 0, "{reader}");
    let s = done.session.clone().unwrap();
    assert_eq!(s.state(), SessionState::Graduated, "{done:?}");
    assert!(s.graduated_at.is_some());
    assert!(done.populated_bytes > 0 && done.skipped_zero_bytes > 0, "{done:?}");

    let smaps = tokio::task::block_in_place(|| vm.command("smaps", common::STEP)).unwrap();
    assert_eq!(smaps["registered_vmas"], 0, "{smaps}");
    let all = vm_cmd(&mut vm, "verify").await;
    assert_eq!(all["pages_verified"].as_u64().unwrap(), 64 * MIB / 4096);
    assert_eq!(env.get("live").await.state(), SessionState::Graduated);

    let again = client
        .complete_session(CompleteSessionRequest { session_id: "live".into() })
        .await
        .expect("a second CompleteSession is OK")
        .into_inner();
    assert!(again.already_graduated, "{again:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_that_misses_its_deadline_leaves_the_vm_served_and_a_retry_succeeds() {
    let env = Env::start().await;
    let mem = env.memfile("mem", 512 * MIB, 0.0, 0.0);
    let mut vm = env.restore("slow", &mem, &[]).await;
    vm_cmd(&mut vm, "read-random 500").await;
    vm_cmd(&mut vm, "reader-start 3").await;

    let mut req = tonic::Request::new(CompleteSessionRequest { session_id: "slow".into() });
    req.set_timeout(Duration::from_millis(30));
    let err = env.client().complete_session(req).await.expect_err("30 ms cannot populate 512 MiB");
    assert!(matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled), "{err:?}");

    let s = env.wait_state("slow", SessionState::Serving).await;
    assert!(!s.error.is_empty(), "the failure is recorded: {s:?}");
    assert!(s.resident_bytes < s.total_bytes, "{s:?}");
    let reader = vm_cmd(&mut vm, "reader-stop").await;
    assert!(reader["pages_verified"].as_u64().unwrap() > 0);
    vm_cmd(&mut vm, "read-random 2000").await;

    let done = env
        .client()
        .complete_session(CompleteSessionRequest { session_id: "slow".into() })
        .await
        .expect("the retry succeeds")
        .into_inner();
    assert_eq!(done.session.unwrap().state(), SessionState::Graduated);
    vm_cmd(&mut vm, "verify").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_on_a_truncated_memory_file_fails_and_the_session_keeps_serving() {
    let env = Env::start().await;
    let mem = env.memfile("mem", 16 * MIB, 0.0, 0.0);
    let original = std::fs::read(&mem).unwrap();
    let mut vm = env.restore("trunc", &mem, &[]).await;
    vm_cmd(&mut vm, "read-random 500").await;

    // The snapshot file loses its second half (an operator's mistake): completion must refuse,
    // not unregister, and not crash the pager.
    let pager = env.pager_pid();
    std::fs::OpenOptions::new().write(true).open(&mem).unwrap().set_len(8 * MIB).unwrap();
    let err = env
        .client()
        .complete_session(CompleteSessionRequest { session_id: "trunc".into() })
        .await
        .expect_err("a truncated memory file cannot be populated");
    assert!(err.message().contains("truncated"), "{err:?}");
    let s = env.wait_state("trunc", SessionState::Serving).await;
    assert!(s.error.contains("truncated"), "{s:?}");
    assert_eq!(env.pager_pid(), pager);

    std::fs::write(&mem, &original).unwrap();
    env.client()
        .complete_session(CompleteSessionRequest { session_id: "trunc".into() })
        .await
        .expect("the retry succeeds once the file is whole again");
    vm_cmd(&mut vm, "verify").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_vmm_exits_the_session_ends_and_the_pager_lets_go_of_it() {
    let env = Env::start().await;
    let mem = env.memfile("mem", 16 * MIB, 0.1, 0.1);
    let pager = env.pager_pid();
    let fds_before = fd_count(pager);
    let mut vm = env.restore("bye", &mem, &[]).await;
    vm_cmd(&mut vm, "read-random 100").await;
    assert!(fd_count(pager) > fds_before, "the pager holds the session's fds");
    tokio::task::block_in_place(|| vm.exit()).unwrap();

    let s = env.wait_state("bye", SessionState::Ended).await;
    assert!(s.error.contains("VMM"), "{s:?}");
    let deadline = std::time::Instant::now() + common::STEP;
    loop {
        let maps = std::fs::read_to_string(format!("/proc/{pager}/maps")).unwrap();
        if fd_count(pager) == fds_before && !maps.contains(mem.to_str().unwrap()) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "pager still holds the session's fds or mapping"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let supervisor_fds = std::fs::read_dir(format!("/proc/{}/fd", env.sup().pid().unwrap()))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.unwrap().path()).ok())
        .filter(|l| l.to_string_lossy().contains("userfaultfd"))
        .count();
    assert_eq!(supervisor_fds, 0, "the supervisor dropped its duplicate uffd");
}

/// A memory file stays mapped for `--memory-file-linger-secs` after its last session ended, and
/// the next VM restored from it is served from that mapping; then the pager lets go of it. A
/// file rewritten in place meanwhile is mapped afresh: a graduation after the rewrite copies
/// the pages that were zero before (a stale zero map would leave them zero).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_file_lingers_after_its_last_session_and_one_rewritten_is_mapped_afresh() {
    const LINGER_S: u64 = 3;
    let dir = tempfile::tempdir().unwrap();
    let pager =
        common::pager_with_flags(dir.path(), &format!("--memory-file-linger-secs {LINGER_S}"));
    let env = Env::start_with(testkit::SupervisorOptions {
        pager_binary: Some(pager),
        ..Default::default()
    })
    .await;
    let mem = env.memfile("mem", 16 * MIB, 0.5, 0.0);
    let pid = env.pager_pid();
    let fds_before = fd_count(pid);
    // The pager's descriptors, and its descriptors and mappings of the memory file.
    let held = || {
        let h = common::holdings(pid, &[&mem]);
        (h.fds, h.file_fds, h.file_maps)
    };
    let wait_for = |what: &'static str, want: (usize, usize, usize)| async move {
        let deadline = std::time::Instant::now() + common::STEP;
        while held() != want {
            assert!(std::time::Instant::now() < deadline, "{what}: {:?}", held());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };

    // The first VM graduates (the pager learns the file's zero pages) and exits.
    let mut vm = env.restore("first", &mem, &[]).await;
    let done = env.graduate("first").await;
    assert!(done.skipped_zero_bytes >= 4 * MIB, "half the file is zero: {done:?}");
    vm_cmd(&mut vm, "verify").await;
    tokio::task::block_in_place(|| vm.exit()).unwrap();
    wait_for("lingering: the file's descriptor and one mapping", (fds_before + 1, 1, 1)).await;
    // What an operator sees of it (the pager's GetMetrics, which the supervisor exports).
    let files = |m: &uffdpager::api::PagerMetrics| {
        (m.memory_files_in_use, m.memory_files_lingering, m.memory_file_lingering_bytes)
    };
    let m = env.pager_metrics().await;
    assert_eq!(files(&m), (0, 1, 16 * MIB), "{m:?}");
    assert_eq!(m.memory_file_reuses, 0, "{m:?}");

    // The next VM is served from the same mapping.
    let mut vm = env.restore("second", &mem, &[]).await;
    assert_eq!(held().2, 1, "one mapping of the file, the lingering one");
    let m = env.pager_metrics().await;
    assert_eq!((files(&m), m.memory_file_reuses), ((1, 0, 0), 1), "{m:?}");
    vm_cmd(&mut vm, "read-random 500").await;
    tokio::task::block_in_place(|| vm.exit()).unwrap();
    env.wait_state("second", SessionState::Ended).await;

    // Rewritten in place (same inode, same length): no page is zero now.
    let again = env.memfile("mem", 16 * MIB, 0.0, 0.0);
    assert_eq!(again, mem);
    let mut vm = env.restore("third", &mem, &[]).await;
    let done = env.graduate("third").await;
    assert_eq!(done.skipped_zero_bytes, 0, "the old zero map was used: {done:?}");
    let all = vm_cmd(&mut vm, "verify").await;
    assert_eq!(all["pages_verified"].as_u64().unwrap(), 16 * MIB / 4096, "{all}");
    tokio::task::block_in_place(|| vm.exit()).unwrap();

    let ended = std::time::Instant::now();
    wait_for("let go after the linger", (fds_before, 0, 0)).await;
    let after = ended.elapsed();
    let m = env.pager_metrics().await;
    assert_eq!(files(&m), (0, 0, 0), "{m:?}");
    assert_eq!(m.memory_file_reuses, 1, "the rewritten file was mapped afresh: {m:?}");
    assert!(
        after >= Duration::from_secs(LINGER_S - 1),
        "let go after {after:?}, before its linger"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hugepage_vm_is_served_and_graduates_correctly() {
    // The VM's 12 hugepages (24 MiB), and 4 of slack.
    let Some(_hugepages) = testkit::reserve_hugepages_for_test("sessions::a_hugepage_vm", 16)
    else {
        return;
    };
    let env = Env::start().await;
    let mem = env.memfile("mem", 32 * MIB, 0.25, 0.25);
    let mut vm = env.restore("huge", &mem, &["16M@0:2M", "8M@16M:2M"]).await;
    // 12 pages of 2 MiB: a page index here is a hugepage.
    vm_cmd(&mut vm, "read-random 6").await;
    vm_cmd(&mut vm, "write 3 2 1").await;
    vm_cmd(&mut vm, &format!("balloon 0 {} {}", 4 * MIB, 2 * MIB)).await;
    vm_cmd(&mut vm, "verify").await;
    vm_cmd(&mut vm, &format!("balloon 1 {} {}", 2 * MIB, 2 * MIB)).await;
    vm_cmd(&mut vm, "reader-start 5").await;
    let done = env
        .client()
        .complete_session(CompleteSessionRequest { session_id: "huge".into() })
        .await
        .expect("CompleteSession")
        .into_inner();
    assert_eq!(done.session.unwrap().state(), SessionState::Graduated);
    vm_cmd(&mut vm, "reader-stop").await;
    let smaps = tokio::task::block_in_place(|| vm.command("smaps", common::STEP)).unwrap();
    assert_eq!(smaps["registered_vmas"], 0, "{smaps}");
    vm_cmd(&mut vm, "verify").await;
}

async fn wait_until(
    env: &Env,
    id: &str,
    ok: impl Fn(&uffdpager::api::Session) -> bool,
) -> uffdpager::api::Session {
    let deadline = std::time::Instant::now() + common::STEP;
    loop {
        let s = env.get(id).await;
        if ok(&s) {
            return s;
        }
        assert!(std::time::Instant::now() < deadline, "condition never held: {s:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Fault-around under contention (issue 15): two VMs faulting at once on one fault worker get
/// the aligned blocks around their random faults, byte for byte; the same run with
/// `--fault-around-kib 4` makes only the pages they touch resident.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_vms_faulting_at_once_on_one_worker_get_the_blocks_around_their_faults() {
    const TOUCHES: u64 = 3000;
    for (kib, around) in [(64, true), (4, false)] {
        let dir = tempfile::tempdir().unwrap();
        let flags = format!("--fault-threads 1 --fault-around-kib {kib}");
        let pager = common::pager_with_flags(dir.path(), &flags);
        let opts = testkit::SupervisorOptions { pager_binary: Some(pager), ..Default::default() };
        let env = Env::start_with(opts).await;
        let mem = env.memfile("mem", 64 * MIB, 0.0, 0.0);
        let mut vms =
            [env.restore("a", &mem, &["64M@0"]).await, env.restore("b", &mem, &["64M@0"]).await];
        tokio::task::block_in_place(|| {
            std::thread::scope(|scope| {
                for (i, vm) in vms.iter_mut().enumerate() {
                    scope.spawn(move || {
                        let r = vm.verified(&format!("read-random {TOUCHES} {i}"), common::STEP);
                        let r = r.expect("the random reads are served");
                        assert!(r["pages_verified"].as_u64().unwrap() >= TOUCHES, "{r}");
                    });
                }
            });
        });
        let (mut resident, mut faults) = (0, 0);
        for id in ["a", "b"] {
            let s = wait_until(&env, id, |s| s.resident_bytes >= TOUCHES * 4096).await;
            resident += s.resident_bytes;
            faults += s.faults;
        }
        let per_fault = resident as f64 / (faults * 4096) as f64;
        eprintln!(
            "fault-around {kib} KiB: {per_fault:.2} pages resident per fault ({faults} faults)"
        );
        if around {
            assert!(per_fault > 1.5, "{per_fault:.2} pages resident per fault with fault-around");
        } else {
            assert!(per_fault < 1.1, "{per_fault:.2} pages resident per fault without it");
        }
        for vm in &mut vms {
            let all = vm_cmd(vm, "verify").await;
            assert_eq!(all["pages_verified"].as_u64().unwrap(), 64 * MIB / 4096, "{all}");
        }
    }
}
