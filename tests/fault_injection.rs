//! Fault injection, seeded and bounded in time: simulated VMs that verify every byte they read
//! (a background reader each, plus foreground reads, writes and balloon discards) while the test
//! kills pagers with SIGKILL, deploys versions, completes sessions with short deadlines, discards
//! memory during graduations, and stops the supervisor with SIGTERM or SIGKILL and starts it
//! again on the same runtime directory. After every step each VM must answer (no frozen VM); at
//! the end every VM verifies all of its memory, and once they have exited neither the supervisor
//! nor any pager holds a uffd, a memory file or a removed-ranges log (no leak).
//!
//! In the suite it runs for `UFFD_FAULT_BUDGET_SECS` (default 60) seconds; run it longer by hand
//! with a bigger budget, and another `UFFD_FAULT_SEED` (default 13) for other schedules:
//!
//! ```sh
//! UFFD_FAULT_BUDGET_SECS=600 UFFD_FAULT_SEED=7 cargo test --release --test fault_injection
//! ```
//!
//! An operator's part is played too: when no version runs, or a session is ORPHANED, a version
//! is deployed (that is what adopts orphans).

mod common;
mod versions_support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{vm_cmd, vm_cmd_within, Env, MIB, STEP};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use testkit::{SupervisorProcess, VmProcess};
use uffdpager::api::{CompleteSessionRequest, SessionState, VersionState};
use versions_support::{deploy, options, pager_binary, sessions, versions};

/// Most VMs alive at once.
const MAX_VMS: usize = 4;
/// Most pager versions deployed over a run (each is a process while it serves something).
const MAX_DEPLOYS: u32 = 12;
const MEM_SIZE: u64 = 32 * MIB;

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// One VM and what the test knows of it.
struct Vm {
    process: VmProcess,
    graduated: bool,
}

/// What the run did, for the log line at the end.
#[derive(Debug, Default)]
struct Tally {
    steps: u32,
    restores: u32,
    refused_restores: u32,
    pager_kills: u32,
    deploys: u32,
    completions: u32,
    graduations: u32,
    balloons: u32,
    balloons_during_graduation: u32,
    writes: u32,
    sigterms: u32,
    sigkills: u32,
    exits: u32,
    orphan_rescues: u32,
}

struct Run {
    env: Env,
    rng: SmallRng,
    mems: Vec<PathBuf>,
    vms: BTreeMap<String, Vm>,
    next_vm: u32,
    next_version: u32,
    generation: u32,
    tally: Tally,
}

impl Run {
    fn pick_vm(&mut self, serving_only: bool) -> Option<String> {
        let ids: Vec<String> = self
            .vms
            .iter()
            .filter(|(_, v)| !serving_only || !v.graduated)
            .map(|(id, _)| id.clone())
            .collect();
        (!ids.is_empty()).then(|| ids[self.rng.gen_range(0..ids.len())].clone())
    }

    async fn restore(&mut self) {
        if self.vms.len() >= MAX_VMS {
            return;
        }
        let id = format!("vm-{}", self.next_vm);
        self.next_vm += 1;
        let mem = self.mems[self.rng.gen_range(0..self.mems.len())].clone();
        let created = self
            .env
            .client()
            .create_session(uffdpager::api::CreateSessionRequest {
                session_id: id.clone(),
                memory_file: mem.display().to_string(),
                labels: Default::default(),
                ..Default::default()
            })
            .await;
        let session = match created {
            Ok(s) => s.into_inner(),
            Err(e) => {
                // No version that could serve it (the active one FAILED): an operator's answer
                // is a deploy, which the loop makes.
                assert_eq!(e.code(), tonic::Code::Unavailable, "CreateSession {id}: {e:?}");
                self.tally.refused_restores += 1;
                return;
            }
        };
        let socket = PathBuf::from(session.socket_path);
        let mut process = tokio::task::spawn_blocking(move || {
            VmProcess::restore(&testkit::binary("uffd-vmsim"), &socket, &mem, &[], STEP)
        })
        .await
        .unwrap()
        .expect("VM restores");
        let seed = self.rng.gen::<u32>();
        vm_cmd_within(&mut process, &format!("reader-start {seed}"), STEP, "reader-start").await;
        self.vms.insert(id, Vm { process, graduated: false });
        self.tally.restores += 1;
    }

    async fn balloon(&mut self) {
        let Some(id) = self.pick_vm(false) else { return };
        let (offset, len) = self.range();
        let vm = self.vms.get_mut(&id).unwrap();
        vm_cmd(&mut vm.process, &format!("balloon 0 {offset} {len}")).await;
        self.tally.balloons += 1;
    }

    async fn write(&mut self) {
        let Some(id) = self.pick_vm(false) else { return };
        let pages = MEM_SIZE / 4096;
        let first = self.rng.gen_range(0..pages - 64);
        let count = self.rng.gen_range(1..64);
        self.generation += 1;
        let gen = self.generation;
        let vm = self.vms.get_mut(&id).unwrap();
        vm_cmd(&mut vm.process, &format!("write {first} {count} {gen}")).await;
        self.tally.writes += 1;
    }

