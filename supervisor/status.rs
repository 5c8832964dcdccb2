//! The supervisor's domain errors, and their one mapping to gRPC status codes.
//!
//! Every handler returns [`ServiceError`]; `From<ServiceError> for Status` is the only place
//! where a code is chosen. Messages name what was wrong (the id, the path, the version) so that
//! an operator reading grpcurl's output knows what to fix.

use tonic::{Code, Status};

use crate::memory_file::MemoryFileError;
use crate::pager_exit::PagerError;
use crate::session_id::NameError;

/// Why a Supervisor call failed.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("invalid session id {id:?}: {source}")]
    InvalidSessionId { id: String, source: NameError },
    #[error("invalid version label {label:?}: {source}")]
    InvalidVersionLabel { label: String, source: NameError },
    #[error(transparent)]
    MemoryFile(#[from] MemoryFileError),
    #[error(transparent)]
    Overlay(#[from] uffdpager::overlay::OverlayError),
    #[error(transparent)]
    WorkingSet(#[from] crate::working_set::WorkingSetError),
    #[error(
        "session socket path {path} is {len} bytes long, more than a Unix socket allows (107): \
         use a shorter session id or runtime directory"
    )]
    SocketPathTooLong { path: String, len: usize },
    #[error("session {0} already exists")]
    SessionExists(String),
    #[error("no session {0}")]
    SessionNotFound(String),
    #[error("session {id} is {state}: {hint}")]
    WrongState { id: String, state: &'static str, hint: &'static str },
    #[error("session {0} is being handed to a pager right now; retry once it is SERVING")]
    HandingOff(String),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("no pager version is active")]
    NoActiveVersion,
    #[error("pager version {version} is not running ({why})")]
    OwnerUnavailable { version: String, why: String },
    #[error("no pager version {0}")]
    VersionNotFound(String),
    #[error("pager version {version} is not running ({why}); deploy it again")]
    VersionNotRunning { version: String, why: String },
    #[error(
        "pager version {version} is already running ({state}); ActivateVersion makes it active"
    )]
    VersionRunning { version: String, state: &'static str },
    #[error(transparent)]
    Deploy(#[from] PagerError),
    #[error("pager version {version}: {}", status.message())]
    Pager { version: String, status: Status },
    #[error(
        "session {id} is being handed to another pager after its pager died; it keeps its VM \
         served: retry once it is SERVING"
    )]
    Readopting { id: String },
    #[error(
        "session {id} is ORPHANED: no pager version can serve it now; the next version available \
         adopts it: retry then"
    )]
    Orphaned { id: String },
    #[error(
        "pager version {version} (pid {pid}) exited during the call ({exit}); its sessions are \
         re-adopted by another pager and keep serving: retry"
    )]
    PagerDied { version: String, pid: u32, exit: String },
    #[error("the call's deadline passed before it reached the pager")]
    DeadlineExceeded,
    #[error("the supervisor is shutting down")]
    ShuttingDown,
    #[error("watcher fell behind by {0} events; watch again")]
    WatcherLagged(u64),
    #[error(
        "the supervisor holds {live} live sessions, as many as --max-sessions {limit} allows: \
         graduate or delete sessions first, or raise --max-sessions"
    )]
    TooManySessions { live: usize, limit: usize },
    #[error("{what}: {detail}")]
    OutOfDescriptors { what: String, detail: String },
    #[error("internal error: {0}")]
    Internal(String),
}

impl ServiceError {
    /// An I/O failure while `what`: out of descriptors (RESOURCE_EXHAUSTED, saying so) or
    /// anything else (INTERNAL).
    pub fn io(what: String, source: std::io::Error) -> Self {
        if crate::fd_limit::is_out_of_fds(&source) {
            Self::OutOfDescriptors { what, detail: crate::fd_limit::describe(&source) }
        } else {
            Self::Io { what, source }
        }
    }
}

impl ServiceError {
    /// The gRPC code of this error.
    pub fn code(&self) -> Code {
        use ServiceError::*;
        match self {
            MemoryFile(MemoryFileError::OutOfDescriptors { .. })
            | TooManySessions { .. }
            | OutOfDescriptors { .. }
            | WatcherLagged(_) => Code::ResourceExhausted,
            Overlay(uffdpager::overlay::OverlayError::Memfd(_)) => Code::Internal,
            Deploy(PagerError::ShuttingDown { .. }) => Code::Unavailable,
            WorkingSet(crate::working_set::WorkingSetError::OtherSnapshot { .. }) => {
                Code::FailedPrecondition
            }
            WorkingSet(crate::working_set::WorkingSetError::Identity { .. }) => Code::Internal,
            WorkingSet(_) => Code::InvalidArgument,
            InvalidSessionId { .. }
            | InvalidVersionLabel { .. }
            | MemoryFile(_)
            | Overlay(_)
            | SocketPathTooLong { .. }
            | Deploy(PagerError::Binary { .. }) => Code::InvalidArgument,
            SessionExists(_) | VersionRunning { .. } => Code::AlreadyExists,
            SessionNotFound(_) | VersionNotFound(_) => Code::NotFound,
            WrongState { .. } | VersionNotRunning { .. } | Deploy(_) => Code::FailedPrecondition,
            // Transient: the first handoff answers within the handoff timeout.
            HandingOff(_)
            | NoActiveVersion
            | OwnerUnavailable { .. }
            | ShuttingDown
            | Readopting { .. }
            | Orphaned { .. }
            | PagerDied { .. } => Code::Unavailable,
            Pager { status, .. } => status.code(),
            DeadlineExceeded => Code::DeadlineExceeded,
            Io { .. } | Internal(_) => Code::Internal,
        }
    }
}

