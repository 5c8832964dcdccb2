//! Many VMs restored from ONE snapshot share the kernel's page cache: the pager maps each memory
//! file once, whatever the number of sessions on it, so its own memory does not grow with the
//! number of VMs, and graduating them one after another reads nothing from disk that the page
//! cache already holds. Both asserted from the kernel's figures in /proc, not assumed.
//!
//! Why these figures show it:
//! - `RssAnon` (`/proc/<pid>/status`) is the pager's private memory: heap, stacks, bitmaps
//!   (plus `RssShmem`, the small memfds a session may keep).
//!   Snapshot pages it reads are page-cache pages mapped from the file: they count in
//!   `RssFile`, once per page however many sessions use them, and belong to the page cache, not
//!   to the pager. A pager that copied the snapshot per VM would show it in `RssAnon`.
//! - The number of `/proc/<pid>/maps` lines naming the file is the number of times the pager
//!   mapped it: one for twenty sessions.
//! - `read_bytes` (`/proc/<pid>/io`) counts the bytes whose reading from storage the process
//!   caused, page faults on mapped files included (the block layer charges each read bio to the
//!   task that submits it, here the pager thread whose `UFFDIO_COPY` touched a cached-out page).
//!   Page-cache hits do not count. The test first shows the figure moves when the file is cold,
//!   then that it stays still across twenty graduations of a cached file.
//! - `mincore(2)` on a mapping of the file tells which of its pages the page cache holds: all of
//!   them before and after the graduations.

mod common;

use std::path::Path;
use std::time::Instant;

use common::{holdings, vm_cmd, wait_holdings_within, Env, MIB, SUPERVISOR_THREAD_SLACK};
use testkit::pagecache::{evict, residency};
use testkit::procfs::{resident, storage_read_bytes, Resident};
use testkit::VmProcess;
use uffdpager::api::DeleteSessionRequest;

