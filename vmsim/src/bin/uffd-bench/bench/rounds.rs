//! One round of each group of figures: the baselines, the project's single-VM figures, the
//! peers and the working-set replay, each measured on the run's shared memory files.

use anyhow::Context;

use super::memfiles::MemoryFiles;
use super::min_handler::{Placement, Workload};
use super::stats::gbps;
use super::supervisor::Project;
use super::{
    baseline, latest, min_handler, note, peers, placement, project, record, supervisor,
    unique_suffix, working_set, Figures, Group, Plan,
};

pub(super) async fn baselines(
    plan: &Plan,
    files: &MemoryFiles,
    dir: &std::path::Path,
    figures: &mut Figures,
    errors: &mut Vec<String>,
) {
    let Some(dense) = files.dense.clone() else { return };
    let reps = plan.reps;
    if plan.has(Group::Memcpy) || plan.has(Group::RawCopy) {
        let (memcpy, raw) = (plan.has(Group::Memcpy), plan.has(Group::RawCopy));
        let result = tokio::task::spawn_blocking(move || {
            let src = baseline::MappedFile::open(&dense)?;
            std::hint::black_box(src.touch());
            let m = if memcpy { baseline::memcpy(&src, reps)? } else { Vec::new() };
            let r = if raw { baseline::raw_copy(&src, reps)? } else { Vec::new() };
            anyhow::Ok((m, r))
        })
        .await
        .context("baseline task");
        match result.and_then(|r| r) {
            Ok((m, r)) => {
                m.iter().for_each(|v| figures.add("memcpy_gbps", *v));
                r.iter().for_each(|v| figures.add("raw_copy_gbps", *v));
                note(&format!("memcpy {m:.2?} GB/s, raw UFFDIO_COPY {r:.2?} GB/s"));
            }
            Err(e) => record(errors, "memcpy/raw_copy", Err(e)),
        }
    }
    if plan.has(Group::MinHandler) {
        let r = min_handler_figures(plan, files, dir, figures).await;
        record(errors, "min_handler", r);
    }
}

/// The minimal handler's figures. Its latency depends on placement more than on anything else
/// (a wake-up that crosses CPUs costs several times one that stays), and an unpinned pair lands
/// either way for a whole run: so the baseline is the handler at its best, VM thread and handler
/// pinned to one CPU (`min_fault_us`, `min_touch_all_gbps`); unpinned (`*_free_*`, what
/// Firecracker's example handler gets by default) and cross-CPU figures are reported beside it.
pub(super) async fn min_handler_figures(
    plan: &Plan,
    files: &MemoryFiles,
    dir: &std::path::Path,
    f: &mut Figures,
) -> anyhow::Result<()> {
    let dense = files.dense.clone().context("no dense memory file")?;
    // On one CPU everything is on one CPU: "pinned" and "free" are the same run.
    let (same, cross) = match placement::one_cpu() {
        Some(cpu) => (
            Placement { vm_cpu: Some(cpu), handler_cpu: Some(cpu) },
            Some(Placement { vm_cpu: Some(0), handler_cpu: Some(cpu) }),
        ),
        None => (Placement::FREE, None),
    };
    for rep in 0..plan.reps {
        let (dir, size, touches) = (dir.to_path_buf(), plan.size, plan.fault_touches);
        let dense = dense.clone();
        let runs = tokio::task::spawn_blocking(move || {
            let limit = supervisor::VM_STEP;
            let run = |workload, placement| {
                min_handler::run(&dir, &dense, size, workload, placement, limit)
            };
            let random = Workload::Random { pages: touches, seed: 1000 + rep as u64 };
            let best = run(random, same)?;
            let free = run(random, Placement::FREE)?;
            let cross = cross.map(|c| run(random, c)).transpose()?;
            let seq = run(Workload::Sequential, same)?;
            let seq_free = run(Workload::Sequential, Placement::FREE)?;
            anyhow::Ok((best, free, cross, seq, seq_free))
        })
        .await
        .context("minimal handler task")??;
        let (best, free, cross, seq, seq_free) = runs;
        let touch = |r: &vmsim::Report| gbps(r.bytes_read, r.elapsed_ms / 1000.0);
        f.add("min_fault_us", best.first.stall_p50_us);
        f.add("min_fault_p99_us", best.first.stall_p99_us);
        f.add("min_fault_free_us", free.first.stall_p50_us);
        f.add("min_fault_free_p99_us", free.first.stall_p99_us);
        if let Some(cross) = &cross {
            f.add("min_fault_cross_cpu_us", cross.first.stall_p50_us);
        }
        f.add("min_touch_all_gbps", touch(&seq.first));
        f.add("min_touch_all_free_gbps", touch(&seq_free.first));
        if let Some(resident) = &seq.resident {
            f.add("touch_resident_gbps", touch(resident));
        }
        note(&format!(
            "minimal handler rep {rep}: fault p50 {:.1} us one CPU, {:.1} us free; \
             touch-all {:.2} GB/s one CPU, {:.2} GB/s free",
            best.first.stall_p50_us,
            free.first.stall_p50_us,
            touch(&seq.first),
            touch(&seq_free.first)
        ));
    }
    Ok(())
}

