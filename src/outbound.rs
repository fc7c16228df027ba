//! The upstream connector below TLS: a direct TCP connection, or one through the
//! outbound HTTP proxy (a `CONNECT` tunnel for `https://` hosts, so TLS runs end to
//! end over it; a plain connection for `http://` hosts, sent in absolute form).
//!
//! The tunnel itself is hyper-util's [`Tunnel`]; this module only decides when to use
//! it and turns its failures into errors that name the proxy (never its credentials)
//! and the status it answered.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http::uri::Scheme;
use http::Uri;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tower_service::Service;

use crate::config::outbound::shown;
use crate::error::BoxError;

/// Connects directly, or through the proxy `matcher` picks for the destination.
#[derive(Clone)]
pub struct OutboundConnector {
    direct: HttpConnector,
    matcher: Option<Arc<Matcher>>,
    /// Tunnel `http://` destinations too, instead of handing the proxy absolute-form
    /// requests.
    tunnel_http: bool,
}

impl OutboundConnector {
    /// `direct` makes every TCP connection (to a host or to the proxy); `matcher`
    /// (`None`: no outbound proxy) says which destinations go through which proxy;
    /// `tunnel_http`: `CONNECT` for `http://` destinations as well.
    pub fn new(direct: HttpConnector, matcher: Option<Arc<Matcher>>, tunnel_http: bool) -> Self {
        Self {
            direct,
            matcher,
            tunnel_http,
        }
    }
}

/// Why a connection could not be made. The proxy appears only as `http://***@host:port`.
#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    #[error(transparent)]
    Direct(BoxError),
    #[error("outbound proxy {proxy} unreachable")]
    ProxyUnreachable {
        proxy: String,
        #[source]
        source: BoxError,
    },
    #[error("outbound proxy {proxy} refused the tunnel to {target}: it answered {status}")]
    ProxyRefused {
        proxy: String,
        target: String,
        status: String,
    },
    #[error("outbound proxy {proxy} could not open a tunnel to {target}")]
    Tunnel {
        proxy: String,
        target: String,
        #[source]
        source: BoxError,
    },
}

impl Service<Uri> for OutboundConnector {
    type Response = OutboundStream;
    type Error = OutboundError;
    type Future = Pin<Box<dyn Future<Output = Result<OutboundStream, OutboundError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.direct
            .poll_ready(cx)
            .map_err(|e| OutboundError::Direct(e.into()))
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let intercept = self.matcher.as_ref().and_then(|m| m.intercept(&dst));
        let mut direct = self.direct.clone();
        let tunnel_http = self.tunnel_http;
        Box::pin(async move {
            let Some(proxy) = intercept else {
                let io = direct
                    .call(dst)
                    .await
                    .map_err(|e| OutboundError::Direct(e.into()))?;
                return Ok(OutboundStream::new(io, false, None));
            };
            let name = shown(&proxy);
            let https = dst.scheme() == Some(&Scheme::HTTPS);
            if !https && !tunnel_http {
                // Plain http: the request itself goes to the proxy, in absolute form.
                let io = direct.call(proxy.uri().clone()).await.map_err(|e| {
                    OutboundError::ProxyUnreachable {
                        proxy: name,
                        source: e.into(),
                    }
                })?;
                return Ok(OutboundStream::new(io, true, None));
            }
            // The tunnel assumes 443 when the URI names no port.
            let port = dst.port_u16().unwrap_or(if https { 443 } else { 80 });
            let target = format!("{}:{port}", dst.host().unwrap_or_default());
            let dst = Uri::builder()
                .scheme(if https { Scheme::HTTPS } else { Scheme::HTTP })
                .authority(target.as_str())
                .path_and_query("/")
                .build()
                .map_err(|e| OutboundError::Direct(e.into()))?;
            let head = Head::default();
            let mut tunnel = Tunnel::new(
                proxy.uri().clone(),
                Recording {
                    direct,
                    head: head.clone(),
                },
            );
            if let Some(auth) = proxy.basic_auth() {
                tunnel = tunnel.with_auth(auth.clone());
            }
            let tunneled = async {
                std::future::poll_fn(|cx| tunnel.poll_ready(cx)).await?;
                tunnel.call(dst).await
            };
            match tunneled.await {
                Ok(mut stream) => {
                    stream.head = None;
                    Ok(stream)
                }
                Err(source) if !head.connected() => Err(OutboundError::ProxyUnreachable {
                    proxy: name,
                    source: source.into(),
                }),
                Err(source) => Err(match head.status() {
                    Some(status) => OutboundError::ProxyRefused {
                        proxy: name,
                        target,
                        status,
                    },
                    None => OutboundError::Tunnel {
                        proxy: name,
                        target,
                        source: source.into(),
                    },
                }),
            }
        })
    }
}

