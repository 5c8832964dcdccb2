//! The supervisor's file descriptors: its `RLIMIT_NOFILE` soft limit raised to the hard limit at
//! start (every session costs a few descriptors: its socket, memory file, uffd, VMM stream and
//! removed-ranges log), and errors at the limit told apart from the caller's mistakes, so that a
//! client reads "out of file descriptors" (RESOURCE_EXHAUSTED), not "invalid memory file".

use std::io;

use nix::sys::resource::{getrlimit, setrlimit, Resource};

/// The soft and hard `RLIMIT_NOFILE` before and after [`raise_nofile`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Raised {
    pub before: u64,
    pub now: u64,
    pub hard: u64,
}

/// Raises the soft `RLIMIT_NOFILE` to the hard one (a no-op when they are equal).
pub fn raise_nofile() -> io::Result<Raised> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(Raised { before: soft, now: hard.max(soft), hard })
}

/// The soft `RLIMIT_NOFILE` in force (0 if it cannot be read).
pub fn nofile_limit() -> u64 {
    getrlimit(Resource::RLIMIT_NOFILE).map_or(0, |(soft, _)| soft)
}

/// True for EMFILE (this process's limit) and ENFILE (the system's file table).
pub fn is_out_of_fds(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// What an EMFILE or ENFILE means, in words an operator can act on.
pub fn describe(e: &io::Error) -> String {
    describe_with_limit(e, nofile_limit())
}

fn describe_with_limit(e: &io::Error, limit: u64) -> String {
    match e.raw_os_error() {
        Some(libc::ENFILE) => {
            "the system's file table is full (ENFILE): the host has no file descriptor left"
                .to_string()
        }
        _ => format!(
            "the supervisor is out of file descriptors (EMFILE: all {limit} that its \
             RLIMIT_NOFILE allows are open): end or graduate sessions, or raise the limit"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_is_raised_to_the_hard_limit_and_stays_there() {
        let raised = raise_nofile().unwrap();
        assert_eq!(raised.now, raised.hard);
        assert_eq!(nofile_limit(), raised.hard);
        assert_eq!(raise_nofile().unwrap().before, raised.hard, "a second raise changes nothing");
    }

    #[test]
    fn out_of_descriptors_is_told_apart_and_explained() {
        let emfile = io::Error::from_raw_os_error(libc::EMFILE);
        assert!(is_out_of_fds(&emfile));
        assert!(is_out_of_fds(&io::Error::from_raw_os_error(libc::ENFILE)));
        assert!(!is_out_of_fds(&io::Error::from_raw_os_error(libc::ENOENT)));
        let text = describe_with_limit(&emfile, 256);
        assert!(text.contains("out of file descriptors") && text.contains("all 256"), "{text}");
        let text = describe_with_limit(&io::Error::from_raw_os_error(libc::ENFILE), 256);
        assert!(text.contains("ENFILE"), "{text}");
    }
}
