//! End-to-end checks of the simulator against the minimal in-test pager: restore, faults served,
//! writes, balloon, a background reader, graduation, and a broken pager caught.

use std::os::fd::AsFd;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::time::Duration;

use super::testpager::{Fault, TestPager};
use super::*;
use testkit::reserve_hugepages_for_test;
use uffdpager::firecracker::{PAGE_2M, PAGE_4K};

const DEADLINE: Duration = Duration::from_secs(60);

struct Setup {
    _dir: tempfile::TempDir,
    memfile: PathBuf,
    socket: PathBuf,
}

fn setup(size: u64, seed: u64) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let memfile = dir.path().join("mem");
    let spec = MemoryFileSpec { size, seed, zero_fraction: 0.25, hole_fraction: 0.25 };
    write_memory_file(&memfile, &spec).unwrap();
    let socket = dir.path().join("vm.sock");
    Setup { _dir: dir, memfile, socket }
}

/// Starts a test pager on the setup's socket and restores a VM against it.
fn start(s: &Setup, regions: &[GuestRegionSpec], fault: Fault) -> (Vm, TestPager) {
    let listener = UnixListener::bind(&s.socket).unwrap();
    let pager = TestPager::spawn(listener, s.memfile.clone(), fault);
    let vm = Vm::restore(&s.socket, &s.memfile, regions).unwrap();
    (vm, pager)
}

fn region(size: u64, offset: u64, page_size: u64) -> GuestRegionSpec {
    GuestRegionSpec { size, page_size, offset }
}

fn assert_clean(report: &Report) {
    assert!(report.is_clean(), "{}: {:#?}", report.workload, report.first_mismatches);
}

#[test]
fn restore_sends_firecrackers_exact_handshake_and_dropping_the_vm_is_eof() {
    let s = setup(1 << 20, 1);
    let listener = UnixListener::bind(&s.socket).unwrap();
    let regions = [region(512 << 10, 0, PAGE_4K), region(256 << 10, 768 << 10, PAGE_4K)];
    let vm = Vm::restore(&s.socket, &s.memfile, &regions).unwrap();
    let (stream, _) = listener.accept().unwrap();
    let msg = uffdpager::scm::recv_with_fds(stream.as_fd(), 65536).unwrap();
    assert_eq!(msg.fds.len(), 1);
    assert!(uffdpager::scm::is_userfaultfd(msg.fds[0].as_fd()));
    let json: serde_json::Value = serde_json::from_slice(&msg.bytes).unwrap();
    let entries = json.as_array().unwrap();
    assert_eq!(entries.len(), 2);
    for (entry, (spec, sent)) in entries.iter().zip(regions.iter().zip(vm.regions())) {
        let keys: Vec<&str> = entry.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys.len(), 5, "{entry}");
        assert_eq!(entry["base_host_virt_addr"], sent.base);
        assert_eq!(entry["size"], spec.size);
        assert_eq!(entry["offset"], spec.offset);
        assert_eq!(entry["page_size"], 4096);
        assert_eq!(entry["page_size_kib"], 4096);
    }
    assert_eq!(vm.pages(), 192);
    assert!(vm.uffd_registered_vmas().unwrap() >= 1);
    drop(vm);
    let eof = uffdpager::scm::recv_with_fds(stream.as_fd(), 16).unwrap();
    assert!(eof.bytes.is_empty() && eof.fds.is_empty());
}

