//! Hostile and unlucky VMMs (issue 12): each case runs beside healthy VMs (one per fault
//! worker, so one shares the hostile session's worker whichever it is) that must keep being
//! served and verified, on the same pager process unless the case is the one where the pager
//! must be replaced.

// The test plays the VMM (raw guest memory) and a debugger (ptrace): unsafe by nature.
#![allow(unsafe_code)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::hostile_vmm::HostileVmm;
use common::{vm_cmd, vm_cmd_within, Env, MIB, STEP};
use testkit::{SupervisorOptions, VmProcess};
use uffdpager::api::pager_client::PagerClient;
use uffdpager::api::{CompleteSessionRequest, DeleteSessionRequest, GetInfoRequest, SessionState};

/// How long a healthy VM's command may take while a hostile one does its worst.
const CANARY_DEADLINE: Duration = Duration::from_secs(20);

/// Healthy VMs, one per fault worker of the pager (each new session goes to the least loaded
/// worker, so every worker serves one).
async fn canaries(env: &Env, mem: &Path) -> Vec<VmProcess> {
    let mut pager = PagerClient::new(uffdpager::grpc::uds_channel(&env.pager_socket()));
    let info = pager.get_info(GetInfoRequest {}).await.expect("GetInfo").into_inner();
    assert!(info.fault_threads >= 1, "{info:?}");
    let mut vms = Vec::new();
    for i in 0..info.fault_threads {
        vms.push(env.restore(&format!("canary-{i}"), mem, &[]).await);
    }
    vms
}

/// Every healthy VM reads pages it never read before (new faults) and verifies them.
async fn canaries_verify(vms: &mut [VmProcess], seed: u64, limit: Duration) {
    for (i, vm) in vms.iter_mut().enumerate() {
        let r =
            vm_cmd_within(vm, &format!("read-random 128 {seed}"), limit, &format!("canary-{i}"))
                .await;
        assert!(r["pages_verified"].as_u64().unwrap() >= 128, "canary-{i}: {r}");
    }
}

/// A VM restored after the hostile one is served and verified too.
async fn a_later_restore_works(env: &Env, mem: &Path, id: &str) {
    let mut vm = env.restore(id, mem, &[]).await;
    vm_cmd_within(&mut vm, "read-random 256 7", CANARY_DEADLINE, id).await;
}

