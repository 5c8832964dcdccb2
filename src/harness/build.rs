//! Building the binaries a driver starts: `cargo run --bin uffd-demo` builds only the demo, so a
//! driver running under cargo (`CARGO` is set) builds the other binaries it needs first, with the
//! same profile, and a fresh checkout works with one command.

use std::process::Command;

/// Builds `bins` with the profile of the running executable, when running under `cargo run`.
/// Does nothing otherwise (the binaries are expected beside the executable). Returns what it did.
pub fn build_sibling_binaries(bins: &[&str]) -> Result<bool, String> {
    let Some(cargo) = std::env::var_os("CARGO") else { return Ok(false) };
    if bins.is_empty() {
        return Ok(false);
    }
    let exe = std::env::current_exe().map_err(|e| format!("locating the executable: {e}"))?;
    let profile = exe.parent().and_then(|d| d.file_name()).and_then(|n| n.to_str()).unwrap_or("");
    let mut cmd = Command::new(cargo);
    cmd.arg("build").arg("--quiet");
    match profile {
        "release" => {
            cmd.arg("--release");
        }
        "debug" => {}
        // An unknown layout (custom profile, installed binary): use what is there.
        _ => return Ok(false),
    }
    cmd.arg("--manifest-path").arg(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"));
    for b in bins {
        cmd.args(["--bin", b]);
    }
    let status = cmd.status().map_err(|e| format!("running cargo build: {e}"))?;
    if !status.success() {
        return Err(format!("cargo build of {} failed ({status})", bins.join(", ")));
    }
    Ok(true)
}