#[test]
fn reads_writes_and_balloon_verify_with_no_mismatch() {
    let s = setup(4 << 20, 2);
    let regions = [region(2 << 20, 0, PAGE_4K), region(1 << 20, 3 << 20, PAGE_4K)];
    let (vm, pager) = start(&s, &regions, Fault::None);
    assert_eq!(vm.pages(), 768);
    let (vm, reports) = run_with_deadline(DEADLINE, move || {
        let mut vm = vm;
        let mut reports = vec![vm.read_random(Amount::Pages(300), 1)];
        // Pages 700..740 lie in region 1, most never touched: their write faults are served.
        reports.push(vm.write_range(700, 40, 5).unwrap());
        reports.push(vm.write_pages(&[0, 1, 2], 6).unwrap());
        reports.push(vm.balloon(1, 64 << 10, 128 << 10).unwrap());
        // Region 0's first four pages: three written, one removed before ever being touched.
        reports.push(vm.balloon(0, 0, 16 << 10).unwrap());
        reports.push(vm.read_random(Amount::Fraction(1.0), 2));
        // A removed page written again: its fault is served zeros, then the pattern lands.
        reports.push(vm.write_pages(&[3], 9).unwrap());
        reports.push(vm.read_sequential());
        reports.push(vm.verify_all());
        (vm, reports)
    })
    .unwrap();
    for r in &reports {
        assert_clean(r);
    }
    assert_eq!(reports[0].pages_verified, 300);
    assert_eq!(reports[0].bytes_read, 300 * 4096);
    assert_eq!(reports[1].pages_written, 40);
    assert_eq!(reports[3].pages_removed, 32);
    assert_eq!(reports[5].pages_verified, 768);
    assert_eq!(reports[8].pages_verified, 768);
    assert!(reports[8].stall_samples == 768 && reports[8].stall_max_us > 0.0);
    assert_eq!(vm.page_state(0), Some(PageState::Zero));
    assert_eq!(vm.page_state(3), Some(PageState::Written(9)));
    assert_eq!(vm.page_state(vm.page_index(1, 64 << 10).unwrap()), Some(PageState::Zero));
    assert_eq!(vm.page_state(700), Some(PageState::Written(5)));
    assert_eq!(vm.page_state(767), Some(PageState::Snapshot));
    drop(vm);
    let stats = pager.join().unwrap();
    assert!(stats.faults >= 300, "{stats:?}");
    assert_eq!(stats.removes, 2);
    assert!(stats.zero_served >= 1);
}

#[test]
fn bad_workload_input_is_an_error_not_a_panic() {
    let s = setup(1 << 20, 3);
    let (vm, pager) = start(&s, &[region(1 << 20, 0, PAGE_4K)], Fault::None);
    let vm = run_with_deadline(DEADLINE, move || {
        let mut vm = vm;
        assert!(matches!(vm.write_range(250, 7, 1), Err(WorkloadError::PageOutOfRange { .. })));
        assert!(matches!(
            vm.write_range(u64::MAX, 2, 1),
            Err(WorkloadError::PageOutOfRange { .. })
        ));
        assert!(matches!(
            vm.write_pages(&[1, 256], 1),
            Err(WorkloadError::PageOutOfRange { page: 256, .. })
        ));
        assert!(matches!(vm.write_pages(&[1], 0), Err(WorkloadError::InvalidGeneration(0))));
        assert!(matches!(vm.write_pages(&[1], u32::MAX), Err(WorkloadError::InvalidGeneration(_))));
        assert!(matches!(vm.balloon(1, 0, 4096), Err(WorkloadError::NoSuchRegion { .. })));
        assert!(matches!(vm.balloon(0, 100, 4096), Err(WorkloadError::BalloonRange { .. })));
        assert!(matches!(vm.balloon(0, 0, 0), Err(WorkloadError::BalloonRange { .. })));
        assert!(matches!(vm.balloon(0, 4096, 1 << 20), Err(WorkloadError::BalloonRange { .. })));
        assert!(matches!(
            vm.balloon(0, u64::MAX - 4095, 8192),
            Err(WorkloadError::BalloonRange { .. })
        ));
        assert_eq!(vm.page_state(1), Some(PageState::Snapshot));
        assert_eq!(vm.page_state(256), None);
        assert_eq!(vm.page_index(0, 1 << 20), None);
        assert_eq!(vm.read_random(Amount::Pages(600), 1).pages_verified, 600);
        vm
    })
    .unwrap();
    drop(vm);
    pager.join().unwrap();
}

#[test]
fn a_pager_serving_snapshot_data_into_removed_pages_is_caught() {
    let s = setup(1 << 20, 4);
    let (vm, pager) = start(&s, &[region(1 << 20, 0, PAGE_4K)], Fault::IgnoreRemoves);
    let (vm, report) = run_with_deadline(DEADLINE, move || {
        let mut vm = vm;
        vm.balloon(0, 0, 1 << 20).unwrap();
        let report = vm.verify_all();
        (vm, report)
    })
    .unwrap();
    // Every random page of the file now reads as snapshot data where zeros are due.
    let random =
        MemoryFileSpec { size: 1 << 20, seed: 4, zero_fraction: 0.25, hole_fraction: 0.25 }
            .counts()
            .random;
    assert_eq!(report.mismatches, random);
    assert_eq!(report.first_mismatches.len(), report::MAX_MISMATCH_DETAILS);
    assert!(report.first_mismatches[0].contains("expected zero"), "{}", report.first_mismatches[0]);
    drop(vm);
    pager.join().unwrap();
}

