//! What the supervisor writes to its runtime directory so that a restarted supervisor can carry
//! on (see `recover.rs`):
//!
//! - `DIR/active-version`: the active version's label, rewritten whenever it changes;
//! - `DIR/sessions/<id>.json`: a session's metadata that no pager knows (labels, creation time,
//!   VMM socket path, where its overlays go), written when the session is created and removed
//!   when it is forgotten; once its VMM's handshake is accepted, also what it takes to have it
//!   adopted with no pager and no earlier supervisor left (`connected`: the handoff request, the
//!   identity of its uffd and of its VMM process); marked `finished` when it graduates, ends or
//!   fails;
//! - `DIR/sessions/<id>.overlay`: the bytes of a session's overlays (a copy of its sealed
//!   memfd), beside its metadata, so that a restarted supervisor holds them again;
//! - `DIR/sessions/<id>.removed`: the session's removed-ranges log (`uffdpager::removed_log`),
//!   from its handshake until it finishes;
//! - `DIR/pagers/<version>/{pid,grpc.sock,handoff.sock,pager.log}`: written by `pagers.rs`.
//!
//! Files are replaced atomically (written beside, then renamed), so a supervisor killed at any
//! moment leaves either the old content or the new.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tracing::{debug, warn};
use uffdpager::api::Session;
use uffdpager::handoff::HandoffRequest;
use uffdpager::overlay::{self, OverlaySpan, Overlays};

use crate::session_id;

/// File name of the active version's record.
const ACTIVE_VERSION: &str = "active-version";

/// A session's metadata, as `DIR/sessions/<id>.json` holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionMeta {
    pub id: String,
    pub memory_file: String,
    pub socket_path: String,
    /// Creation time: seconds and nanoseconds since the Unix epoch.
    #[serde(default)]
    pub created_at_secs: i64,
    #[serde(default)]
    pub created_at_nanos: i32,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Where the session's overlays go; their bytes are in `<id>.overlay`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overlays: Vec<OverlaySpan>,
    /// The memory file's (device, inode) when the session was created.
    #[serde(default)]
    pub memory_file_id: (u64, u64),
    /// Set once the VMM's handshake is accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connected: Option<ConnectedMeta>,
    /// It graduated, ended or failed: nothing to recover.
    #[serde(default)]
    pub finished: bool,
}

/// What a connected session needs to be adopted after its pager and the supervisor that handed
/// it over are both gone: the handoff itself, and how to find its uffd in its VMM again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectedMeta {
    pub request: HandoffRequest,
    /// The uffd's (device, inode): every userfaultfd has an inode of its own.
    pub uffd_id: (u64, u64),
    /// The VMM's start time (`/proc/<pid>/stat` field 22), so a reused pid is not taken for it.
    pub vmm_start_time: u64,
}

impl SessionMeta {
    pub fn of(session: &Session, overlays: Option<&Overlays>) -> Self {
        let created = session.created_at.unwrap_or_default();
        Self {
            id: session.id.clone(),
            memory_file: session.memory_file.clone(),
            socket_path: session.socket_path.clone(),
            created_at_secs: created.seconds,
            created_at_nanos: created.nanos,
            labels: session.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            overlays: overlays.map(|o| o.spans.clone()).unwrap_or_default(),
            memory_file_id: (0, 0),
            connected: None,
            finished: false,
        }
    }

    /// Puts the metadata into a session rebuilt from a pager's view.
    pub fn apply_to(&self, session: &mut Session) {
        if session.memory_file.is_empty() {
            session.memory_file = self.memory_file.clone();
        }
        session.socket_path = self.socket_path.clone();
        if self.created_at_secs > 0 {
            session.created_at = Some(prost_types::Timestamp {
                seconds: self.created_at_secs,
                nanos: self.created_at_nanos,
            });
        }
        session.labels = self.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        if session.overlay_count == 0 && !self.overlays.is_empty() {
            session.overlay_count = u32::try_from(self.overlays.len()).unwrap_or(u32::MAX);
            session.overlay_bytes = overlay::total_bytes(&self.overlays);
        }
    }
}

fn meta_path(sessions_dir: &Path, id: &str) -> PathBuf {
    sessions_dir.join(format!("{id}.json"))
}

fn overlay_path(sessions_dir: &Path, id: &str) -> PathBuf {
    sessions_dir.join(format!("{id}.overlay"))
}

