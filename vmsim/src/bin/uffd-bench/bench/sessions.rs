//! `sessions_1000`: many small VMs restored concurrently through one pager version, each
//! touched and verified while served, then all graduated and verified byte for byte. Measured
//! on the way: the wall times, the pager's threads (sampled throughout) and its resident memory
//! per session, and how long WatchSessions takes to deliver its first SNAPSHOT with every
//! session live (`watch_snapshot_ms`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tonic::transport::Channel;
use uffdpager::api::supervisor_client::SupervisorClient;
use uffdpager::api::{
    CompleteSessionRequest, ListSessionsRequest, SessionEventType, SessionState,
    WatchSessionsRequest,
};
use vmsim::{Amount, GuestRegionSpec, Vm};

use super::procstat::ProcStatus;
use super::supervisor::{on_vm, Binaries, Project};
use super::Figures;

/// What to run.
#[derive(Debug, Clone)]
pub struct SessionsPlan {
    pub count: usize,
    /// Bytes per VM.
    pub size: u64,
    /// Random pages each VM touches (and verifies) while served.
    pub touches: u64,
    /// WatchSessions calls timed.
    pub watch_reps: usize,
    /// CompleteSession calls in flight at once.
    pub complete_concurrency: usize,
}

/// Threads that restore, touch and verify VMs (blocking work).
const VM_THREADS: usize = 4;
/// CreateSession calls in flight at once.
const CREATE_CONCURRENCY: usize = 16;

fn id(i: usize) -> String {
    format!("bench-s-{i:05}")
}