/// Asks the proxy that `matcher` picks for `target` (`https://host:port/`) for a tunnel,
/// once, and returns the status it refuses it with; `None` when it does not refuse (or
/// cannot be reached) within `timeout`. For clients whose own error does not carry the
/// status (reqwest reports any refusal but 407 as "unsuccessful").
pub async fn refusal_status(
    matcher: Arc<Matcher>,
    target: Uri,
    timeout: Duration,
) -> Option<String> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(timeout));
    let mut connector = OutboundConnector::new(http, Some(matcher), true);
    match tokio::time::timeout(timeout, connector.call(target)).await {
        Ok(Err(OutboundError::ProxyRefused { status, .. })) => Some(status),
        _ => None,
    }
}

/// Hands the tunnel connections that keep the proxy's answer to `CONNECT`, so a
/// refusal can be reported with its status (the tunnel's own error only tells 407
/// apart, and its type is not exported).
#[derive(Clone)]
struct Recording {
    direct: HttpConnector,
    head: Head,
}

impl Service<Uri> for Recording {
    type Response = OutboundStream;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<OutboundStream, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.direct.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, proxy: Uri) -> Self::Future {
        let connecting = self.direct.call(proxy);
        let head = self.head.clone();
        Box::pin(async move {
            let io = connecting.await?;
            head.mark_connected();
            Ok(OutboundStream::new(io, false, Some(head)))
        })
    }
}

/// Whether the proxy took the TCP connection, and the first bytes it answered (up to
/// [`Head::LIMIT`]). One per tunnel being opened; never shared between connections.
#[derive(Clone, Default)]
struct Head(Arc<Mutex<Option<Vec<u8>>>>);

impl Head {
    const LIMIT: usize = 1024;

    fn mark_connected(&self) {
        if let Ok(mut head) = self.0.lock() {
            head.get_or_insert_with(Vec::new);
        }
    }

    fn connected(&self) -> bool {
        self.0.lock().is_ok_and(|head| head.is_some())
    }

    fn record(&self, bytes: &[u8]) {
        if let Ok(mut head) = self.0.lock() {
            let head = head.get_or_insert_with(Vec::new);
            let room = Self::LIMIT.saturating_sub(head.len());
            head.extend_from_slice(&bytes[..bytes.len().min(room)]);
        }
    }

    /// `407 Proxy Authentication Required`, from the status line, if one arrived.
    fn status(&self) -> Option<String> {
        let head = self.0.lock().ok()?;
        status_of(head.as_deref()?)
    }
}

/// The status code and reason of an HTTP/1 status line, printable and short.
fn status_of(head: &[u8]) -> Option<String> {
    let line = head.split(|&b| b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?.trim_end();
    let mut parts = line.splitn(3, ' ');
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    let code = parts.next()?;
    if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let reason: String = parts
        .next()
        .unwrap_or("")
        .chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .take(80)
        .collect();
    Some(format!("{code} {reason}").trim_end().to_owned())
}

/// A TCP connection to a host, or to the proxy; `Connected::proxy` tells hyper to
/// send absolute-form requests on it when it goes to the proxy for an `http://` host.
pub struct OutboundStream {
    io: TokioIo<TcpStream>,
    forwarded: bool,
    /// While the tunnel is being set up: where the proxy's answer is kept.
    head: Option<Head>,
}

impl OutboundStream {
    fn new(io: TokioIo<TcpStream>, forwarded: bool, head: Option<Head>) -> Self {
        Self {
            io,
            forwarded,
            head,
        }
    }
}

impl Connection for OutboundStream {
    fn connected(&self) -> Connected {
        self.io.connected().proxy(self.forwarded)
    }
}

impl Read for OutboundStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let Some(head) = &this.head else {
            return Pin::new(&mut this.io).poll_read(cx, buf);
        };
        // Only during the CONNECT exchange: read through a small buffer to keep a copy.
        let mut bytes = [0u8; 512];
        let room = bytes.len().min(buf.remaining());
        let mut read = tokio::io::ReadBuf::new(&mut bytes[..room]);
        ready!(tokio::io::AsyncRead::poll_read(
            Pin::new(this.io.inner_mut()),
            cx,
            &mut read
        ))?;
        head.record(read.filled());
        buf.put_slice(read.filled());
        Poll::Ready(Ok(()))
    }
}

impl Write for OutboundStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::status_of;

    #[test]
    fn status_lines() {
        assert_eq!(
            status_of(b"HTTP/1.1 407 Proxy Authentication Required\r\nX: y\r\n\r\n").as_deref(),
            Some("407 Proxy Authentication Required")
        );
        assert_eq!(status_of(b"HTTP/1.0 403\r\n").as_deref(), Some("403"));
        assert_eq!(status_of(b"HTTP/1.1 40").as_deref(), None);
        assert_eq!(status_of(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(
            status_of(b"HTTP/1.1 502 Bad\x1b[31m Gateway\r\n").as_deref(),
            Some("502 Bad[31m Gateway")
        );
    }
}
