//! A pager binary before it runs: is it an executable file that only root can change, and
//! which version label does it report (`--print-version`)?
//!
//! A pager runs as root (it serves other processes' memory), so whoever can write its binary, or
//! rename anything in a directory on its path, can run code as root. As sudo and systemd
//! require of what they execute, the binary must be owned by root (or the supervisor's own uid)
//! and not writable by group or others, and so must every directory from it up to `/`, along
//! the path as given and as resolved through symlinks; a directory writable by others is
//! accepted only when it is sticky and owned by root (`/tmp`: nobody else may rename or delete
//! what root owns in it).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use crate::pager_exit::PagerError;

/// The owner and mode of a file or directory: what the trust checks read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owned {
    pub uid: u32,
    pub mode: u32,
}

impl From<&std::fs::Metadata> for Owned {
    fn from(m: &std::fs::Metadata) -> Self {
        Self { uid: m.uid(), mode: m.mode() }
    }
}

fn owned_by_trusted(o: Owned, trusted_uid: u32) -> Result<(), String> {
    if o.uid == 0 || o.uid == trusted_uid {
        Ok(())
    } else {
        Err(format!("owned by uid {}, not root", o.uid))
    }
}

/// The binary itself: owned by root (or `trusted_uid`), not writable by group or others.
pub fn trusted_binary(o: Owned, trusted_uid: u32) -> Result<(), String> {
    owned_by_trusted(o, trusted_uid)?;
    if o.mode & 0o022 != 0 {
        return Err(format!("writable by group or others (mode {:04o})", o.mode & 0o7777));
    }
    Ok(())
}

/// A directory on the binary's path: owned by root (or `trusted_uid`) and not writable by group
/// or others, unless sticky and owned by root.
pub fn trusted_directory(o: Owned, trusted_uid: u32) -> Result<(), String> {
    owned_by_trusted(o, trusted_uid)?;
    let sticky_root = o.mode & 0o1000 != 0 && o.uid == 0;
    if o.mode & 0o022 != 0 && !sticky_root {
        return Err(format!(
            "writable by group or others and not a sticky root-owned directory (mode {:04o})",
            o.mode & 0o7777
        ));
    }
    Ok(())
}

/// Checks that `path` names an executable regular file that only root (or this process's uid)
/// can change (see the module's doc).
pub fn check_binary(path: &Path) -> Result<(), PagerError> {
    let bad = |reason: String| PagerError::Binary { path: path.display().to_string(), reason };
    let trusted_uid = nix::unistd::geteuid().as_raw();
    let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
    if !meta.is_file() {
        return Err(bad("not a regular file".into()));
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return Err(bad("not executable".into()));
    }
    trusted_binary(Owned::from(&meta), trusted_uid).map_err(|why| {
        bad(format!("{why}: a pager runs as root, so only root may be able to change its binary"))
    })?;
    let absolute = std::path::absolute(path).map_err(|e| bad(e.to_string()))?;
    let resolved = std::fs::canonicalize(path).map_err(|e| bad(e.to_string()))?;
    for dir in absolute.ancestors().skip(1).chain(resolved.ancestors().skip(1)) {
        let meta = std::fs::metadata(dir).map_err(|e| bad(format!("{}: {e}", dir.display())))?;
        trusted_directory(Owned::from(&meta), trusted_uid).map_err(|why| {
            bad(format!(
                "the directory {} on its path is {why}: whoever can write it can replace the \
                 binary of a root process",
                dir.display()
            ))
        })?;
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

    fn owned(uid: u32, mode: u32) -> Owned {
        Owned { uid, mode }
    }

    #[test]
    fn a_binary_must_be_owned_by_root_and_writable_by_root_only() {
        assert_eq!(trusted_binary(owned(0, 0o100755), 0), Ok(()));
        assert_eq!(trusted_binary(owned(0, 0o100700), 0), Ok(()));
        assert_eq!(trusted_binary(owned(1000, 0o100755), 1000), Ok(()), "the supervisor's uid");
        assert_eq!(
            trusted_binary(owned(65534, 0o100755), 0).unwrap_err(),
            "owned by uid 65534, not root"
        );
        let err = trusted_binary(owned(0, 0o100775), 0).unwrap_err();
        assert_eq!(err, "writable by group or others (mode 0775)");
        assert!(trusted_binary(owned(0, 0o100757), 0).is_err());
    }

    #[test]
    fn a_directory_on_the_path_must_be_root_owned_and_not_writable_by_others_unless_sticky() {
        assert_eq!(trusted_directory(owned(0, 0o40755), 0), Ok(()));
        assert_eq!(trusted_directory(owned(0, 0o41777), 0), Ok(()), "/tmp");
        assert!(trusted_directory(owned(0, 0o40777), 0).is_err(), "world-writable, not sticky");
        assert!(trusted_directory(owned(0, 0o40775), 0).is_err(), "group-writable");
        assert!(trusted_directory(owned(65534, 0o41777), 0).is_err(), "sticky but not root's");
        assert!(trusted_directory(owned(65534, 0o40755), 0).is_err(), "someone else's");
    }

    #[test]
    fn a_binary_in_a_writable_directory_or_behind_a_symlink_into_one_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let open = d.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let p = open.join("pager");
        std::fs::write(&p, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        let err = check_binary(&p).unwrap_err().to_string();
        assert!(err.contains("the directory") && err.contains("open"), "{err}");
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&p, &link).unwrap();
        let err = check_binary(&link).unwrap_err().to_string();
        assert!(err.contains("open on its path"), "{err}");
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