#[test]
fn a_pager_that_never_serves_is_bounded_by_the_deadline() {
    let s = setup(1 << 20, 5);
    // A listener that accepts nobody: the handshake sits in its backlog, no fault is served.
    let _listener = UnixListener::bind(&s.socket).unwrap();
    let vm = Vm::restore(&s.socket, &s.memfile, &[region(1 << 20, 0, PAGE_4K)]).unwrap();
    let err = run_with_deadline(Duration::from_millis(200), move || vm.verify_all()).unwrap_err();
    assert!(matches!(err, DeadlineError::Expired(_)));
    // The stuck thread and its VM are leaked; closing the listener does not free them, which is
    // acceptable for a failing test. Unregistering is not possible without the uffd.
}

#[test]
fn a_background_reader_verifies_through_writes_balloon_and_graduation() {
    let s = setup(4 << 20, 6);
    let regions = [region(3 << 20, 0, PAGE_4K), region(1 << 20, 3 << 20, PAGE_4K)];
    let (vm, pager) = start(&s, &regions, Fault::None);
    let (vm, pager, reports, reader_report, vmas_after) = run_with_deadline(DEADLINE, move || {
        let mut vm = vm;
        let reader = vm.spawn_reader(7).unwrap();
        assert!(reader.wait_for_pages(64, DEADLINE));
        let mut reports = Vec::new();
        for gen in 1..=3 {
            reports.push(vm.write_range(100 * u64::from(gen), 200, gen).unwrap());
            reports.push(vm.balloon(1, (64 << 10) * u64::from(gen), 64 << 10).unwrap());
        }
        assert!(vm.uffd_registered_vmas().unwrap() >= 1);
        pager.graduate().unwrap();
        let vmas_after = vm.uffd_registered_vmas().unwrap();
        // After graduation: writes and balloon need no pager (the kernel zero-fills).
        reports.push(vm.write_range(0, 50, 4).unwrap());
        reports.push(vm.balloon(0, 1 << 20, 256 << 10).unwrap());
        let seen = reader.pages_verified();
        assert!(reader.wait_for_pages(seen + 64, DEADLINE));
        let reader_report = reader.stop().unwrap();
        reports.push(vm.verify_all());
        (vm, pager, reports, reader_report, vmas_after)
    })
    .unwrap();
    assert_eq!(vmas_after, 0);
    for r in &reports {
        assert_clean(r);
    }
    assert_clean(&reader_report);
    assert!(reader_report.pages_verified >= 128, "{reader_report:?}");
    assert_eq!(reader_report.workload, "reader");
    drop(vm);
    let stats = pager.join().unwrap();
    assert!(stats.graduated);
    assert_eq!(stats.removes, 3, "removals after graduation reach no pager: {stats:?}");
}

#[test]
fn hugepage_regions_are_served_and_ballooned_in_2mib_units() {
    // 2 hugepages for the VM's 4 MiB region, one of slack.
    let Some(_hugepages) = reserve_hugepages_for_test("vmsim::hugepage_regions", 3) else {
        return;
    };
    let s = setup(6 << 20, 8);
    let regions = [region(4 << 20, 0, PAGE_2M), region(2 << 20, 4 << 20, PAGE_4K)];
    let (vm, pager) = start(&s, &regions, Fault::None);
    assert_eq!(vm.regions()[0].page_size, PAGE_2M);
    assert_eq!(vm.pages(), 2 + 512);
    let (vm, pager, reports) = run_with_deadline(DEADLINE, move || {
        let mut vm = vm;
        let mut reports = vec![vm.read_random(Amount::Pages(100), 3)];
        reports.push(vm.write_pages(&[1, 2, 3], 2).unwrap());
        assert!(matches!(vm.balloon(0, 4096, 4096), Err(WorkloadError::BalloonRange { .. })));
        reports.push(vm.balloon(0, 0, 2 << 20).unwrap());
        reports.push(vm.verify_all());
        pager.graduate().unwrap();
        reports.push(vm.verify_all());
        (vm, pager, reports)
    })
    .unwrap();
    for r in &reports {
        assert_clean(r);
    }
    assert_eq!(reports[2].pages_removed, 1);
    assert_eq!(reports[3].bytes_read, 6 << 20);
    assert_eq!(vm.page_state(0), Some(PageState::Zero));
    assert_eq!(vm.uffd_registered_vmas().unwrap(), 0);
    drop(vm);
    pager.join().unwrap();
}

