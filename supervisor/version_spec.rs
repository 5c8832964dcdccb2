//! The pager versions to start, as given: `--pager-binary PATH[=LABEL]` (repeatable; the last
//! one is active), a versions file (`--versions-config FILE`) or the config file's
//! `[[versions]]` tables, checked into a list of [`VersionSpec`]s (the format is in
//! `startup.rs`). A leaf: it reads files and flags, and starts nothing.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use crate::session_id::{self, NameError};
use crate::tuning::PagerTuning;

/// Why the list of versions to start is refused.
#[derive(Debug, thiserror::Error)]
pub enum VersionsError {
    #[error("empty pager binary")]
    EmptyBinary,
    #[error("{spec:?}: version label {label:?} is not valid: {source}")]
    BadSpecLabel { spec: String, label: String, source: NameError },
    #[error("version label {label:?} is not valid: {source}")]
    BadLabel { label: String, source: NameError },
    #[error("version {0:?} is listed twice")]
    Twice(String),
    #[error("{0} versions are marked active; at most one may be")]
    ManyActive(usize),
    #[error("no pager version is listed")]
    Empty,
    #[error(transparent)]
    Toml(#[from] toml::de::Error),
}

/// One version to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionSpec {
    pub binary: PathBuf,
    /// Empty: what the binary prints with `--print-version`.
    pub label: String,
    pub active: bool,
    /// Flags passed to each process of this version.
    pub tuning: PagerTuning,
}

