//! The demo, the whole story: a supervisor with pager version v1, simulated VMs restored from one
//! snapshot, a deploy of v2 (blue-green), more VMs on v2, then the controller graduating sessions
//! under its policy — v1's first — live, until v1 has drained to zero and exited; finally every
//! VM's memory is verified byte for byte and a summary printed. Runs on embedded defaults.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use testkit::{bin_path, SupervisorOptions, SupervisorProcess, VmProcess};
use tonic::transport::Channel;
use uffdpager::api::controller_client::ControllerClient;
use uffdpager::api::supervisor_client::SupervisorClient;
use uffdpager::api::{
    CreateSessionRequest, DeployVersionRequest, GetStatusRequest, ListSessionsRequest,
    ListVersionsRequest, Session, SessionState, VersionState,
};
use vmsim::memfile::{write_memory_file, MemoryFileSpec};

#[derive(Debug, Parser)]
#[command(
    name = "uffd-demo",
    about = "Blue-green uffd pagers: restore VMs, upgrade, graduate live"
)]
struct Cli {
    /// VMs restored on v1, before the upgrade.
    #[arg(long, default_value_t = 3)]
    v1_vms: usize,
    /// VMs restored on v2, after the upgrade.
    #[arg(long, default_value_t = 2)]
    v2_vms: usize,
    /// Size of the snapshot memory file (and of each VM), in MiB.
    #[arg(long, default_value_t = 256)]
    size_mib: u64,
    /// The controller's soak before a session may graduate, in seconds.
    #[arg(long, default_value_t = 2)]
    soak_secs: u64,
    /// Runtime directory of the supervisor (default: a fresh temporary directory).
    #[arg(long)]
    runtime_dir: Option<PathBuf>,
    /// Show the supervisor's, pagers', controller's and VMs' logs.
    #[arg(long)]
    logs: bool,
}

const STEP: Duration = Duration::from_secs(60);

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

fn state(s: &Session) -> &'static str {
    s.state().as_str_name().trim_start_matches("SESSION_STATE_")
}

struct DemoVm {
    id: String,
    vm: VmProcess,
}

async fn restore(
    client: &mut SupervisorClient<Channel>,
    id: &str,
    memfile: &Path,
    size: u64,
) -> anyhow::Result<DemoVm> {
    let s = client
        .create_session(CreateSessionRequest {
            session_id: id.into(),
            memory_file: memfile.display().to_string(),
            labels: [("demo".to_string(), "true".to_string())].into(),
            ..Default::default()
        })
        .await
        .with_context(|| format!("CreateSession {id}"))?
        .into_inner();
    // Two regions at offsets of one memory file, as Firecracker lays out a VM with a hole.
    let half = size / 2;
    let regions = [format!("{half}@0"), format!("{half}@{half}")];
    let socket = PathBuf::from(&s.socket_path);
    let memfile = memfile.to_path_buf();
    let mut vm = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = regions.iter().map(String::as_str).collect();
        VmProcess::restore(&bin_path("uffd-vmsim"), &socket, &memfile, &args, STEP)
    })
    .await??;
    let pages = size / 4096;
    let read = vm.verified(&format!("read-random {}", pages / 8), STEP)?;
    vm.command(&format!("write {} 64 1", pages / 3), STEP)?;
    vm.command(&format!("balloon 1 0 {}", 4 << 20), STEP)?;
    // A reader keeps touching a working set (the first eighth) while the VM runs and graduates;
    // the rest stays missing until graduation copies it.
    vm.command(&format!("reader-start 42 0 {}", pages / 8), STEP)?;
    println!(
        "  {id}: restored (vmm pid {}), read {} random pages, wrote 64, ballooned 4 MiB; a reader keeps touching its working set",
        vm.pid, read["pages_verified"]
    );
    Ok(DemoVm { id: id.into(), vm })
}