#[test]
fn the_command_runner_drives_a_vm_line_by_line() {
    let s = setup(1 << 20, 9);
    let (vm, pager) = start(&s, &[region(1 << 20, 0, PAGE_4K)], Fault::None);
    let (runner, replies) = run_with_deadline(DEADLINE, move || {
        let mut runner = CommandRunner::new(vm);
        let mut replies = vec![runner.restored_reply()];
        for line in [
            "reader-start 3",
            "reader-start",
            "read-random 50",
            "write 10 20 2",
            "balloon 0 8K 8K",
            "read-seq",
            "verify",
            "smaps",
            "reader-stop",
            "reader-stop",
            "write 10 20 0",
            "exit",
        ] {
            replies.push(runner.execute(&line.parse().unwrap()));
        }
        (runner, replies)
    })
    .unwrap();
    let lines: Vec<String> = replies.iter().map(Reply::to_line).collect();
    let ok: Vec<bool> = replies.iter().map(|r| r.ok).collect();
    assert_eq!(
        ok,
        [true, true, false, true, true, true, true, true, true, true, false, false, true],
        "{lines:#?}"
    );
    assert_eq!(replies[0].cmd, "restored");
    assert_eq!(replies[0].pid, Some(std::process::id()));
    assert_eq!(replies[0].pages, Some(256));
    assert_eq!(replies[0].regions.as_ref().unwrap().len(), 1);
    for r in replies.iter().filter_map(|r| r.report.as_ref()) {
        assert_clean(r);
    }
    assert_eq!(replies[3].report.as_ref().unwrap().pages_verified, 50);
    assert!(replies[8].registered_vmas.unwrap() >= 1);
    assert_eq!(replies[9].cmd, "reader-stop");
    assert!(replies[11].error.as_ref().unwrap().contains("generation 0"));
    drop(runner);
    pager.join().unwrap();
}

/// The expected bytes of a page written with `gen`.
fn pattern_bytes(global_page: u64, gen: u32, page_size: usize) -> Vec<u8> {
    (0..page_size / 8)
        .flat_map(|w| expect::pattern_word(global_page, gen, w).to_ne_bytes())
        .collect()
}