async fn wait_terminal(env: &Env, id: &str) -> uffdpager::api::Session {
    let deadline = Instant::now() + STEP;
    loop {
        let s = env.get(id).await;
        if matches!(s.state(), SessionState::Ended | SessionState::Failed) {
            return s;
        }
        assert!(Instant::now() < deadline, "session {id} never ended: {s:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vmm_sending_a_blocking_uffd_and_exiting_freezes_no_other_vm() {
    let env = Env::start().await;
    let mem = env.memfile("mem", 64 * MIB, 0.1, 0.1);
    let mut vms = canaries(&env, &mem).await;
    canaries_verify(&mut vms, 1, CANARY_DEADLINE).await;
    let pager = env.pager_pid();

    let s = env.create("hostile", &mem).await;
    let (mut hostile, _) = tokio::task::block_in_place(|| {
        HostileVmm::start(Path::new(&s.socket_path), &["--blocking", "--then", "exit"])
    });
    tokio::task::block_in_place(|| hostile.wait_exit(STEP));
    // Served (its uffd made non-blocking), then ended by the VMM's EOF: never a stuck worker.
    let ended = wait_terminal(&env, "hostile").await;
    assert_eq!(ended.state(), SessionState::Ended, "{ended:?}");

    canaries_verify(&mut vms, 2, CANARY_DEADLINE).await;
    a_later_restore_works(&env, &mem, "later").await;
    canaries_verify(&mut vms, 3, CANARY_DEADLINE).await;
    assert_eq!(env.pager_pid(), pager, "the pager keeps running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vmm_that_clears_o_nonblock_and_reads_its_own_uffd_freezes_no_other_vm() {
    let env = Env::start().await;
    let mem = env.memfile("mem", 64 * MIB, 0.1, 0.1);
    let mut vms = canaries(&env, &mem).await;
    let pager = env.pager_pid();

    let s = env.create("thief", &mem).await;
    let (mut thief, _) = tokio::task::block_in_place(|| {
        HostileVmm::start(Path::new(&s.socket_path), &["--size", "16777216", "--then", "steal"])
    });
    env.wait_state("thief", SessionState::Serving).await;
    thief.go();
    let stole = tokio::task::block_in_place(|| thief.next(STEP));
    assert_eq!(stole["ok"], true, "{stole}");
    eprintln!("the thief: {stole}");
    assert!(stole["stolen"].as_u64().unwrap() > 0, "it took none of its events: {stole}");

    canaries_verify(&mut vms, 4, CANARY_DEADLINE).await;
    a_later_restore_works(&env, &mem, "later").await;
    assert_eq!(env.pager_pid(), pager, "the pager keeps running");
}

/// Stops every `fault-*` thread of process `pid` (ptrace: the rest of the process runs on), and
/// keeps reaping them in a thread of its own until they die. Returns once they are stopped.
fn stop_fault_threads(pid: i32) -> Vec<i32> {
    let tids: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("tasks")
        .flatten()
        .filter_map(|t| {
            let comm = std::fs::read_to_string(t.path().join("comm")).ok()?;
            comm.starts_with("fault-").then(|| t.file_name().to_str()?.parse().ok())?
        })
        .collect();
    assert!(!tids.is_empty(), "no fault threads in pager {pid}");
    let (tx, rx) = std::sync::mpsc::channel();
    let stopping = tids.clone();
    // The tracer is this thread: it attaches, and reaps the threads once they are killed (a
    // traced thread that dies is held until its tracer waits for it).
    std::thread::spawn(move || {
        for &tid in &stopping {
            // SAFETY: plain ptrace requests on a thread of another process (we are root);
            // they touch no memory of ours.
            let seized = unsafe { libc::ptrace(libc::PTRACE_SEIZE, tid, 0, 0) };
            assert_eq!(seized, 0, "PTRACE_SEIZE {tid}: {}", std::io::Error::last_os_error());
            // SAFETY: as above.
            let stopped = unsafe { libc::ptrace(libc::PTRACE_INTERRUPT, tid, 0, 0) };
            assert_eq!(stopped, 0, "PTRACE_INTERRUPT {tid}: {}", std::io::Error::last_os_error());
            let mut status = 0;
            // SAFETY: waits for our tracee; `status` is a valid out-pointer.
            unsafe { libc::waitpid(tid, &mut status, libc::__WALL) };
        }
        let _ = tx.send(());
        for &tid in &stopping {
            loop {
                let mut status = 0;
                // SAFETY: as above.
                let r = unsafe { libc::waitpid(tid, &mut status, libc::__WALL) };
                if r < 0 || libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
                    break;
                }
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(30)).expect("fault threads stopped");
    tids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fault_worker_that_stops_turning_gets_its_pager_replaced_and_its_vms_go_on() {
    let env = Env::start_with(SupervisorOptions {
        args: vec!["--pager-unhealthy-timeout".into(), "1s".into()],
        ..Default::default()
    })
    .await;
    let mem = env.memfile("mem", 64 * MIB, 0.1, 0.1);
    let mut vms = canaries(&env, &mem).await;
    canaries_verify(&mut vms, 1, CANARY_DEADLINE).await;
    let pager = env.pager_pid();
    let socket = env.pager_socket();

    let stopped = tokio::task::block_in_place(|| stop_fault_threads(pager));
    eprintln!("stopped fault threads {stopped:?} of pager {pager}");
    // The watchdog says so on the pager's health (until the supervisor kills it).
    let deadline = Instant::now() + STEP;
    let mut saw_not_serving = false;
    while Instant::now() < deadline && Path::new(&format!("/proc/{pager}")).exists() {
        let mut health = tonic_health::pb::health_client::HealthClient::new(
            uffdpager::grpc::uds_channel(&socket),
        );
        let req = tonic_health::pb::HealthCheckRequest { service: String::new() };
        if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(2), health.check(req)).await {
            if r.get_ref().status
                == tonic_health::pb::health_check_response::ServingStatus::NotServing as i32
            {
                saw_not_serving = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(saw_not_serving, "pager {pager} never reported NOT_SERVING");

    // Every VM was frozen with its worker; each goes on once a fresh pager adopts it.
    canaries_verify(&mut vms, 2, STEP).await;
    let now = env.pager_pid();
    assert_ne!(now, pager, "the stalled pager was replaced");
    for i in 0..vms.len() {
        let s = env.get(&format!("canary-{i}")).await;
        assert_eq!(s.state(), SessionState::Serving, "{s:?}");
        assert!(s.error.contains("NOT_SERVING"), "the session says why it moved: {s:?}");
    }
    a_later_restore_works(&env, &mem, "later").await;
    canaries_verify(&mut vms, 3, CANARY_DEADLINE).await;
    assert_eq!(env.pager_pid(), now);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_uffd_without_remove_events_is_refused_at_the_handshake_with_a_clear_error() {
    let env = keeping_refused_vmms().await;
    let mem = env.memfile("mem", 64 * MIB, 0.1, 0.1);
    let mut vms = canaries(&env, &mem).await;
    let pager = env.pager_pid();

    let s = env.create("no-remove", &mem).await;
    let (_vmm, _) = tokio::task::block_in_place(|| {
        HostileVmm::start(Path::new(&s.socket_path), &["--no-remove-events", "--then", "hold"])
    });
    let failed = env.wait_state("no-remove", SessionState::Failed).await;
    assert!(failed.error.contains("UFFD_FEATURE_EVENT_REMOVE"), "{:?}", failed.error);

    canaries_verify(&mut vms, 2, CANARY_DEADLINE).await;
    a_later_restore_works(&env, &mem, "later").await;
    assert_eq!(env.pager_pid(), pager, "the pager keeps running");
}

/// A supervisor that keeps the VMMs it refuses (not SIGKILLed): a hostile VMM whose handshake
/// is refused lives to report what it sent.
async fn keeping_refused_vmms() -> Env {
    Env::start_with(SupervisorOptions {
        args: vec!["--refused-vmm".into(), "keep".into()],
        ..Default::default()
    })
    .await
}

/// CPU seconds process `pid` has used (user + system).
fn cpu_seconds(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    // Fields 14 and 15 of stat(5), counted after the command's closing parenthesis.
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_believed_present_that_faults_again_is_served_not_spun_on() {
    let env = Env::start().await;
    let mem = env.memfile("mem", 64 * MIB, 0.1, 0.1);
    let mut vms = canaries(&env, &mem).await;
    let pager = env.pager_pid();

    let s = env.create("remapper", &mem).await;
    let (mut vmm, _) = tokio::task::block_in_place(|| {
        HostileVmm::start(Path::new(&s.socket_path), &["--then", "remap-refault"])
    });
    env.wait_state("remapper", SessionState::Serving).await;
    vmm.go();
    let touched = tokio::task::block_in_place(|| vmm.next(STEP));
    assert_eq!(touched["step"], "touched", "{touched}");
    // The page faults again in fresh memory the pager was never told about.
    let refaulted = tokio::task::block_in_place(|| vmm.next(STEP));
    assert_eq!(refaulted["ok"], true, "{refaulted}");
    // And nothing spins afterwards.
    let before = cpu_seconds(pager);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let burnt = cpu_seconds(pager) - before;
    assert!(burnt < 0.5, "the pager burnt {burnt:.2} CPU seconds in 2 s of quiet");

    canaries_verify(&mut vms, 2, CANARY_DEADLINE).await;
    assert_eq!(env.pager_pid(), pager, "the pager keeps running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_with_more_than_eight_fds_fails_clearly_and_leaves_no_fd_behind() {
    let env = keeping_refused_vmms().await;
    let mem = env.memfile("mem", 64 * MIB, 0.1, 0.1);
    let mut vms = canaries(&env, &mem).await;
    let pager = env.pager_pid();
    let sup = i32::try_from(env.sup().pid().expect("supervisor pid")).unwrap();
    let baseline = common::fd_count(sup);

    for i in 0..3 {
        let id = format!("many-fds-{i}");
        let s = env.create(&id, &mem).await;
        let (mut vmm, sent) = tokio::task::block_in_place(|| {
            HostileVmm::start(Path::new(&s.socket_path), &["--extra-fds", "11", "--then", "exit"])
        });
        assert_eq!(sent["fds"], 12, "{sent}");
        tokio::task::block_in_place(|| vmm.wait_exit(STEP));
        let failed = env.wait_state(&id, SessionState::Failed).await;
        assert!(failed.error.contains("more than 8 file descriptors"), "{:?}", failed.error);
        env.client().delete_session(DeleteSessionRequest { session_id: id }).await.unwrap();
    }
    // Back where it was (transient fds come and go: wait until it is at most that).
    let deadline = Instant::now() + STEP;
    loop {
        let now = common::fd_count(sup);
        if now <= baseline {
            break;
        }
        assert!(Instant::now() < deadline, "supervisor fds: {baseline} before, {now} after");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    canaries_verify(&mut vms, 2, CANARY_DEADLINE).await;
    assert_eq!(env.pager_pid(), pager);
}

/// Balloon discards (64 x 1 MiB, each read back) arrive while CompleteSession runs: a VM that
/// is alive is never released as gone. Looped, since the race is narrow (`HOSTILE_ROUNDS`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balloon_discards_during_graduation_never_release_a_live_vm() {
    let env = Env::start().await;
    let size = 256 * MIB;
    let mem = env.memfile("mem", size, 0.1, 0.1);
    let canary_mem = env.memfile("canary", 64 * MIB, 0.1, 0.1);
    let mut vms = canaries(&env, &canary_mem).await;
    let rounds: u64 =
        std::env::var("HOSTILE_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(4);
    let pager = env.pager_pid();
    for round in 0..rounds {
        let id = format!("balloon-{round}");
        let mut vm = env.restore(&id, &mem, &[]).await;
        vm_cmd(&mut vm, "reader-start 1").await;
        let mut client = env.client();
        let sid = id.clone();
        let completing = tokio::spawn(async move {
            client.complete_session(CompleteSessionRequest { session_id: sid }).await
        });
        let mut rng = round.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        for _ in 0..64 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let mib = rng % (size / MIB);
            vm_cmd(&mut vm, &format!("balloon 0 {mib}M 1M")).await;
            vm_cmd(&mut vm, &format!("read-range {} 256", mib * 256)).await;
        }
        let done = completing.await.expect("completion task");
        let s = env.get(&id).await;
        assert!(
            done.is_ok(),
            "round {round}: CompleteSession failed: {done:?}; the session is now {:?}: {}",
            s.state(),
            s.error
        );
        assert_eq!(s.state(), SessionState::Graduated, "round {round}: {s:?}");
        let reader = vm_cmd(&mut vm, "reader-stop").await;
        assert!(reader["pages_verified"].as_u64().unwrap() > 0, "{reader}");
        vm_cmd(&mut vm, "verify").await;
        tokio::task::block_in_place(|| vm.exit()).expect("vm exits");
        assert_eq!(env.pager_pid(), pager, "round {round}: the pager keeps running");
    }
    canaries_verify(&mut vms, 2, CANARY_DEADLINE).await;
}
