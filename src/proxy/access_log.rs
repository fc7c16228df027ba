//! The per-request log line, written when the response body has been sent (or dropped),
//! so it can carry the bytes sent and the whole duration.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use super::h1pool::UpstreamBody;
use bytes::Bytes;
use http::Method;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Full};
use tokio::time::Instant;

/// What the proxy answers: the upstream's streamed body or one of its own, plus the
/// pending log line.
pub struct ResBody {
    inner: Either<UpstreamBody, Full<Bytes>>,
    log: Option<Box<RequestLog>>,
    /// The upstream body's error, held back for one poll (see `poll_frame`).
    failed: Option<hyper::Error>,
}

impl ResBody {
    /// Wraps `inner`; `log` is `None` when info logging is off.
    pub fn new(inner: Either<UpstreamBody, Full<Bytes>>, log: Option<Box<RequestLog>>) -> Self {
        Self {
            inner,
            log,
            failed: None,
        }
    }
}

/// The fields of one access-log line. Never holds the query string or a header.
pub struct RequestLog {
    pub method: Method,
    pub route: Option<Arc<str>>,
    pub path: String,
    pub status: u16,
    pub started: Instant,
    pub replayed: bool,
    pub bytes: u64,
    pub complete: bool,
}

impl Drop for RequestLog {
    fn drop(&mut self) {
        tracing::info!(
            method = %self.method,
            route = self.route.as_deref().unwrap_or("-"),
            path = %self.path,
            status = self.status,
            duration_ms = self.started.elapsed().as_secs_f64() * 1000.0,
            bytes = self.bytes,
            replayed = self.replayed,
            complete = self.complete,
            "request"
        );
    }
}

impl Body for ResBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        if let Some(error) = this.failed.take() {
            return Poll::Ready(Some(Err(error)));
        }
        let polled = match &mut this.inner {
            Either::Left(incoming) => Pin::new(incoming).poll_frame(cx),
            Either::Right(full) => Pin::new(full)
                .poll_frame(cx)
                .map_err(|never| match never {}),
        };
        if let Some(log) = this.log.as_mut() {
            match &polled {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(data) = frame.data_ref() {
                        log.bytes += data.len() as u64;
                    }
                }
                Poll::Ready(None) => log.complete = true,
                _ => {}
            }
            if matches!(polled, Poll::Ready(None)) {
                // Log now rather than when hyper gets around to dropping the body.
                this.log = None;
            }
        }
        // HTTP/1: hyper drops the connection on a body error without flushing what it
        // buffered, so an upstream that sends its head and then breaks off would leave
        // the client with no answer at all. Yielding once lets the head (and any data
        // before the error) go out first; the error then cuts the connection, which
        // tells the client the body is incomplete.
        if let Poll::Ready(Some(Err(error))) = polled {
            this.failed = Some(error);
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