/// Where a session's removed-ranges log lives.
pub fn removed_log_path(sessions_dir: &Path, id: &str) -> PathBuf {
    sessions_dir.join(format!("{id}.removed"))
}

/// Removes a session's removed-ranges log file, if any.
pub fn remove_removed_log(sessions_dir: &Path, id: &str) {
    match std::fs::remove_file(removed_log_path(sessions_dir, id)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            debug!(session = %id, error = %e, "cannot remove the session's removed-ranges log");
        }
        _ => {}
    }
}

/// Writes `contents` to `path` through a temporary file (never opened through a symlink) and a
/// rename.
fn replace_file(path: &Path, contents: &[u8]) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    io::Write::write_all(&mut crate::runtime_dir::create_private_file(&tmp, false)?, contents)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// Records a session's metadata. Best effort: a failure is logged (a restarted supervisor would
/// then show the session without labels or creation time).
pub fn write_session_meta(
    sessions_dir: &Path,
    session: &Session,
    overlays: Option<&Overlays>,
    memory_file_id: (u64, u64),
) {
    let mut meta = SessionMeta::of(session, overlays);
    meta.memory_file_id = memory_file_id;
    if let Some(o) = overlays {
        // The bytes first: metadata that lists overlays always finds them.
        let bytes = read_memfd(o);
        let written = bytes.and_then(|b| replace_file(&overlay_path(sessions_dir, &meta.id), &b));
        if let Err(e) = written {
            warn!(session = %meta.id, error = %e, "cannot record the session's overlays");
        }
    }
    write_meta(sessions_dir, &meta);
}

fn write_meta(sessions_dir: &Path, meta: &SessionMeta) {
    let result = serde_json::to_vec_pretty(meta)
        .map_err(io::Error::other)
        .and_then(|bytes| replace_file(&meta_path(sessions_dir, &meta.id), &bytes));
    if let Err(e) = result {
        warn!(session = %meta.id, error = %e, "cannot record the session's metadata");
    }
}

/// Changes a session's recorded metadata with `f` (nothing if it has none).
pub fn update_session_meta(sessions_dir: &Path, id: &str, f: impl FnOnce(&mut SessionMeta)) {
    let Ok(bytes) = std::fs::read(meta_path(sessions_dir, id)) else { return };
    match serde_json::from_slice::<SessionMeta>(&bytes) {
        Ok(mut meta) => {
            f(&mut meta);
            write_meta(sessions_dir, &meta);
        }
        Err(e) => warn!(session = %id, error = %e, "unreadable session metadata; not updated"),
    }
}

/// Removes a session's metadata file, if any.
pub fn remove_session_meta(sessions_dir: &Path, id: &str) {
    for path in [meta_path(sessions_dir, id), overlay_path(sessions_dir, id)] {
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                debug!(session = %id, path = %path.display(), error = %e, "cannot remove the session's metadata");
            }
            _ => {}
        }
    }
}

fn read_memfd(o: &Overlays) -> io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::from(o.fd.try_clone()?);
    let mut bytes =
        vec![0u8; usize::try_from(overlay::data_len(&o.spans)).map_err(io::Error::other)?];
    file.read_exact_at(&mut bytes, 0)?;
    Ok(bytes)
}

/// The overlays a session's metadata lists, their bytes read back from `<id>.overlay` into a
/// new sealed memfd. `None` without overlays; an error if the bytes are missing or short.
pub fn read_session_overlays(
    sessions_dir: &Path,
    meta: &SessionMeta,
) -> io::Result<Option<Overlays>> {
    if meta.overlays.is_empty() {
        return Ok(None);
    }
    let bytes = std::fs::read(overlay_path(sessions_dir, &meta.id))?;
    let need = overlay::data_len(&meta.overlays);
    if (bytes.len() as u64) < need {
        return Err(io::Error::other(format!(
            "the overlay file holds {} bytes, the overlays need {need}",
            bytes.len()
        )));
    }
    Ok(Some(Overlays { spans: meta.overlays.clone(), fd: overlay::memfd_of(&bytes)? }))
}

