//! Names that become file names: session ids (`DIR/sessions/<id>.sock`) and pager version labels
//! (`DIR/pagers/<version>/`). Both follow `[A-Za-z0-9][A-Za-z0-9._-]{0,63}`, which keeps them
//! safe as one path component (no `/`, never `.` or `..`) and short enough for `sun_path`.

use rand::Rng;

/// Longest name accepted.
pub const MAX_LEN: usize = 64;

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("it is empty")]
    Empty,
    #[error("it is {0} bytes long; at most {MAX_LEN} are allowed")]
    TooLong(usize),
    #[error("it must start with a letter or a digit, not {0:?}")]
    BadFirst(char),
    #[error("character {ch:?} at position {index} is not one of [A-Za-z0-9._-]")]
    BadChar { ch: char, index: usize },
}

/// Checks `name` against `[A-Za-z0-9][A-Za-z0-9._-]{0,63}`.
pub fn validate(name: &str) -> Result<(), NameError> {
    let mut chars = name.chars();
    let Some(first) = chars.next() else {
        return Err(NameError::Empty);
    };
    if name.len() > MAX_LEN {
        return Err(NameError::TooLong(name.len()));
    }
    if !first.is_ascii_alphanumeric() {
        return Err(NameError::BadFirst(first));
    }
    for (index, ch) in name.char_indices().skip(1) {
        if !(ch.is_ascii_alphanumeric() || matches!(ch, '.' | '_' | '-')) {
            return Err(NameError::BadChar { ch, index });
        }
    }
    Ok(())
}

/// A fresh session id: `s-` and 12 random hex digits (48 bits: collisions are checked anyway).
pub fn generate_session_id() -> String {
    let n: u64 = rand::thread_rng().gen_range(0..(1u64 << 48));
    format!("s-{n:012x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_ids_and_version_labels() {
        for ok in ["vm-1", "a", "0.1.0", "VM_42.restore-7", &"x".repeat(MAX_LEN)] {
            assert_eq!(validate(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn cannot_accept_an_empty_name() {
        assert_eq!(validate(""), Err(NameError::Empty));
    }

    #[test]
    fn cannot_accept_a_name_longer_than_64() {
        assert_eq!(validate(&"x".repeat(65)), Err(NameError::TooLong(65)));
    }

    #[test]
    fn cannot_accept_path_like_names() {
        assert_eq!(validate(".."), Err(NameError::BadFirst('.')));
        assert_eq!(validate("-x"), Err(NameError::BadFirst('-')));
        assert_eq!(validate("a/b"), Err(NameError::BadChar { ch: '/', index: 1 }));
        assert_eq!(validate("a b"), Err(NameError::BadChar { ch: ' ', index: 1 }));
        assert_eq!(validate("vm\0"), Err(NameError::BadChar { ch: '\0', index: 2 }));
    }

    #[test]
    fn cannot_accept_non_ascii_letters() {
        assert_eq!(validate("é"), Err(NameError::BadFirst('é')));
        assert!(matches!(validate("vmé"), Err(NameError::BadChar { ch: 'é', index: 2 })));
    }

    #[test]
    fn generated_ids_are_valid_and_distinct() {
        let a = generate_session_id();
        let b = generate_session_id();
        assert_eq!(validate(&a), Ok(()));
        assert_eq!(a.len(), 14);
        assert!(a.starts_with("s-"));
        assert_ne!(a, b);
    }
}
