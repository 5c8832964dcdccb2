//! `uffd-hostile-vmm`: a raw Firecracker-protocol client that does what a broken or hostile VMM
//! could, for the tests of `tests/hostile_vmm.rs`. It maps one anonymous region (4 KiB pages),
//! registers it on a userfaultfd made as the flags say, sends the one-message handshake to a
//! session socket, then plays its part (`--then`):
//!
//! ```text
//! exit            exit at once (the uffd and the region go with the process)
//! hold            wait until stdin closes
//! steal           wait for a line on stdin, then clear O_NONBLOCK on the uffd (the open file
//!                 description is the pager's too), read the uffd itself in a thread, and touch
//!                 pages one by one from threads of their own: the pager's epoll announces
//!                 faults whose events this process takes first
//! remap-refault   wait for a line on stdin, touch page 0 (the pager serves it), map fresh
//!                 memory over the region (no UNMAP event is asked for), register it again on
//!                 the same uffd, and touch page 0 again: a page the pager believes present
//! ```
//!
//! It prints one JSON line per step on stdout (`{"ok":true,"step":...}`).

use std::io::BufRead;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, ValueEnum};
use serde_json::json;
use uffdpager::firecracker::GuestRegionUffdMapping;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Then {
    Exit,
    Hold,
    Steal,
    RemapRefault,
}

#[derive(Debug, Parser)]
#[command(name = "uffd-hostile-vmm", about = "A raw Firecracker-protocol client for hostile tests")]
struct Cli {
    /// The session socket (Firecracker's `backend_path`).
    #[arg(long)]
    socket: PathBuf,
    /// Size of the region, in bytes (4 KiB pages).
    #[arg(long, default_value_t = 2 << 20)]
    size: u64,
    /// Create the uffd without O_NONBLOCK.
    #[arg(long)]
    blocking: bool,
    /// Create the uffd without UFFD_FEATURE_EVENT_REMOVE.
    #[arg(long)]
    no_remove_events: bool,
    /// Attach this many more descriptors (pipe ends) to the handshake.
    #[arg(long, default_value_t = 0)]
    extra_fds: usize,
    /// What to do after the handshake.
    #[arg(long, value_enum, default_value_t = Then::Hold)]
    then: Then,
    /// How long `remap-refault` waits for its second touch.
    #[arg(long, default_value_t = 20.0)]
    wait_seconds: f64,
}

fn emit(v: serde_json::Value) {
    println!("{v}");
}

/// The program's two raw operations on guest memory: its only unsafe code.
#[allow(unsafe_code)]
mod sys {
    /// One page-aligned anonymous private region, as Firecracker maps guest memory.
    pub fn map_region(
        size: usize,
        at: Option<*mut libc::c_void>,
    ) -> anyhow::Result<*mut libc::c_void> {
        let fixed = if at.is_some() { libc::MAP_FIXED } else { 0 };
        // SAFETY: a fresh private anonymous mapping; with MAP_FIXED it replaces this program's own
        // region at `at` (made here, and only touched through volatile reads in this file).
        let p = unsafe {
            libc::mmap(
                at.unwrap_or(std::ptr::null_mut()),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | fixed,
                -1,
                0,
            )
        };
        anyhow::ensure!(p != libc::MAP_FAILED, "mmap: {}", std::io::Error::last_os_error());
        Ok(p)
    }

    /// Reads the first word of page `page` (may fault: that is the point).
    pub fn touch(base: u64, page: u64) -> u64 {
        let p = (base + page * 4096) as *const u64;
        // SAFETY: `p` lies inside the mapped region; a volatile read because the pager fills the
        // page behind the program's back.
        unsafe { std::ptr::read_volatile(p) }
    }
}

use sys::{map_region, touch};