/// The pager's thread count and anonymous memory, sampled every few milliseconds.
struct Sampler {
    stop: Arc<AtomicBool>,
    max_threads: Arc<AtomicU64>,
    max_anon: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Sampler {
    fn start(pid: i32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let max_threads = Arc::new(AtomicU64::new(0));
        let max_anon = Arc::new(AtomicU64::new(0));
        let task = {
            let (stop, max_threads, max_anon) =
                (stop.clone(), max_threads.clone(), max_anon.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(s) = ProcStatus::of(pid) {
                        max_threads.fetch_max(s.threads, Ordering::Relaxed);
                        max_anon.fetch_max(s.rss_anon, Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
        };
        Self { stop, max_threads, max_anon, task }
    }

    async fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        (self.max_threads.load(Ordering::Relaxed), self.max_anon.load(Ordering::Relaxed))
    }
}

/// Counts, per outcome, the sessions `ids` (by index) not yet settled.
async fn wait_served(
    client: &mut SupervisorClient<Channel>,
    restored: &[bool],
) -> anyhow::Result<(usize, usize)> {
    let want = restored.iter().filter(|r| **r).count();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let list = client
            .list_sessions(ListSessionsRequest {})
            .await
            .context("ListSessions")?
            .into_inner();
        let (mut served, mut failed) = (0, 0);
        for s in &list.sessions {
            let Some(i) = s.id.strip_prefix("bench-s-").and_then(|n| n.parse::<usize>().ok())
            else {
                continue;
            };
            if !restored.get(i).copied().unwrap_or(false) {
                continue;
            }
            match s.state() {
                SessionState::Serving => served += 1,
                SessionState::Failed | SessionState::Ended => failed += 1,
                _ => {}
            }
        }
        if served + failed >= want || Instant::now() > deadline {
            return Ok((served, failed));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Time to the end of WatchSessions' first SNAPSHOT, and the sessions it listed.
async fn watch_snapshot(client: &mut SupervisorClient<Channel>) -> anyhow::Result<(f64, usize)> {
    let started = Instant::now();
    let mut stream =
        client.watch_sessions(WatchSessionsRequest {}).await.context("WatchSessions")?.into_inner();
    let mut listed = 0;
    while let Some(ev) = stream.message().await.context("WatchSessions stream")? {
        if ev.r#type() == SessionEventType::Snapshot {
            if ev.session.is_none() {
                return Ok((started.elapsed().as_secs_f64() * 1000.0, listed));
            }
            listed += 1;
        }
    }
    bail!("WatchSessions ended before its snapshot did");
}

/// Splits `items` into `n` nearly equal parts.
fn split<T>(items: Vec<T>, n: usize) -> Vec<Vec<T>> {
    let per = items.len().div_ceil(n.max(1)).max(1);
    let mut parts: Vec<Vec<T>> = Vec::new();
    for (k, item) in items.into_iter().enumerate() {
        if k % per == 0 {
            parts.push(Vec::with_capacity(per));
        }
        parts.last_mut().expect("a part").push(item);
    }
    parts
}

/// Runs the whole scenario and records its figures.
pub async fn run(
    bins: &Binaries,
    runtime_dir: &Path,
    file: &Path,
    plan: &SessionsPlan,
    f: &mut Figures,
) -> anyhow::Result<()> {
    let n = plan.count;
    let p = Project::start(bins, runtime_dir).await?;
    let pid = p.pager_pid().await?;
    let idle = ProcStatus::of(pid).context("reading the idle pager's status")?;
    let sampler = Sampler::start(pid);
    let mut errors = 0usize;
    let started = Instant::now();

    // 1. Sessions, created concurrently.
    let limit = Arc::new(Semaphore::new(CREATE_CONCURRENCY));
    let mut creates = JoinSet::new();
    for i in 0..n {
        let (mut client, limit) = (p.client(), limit.clone());
        let file = file.display().to_string();
        creates.spawn(async move {
            let _permit = limit.acquire_owned().await;
            let s = client
                .create_session(uffdpager::api::CreateSessionRequest {
                    session_id: id(i),
                    memory_file: file,
                    labels: Default::default(),
                    ..Default::default()
                })
                .await;
            (i, s.map(|s| PathBuf::from(s.into_inner().socket_path)))
        });
    }
    let mut sockets: Vec<Option<PathBuf>> = vec![None; n];
    while let Some(joined) = creates.join_next().await {
        match joined.context("CreateSession task")? {
            (i, Ok(path)) => sockets[i] = Some(path),
            (i, Err(e)) => {
                errors += 1;
                eprintln!("uffd-bench: CreateSession {}: {e}", id(i));
            }
        }
    }

    // 2. The VMs, restored from a few threads.
    let spec = GuestRegionSpec { size: plan.size, page_size: 4096, offset: 0 };
    let todo: Vec<(usize, PathBuf)> =
        sockets.iter().enumerate().filter_map(|(i, s)| Some((i, s.clone()?))).collect();
    let mut restoring = JoinSet::new();
    for part in split(todo, VM_THREADS) {
        let file = file.to_path_buf();
        restoring.spawn(on_vm("restoring VMs", move || {
            part.into_iter()
                .map(|(i, socket)| (i, Vm::restore(&socket, &file, &[spec])))
                .collect::<Vec<_>>()
        }));
    }
    let mut vms: Vec<(usize, Vm)> = Vec::with_capacity(n);
    let mut restored = vec![false; n];
    while let Some(joined) = restoring.join_next().await {
        for (i, vm) in joined.context("restore task")?? {
            match vm {
                Ok(vm) => {
                    restored[i] = true;
                    vms.push((i, vm));
                }
                Err(e) => {
                    errors += 1;
                    eprintln!("uffd-bench: restoring {}: {e}", id(i));
                }
            }
        }
    }
    let mut client = p.client();
    let (served, failed) = wait_served(&mut client, &restored).await?;
    errors += failed;
    let restore_s = started.elapsed().as_secs_f64();

    // 3. Every VM touches and verifies a few random pages while served.
    let touches = plan.touches;
    let mut touching = JoinSet::new();
    for part in split(vms, VM_THREADS) {
        touching.spawn(on_vm("touching VMs", move || {
            let mismatches: u64 = part
                .iter()
                .map(|(i, vm)| vm.read_random(Amount::Pages(touches), *i as u64).mismatches)
                .sum();
            (part, mismatches)
        }));
    }
    let mut vms = Vec::with_capacity(n);
    let mut mismatches = 0;
    while let Some(joined) = touching.join_next().await {
        let (part, bad) = joined.context("touch task")??;
        mismatches += bad;
        vms.extend(part);
    }
    let at_n = ProcStatus::of(pid).context("reading the pager's status")?;

    // 4. WatchSessions' first SNAPSHOT with every session live.
    for _ in 0..plan.watch_reps {
        let (ms, listed) = watch_snapshot(&mut client).await?;
        if listed < served {
            bail!("WatchSessions' snapshot listed {listed} sessions, {served} are served");
        }
        f.add("watch_snapshot_ms", ms);
    }

    // 5. Graduate them all, a few at a time; verify each graduated VM byte for byte.
    let graduating = Instant::now();
    let limit = Arc::new(Semaphore::new(plan.complete_concurrency.max(1)));
    let mut completes = JoinSet::new();
    for (i, vm) in vms {
        let (mut client, limit) = (p.client(), limit.clone());
        completes.spawn(async move {
            let _permit = limit.acquire_owned().await;
            let done = client
                .complete_session(CompleteSessionRequest { session_id: id(i) })
                .await
                .map_err(|e| format!("CompleteSession {}: {e}", id(i)))?
                .into_inner();
            let state = done.session.as_ref().map(|s| s.state());
            if state != Some(SessionState::Graduated) {
                return Err(format!("CompleteSession {} left it {state:?}", id(i)));
            }
            let report = on_vm("verifying a graduated VM", move || vm.verify_all())
                .await
                .map_err(|e| format!("{}: {e:#}", id(i)))?;
            Ok(report.mismatches)
        });
    }
    let mut graduated = 0usize;
    while let Some(joined) = completes.join_next().await {
        match joined.context("completion task")? {
            Ok(bad) => {
                graduated += 1;
                mismatches += bad;
            }
            Err(e) => {
                errors += 1;
                eprintln!("uffd-bench: {e}");
            }
        }
    }
    let graduate_s = graduating.elapsed().as_secs_f64();
    let wall_s = started.elapsed().as_secs_f64();
    let (threads_max, anon_peak) = sampler.finish().await;
    let after = ProcStatus::of(pid).ok();

    let pages = plan.size / 4096;
    let kib = |bytes: f64| bytes / 1024.0;
    let per = |a: u64, b: u64| kib(a.saturating_sub(b) as f64 / n.max(1) as f64);
    f.add("sessions_count", n as f64);
    f.add("sessions_served", served as f64);
    f.add("sessions_graduated", graduated as f64);
    f.add("sessions_errors", errors as f64);
    f.add("sessions_mismatches", mismatches as f64);
    f.add("sessions_restore_s", restore_s);
    f.add("sessions_graduate_s", graduate_s);
    f.add("sessions_wall_s", wall_s);
    f.add("pager_threads_idle", idle.threads as f64);
    f.add("pager_threads_at_n", at_n.threads as f64);
    f.add("pager_threads_max", threads_max.max(at_n.threads) as f64);
    f.add("pager_rss_per_session_kib", per(at_n.vm_rss, idle.vm_rss));
    f.add("pager_anon_per_session_kib", per(at_n.rss_anon, idle.rss_anon));
    f.add("pager_anon_limit_kib", 64.0 + kib(pages as f64 / 8.0));
    f.add("pager_anon_idle_mib", kib(kib(idle.rss_anon as f64)));
    f.add("pager_anon_peak_mib", kib(kib(anon_peak.max(at_n.rss_anon) as f64)));
    if let Some(after) = after {
        f.add("pager_anon_after_mib", kib(kib(after.rss_anon as f64)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::split;

    #[test]
    fn split_keeps_every_item_in_order_in_at_most_n_parts() {
        let parts = split((0..10).collect(), 4);
        assert_eq!(parts.len(), 4);
        assert_eq!(parts.concat(), (0..10).collect::<Vec<_>>());
        assert!(split(Vec::<u8>::new(), 4).is_empty());
        assert_eq!(split(vec![1], 4), vec![vec![1]]);
    }
}
