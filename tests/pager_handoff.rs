//! The pager binary alone: a session handed over the SCM_RIGHTS socket (as the supervisor does)
//! is served byte for byte, discards read as zero, and CompleteSession graduates it.

// Test values are small and known: plain `as` casts.
#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_possible_wrap)]
// The test plays the VMM: it maps and touches raw guest memory.
#![allow(unsafe_code)]

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use uffdpager::api::pager_client::PagerClient;
use uffdpager::api::{CompleteSessionRequest, GetSessionRequest, Session, SessionState};
use uffdpager::firecracker::Region;
use uffdpager::handoff::{send_session, HandoffRequest, SessionFds};

fn session_fds(guest: &Guest, mem: &Path, vmm: &UnixStream, log: Option<&OwnedFd>) -> SessionFds {
    SessionFds {
        uffd: guest.uffd.as_fd().try_clone_to_owned().unwrap(),
        memory_file: OwnedFd::from(File::open(mem).unwrap()),
        vmm_stream: OwnedFd::from(vmm.try_clone().unwrap()),
        removed_log: log.map(|l| l.try_clone().unwrap()),
        overlay: None,
    }
}

/// What the supervisor would send for `guest`: one region at offset 0 of the memory file.
fn handoff_request(id: &str, guest: &Guest, mem: &Path) -> HandoffRequest {
    HandoffRequest {
        session_id: id.into(),
        memory_file: mem.display().to_string(),
        regions: vec![Region {
            base: guest.base as u64,
            size: guest.len as u64,
            offset: 0,
            page_size: 4096,
        }],
        vmm_pid: std::process::id(),
        connected_at_ms: 1,
        adopt: false,
        removed: vec![],
        overlays: vec![],
        faults: 0,
        vmm_fd: Default::default(),
        record_working_set: None,
        prefetch_working_set: None,
    }
}

struct PagerProcess {
    child: Child,
    grpc: PathBuf,
    handoff: PathBuf,
}

impl Drop for PagerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_pager(dir: &Path) -> PagerProcess {
    start_pager_with_stderr(dir, Stdio::inherit())
}

