//! The real peers, side by side with the project on the same VM shapes, interleaved round by
//! round in one run (issue 15):
//!
//! - `project`: the real supervisor and pager (a session per VM);
//! - `on_demand`: Firecracker v1.16.1's `uffd_on_demand_handler`, one process per VM, one page
//!   per fault;
//! - `fault_all`: its `uffd_fault_all_handler`, which populates the whole guest on the first
//!   fault (single-VM workloads only);
//! - `file`: the kernel's `MAP_PRIVATE` mapping of the memory file (Firecracker's `File`
//!   backend), the ceiling of lazy restore.
//!
//! Every uffd contender's VM is a `uffd-vmsim run` process of its own (see [`vmproc`]); the
//! file contender runs in this process ([`file_backend`]). Workloads: distinct random 4 KiB
//! first touches on a fresh VM of the dense file (p50, p99); touch-all (read and verify every
//! page in order, GB/s); many VMs of a small dense file restored, then all touching random pages
//! at once (wall until the last is done; each VM's p99, median over VMs). Firecracker's
//! handlers are not part of the project: their directory comes from `--peers-dir` or
//! `UFFD_BENCH_PEERS`, and without it the peer contenders are skipped (and the report says so).

pub mod file_backend;
pub mod report;
pub mod vmproc;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use uffdpager::api::SessionState;
use vmsim::Report;

use self::vmproc::{PeerHandler, VmProc};
use super::stats::{gbps, median};
use super::supervisor::Project;
use super::Figures;

/// The environment variable naming the peers' directory when `--peers-dir` is not given.
pub const PEERS_ENV: &str = "UFFD_BENCH_PEERS";
const ON_DEMAND: &str = "uffd_on_demand_handler";
const FAULT_ALL: &str = "uffd_fault_all_handler";

/// One contender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Contender {
    Project,
    OnDemand,
    FaultAll,
    File,
}

impl Contender {
    pub const ALL: [Contender; 4] =
        [Contender::Project, Contender::OnDemand, Contender::FaultAll, Contender::File];

    pub fn name(self) -> &'static str {
        match self {
            Contender::Project => "project",
            Contender::OnDemand => "on_demand",
            Contender::FaultAll => "fault_all",
            Contender::File => "file",
        }
    }
}

/// Where Firecracker's example handlers are, or why the peer contenders are skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerSource {
    Found { on_demand: PathBuf, fault_all: PathBuf },
    Skipped(String),
}

impl PeerSource {
    /// From `--peers-dir` (first) or the environment variable's value.
    pub fn resolve(flag: Option<&Path>, env: Option<&std::ffi::OsStr>) -> PeerSource {
        let (dir, from) = match (flag, env) {
            (Some(d), _) => (d.to_path_buf(), "--peers-dir"),
            (None, Some(e)) if !e.is_empty() => (PathBuf::from(e), PEERS_ENV),
            _ => {
                return PeerSource::Skipped(format!(
                    "peer contenders (Firecracker's on_demand and fault_all handlers) skipped: \
                     neither --peers-dir nor {PEERS_ENV} names their directory"
                ))
            }
        };
        let (on_demand, fault_all) = (dir.join(ON_DEMAND), dir.join(FAULT_ALL));
        for b in [&on_demand, &fault_all] {
            if !b.is_file() {
                return PeerSource::Skipped(format!(
                    "peer contenders skipped: {} (from {from}) does not exist",
                    b.display()
                ));
            }
        }
        PeerSource::Found { on_demand, fault_all }
    }

    fn binary(&self, c: Contender) -> Option<&Path> {
        match (self, c) {
            (PeerSource::Found { on_demand, .. }, Contender::OnDemand) => Some(on_demand),
            (PeerSource::Found { fault_all, .. }, Contender::FaultAll) => Some(fault_all),
            _ => None,
        }
    }
}

/// What the peer comparison runs.
#[derive(Debug, Clone)]
pub struct PeersPlan {
    pub source: PeerSource,
    pub vmsim: PathBuf,
    /// Random touches of the single-VM figure.
    pub touches: u64,
    /// VMs of the many-VMs figure, and the random touches of each.
    pub many_vms: usize,
    pub many_touches: u64,
    /// The workloads run (`random`, `touch_all`, `many`; empty: all), and the contenders
    /// (empty: all there are).
    pub workloads: Vec<String>,
    pub contenders: Vec<String>,
}

