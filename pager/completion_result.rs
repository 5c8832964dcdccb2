//! What a CompleteSession comes to: the report of a graduation, or why it did not graduate the
//! session. Shared by the completion, the session table (its waiters) and the metrics (a leaf).

use std::time::Duration;

use crate::session_error::SessionError;

/// What a finished completion did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompletionReport {
    pub populated_bytes: u64,
    pub already_resident_bytes: u64,
    pub skipped_zero_bytes: u64,
    pub skipped_removed_bytes: u64,
    pub faults_during: u64,
    pub duration: Duration,
}

/// Why a completion did not graduate the session.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum CompleteError {
    #[error("completion cancelled after {0:?}; the session keeps serving")]
    Cancelled(Duration),
    #[error("completion deadline expired after {0:?}; the session keeps serving")]
    DeadlineExceeded(Duration),
    #[error("completion failed: {0}; the session keeps serving")]
    Failed(String),
    #[error("the session ended during completion: {0}")]
    SessionEnded(String),
}

pub type CompletionResult = Result<CompletionReport, CompleteError>;

impl From<SessionError> for CompleteError {
    /// A session that ended ends the completion with it; any other failure leaves it serving.
    fn from(e: SessionError) -> Self {
        match e {
            SessionError::Gone(_) | SessionError::VmmGone(_) => {
                CompleteError::SessionEnded(e.to_string())
            }
            other => CompleteError::Failed(other.to_string()),
        }
    }
}
