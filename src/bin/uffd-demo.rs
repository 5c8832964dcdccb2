//! The demo: a supervisor, a few simulated VMs restored from one snapshot memory file, their
//! sessions, and their graduation with live progress while a reader keeps touching memory; then
//! every VM's memory is verified byte for byte. Runs on embedded defaults with no set-up.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use uffdpager::api::{
    CompleteSessionRequest, CreateSessionRequest, GetSessionRequest, ListSessionsRequest,
};
use uffdpager::harness::{bin_path, SupervisorOptions, SupervisorProcess, VmProcess};
use uffdpager::vmsim::memfile::{write_memory_file, MemoryFileSpec};

#[derive(Debug, Parser)]
#[command(
    name = "uffd-demo",
    about = "Restore simulated VMs through uffd-pager and graduate them live"
)]
struct Cli {
    /// Number of VMs.
    #[arg(long, default_value_t = 3)]
    vms: usize,
    /// Size of the snapshot memory file (and of each VM), in MiB.
    #[arg(long, default_value_t = 256)]
    size_mib: u64,
    /// Runtime directory of the supervisor (default: a fresh temporary directory).
    #[arg(long)]
    runtime_dir: Option<PathBuf>,
    /// Show the supervisor's and pagers' logs.
    #[arg(long)]
    logs: bool,
}

const STEP: Duration = Duration::from_secs(60);

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let tmp =
        tempfile::Builder::new().prefix("uffd-demo-").tempdir().context("temporary directory")?;
    let dir = cli.runtime_dir.clone().unwrap_or_else(|| tmp.path().join("run"));
    let memfile = tmp.path().join("snapshot.mem");
    let size = cli.size_mib << 20;

    println!("== uffd-pager demo: {} VMs of {} MiB from one snapshot ==", cli.vms, cli.size_mib);
    let spec = MemoryFileSpec { size, seed: 7, zero_fraction: 0.2, hole_fraction: 0.2 };
    write_memory_file(&memfile, &spec).context("writing the snapshot memory file")?;
    println!(
        "snapshot memory file {} ({} MiB: 60% data, 20% zero pages, 20% holes)",
        memfile.display(),
        cli.size_mib
    );

    let opts = SupervisorOptions { show_logs: cli.logs, ..Default::default() };
    let sup = SupervisorProcess::start(&bin_path("uffd-supervisor"), &dir, &opts)
        .await
        .context("starting uffd-supervisor")?;
    println!("supervisor serving on {}", sup.socket.display());
    let mut client = sup.client();

    // Restore the VMs: each gets a session and its own socket, exactly as Firecracker would.
    let vmsim = bin_path("uffd-vmsim");
    let mut vms = Vec::new();
    for i in 0..cli.vms {
        let s = client
            .create_session(CreateSessionRequest {
                session_id: format!("demo-vm-{i}"),
                memory_file: memfile.display().to_string(),
                labels: [("demo".to_string(), "true".to_string())].into(),
            })
            .await
            .context("CreateSession")?
            .into_inner();
        let half = size / 2;
        let regions = [format!("{half}@0"), format!("{half}@{half}")];
        let socket = PathBuf::from(&s.socket_path);
        let vmsim = vmsim.clone();
        let mut vm = tokio::task::spawn_blocking(move || {
            let region_args: Vec<&str> = regions.iter().map(String::as_str).collect();
            VmProcess::restore(&vmsim, &socket, &PathBuf::from(&s.memory_file), &region_args, STEP)
        })
        .await??;
        let pages = size / 4096;
        vm.verified(&format!("read-random {}", pages / 8), STEP)?;
        vm.command(&format!("write {} 64 1", pages / 3), STEP)?;
        vm.command(&format!("balloon 1 0 {}", 4 << 20), STEP)?;
        println!("VM {i}: restored (pid {}), read 1/8 of its pages at random, wrote 64 pages, ballooned 4 MiB", vm.pid);
        vms.push(vm);
    }

    let list = client.list_sessions(ListSessionsRequest {}).await?.into_inner();
    println!(
        "\n{:<12} {:<10} {:<18} {:>10} {:>10} {:>8}",
        "SESSION", "VERSION", "STATE", "RESIDENT", "TOTAL", "FAULTS"
    );
    for s in &list.sessions {
        println!(
            "{:<12} {:<10} {:<18} {:>8.1}Mi {:>8.1}Mi {:>8}",
            s.id,
            s.pager_version,
            s.state().as_str_name().trim_start_matches("SESSION_STATE_"),
            mib(s.resident_bytes),
            mib(s.total_bytes),
            s.faults
        );
    }

    // Graduate each VM while a reader inside it keeps touching memory.
    println!();
    let tty = std::io::stdout().is_terminal();
    let mut summary = Vec::new();
    for (i, vm) in vms.iter_mut().enumerate() {
        let id = format!("demo-vm-{i}");
        vm.command("reader-start 42", STEP)?;
        let started = Instant::now();
        let mut call = client.clone();
        let req = CompleteSessionRequest { session_id: id.clone() };
        let mut done = tokio::spawn(async move { call.complete_session(req).await });
        let mut poller = client.clone();
        let result = loop {
            tokio::select! {
                r = &mut done => break r?,
                _ = tokio::time::sleep(Duration::from_millis(if tty { 50 } else { 250 })) => {
                    if let Ok(s) = poller.get_session(GetSessionRequest { session_id: id.clone() }).await {
                        let s = s.into_inner();
                        let frac = s.resident_bytes as f64 / s.total_bytes.max(1) as f64;
                        let bar = "#".repeat((frac * 40.0) as usize);
                        let line = format!("{id} graduating [{bar:<40}] {:>5.1}% resident", frac * 100.0);
                        if tty { print!("\r{line}"); std::io::stdout().flush()?; } else { println!("{line}"); }
                    }
                }
            }
        };
        let resp = result.with_context(|| format!("CompleteSession {id}"))?.into_inner();
        let wall = started.elapsed();
        let reader = vm.verified("reader-stop", STEP)?;
        let verify = vm.verified("verify", STEP)?;
        let smaps = vm.command("smaps", STEP)?;
        let registered = smaps["registered_vmas"].as_u64().unwrap_or(u64::MAX);
        if registered != 0 {
            bail!("{id}: {registered} regions still registered with userfaultfd after graduation");
        }
        let s = resp.session.clone().unwrap_or_default();
        if tty {
            println!();
        }
        println!(
            "{id}: {} in {:.0} ms: {:.1} MiB copied, {:.1} MiB zero skipped, {:.1} MiB ballooned skipped; reader verified {} pages during it (max stall {} us); all {} pages verified after",
            s.state().as_str_name().trim_start_matches("SESSION_STATE_"),
            wall.as_secs_f64() * 1000.0,
            mib(resp.populated_bytes),
            mib(resp.skipped_zero_bytes),
            mib(resp.skipped_removed_bytes),
            reader["pages_verified"],
            reader["stall_max_us"],
            verify["pages_verified"],
        );
        summary.push((id, wall, resp.populated_bytes));
    }

    println!("\n== summary ==");
    for (id, wall, bytes) in &summary {
        println!(
            "{id}: graduated in {:.0} ms ({:.2} GB/s copied), memory verified, no pager left",
            wall.as_secs_f64() * 1e3,
            *bytes as f64 / wall.as_secs_f64() / 1e9
        );
    }
    for vm in vms {
        vm.exit()?;
    }
    sup.stop().await;
    println!("all {} VMs verified byte for byte; done", summary.len());
    Ok(())
}
