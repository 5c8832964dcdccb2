//! Working-set record and prefetch (issue 15), through the real binaries: a VM restored with
//! `record_working_set` touches a random 25% of its memory and graduates, which saves the
//! recording; a second VM restored from the same file with `prefetch_working_set` gets those
//! pages copied before it asks, reads them byte for byte with >= 90% fewer faults. Recordings of
//! another memory file, corrupt, truncated or of another layout are refused or skipped with the
//! reason visible; a balloon discard while the prefetch runs reads zeros; a pager killed mid-
//! prefetch is replaced by one that finishes it, every byte right.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{vm_cmd, Env, MIB, STEP};
use testkit::VmProcess;
use tonic::Code;
use uffdpager::api::{
    CreateSessionRequest, Session, SessionState, WatchSessionsRequest, WorkingSetState,
};
use uffdpager::working_set::{self, FileIdentity, FileRun, RecordedRegion, Recording};

const PAGE: u64 = 4096;

async fn create(
    env: &Env,
    id: &str,
    mem: &Path,
    record: Option<&Path>,
    prefetch: Option<&Path>,
) -> Result<Session, tonic::Status> {
    let shown = |p: Option<&Path>| p.map(|p| p.display().to_string()).unwrap_or_default();
    env.client()
        .create_session(CreateSessionRequest {
            session_id: id.into(),
            memory_file: mem.display().to_string(),
            record_working_set: shown(record),
            prefetch_working_set: shown(prefetch),
            ..Default::default()
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn restore(
    env: &Env,
    id: &str,
    mem: &Path,
    record: Option<&Path>,
    prefetch: Option<&Path>,
) -> VmProcess {
    let s = create(env, id, mem, record, prefetch)
        .await
        .unwrap_or_else(|e| panic!("CreateSession {id}: {e:?}"));
    let (socket, mem) = (PathBuf::from(s.socket_path), mem.to_path_buf());
    let vm = tokio::task::spawn_blocking(move || {
        VmProcess::restore(&testkit::binary("uffd-vmsim"), &socket, &mem, &[], STEP)
    })
    .await
    .unwrap()
    .expect("VM restores");
    env.wait_state(id, SessionState::Serving).await;
    vm
}

/// Waits (at most a minute) until `ok` holds of the session; returns it.
async fn wait_for(env: &Env, id: &str, what: &str, ok: impl Fn(&Session) -> bool) -> Session {
    let deadline = Instant::now() + STEP;
    loop {
        let s = env.get(id).await;
        if ok(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "session {id}: never {what}: {s:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn prefetch_done(s: &Session) -> bool {
    s.prefetch_state() == WorkingSetState::Done
}

/// A recording of `mem` (one region covering it) with `runs` (page, pages) in that order,
/// written with the library's own writer.
fn recording_of(mem: &Path, runs: impl IntoIterator<Item = (u64, u64)>) -> Recording {
    let file = std::fs::File::open(mem).unwrap();
    let identity = FileIdentity::of(&file).unwrap();
    Recording {
        identity,
        recorded_at_ms: 1,
        regions: vec![RecordedRegion { offset: 0, size: identity.size, page_size: PAGE }],
        runs: runs.into_iter().map(|(p, n)| FileRun { offset: p * PAGE, len: n * PAGE }).collect(),
    }
}

/// A graduation answers its caller before the recording it ends is saved (the save runs on a
/// thread of its own): the supervisor takes the outcome from the pager's tombstone afterwards,
/// and does not forget the tombstone before (here the save is held back 500 ms).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recording_saved_after_its_graduation_answered_is_still_reported_done() {
    let env = Env::start_with_env(
        testkit::SupervisorOptions::default(),
        &[("UFFD_PAGER_DELAY_WORKING_SET_SAVE_MS", "500")],
    )
    .await;
    let mem = env.memfile("mem", 16 * MIB, 0.1, 0.1);
    let ws = env.dir.path().join("ws.bin");
    let mut vm = restore(&env, "late", &mem, Some(&ws), None).await;
    vm_cmd(&mut vm, "read-random 0.25 3").await;
    env.graduate("late").await;
    let s = env.get("late").await;
    assert_eq!(s.state(), SessionState::Graduated);
    assert_eq!(s.record_state(), WorkingSetState::Running, "the save is held back: {s:?}");
    let s = wait_for(&env, "late", "saved its recording", |s| {
        s.record_state() == WorkingSetState::Done
    })
    .await;
    assert!(s.record_reason.contains("graduation began"), "{}", s.record_reason);
    assert!(working_set::read(&ws).is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_random_quarter_replays_after_prefetch_byte_for_byte_with_90_percent_fewer_faults(
) {
    let env = Env::start().await;
    let mem = env.memfile("mem", 64 * MIB, 0.1, 0.1);
    let ws = env.dir.path().join("ws.bin");

    // The recording VM: a random 25%, then graduation, which ends the recording and saves it.
    let mut vm = restore(&env, "rec", &mem, Some(&ws), None).await;
    let s = env.get("rec").await;
    assert_eq!(s.record_state(), WorkingSetState::Running, "{s:?}");
    vm_cmd(&mut vm, "read-random 0.25 7").await;
    let on_demand = env.get("rec").await.faults;
    assert!(on_demand >= 4000, "a random quarter of 16384 pages faulted {on_demand} times");
    env.graduate("rec").await;
    let s =
        wait_for(&env, "rec", "saved its recording", |s| s.record_state() == WorkingSetState::Done)
            .await;
    assert!(s.record_reason.contains("graduation began"), "{}", s.record_reason);
    assert!(s.recorded_bytes >= 4096 * PAGE, "recorded {} bytes", s.recorded_bytes);
    let mode = std::fs::metadata(&ws).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the recording's mode");
    let recording = working_set::read(&ws).unwrap();
    assert_eq!(recording.total_bytes(), s.recorded_bytes);
    drop(vm);

    // The prefetching VM: progress shows in WatchSessions and GetSession; then the same quarter.
    let mut watch =
        env.client().watch_sessions(WatchSessionsRequest {}).await.unwrap().into_inner();
    let mut vm = restore(&env, "pre", &mem, None, Some(&ws)).await;
    let s = wait_for(&env, "pre", "finished its prefetch", prefetch_done).await;
    assert_eq!(s.prefetched_bytes, s.prefetch_total_bytes, "{s:?}");
    assert_eq!(s.prefetch_total_bytes, recording.total_bytes());
    assert!(s.prefetch_copied_bytes > 0 && s.resident_bytes >= s.prefetch_copied_bytes, "{s:?}");
    let watched = tokio::time::timeout(STEP, async {
        while let Some(ev) = watch.message().await.unwrap() {
            if ev.session.as_ref().is_some_and(|s| s.id == "pre" && prefetch_done(s)) {
                return ev.session.unwrap();
            }
        }
        panic!("WatchSessions ended");
    })
    .await
    .expect("WatchSessions shows the prefetch done");
    assert_eq!(watched.prefetched_bytes, watched.prefetch_total_bytes);
    let before = env.get("pre").await.faults;
    vm_cmd(&mut vm, "read-random 0.25 7").await;
    let replay = env.get("pre").await.faults - before;
    assert!(
        replay * 10 <= on_demand,
        "the replay faulted {replay} times, on demand {on_demand}: not 90% fewer"
    );
    // Every byte, prefetched or not.
    vm_cmd(&mut vm, "verify").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recording_of_another_memory_file_is_refused_at_create_session() {
    let env = Env::start().await;
    let a = env.memfile("a", 8 * MIB, 0.1, 0.1);
    let b = env.dir.path().join("b");
    let spec = vmsim::memfile::MemoryFileSpec {
        size: 8 * MIB,
        seed: 99,
        zero_fraction: 0.1,
        hole_fraction: 0.1,
    };
    vmsim::memfile::write_memory_file(&b, &spec).unwrap();
    let c = env.memfile("c", 16 * MIB, 0.1, 0.1);
    let ws = env.dir.path().join("a.ws");
    working_set::write_atomically(&ws, &recording_of(&a, [(0, 4), (100, 1)])).unwrap();

    let same_size = create(&env, "b", &b, None, Some(&ws)).await.unwrap_err();
    assert_eq!(same_size.code(), Code::FailedPrecondition, "{same_size:?}");
    assert!(same_size.message().contains("another memory file of the same size"), "{same_size:?}");
    let other_size = create(&env, "c", &c, None, Some(&ws)).await.unwrap_err();
    assert_eq!(other_size.code(), Code::FailedPrecondition, "{other_size:?}");
    assert!(
        other_size.message().contains("8388608 bytes, this one has 16777216"),
        "{other_size:?}"
    );
    // The recording's own memory file takes it.
    let s = create(&env, "a", &a, None, Some(&ws)).await.unwrap();
    assert_eq!(s.prefetch_state(), WorkingSetState::Pending);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_truncated_or_misplaced_recordings_are_refused_naming_the_reason() {
    let env = Env::start().await;
    let mem = env.memfile("mem", 8 * MIB, 0.1, 0.1);
    let good = recording_of(&mem, [(0, 4), (100, 1), (7, 1)]).encode();
    let file = |name: &str, bytes: &[u8]| {
        let p = env.dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    let mut flipped = good.clone();
    flipped[60] ^= 1;
    let cases = [
        (file("truncated", &good[..good.len() - 9]), "truncated"),
        (file("flipped", &flipped), "checksum does not match"),
        (
            file("garbage", b"not a recording at all, but long enough to have a header......"),
            "no UFFDWSET magic",
        ),
        (env.dir.path().join("missing"), "No such file"),
    ];
    for (i, (path, why)) in cases.iter().enumerate() {
        let err = create(&env, &format!("s{i}"), &mem, None, Some(path)).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{path:?}: {err:?}");
        assert!(err.message().contains(why), "{path:?}: {err:?}");
        assert!(err.message().contains(&path.display().to_string()), "names the file: {err:?}");
    }
    let relative = env
        .client()
        .create_session(CreateSessionRequest {
            memory_file: mem.display().to_string(),
            record_working_set: "ws.bin".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(relative.code(), Code::InvalidArgument);
    assert!(relative.message().contains("record_working_set"), "{relative:?}");
    let no_dir = env.dir.path().join("nope/ws.bin");
    let err = create(&env, "nodir", &mem, Some(&no_dir), None).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    // A valid recording of this file but of another region layout: the session is served on
    // demand, the prefetch SKIPPED with the reason; every byte right.
    let mut two_regions = recording_of(&mem, [(0, 4)]);
    two_regions.regions = vec![
        RecordedRegion { offset: 0, size: 4 * MIB, page_size: PAGE },
        RecordedRegion { offset: 4 * MIB, size: 4 * MIB, page_size: PAGE },
    ];
    let ws = env.dir.path().join("layout.ws");
    working_set::write_atomically(&ws, &two_regions).unwrap();
    let mut vm = restore(&env, "layout", &mem, None, Some(&ws)).await;
    let s = wait_for(&env, "layout", "skipped its prefetch", |s| {
        s.prefetch_state() == WorkingSetState::Skipped
    })
    .await;
    assert!(s.prefetch_reason.contains("recorded with regions"), "{}", s.prefetch_reason);
    assert_eq!(s.prefetch_copied_bytes, 0);
    vm_cmd(&mut vm, "read-random 0.25 3").await;
    vm_cmd(&mut vm, "verify").await;
}

/// Every page of a `pages`-page file, one run each, in a scattered order (stride 7919, prime):
/// tens of thousands of single-page copies, so the prefetch is still running when the test acts.
fn scattered(pages: u64) -> impl Iterator<Item = (u64, u64)> {
    (0..pages).map(move |i| ((i * 7919) % pages, 1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_discard_while_the_prefetch_runs_reads_zeros_and_is_never_written() {
    let env = Env::start().await;
    let pages = 256 * MIB / PAGE;
    let mem = env.memfile("mem", 256 * MIB, 0.0, 0.0);
    let ws = env.dir.path().join("all.ws");
    working_set::write_atomically(&ws, &recording_of(&mem, scattered(pages))).unwrap();
    let mut vm = restore(&env, "vm", &mem, None, Some(&ws)).await;
    // 16 MiB discarded from 100 MiB on, while the prefetch copies all over the file.
    vm_cmd(&mut vm, "balloon 0 100M 16M").await;
    let s = env.get("vm").await;
    assert_eq!(
        s.prefetch_state(),
        WorkingSetState::Running,
        "the prefetch was over before the discard (it must run for this test to mean anything): {s:?}"
    );
    let s = wait_for(&env, "vm", "finished its prefetch", prefetch_done).await;
    assert_eq!(s.prefetched_bytes, 256 * MIB);
    // Every discarded page is still missing once the prefetch has passed over all of them
    // (pages it copied there before the discard went with it).
    assert_eq!(s.removed_bytes, 16 * MIB, "the prefetch wrote into the discarded range: {s:?}");
    // The simulator expects zeros in the discarded range, and the snapshot everywhere else.
    let report =
        vm_cmd(&mut vm, &format!("read-range {} {}", 100 * MIB / PAGE, 16 * MIB / PAGE)).await;
    assert_eq!(report["mismatches"].as_u64(), Some(0), "{report}");
    vm_cmd(&mut vm, "verify").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pager_killed_mid_prefetch_is_replaced_by_one_that_finishes_it_every_byte_right() {
    let env = Env::start().await;
    let pages = 256 * MIB / PAGE;
    let mem = env.memfile("mem", 256 * MIB, 0.1, 0.1);
    let ws = env.dir.path().join("all.ws");
    working_set::write_atomically(&ws, &recording_of(&mem, scattered(pages))).unwrap();
    let mut vm = restore(&env, "vm", &mem, Some(&env.dir.path().join("re.ws")), Some(&ws)).await;
    let s = env.get("vm").await;
    assert_eq!(s.prefetch_state(), WorkingSetState::Running, "over before the kill: {s:?}");
    let pid = env.pager_pid();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL)
        .unwrap();
    wait_for(&env, "vm", "re-adopted", |s| {
        s.state() == SessionState::Serving && s.error.contains("re-adopted by")
    })
    .await;
    let s = wait_for(&env, "vm", "finished its prefetch", prefetch_done).await;
    assert_eq!(s.prefetched_bytes, 256 * MIB, "{s:?}");
    assert_eq!(s.record_state(), WorkingSetState::Skipped, "{s:?}");
    assert!(s.record_reason.contains("re-adopted"), "{}", s.record_reason);
    vm_cmd(&mut vm, "verify").await;
}
