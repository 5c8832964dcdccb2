//! The runtime directory (`--runtime-dir`, default `/run/uffd-pager`) is the supervisor's own:
//! created by it, or refused.
//!
//! The supervisor runs as root and puts sockets, pid files and logs there. A directory another
//! user prepared (or could still change) would let that user point those at files of their
//! choosing: a `sessions` symlink to a directory elsewhere once made the supervisor chmod that
//! directory and delete a socket in it. So:
//!
//! - the directory is created (mode 0700) if missing, its parent left as it is (which must
//!   exist, be owned by root or the supervisor's euid, and not be writable by others unless
//!   sticky, as `/tmp`: otherwise its owner or anyone could swap the runtime directory later);
//! - an existing one must be a real directory (not a symlink), owned by the supervisor's euid,
//!   and not writable by group or others; its mode is left as it is (`--runtime-dir /run` must
//!   not make `/run` 0700);
//! - `sessions/`, `pagers/` and each `pagers/<version>/` under it likewise (created 0700, or
//!   checked); files in them are opened with `O_NOFOLLOW` ([`create_private_file`]).
//!
//! [`check_entry`] and [`check_parent`] are the decisions, tested as functions on `lstat` facts.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// What `lstat` says of a path, as far as the checks go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Facts {
    pub is_symlink: bool,
    pub is_dir: bool,
    pub uid: u32,
    /// The permission bits (with setuid, setgid, sticky).
    pub mode: u32,
}

impl Facts {
    fn of(meta: &std::fs::Metadata) -> Self {
        Self {
            is_symlink: meta.file_type().is_symlink(),
            is_dir: meta.is_dir(),
            uid: meta.uid(),
            mode: meta.mode() & 0o7777,
        }
    }
}

/// Why the runtime directory (or a directory under it) was refused. Each names the path.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RuntimeDirError {
    #[error(
        "runtime directory {path}: its parent does not exist (the supervisor creates the \
         runtime directory itself, never its parents)"
    )]
    NoParent { path: PathBuf },
    #[error(
        "runtime directory {path}: its parent {parent} is owned by uid {uid}, neither root nor \
         this supervisor's uid: that user could replace the runtime directory"
    )]
    ParentOwner { path: PathBuf, parent: PathBuf, uid: u32 },
    #[error(
        "runtime directory {path}: its parent {parent} is writable by other users (mode \
         {mode:04o}) and not sticky: anyone could replace the runtime directory"
    )]
    ParentWritable { path: PathBuf, parent: PathBuf, mode: u32 },
    #[error(
        "{path} is a symbolic link: the runtime directory and the directories under it must be \
         real directories (nothing there is followed through a symlink)"
    )]
    Symlink { path: PathBuf },
    #[error("{path} exists and is not a directory")]
    NotADirectory { path: PathBuf },
    #[error(
        "{path} is owned by uid {uid}, not by this supervisor's uid {euid}: refusing a runtime \
         directory that another user prepared"
    )]
    Owner { path: PathBuf, uid: u32, euid: u32 },
    #[error(
        "{path} is writable by group or others (mode {mode:04o}): refusing it (the supervisor \
         never changes the mode of a directory it did not create; make it 0700 or remove it)"
    )]
    Writable { path: PathBuf, mode: u32 },
    #[error("{what} {path}: {error}")]
    Io { what: &'static str, path: PathBuf, error: String },
}

fn io_error<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> RuntimeDirError + 'a {
    move |e| RuntimeDirError::Io { what, path: path.to_path_buf(), error: e.to_string() }
}

/// An existing directory the supervisor will use: a real directory, owned by `euid`, not
/// writable by group or others.
pub fn check_entry(path: &Path, facts: &Facts, euid: u32) -> Result<(), RuntimeDirError> {
    let path = path.to_path_buf();
    if facts.is_symlink {
        return Err(RuntimeDirError::Symlink { path });
    }
    if !facts.is_dir {
        return Err(RuntimeDirError::NotADirectory { path });
    }
    if facts.uid != euid {
        return Err(RuntimeDirError::Owner { path, uid: facts.uid, euid });
    }
    if facts.mode & 0o022 != 0 {
        return Err(RuntimeDirError::Writable { path, mode: facts.mode });
    }
    Ok(())
}