fn start_pager_with_stderr(dir: &Path, stderr: Stdio) -> PagerProcess {
    let grpc = dir.join("pager.sock");
    let handoff = dir.join("handoff.sock");
    let child = Command::new(testkit::binary("uffd-pager"))
        .arg("--grpc-socket")
        .arg(&grpc)
        .arg("--handoff-socket")
        .arg(&handoff)
        .arg("--version-label")
        .arg("test")
        .stdin(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(grpc.exists() && handoff.exists()) {
        assert!(Instant::now() < deadline, "pager did not create its sockets");
        std::thread::sleep(Duration::from_millis(10));
    }
    PagerProcess { child, grpc, handoff }
}

/// Guest memory registered on a uffd in this process: the test plays the VMM.
struct Guest {
    base: *mut u8,
    len: usize,
    uffd: userfaultfd::Uffd,
}

impl Guest {
    fn new(len: usize) -> Self {
        // SAFETY: a fresh anonymous private mapping; nothing else refers to it.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED);
        let uffd = uffdpager::uffd_ops::firecracker_uffd(false).unwrap();
        uffd.register(base, len).unwrap();
        Self { base: base.cast(), len, uffd }
    }

    fn page(&self, i: usize) -> Vec<u8> {
        // SAFETY: within the mapping; a missing page blocks until the pager fills it.
        unsafe { std::slice::from_raw_parts(self.base.add(i * 4096), 4096).to_vec() }
    }
}

/// Polls the pager's GetSession for `id` until `done` holds or `within` passes; the last answer.
fn wait_for_session(
    grpc: &Path,
    id: &str,
    within: Duration,
    done: impl Fn(&Session) -> bool,
) -> Session {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut client = PagerClient::new(uffdpager::grpc::uds_channel(grpc));
        let deadline = Instant::now() + within;
        loop {
            let s = client
                .get_session(GetSessionRequest { session_id: id.into() })
                .await
                .unwrap()
                .into_inner();
            if done(&s) || Instant::now() > deadline {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
}

fn memory_file(dir: &Path, pages: usize) -> (PathBuf, Vec<u8>) {
    let path = dir.join("mem");
    let mut data = vec![0u8; pages * 4096];
    for (i, b) in data.iter_mut().enumerate() {
        *b = (i.wrapping_mul(2654435761) >> 7) as u8 | 1;
    }
    // Every fourth page zero, to exercise elision.
    for p in (0..pages).step_by(4) {
        data[p * 4096..(p + 1) * 4096].fill(0);
    }
    File::create(&path).unwrap().write_all(&data).unwrap();
    (path, data)
}

#[test]
fn a_handed_over_session_is_served_discarded_pages_read_zero_and_it_graduates() {
    let dir = tempfile::tempdir().unwrap();
    let pager = start_pager(dir.path());
    // 4 MiB: more than the first read-ahead window (2 MiB) that the sequential reads start.
    let pages = 1024;
    let (mem_path, data) = memory_file(dir.path(), pages);
    let guest = Guest::new(pages * 4096);
    let (vmm_end, pager_end) = UnixStream::pair().unwrap();
    let request = handoff_request("direct-1", &guest, &mem_path);
    let fds = session_fds(&guest, &mem_path, &pager_end, None);
    send_session(&pager.handoff, &request, &fds, Duration::from_secs(10)).unwrap();
    drop(fds);

    for i in [0usize, 1, 5, 77, 1023, 5] {
        assert_eq!(guest.page(i), data[i * 4096..(i + 1) * 4096], "page {i}");
    }
    // Balloon: discard pages 8..16 (page 9 was never touched); they must read zero.
    // SAFETY: within the mapping.
    let rc =
        unsafe { libc::madvise(guest.base.add(8 * 4096).cast(), 8 * 4096, libc::MADV_DONTNEED) };
    assert_eq!(rc, 0);
    assert!(guest.page(9).iter().all(|&b| b == 0));
    // Sequential reads start read-ahead; it must skip a discarded range it spans.
    // SAFETY: within the mapping.
    let rc =
        unsafe { libc::madvise(guest.base.add(40 * 4096).cast(), 8 * 4096, libc::MADV_DONTNEED) };
    assert_eq!(rc, 0);
    for i in 30..70 {
        let want: &[u8] =
            if (40..48).contains(&i) { &[0u8; 4096] } else { &data[i * 4096..(i + 1) * 4096] };
        assert!(guest.page(i) == want, "sequential read of page {i}");
    }

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut client = PagerClient::new(uffdpager::grpc::uds_channel(&pager.grpc));
        let done = client
            .complete_session(CompleteSessionRequest { session_id: "direct-1".into() })
            .await
            .unwrap()
            .into_inner();
        let s = done.session.clone().unwrap();
        assert_eq!(s.state(), SessionState::Graduated, "{s:?}");
        // Every fourth page is zero; those past the read-ahead window are not copied.
        assert!(done.skipped_zero_bytes >= 40 * 4096, "{done:?}");
        assert_eq!(done.skipped_removed_bytes, 7 * 4096, "pages 8..16 but 9, read back as zero");
        let again = client
            .complete_session(CompleteSessionRequest { session_id: "direct-1".into() })
            .await
            .unwrap()
            .into_inner();
        assert!(again.already_graduated);
        let got = client
            .get_session(GetSessionRequest { session_id: "direct-1".into() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(got.state(), SessionState::Graduated);
    });
    for i in 0..pages {
        let zero = (8..16).contains(&i) || (40..48).contains(&i);
        let want: &[u8] = if zero { &[0u8; 4096] } else { &data[i * 4096..(i + 1) * 4096] };
        assert!(guest.page(i) == want, "page {i} after graduation");
    }
    drop(vmm_end);
}

#[test]
fn a_pager_that_adopts_a_session_after_a_crash_keeps_discarded_ranges_zero() {
    let dir = tempfile::tempdir().unwrap();
    let pages = 128;
    let (mem_path, data) = memory_file(dir.path(), pages);
    let guest = Guest::new(pages * 4096);
    let (_vmm_end, pager_end) = UnixStream::pair().unwrap();
    let (_log, log_fd) = uffdpager::removed_log::RemovedLog::create().unwrap();
    let mut request = handoff_request("adopted", &guest, &mem_path);

    let first_dir = dir.path().join("a");
    std::fs::create_dir(&first_dir).unwrap();
    let mut first = start_pager(&first_dir);
    let fds = session_fds(&guest, &mem_path, &pager_end, Some(&log_fd));
    send_session(&first.handoff, &request, &fds, Duration::from_secs(10)).unwrap();
    drop(fds);
    assert_eq!(guest.page(10), data[10 * 4096..11 * 4096]);
    // Discard pages 8..16, one of them served (10), the others never touched.
    // SAFETY: within the mapping.
    let rc =
        unsafe { libc::madvise(guest.base.add(8 * 4096).cast(), 8 * 4096, libc::MADV_DONTNEED) };
    assert_eq!(rc, 0);
    // Kill the pager without warning once it has recorded the REMOVE. (madvise returns as soon
    // as the event is read; the append follows within microseconds: that window is documented.)
    let s =
        wait_for_session(&first.grpc, "adopted", Duration::from_secs(10), |s| s.removed_bytes > 0);
    assert!(s.removed_bytes > 0, "the pager never applied the REMOVE");
    first.child.kill().unwrap();
    first.child.wait().unwrap();

    let second_dir = dir.path().join("b");
    std::fs::create_dir(&second_dir).unwrap();
    let second = start_pager(&second_dir);
    request.adopt = true;
    let fds = session_fds(&guest, &mem_path, &pager_end, Some(&log_fd));
    send_session(&second.handoff, &request, &fds, Duration::from_secs(10)).unwrap();
    drop(fds);
    for i in 8..16 {
        assert!(
            guest.page(i).iter().all(|&b| b == 0),
            "discarded page {i} reads zero after adoption"
        );
    }
    assert_eq!(guest.page(20), data[20 * 4096..21 * 4096]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut client = PagerClient::new(uffdpager::grpc::uds_channel(&second.grpc));
        let done = client
            .complete_session(CompleteSessionRequest { session_id: "adopted".into() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(done.session.unwrap().state(), SessionState::Graduated);
    });
    for i in 0..pages {
        let want: &[u8] =
            if (8..16).contains(&i) { &[0u8; 4096] } else { &data[i * 4096..(i + 1) * 4096] };
        assert!(guest.page(i) == want, "page {i} after graduation");
    }
}

#[test]
fn a_pager_whose_log_pipe_is_closed_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let mut pager = start_pager_with_stderr(dir.path(), Stdio::piped());
    // The reader of its stderr goes away (a supervisor that exited): every log line now fails.
    drop(pager.child.stderr.take());
    let pages = 32;
    let (mem_path, data) = memory_file(dir.path(), pages);
    let guest = Guest::new(pages * 4096);
    let (_vmm_end, pager_end) = UnixStream::pair().unwrap();
    let request = handoff_request("quiet", &guest, &mem_path);
    let fds = session_fds(&guest, &mem_path, &pager_end, None);
    send_session(&pager.handoff, &request, &fds, Duration::from_secs(10)).unwrap();
    for i in 0..pages {
        assert!(guest.page(i) == data[i * 4096..(i + 1) * 4096], "page {i}");
    }
    assert!(pager.child.try_wait().unwrap().is_none(), "the pager is alive");
}

#[test]
fn a_vm_reading_in_order_is_served_ahead_of_its_reads_in_few_faults() {
    let dir = tempfile::tempdir().unwrap();
    let pager = start_pager(dir.path());
    let pages = 16384; // 64 MiB
    let (mem_path, data) = memory_file(dir.path(), pages);
    let guest = Guest::new(pages * 4096);
    let (vmm_end, pager_end) = UnixStream::pair().unwrap();
    let request = handoff_request("reader", &guest, &mem_path);
    let fds = session_fds(&guest, &mem_path, &pager_end, None);
    send_session(&pager.handoff, &request, &fds, Duration::from_secs(10)).unwrap();
    drop(fds);
    for i in 0..pages {
        assert!(guest.page(i) == data[i * 4096..(i + 1) * 4096], "page {i}");
    }
    // Figures are published by the worker after each fault and read-ahead chunk: the last
    // chunk's may land a moment after the reader has read it.
    let s = wait_for_session(&pager.grpc, "reader", Duration::from_secs(5), |s| {
        s.resident_bytes == (pages * 4096) as u64
    });
    // One page per fault would be 16,384 faults. Read-ahead serves windows that double up to
    // 32 MiB ahead of the reader; the faults left are the window ends and the times the reader
    // (it only compares) caught up with a chunk being copied. Seen: ~900 while the copy mapped
    // the file as it went, under 10 since it maps each run first.
    assert!(s.faults < pages as u64 / 8, "{} faults for {pages} pages read in order", s.faults);
    assert_eq!(s.resident_bytes, (pages * 4096) as u64);
    drop(vmm_end);
}
