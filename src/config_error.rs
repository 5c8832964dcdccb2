//! Why a service's configuration (a TOML file, then flags over it) cannot be used: one error
//! type for the supervisor and the controller, whose messages name the file or the setting.

use std::path::PathBuf;

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading the config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("parsing the config file {path}: {source}")]
    Parse { path: PathBuf, source: toml::de::Error },
    #[error("invalid setting `{setting}`: {reason}")]
    Invalid { setting: &'static str, reason: String },
    /// The supervisor's flags could not be laid over its config file.
    #[error("merging the flags over the config file: {0}")]
    Merge(String),
}

/// A setting refused, saying why.
pub fn invalid(setting: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { setting, reason: reason.into() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_invalid_setting_is_named_with_its_reason() {
        let e = invalid("max_sessions", "at least one session must be allowed");
        assert_eq!(
            e.to_string(),
            "invalid setting `max_sessions`: at least one session must be allowed"
        );
    }
}