pub(super) async fn project(
    plan: &Plan,
    files: &MemoryFiles,
    dir: &std::path::Path,
    figures: &mut Figures,
    errors: &mut Vec<String>,
) {
    use Group::*;
    let wanted: Vec<Group> =
        [Fault, TouchAll, CompleteDense, CompleteSparse, CompleteScattered, Stall, Rpc]
            .into_iter()
            .filter(|g| plan.has(*g))
            .collect();
    if wanted.is_empty() {
        return;
    }
    let runtime_dir = dir.join(format!("run-project-{}", unique_suffix()));
    let p = match Project::start(&plan.bins, &runtime_dir).await {
        Ok(p) => p,
        Err(e) => return record(errors, "starting the project", Err(e)),
    };
    let size = plan.size;
    // Repetitions interleave the figures, so that a noisy moment spreads over all of them.
    for rep in 0..plan.reps {
        for &g in &wanted {
            let f = &mut *figures;
            let r = match (g, &files.dense) {
                (Fault, Some(d)) => {
                    let cpu = placement::one_cpu().unwrap_or(0);
                    project::faults(&p, f, rep, d, size, plan.fault_touches, cpu).await
                }
                (TouchAll, Some(d)) => project::touch_all(&p, f, rep, d, size).await,
                (CompleteDense, Some(d)) => project::complete(&p, f, rep, "dense", d, size).await,
                (CompleteSparse, _) => match &files.sparse {
                    Some(s) => project::complete(&p, f, rep, "sparse", s, size).await,
                    None => Ok(()),
                },
                (CompleteScattered, _) => match &files.scattered {
                    Some(s) => project::complete(&p, f, rep, "scattered", s, size).await,
                    None => Ok(()),
                },
                (Stall, Some(d)) => project::stall(&p, f, rep, d, size).await,
                (Rpc, _) => match &files.small {
                    Some(s) => {
                        let (small, n) = (plan.sessions.size, plan.rpc_sessions);
                        project::rpc_complete(&p, f, rep, s, small, n).await
                    }
                    None => Ok(()),
                },
                _ => Ok(()),
            };
            let name = format!("{} rep {rep}", g.name());
            if r.is_ok() {
                note(&format!("{name}: {}", latest(figures, g)));
            }
            record(errors, &name, r);
        }
    }
    drop(p);
}

/// The peer comparison of one run: a supervisor of its own, then each repetition runs every
/// workload for every contender (see [`peers`]).
pub(super) async fn peer_figures(
    plan: &Plan,
    files: &MemoryFiles,
    dir: &std::path::Path,
    run: usize,
    figures: &mut Figures,
) -> anyhow::Result<()> {
    let dense = files.dense.as_deref().context("no dense memory file")?;
    let many = files.many.as_deref().context("no many-VMs memory file")?;
    let runtime_dir = dir.join(format!("run-peers-{run}"));
    let p = Project::start(&plan.bins, &runtime_dir).await?;
    let peer_dir = dir.join(format!("peer-sockets-{run}"));
    std::fs::create_dir_all(&peer_dir)
        .with_context(|| format!("creating {}", peer_dir.display()))?;
    for rep in 0..plan.reps {
        peers::rep(&p, &plan.peers, dense, many, &peer_dir, rep, figures).await?;
    }
    Ok(())
}

/// The `working_set` group: a memory file of its own (never locked in memory: the cold case
/// drops it from the page cache), one recording, then the repetitions.
pub(super) async fn working_set_figures(
    plan: &Plan,
    dir: &std::path::Path,
    run: usize,
    figures: &mut Figures,
) -> anyhow::Result<()> {
    let file = dir.join("working-set.mem");
    if !file.exists() {
        let spec = vmsim::MemoryFileSpec {
            size: plan.size,
            seed: 15,
            zero_fraction: 0.1,
            hole_fraction: 0.1,
        };
        let f = file.clone();
        tokio::task::spawn_blocking(move || vmsim::write_memory_file(&f, &spec)).await??;
        std::fs::read(&file)?; // warm, as the other files are
    }
    let runtime_dir = dir.join(format!("run-working-set-{run}"));
    let p = Project::start(&plan.bins, &runtime_dir).await?;
    let ws = dir.join(format!("working-set-{run}.ws"));
    working_set::record(&p, &file, plan.size, &ws).await?;
    for rep in 0..plan.reps {
        working_set::rep(&p, figures, rep, &file, plan.size, &ws).await?;
        note(&format!("working_set rep {rep}: {}", latest(figures, Group::WorkingSet)));
    }
    Ok(())
}
