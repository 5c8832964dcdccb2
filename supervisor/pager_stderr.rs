//! A pager's log: its stderr goes to `DIR/pagers/<version>/pager.log` (append mode), and the
//! supervisor follows that file, forwarding every line as a log event of its own (with the
//! pager's `version` and `pid`) and keeping the last lines for the error message when the pager
//! dies.
//!
//! Why a file and not a pipe: a pager must outlive the supervisor (its VMs would freeze without
//! it). Once the supervisor is gone a pipe has no reader, the pager's next log line fails with
//! EPIPE, tracing's writer reports that failure on the same stderr with `eprintln!`, which
//! panics — and the pager (built with `panic = "abort"`) dies at its next log line, taking its
//! VMs with it. A file has no reader to lose; a restarted supervisor follows it on from its end,
//! and the file is there for post-mortems.
//!
//! The follower sleeps until the file changes: an inotify watch (`IN_MODIFY`) on it, waited on
//! through tokio's reactor, so an idle pager costs no wake-up and no thread (it is woken at once
//! when the pager exits, to read its last words; and every [`LOG_RECHECK`] in case an event was
//! lost). It reads with plain `read(2)`s of a regular file in the page cache, on the runtime's
//! thread: nothing there can block for long, and no blocking-pool thread is kept awake by it
//! (`tokio::fs` would take one per call). Where inotify cannot be had (its per-user limit), it
//! looks every [`LOG_POLL`] instead. Once it has read [`MAX_LOG_BYTES`], it truncates the file:
//! the pager writes in append mode and goes on at the new end. Lines written between the
//! follower's last read and the truncation are lost — a window of microseconds per 8 MiB of log.

use std::collections::VecDeque;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use std::os::unix::fs::OpenOptionsExt;

use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::file_watch::FileWatch;

/// Lines of a pager's log kept for error messages.
const LAST_WORDS: usize = 20;
/// Longest log line forwarded as one event (longer ones are split).
const MAX_LINE: usize = 8192;
/// How often the follower looks for new lines when it has no inotify watch.
pub const LOG_POLL: Duration = Duration::from_millis(100);
/// How often the follower looks anyway, with a watch (an inotify queue can overflow).
pub const LOG_RECHECK: Duration = Duration::from_secs(5);
/// The log file is truncated once this much of it has been read.
pub const MAX_LOG_BYTES: u64 = 8 << 20;

/// The last [`LAST_WORDS`] lines a pager wrote, shared with the task that reads them.
#[derive(Debug, Clone, Default)]
pub struct LastWords(Arc<Mutex<VecDeque<String>>>);

impl LastWords {
    fn lock(&self) -> MutexGuard<'_, VecDeque<String>> {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn push(&self, line: String) {
        let mut words = self.lock();
        if words.len() == LAST_WORDS {
            words.pop_front();
        }
        words.push_back(line);
    }

    /// The lines, oldest first.
    pub fn get(&self) -> Vec<String> {
        self.lock().iter().cloned().collect()
    }
}

/// Who wrote the lines a follower reads.
#[derive(Debug, Clone)]
pub struct LogSource {
    pub version: String,
    pub pid: u32,
    pub last_words: LastWords,
}

impl LogSource {
    /// Forwards one line as a log event and keeps it among the last words.
    fn emit(&self, raw: &[u8]) {
        let raw = String::from_utf8_lossy(raw);
        let (level, line) = split_line(raw.trim_end());
        if line.is_empty() {
            return;
        }
        let (version, pid) = (&self.version, self.pid);
        match level {
            tracing::Level::ERROR => error!(target: "pager", version = %version, pid, "{line}"),
            tracing::Level::WARN => warn!(target: "pager", version = %version, pid, "{line}"),
            tracing::Level::DEBUG | tracing::Level::TRACE => {
                debug!(target: "pager", version = %version, pid, "{line}")
            }
            _ => info!(target: "pager", version = %version, pid, "{line}"),
        }
        self.last_words.push(line.to_string());
    }
}

