//! `--only working_set` (issue 15, items 3 and 4): replaying a recorded random 25% working set
//! right after restore, through the real supervisor and pager.
//!
//! Once per run, a VM restored with `record_working_set` reads a random 25% of its pages (seed
//! [`SEED`]) and graduates, which saves the recording. Then each repetition, interleaved:
//!
//! - `ws_on_demand_ms` / `ws_on_demand_faults`: a fresh VM reads the same pages, in the same
//!   order, served on demand (the project as it was);
//! - `ws_prefetch_ms` / `ws_prefetch_faults`: a fresh VM restored with `prefetch_working_set`
//!   reads them at once (the prefetch runs from the handoff on, while the VM reads);
//! - `ws_file_ms`: the kernel's file-backed mapping (`MAP_PRIVATE` of the memory file, as
//!   Firecracker's `File` backend maps it: [`Vm::map_file`]) read in the same order, by the same
//!   reader, in this process: the ceiling; `ws_file_bare_ms`: the same pages compared by a bare
//!   `memcmp` loop (no per-page clock or page state, both sides one physical page);
//! - `ws_differs_ms`: a fresh VM restored with the prefetch reads ANOTHER random 25% (seed
//!   [`OTHER_SEED`]): a workload the recording does not describe, against `ws_on_demand_ms`;
//! - `ws_prefetch_done_ms` / `ws_after_prefetch_ms`: from the restore until the prefetch is
//!   done, and the replay begun only then (a VM that computes between touches);
//! - `ws_prefetch_fresh_ms`: the prefetched replay once the pager has let go of the memory file
//!   (page cache still warm): the pager maps the file afresh, as for a snapshot not restored
//!   within its linger (`--memory-file-linger-secs`), where `ws_prefetch_ms` finds the mapping
//!   the on-demand replay just left;
//! - `ws_cold_on_demand_ms` / `ws_cold_prefetch_ms`: the first two with the memory file dropped
//!   from the page cache before each (`posix_fadvise DONTNEED` once no session maps it and the
//!   pager has let go of it).
//!
//! Every page read is verified against the memory file, the file-backed VM's too.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use memmap2::{Mmap, MmapOptions};
use rand::rngs::SmallRng;
use rand::SeedableRng;
use uffdpager::api::{CreateSessionRequest, SessionState, WorkingSetState};
use vmsim::{Amount, GuestRegionSpec, Report, Vm};

use super::supervisor::{on_vm, Project};
use super::Figures;

/// The recorded workload's seed, and another one.
pub const SEED: u64 = 15;
pub const OTHER_SEED: u64 = 16;
/// The share of pages the workload reads.
const SHARE: f64 = 0.25;

fn clean(report: &Report, what: &str) -> anyhow::Result<()> {
    if report.mismatches > 0 {
        bail!("{what}: {} pages read wrong: {:?}", report.mismatches, report.first_mismatches);
    }
    Ok(())
}

/// Creates a session (with the working-set fields given) and restores a VM of `size` bytes.
async fn restore(
    p: &Project,
    id: &str,
    file: &Path,
    size: u64,
    record: Option<&Path>,
    prefetch: Option<&Path>,
) -> anyhow::Result<Vm> {
    let shown = |p: Option<&Path>| p.map(|p| p.display().to_string()).unwrap_or_default();
    let s = p
        .client()
        .create_session(CreateSessionRequest {
            session_id: id.into(),
            memory_file: file.display().to_string(),
            record_working_set: shown(record),
            prefetch_working_set: shown(prefetch),
            ..Default::default()
        })
        .await
        .with_context(|| format!("CreateSession {id}"))?
        .into_inner();
    let socket = std::path::PathBuf::from(s.socket_path);
    let file = file.to_path_buf();
    let spec = GuestRegionSpec { size, page_size: 4096, offset: 0 };
    let vm = tokio::task::spawn_blocking(move || Vm::restore(&socket, &file, &[spec]))
        .await
        .context("restore task")?
        .with_context(|| format!("restoring VM {id}"))?;
    p.wait_state(id, SessionState::Serving).await?;
    Ok(vm)
}