/// The parent of the runtime directory (`facts` as `stat` gives them: the operator's own path
/// may go through symlinks): owned by root or `euid`, and not writable by others unless sticky.
pub fn check_parent(
    path: &Path,
    parent: &Path,
    facts: &Facts,
    euid: u32,
) -> Result<(), RuntimeDirError> {
    let (path, parent) = (path.to_path_buf(), parent.to_path_buf());
    if facts.uid != 0 && facts.uid != euid {
        return Err(RuntimeDirError::ParentOwner { path, parent, uid: facts.uid });
    }
    let sticky = facts.mode & 0o1000 != 0;
    if facts.mode & 0o022 != 0 && !sticky {
        return Err(RuntimeDirError::ParentWritable { path, parent, mode: facts.mode });
    }
    Ok(())
}

fn euid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// Creates `path` (mode 0700) or checks the directory already there (see [`check_entry`]).
/// Returns whether it was created.
pub fn ensure_private_dir(path: &Path) -> Result<bool, RuntimeDirError> {
    let created = match std::fs::DirBuilder::new().mode(0o700).create(path) {
        Ok(()) => true,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => false,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(RuntimeDirError::NoParent { path: path.to_path_buf() })
        }
        Err(e) => return Err(io_error("creating", path)(e)),
    };
    let meta = std::fs::symlink_metadata(path).map_err(io_error("reading", path))?;
    check_entry(path, &Facts::of(&meta), euid())?;
    if created && Facts::of(&meta).mode != 0o700 {
        // Ours, just made (mkdir's mode went through the umask): exactly 0700.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
            .map_err(io_error("setting the mode of", path))?;
    }
    Ok(created)
}

/// Prepares the runtime directory and `sessions/`, `pagers/` under it (see the module doc).
pub fn prepare(runtime_dir: &Path, subdirs: &[&Path]) -> Result<(), RuntimeDirError> {
    let parent = match runtime_dir.parent() {
        Some(p) if p.as_os_str().is_empty() => Path::new("."),
        Some(p) => p,
        None => Path::new("/"),
    };
    let parent_meta = match std::fs::metadata(parent) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(RuntimeDirError::NoParent { path: runtime_dir.to_path_buf() })
        }
        Err(e) => return Err(io_error("reading", parent)(e)),
    };
    check_parent(runtime_dir, parent, &Facts::of(&parent_meta), euid())?;
    ensure_private_dir(runtime_dir)?;
    for dir in subdirs {
        ensure_private_dir(dir)?;
    }
    Ok(())
}

/// Creates (or truncates) a file of the supervisor's own under a checked directory, mode 0600,
/// never through a symlink (`O_NOFOLLOW`: a symlink in its place fails with ELOOP).
pub fn create_private_file(path: &Path, append: bool) -> io::Result<File> {
    let mut options = OpenOptions::new();
    if append {
        options.append(true);
    } else {
        options.write(true).truncate(true);
    }
    options.create(true).mode(0o600).custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC).open(path)
}