    /// A MiB-aligned range of the guest: (offset, length).
    fn range(&mut self) -> (u64, u64) {
        let mibs = MEM_SIZE / MIB;
        let start = self.rng.gen_range(0..mibs - 1);
        let len = self.rng.gen_range(1..=(mibs - start).min(4));
        (start * MIB, len * MIB)
    }

    async fn kill_pager(&mut self) {
        let list = versions(&self.env).await;
        let running: Vec<u32> = list
            .versions
            .iter()
            .filter(|v| {
                matches!(v.state(), VersionState::Active | VersionState::Draining) && v.pid > 0
            })
            .map(|v| v.pid)
            .collect();
        if running.is_empty() {
            return;
        }
        let pid = running[self.rng.gen_range(0..running.len())];
        // It may have exited on its own meanwhile (drained): that is fine.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
            nix::sys::signal::Signal::SIGKILL,
        );
        self.tally.pager_kills += 1;
    }

    async fn deploy(&mut self) {
        if self.next_version > MAX_DEPLOYS {
            return;
        }
        let label = format!("v{}", self.next_version);
        self.next_version += 1;
        deploy(&self.env, &pager_binary(), &label)
            .await
            .unwrap_or_else(|e| panic!("DeployVersion {label}: {e:?}"));
        self.tally.deploys += 1;
    }

    /// CompleteSession with a short deadline: it graduates, or fails and the VM serves on.
    async fn complete(&mut self, balloon_meanwhile: bool) {
        let Some(id) = self.pick_vm(true) else { return };
        let limit = Duration::from_millis(self.rng.gen_range(5..400));
        let mut client = self.env.client();
        let sid = id.clone();
        let call = tokio::spawn(async move {
            let mut req = tonic::Request::new(CompleteSessionRequest { session_id: sid });
            req.set_timeout(limit);
            client.complete_session(req).await
        });
        if balloon_meanwhile {
            let (offset, len) = self.range();
            let vm = self.vms.get_mut(&id).unwrap();
            vm_cmd(&mut vm.process, &format!("balloon 0 {offset} {len}")).await;
            self.tally.balloons_during_graduation += 1;
        }
        self.tally.completions += 1;
        match call.await.unwrap() {
            Ok(done) => {
                let done = done.into_inner();
                let state = done.session.as_ref().map(|s| s.state());
                assert_eq!(state, Some(SessionState::Graduated), "{done:?}");
                self.vms.get_mut(&id).unwrap().graduated = true;
                self.tally.graduations += 1;
            }
            Err(e) if e.code() == tonic::Code::NotFound => {
                // An earlier call ran out of the client's time but graduated the session, and a
                // supervisor restart since forgot it (a restart keeps no session its pagers had
                // released: see the README). Then, and only then, the kernel says the VM has no
                // uffd-registered memory left.
                assert!(
                    self.tally.sigterms + self.tally.sigkills > 0,
                    "CompleteSession {id}: {e:?}"
                );
                let vm = self.vms.get_mut(&id).unwrap();
                let smaps =
                    tokio::task::block_in_place(|| vm.process.command("smaps", STEP)).unwrap();
                assert_eq!(smaps["registered_vmas"], 0, "{id} is unknown yet registered: {e:?}");
                vm.graduated = true;
                self.tally.graduations += 1;
            }
            Err(e) => {
                use tonic::Code::*;
                // Ran out of time, or its pager died or it is being re-adopted / ORPHANED: it
                // keeps serving (checked below by reading).
                assert!(
                    matches!(e.code(), DeadlineExceeded | Cancelled | Unavailable),
                    "CompleteSession {id}: {e:?}"
                );
            }
        }
    }

    async fn restart_supervisor(&mut self, sigkill: bool) {
        let mut sup = self.env.sup.take().unwrap();
        if sigkill {
            sup.kill().await.unwrap();
            self.tally.sigkills += 1;
        } else {
            assert!(sup.terminate().await.unwrap().success(), "a clean SIGTERM exit");
            self.tally.sigterms += 1;
        }
        let sup = SupervisorProcess::start(
            &testkit::binary("uffd-supervisor"),
            &self.env.run_dir(),
            &options("v1"),
        )
        .await
        .expect("supervisor restarts");
        self.env.sup = Some(sup);
    }

    async fn exit_vm(&mut self) {
        let Some(id) = self.pick_vm(false) else { return };
        let mut vm = self.vms.remove(&id).unwrap();
        vm_cmd(&mut vm.process, "reader-stop").await;
        vm_cmd(&mut vm.process, "verify").await;
        tokio::task::block_in_place(|| vm.process.exit()).unwrap();
        self.tally.exits += 1;
    }

    /// The operator's part: a version for sessions no version can serve.
    async fn rescue_orphans(&mut self) {
        let listed = sessions(&self.env).await;
        let orphaned = listed.sessions.iter().any(|s| s.state() == SessionState::Orphaned);
        let list = versions(&self.env).await;
        let active_fails = list
            .versions
            .iter()
            .find(|v| v.version == list.active_version)
            .is_none_or(|v| v.state() == VersionState::Failed);
        if (orphaned || active_fails) && self.next_version <= MAX_DEPLOYS {
            self.deploy().await;
            self.tally.orphan_rescues += 1;
        }
    }

    /// No VM is frozen: each answers a verified read of random pages in time.
    async fn all_answer(&mut self, step: &str) {
        for (id, vm) in &mut self.vms {
            vm_cmd_within(&mut vm.process, "read-random 16", STEP, &format!("{id} after {step}"))
                .await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vms_read_only_right_bytes_and_never_freeze_under_kills_deploys_completions_and_restarts() {
    let budget = Duration::from_secs(env_number("UFFD_FAULT_BUDGET_SECS", 60));
    let seed = env_number("UFFD_FAULT_SEED", 13);
    eprintln!("fault injection: seed {seed}, budget {budget:?}");
    let env = Env::start_with(options("v1")).await;
    let mems =
        vec![env.memfile("mem-a", MEM_SIZE, 0.2, 0.2), env.memfile("mem-b", MEM_SIZE, 0.0, 0.5)];
    let mut run = Run {
        env,
        rng: SmallRng::seed_from_u64(seed),
        mems,
        vms: BTreeMap::new(),
        next_vm: 0,
        next_version: 2,
        generation: 0,
        tally: Tally::default(),
    };
    for _ in 0..2 {
        run.restore().await;
    }
    let started = Instant::now();
    while started.elapsed() < budget {
        let roll = run.rng.gen_range(0..100);
        let step = match roll {
            0..=17 => {
                run.restore().await;
                "restore"
            }
            18..=29 => {
                run.kill_pager().await;
                "kill -9 of a pager"
            }
            30..=37 => {
                run.deploy().await;
                "deploy"
            }
            38..=51 => {
                run.complete(false).await;
                "completion"
            }
            52..=59 => {
                run.complete(true).await;
                "balloon during a completion"
            }
            60..=69 => {
                run.balloon().await;
                "balloon"
            }
            70..=79 => {
                run.write().await;
                "write"
            }
            80..=85 => {
                run.restart_supervisor(false).await;
                "SIGTERM and restart of the supervisor"
            }
            86..=91 => {
                run.restart_supervisor(true).await;
                "SIGKILL and restart of the supervisor"
            }
            _ => {
                run.exit_vm().await;
                "VM exit"
            }
        };
        run.tally.steps += 1;
        run.rescue_orphans().await;
        run.all_answer(step).await;
    }
    eprintln!("fault injection: {:?} in {:?}", run.tally, started.elapsed());

    // Every VM verifies all its memory, its reader found no wrong byte; then they exit.
    for (_, mut vm) in std::mem::take(&mut run.vms) {
        vm_cmd(&mut vm.process, "reader-stop").await;
        vm_cmd(&mut vm.process, "verify").await;
        tokio::task::block_in_place(|| vm.process.exit()).unwrap();
    }
    // Once every session has finished, nothing holds a uffd, a memory file or a removed log.
    let deadline = Instant::now() + STEP;
    loop {
        let listed = sessions(&run.env).await;
        let open = listed.sessions.iter().filter(|s| {
            matches!(
                s.state(),
                SessionState::Pending
                    | SessionState::Serving
                    | SessionState::Completing
                    | SessionState::Orphaned
            )
        });
        if open.count() == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "sessions never finished: {listed:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let sessions_dir = run.env.run_dir().join("sessions");
    let mut files: Vec<PathBuf> = run.mems.clone();
    files.push(sessions_dir.clone());
    let files: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
    let mut pids = vec![i32::try_from(run.env.sup().pid().unwrap()).unwrap()];
    pids.extend(testkit::pager_pids(&run.env.run_dir()));
    let deadline = Instant::now() + STEP;
    for pid in pids {
        while let Ok(h) = testkit::procfs::holdings(pid, &files) {
            if h.uffds == 0 && h.file_fds == 0 && h.file_maps == 0 {
                break;
            }
            assert!(Instant::now() < deadline, "pid {pid} still holds {h:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let logs: Vec<_> = std::fs::read_dir(&sessions_dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".removed"))
        .map(|e| e.file_name())
        .collect();
    let listed = sessions(&run.env).await;
    assert!(
        logs.is_empty(),
        "removed-ranges logs of finished sessions are left: {logs:?}; sessions: {:#?}",
        listed.sessions.iter().map(|s| (&s.id, s.state(), &s.error)).collect::<Vec<_>>()
    );
    // (Pagers left over are killed with the supervisor when `Env` drops.)
}
