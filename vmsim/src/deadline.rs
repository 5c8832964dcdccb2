//! Bounding work that may block forever: a page touch on a uffd-registered range blocks its
//! thread until a pager serves it, and a broken pager never does. Run such work on its own
//! thread and wait for it with a deadline; on expiry the stuck thread is abandoned (leaked),
//! which is acceptable in a test that is failing anyway.

use std::sync::mpsc;
use std::time::Duration;

/// Why [`run_with_deadline`] returned no result.
#[derive(Debug, thiserror::Error)]
pub enum DeadlineError {
    #[error("did not finish within {0:?} (the pager may not be serving faults); its thread is abandoned")]
    Expired(Duration),
    #[error("the work panicked")]
    Panicked,
    #[error("spawning the worker thread failed: {0}")]
    Spawn(std::io::Error),
}

/// Runs `work` on a new thread and returns its result, or an error if it takes longer than
/// `limit`.
pub fn run_with_deadline<T, F>(limit: Duration, work: F) -> Result<T, DeadlineError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let (tx, rx) = mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name("vmsim-deadline".into())
        .spawn(move || {
            // The receiver may be gone after a timeout: nobody wants the result then.
            let _ = tx.send(work());
        })
        .map_err(DeadlineError::Spawn)?;
    match rx.recv_timeout(limit) {
        Ok(value) => Ok(value),
        Err(mpsc::RecvTimeoutError::Timeout) => Err(DeadlineError::Expired(limit)),
        Err(mpsc::RecvTimeoutError::Disconnected) => Err(DeadlineError::Panicked),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_that_finishes_returns_its_value() {
        assert_eq!(run_with_deadline(Duration::from_secs(10), || 6 * 7).unwrap(), 42);
    }

    #[test]
    fn work_that_blocks_forever_expires() {
        let (keep, never) = mpsc::channel::<()>();
        let err = run_with_deadline(Duration::from_millis(20), move || never.recv()).unwrap_err();
        assert!(matches!(err, DeadlineError::Expired(_)));
        drop(keep);
    }

    #[test]
    fn work_that_panics_is_reported() {
        let err =
            run_with_deadline(Duration::from_secs(10), || -> u8 { panic!("boom") }).unwrap_err();
        assert!(matches!(err, DeadlineError::Panicked));
    }
}
