//! `uffd-vmsim`: a VMM stand-in that restores guest memory exactly as Firecracker does with the
//! `Uffd` memory backend, then runs verifying workloads on it.
//!
//! ```text
//! uffd-vmsim make-memfile /tmp/mem --size 64M --seed 1 --zero-fraction 0.25 --hole-fraction 0.25
//! uffd-vmsim run --socket /run/uffd-pager/s1.sock --memory-file /tmp/mem [--region 32M@0[:2M] ...]
//! uffd-vmsim run ... --workload random:0.25,seq,verify [--hold]
//! uffd-vmsim run ... --workload random:0.25,write:0:100:1,standby:/tmp/s1.mem   # a new snapshot
//! uffd-vmsim run ... --handshake-padding 60K        # a large (still valid) handshake
//! uffd-vmsim silent /run/uffd-pager/sessions/a.sock ...   # connect, say nothing, hold
//! uffd-vmsim run --socket ... --memory-file /tmp/s1.mem --region ...            # restore from it
//! ```
//!
//! `run` prints `{"ok":true,"cmd":"restored","pid":N,"regions":[...]}` once the handshake is sent,
//! then reads one command per line from stdin and prints exactly one JSON line per command
//! (see `vmsim::control`). Logs go to stderr; stdout carries only JSON lines.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use vmsim::{
    parse_size, parse_workload_list, write_memory_file, Command, CommandRunner, GuestRegionSpec,
    MemoryFileSpec, Reply, Vm,
};

#[derive(Debug, Parser)]
#[command(name = "uffd-vmsim", version, about = "Simulated Firecracker VMM for uffd pagers")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Write a synthetic snapshot memory file (random pages, written zero pages, sparse holes).
    MakeMemfile(MakeMemfile),
    /// Restore a VM against a pager socket and drive it from stdin (or run --workload).
    Run(Run),
    /// A hostile VMM: connect to each socket and send nothing, holding the connections until
    /// stdin closes. Prints `{"ok":true,"cmd":"silent","connected":N,"pid":P}` once connected.
    Silent(Silent),
}

#[derive(Debug, Args)]
struct Silent {
    /// The sockets to connect to (a session's `socket_path`).
    #[arg(required = true)]
    sockets: Vec<PathBuf>,
}

#[derive(Debug, Args)]
struct MakeMemfile {
    /// Where to write the file (created or truncated).
    path: PathBuf,
    /// File size, a multiple of 4 KiB (K/M/G suffixes).
    #[arg(long, default_value = "64M", value_parser = size_arg)]
    size: u64,
    /// Seed of every page kind and random byte.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Share of pages that are written zeros.
    #[arg(long, default_value_t = 0.25)]
    zero_fraction: f64,
    /// Share of pages that are sparse holes.
    #[arg(long, default_value_t = 0.25)]
    hole_fraction: f64,
}

#[derive(Debug, Args)]
struct Run {
    /// The pager's (or supervisor's session) Unix socket: Firecracker's `backend_path`.
    #[arg(long)]
    socket: PathBuf,
    /// The snapshot memory file.
    #[arg(long)]
    memory_file: PathBuf,
    /// A guest region `SIZE[@OFFSET][:PAGESIZE]` (PAGESIZE 4K or 2M); repeatable.
    /// Default: one region covering the whole file with 4 KiB pages.
    #[arg(long = "region", value_parser = region_arg)]
    regions: Vec<GuestRegionSpec>,
    /// Run these commands, then exit: `random:0.25,seq,write:0:100:1,balloon:0:0:1M,verify`.
    #[arg(long)]
    workload: Option<String>,
    /// With --workload: afterwards keep the VM (and its socket) open, reading commands from
    /// stdin until it closes.
    #[arg(long)]
    hold: bool,
    /// Put this many bytes of JSON whitespace before the handshake's array (a valid handshake,
    /// as large as asked: a large one reaches the pager in several reads).
    #[arg(long, value_parser = size_arg, default_value = "0")]
    handshake_padding: u64,
    /// `OFFSET:FILE`: the session was given FILE's bytes as an overlay at OFFSET of the memory
    /// file (CreateSession `overlays`): expect them there instead of the file's. Repeatable.
    #[arg(long = "overlay", value_name = "OFFSET:FILE", value_parser = overlay_arg)]
    overlays: Vec<(u64, PathBuf)>,
    /// Give up on a command after this many seconds (a pager that never serves a fault blocks
    /// the VM forever): print an error line and exit with status 3.
    #[arg(long, value_name = "SECONDS")]
    command_timeout: Option<f64>,
}

