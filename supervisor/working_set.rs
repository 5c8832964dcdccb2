//! CreateSession's working-set fields (`record_working_set`, `prefetch_working_set`; see
//! `uffdpager::working_set`): their paths checked like the memory file's, and a recording to
//! prefetch read and checked against the session's memory file, so that the caller learns at
//! once that it named a corrupt recording or one of another snapshot. The region layout is only
//! known at the VMM's handshake: the pager checks that part (a mismatch skips the prefetch, with
//! the reason in `prefetch_reason`).

use uffdpager::api::{Session, WorkingSetState};
use uffdpager::working_set::{self, FileIdentity, PathError, ReadError};

/// Why a working-set field was refused.
#[derive(Debug, thiserror::Error)]
pub enum WorkingSetError {
    /// INVALID_ARGUMENT: a bad path, or a file that is not a valid recording.
    #[error(transparent)]
    Path(#[from] PathError),
    #[error("prefetch_working_set {0}")]
    Unreadable(ReadError),
    /// FAILED_PRECONDITION: a valid recording, of another memory file.
    #[error("prefetch_working_set {path} does not fit memory file {memory_file}: {why}")]
    OtherSnapshot { path: String, memory_file: String, why: String },
    #[error("reading the identity of memory file {memory_file}: {source}")]
    Identity { memory_file: String, source: std::io::Error },
}

/// The checked paths, for the handoff.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkingSetPaths {
    pub record: Option<String>,
    pub prefetch: Option<String>,
}

impl WorkingSetPaths {
    /// The session, shown PENDING for what was asked.
    pub fn marked(&self, mut s: Session) -> Session {
        if self.record.is_some() {
            s.record_state = WorkingSetState::Pending as i32;
        }
        if self.prefetch.is_some() {
            s.prefetch_state = WorkingSetState::Pending as i32;
        }
        s
    }
}

/// Checks the two fields (empty: not asked). Blocking: reads the recording and 2 MiB of the
/// memory file.
pub fn check(
    record: &str,
    prefetch: &str,
    memory_file: &str,
    file: &std::fs::File,
) -> Result<WorkingSetPaths, WorkingSetError> {
    let mut paths = WorkingSetPaths::default();
    if !record.is_empty() {
        working_set::check_path("record_working_set", record)?;
        paths.record = Some(record.to_string());
    }
    if !prefetch.is_empty() {
        let path = working_set::check_path("prefetch_working_set", prefetch)?;
        let recording = working_set::read(&path).map_err(WorkingSetError::Unreadable)?;
        let identity = FileIdentity::of(file).map_err(|source| WorkingSetError::Identity {
            memory_file: memory_file.to_string(),
            source,
        })?;
        if let Some(why) = recording.identity.mismatch(&identity) {
            return Err(WorkingSetError::OtherSnapshot {
                path: prefetch.to_string(),
                memory_file: memory_file.to_string(),
                why,
            });
        }
        paths.prefetch = Some(prefetch.to_string());
    }
    Ok(paths)
}

/// Takes a pager's working-set figures into the supervisor's record (pure). A pager that shows
/// nothing (an older version, or one that has not started yet) leaves CreateSession's PENDING.
pub fn merge_live(s: &mut Session, live: &Session) {
    if live.prefetch_state != WorkingSetState::Unspecified as i32 {
        s.prefetch_state = live.prefetch_state;
        s.prefetched_bytes = live.prefetched_bytes;
        s.prefetch_total_bytes = live.prefetch_total_bytes;
        s.prefetch_copied_bytes = live.prefetch_copied_bytes;
        s.prefetch_reason = live.prefetch_reason.clone();
    }
    if live.record_state != WorkingSetState::Unspecified as i32 {
        s.record_state = live.record_state;
        s.recorded_bytes = live.recorded_bytes;
        s.record_reason = live.record_reason.clone();
    }
}

/// Whether the pager knows how the session's recording ended (saved, failed, skipped) or it
/// recorded nothing: a finished session whose recording is still being saved is not forgotten
/// until then, or its outcome would be lost (pure).
pub fn recording_settled(live: &Session) -> bool {
    live.record_state() != WorkingSetState::Running
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use uffdpager::working_set::{FileRun, RecordedRegion, Recording};

    use super::*;

    #[test]
    fn a_recording_still_being_saved_is_not_settled() {
        let mut live = Session::default();
        assert!(recording_settled(&live), "nothing recorded");
        for (state, settled) in [
            (WorkingSetState::Running, false),
            (WorkingSetState::Done, true),
            (WorkingSetState::Failed, true),
            (WorkingSetState::Skipped, true),
        ] {
            live.record_state = state as i32;
            assert_eq!(recording_settled(&live), settled, "{state:?}");
        }
    }

    fn memory_file(dir: &std::path::Path, name: &str, byte: u8) -> (String, std::fs::File) {
        let path = dir.join(name);
        std::fs::File::create(&path).unwrap().write_all(&vec![byte; 2 << 20]).unwrap();
        (path.display().to_string(), std::fs::File::open(&path).unwrap())
    }

    #[test]
    fn a_recording_is_taken_for_its_own_memory_file_and_refused_for_another() {
        let dir = tempfile::tempdir().unwrap();
        let (a, fa) = memory_file(dir.path(), "a", 1);
        let (b, fb) = memory_file(dir.path(), "b", 2);
        let ws = dir.path().join("a.ws");
        let recording = Recording {
            identity: FileIdentity::of(&fa).unwrap(),
            recorded_at_ms: 1,
            regions: vec![RecordedRegion { offset: 0, size: 2 << 20, page_size: 4096 }],
            runs: vec![FileRun { offset: 0, len: 4096 }],
        };
        working_set::write_atomically(&ws, &recording).unwrap();
        let ws = ws.display().to_string();
        let ok = check("", &ws, &a, &fa).unwrap();
        assert_eq!(ok, WorkingSetPaths { record: None, prefetch: Some(ws.clone()) });
        let shown = ok.marked(Session::default());
        assert_eq!(shown.prefetch_state(), WorkingSetState::Pending);
        assert_eq!(shown.record_state(), WorkingSetState::Unspecified);
        let err = check("", &ws, &b, &fb).unwrap_err();
        assert!(matches!(err, WorkingSetError::OtherSnapshot { .. }), "{err}");
        std::fs::write(&ws, b"short").unwrap();
        assert!(matches!(check("", &ws, &a, &fa), Err(WorkingSetError::Unreadable(_))));
        assert!(matches!(check("rel", "", &a, &fa), Err(WorkingSetError::Path(_))));
    }

    #[test]
    fn a_pagers_figures_replace_pending_and_silence_leaves_it() {
        let mut s =
            Session { prefetch_state: WorkingSetState::Pending as i32, ..Default::default() };
        merge_live(&mut s, &Session::default());
        assert_eq!(s.prefetch_state(), WorkingSetState::Pending);
        let live = Session {
            prefetch_state: WorkingSetState::Running as i32,
            prefetched_bytes: 8192,
            prefetch_total_bytes: 16384,
            ..Default::default()
        };
        merge_live(&mut s, &live);
        assert_eq!(
            (s.prefetch_state(), s.prefetched_bytes, s.prefetch_total_bytes),
            (WorkingSetState::Running, 8192, 16384)
        );
    }
}