/// Parses `PATH` or `PATH=LABEL` (split at the last `=` when what follows is a valid label).
pub fn parse_version_spec(s: &str) -> Result<VersionSpec, VersionsError> {
    if s.is_empty() {
        return Err(VersionsError::EmptyBinary);
    }
    let (binary, label) = match s.rsplit_once('=') {
        Some((path, label)) if !path.is_empty() && !label.contains('/') => {
            session_id::validate(label).map_err(|source| VersionsError::BadSpecLabel {
                spec: s.into(),
                label: label.into(),
                source,
            })?;
            (path, label)
        }
        _ => (s, ""),
    };
    Ok(VersionSpec {
        binary: PathBuf::from(binary),
        label: label.to_string(),
        active: false,
        tuning: PagerTuning::default(),
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VersionsFile {
    versions: Vec<VersionsFileEntry>,
}

/// One `[[versions]]` table (of a versions file or of the config file).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VersionsFileEntry {
    /// The pager binary; relative: to the file's directory.
    pub binary_path: PathBuf,
    /// Empty: what the binary prints with `--print-version`.
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub active: bool,
    /// `uffd-pager --fault-threads`.
    pub fault_threads: Option<u32>,
    /// `uffd-pager --copy-threads`.
    pub copy_threads: Option<u32>,
    /// `uffd-pager --complete-step-bytes`.
    pub complete_step_bytes: Option<u64>,
    /// `uffd-pager --fault-spin-us`.
    pub fault_spin_us: Option<u64>,
    /// `uffd-pager --fault-around-kib`.
    pub fault_around_kib: Option<u64>,
    /// `uffd-pager --memory-file-linger-secs`.
    pub memory_file_linger_secs: Option<u64>,
    /// `uffd-pager --record-working-set-secs`.
    pub record_working_set_secs: Option<u64>,
    /// `uffd-pager --record-working-set-max-runs`.
    pub record_working_set_max_runs: Option<u64>,
    /// `uffd-pager --follow-vcpus`.
    pub follow_vcpus: Option<bool>,
}

impl VersionsFileEntry {
    fn spec(self, base: &Path) -> VersionSpec {
        VersionSpec {
            binary: base.join(self.binary_path),
            label: self.version,
            active: self.active,
            tuning: PagerTuning {
                fault_threads: self.fault_threads,
                copy_threads: self.copy_threads,
                complete_step_bytes: self.complete_step_bytes,
                fault_spin_us: self.fault_spin_us,
                fault_around_kib: self.fault_around_kib,
                memory_file_linger_secs: self.memory_file_linger_secs,
                record_working_set_secs: self.record_working_set_secs,
                record_working_set_max_runs: self.record_working_set_max_runs,
                follow_vcpus: self.follow_vcpus,
            },
        }
    }
}

/// Parses a versions file; relative binary paths are taken from `base`.
pub fn parse_versions_file(text: &str, base: &Path) -> Result<Vec<VersionSpec>, VersionsError> {
    let file: VersionsFile = toml::from_str(text)?;
    versions_from_entries(file.versions, base)
}

/// The versions of `[[versions]]` tables; relative binary paths are taken from `base`.
pub fn versions_from_entries(
    entries: Vec<VersionsFileEntry>,
    base: &Path,
) -> Result<Vec<VersionSpec>, VersionsError> {
    check_specs(entries.into_iter().map(|e| e.spec(base)).collect())
}

/// Checks labels and picks the active version (the one marked, else the last).
fn check_specs(mut specs: Vec<VersionSpec>) -> Result<Vec<VersionSpec>, VersionsError> {
    if specs.is_empty() {
        return Err(VersionsError::Empty);
    }
    let mut seen = BTreeSet::new();
    for s in &specs {
        if !s.label.is_empty() {
            session_id::validate(&s.label)
                .map_err(|source| VersionsError::BadLabel { label: s.label.clone(), source })?;
            if !seen.insert(s.label.clone()) {
                return Err(VersionsError::Twice(s.label.clone()));
            }
        }
    }
    match specs.iter().filter(|s| s.active).count() {
        0 => {
            if let Some(last) = specs.last_mut() {
                last.active = true;
            }
        }
        1 => {}
        n => return Err(VersionsError::ManyActive(n)),
    }
    Ok(specs)
}

/// The versions to start: `--pager-binary` (with `--pager-version` for a single one), or
/// `--versions-config`, or the config file's `[[versions]]` (`file_versions`, binary paths
/// already resolved), or the pager beside this executable. Binary paths are made absolute.
pub fn version_specs(
    pager_binaries: &[VersionSpec],
    pager_version: Option<&str>,
    versions_config: Option<&Path>,
    file_versions: Vec<VersionsFileEntry>,
) -> anyhow::Result<Vec<VersionSpec>> {
    if pager_binaries.is_empty() && versions_config.is_none() && !file_versions.is_empty() {
        if pager_version.is_some() {
            bail!("pager_version labels --pager-binary; label `[[versions]]` with `version`");
        }
        return versions_from_entries(file_versions, Path::new("/"))
            .context("in the config file's [[versions]]");
    }
    if let Some(path) = versions_config {
        if !pager_binaries.is_empty() {
            bail!("--versions-config and --pager-binary: give one");
        }
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let base = std::path::absolute(path)?.parent().map(Path::to_path_buf).unwrap_or_default();
        return parse_versions_file(&text, &base)
            .with_context(|| format!("in the versions file {}", path.display()));
    }
    let mut specs = pager_binaries.to_vec();
    if specs.is_empty() {
        let binary = default_pager_binary().context("locating the pager beside this executable")?;
        specs.push(VersionSpec {
            binary,
            label: String::new(),
            active: false,
            tuning: PagerTuning::default(),
        });
    }
    if let Some(label) = pager_version {
        match specs.as_mut_slice() {
            [one] if one.label.is_empty() => one.label = label.to_string(),
            [_] => bail!("--pager-version and a label in --pager-binary PATH=LABEL: give one"),
            _ => bail!("--pager-version with several --pager-binary: label each as PATH=LABEL"),
        }
    }
    for s in &mut specs {
        s.binary = std::path::absolute(&s.binary)
            .with_context(|| format!("resolving the pager binary {}", s.binary.display()))?;
    }
    Ok(check_specs(specs)?)
}

/// `uffd-pager` beside the running executable.
pub fn default_pager_binary() -> std::io::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    Ok(exe.with_file_name("uffd-pager"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pager_binary_may_carry_its_label_after_an_equals_sign() {
        let s = parse_version_spec("/opt/p/uffd-pager=v2").unwrap();
        assert_eq!((s.binary, s.label.as_str()), (PathBuf::from("/opt/p/uffd-pager"), "v2"));
        let s = parse_version_spec("/opt/p/uffd-pager").unwrap();
        assert_eq!(s.label, "");
        // An `=` inside a directory name is part of the path.
        let s = parse_version_spec("/opt/a=b/uffd-pager").unwrap();
        assert_eq!((s.binary, s.label.as_str()), (PathBuf::from("/opt/a=b/uffd-pager"), ""));
        let bad = parse_version_spec("/opt/p/uffd-pager=.bad").unwrap_err().to_string();
        assert!(bad.contains(".bad"), "{bad}");
        assert!(parse_version_spec("").is_err());
    }

    #[test]
    fn the_last_version_is_active_unless_one_is_marked() {
        let specs = version_specs(
            &[parse_version_spec("/p1=v1").unwrap(), parse_version_spec("/p2=v2").unwrap()],
            None,
            None,
            Vec::new(),
        )
        .unwrap();
        assert_eq!(specs.iter().map(|s| s.active).collect::<Vec<_>>(), [false, true]);
        let text = r#"
            [[versions]]
            version = "v1"
            binary_path = "/opt/1/uffd-pager"
            active = true

            [[versions]]
            binary_path = "bin/uffd-pager"
        "#;
        let specs = parse_versions_file(text, Path::new("/etc/uffd")).unwrap();
        assert!(specs[0].active && !specs[1].active);
        assert_eq!(specs[1].binary, PathBuf::from("/etc/uffd/bin/uffd-pager"));
        assert_eq!(specs[1].label, "");
    }

    #[test]
    fn nonsense_in_a_versions_file_is_refused_saying_what() {
        let two_active = r#"
            [[versions]]
            binary_path = "/a"
            active = true
            [[versions]]
            binary_path = "/b"
            active = true
        "#;
        let err = |text: &str| parse_versions_file(text, Path::new("/")).unwrap_err().to_string();
        assert!(err(two_active).contains("2 versions"));
        let twice = "[[versions]]\nbinary_path = \"/a\"\nversion = \"v1\"\n\
                     [[versions]]\nbinary_path = \"/b\"\nversion = \"v1\"\n";
        assert!(err(twice).contains("twice"));
        assert!(err("[[versions]]\nbinary = \"/a\"\n").contains("binary"));
        assert!(err("versions = []").contains("no pager"));
    }

    #[test]
    fn pager_version_labels_a_single_binary_only() {
        let one = [parse_version_spec("/p").unwrap()];
        let specs = version_specs(&one, Some("v1"), None, Vec::new()).unwrap();
        assert_eq!((specs[0].label.as_str(), specs[0].active), ("v1", true));
        let two = [parse_version_spec("/p=a").unwrap(), parse_version_spec("/q=b").unwrap()];
        assert!(version_specs(&two, Some("v1"), None, Vec::new()).is_err());
        let labelled = [parse_version_spec("/p=a").unwrap()];
        assert!(version_specs(&labelled, Some("v1"), None, Vec::new()).is_err());
    }
}