fn size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

fn overlay_arg(s: &str) -> Result<(u64, PathBuf), String> {
    let (offset, file) = s.split_once(':').ok_or_else(|| format!("{s:?} is not OFFSET:FILE"))?;
    let offset = parse_size(offset).map_err(|e| format!("overlay offset {offset:?}: {e}"))?;
    if file.is_empty() {
        return Err(format!("{s:?}: no FILE after the offset"));
    }
    Ok((offset, PathBuf::from(file)))
}

fn region_arg(s: &str) -> Result<GuestRegionSpec, String> {
    s.parse().map_err(|e: vmsim::parse::ParseError| e.to_string())
}

/// Prints one JSON line on stdout. A closed stdout means nobody listens any more: exit.
fn emit(reply: &Reply) {
    let mut out = std::io::stdout().lock();
    if writeln!(out, "{}", reply.to_line()).and_then(|()| out.flush()).is_err() {
        std::process::exit(1);
    }
}

/// Exit status when a command did not finish within --command-timeout.
const EXIT_TIMEOUT: u8 = 3;

/// The VM lives on its own thread, so that a command stuck on a fault can be timed out.
struct Worker {
    commands: mpsc::Sender<Command>,
    replies: mpsc::Receiver<Reply>,
    thread: JoinHandle<()>,
    timeout: Option<Duration>,
}

impl Worker {
    fn spawn(mut runner: CommandRunner, timeout: Option<Duration>) -> anyhow::Result<Worker> {
        let (commands, rx) = mpsc::channel::<Command>();
        let (tx, replies) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("vm".into())
            .spawn(move || {
                for cmd in rx {
                    let reply = runner.execute(&cmd);
                    let exit = cmd == Command::Exit;
                    if tx.send(reply).is_err() || exit {
                        break;
                    }
                }
                drop(runner); // unmaps guest memory and closes the socket: the VMM's EOF
            })
            .context("spawning the VM thread")?;
        Ok(Worker { commands, replies, thread, timeout })
    }

    /// Runs one command and prints its reply; on timeout prints an error and exits. Returns
    /// true when the command succeeded and verified no mismatch.
    fn run(&self, cmd: Command) -> bool {
        let name = cmd.name();
        let started = Instant::now();
        if self.commands.send(cmd).is_err() {
            emit(&Reply::error(name, "the VM thread is gone"));
            std::process::exit(1);
        }
        let reply = match self.timeout {
            None => self.replies.recv().map_err(|_| None),
            Some(limit) => self.replies.recv_timeout(limit).map_err(|e| match e {
                mpsc::RecvTimeoutError::Timeout => Some(limit),
                mpsc::RecvTimeoutError::Disconnected => None,
            }),
        };
        match reply {
            Ok(reply) => {
                tracing::debug!(cmd = name, ok = reply.ok, elapsed = ?started.elapsed(), "command done");
                emit(&reply);
                reply.ok
                    && reply.report.as_ref().is_none_or(|r| r.is_clean())
                    && reply.reader.as_ref().is_none_or(|r| r.is_clean())
            }
            Err(Some(limit)) => {
                tracing::error!(
                    cmd = name,
                    ?limit,
                    "command timed out; the pager may not be serving faults"
                );
                emit(&Reply::error(
                    name,
                    format!("timed out after {limit:?}; the pager may not be serving faults"),
                ));
                std::process::exit(EXIT_TIMEOUT.into());
            }
            Err(None) => {
                emit(&Reply::error(name, "the VM thread panicked"));
                std::process::exit(1);
            }
        }
    }

    /// Sends `exit` and waits for the VM to be dropped.
    fn finish(self) -> bool {
        let clean = self.run(Command::Exit);
        drop(self.commands);
        if self.thread.join().is_err() {
            tracing::error!("the VM thread panicked");
            return false;
        }
        clean
    }
}

fn make_memfile(args: &MakeMemfile) -> anyhow::Result<serde_json::Value> {
    let spec = MemoryFileSpec {
        size: args.size,
        seed: args.seed,
        zero_fraction: args.zero_fraction,
        hole_fraction: args.hole_fraction,
    };
    let started = Instant::now();
    write_memory_file(&args.path, &spec)
        .with_context(|| format!("writing the memory file {}", args.path.display()))?;
    let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
    tracing::info!(path = %args.path.display(), size = spec.size, elapsed_ms, "memory file written");
    Ok(serde_json::json!({
        "ok": true,
        "cmd": "make-memfile",
        "path": args.path,
        "spec": spec,
        "pages": spec.counts(),
        "elapsed_ms": elapsed_ms,
    }))
}