const VMS: usize = 20;
const FILE_SIZE: u64 = 256 * MIB;
/// What one more session may add to the pager's private memory: its bookkeeping (64 KiB) plus a
/// bit per 4 KiB page of its guest. Copying the guest's snapshot pages would be ~25 MiB each.
const PER_SESSION_BYTES: u64 = 64 * 1024 + FILE_SIZE / 4096 / 8;
/// Storage reads tolerated across the graduations of a cached file (file-system metadata).
const READ_SLACK: u64 = MIB;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_vms_of_one_snapshot_share_the_page_cache_and_graduate_without_reading_disk() {
    let env = Env::start().await;
    let mem = env.memfile("shared.mem", FILE_SIZE, 0.0, 0.0);
    let files = [mem.as_path()];
    let (pager, supervisor) = (env.pager_pid(), i32::try_from(env.sup().pid().unwrap()).unwrap());
    let (pager_before, sup_before) = (holdings(pager, &files), holdings(supervisor, &files));
    let mem_before = resident(pager).unwrap();

    // A cold file first: the pager's faults read it from disk, and `read_bytes` shows it.
    evict(&mem).expect("dropping the file from the page cache");
    let cold = residency(&mem).unwrap();
    let read_at_start = storage_read_bytes(pager).unwrap();
    let mut vms = vec![restore_and_read(&env, 0, &mem).await];
    let read_cold = storage_read_bytes(pager).unwrap() - read_at_start;
    eprintln!(
        "cold file ({:.0}% cached): the first VM's faults made the pager read {} KiB from disk",
        cold.fraction() * 100.0,
        read_cold / 1024
    );
    if cold.fraction() < 0.5 {
        assert!(read_cold > 0, "read_bytes does not count the pager's reads from disk");
    } else {
        eprintln!("NOTE: the file system kept the file cached; the cold-read check is moot here");
    }
    let mem_one = resident(pager).unwrap();

    // The whole file in the page cache, then nineteen more VMs of it.
    std::io::copy(&mut std::fs::File::open(&mem).unwrap(), &mut std::io::sink()).unwrap();
    for i in 1..VMS {
        vms.push(restore_and_read(&env, i, &mem).await);
    }
    let mem_all = resident(pager).unwrap();
    let maps = holdings(pager, &files).file_maps;
    // Private memory: anonymous, plus the small shared-memory files (memfds) a session may keep.
    let own = |r: &Resident| r.anon_kib + r.shmem_kib;
    let growth = own(&mem_all).saturating_sub(own(&mem_one)) * 1024 / (VMS as u64 - 1);
    eprintln!(
        "pager memory: before {mem_before:?}; 1 VM {mem_one:?}; {VMS} VMs {mem_all:?}; \
         RssAnon+RssShmem growth per session {growth} bytes (bound {PER_SESSION_BYTES}); \
         mappings of the file: {maps}"
    );
    assert_eq!(maps, 1, "the pager maps the memory file once for {VMS} sessions");
    assert!(
        growth < PER_SESSION_BYTES,
        "the pager's private memory grows by {growth} bytes per session (bound \
         {PER_SESSION_BYTES}): {mem_one:?} with one VM, {mem_all:?} with {VMS}"
    );
    // Snapshot pages are counted once, as the file's: at most the file beyond what the pager
    // had mapped before (its own binary and libraries).
    assert!(
        mem_all.file_kib <= mem_before.file_kib + FILE_SIZE / 1024 + 1024,
        "RssFile {mem_all:?} exceeds one copy of the file"
    );

    // Graduate them one after another: all populated from the page cache, nothing from disk.
    let cached = residency(&mem).unwrap();
    assert!(cached.complete(), "the file is cached before the graduations: {cached:?}");
    let read_before = storage_read_bytes(pager).unwrap();
    let (mut populated, started) = (0, Instant::now());
    for (i, mut vm) in vms.into_iter().enumerate() {
        let id = format!("vm-{i}");
        let done = env.graduate(&id).await;
        populated += done.populated_bytes;
        vm_cmd(&mut vm, "read-random 1%").await;
        tokio::task::block_in_place(|| vm.exit()).expect("the VM exits");
        env.client().delete_session(DeleteSessionRequest { session_id: id }).await.unwrap();
    }
    let read_during = storage_read_bytes(pager).unwrap() - read_before;
    let after = residency(&mem).unwrap();
    eprintln!(
        "{VMS} graduations in {:?}: {} MiB populated, {read_during} bytes read from disk by the \
         pager; page cache holds {}/{} pages of the file before and {}/{} after",
        started.elapsed(),
        populated / MIB,
        cached.resident,
        cached.pages,
        after.resident,
        after.pages
    );
    assert!(populated >= FILE_SIZE, "the graduations populated {populated} bytes");
    assert!(
        read_during <= READ_SLACK,
        "graduating {VMS} VMs of a cached file made the pager read {read_during} bytes from disk"
    );
    assert!(after.complete(), "the file is still cached after the graduations: {after:?}");

    // Twenty sessions came and went: the pager and the supervisor hold no more than before.
    let p = wait_holdings_within("pager", pager, &pager_before, 0, &files).await;
    let s = wait_holdings_within(
        "supervisor",
        supervisor,
        &sup_before,
        SUPERVISOR_THREAD_SLACK,
        &files,
    )
    .await;
    eprintln!("after {VMS} VMs: pager {p:?} (before {pager_before:?})");
    eprintln!("after {VMS} VMs: supervisor {s:?} (before {sup_before:?})");
}

/// Restores VM `i` from `mem` and reads 10% of its pages at random.
async fn restore_and_read(env: &Env, i: usize, mem: &Path) -> VmProcess {
    let mut vm = env.restore(&format!("vm-{i}"), mem, &[]).await;
    let r = vm_cmd(&mut vm, &format!("read-random 10% {i}")).await;
    assert!(r["pages_verified"].as_u64().unwrap() >= FILE_SIZE / 4096 / 10, "{r}");
    vm
}