#[test]
fn standby_writes_what_the_guest_holds_and_a_vm_restored_from_it_reads_it_back() {
    let s = setup(4 << 20, 10);
    // Two regions with a gap in the file between them, as Firecracker lays out a memory hole.
    let regions = [region(1 << 20, 0, PAGE_4K), region(1 << 20, 2 << 20, PAGE_4K)];
    let (vm, pager) = start(&s, &regions, Fault::None);
    let s1 = s.memfile.with_file_name("s1");
    let s1_for_vm = s1.clone();
    let (vm, pager, reports, info) = run_with_deadline(DEADLINE, move || {
        let mut vm = vm;
        let mut reports = vec![vm.read_range(0, 64).unwrap()];
        reports.push(vm.write_range(10, 5, 3).unwrap());
        reports.push(vm.balloon(0, 32 << 10, 16 << 10).unwrap()); // pages 8..12: 10, 11 written
        pager.graduate().unwrap();
        // Never touched before graduation: the kernel serves these, no pager does.
        reports.push(vm.write_range(300, 4, 7).unwrap());
        let (report, info) = vm.standby(&s1_for_vm).unwrap();
        reports.push(report);
        (vm, pager, reports, info)
    })
    .unwrap();
    for r in &reports {
        assert_clean(r);
    }
    assert_eq!(reports[4].pages_verified, 512, "standby verifies every page");
    assert_eq!(info.bytes, 3 << 20);
    assert_eq!(info.regions, ["1M@0:4K", "1M@2M:4K"]);
    assert_eq!(info.data_bytes + info.hole_bytes, 2 << 20);
    assert!(info.hole_bytes > 0, "zero pages are holes: {info:?}");
    assert!(!s1.with_file_name("s1.partial").exists());

    // Checked independently of the simulator's own bookkeeping: S0's bytes, the written
    // patterns, zeros where ballooned, zeros in the gap.
    let (s0, s1_bytes) = (std::fs::read(&s.memfile).unwrap(), std::fs::read(&s1).unwrap());
    // File bytes of global page `p`: region 0 holds pages 0..256 at 0, region 1 the rest at 2M.
    let at = |p: usize| {
        let start = if p < 256 { p * 4096 } else { (2 << 20) + (p - 256) * 4096 };
        start..start + 4096
    };
    let same = |p: usize, want: &[u8], what: &str| {
        assert!(s1_bytes[at(p)] == *want, "page {p} ({what}) differs in the new snapshot");
    };
    for p in [0, 63, 200, 255, 256, 400] {
        same(p, &s0[at(p)], "read, or populated by graduation: the old snapshot's bytes");
    }
    same(12, &pattern_bytes(12, 3, 4096), "written with generation 3");
    same(301, &pattern_bytes(301, 7, 4096), "written after graduation");
    for p in [8, 10, 11] {
        same(p, &[0; 4096], "ballooned");
    }
    assert!(s1_bytes[1 << 20..2 << 20].iter().all(|&b| b == 0), "the gap");

    // A second standby to the same path refuses to replace the file.
    let err = run_with_deadline(DEADLINE, {
        let s1 = s1.clone();
        move || vm.standby(&s1).map(|_| ()).unwrap_err()
    })
    .unwrap();
    assert!(matches!(err, StandbyError::Exists(_)), "{err}");
    pager.join().unwrap();

    // Restore from S1 with the same regions: every page reads as S1's bytes.
    let socket = s.socket.with_file_name("vm2.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let pager = TestPager::spawn(listener, s1.clone(), Fault::None);
    let specs: Vec<GuestRegionSpec> = info.regions.iter().map(|r| r.parse().unwrap()).collect();
    let vm = Vm::restore(&socket, &s1, &specs).unwrap();
    let report = run_with_deadline(DEADLINE, move || vm.verify_all()).unwrap();
    assert_clean(&report);
    assert_eq!(report.pages_verified, 512);
    pager.join().unwrap();
}

#[test]
fn a_standby_that_finds_a_corrupt_page_reports_it_and_still_writes_what_the_guest_held() {
    let s = setup(1 << 20, 11);
    let (vm, pager) = start(&s, &[region(1 << 20, 0, PAGE_4K)], Fault::IgnoreRemoves);
    let s1 = s.memfile.with_file_name("s1");
    let (vm, report) = run_with_deadline(DEADLINE, {
        let s1 = s1.clone();
        move || {
            let mut vm = vm;
            vm.balloon(0, 0, 64 << 10).unwrap();
            let (report, _) = vm.standby(&s1).unwrap();
            (vm, report)
        }
    })
    .unwrap();
    // The broken pager served snapshot data into the ballooned pages: standby says so.
    assert!(report.mismatches > 0, "{report:?}");
    assert!(report.first_mismatches[0].contains("expected zero"), "{report:?}");
    let (s0, s1) = (std::fs::read(&s.memfile).unwrap(), std::fs::read(&s1).unwrap());
    assert_eq!(s0, s1, "what the guest held (wrongly) is what was written");
    drop(vm);
    pager.join().unwrap();
}

#[test]
fn a_file_backed_vm_reads_the_file_keeps_its_writes_private_and_refuses_the_balloon() {
    let s = setup(4 << 20, 7);
    let before = std::fs::read(&s.memfile).unwrap();
    let regions = [region(2 << 20, 0, PAGE_4K), region(1 << 20, 3 << 20, PAGE_4K)];
    let mut vm = Vm::map_file(&s.memfile, &regions).unwrap();
    assert_eq!(vm.pages(), 768);
    assert_eq!(vm.uffd_registered_vmas().unwrap(), 0, "no pager: nothing is registered");
    let reports = [
        vm.read_random(Amount::Fraction(1.0), 3),
        vm.write_range(700, 40, 5).unwrap(),
        vm.read_sequential(),
    ];
    for r in &reports {
        assert_clean(r);
    }
    assert_eq!(reports[0].pages_verified, 768);
    assert_eq!(vm.page_state(700), Some(PageState::Written(5)));
    let err = vm.balloon(1, 0, 64 << 10).unwrap_err();
    assert!(matches!(err, WorkloadError::BalloonOnFile { region: 1 }), "{err}");
    assert_clean(&vm.verify_all());
    drop(vm);
    assert!(
        std::fs::read(&s.memfile).unwrap() == before,
        "the private mapping's writes stay private"
    );

    let huge = [region(PAGE_2M, 0, PAGE_2M)];
    let err = Vm::map_file(&s.memfile, &huge).unwrap_err();
    assert!(matches!(err, VmError::InvalidRegion { index: 0, .. }), "{err}");
    let past = [region(8 << 20, 0, PAGE_4K)];
    assert!(matches!(Vm::map_file(&s.memfile, &past), Err(VmError::PastEndOfFile { .. })));
}