fn run(args: Run) -> anyhow::Result<ExitCode> {
    let timeout = match args.command_timeout {
        Some(s) => Some(Duration::try_from_secs_f64(s).context("--command-timeout")?),
        None => None,
    };
    let workload =
        args.workload.as_deref().map(parse_workload_list).transpose().context("--workload")?;
    let regions = if args.regions.is_empty() {
        let len = std::fs::metadata(&args.memory_file)
            .with_context(|| format!("reading the size of {}", args.memory_file.display()))?
            .len();
        vec![GuestRegionSpec { size: len, page_size: 4096, offset: 0 }]
    } else {
        args.regions
    };
    let mut overlays = Vec::with_capacity(args.overlays.len());
    for (offset, path) in &args.overlays {
        let bytes = std::fs::read(path)
            .with_context(|| format!("reading the overlay {}", path.display()))?;
        overlays.push((*offset, bytes));
    }
    let padding = usize::try_from(args.handshake_padding).context("--handshake-padding")?;
    let vm = match Vm::restore_padded(&args.socket, &args.memory_file, &regions, &overlays, padding)
    {
        Ok(vm) => vm,
        Err(e) => {
            let e = anyhow::Error::new(e);
            tracing::error!("restore failed: {e:#}");
            emit(&Reply::error("restored", format!("{e:#}")));
            return Ok(ExitCode::FAILURE);
        }
    };
    let runner = CommandRunner::new(vm);
    emit(&runner.restored_reply());
    let worker = Worker::spawn(runner, timeout)?;

    if let Some(commands) = workload {
        // Non-interactive: the exit status says whether every command succeeded and verified.
        let mut clean = true;
        for cmd in commands {
            if cmd == Command::Exit {
                break;
            }
            clean &= worker.run(cmd);
        }
        if !args.hold {
            clean &= worker.finish();
            return Ok(if clean { ExitCode::SUCCESS } else { ExitCode::FAILURE });
        }
    }

    for line in std::io::stdin().lock().lines() {
        let line = line.context("reading stdin")?;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        match line.parse::<Command>() {
            Ok(Command::Exit) => break,
            Ok(cmd) => {
                worker.run(cmd);
            }
            Err(e) => {
                let name = line.split_whitespace().next().unwrap_or_default();
                emit(&Reply::error(name, e));
            }
        }
    }
    // `exit`, or stdin closed. Interactive runs exit 0: each reply said how its command went.
    worker.finish();
    Ok(ExitCode::SUCCESS)
}

fn silent(args: &Silent) -> anyhow::Result<ExitCode> {
    // A connection per socket: a thousand need more descriptors than a usual soft limit.
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("reading RLIMIT_NOFILE")?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).context("raising RLIMIT_NOFILE")?;
    }
    let mut held = Vec::with_capacity(args.sockets.len());
    for path in &args.sockets {
        let stream = std::os::unix::net::UnixStream::connect(path)
            .with_context(|| format!("connecting to {}", path.display()))?;
        held.push(stream);
    }
    let line = serde_json::json!({
        "ok": true,
        "cmd": "silent",
        "connected": held.len(),
        "pid": std::process::id(),
    });
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{line}").and_then(|()| out.flush()).context("writing stdout")?;
    }
    // Hold every connection, saying nothing, until stdin closes.
    std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink()).context("reading stdin")?;
    drop(held);
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    // The services' log setup (text on stderr, RUST_LOG, never a panic on a failed write).
    uffdpager::logging::init(uffdpager::logging::LogFormat::Text);
    let cli = Cli::parse();
    let name = match cli.command {
        Cmd::MakeMemfile(_) => "make-memfile",
        Cmd::Run(_) => "run",
        Cmd::Silent(_) => "silent",
    };
    let result = match cli.command {
        Cmd::MakeMemfile(args) => make_memfile(&args).map(|line| {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
            ExitCode::SUCCESS
        }),
        Cmd::Run(args) => run(args),
        Cmd::Silent(args) => silent(&args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("{e:#}");
            emit(&Reply::error(name, format!("{e:#}")));
            ExitCode::FAILURE
        }
    }
}
