//! Graduation with copy threads: while a VM being graduated is quiet, the pager's copy threads
//! copy spans of it beside the fault worker. The VM must end up byte for byte what its snapshot
//! says, and a range the VMM discards (balloon) while copies run must read zeros afterwards: no
//! copy may land over it.

mod common;

use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use common::{vm_cmd, Env, MIB};
use uffdpager::api::{CompleteSessionRequest, SessionState};

/// `assisted_bytes` of the pager's "session graduated" line for `id` (the line is written just
/// after the answer goes out: waits a little for it).
async fn assisted_bytes(env: &Env, id: &str) -> u64 {
    let needle = format!("session={id} ");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let logs = std::fs::read_dir(env.run_dir().join("pagers")).expect("pagers dir");
        for entry in logs.flatten() {
            let log = std::fs::read_to_string(entry.path().join("pager.log")).unwrap_or_default();
            let line = log.lines().find(|l| l.contains("session graduated") && l.contains(&needle));
            if let Some(line) = line {
                let value = line.split_whitespace().find_map(|w| w.strip_prefix("assisted_bytes="));
                return value.and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{line}"));
            }
        }
        assert!(Instant::now() < deadline, "no 'session graduated' line for {id}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_vm_is_graduated_by_its_worker_and_a_copy_thread_together_byte_for_byte() {
    let env = Env::start().await;
    let size = 128 * MIB;
    let mem = env.memfile("mem", size, 0.25, 0.25);
    let mut vm = env.restore("quiet", &mem, &[]).await;
    let done = env.graduate("quiet").await;
    let pages = size / 4096;
    let all = vm_cmd(&mut vm, "verify").await;
    assert_eq!(all["pages_verified"], pages, "{all}");
    let assisted = assisted_bytes(&env, "quiet").await;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus > 1 {
        // The pager runs one copy thread per CPU beyond the first.
        assert!(assisted > 0, "no copy thread took part");
        assert!(assisted < done.populated_bytes, "the worker copied nothing itself: {done:?}");
    } else {
        assert_eq!(assisted, 0, "one CPU: no copy threads");
    }
    eprintln!("{} of {} bytes populated by copy threads", assisted, done.populated_bytes);
}

/// The first page at or after `from` of the `pages` 4 KiB pages at `base` in process `pid` that
/// is not present, from its pagemap.
fn first_missing(pid: u32, base: u64, pages: u64, from: u64) -> Option<u64> {
    let pagemap = std::fs::File::open(format!("/proc/{pid}/pagemap")).expect("pagemap");
    let mut buf = vec![0u8; 8 * 4096];
    let mut p = from;
    while p < pages {
        let n = (pages - p).min(4096);
        let bytes = &mut buf[..n as usize * 8];
        pagemap.read_exact_at(bytes, (base / 4096 + p) * 8).expect("pagemap read");
        let entries = bytes.chunks(8).map(|e| u64::from_le_bytes(e.try_into().unwrap()));
        if let Some(i) = entries.into_iter().position(|e| e & (1 << 63) == 0) {
            return Some(p + i as u64);
        }
        p += n;
    }
    None
}

/// Discards land where copy threads are at work: at the sweep's front (the first page not
/// present yet), where the spans handed to copy threads are planned and not yet copied. A copy
/// planned before a discard and made after it would leave snapshot bytes where the guest must
/// read zeros.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_ballooned_at_the_front_of_graduation_read_zeros_afterwards() {
    let env = Env::start().await;
    let size = 512 * MIB;
    let pages = size / 4096;
    let mem = env.memfile("mem", size, 0.0, 0.0);
    let mut vm = env.restore("ballooning", &mem, &[]).await;
    let base = vm.restored["regions"][0]["base"].as_u64().expect("region base");
    let mut client = env.client();
    let completing = tokio::spawn(async move {
        client
            .complete_session(CompleteSessionRequest { session_id: "ballooning".into() })
            .await
            .expect("CompleteSession")
            .into_inner()
    });
    let (mut from, mut balloons) = (0, 0);
    while !completing.is_finished() {
        let Some(front) = first_missing(vm.pid, base, pages, from) else { break };
        let len = (pages - front).min(64);
        vm_cmd(&mut vm, &format!("balloon 0 {} {}", front * 4096, len * 4096)).await;
        balloons += 1;
        // Past this discard and a little more, so the next one lands elsewhere in the front.
        from = (front + len + 64).min(pages);
    }
    let done = completing.await.expect("completion task");
    assert_eq!(done.session.as_ref().unwrap().state(), SessionState::Graduated, "{done:?}");
    // vmsim expects zeros wherever it ballooned, the file's bytes everywhere else.
    let all = vm_cmd(&mut vm, "verify").await;
    assert_eq!(all["pages_verified"], pages, "{all}");
    assert!(balloons > 3, "graduation ended before the test could discard much: {balloons}");
    eprintln!("{balloons} discards at the front of graduation; {done:?}");
}
