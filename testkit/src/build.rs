//! Building the binaries a driver starts: `cargo run --bin uffd-demo` builds only the demo, and
//! `cargo test` builds no binary of another crate than the one tested, so a driver running under
//! cargo (`CARGO` is set) builds the binaries it needs first, with the same profile, into the
//! same target directory, and a fresh checkout works with one command.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Every binary of the workspace: what [`binary`] builds, once per process.
pub const ALL_BINARIES: &[&str] =
    &["uffd-pager", "uffd-supervisor", "uffd-controller", "uffd-vmsim", "uffd-hostile-vmm"];

/// The workspace's manifest (this crate lives in `<workspace>/testkit`).
const WORKSPACE_MANIFEST: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml");

/// The running executable's profile directory (`target/<profile>`) and the profile's name: the
/// executable sits in it, or in its `deps/` (a test executable).
fn profile_dir() -> Result<(PathBuf, String), String> {
    let exe = std::env::current_exe().map_err(|e| format!("locating the executable: {e}"))?;
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    let profile = dir.file_name().and_then(|n| n.to_str()).unwrap_or("").to_string();
    Ok((dir, profile))
}

/// Whether cargo sets `key` for a program it runs (`cargo run`, `cargo test`), as opposed to what
/// configures cargo itself (`CARGO`, `CARGO_HOME`, `CARGO_TARGET_DIR`, `CARGO_BUILD_*`, ...).
fn set_by_cargo_for_its_run(key: &str) -> bool {
    key.starts_with("CARGO_PKG_")
        || matches!(
            key,
            "CARGO_MANIFEST_DIR"
                | "CARGO_MANIFEST_PATH"
                | "CARGO_CRATE_NAME"
                | "CARGO_BIN_NAME"
                | "CARGO_PRIMARY_PACKAGE"
                | "CARGO_TARGET_TMPDIR"
                | "CARGO_RUSTC_CURRENT_DIR"
                | "OUT_DIR"
        )
}

/// Builds `bins` with the profile of the running executable, when running under `cargo run` or
/// `cargo test`. Does nothing otherwise (the binaries are expected beside the executable).
/// Returns what it did.
pub fn build_sibling_binaries(bins: &[&str]) -> Result<bool, String> {
    let Some(cargo) = std::env::var_os("CARGO") else { return Ok(false) };
    if bins.is_empty() {
        return Ok(false);
    }
    let (dir, profile) = profile_dir()?;
    let mut cmd = Command::new(cargo);
    cmd.arg("build").arg("--quiet");
    // Without what cargo sets for the process it runs (its package's name, manifest, ...): build
    // scripts that watch those (ring's does) would otherwise see a change, and rebuild their
    // crate and every crate above it, on every switch between this build and a plain one.
    for (key, _) in std::env::vars_os() {
        if key.to_str().is_some_and(set_by_cargo_for_its_run) {
            cmd.env_remove(&key);
        }
    }
    match profile.as_str() {
        "release" => {
            cmd.arg("--release");
        }
        "debug" => {}
        // An unknown layout (custom profile, installed binary): use what is there.
        _ => return Ok(false),
    }
    // Into the target directory the running executable came from, whether it was chosen by
    // `CARGO_TARGET_DIR`, `--target-dir` or the default.
    if let Some(target_dir) = dir.parent() {
        cmd.arg("--target-dir").arg(target_dir);
    }
    cmd.arg("--manifest-path").arg(WORKSPACE_MANIFEST).arg("--workspace");
    for b in bins {
        cmd.args(["--bin", b]);
    }
    let status = cmd.status().map_err(|e| format!("running cargo build: {e}"))?;
    if !status.success() {
        return Err(format!("cargo build of {} failed ({status})", bins.join(", ")));
    }
    Ok(true)
}

/// The path of the workspace's binary `name` (one of [`ALL_BINARIES`]), for tests: the first call
/// in a process builds them all under cargo ([`build_sibling_binaries`]), so a test always starts
/// the binaries of the sources it was built from.
///
/// # Panics
/// If that build fails.
pub fn binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<Result<bool, String>> = OnceLock::new();
    if let Err(e) = BUILT.get_or_init(|| build_sibling_binaries(ALL_BINARIES)) {
        panic!("building the workspace's binaries: {e}");
    }
    crate::bin_path(name)
}

#[cfg(test)]
mod tests {
    use super::set_by_cargo_for_its_run;

    #[test]
    fn what_cargo_sets_for_its_run_is_dropped_and_what_configures_cargo_is_kept() {
        for k in ["CARGO_PKG_NAME", "CARGO_PKG_VERSION_MAJOR", "CARGO_MANIFEST_DIR", "OUT_DIR"] {
            assert!(set_by_cargo_for_its_run(k), "{k}");
        }
        for k in ["CARGO", "CARGO_HOME", "CARGO_TARGET_DIR", "CARGO_BUILD_JOBS", "PATH"] {
            assert!(!set_by_cargo_for_its_run(k), "{k}");
        }
    }
}
