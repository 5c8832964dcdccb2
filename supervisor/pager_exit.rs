//! What a pager's end says: how it exited (with its last words on stderr), and why one could
//! not be started.

use std::fmt;
use std::io;
use std::time::Duration;

/// How a pager ended, and its last lines on stderr.
#[derive(Debug, Clone)]
pub struct Exit {
    pub status: String,
    pub last_words: Vec<String>,
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.status)?;
        if !self.last_words.is_empty() {
            write!(f, "; its last words: {}", self.last_words.join(" | "))?;
        }
        Ok(())
    }
}

/// Why a pager could not be started.
#[derive(Debug, thiserror::Error)]
pub enum PagerError {
    #[error("pager binary {path}: {reason}")]
    Binary { path: String, reason: String },
    #[error("`{binary} --print-version` failed: {reason}")]
    Probe { binary: String, reason: String },
    #[error("preparing {path}: {source}")]
    Prepare { path: String, source: io::Error },
    #[error("starting {binary}: {source}")]
    Spawn { binary: String, source: io::Error },
    #[error("pager version {version} is not started: the supervisor is shutting down")]
    ShuttingDown { version: String },
    #[error("pager version {version} exited before it was ready: {exit}")]
    Exited { version: String, exit: Exit },
    #[error(
        "pager version {version} was not healthy within {timeout:?} (last check: {last}){words}"
    )]
    NotReady { version: String, timeout: Duration, last: String, words: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exit_reads_with_its_last_words() {
        let e = Exit { status: "exit status: 3".into(), last_words: vec!["a".into(), "b".into()] };
        assert_eq!(e.to_string(), "exit status: 3; its last words: a | b");
        let quiet = Exit { status: "signal: 9 (SIGKILL)".into(), last_words: vec![] };
        assert_eq!(quiet.to_string(), "signal: 9 (SIGKILL)");
    }
}
