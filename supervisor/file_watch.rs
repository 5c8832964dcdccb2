//! Waiting for a file to change without polling it: an inotify watch (`IN_MODIFY`,
//! `IN_ATTRIB`), its descriptor registered with tokio's reactor, so a waiting task costs no
//! thread and no wake-up until the file changes. Used to follow the pagers' log files.

#![allow(unsafe_code)]

use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::Path;
use std::time::Duration;

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// An inotify watch on one file.
pub struct FileWatch(AsyncFd<Watched>);

impl std::fmt::Debug for FileWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileWatch").finish_non_exhaustive()
    }
}

/// The inotify instance, with the raw-fd view tokio's `AsyncFd` needs.
struct Watched(Inotify);

impl AsRawFd for Watched {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

impl FileWatch {
    /// Watches `path`. Fails when inotify cannot be had (its per-user limits) or the file is
    /// gone. Must run inside a tokio runtime.
    pub fn on(path: &Path) -> std::io::Result<Self> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        inotify.add_watch(path, AddWatchFlags::IN_MODIFY | AddWatchFlags::IN_ATTRIB)?;
        // SAFETY: the AsyncFd owns the Inotify (and so its descriptor) and is its only user:
        // the descriptor stays open, naming this inotify instance, until the AsyncFd is dropped.
        let fd = unsafe { AsyncFd::register_with_interest(Watched(inotify), Interest::READABLE) }?;
        Ok(Self(fd))
    }

    /// Waits until the file changed or `limit` passed, and consumes the events queued.
    pub async fn changed(&self, limit: Duration) {
        if let Ok(Ok(mut guard)) = tokio::time::timeout(limit, self.0.readable()).await {
            // Non-blocking: reads what is queued; EAGAIN once empty.
            while guard.get_inner().0.read_events().is_ok() {}
            guard.clear_ready();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[tokio::test]
    async fn a_write_to_the_file_wakes_the_watch() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        let watch = FileWatch::on(file.path()).unwrap();
        let waiting = tokio::spawn(async move {
            let started = std::time::Instant::now();
            watch.changed(Duration::from_secs(60)).await;
            started.elapsed()
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        writeln!(file, "a line").unwrap();
        file.flush().unwrap();
        let waited = waiting.await.unwrap();
        assert!(waited < Duration::from_secs(30), "woken by the write, not the limit: {waited:?}");
    }
}