/// Reads a file of the supervisor's own, never through a symlink.
pub fn read_private_file(path: &Path) -> io::Result<String> {
    let mut file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    let mut text = String::new();
    io::Read::read_to_string(&mut file, &mut text)?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOT: u32 = 0;

    fn dir(uid: u32, mode: u32) -> Facts {
        Facts { is_symlink: false, is_dir: true, uid, mode }
    }

    #[test]
    fn only_a_real_private_directory_of_ours_is_accepted() {
        let p = Path::new("/run/x");
        assert_eq!(check_entry(p, &dir(ROOT, 0o700), ROOT), Ok(()));
        assert_eq!(check_entry(p, &dir(ROOT, 0o755), ROOT), Ok(()), "/run as it is");
        let link = Facts { is_symlink: true, is_dir: false, ..dir(ROOT, 0o777) };
        assert!(matches!(check_entry(p, &link, ROOT), Err(RuntimeDirError::Symlink { .. })));
        let file = Facts { is_dir: false, ..dir(ROOT, 0o600) };
        assert!(matches!(check_entry(p, &file, ROOT), Err(RuntimeDirError::NotADirectory { .. })));
        assert_eq!(
            check_entry(p, &dir(65534, 0o700), ROOT),
            Err(RuntimeDirError::Owner { path: p.into(), uid: 65534, euid: ROOT })
        );
        for mode in [0o770, 0o707, 0o1777, 0o720] {
            assert!(
                matches!(
                    check_entry(p, &dir(ROOT, mode), ROOT),
                    Err(RuntimeDirError::Writable { .. })
                ),
                "{mode:o}"
            );
        }
    }

    #[test]
    fn a_parent_others_can_write_is_refused_unless_sticky_like_tmp() {
        let (p, parent) = (Path::new("/x/run"), Path::new("/x"));
        assert_eq!(check_parent(p, parent, &dir(ROOT, 0o755), ROOT), Ok(()));
        assert_eq!(check_parent(p, parent, &dir(ROOT, 0o1777), ROOT), Ok(()), "/tmp");
        assert!(matches!(
            check_parent(p, parent, &dir(ROOT, 0o777), ROOT),
            Err(RuntimeDirError::ParentWritable { mode: 0o777, .. })
        ));
        assert!(matches!(
            check_parent(p, parent, &dir(1000, 0o755), ROOT),
            Err(RuntimeDirError::ParentOwner { uid: 1000, .. })
        ));
        assert_eq!(check_parent(p, parent, &dir(1000, 0o755), 1000), Ok(()));
    }

    #[test]
    fn a_missing_directory_is_created_0700_and_an_existing_one_keeps_its_mode() {
        let d = tempfile::tempdir().unwrap();
        let run = d.path().join("run");
        let sessions = run.join("sessions");
        prepare(&run, &[&sessions]).unwrap();
        for p in [&run, &sessions] {
            assert_eq!(std::fs::metadata(p).unwrap().permissions().mode() & 0o7777, 0o700);
        }
        let shared = d.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o755)).unwrap();
        prepare(&shared, &[]).unwrap();
        assert_eq!(std::fs::metadata(&shared).unwrap().permissions().mode() & 0o7777, 0o755);
        let nested = d.path().join("no/such/run");
        assert!(matches!(prepare(&nested, &[]), Err(RuntimeDirError::NoParent { .. })));
        assert!(!d.path().join("no").exists(), "no parent is created");
    }

    #[test]
    fn a_symlink_under_the_runtime_directory_is_refused_and_its_target_untouched() {
        let d = tempfile::tempdir().unwrap();
        let run = d.path().join("run");
        std::fs::create_dir(&run).unwrap();
        let victim = d.path().join("victim");
        std::fs::create_dir(&victim).unwrap();
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink(&victim, run.join("sessions")).unwrap();
        let err = prepare(&run, &[&run.join("sessions")]).unwrap_err();
        assert!(matches!(err, RuntimeDirError::Symlink { .. }), "{err}");
        assert_eq!(std::fs::metadata(&victim).unwrap().permissions().mode() & 0o7777, 0o755);
    }

    #[test]
    fn private_files_are_never_opened_through_a_symlink() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("target");
        std::fs::write(&target, b"keep").unwrap();
        let link = d.path().join("pid");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert_eq!(
            create_private_file(&link, false).unwrap_err().raw_os_error(),
            Some(libc::ELOOP)
        );
        assert_eq!(create_private_file(&link, true).unwrap_err().raw_os_error(), Some(libc::ELOOP));
        assert_eq!(read_private_file(&link).unwrap_err().raw_os_error(), Some(libc::ELOOP));
        assert_eq!(std::fs::read(&target).unwrap(), b"keep");
        let own = d.path().join("own");
        io::Write::write_all(&mut create_private_file(&own, false).unwrap(), b"7\n").unwrap();
        assert_eq!(read_private_file(&own).unwrap(), "7\n");
        assert_eq!(std::fs::metadata(&own).unwrap().permissions().mode() & 0o777, 0o600);
    }
}