/// Reads the random share of `seed` in the VM; its wall time (ms) and the session's faults.
async fn replay(p: &Project, id: &str, vm: Vm, seed: u64) -> anyhow::Result<(f64, u64)> {
    let before = p.get(id).await?.faults;
    let report = on_vm("replay", move || {
        let r = vm.read_random(Amount::Fraction(SHARE), seed);
        drop(vm);
        r
    })
    .await?;
    clean(&report, id)?;
    let s = wait_ended(p, id).await?;
    Ok((report.elapsed_ms, s.faults - before))
}

/// Waits until the session has ended (its VM dropped): no session maps the file any more.
async fn wait_ended(p: &Project, id: &str) -> anyhow::Result<uffdpager::api::Session> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = p.get(id).await?;
        if matches!(s.state(), SessionState::Ended | SessionState::Graduated) {
            return Ok(s);
        }
        if Instant::now() > deadline {
            bail!("session {id} did not end: {s:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Records the working set once: a VM reads the share of [`SEED`], then graduates.
pub async fn record(p: &Project, file: &Path, size: u64, ws: &Path) -> anyhow::Result<()> {
    let id = "bench-ws-record";
    let vm = restore(p, id, file, size, Some(ws), None).await?;
    let report = on_vm("recording", move || {
        let r = vm.read_random(Amount::Fraction(SHARE), SEED);
        (r, vm)
    })
    .await?;
    clean(&report.0, "recording")?;
    p.complete(id).await?;
    drop(report.1);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = p.get(id).await?;
        match s.record_state() {
            WorkingSetState::Done => return Ok(()),
            WorkingSetState::Failed | WorkingSetState::Skipped => {
                bail!("the recording failed: {}", s.record_reason)
            }
            _ if Instant::now() > deadline => bail!("the recording was never saved: {s:?}"),
            _ => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

/// The file-backed VM (Firecracker's `File` backend: [`Vm::map_file`]) reading the workload's
/// pages in its order, with the same reader as every restored VM: ms.
fn file_backed(file: &Path, size: u64, seed: u64) -> anyhow::Result<f64> {
    let spec = GuestRegionSpec { size, page_size: 4096, offset: 0 };
    let vm = Vm::map_file(file, &[spec]).context("mapping the file-backed VM")?;
    let report = vm.read_random(Amount::Fraction(SHARE), seed);
    clean(&report, "file-backed mapping")?;
    Ok(report.elapsed_ms)
}

/// The same pages of a `MAP_PRIVATE` mapping compared with a second mapping of the file by
/// a bare `memcmp` loop, untimed per page: ms. The figure this benchmark called the file mapping
/// before it read both sides with one reader: cheaper per page than any VM's reader (no clock
/// reads, no page states, and both sides one physical page).
// `SHARE` of the page count: a fraction of a usize, non-negative.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
fn file_backed_bare(file: &Path, size: u64, seed: u64) -> anyhow::Result<f64> {
    let f = std::fs::File::open(file)?;
    let len = usize::try_from(size)?;
    // SAFETY: a private, read-only mapping of a file this run wrote and nobody truncates.
    let private: Mmap = unsafe { MmapOptions::new().len(len).map_copy_read_only(&f)? };
    // SAFETY: as above; the reference copy the pages are compared with.
    let reference: Mmap = unsafe { MmapOptions::new().len(len).map(&f)? };
    reference.advise(memmap2::Advice::WillNeed)?;
    let total = (size / 4096) as usize;
    let k = (total as f64 * SHARE) as usize;
    let mut rng = SmallRng::seed_from_u64(seed);
    let picked = rand::seq::index::sample(&mut rng, total, k);
    let started = Instant::now();
    let mut wrong = 0;
    for page in picked.into_iter() {
        let r = page * 4096..(page + 1) * 4096;
        wrong += usize::from(private[r.clone()] != reference[r]);
    }
    let ms = started.elapsed().as_secs_f64() * 1e3;
    if wrong > 0 {
        bail!("file-backed mapping: {wrong} pages differ");
    }
    Ok(ms)
}

/// How long the pager may keep a memory file mapped after its last session: its linger
/// ([`super::supervisor`] sets 1 s) and the sweep that lets go of it.
const LET_GO_WITHIN: Duration = Duration::from_secs(5);

/// Waits until the pager maps `file` no more (it lets go of a file its linger after the last
/// session ended).
async fn wait_let_go(p: &Project, file: &Path) -> anyhow::Result<()> {
    let pid = p.pager_pid().await?;
    let deadline = Instant::now() + LET_GO_WITHIN;
    loop {
        if testkit::procfs::holdings(pid, &[file])?.file_maps == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the pager still maps {} {LET_GO_WITHIN:?} after its last session",
                file.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Drops the memory file from the page cache, again until at most 2% of it stays (pages the
/// pager maps cannot be dropped: it lets go of the file its linger after the last session
/// ended), for at most [`LET_GO_WITHIN`]. Returns the share left.
async fn drop_from_page_cache(file: &Path) -> anyhow::Result<f64> {
    let deadline = Instant::now() + LET_GO_WITHIN;
    loop {
        testkit::pagecache::evict(file).context("evicting the memory file")?;
        let cached = testkit::pagecache::residency(file)?.fraction();
        if cached <= 0.02 || Instant::now() > deadline {
            return Ok(cached);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One repetition of every figure.
pub async fn rep(
    p: &Project,
    f: &mut Figures,
    rep: usize,
    file: &Path,
    size: u64,
    ws: &Path,
) -> anyhow::Result<()> {
    let vm = restore(p, &format!("bench-ws-od-{rep}"), file, size, None, None).await?;
    let (ms, faults) = replay(p, &format!("bench-ws-od-{rep}"), vm, SEED).await?;
    f.add("ws_on_demand_ms", ms);
    f.add("ws_on_demand_faults", faults as f64);

    let id = format!("bench-ws-pf-{rep}");
    let vm = restore(p, &id, file, size, None, Some(ws)).await?;
    let (ms, faults) = replay(p, &id, vm, SEED).await?;
    f.add("ws_prefetch_ms", ms);
    f.add("ws_prefetch_vs_file_ms", ms);
    f.add("ws_prefetch_faults", faults as f64);

    // The same, the replay begun once the prefetch is done: what a VM that computes between
    // its touches sees (and how long the prefetch takes from the restore on).
    let id = format!("bench-ws-after-{rep}");
    let vm = restore(p, &id, file, size, None, Some(ws)).await?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(60);
    while p.get(&id).await?.prefetch_state() != WorkingSetState::Done {
        if Instant::now() > deadline {
            bail!("the prefetch of {id} did not finish");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    f.add("ws_prefetch_done_ms", started.elapsed().as_secs_f64() * 1e3);
    let (ms, _) = replay(p, &id, vm, SEED).await?;
    f.add("ws_after_prefetch_ms", ms);

    let (path, s) = (file.to_path_buf(), size);
    f.add("ws_file_ms", tokio::task::spawn_blocking(move || file_backed(&path, s, SEED)).await??);
    let (path, s) = (file.to_path_buf(), size);
    let bare = tokio::task::spawn_blocking(move || file_backed_bare(&path, s, SEED)).await??;
    f.add("ws_file_bare_ms", bare);

    wait_let_go(p, file).await?;
    let id = format!("bench-ws-fresh-{rep}");
    let vm = restore(p, &id, file, size, None, Some(ws)).await?;
    let (ms, _) = replay(p, &id, vm, SEED).await?;
    f.add("ws_prefetch_fresh_ms", ms);

    let id = format!("bench-ws-differs-{rep}");
    let vm = restore(p, &id, file, size, None, Some(ws)).await?;
    let (ms, _) = replay(p, &id, vm, OTHER_SEED).await?;
    f.add("ws_differs_ms", ms);

    for (name, prefetch) in [("ws_cold_on_demand_ms", None), ("ws_cold_prefetch_ms", Some(ws))] {
        let cached = drop_from_page_cache(file).await?;
        let id = format!("bench-{name}-{rep}");
        let vm = restore(p, &id, file, size, None, prefetch).await?;
        let (ms, _) = replay(p, &id, vm, SEED).await?;
        f.add(name, ms);
        f.add("ws_cold_cached_fraction", cached);
    }
    Ok(())
}
