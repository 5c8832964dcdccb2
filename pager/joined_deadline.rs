//! The deadline of a completion that several CompleteSession calls wait on: the latest of their
//! deadlines, or none once one of them has none. A call that joins a running completion extends
//! it; it never inherits a shorter one. (Each call still ends at its own deadline: its gRPC
//! server cancels it then; the completion goes on for the others, and only the last caller to
//! give up cancels it.)

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// No deadline.
const NONE: u64 = u64::MAX;

/// A deadline that only ever moves later.
#[derive(Debug)]
pub struct JoinedDeadline {
    base: Instant,
    /// Nanoseconds after `base`, or [`NONE`].
    nanos: AtomicU64,
}

impl JoinedDeadline {
    /// The first caller's deadline.
    pub fn new(deadline: Option<Instant>) -> Self {
        let base = Instant::now();
        let d = Self { base, nanos: AtomicU64::new(0) };
        d.nanos.store(d.encode(deadline), Ordering::Release);
        d
    }

    fn encode(&self, deadline: Option<Instant>) -> u64 {
        match deadline {
            None => NONE,
            Some(at) => {
                let nanos = at.saturating_duration_since(self.base).as_nanos();
                u64::try_from(nanos).unwrap_or(NONE - 1).min(NONE - 1)
            }
        }
    }

    /// Another caller joins with its own deadline: the completion lasts until the later one.
    pub fn extend(&self, deadline: Option<Instant>) {
        self.nanos.fetch_max(self.encode(deadline), Ordering::AcqRel);
    }

    /// The deadline now; `None`: none.
    pub fn get(&self) -> Option<Instant> {
        match self.nanos.load(Ordering::Acquire) {
            NONE => None,
            n => Some(self.base + std::time::Duration::from_nanos(n)),
        }
    }

    /// True once the deadline has passed.
    pub fn passed(&self) -> bool {
        self.get().is_some_and(|d| Instant::now() >= d)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_joining_caller_extends_the_deadline_and_never_shortens_it() {
        let now = Instant::now();
        let d = JoinedDeadline::new(Some(now + Duration::from_millis(450)));
        d.extend(Some(now + Duration::from_millis(100)));
        let got = d.get().unwrap();
        assert!(got >= now + Duration::from_millis(449), "kept the later one");
        d.extend(Some(now + Duration::from_secs(5)));
        assert!(d.get().unwrap() >= now + Duration::from_millis(4999));
        d.extend(None);
        assert_eq!(d.get(), None, "a caller without a deadline lifts it");
        d.extend(Some(now));
        assert_eq!(d.get(), None);
        assert!(!d.passed());
    }

    #[test]
    fn a_past_deadline_has_passed() {
        let d = JoinedDeadline::new(Some(Instant::now()));
        assert!(d.passed());
        assert!(!JoinedDeadline::new(None).passed());
    }
}
