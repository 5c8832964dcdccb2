//! `--follow-vcpus`: the pager pins a fault worker to each CPU it may use, and a session moves
//! to the worker on the CPU its vCPU runs on, while the VM faults, every byte still right.

mod common;

use std::time::{Duration, Instant};

use common::{vm_cmd, Env, MIB};
use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
use nix::unistd::Pid;

/// The CPUs this process may use.
fn allowed_cpus() -> Vec<usize> {
    let set = sched_getaffinity(Pid::from_raw(0)).unwrap();
    (0..CpuSet::count()).filter(|&c| set.is_set(c).unwrap()).collect()
}

/// Pins every thread of process `pid` to `cpu`.
fn pin_process(pid: u32, cpu: usize) {
    let mut set = CpuSet::new();
    set.set(cpu).unwrap();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let tid: i32 = task.unwrap().file_name().to_str().unwrap().parse().unwrap();
        sched_setaffinity(Pid::from_raw(tid), &set).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_follows_its_vcpu_to_the_worker_on_its_cpu_and_reads_right_throughout() {
    let cpus = allowed_cpus();
    assert!(cpus.len() >= 2, "following needs two CPUs to move between, this test has {cpus:?}");
    let dir = tempfile::tempdir().unwrap();
    let pager = common::pager_with_flags(dir.path(), "--follow-vcpus");
    let env = Env::start_with(testkit::SupervisorOptions {
        pager_binary: Some(pager),
        ..Default::default()
    })
    .await;
    let info = uffdpager::api::pager_client::PagerClient::new(uffdpager::grpc::uds_channel(
        &env.pager_socket(),
    ))
    .get_info(uffdpager::api::GetInfoRequest {})
    .await
    .unwrap()
    .into_inner();
    let worker_cpus: Vec<usize> = info.fault_worker_cpus.iter().map(|&c| c as usize).collect();
    assert_eq!(worker_cpus, cpus, "a worker pinned to each CPU: {info:?}");
    assert_eq!(info.fault_threads as usize, cpus.len());

    let mem = env.memfile("mem", 256 * MIB, 0.2, 0.1);
    let mut vm = env.restore("vm", &mem, &[]).await;
    let mut seed = 0;
    // To the last CPU, then to the first: wherever it started, it moves at least once.
    for (worker, cpu) in [(cpus.len() - 1, cpus[cpus.len() - 1]), (0, cpus[0])] {
        pin_process(vm.pid, cpu);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            seed += 1;
            // 2,000 first touches at a time (of 65,536 pages): the VM faults while it moves.
            let r = vm_cmd(&mut vm, &format!("read-random 2000 {seed}")).await;
            assert_eq!(r["mismatches"], 0, "{r}");
            let s = env.get("vm").await;
            if s.fault_worker as usize == worker {
                break;
            }
            assert!(Instant::now() < deadline, "never moved beside CPU {cpu}: {s:?}");
        }
    }
    let r = vm_cmd(&mut vm, "verify").await;
    assert_eq!(r["mismatches"], 0, "{r}");
    env.graduate("vm").await;
    let r = vm_cmd(&mut vm, "verify").await;
    assert_eq!(r["mismatches"], 0, "{r}");
}

/// The two flags that choose the workers exclude each other, with a reason.
#[test]
fn follow_vcpus_and_a_worker_count_are_refused_together() {
    let out = std::process::Command::new(testkit::binary("uffd-pager"))
        .args(["--grpc-socket", "/nonexistent/g", "--handoff-socket", "/nonexistent/h"])
        .args(["--follow-vcpus", "--fault-threads", "3"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("exclude each other"), "{err}");
}
