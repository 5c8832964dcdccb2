//! Per-session overlay pages (issue 17), through the real binaries: VMs restored from ONE memory
//! file, each given overlays of its own at CreateSession, read their own bytes there and the
//! snapshot's original pages at the other VM's overlays: on faults and read-ahead, after a
//! `kill -9` of their pager (the adopter gets the overlays from the supervisor), after a
//! supervisor restart, and after graduation (where an overlay over a zero snapshot page must
//! still be copied). `uffd-vmsim --overlay OFFSET:FILE` expects the overlays, so it still checks
//! every byte it reads. Invalid overlays are refused with INVALID_ARGUMENT naming the overlay
//! and the reason; 2 MiB pages take overlays in 2 MiB units.

// Test values are small and known: plain `as` casts.
#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_possible_wrap)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Instant;

use common::{vm_cmd, Env, MIB, STEP};
use testkit::{SupervisorOptions, SupervisorProcess, VmProcess};
use tonic::Code;
use uffdpager::api::overlay::Source;
use uffdpager::api::{CreateSessionRequest, Overlay, Session, SessionState};

const PAGE: u64 = 4096;

/// An overlay's bytes: a pattern of its own per (VM, overlay), never all zero.
fn pattern(seed: u8, len: u64) -> Vec<u8> {
    (0..len).map(|i| seed.wrapping_mul(31).wrapping_add((i % 251) as u8) | 1).collect()
}

/// One overlay of a test VM: where it goes, its bytes (also in `file`, for the VM to expect),
/// and whether CreateSession gets it inline or by path.
struct Given {
    offset: u64,
    file: PathBuf,
    inline: bool,
}

impl Given {
    fn new(env: &Env, name: &str, offset: u64, bytes: &[u8], inline: bool) -> Self {
        let file = env.dir.path().join(name);
        std::fs::write(&file, bytes).unwrap();
        Self { offset, file, inline }
    }

    fn to_proto(&self) -> Overlay {
        let source = if self.inline {
            Source::Data(std::fs::read(&self.file).unwrap())
        } else {
            Source::Path(self.file.display().to_string())
        };
        Overlay { offset: self.offset, source: Some(source) }
    }
}

async fn create(
    env: &Env,
    id: &str,
    mem: &Path,
    overlays: Vec<Overlay>,
) -> Result<Session, tonic::Status> {
    env.client()
        .create_session(CreateSessionRequest {
            session_id: id.into(),
            memory_file: mem.display().to_string(),
            overlays,
            ..Default::default()
        })
        .await
        .map(tonic::Response::into_inner)
}

/// Creates a session with `given` as its overlays and restores a VM that expects them.
async fn restore(env: &Env, id: &str, mem: &Path, regions: &[&str], given: &[Given]) -> VmProcess {
    let s = create(env, id, mem, given.iter().map(Given::to_proto).collect())
        .await
        .unwrap_or_else(|e| panic!("CreateSession {id}: {e:?}"));
    let (socket, mem) = (PathBuf::from(s.socket_path), mem.to_path_buf());
    let regions: Vec<String> = regions.iter().map(|r| r.to_string()).collect();
    let expect: Vec<(u64, PathBuf)> = given.iter().map(|g| (g.offset, g.file.clone())).collect();
    let vm = tokio::task::spawn_blocking(move || {
        let regions: Vec<&str> = regions.iter().map(String::as_str).collect();
        let expect: Vec<(u64, &Path)> = expect.iter().map(|(o, f)| (*o, f.as_path())).collect();
        VmProcess::restore_with_overlays(
            &testkit::binary("uffd-vmsim"),
            &socket,
            &mem,
            &regions,
            &expect,
            STEP,
        )
    })
    .await
    .unwrap()
    .expect("VM restores");
    env.wait_state(id, SessionState::Serving).await;
    vm
}

/// The first 4 KiB page at or after byte `from` of `mem` that holds only zeros (a written zero
/// page or a hole): an overlay there must not be skipped as a zero page.
fn zero_page_from(mem: &Path, from: u64) -> u64 {
    let bytes = std::fs::read(mem).unwrap();
    let first = from / PAGE;
    (first..bytes.len() as u64 / PAGE)
        .find(|p| bytes[(p * PAGE) as usize..((p + 1) * PAGE) as usize].iter().all(|&b| b == 0))
        .expect("the memory file has a zero page")
        * PAGE
}

