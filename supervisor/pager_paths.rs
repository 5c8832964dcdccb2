//! Where a pager version's files live: `DIR/pagers/<version>/` holds its gRPC and handoff
//! sockets, its pid file and its log.

use std::path::{Path, PathBuf};

/// Where a pager version lives under `DIR/pagers/<version>/`.
#[derive(Debug, Clone)]
pub struct PagerPaths {
    pub dir: PathBuf,
    pub grpc_socket: PathBuf,
    pub handoff_socket: PathBuf,
    pub pid_file: PathBuf,
    /// The pager's stderr (see `pager_stderr.rs`); kept after it exits.
    pub log_file: PathBuf,
}

impl PagerPaths {
    pub fn new(pagers_dir: &Path, version: &str) -> Self {
        let dir = pagers_dir.join(version);
        Self {
            grpc_socket: dir.join("grpc.sock"),
            handoff_socket: dir.join("handoff.sock"),
            pid_file: dir.join("pid"),
            log_file: dir.join("pager.log"),
            dir,
        }
    }

    /// Removes the sockets and the pid file (and the directory once empty: the log stays for
    /// post-mortems).
    pub fn remove_files(&self) {
        for p in [&self.grpc_socket, &self.handoff_socket, &self.pid_file] {
            let _ = std::fs::remove_file(p);
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}