fn print_sessions(sessions: &[Session]) {
    println!(
        "  {:<8} {:<8} {:<10} {:<9} {:>10} {:>10} {:>8}",
        "SESSION", "VERSION", "STATE", "OUTDATED", "RESIDENT", "TOTAL", "FAULTS"
    );
    for s in sessions {
        println!(
            "  {:<8} {:<8} {:<10} {:<9} {:>8.1}Mi {:>8.1}Mi {:>8}",
            s.id,
            s.pager_version,
            state(s),
            s.outdated,
            mib(s.resident_bytes),
            mib(s.total_bytes),
            s.faults
        );
    }
}

async fn print_versions(client: &mut SupervisorClient<Channel>) -> anyhow::Result<()> {
    let v = client.list_versions(ListVersionsRequest {}).await?.into_inner();
    for pv in &v.versions {
        println!(
            "  version {:<4} {:<9} pid {:<7} sessions {}",
            pv.version,
            pv.state().as_str_name().trim_start_matches("VERSION_STATE_"),
            pv.pid,
            pv.session_count
        );
    }
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Under `cargo run`, build the processes the demo starts (a fresh checkout has none).
    testkit::build_sibling_binaries(&[
        "uffd-supervisor",
        "uffd-pager",
        "uffd-vmsim",
        "uffd-controller",
    ])
    .map_err(anyhow::Error::msg)?;
    if !cli.logs && std::env::var_os("RUST_LOG").is_none() {
        // The children log at warn: the demo's own lines tell the story.
        std::env::set_var("RUST_LOG", "warn");
    }
    let tmp =
        tempfile::Builder::new().prefix("uffd-demo-").tempdir().context("temporary directory")?;
    let dir = cli.runtime_dir.clone().unwrap_or_else(|| tmp.path().join("run"));
    let memfile = tmp.path().join("snapshot.mem");
    let size = cli.size_mib << 20;

    println!("== uffd-pager demo: blue-green pagers, live graduation ==");
    let spec = MemoryFileSpec { size, seed: 7, zero_fraction: 0.2, hole_fraction: 0.2 };
    write_memory_file(&memfile, &spec).context("writing the snapshot memory file")?;
    println!(
        "snapshot {} ({} MiB: 60% data, 20% zero pages, 20% holes)",
        memfile.display(),
        cli.size_mib
    );

    // 1. The supervisor with pager version v1.
    let opts = SupervisorOptions {
        show_logs: cli.logs,
        args: vec!["--pager-version".into(), "v1".into()],
        ..Default::default()
    };
    let sup = SupervisorProcess::start(&bin_path("uffd-supervisor"), &dir, &opts)
        .await
        .context("starting uffd-supervisor")?;
    let mut client = sup.client();
    println!("\n[1] supervisor on {} with pager version v1", sup.socket.display());
    let mut vms = Vec::new();
    for i in 0..cli.v1_vms {
        vms.push(restore(&mut client, &format!("vm-{i}"), &memfile, size).await?);
    }

    // 2. Blue-green upgrade: deploy v2 (same build, another label); new VMs land on v2.
    let v2 = client
        .deploy_version(DeployVersionRequest {
            binary_path: bin_path("uffd-pager").display().to_string(),
            version: "v2".into(),
        })
        .await
        .context("DeployVersion v2")?
        .into_inner();
    println!("\n[2] deployed v2 (pid {}): v2 is active, v1 drains", v2.pid);
    for i in cli.v1_vms..cli.v1_vms + cli.v2_vms {
        vms.push(restore(&mut client, &format!("vm-{i}"), &memfile, size).await?);
    }
    let list = client.list_sessions(ListSessionsRequest {}).await?.into_inner();
    print_sessions(&list.sessions);
    print_versions(&mut client).await?;

    // 3. The controller: soak, one completion at a time, outdated versions first.
    let ctl_sock = dir.join("controller.sock");
    let mut controller = tokio::process::Command::new(bin_path("uffd-controller"))
        .args(["--enabled", "--max-concurrent", "1", "--scan-interval", "1s"])
        .arg("--min-session-age")
        .arg(format!("{}s", cli.soak_secs))
        .arg("--supervisors")
        .arg(format!("unix:{}", sup.socket.display()))
        .arg("--listen")
        .arg(format!("unix:{}", ctl_sock.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(if cli.logs { Stdio::inherit() } else { Stdio::null() })
        .kill_on_drop(true)
        .spawn()
        .context("starting uffd-controller")?;
    println!(
        "\n[3] controller started: soak {}s, max_concurrent 1, outdated (v1) sessions first",
        cli.soak_secs
    );

    let started = Instant::now();
    let mut seen: BTreeMap<String, (String, &'static str)> = BTreeMap::new();
    let mut v1_exited_at = None;
    loop {
        let list = client.list_sessions(ListSessionsRequest {}).await?.into_inner();
        for s in &list.sessions {
            let now = (s.pager_version.clone(), state(s));
            if seen.get(&s.id) != Some(&now) {
                let pct = 100.0 * s.resident_bytes as f64 / s.total_bytes.max(1) as f64;
                println!(
                    "  t+{:>5.1}s  {:<6} {:<4} {:<10} resident {:>5.1}%",
                    started.elapsed().as_secs_f64(),
                    s.id,
                    s.pager_version,
                    now.1,
                    pct
                );
                seen.insert(s.id.clone(), now);
            }
        }
        let versions = client.list_versions(ListVersionsRequest {}).await?.into_inner();
        let v1 = versions.versions.iter().find(|v| v.version == "v1");
        if v1_exited_at.is_none() && v1.is_some_and(|v| v.state() == VersionState::Exited) {
            v1_exited_at = Some(started.elapsed());
            println!(
                "  t+{:>5.1}s  version v1 drained to zero sessions and exited",
                started.elapsed().as_secs_f64()
            );
        }
        let all_done = list.sessions.iter().all(|s| s.state() == SessionState::Graduated);
        if all_done && v1_exited_at.is_some() {
            break;
        }
        if started.elapsed() > Duration::from_secs(300) {
            bail!("graduation did not finish within 5 minutes");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // 4. What the controller recorded, and every VM's memory, byte for byte.
    let mut ctl = ControllerClient::new(uffdpager::grpc::uds_channel(&ctl_sock));
    let status =
        ctl.get_status(GetStatusRequest {}).await.context("Controller/GetStatus")?.into_inner();
    println!("\n[4] graduations, in the order the controller ran them:");
    for o in &status.outcomes {
        let d = o.duration.map(|d| d.seconds as f64 + f64::from(d.nanos) / 1e9).unwrap_or(0.0);
        println!(
            "  {:<6} {:<4} {:>7.0} ms  {:>6.1} MiB copied  ({})",
            o.session_id,
            o.pager_version,
            d * 1000.0,
            mib(o.populated_bytes),
            o.reason
        );
    }
    println!("\n[5] verifying every VM:");
    for DemoVm { id, vm } in &mut vms {
        let reader = vm.verified("reader-stop", STEP)?;
        let all = vm.verified("verify", STEP)?;
        let smaps = vm.command("smaps", STEP)?;
        if smaps["registered_vmas"].as_u64() != Some(0) {
            bail!("{id}: guest memory still registered with userfaultfd after graduation: {smaps}");
        }
        println!(
            "  {id}: its reader verified {} pages, before, during and after graduation (longest read {:.2} ms on 2 busy CPUs); all {} pages right after; no uffd left",
            reader["pages_verified"],
            reader["stall_max_us"].as_f64().unwrap_or(0.0) / 1000.0,
            all["pages_verified"]
        );
    }
    let _ = controller.kill().await;
    let n = vms.len();
    for DemoVm { vm, .. } in vms {
        vm.exit()?;
    }
    sup.stop().await;
    println!(
        "\n== summary: {n} VMs restored on v1 and v2, all graduated under the controller's policy (v1 first), \
v1 drained and exited after {:.1}s, every byte verified ==",
        v1_exited_at.unwrap_or_default().as_secs_f64()
    );
    Ok(())
}