/// Follows the pager's log file from byte `from` until `gone` turns true (the pager exited),
/// then reads what is left and returns.
pub async fn follow_log(
    path: PathBuf,
    from: u64,
    source: LogSource,
    mut gone: watch::Receiver<bool>,
) {
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path);
    let mut file = match opened {
        Ok(f) => f,
        Err(e) => {
            warn!(version = %source.version, path = %path.display(), error = %e, "cannot read the pager's log");
            return;
        }
    };
    let watch = match FileWatch::on(&path) {
        Ok(w) => Some(w),
        Err(e) => {
            debug!(version = %source.version, error = %e, "no inotify watch on the pager's log: polling it");
            None
        }
    };
    let mut offset = from;
    if let Err(e) = file.seek(SeekFrom::Start(from)) {
        debug!(version = %source.version, error = %e, "seeking in the pager's log failed");
    }
    let mut pending: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let mut gone_seen = false;
    loop {
        // Read before looking: once the pager is gone, one more pass to the end gets its last
        // words.
        let finishing = gone_seen || *gone.borrow();
        let n = match file.read(&mut chunk) {
            Ok(n) => n,
            Err(e) => {
                debug!(version = %source.version, error = %e, "reading the pager's log failed");
                return;
            }
        };
        if n > 0 {
            offset += n as u64;
            pending.extend_from_slice(&chunk[..n]);
            while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                source.emit(&pending[..end]);
                pending.drain(..=end);
            }
            if pending.len() >= MAX_LINE {
                source.emit(&pending);
                pending.clear();
            }
            continue;
        }
        if finishing {
            if !pending.is_empty() {
                source.emit(&pending);
            }
            return;
        }
        let len = file.metadata().map(|m| m.len()).unwrap_or(offset);
        if offset >= MAX_LOG_BYTES || len < offset {
            // Ours to truncate (read in full), or truncated already: go on from its start.
            if offset >= MAX_LOG_BYTES {
                if let Err(e) = file_for_truncation(&path).and_then(|f| f.set_len(0)) {
                    debug!(version = %source.version, error = %e, "truncating the pager's log failed");
                }
            }
            offset = 0;
            if file.seek(SeekFrom::Start(0)).is_err() {
                return;
            }
            continue;
        }
        let wait = async {
            match &watch {
                Some(w) => w.changed(LOG_RECHECK).await,
                None => tokio::time::sleep(LOG_POLL).await,
            }
        };
        tokio::select! {
            _ = wait => {}
            changed = gone.changed() => if changed.is_err() { gone_seen = true },
        }
    }
}

fn file_for_truncation(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// The level a pager's log line was written at, and the line without the timestamp and level
/// that tracing's text format puts first (the supervisor's own event has both). Other formats
/// (JSON) are kept whole, their level guessed from their head.
fn split_line(line: &str) -> (tracing::Level, &str) {
    let mut parts = line.splitn(2, char::is_whitespace);
    let (first, rest) = (parts.next().unwrap_or(""), parts.next().unwrap_or("").trim_start());
    let is_timestamp = first.starts_with(|c: char| c.is_ascii_digit())
        && first.contains('T')
        && first.contains(':');
    if is_timestamp {
        let mut parts = rest.splitn(2, char::is_whitespace);
        let (level, message) =
            (parts.next().unwrap_or(""), parts.next().unwrap_or("").trim_start());
        if let Ok(level) = level.parse::<tracing::Level>() {
            return (level, message);
        }
    }
    let head = line.get(..line.len().min(80)).unwrap_or(line);
    let level = if head.contains("ERROR") {
        tracing::Level::ERROR
    } else if head.contains("WARN") {
        tracing::Level::WARN
    } else {
        tracing::Level::INFO
    };
    (level, line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_text_log_line_loses_its_timestamp_and_level_but_keeps_the_level() {
        let (level, line) = split_line("2025-01-01T00:00:00.123Z ERROR uffd_pager: boom x=1");
        assert_eq!((level, line), (tracing::Level::ERROR, "uffd_pager: boom x=1"));
        let (level, line) = split_line("2025-01-01T00:00:00Z  INFO uffd_pager: ready");
        assert_eq!((level, line), (tracing::Level::INFO, "uffd_pager: ready"));
    }

    #[test]
    fn other_log_lines_are_kept_whole_with_a_guessed_level() {
        let json = r#"{"level":"WARN","fields":{"message":"slow"}}"#;
        assert_eq!(split_line(json), (tracing::Level::WARN, json));
        assert_eq!(
            split_line("thread panicked at x.rs:1"),
            (tracing::Level::INFO, "thread panicked at x.rs:1")
        );
        assert_eq!(split_line("2025 was a year"), (tracing::Level::INFO, "2025 was a year"));
    }

    #[tokio::test(start_paused = true)]
    async fn the_follower_forwards_lines_from_its_offset_and_reads_the_last_words_at_exit() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pager.log");
        let mut log = std::fs::OpenOptions::new().append(true).create(true).open(&path).unwrap();
        writeln!(log, "from an earlier process").unwrap();
        let from = std::fs::metadata(&path).unwrap().len();
        let source = LogSource { version: "v1".into(), pid: 7, last_words: LastWords::default() };
        let (gone_tx, gone) = watch::channel(false);
        let follower = tokio::spawn(follow_log(path.clone(), from, source.clone(), gone));
        writeln!(log, "2025-01-01T00:00:00Z  INFO uffd_pager: ready").unwrap();
        write!(log, "half a ").unwrap();
        tokio::time::sleep(LOG_POLL * 3).await;
        writeln!(log, "line").unwrap();
        write!(log, "dying words without a newline").unwrap();
        gone_tx.send_replace(true);
        follower.await.unwrap();
        assert_eq!(
            source.last_words.get(),
            ["uffd_pager: ready", "half a line", "dying words without a newline"]
        );
    }

    #[test]
    fn only_the_last_twenty_lines_are_kept() {
        let words = LastWords::default();
        for i in 0..25 {
            words.push(format!("line {i}"));
        }
        let got = words.get();
        assert_eq!(got.len(), LAST_WORDS);
        assert_eq!(got[0], "line 5");
        assert_eq!(got[19], "line 24");
    }
}