impl From<ServiceError> for Status {
    fn from(e: ServiceError) -> Self {
        Status::new(e.code(), e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(e: ServiceError) -> (Code, String) {
        let s = Status::from(e);
        (s.code(), s.message().to_string())
    }

    #[test]
    fn client_mistakes_are_invalid_argument_and_name_the_culprit() {
        let (code, msg) = status(ServiceError::InvalidSessionId {
            id: "a b".into(),
            source: NameError::BadChar { ch: ' ', index: 1 },
        });
        assert_eq!(code, Code::InvalidArgument);
        assert!(msg.contains("\"a b\"") && msg.contains("position 1"), "{msg}");
        let (code, msg) = status(MemoryFileError::NotAbsolute("rel/mem".into()).into());
        assert_eq!(code, Code::InvalidArgument);
        assert!(msg.contains("rel/mem"), "{msg}");
        let bad_binary =
            PagerError::Binary { path: "/x/pager".into(), reason: "not executable".into() };
        assert_eq!(status(bad_binary.into()).0, Code::InvalidArgument);
    }

    #[test]
    fn lookups_and_duplicates_have_their_own_codes() {
        assert_eq!(status(ServiceError::SessionNotFound("a".into())).0, Code::NotFound);
        assert_eq!(status(ServiceError::VersionNotFound("v9".into())).0, Code::NotFound);
        assert_eq!(status(ServiceError::SessionExists("a".into())).0, Code::AlreadyExists);
        let running = ServiceError::VersionRunning { version: "v1".into(), state: "ACTIVE" };
        assert_eq!(status(running).0, Code::AlreadyExists);
    }

    #[test]
    fn a_wrong_state_is_a_failed_precondition_with_a_hint() {
        let (code, msg) = status(ServiceError::WrongState {
            id: "vm-1".into(),
            state: "SERVING",
            hint: "graduate it first",
        });
        assert_eq!(code, Code::FailedPrecondition);
        assert_eq!(msg, "session vm-1 is SERVING: graduate it first");
        let not_ready = PagerError::NotReady {
            version: "v2".into(),
            timeout: std::time::Duration::from_secs(10),
            last: "connection refused".into(),
            words: String::new(),
        };
        assert_eq!(status(not_ready.into()).0, Code::FailedPrecondition);
    }

    #[test]
    fn a_pagers_status_passes_through_with_its_code_and_message() {
        let (code, msg) = status(ServiceError::Pager {
            version: "v1".into(),
            status: Status::deadline_exceeded("completion of vm-1 stopped after 1.0s: 40% done"),
        });
        assert_eq!(code, Code::DeadlineExceeded);
        assert_eq!(msg, "pager version v1: completion of vm-1 stopped after 1.0s: 40% done");
        let (code, _) = status(ServiceError::Pager {
            version: "v1".into(),
            status: Status::failed_precondition("session ended"),
        });
        assert_eq!(code, Code::FailedPrecondition);
    }

    #[test]
    fn unavailability_and_lag_are_retryable_codes() {
        let down = ServiceError::OwnerUnavailable { version: "v1".into(), why: "FAILED".into() };
        assert_eq!(status(down).0, Code::Unavailable);
        assert_eq!(status(ServiceError::NoActiveVersion).0, Code::Unavailable);
        assert_eq!(status(ServiceError::ShuttingDown).0, Code::Unavailable);
        assert_eq!(status(ServiceError::HandingOff("vm-1".into())).0, Code::Unavailable);
        let (code, msg) = status(ServiceError::Readopting { id: "vm-1".into() });
        assert_eq!(code, Code::Unavailable);
        assert!(msg.contains("vm-1") && msg.contains("retry"), "{msg}");
        let died = ServiceError::PagerDied {
            version: "v1".into(),
            pid: 42,
            exit: "signal: 9 (SIGKILL)".into(),
        };
        let (code, msg) = status(died);
        assert_eq!(code, Code::Unavailable);
        assert!(msg.contains("pid 42") && msg.contains("SIGKILL"), "{msg}");
        let (code, msg) = status(ServiceError::WatcherLagged(17));
        assert_eq!(code, Code::ResourceExhausted);
        assert!(msg.starts_with("watcher fell behind") && msg.contains("watch again"), "{msg}");
    }

    #[test]
    fn the_session_cap_and_the_descriptor_limit_are_resource_exhausted_and_say_so() {
        let (code, msg) = status(ServiceError::TooManySessions { live: 8, limit: 8 });
        assert_eq!(code, Code::ResourceExhausted);
        assert!(msg.contains("--max-sessions 8") && msg.contains("8 live sessions"), "{msg}");
        let emfile = std::io::Error::from_raw_os_error(libc::EMFILE);
        let (code, msg) = status(ServiceError::io("binding /run/x.sock".into(), emfile));
        assert_eq!(code, Code::ResourceExhausted);
        assert!(msg.contains("/run/x.sock") && msg.contains("out of file descriptors"), "{msg}");
        let (code, msg) = status(
            MemoryFileError::OutOfDescriptors { path: "/m".into(), detail: "out of fds".into() }
                .into(),
        );
        assert_eq!(code, Code::ResourceExhausted);
        assert_eq!(msg, "cannot open memory file /m: out of fds");
        let other = std::io::Error::from_raw_os_error(libc::EACCES);
        assert_eq!(status(ServiceError::io("x".into(), other)).0, Code::Internal);
    }

    #[test]
    fn local_failures_are_internal() {
        let io = ServiceError::Io {
            what: "binding /run/x.sock".into(),
            source: std::io::Error::from_raw_os_error(libc::EACCES),
        };
        let (code, msg) = status(io);
        assert_eq!(code, Code::Internal);
        assert!(msg.contains("/run/x.sock") && msg.contains("Permission denied"), "{msg}");
    }
}