impl PeersPlan {
    fn runs(&self, workload: &str) -> bool {
        self.workloads.is_empty() || self.workloads.iter().any(|w| w == workload)
    }

    /// The contenders measured this run, in the order of repetition `rep` (rotated, so no
    /// contender always runs first after another's memory was freed).
    fn order(&self, rep: usize, many: bool) -> Vec<Contender> {
        let mut cs: Vec<Contender> = Contender::ALL
            .into_iter()
            .filter(|c| match c {
                Contender::OnDemand => self.source.binary(*c).is_some(),
                Contender::FaultAll => !many && self.source.binary(*c).is_some(),
                _ => true,
            })
            .filter(|c| self.contenders.is_empty() || self.contenders.iter().any(|n| n == c.name()))
            .collect();
        let n = cs.len().max(1);
        cs.rotate_left(rep % n);
        cs
    }
}

/// A VM served by a uffd contender. The handler is dropped (killed) before the VM exits: the
/// field order is the drop order.
#[derive(Debug)]
struct Served {
    _handler: Option<PeerHandler>,
    vm: VmProc,
}

/// Restores a VM of `file` served by `c` (not `File`).
async fn serve(
    project: &Project,
    plan: &PeersPlan,
    dir: &Path,
    c: Contender,
    id: &str,
    file: &Path,
) -> anyhow::Result<Served> {
    let (vmsim, file) = (plan.vmsim.clone(), file.to_path_buf());
    if c == Contender::Project {
        let s = project.create(id, &file).await?;
        let socket = PathBuf::from(s.socket_path);
        let vm = tokio::task::spawn_blocking(move || VmProc::restore(&vmsim, &socket, &file))
            .await
            .context("restore task")??;
        project.wait_state(id, SessionState::Serving).await?;
        return Ok(Served { _handler: None, vm });
    }
    let binary = plan.source.binary(c).context("no such peer")?.to_path_buf();
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let h = PeerHandler::start(&binary, &dir, &file)?;
        let vm = VmProc::restore(&vmsim, &h.socket, &file)?;
        anyhow::Ok(Served { _handler: Some(h), vm })
    })
    .await
    .context("restore task")?
}

/// Runs one command on a served VM, then lets it go.
async fn run_one(served: Served, command: String) -> anyhow::Result<Report> {
    tokio::task::spawn_blocking(move || {
        let mut served = served;
        served.vm.run(&command)
    })
    .await
    .context("VM task")?
}

fn figure(workload: &str, c: Contender) -> String {
    format!("peer_{workload}_{}", c.name())
}

/// One repetition of every workload, every contender.
pub async fn rep(
    project: &Project,
    plan: &PeersPlan,
    dense: &Path,
    small: &Path,
    dir: &Path,
    rep: usize,
    f: &mut Figures,
) -> anyhow::Result<()> {
    let seed = 1000 + rep as u64;
    let random = if plan.runs("random") { plan.order(rep, false) } else { Vec::new() };
    for c in random {
        let (p50, p99) = if c == Contender::File {
            let (path, n) = (dense.to_path_buf(), plan.touches);
            let r =
                tokio::task::spawn_blocking(move || file_backend::random(&path, n, seed)).await??;
            (r.stall_p50_us, r.stall_p99_us)
        } else {
            let id = format!("peer-random-{rep}");
            let served = serve(project, plan, dir, c, &id, dense).await?;
            let r = run_one(served, format!("random {} {seed}", plan.touches)).await?;
            (r.stall_p50_us, r.stall_p99_us)
        };
        f.add(&figure("random_p50_us", c), p50);
        f.add(&figure("random_p99_us", c), p99);
        super::note(&format!(
            "peers rep {rep}: {} random p50 {p50:.1} us p99 {p99:.1} us",
            c.name()
        ));
    }
    let touch = if plan.runs("touch_all") { plan.order(rep, false) } else { Vec::new() };
    for c in touch {
        let g = if c == Contender::File {
            let path = dense.to_path_buf();
            let r = tokio::task::spawn_blocking(move || file_backend::sequential(&path)).await??;
            gbps(r.bytes_read, r.elapsed_ms / 1000.0)
        } else {
            let id = format!("peer-touch-{rep}");
            let served = serve(project, plan, dir, c, &id, dense).await?;
            let r = run_one(served, "seq".into()).await?;
            gbps(r.bytes_read, r.elapsed_ms / 1000.0)
        };
        f.add(&figure("touch_all_gbps", c), g);
        super::note(&format!("peers rep {rep}: {} touch-all {g:.2} GB/s", c.name()));
    }
    let at_once = if plan.runs("many") { plan.order(rep, true) } else { Vec::new() };
    for c in at_once {
        let seed = 3000 + 1000 * rep as u64;
        let (wall, p99s) = if c == Contender::File {
            let (path, n, t) = (small.to_path_buf(), plan.many_vms, plan.many_touches);
            let (wall, runs) =
                tokio::task::spawn_blocking(move || file_backend::many(&path, n, t, seed))
                    .await??;
            (wall, runs.iter().map(|r| r.stall_p99_us).collect::<Vec<_>>())
        } else {
            many(project, plan, dir, c, small, rep, seed).await?
        };
        let p99 = median(&p99s).unwrap_or(0.0) / 1000.0;
        let worst = p99s.iter().copied().fold(0.0, f64::max) / 1000.0;
        f.add(&figure("many_wall_s", c), wall);
        f.add(&figure("many_vm_p99_ms", c), p99);
        f.add(&figure("many_vm_p99_max_ms", c), worst);
        super::note(&format!(
            "peers rep {rep}: {} {} VMs at once: wall {wall:.2} s, per-VM p99 {p99:.2} ms (worst {worst:.2})",
            c.name(),
            plan.many_vms
        ));
    }
    Ok(())
}