/// Every readable session metadata file, by session id. Unreadable ones are logged and skipped.
pub fn read_session_metas(sessions_dir: &Path) -> HashMap<String, SessionMeta> {
    let mut out = HashMap::new();
    let Ok(entries) = std::fs::read_dir(sessions_dir) else { return out };
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(id) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".json"))
            .filter(|id| session_id::validate(id).is_ok())
        else {
            continue;
        };
        let parsed = std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<SessionMeta>(&b).map_err(|e| e.to_string()));
        match parsed {
            Ok(meta) if meta.id == id => {
                out.insert(id.to_string(), meta);
            }
            Ok(_) => warn!(path = %path.display(), "session metadata names another session"),
            Err(e) => warn!(path = %path.display(), error = %e, "unreadable session metadata"),
        }
    }
    out
}

/// Records the active version.
pub fn write_active_version(runtime_dir: &Path, version: &str) -> io::Result<()> {
    replace_file(&runtime_dir.join(ACTIVE_VERSION), format!("{version}\n").as_bytes())
}

/// The active version recorded by an earlier run, if any (and if it is a valid label).
pub fn read_active_version(runtime_dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(runtime_dir.join(ACTIVE_VERSION)).ok()?;
    let label = text.trim();
    session_id::validate(label).is_ok().then(|| label.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_metadata_survives_a_round_trip_through_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let session = Session {
            id: "vm-1".into(),
            memory_file: "/snap/mem".into(),
            socket_path: "/run/uffd-pager/sessions/vm-1.sock".into(),
            created_at: Some(prost_types::Timestamp { seconds: 1_700_000_000, nanos: 123_456_789 }),
            labels: [("team".to_string(), "a".to_string())].into(),
            ..Default::default()
        };
        write_session_meta(dir.path(), &session, None, (1, 2));
        std::fs::write(dir.path().join("vm-2.json"), "not json").unwrap();
        std::fs::write(dir.path().join("vm-1.sock"), "").unwrap();
        let metas = read_session_metas(dir.path());
        assert_eq!(metas.len(), 1, "{metas:?}");
        let mut rebuilt = Session { id: "vm-1".into(), ..Default::default() };
        metas["vm-1"].apply_to(&mut rebuilt);
        assert_eq!(rebuilt.labels, session.labels);
        assert_eq!(rebuilt.created_at, session.created_at);
        assert_eq!(rebuilt.socket_path, session.socket_path);
        assert_eq!(rebuilt.memory_file, "/snap/mem");
        assert_eq!((metas["vm-1"].memory_file_id, metas["vm-1"].finished), ((1, 2), false));
        update_session_meta(dir.path(), "vm-1", |m| m.finished = true);
        assert!(read_session_metas(dir.path())["vm-1"].finished);
        remove_session_meta(dir.path(), "vm-1");
        assert!(read_session_metas(dir.path()).is_empty());
    }

    #[test]
    fn a_sessions_overlays_survive_a_round_trip_through_the_runtime_directory() {
        let dir = tempfile::tempdir().unwrap();
        let inputs = vec![
            overlay::OverlayInput {
                offset: 8192,
                source: overlay::OverlaySource::Data(vec![7; 4096]),
            },
            overlay::OverlayInput {
                offset: 0,
                source: overlay::OverlaySource::Data(vec![9; 4096]),
            },
        ];
        let o = overlay::load(inputs, 1 << 20, 1 << 20).unwrap().unwrap();
        let session = Session { id: "vm-1".into(), ..Default::default() };
        write_session_meta(dir.path(), &session, Some(&o), (0, 0));
        let metas = read_session_metas(dir.path());
        assert_eq!(metas["vm-1"].overlays, o.spans);
        let back = read_session_overlays(dir.path(), &metas["vm-1"]).unwrap().unwrap();
        assert_eq!(back.spans, o.spans);
        assert_eq!(read_memfd(&back).unwrap(), read_memfd(&o).unwrap());
        let mut shown = Session::default();
        metas["vm-1"].apply_to(&mut shown);
        assert_eq!((shown.overlay_count, shown.overlay_bytes), (2, 8192));
        remove_session_meta(dir.path(), "vm-1");
        assert!(!dir.path().join("vm-1.overlay").exists());
    }

    #[test]
    fn the_active_version_is_read_back_and_nonsense_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_active_version(dir.path()), None);
        write_active_version(dir.path(), "v2").unwrap();
        assert_eq!(read_active_version(dir.path()).as_deref(), Some("v2"));
        std::fs::write(dir.path().join(ACTIVE_VERSION), "../etc\n").unwrap();
        assert_eq!(read_active_version(dir.path()), None);
    }
}
