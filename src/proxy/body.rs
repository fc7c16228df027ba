//! Request bodies on their way upstream: streamed, or kept whole for one replay.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;

/// The body the upstream client sends.
pub enum OutBody {
    /// The client's body, frame by frame as it arrives.
    Stream(Incoming),
    /// A body read whole (at most `max_replay_body`), so it can be sent twice.
    Full(Option<Bytes>),
    /// The start of a body that turned out too large (or to carry trailers) to keep,
    /// then what followed: the trailers already read, or the rest of the stream.
    Prefixed {
        head: Option<Bytes>,
        trailers: Option<HeaderMap>,
        rest: Incoming,
    },
}

/// The outcome of trying to keep a body for replay.
pub enum Kept {
    /// The whole body, small enough to send again.
    Whole(Bytes),
    /// Too large: send it once, streaming.
    TooLarge(OutBody),
}

/// Reads `body` whole if it is at most `limit` bytes; past that, returns what was
/// read plus the rest as one stream, so nothing is lost and memory stays bounded.
pub async fn keep_for_replay(mut body: Incoming, limit: u64) -> Result<Kept, hyper::Error> {
    if body.size_hint().lower() > limit {
        return Ok(Kept::TooLarge(OutBody::Stream(body)));
    }
    let mut buf = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        // Trailers on a small request are rare; give up on replay rather than drop them.
        let data = match frame.into_data() {
            Ok(data) => data,
            Err(frame) => {
                return Ok(Kept::TooLarge(OutBody::Prefixed {
                    head: Some(buf.freeze()),
                    trailers: frame.into_trailers().ok(),
                    rest: body,
                }))
            }
        };
        buf.extend_from_slice(&data);
        if buf.len() as u64 > limit {
            return Ok(Kept::TooLarge(OutBody::Prefixed {
                head: Some(buf.freeze()),
                trailers: None,
                rest: body,
            }));
        }
    }
    Ok(Kept::Whole(buf.freeze()))
}

impl Body for OutBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            Self::Stream(inner) => Pin::new(inner).poll_frame(cx),
            Self::Full(data) => Poll::Ready(
                data.take()
                    .filter(|d| !d.is_empty())
                    .map(|d| Ok(Frame::data(d))),
            ),
            Self::Prefixed {
                head,
                trailers,
                rest,
            } => {
                if let Some(d) = head.take().filter(|d| !d.is_empty()) {
                    return Poll::Ready(Some(Ok(Frame::data(d))));
                }
                match trailers.take() {
                    Some(t) => Poll::Ready(Some(Ok(Frame::trailers(t)))),
                    None => Pin::new(rest).poll_frame(cx),
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Stream(inner) => inner.is_end_stream(),
            Self::Full(data) => data.as_ref().is_none_or(Bytes::is_empty),
            Self::Prefixed {
                head,
                trailers,
                rest,
            } => {
                head.as_ref().is_none_or(Bytes::is_empty)
                    && trailers.is_none()
                    && rest.is_end_stream()
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Stream(inner) => inner.size_hint(),
            Self::Full(data) => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
            Self::Prefixed { head, rest, .. } => {
                let head = head.as_ref().map_or(0, |d| d.len() as u64);
                let mut hint = SizeHint::new();
                hint.set_lower(head + rest.size_hint().lower());
                if let Some(upper) = rest.size_hint().upper() {
                    hint.set_upper(head + upper);
                }
                hint
            }
        }
    }
}
