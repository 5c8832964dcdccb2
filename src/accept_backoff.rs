//! Accept loops that back off instead of spinning when `accept(2)` fails.
//!
//! At the descriptor limit (`EMFILE`, or `ENFILE` system-wide) `accept` fails at once and the
//! listening socket stays readable, since the connection it could not take is still queued:
//! a loop that retries at once burns a CPU and never serves anyone (tonic's server loop does just
//! that: it logs the error at trace level and polls again). [`Backoff`] wraps a stream of accepted
//! connections (what tonic's `serve_with_incoming` takes): an error is never passed on; it pauses
//! the stream, 10 ms at first and doubling up to 1 s while the failures go on, and logs once per
//! burst (the first failure, then one line when accepting works again, with the count).
//!
//! [`Pacing`] is the decision alone (what to wait, whether to log), tested as a pure function;
//! the session sockets' accept loops of the supervisor use it too.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Sleep;
use tokio_stream::Stream;

/// The first pause after a failed accept.
pub const FIRST_PAUSE: Duration = Duration::from_millis(10);
/// The longest pause between two attempts while accepts keep failing.
pub const MAX_PAUSE: Duration = Duration::from_secs(1);

/// True for the errors that mean "out of descriptors or memory": the ones that repeat at once.
pub fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM))
}

/// What to do after a failed accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AfterFailure {
    /// Wait this long before accepting again.
    pub pause: Duration,
    /// The first failure of a burst: log it (the later ones are counted, not logged).
    pub log: bool,
}

/// The back-off of one accept loop: pauses doubling from [`FIRST_PAUSE`] to [`MAX_PAUSE`] while
/// accepts fail, back to the start after one succeeds.
#[derive(Debug, Clone, Default)]
pub struct Pacing {
    failures: u64,
}

impl Pacing {
    /// An accept failed.
    pub fn failed(&mut self) -> AfterFailure {
        self.failures += 1;
        let doublings = u32::try_from(self.failures - 1).unwrap_or(u32::MAX).min(10);
        let pause = FIRST_PAUSE.saturating_mul(1 << doublings).min(MAX_PAUSE);
        AfterFailure { pause, log: self.failures == 1 }
    }

    /// An accept succeeded: how many failed in a row before it (0: none, nothing to log).
    pub fn succeeded(&mut self) -> u64 {
        std::mem::take(&mut self.failures)
    }
}

/// A stream of accepted connections that backs off on errors (see the module doc). `name` says
/// which listener it is in its log lines.
#[derive(Debug)]
pub struct Backoff<S> {
    inner: S,
    name: String,
    pacing: Pacing,
    pause: Option<Pin<Box<Sleep>>>,
}

impl<S> Backoff<S> {
    pub fn new(inner: S, name: impl Into<String>) -> Self {
        Self { inner, name: name.into(), pacing: Pacing::default(), pause: None }
    }
}

impl<S, T> Stream for Backoff<S>
where
    S: Stream<Item = io::Result<T>> + Unpin,
{
    type Item = io::Result<T>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(pause) = this.pause.as_mut() {
                if pause.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                this.pause = None;
            }
            match Pin::new(&mut this.inner).poll_next(cx) {
                Poll::Ready(Some(Ok(conn))) => {
                    let failed = this.pacing.succeeded();
                    if failed > 0 {
                        tracing::info!(listener = %this.name, failed, "accepting connections again");
                    }
                    return Poll::Ready(Some(Ok(conn)));
                }
                Poll::Ready(Some(Err(e))) => {
                    let next = this.pacing.failed();
                    if next.log {
                        tracing::warn!(
                            listener = %this.name,
                            error = %e,
                            out_of_descriptors = is_resource_exhaustion(&e),
                            "accepting a connection failed; backing off (up to 1s) until it \
                             works again",
                        );
                    }
                    this.pause = Some(Box::pin(tokio::time::sleep(next.pause)));
                }
                other => return other,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_up_to_a_second_and_only_the_first_failure_is_logged() {
        let mut p = Pacing::default();
        let pauses: Vec<(u128, bool)> =
            (0..10).map(|_| p.failed()).map(|a| (a.pause.as_millis(), a.log)).collect();
        assert_eq!(
            pauses,
            [
                (10, true),
                (20, false),
                (40, false),
                (80, false),
                (160, false),
                (320, false),
                (640, false),
                (1000, false),
                (1000, false),
                (1000, false)
            ]
        );
        for _ in 0..1000 {
            assert_eq!(p.failed().pause, MAX_PAUSE);
        }
        assert_eq!(p.succeeded(), 1010);
        assert_eq!(p.succeeded(), 0, "a success after a success has nothing to report");
        assert_eq!(p.failed(), AfterFailure { pause: FIRST_PAUSE, log: true }, "a new burst");
    }

    #[test]
    fn descriptor_and_memory_shortages_are_told_apart_from_other_errors() {
        for errno in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM] {
            assert!(is_resource_exhaustion(&io::Error::from_raw_os_error(errno)), "{errno}");
        }
        assert!(!is_resource_exhaustion(&io::Error::from_raw_os_error(libc::ECONNABORTED)));
        assert!(!is_resource_exhaustion(&io::Error::other("x")));
    }

    #[tokio::test(start_paused = true)]
    async fn errors_are_swallowed_and_paced_and_connections_pass_through() {
        use tokio_stream::StreamExt;
        let items = vec![
            Err(io::Error::from_raw_os_error(libc::EMFILE)),
            Err(io::Error::from_raw_os_error(libc::EMFILE)),
            Ok(7),
            Err(io::Error::from_raw_os_error(libc::ENFILE)),
            Ok(8),
        ];
        let mut s = Backoff::new(tokio_stream::iter(items), "test");
        let start = tokio::time::Instant::now();
        assert_eq!(s.next().await.unwrap().unwrap(), 7);
        assert_eq!(start.elapsed(), Duration::from_millis(30), "10 ms, then 20 ms");
        assert_eq!(s.next().await.unwrap().unwrap(), 8);
        assert_eq!(start.elapsed(), Duration::from_millis(40), "a new burst starts at 10 ms");
        assert!(s.next().await.is_none());
    }
}