/// `plan.many_vms` VMs of `file` served by `c`, all restored first, then all touching random
/// pages at once: the wall time until the last reports, and each VM's p99 (µs).
async fn many(
    project: &Project,
    plan: &PeersPlan,
    dir: &Path,
    c: Contender,
    file: &Path,
    rep: usize,
    seed: u64,
) -> anyhow::Result<(f64, Vec<f64>)> {
    let mut vms = Vec::with_capacity(plan.many_vms);
    for i in 0..plan.many_vms {
        vms.push(serve(project, plan, dir, c, &format!("peer-many-{rep}-{i}"), file).await?);
    }
    let touches = plan.many_touches;
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        for (i, s) in vms.iter_mut().enumerate() {
            s.vm.send(&format!("random {touches} {}", seed + i as u64))?;
        }
        let mut p99s = Vec::with_capacity(vms.len());
        for s in &mut vms {
            p99s.push(s.vm.report()?.stall_p99_us);
        }
        let wall = started.elapsed().as_secs_f64();
        if p99s.is_empty() {
            bail!("no VM ran");
        }
        drop(vms);
        anyhow::Ok((wall, p99s))
    })
    .await
    .context("VM task")?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_peers_directory_the_peer_contenders_are_skipped_saying_how_to_name_it() {
        let PeerSource::Skipped(why) = PeerSource::resolve(None, None) else { panic!() };
        assert!(why.contains("--peers-dir") && why.contains(PEERS_ENV), "{why}");
        let dir = tempfile::tempdir().unwrap();
        let PeerSource::Skipped(why) = PeerSource::resolve(Some(dir.path()), None) else {
            panic!()
        };
        assert!(why.contains(ON_DEMAND), "{why}");
        for b in [ON_DEMAND, FAULT_ALL] {
            std::fs::write(dir.path().join(b), b"").unwrap();
        }
        let env = dir.path().as_os_str();
        assert!(matches!(PeerSource::resolve(None, Some(env)), PeerSource::Found { .. }));
    }

    #[test]
    fn contenders_rotate_between_repetitions_and_fault_all_stays_out_of_the_many_vms_figure() {
        let plan = |source| PeersPlan {
            source,
            vmsim: PathBuf::new(),
            touches: 1,
            many_vms: 1,
            many_touches: 1,
            workloads: Vec::new(),
            contenders: Vec::new(),
        };
        let found = PeerSource::Found { on_demand: "a".into(), fault_all: "b".into() };
        let p = plan(found);
        assert_eq!(p.order(0, false), Contender::ALL.to_vec());
        assert_eq!(p.order(1, false)[0], Contender::OnDemand);
        assert!(!p.order(0, true).contains(&Contender::FaultAll));
        let skipped = plan(PeerSource::Skipped("x".into()));
        assert_eq!(skipped.order(0, false), vec![Contender::Project, Contender::File]);
        let mut two = plan(PeerSource::Found { on_demand: "a".into(), fault_all: "b".into() });
        two.contenders = vec!["project".into(), "on_demand".into()];
        assert_eq!(two.order(1, false), vec![Contender::OnDemand, Contender::Project]);
    }
}
