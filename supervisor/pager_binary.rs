//! A pager binary before it runs: is it an executable file, and which version label does it
//! report (`--print-version`)?

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use crate::pagers::PagerError;

/// Checks that `path` names an executable regular file.
pub fn check_binary(path: &Path) -> Result<(), PagerError> {
    let bad = |reason: String| PagerError::Binary { path: path.display().to_string(), reason };
    let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
    if !meta.is_file() {
        return Err(bad("not a regular file".into()));
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return Err(bad("not executable".into()));
    }
    Ok(())
}

/// The version label a pager binary reports (`<binary> --print-version`, first line).
pub async fn probe_version(binary: &Path) -> Result<String, PagerError> {
    let probe_err =
        |reason: String| PagerError::Probe { binary: binary.display().to_string(), reason };
    let output = Command::new(binary)
        .arg("--print-version")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(10), output)
        .await
        .map_err(|_| probe_err("no answer within 10s".into()))?
        .map_err(|e| probe_err(e.to_string()))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(probe_err(format!("{}: {}", output.status, tail.join(" | "))));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let label = stdout.lines().next().unwrap_or("").trim().to_string();
    crate::session_id::validate(&label)
        .map_err(|e| probe_err(format!("printed {label:?}, not a usable version label: {e}")))?;
    Ok(label)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_binary_must_exist_and_be_executable() {
        let err = check_binary(Path::new("/nonexistent/uffd-pager")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/uffd-pager"), "{err}");
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("pager");
        std::fs::write(&p, "#!/bin/sh\n").unwrap();
        assert!(check_binary(&p).unwrap_err().to_string().contains("not executable"));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(check_binary(&p).is_ok());
        assert!(check_binary(d.path()).unwrap_err().to_string().contains("not a regular file"));
    }

    #[tokio::test]
    async fn a_version_label_is_what_the_binary_prints() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("pager");
        std::fs::write(&p, "#!/bin/sh\necho 1.2.3-test\necho ignored\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(probe_version(&p).await.unwrap(), "1.2.3-test");
        std::fs::write(&p, "#!/bin/sh\necho 'no such flag' >&2\nexit 2\n").unwrap();
        let err = probe_version(&p).await.unwrap_err().to_string();
        assert!(err.contains("no such flag") && err.contains("exit status: 2"), "{err}");
        std::fs::write(&p, "#!/bin/sh\necho '../evil'\n").unwrap();
        assert!(probe_version(&p).await.unwrap_err().to_string().contains("not a usable"));
    }
}
