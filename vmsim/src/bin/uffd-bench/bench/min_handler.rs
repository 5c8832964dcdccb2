//! The `min_fault_us` baseline: the smallest handler that can serve a Firecracker VM, in a
//! process of its own, serving exactly one page per fault — what Firecracker's example handler
//! (`src/firecracker/examples/uffd/valid_handler.rs`) does: block in `poll` on the uffd, read one
//! event, `UFFDIO_COPY` the faulting page from the mapped memory file with wake, repeat.
//!
//! The child is this very binary (`uffd-bench --min-handler SOCKET --memory-file FILE`): it binds
//! SOCKET, prints `ready`, accepts one VMM, reads Firecracker's handshake
//! (`uffdpager::firecracker::recv_handshake`) and serves until the VMM's socket reaches EOF.
//! The VM is a `vmsim::Vm` restored in the benchmark's process, exactly as it is
//! restored against the real supervisor for the project's figures.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsFd, FromRawFd, IntoRawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use memmap2::Mmap;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use uffdpager::firecracker::{recv_handshake, Region};
use uffdpager::uffd_ops::{self, FillOutcome};
use userfaultfd::{Event, Uffd};
use vmsim::{run_with_deadline, Amount, GuestRegionSpec, Report, Vm};

use super::placement::pin_current_thread;

