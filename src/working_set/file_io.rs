//! Recordings on disk: the path a caller names (checked as the memory file's is), reading a
//! recording back with its checks, and writing one atomically.

use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

use super::{FormatError, Recording, HEADER_LEN, MAX_REGIONS, MAX_RUNS, REGION_LEN, RUN_LEN};

/// Why a recording's path was refused.
#[derive(Debug, thiserror::Error)]
pub enum PathError {
    #[error("{field} {path:?} is not an absolute path")]
    NotAbsolute { field: &'static str, path: String },
    #[error("{field} {path:?} contains '..'")]
    DotDot { field: &'static str, path: String },
    #[error("{field} {path:?}: its directory {dir} does not exist or is not a directory")]
    NoDirectory { field: &'static str, path: String, dir: String },
    #[error("{field} {path:?} names a directory")]
    IsDirectory { field: &'static str, path: String },
}

/// Checks a recording's path as the memory file's is checked: absolute, no `..`, in an existing
/// directory. `field` names the request field in messages. Blocking (one stat).
pub fn check_path(field: &'static str, path: &str) -> Result<PathBuf, PathError> {
    let p = Path::new(path);
    let owned = || path.to_string();
    if !p.is_absolute() {
        return Err(PathError::NotAbsolute { field, path: owned() });
    }
    if p.components().any(|c| c == Component::ParentDir) {
        return Err(PathError::DotDot { field, path: owned() });
    }
    let dir = p.parent().unwrap_or(Path::new("/"));
    if p.file_name().is_none() || p.is_dir() {
        return Err(PathError::IsDirectory { field, path: owned() });
    }
    if !dir.is_dir() {
        return Err(PathError::NoDirectory {
            field,
            path: owned(),
            dir: dir.display().to_string(),
        });
    }
    Ok(p.to_path_buf())
}

/// Why reading a recording failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("reading {path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("{path}: {source}")]
    Format { path: String, source: FormatError },
}

/// Reads and checks a recording (at most the largest valid size is read). Blocking.
pub fn read(path: &Path) -> Result<Recording, ReadError> {
    let shown = || path.display().to_string();
    let max = (HEADER_LEN + MAX_REGIONS * REGION_LEN + MAX_RUNS * RUN_LEN + 4) as u64;
    let mut bytes = Vec::new();
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .and_then(|f| f.take(max + 1).read_to_end(&mut bytes))
        .map_err(|source| ReadError::Io { path: shown(), source })?;
    Recording::decode(&bytes).map_err(|source| ReadError::Format { path: shown(), source })
}

/// Writes a recording atomically: a temporary file beside `path` (mode 0600), fsync, rename
/// over `path`, fsync of the directory. A reader sees the old file or the new one, never part.
/// Blocking.
pub fn write_atomically(path: &Path, recording: &Recording) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    let name = path.file_name().ok_or_else(|| io::Error::other("no file name"))?;
    let tmp = dir.join(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(&tmp)?;
        f.write_all(&recording.encode())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}