fn wait_line() {
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let size = usize::try_from(cli.size).context("size")?;
    let mut builder = userfaultfd::UffdBuilder::new();
    builder.close_on_exec(true).non_blocking(!cli.blocking).user_mode_only(false);
    if !cli.no_remove_events {
        builder.require_features(userfaultfd::FeatureFlags::EVENT_REMOVE);
    }
    let uffd = builder.create().context("creating the userfaultfd")?;
    let base = map_region(size, None)?;
    uffd.register(base, size).context("UFFDIO_REGISTER")?;
    let stream = UnixStream::connect(&cli.socket)
        .with_context(|| format!("connecting to {}", cli.socket.display()))?;
    let mapping = GuestRegionUffdMapping {
        base_host_virt_addr: base as u64,
        size: cli.size,
        offset: 0,
        page_size: Some(4096),
        page_size_kib: Some(4096),
    };
    let json = serde_json::to_vec(&[mapping]).context("handshake JSON")?;
    let mut extras: Vec<OwnedFd> = Vec::new();
    while extras.len() < cli.extra_fds {
        let (r, w) = nix::unistd::pipe().context("pipe")?;
        extras.push(r);
        extras.push(w);
    }
    extras.truncate(cli.extra_fds);
    let mut fds = vec![uffd.as_fd()];
    fds.extend(extras.iter().map(|f| f.as_fd()));
    uffdpager::scm::send_with_fds(stream.as_fd(), &json, &fds).context("sending the handshake")?;
    emit(json!({"ok": true, "step": "handshake-sent", "pid": std::process::id(),
        "base": base as u64, "fds": fds.len()}));
    match cli.then {
        Then::Exit => std::process::exit(0),
        Then::Hold => wait_line(),
        Then::Steal => {
            wait_line();
            steal(&uffd, base as u64, cli.size)?;
            wait_line();
        }
        Then::RemapRefault => {
            wait_line();
            remap_refault(&uffd, base, size, Duration::from_secs_f64(cli.wait_seconds))?;
            wait_line();
        }
    }
    drop(stream);
    Ok(())
}

/// Clears O_NONBLOCK on the shared file description, reads the uffd in a thread of its own,
/// and faults pages from threads of their own (a stolen fault's thread waits for ever).
fn steal(uffd: &userfaultfd::Uffd, base: u64, size: u64) -> anyhow::Result<()> {
    let fd = uffd.as_raw_fd();
    let flags = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFL).context("F_GETFL")?;
    let blocking = nix::fcntl::OFlag::from_bits_retain(flags) - nix::fcntl::OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFL(blocking)).context("F_SETFL")?;
    let stolen = Arc::new(AtomicU64::new(0));
    {
        let stolen = Arc::clone(&stolen);
        std::thread::spawn(move || {
            let mut buf = [0u8; 32 * 16];
            while let Ok(n) = nix::unistd::read(fd, &mut buf) {
                if n == 0 {
                    break;
                }
                stolen.fetch_add((n / 32) as u64, Ordering::Relaxed);
            }
        });
    }
    let served = Arc::new(AtomicU64::new(0));
    // Touches until the reader has taken some events (a pager at a higher priority may win
    // every race for a while), at least 256 pages, at most the whole region.
    let mut pages = 0;
    for page in 0..size / 4096 {
        if page >= 256 && stolen.load(Ordering::Relaxed) > 0 {
            break;
        }
        pages += 1;
        let served = Arc::clone(&served);
        std::thread::spawn(move || {
            touch(base, page);
            served.fetch_add(1, Ordering::Relaxed);
        });
        std::thread::sleep(Duration::from_millis(2));
    }
    std::thread::sleep(Duration::from_millis(200));
    emit(json!({"ok": true, "step": "stole", "touched": pages,
        "stolen": stolen.load(Ordering::Relaxed), "served": served.load(Ordering::Relaxed)}));
    Ok(())
}

/// Touches page 0, replaces the region by fresh memory registered again, and touches page 0
/// again, waiting at most `wait` for it.
fn remap_refault(
    uffd: &userfaultfd::Uffd,
    base: *mut libc::c_void,
    size: usize,
    wait: Duration,
) -> anyhow::Result<()> {
    let first = touch(base as u64, 0);
    emit(json!({"ok": true, "step": "touched", "word": first}));
    map_region(size, Some(base))?;
    uffd.register(base, size).context("UFFDIO_REGISTER of the fresh mapping")?;
    let (tx, rx) = std::sync::mpsc::channel();
    let addr = base as u64;
    let started = Instant::now();
    std::thread::spawn(move || {
        let _ = tx.send(touch(addr, 0));
    });
    match rx.recv_timeout(wait) {
        Ok(word) => emit(json!({"ok": true, "step": "refaulted", "word": word,
            "ms": u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX)})),
        Err(_) => emit(json!({"ok": false, "step": "refaulted",
            "error": format!("page 0 of the fresh mapping was not served within {wait:?}")})),
    }
    Ok(())
}