/// The child: serves one VMM on `socket` from `memory_file`, one page per fault.
pub fn serve(socket: &Path, memory_file: &Path, cpu: Option<usize>) -> anyhow::Result<()> {
    if let Some(cpu) = cpu {
        pin_current_thread(cpu)?;
    }
    let file = File::open(memory_file)
        .with_context(|| format!("opening the memory file {}", memory_file.display()))?;
    // SAFETY: the benchmark writes its memory files before any handler starts and never changes
    // them while they are mapped.
    let map = unsafe { Mmap::map(&file) }.context("mapping the memory file")?;
    let listener =
        UnixListener::bind(socket).with_context(|| format!("binding {}", socket.display()))?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready").and_then(|()| out.flush()).context("telling the parent")?;
    let (stream, _) = listener.accept().context("accepting the VMM")?;
    let handshake =
        recv_handshake(stream.as_fd(), map.len() as u64).context("reading the handshake")?;
    // SAFETY: `recv_handshake` checked that the fd is a userfaultfd; we own it and move that
    // ownership into the `Uffd`, which closes it on drop.
    let uffd = unsafe { Uffd::from_raw_fd(handshake.uffd.into_raw_fd()) };
    loop {
        let mut fds = [
            PollFd::new(uffd.as_fd(), PollFlags::POLLIN),
            PollFd::new(stream.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => bail!("poll: {e}"),
        }
        // The VMM never writes after its handshake: a readable stream is its EOF.
        if fds[1].any().unwrap_or(false) {
            return Ok(());
        }
        // The uffd is non-blocking (Firecracker creates it so): `None` once nothing is queued.
        while let Some(event) = uffd.read_event().context("reading a uffd event")? {
            if let Event::Pagefault { addr, .. } = event {
                if !serve_page(&uffd, &handshake.regions, &map, addr as u64)? {
                    return Ok(());
                }
            }
            // REMOVE and the rest: the benchmark's VMs never balloon.
        }
    }
}

/// Copies the one page holding `addr`. False when the VMM's memory is gone.
fn serve_page(uffd: &Uffd, regions: &[Region], map: &Mmap, addr: u64) -> anyhow::Result<bool> {
    let Some(r) = regions.iter().find(|r| r.base <= addr && addr < r.end()) else {
        bail!("fault at {addr:#x} outside every region");
    };
    let page = addr & !(r.page_size - 1);
    let off = usize::try_from(r.offset + (page - r.base)).context("offset")?;
    let len = usize::try_from(r.page_size).context("page size")?;
    let mut done = 0;
    while done < len {
        let src = &map[off + done..off + len];
        match uffd_ops::copy(uffd, src, page + done as u64, true) {
            Ok(FillOutcome::Done) => return Ok(true),
            Ok(FillOutcome::Partial(n)) => done += usize::try_from(n).unwrap_or(0),
            Ok(FillOutcome::Exists) => {
                uffd_ops::wake(uffd, page, r.page_size).context("UFFDIO_WAKE")?;
                return Ok(true);
            }
            Ok(FillOutcome::Gone(_) | FillOutcome::NoMapping) => return Ok(false),
            Err(errno) => bail!("UFFDIO_COPY at {page:#x}: {errno}"),
        }
    }
    Ok(true)
}

/// A minimal handler child process; killed and reaped on drop.
#[derive(Debug)]
pub struct MinHandler {
    child: Child,
    pub socket: PathBuf,
}

impl MinHandler {
    /// Starts `uffd-bench --min-handler` on a socket in `dir` and waits until it listens.
    pub fn start(dir: &Path, memory_file: &Path, cpu: Option<usize>) -> anyhow::Result<Self> {
        let socket = dir.join(format!("min-handler-{}.sock", unique()));
        // This very executable, even if a build replaced the file since it started.
        let mut cmd = Command::new("/proc/self/exe");
        cmd.arg("--min-handler").arg(&socket).arg("--memory-file").arg(memory_file);
        if let Some(cpu) = cpu {
            cmd.arg("--cpu").arg(cpu.to_string());
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the minimal handler")?;
        let stdout = child.stdout.take().context("the handler's stdout")?;
        let mut line = String::new();
        let read = BufReader::new(stdout).read_line(&mut line);
        let mut handler = Self { child, socket };
        if !matches!(read, Ok(n) if n > 0 && line.trim() == "ready") {
            let status = handler.child.try_wait().ok().flatten();
            bail!("the minimal handler did not start (status {status:?}, said {line:?})");
        }
        Ok(handler)
    }

    /// Waits (briefly) for the handler to exit once its VM is gone.
    pub fn finish(mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(status) = self.child.try_wait().context("reaping the handler")? {
                if !status.success() {
                    bail!("the minimal handler exited with {status}");
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the minimal handler did not exit after its VM was gone");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Drop for MinHandler {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn unique() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Where the VM's thread and the handler run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub vm_cpu: Option<usize>,
    pub handler_cpu: Option<usize>,
}

impl Placement {
    /// Wherever the scheduler puts them (what a deployment gets by default).
    pub const FREE: Placement = Placement { vm_cpu: None, handler_cpu: None };
}

/// What one VM run against a minimal handler measured.
#[derive(Debug, Clone)]
pub struct HandlerRun {
    /// The workload's report (latencies of the first touches).
    pub first: Report,
    /// `read-seq` only: the same read again with every page resident (the simulator's own
    /// ceiling: what reading and verifying costs with no fault at all).
    pub resident: Option<Report>,
}

/// What the VM does.
#[derive(Debug, Clone, Copy)]
pub enum Workload {
    /// This many distinct random pages, each touched once.
    Random { pages: u64, seed: u64 },
    /// Every page once, in address order.
    Sequential,
}

/// Restores a VM of `size` bytes against a fresh minimal handler and runs `workload` on it.
pub fn run(
    dir: &Path,
    memory_file: &Path,
    size: u64,
    workload: Workload,
    placement: Placement,
    limit: Duration,
) -> anyhow::Result<HandlerRun> {
    let handler = MinHandler::start(dir, memory_file, placement.handler_cpu)?;
    let spec = GuestRegionSpec { size, page_size: 4096, offset: 0 };
    let vm = Vm::restore(&handler.socket, memory_file, &[spec])
        .context("restoring a VM against the minimal handler")?;
    let vm_cpu = placement.vm_cpu;
    let result = run_with_deadline(limit, move || {
        if let Some(cpu) = vm_cpu {
            pin_current_thread(cpu)?;
        }
        let run = match workload {
            Workload::Random { pages, seed } => {
                HandlerRun { first: vm.read_random(Amount::Pages(pages), seed), resident: None }
            }
            Workload::Sequential => {
                let first = vm.read_sequential();
                HandlerRun { first, resident: Some(vm.read_sequential()) }
            }
        };
        drop(vm); // the VMM's EOF: the handler exits
        anyhow::Ok(run)
    })
    .context("the VM on the minimal handler")??;
    handler.finish()?;
    for r in std::iter::once(&result.first).chain(&result.resident) {
        if r.mismatches > 0 {
            bail!("the VM on the minimal handler read wrong bytes: {:?}", r.first_mismatches);
        }
    }
    Ok(result)
}
