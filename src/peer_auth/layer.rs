//! Enforcing a [`CallerPolicy`] on a tonic server's Unix socket: each accepted connection is
//! checked once ([`checked_incoming`]) and carries its verdict as tonic's connect info, which
//! tonic puts into every request's extensions; [`RequireAllowedCaller`] answers each request
//! of a refused connection `PERMISSION_DENIED` before any service sees it. A request without a
//! verdict (a server built without [`checked_incoming`]) is refused too: the check fails closed.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;
use tokio_stream::{Stream, StreamExt};
use tonic::codegen::http;
use tonic::transport::server::Connected;
use tracing::{debug, warn};

use super::{authorize, Admission, CallerPolicy, PeerCredentials};

/// What the check of a connection decided; tonic's connect info of a [`CheckedStream`].
#[derive(Debug, Clone)]
pub enum CallerVerdict {
    Allowed { peer: Arc<PeerCredentials>, admission: Admission },
    Refused { reason: Arc<str> },
}

/// An accepted Unix-socket connection and the verdict on its caller.
#[derive(Debug)]
pub struct CheckedStream {
    inner: UnixStream,
    verdict: CallerVerdict,
}

impl CheckedStream {
    /// Checks the caller of `inner` under `policy`; a refusal is logged (one line per
    /// connection) with the caller's credentials. `socket` names the socket in the log.
    pub fn check(inner: UnixStream, policy: &CallerPolicy, socket: &str) -> Self {
        let verdict = match PeerCredentials::of(std::os::fd::AsFd::as_fd(&inner)) {
            Ok(peer) => match authorize(policy, &peer) {
                Ok(admission) => {
                    debug!(socket, peer_uid = peer.uid, peer_pid = ?peer.pid, ?admission, "caller admitted");
                    CallerVerdict::Allowed { peer: Arc::new(peer), admission }
                }
                Err(reason) => {
                    warn!(
                        socket,
                        peer_uid = peer.uid,
                        peer_gid = peer.gid,
                        peer_pid = ?peer.pid,
                        %reason,
                        "refused a caller on the API socket (PERMISSION_DENIED)",
                    );
                    CallerVerdict::Refused { reason: reason.into() }
                }
            },
            Err(e) => {
                warn!(socket, error = %e, "refused a caller whose credentials cannot be read");
                CallerVerdict::Refused {
                    reason: format!("the caller's credentials cannot be read: {e}").into(),
                }
            }
        };
        Self { inner, verdict }
    }

    pub fn verdict(&self) -> &CallerVerdict {
        &self.verdict
    }
}

/// The connections of `listener`, each checked under `policy` (for a tonic server's
/// `serve_with_incoming`, together with [`RequireAllowedCaller`]).
pub fn checked_incoming<S>(
    listener: S,
    policy: CallerPolicy,
    socket: String,
) -> impl Stream<Item = io::Result<CheckedStream>>
where
    S: Stream<Item = io::Result<UnixStream>>,
{
    listener.map(move |accepted| accepted.map(|s| CheckedStream::check(s, &policy, &socket)))
}

impl Connected for CheckedStream {
    type ConnectInfo = CallerVerdict;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.verdict.clone()
    }
}

impl AsyncRead for CheckedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for CheckedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// The tower layer that answers `PERMISSION_DENIED` to every request of a refused connection.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequireAllowedCaller;

impl<S> tower::Layer<S> for RequireAllowedCaller {
    type Service = CallerCheck<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CallerCheck { inner }
    }
}

/// The service of [`RequireAllowedCaller`].
#[derive(Debug, Clone)]
pub struct CallerCheck<S> {
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for CallerCheck<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let refusal = match req.extensions().get::<CallerVerdict>() {
            Some(CallerVerdict::Allowed { .. }) => return Box::pin(self.inner.call(req)),
            Some(CallerVerdict::Refused { reason }) => reason.to_string(),
            None => "no caller credentials on this connection".to_string(),
        };
        let status = tonic::Status::permission_denied(refusal);
        Box::pin(async move { Ok(status.into_http()) })
    }
}