fn read_range(offset: u64, len: u64, page: u64) -> String {
    format!("read-range {} {}", offset / page, len.div_ceil(page))
}

/// Waits until the session's `overlay_faults` reaches `at_least` (the pager publishes its figures
/// right after serving the faults, which the VM may see answered a moment before); returns it.
async fn wait_overlay_faults(env: &Env, id: &str, at_least: u64) -> u64 {
    let deadline = Instant::now() + STEP;
    loop {
        let n = env.get(id).await.overlay_faults;
        if n >= at_least {
            return n;
        }
        assert!(Instant::now() < deadline, "session {id}: {n} overlay faults, {at_least} expected");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Waits until every one of `ids` is SERVING again with an error saying it was re-adopted.
async fn wait_readopted(env: &Env, ids: &[&str]) {
    let deadline = Instant::now() + STEP;
    loop {
        let mut all = true;
        for id in ids {
            let s = env.get(id).await;
            all &= s.state() == SessionState::Serving && s.error.contains("re-adopted by");
        }
        if all {
            return;
        }
        assert!(Instant::now() < deadline, "sessions {ids:?} were never re-adopted");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_vms_of_one_memory_file_read_their_own_overlays_and_each_others_original_pages() {
    let env = Env::start().await;
    let mem = env.memfile("mem", 16 * MIB, 0.2, 0.2);
    let original = std::fs::read(&mem).unwrap();
    // A0 and B1 lie over zero pages of the snapshot and stay untouched until graduation.
    let (za, zb) = (zero_page_from(&mem, MIB), zero_page_from(&mem, 2 * MIB));
    let a = [
        Given::new(&env, "a0", za, &pattern(1, PAGE), true),
        Given::new(&env, "a1", 3 * MIB, &pattern(2, 4 * PAGE), true),
        Given::new(&env, "a2", 6 * MIB + 16 * PAGE, &pattern(3, 2 * PAGE), false),
        Given::new(&env, "a3", 9 * MIB, &pattern(4, PAGE), true),
    ];
    let b = [
        // Right after A1: each VM reads the other's overlay page as the snapshot has it.
        Given::new(&env, "b0", 3 * MIB + 4 * PAGE, &pattern(5, PAGE), true),
        Given::new(&env, "b1", zb, &pattern(6, PAGE), false),
        // The very pages of A2, with other bytes.
        Given::new(&env, "b2", 6 * MIB + 16 * PAGE, &pattern(7, 2 * PAGE), false),
    ];
    let mut vm_a = restore(&env, "a", &mem, &[], &a).await;
    let mut vm_b = restore(&env, "b", &mem, &[], &b).await;

    // Faults, before anything else: A1 and B0 from their overlays, the other's from the file
    // (B0 first on its own: read in order after 3 MiB, it would come with the block of a fault).
    vm_cmd(&mut vm_b, &read_range(3 * MIB + 4 * PAGE, PAGE, PAGE)).await;
    for vm in [&mut vm_a, &mut vm_b] {
        let r = vm_cmd(vm, &read_range(3 * MIB, 5 * PAGE, PAGE)).await;
        assert_eq!(r["pages_verified"].as_u64(), Some(5), "{r}");
    }
    let (sa, sb) = (env.get("a").await, env.get("b").await);
    assert_eq!((sa.overlay_count, sa.overlay_bytes), (4, 8 * PAGE), "{sa:?}");
    assert_eq!((sb.overlay_count, sb.overlay_bytes), (3, 4 * PAGE), "{sb:?}");
    wait_overlay_faults(&env, "a", 1).await;
    wait_overlay_faults(&env, "b", 1).await;
    // Readers verify pages of the first MiB (no overlay there) across the kill below.
    vm_cmd(&mut vm_a, &format!("reader-start 1 0 {}", MIB / PAGE)).await;
    vm_cmd(&mut vm_b, &format!("reader-start 2 0 {}", MIB / PAGE)).await;

    // kill -9 of the pager: the adopter gets each session's overlays with it.
    let pid = env.pager_pid();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL)
        .unwrap();
    wait_readopted(&env, &["a", "b"]).await;
    let sa = env.get("a").await;
    assert_eq!((sa.overlay_count, sa.overlay_bytes), (4, 8 * PAGE), "{sa:?}");

    // After the kill: a sequential MiB through A2 / B2 (read-ahead copies the window), then a
    // discarded overlay page reads zero.
    for vm in [&mut vm_a, &mut vm_b] {
        let r = vm_cmd(vm, &read_range(6 * MIB, MIB, PAGE)).await;
        assert_eq!(r["pages_verified"].as_u64(), Some(MIB / PAGE), "{r}");
        vm_cmd(vm, "reader-stop").await;
    }
    // A3 faults in from its overlay (served by the adopter), then is discarded: zero after.
    let before = env.get("a").await.overlay_faults;
    vm_cmd(&mut vm_a, &read_range(9 * MIB, PAGE, PAGE)).await;
    wait_overlay_faults(&env, "a", before + 1).await;
    vm_cmd(&mut vm_a, &format!("balloon 0 {} {PAGE}", 9 * MIB)).await;
    let z = vm_cmd(&mut vm_a, &read_range(9 * MIB, PAGE, PAGE)).await;
    assert_eq!(z["pages_verified"].as_u64(), Some(1), "{z}");
    vm_cmd(&mut vm_b, &read_range(9 * MIB, PAGE, PAGE)).await;

    // Graduation copies the untouched overlays (A0, B1: over zero snapshot pages) from the
    // overlays; `verify` then reads every page of each VM, touched or not.
    for (id, vm) in [("a", &mut vm_a), ("b", &mut vm_b)] {
        env.graduate(id).await;
        let v = vm_cmd(vm, "verify").await;
        assert_eq!(v["pages_verified"].as_u64(), Some(16 * MIB / PAGE), "{v}");
    }
    assert_eq!(std::fs::read(&mem).unwrap(), original, "the memory file was never written");
    let g = env.get("a").await;
    assert_eq!(
        (g.state(), g.overlay_count, g.overlay_bytes),
        (SessionState::Graduated, 4, 8 * PAGE)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlays_survive_a_supervisor_restart() {
    let mut env = Env::start().await;
    let mem = env.memfile("mem", 8 * MIB, 0.2, 0.2);
    let z = zero_page_from(&mem, MIB);
    let given = [
        Given::new(&env, "o0", z, &pattern(9, PAGE), true),
        Given::new(&env, "o1", 4 * MIB, &pattern(10, 2 * PAGE), false),
    ];
    let mut vm = restore(&env, "r", &mem, &[], &given).await;
    vm_cmd(&mut vm, "read-random 200").await;

    // SIGTERM: the busy pager stays; a new supervisor takes it over, overlays shown again.
    let mut old = env.sup.take().unwrap();
    assert!(old.terminate().await.unwrap().success());
    let opts = SupervisorOptions {
        pager_binary: Some(testkit::binary("uffd-pager")),
        show_logs: true,
        ..Default::default()
    };
    let sup = SupervisorProcess::start(&testkit::binary("uffd-supervisor"), &env.run_dir(), &opts)
        .await
        .expect("the supervisor starts again");
    env.sup = Some(sup);
    let s = env.get("r").await;
    assert_eq!((s.state(), s.overlay_count, s.overlay_bytes), (SessionState::Serving, 2, 3 * PAGE));
    assert!(
        env.run_dir().join("sessions/r.overlay").exists(),
        "the overlay bytes are kept in the runtime directory"
    );
    let r = vm_cmd(&mut vm, &read_range(4 * MIB, 2 * PAGE, PAGE)).await;
    assert_eq!(r["pages_verified"].as_u64(), Some(2), "{r}");
    env.graduate("r").await;
    let v = vm_cmd(&mut vm, "verify").await;
    assert_eq!(v["pages_verified"].as_u64(), Some(8 * MIB / PAGE), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_overlays_are_refused_with_invalid_argument_naming_the_overlay_and_the_reason() {
    let env = Env::start_with(SupervisorOptions {
        args: vec!["--max-overlay-bytes".into(), "64K".into()],
        ..Default::default()
    })
    .await;
    let mem = env.memfile("mem", 4 * MIB, 0.2, 0.2);
    let data = |offset: u64, len: u64| Overlay {
        offset,
        source: Some(Source::Data(vec![7; len as usize])),
    };
    let path = |offset: u64, p: &str| Overlay { offset, source: Some(Source::Path(p.into())) };
    let cases: Vec<(Vec<Overlay>, &str)> = vec![
        (
            vec![data(0, PAGE), data(PAGE + 100, PAGE)],
            "overlay 1 (offset 4196): the offset is not a multiple of 4096",
        ),
        (
            vec![data(0, 100)],
            "overlay 0 (offset 0): 100 bytes is not a whole number of 4096-byte pages",
        ),
        (
            vec![data(4 * MIB, PAGE)],
            "overlay 0 (offset 4194304): bytes [4194304, 4198400) lie outside the memory file",
        ),
        (
            vec![data(0, 2 * PAGE), data(PAGE, PAGE)],
            "overlay 1 (offset 4096) overlaps overlay 0 (offset 0)",
        ),
        (vec![data(0, 32 * PAGE)], "the overlays hold 131072 bytes, more than the 65536 bytes"),
        (
            vec![data(0, PAGE), path(MIB, "/nonexistent/overlay")],
            "overlay 1 (offset 1048576): cannot read /nonexistent/overlay",
        ),
        (
            vec![Overlay { offset: 0, source: None }],
            "overlay 0 (offset 0): neither data nor path is set",
        ),
        (vec![data(0, 0)], "overlay 0 (offset 0): it holds no bytes"),
    ];
    for (i, (overlays, want)) in cases.into_iter().enumerate() {
        let id = format!("bad-{i}");
        let e = create(&env, &id, &mem, overlays).await.expect_err(want);
        assert_eq!(e.code(), Code::InvalidArgument, "{want}: {e:?}");
        assert!(e.message().contains(want), "want {want:?} in {:?}", e.message());
        let gone = env
            .client()
            .get_session(uffdpager::api::GetSessionRequest { session_id: id.clone() })
            .await;
        assert_eq!(gone.unwrap_err().code(), Code::NotFound, "a refused session is not kept");
        assert!(!env.run_dir().join(format!("sessions/{id}.sock")).exists());
    }
    // Within the limit, by path: accepted, and shown.
    let file = env.dir.path().join("ok");
    std::fs::write(&file, pattern(3, 16 * PAGE)).unwrap();
    let s = create(&env, "ok", &mem, vec![path(MIB, &file.display().to_string())]).await.unwrap();
    assert_eq!((s.overlay_count, s.overlay_bytes), (1, 16 * PAGE), "{s:?}");
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlays_of_2m_pages_are_served_in_2m_units_and_a_misaligned_one_fails_the_session() {
    const HUGE: u64 = 2 * MIB;
    // Two VMs of 4 hugepages each, and one of slack.
    let Some(_hugepages) = testkit::reserve_hugepages_for_test("overlays::2m", 9) else {
        return;
    };
    let env = Env::start().await;
    let mem = env.memfile("mem", 8 * MIB, 0.2, 0.2);
    let region = ["8M@0:2M"];
    let a = [Given::new(&env, "a", HUGE, &pattern(11, HUGE), true)];
    let b = [Given::new(&env, "b", 2 * HUGE, &pattern(12, HUGE), false)];
    let mut vm_a = restore(&env, "a", &mem, &region, &a).await;
    let mut vm_b = restore(&env, "b", &mem, &region, &b).await;
    for vm in [&mut vm_a, &mut vm_b] {
        // Hugepages 1 and 2: one VM's overlay and the other's original, each way round.
        let r = vm_cmd(vm, &read_range(HUGE, 2 * HUGE, HUGE)).await;
        assert_eq!(r["pages_verified"].as_u64(), Some(2), "{r}");
    }
    wait_overlay_faults(&env, "a", 1).await;
    for (id, vm) in [("a", &mut vm_a), ("b", &mut vm_b)] {
        env.graduate(id).await;
        let v = vm_cmd(vm, "verify").await;
        assert_eq!(v["pages_verified"].as_u64(), Some(4), "{v}");
    }

    // 4 KiB aligned, so CreateSession takes it; the VMM's 2 MiB region does not: FAILED, saying
    // which overlay and why.
    let s = create(
        &env,
        "c",
        &mem,
        vec![Given::new(&env, "c", HUGE + PAGE, &pattern(13, PAGE), true).to_proto()],
    )
    .await
    .unwrap();
    let (socket, mem2) = (PathBuf::from(s.socket_path), mem.clone());
    let _vm_c = tokio::task::spawn_blocking(move || {
        VmProcess::restore(&testkit::binary("uffd-vmsim"), &socket, &mem2, &["8M@0:2M"], STEP)
    })
    .await
    .unwrap()
    .expect("the VMM sends its handshake");
    let failed = env.wait_state("c", SessionState::Failed).await;
    assert!(
        failed.error.contains("overlay 0 (offset 2101248, 4096 bytes)")
            && failed.error.contains("2097152-byte pages"),
        "{}",
        failed.error
    );
}
