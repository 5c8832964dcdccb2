//! The snapshot's memory file of a session: checked and opened once, at CreateSession, so that a
//! bad path is refused to the caller right away (not discovered when the VM restores), and so
//! that the file the pager serves is the one checked (the descriptor travels, not the path).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// An opened, validated memory file.
#[derive(Debug)]
pub struct MemoryFile {
    /// The path as the client gave it (for display).
    pub path: String,
    /// Opened `O_RDONLY | O_CLOEXEC`.
    pub file: File,
    /// Its length in bytes (> 0): the handshake's regions must lie inside it.
    pub len: u64,
}

/// Why a memory file was refused. Each names the path.
#[derive(Debug, thiserror::Error)]
pub enum MemoryFileError {
    #[error("memory_file is empty: the absolute path of the snapshot's memory file is required")]
    Empty,
    #[error("memory file {0:?} is not an absolute path")]
    NotAbsolute(String),
    #[error("memory file {path}: {source}")]
    Open { path: String, source: io::Error },
    /// Not the file's fault: the supervisor (or the host) has no descriptor left to open it.
    #[error("cannot open memory file {path}: {detail}")]
    OutOfDescriptors { path: String, detail: String },
    #[error("memory file {path}: cannot stat it: {source}")]
    Stat { path: String, source: io::Error },
    #[error("memory file {path} is not a regular file (it is a {kind})")]
    NotRegular { path: String, kind: &'static str },
    #[error("memory file {path} is empty (0 bytes)")]
    Zero { path: String },
}

/// Opens `path` read-only and checks it is a non-empty regular file. Blocking (file system
/// calls): run it on a blocking-pool thread.
pub fn open(path: &str) -> Result<MemoryFile, MemoryFileError> {
    if path.is_empty() {
        return Err(MemoryFileError::Empty);
    }
    if !Path::new(path).is_absolute() {
        return Err(MemoryFileError::NotAbsolute(path.to_string()));
    }
    // O_NONBLOCK so that a FIFO (or a device) cannot block the open: the type is checked on the
    // opened descriptor below (no check-then-open race), and a regular file ignores the flag.
    let file = OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path).map_err(
        |source| {
            if crate::fd_limit::is_out_of_fds(&source) {
                let detail = crate::fd_limit::describe(&source);
                MemoryFileError::OutOfDescriptors { path: path.to_string(), detail }
            } else {
                MemoryFileError::Open { path: path.to_string(), source }
            }
        },
    )?;
    let meta = file
        .metadata()
        .map_err(|source| MemoryFileError::Stat { path: path.to_string(), source })?;
    let ft = meta.file_type();
    if !ft.is_file() {
        let kind = if ft.is_dir() {
            "directory"
        } else if ft.is_fifo() {
            "FIFO"
        } else if ft.is_socket() {
            "socket"
        } else if ft.is_char_device() {
            "character device"
        } else if ft.is_block_device() {
            "block device"
        } else {
            "special file"
        };
        return Err(MemoryFileError::NotRegular { path: path.to_string(), kind });
    }
    if meta.len() == 0 {
        return Err(MemoryFileError::Zero { path: path.to_string() });
    }
    clear_nonblock(&file)
        .map_err(|source| MemoryFileError::Open { path: path.to_string(), source })?;
    Ok(MemoryFile { path: path.to_string(), file, len: meta.len() })
}

/// Clears `O_NONBLOCK`, so the descriptor handed to the pager carries no surprising flag.
fn clear_nonblock(file: &File) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = fcntl(std::os::fd::AsRawFd::as_raw_fd(file), FcntlArg::F_GETFL)?;
    let flags = OFlag::from_bits_truncate(flags) - OFlag::O_NONBLOCK;
    fcntl(std::os::fd::AsRawFd::as_raw_fd(file), FcntlArg::F_SETFL(flags))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn dir() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    #[test]
    fn opens_a_regular_non_empty_file_and_reports_its_length() {
        let d = dir();
        let p = d.path().join("mem");
        std::fs::File::create(&p).unwrap().write_all(&[7u8; 8192]).unwrap();
        let m = open(p.to_str().unwrap()).unwrap();
        assert_eq!(m.len, 8192);
        assert_eq!(m.path, p.to_str().unwrap());
    }

    #[test]
    fn cannot_open_an_empty_or_relative_path() {
        assert!(matches!(open(""), Err(MemoryFileError::Empty)));
        let err = open("snap/mem").unwrap_err();
        assert_eq!(err.to_string(), "memory file \"snap/mem\" is not an absolute path");
    }

    #[test]
    fn a_missing_file_names_the_path_and_the_os_error() {
        let err = open("/nonexistent/mem").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("/nonexistent/mem"), "{text}");
        assert!(text.contains("No such file or directory"), "{text}");
    }

    #[test]
    fn cannot_use_a_directory_a_fifo_or_a_device() {
        let d = dir();
        let err = open(d.path().to_str().unwrap()).unwrap_err();
        assert!(err.to_string().contains("is not a regular file (it is a directory)"), "{err}");

        let fifo = d.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let err = open(fifo.to_str().unwrap()).unwrap_err();
        assert!(err.to_string().contains("(it is a FIFO)"), "{err}");

        let err = open("/dev/null").unwrap_err();
        assert!(err.to_string().contains("(it is a character device)"), "{err}");
    }

    #[test]
    fn cannot_use_an_empty_file() {
        let d = dir();
        let p = d.path().join("empty");
        std::fs::File::create(&p).unwrap();
        let err = open(p.to_str().unwrap()).unwrap_err();
        assert_eq!(err.to_string(), format!("memory file {} is empty (0 bytes)", p.display()));
    }

    #[test]
    fn the_descriptor_is_close_on_exec_and_blocking() {
        let d = dir();
        let p = d.path().join("mem");
        std::fs::write(&p, [1u8; 4096]).unwrap();
        let m = open(p.to_str().unwrap()).unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&m.file);
        let fdflags = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).unwrap();
        assert_ne!(fdflags & libc::FD_CLOEXEC, 0);
        let flags = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFL).unwrap();
        assert_eq!(flags & libc::O_NONBLOCK, 0);
    }
}
