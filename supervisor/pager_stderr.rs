//! A pager's stderr: every line forwarded as a log event of the supervisor (with the pager's
//! `version` and `pid`), and the last lines kept for the error message when the pager dies.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::ChildStderr;
use tracing::{debug, error, info, warn};

/// Lines of a pager's stderr kept for error messages.
const LAST_WORDS: usize = 20;
/// Longest stderr line forwarded as one event (longer ones are split).
const MAX_LINE: u64 = 8192;

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

/// Forwards each stderr line of a pager as a log event with its `version`, and keeps the last
/// [`LAST_WORDS`] lines.
pub async fn forward_stderr(stderr: ChildStderr, version: String, pid: u32, last_words: LastWords) {
    let mut reader = BufReader::new(stderr);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match (&mut reader).take(MAX_LINE).read_until(b'\n', &mut buf).await {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) => {
                debug!(version = %version, pid, error = %e, "reading the pager's stderr failed");
                return;
            }
        }
        let raw = String::from_utf8_lossy(&buf);
        let (level, line) = split_line(raw.trim_end());
        if line.is_empty() {
            continue;
        }
        let line = line.to_string();
        match level {
            tracing::Level::ERROR => error!(target: "pager", version = %version, pid, "{line}"),
            tracing::Level::WARN => warn!(target: "pager", version = %version, pid, "{line}"),
            tracing::Level::DEBUG | tracing::Level::TRACE => {
                debug!(target: "pager", version = %version, pid, "{line}")
            }
            _ => info!(target: "pager", version = %version, pid, "{line}"),
        }
        last_words.push(line);
    }
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
