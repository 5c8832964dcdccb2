//! The project's single-VM figures, through the real supervisor and pager:
//!
//! - `fault_p50_us` / `fault_p99_us`: distinct random 4 KiB touches on a fresh VM, its thread
//!   and every thread of the pager process pinned to the one CPU of `min_fault_us` (so the ratio
//!   compares code, not placement); `fault_free_p50_us` / `fault_free_p99_us`: the same unpinned.
//! - `touch_all_gbps`: a fresh VM reading (and verifying) all its memory once, in order.
//! - `complete_dense_gbps` / `complete_sparse_gbps` / `complete_scattered_gbps`: CompleteSession
//!   of an untouched VM, timed by the client; sparse (zero pages and holes in runs of 1-63 pages)
//!   and scattered (the same shares page by page) count logical bytes (the VM's size) per second.
//! - `stall_max_ms` / `stall_p99_ms`: a background reader's page reads inside a fresh VM while
//!   CompleteSession runs.
//! - `rpc_complete_p50_ms`: CompleteSession of a small, already fully resident session.
//!
//! Every VM is verified: each touch compares the page with the memory file, and after every
//! completion a sample of pages is read back.

use std::path::Path;
use std::time::Duration;

use anyhow::bail;
use vmsim::{Amount, Report, Vm};

use super::placement::{pin_current_thread, PinnedProcess};
use super::stats::{gbps, median};
use super::supervisor::{on_vm, Project};
use super::Figures;

/// Pages read back after each completion.
const SAMPLE_AFTER_COMPLETE: u64 = 2048;

fn clean(report: &Report, what: &str) -> anyhow::Result<()> {
    if report.mismatches > 0 {
        bail!("{what}: {} pages read wrong: {:?}", report.mismatches, report.first_mismatches);
    }
    Ok(())
}

/// `fault_p50_us` / `fault_p99_us` (the VM's thread and every pager thread on CPU `cpu`, the
/// placement of `min_fault_us`) and `fault_free_p50_us` / `fault_free_p99_us` (unpinned) of one
/// repetition: a fresh VM each, the same touches.
pub async fn faults(
    p: &Project,
    f: &mut Figures,
    rep: usize,
    file: &Path,
    size: u64,
    pages: u64,
    cpu: usize,
) -> anyhow::Result<()> {
    let seed = 1000 + rep as u64;
    let vm = p.restore(&format!("bench-fault-{rep}"), file, size).await?;
    // The pager's fault workers (the threads that serve faults, as the handler's one thread
    // does) pinned once the session is served; given back on every path (the guard's drop). Its
    // other threads (gRPC, handoff, the idle-priority zero scan) stay where the kernel puts
    // them, as the handler has no such threads to place.
    let pager = PinnedProcess::pin_named(p.pager_pid().await?, cpu, "fault-")?;
    let report = on_vm("random touches on one CPU", move || {
        pin_current_thread(cpu)?;
        anyhow::Ok(vm.read_random(Amount::Pages(pages), seed))
    })
    .await??;
    pager.release()?;
    clean(&report, "random touches on one CPU")?;
    f.add("fault_p50_us", report.stall_p50_us);
    f.add("fault_p99_us", report.stall_p99_us);

    let vm = p.restore(&format!("bench-fault-free-{rep}"), file, size).await?;
    let report =
        on_vm("random touches", move || vm.read_random(Amount::Pages(pages), seed)).await?;
    clean(&report, "random touches")?;
    f.add("fault_free_p50_us", report.stall_p50_us);
    f.add("fault_free_p99_us", report.stall_p99_us);
    Ok(())
}

/// `touch_all_gbps` of one repetition.
pub async fn touch_all(
    p: &Project,
    f: &mut Figures,
    rep: usize,
    file: &Path,
    size: u64,
) -> anyhow::Result<()> {
    let vm = p.restore(&format!("bench-touch-{rep}"), file, size).await?;
    let report = on_vm("sequential read", move || vm.read_sequential()).await?;
    clean(&report, "sequential read")?;
    f.add("touch_all_gbps", gbps(report.bytes_read, report.elapsed_ms / 1000.0));
    Ok(())
}

/// Reads a sample of a graduated VM back and drops it.
async fn sample_after_complete(vm: Vm, seed: u64) -> anyhow::Result<()> {
    let report =
        on_vm("read-back", move || vm.read_random(Amount::Pages(SAMPLE_AFTER_COMPLETE), seed))
            .await?;
    clean(&report, "read-back after graduation")
}

/// `complete_{kind}_gbps`, `complete_{kind}_pager_ms` and `complete_{kind}_copied_share` of one
/// repetition (`kind`: dense, sparse or scattered).
pub async fn complete(
    p: &Project,
    f: &mut Figures,
    rep: usize,
    kind: &str,
    file: &Path,
    size: u64,
) -> anyhow::Result<()> {
    let id = format!("bench-complete-{kind}-{rep}");
    let vm = p.restore(&id, file, size).await?;
    let (done, elapsed) = p.complete(&id).await?;
    f.add(&format!("complete_{kind}_gbps"), gbps(size, elapsed.as_secs_f64()));
    if let Some(d) = done.duration {
        let pager = Duration::new(
            u64::try_from(d.seconds).unwrap_or(0),
            u32::try_from(d.nanos).unwrap_or(0),
        );
        f.add(&format!("complete_{kind}_pager_ms"), pager.as_secs_f64() * 1000.0);
    }
    f.add(&format!("complete_{kind}_copied_share"), done.populated_bytes as f64 / size as f64);
    sample_after_complete(vm, 7 + rep as u64).await
}

/// `stall_max_ms` / `stall_p99_ms` of one repetition.
pub async fn stall(
    p: &Project,
    f: &mut Figures,
    rep: usize,
    file: &Path,
    size: u64,
) -> anyhow::Result<()> {
    let id = format!("bench-stall-{rep}");
    let vm = p.restore(&id, file, size).await?;
    let reader = vm.spawn_reader(500 + rep as u64)?;
    let completed = p.complete(&id).await;
    // Graduated (or failed and still served): the reader's current read ends either way.
    let report = on_vm("stopping the reader", move || reader.stop()).await??;
    let (_, elapsed) = completed?;
    clean(&report, "reader during completion")?;
    f.add("stall_max_ms", report.stall_max_us / 1000.0);
    f.add("stall_p99_ms", report.stall_p99_us / 1000.0);
    f.add("stall_reads", report.pages_verified as f64);
    f.add("complete_with_reader_gbps", gbps(size, elapsed.as_secs_f64()));
    sample_after_complete(vm, 9 + rep as u64).await
}

/// `rpc_complete_p50_ms` of one repetition: `sessions` small VMs made fully resident, then each
/// completed; the median round trip.
pub async fn rpc_complete(
    p: &Project,
    f: &mut Figures,
    rep: usize,
    file: &Path,
    size: u64,
    sessions: usize,
) -> anyhow::Result<()> {
    let mut times = Vec::with_capacity(sessions);
    for i in 0..sessions {
        let id = format!("bench-rpc-{rep}-{i}");
        let vm = p.restore(&id, file, size).await?;
        let (report, vm) = on_vm("making resident", move || (vm.read_sequential(), vm)).await?;
        clean(&report, "making resident")?;
        let (_, elapsed) = p.complete(&id).await?;
        times.push(elapsed.as_secs_f64() * 1000.0);
        drop(vm);
    }
    if let Some(m) = median(&times) {
        f.add("rpc_complete_p50_ms", m);
    }
    Ok(())
}
