//! HTTP/1.1 Upgrade (WebSocket) pass-through. The handshake is forwarded like any
//! request, token included, over an HTTP/1.1 upstream connection; on `101` the client's
//! and the upstream's connections are joined byte for byte until either side closes.
//! An open tunnel keeps its client connection's place under `max_connections`, shows in
//! the metrics, is logged when it closes, and is closed `shutdown_grace` after shutdown
//! begins.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Version};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::Metrics;

/// The client connection's place under `max_connections`, carried by each of its
/// requests so that a tunnel made from one keeps it while open.
#[derive(Clone)]
pub struct ConnPermit(pub Arc<OwnedSemaphorePermit>);

/// What the proxy needs from a client's Upgrade request to join the connections later.
pub struct Handshake {
    /// The `Upgrade` value to forward (e.g. `websocket`).
    pub protocol: HeaderValue,
    client: OnUpgrade,
    permit: Option<ConnPermit>,
    /// For the log line when the tunnel closes.
    path: String,
}

impl Handshake {
    /// The handshake of an HTTP/1.1 request asking to switch protocols, taken out of the
    /// request. `None` for anything else, which is forwarded as a plain request with
    /// `Upgrade` dropped: HTTP/1.0 and HTTP/2 have no Upgrade, and `h2c` would turn the
    /// upstream connection into HTTP/2 that the proxy never sees requests on.
    pub fn take<B>(req: &mut Request<B>) -> Option<Self> {
        if req.version() != Version::HTTP_11 || !connection_has_upgrade(req.headers()) {
            return None;
        }
        let protocol = req.headers().get(header::UPGRADE)?.clone();
        let asks_h2c = protocol.to_str().map_or(true, |p| {
            p.split(',').any(|p| p.trim().eq_ignore_ascii_case("h2c"))
        });
        if asks_h2c {
            return None;
        }
        let client = req.extensions_mut().remove::<OnUpgrade>()?;
        let permit = req.extensions().get::<ConnPermit>().cloned();
        Some(Self {
            protocol,
            client,
            permit,
            path: req.uri().path().to_owned(),
        })
    }
}

/// True when `Connection` lists the `upgrade` option.
fn connection_has_upgrade(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
}

/// Puts back the two hop-by-hop headers a handshake needs on its next hop (request or
/// `101` answer), after the others were dropped.
pub fn restore_headers(headers: &mut HeaderMap, protocol: HeaderValue) {
    headers.insert(header::UPGRADE, protocol);
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
}

/// The tunnels of one worker: tracked so that shutdown can wait for them, and closed
/// `grace` after `stop` fires.
#[derive(Clone)]
pub struct Tunnels {
    tracker: TaskTracker,
    stop: CancellationToken,
    grace: Duration,
}

impl Tunnels {
    /// Tunnels that close `grace` after `stop` is cancelled.
    pub fn new(stop: CancellationToken, grace: Duration) -> Self {
        Self {
            tracker: TaskTracker::new(),
            stop,
            grace,
        }
    }

    /// Waits until every tunnel has closed (they close by themselves at the latest
    /// `grace` after `stop`).
    pub async fn wait(&self) {
        self.tracker.close();
        self.tracker.wait().await;
    }

    /// Joins the client's connection to the upstream's once both have switched
    /// protocols; counts, logs and closes the tunnel.
    pub fn open(
        &self,
        handshake: Handshake,
        upstream: OnUpgrade,
        route: Arc<str>,
        metrics: Arc<Metrics>,
    ) {
        let Handshake {
            client,
            permit,
            path,
            ..
        } = handshake;
        let stop = self.stop.clone();
        let grace = self.grace;
        self.tracker.spawn(async move {
            // Held until the tunnel ends: it still occupies a client connection.
            let _permit = permit;
            let started = Instant::now();
            // Shutdown bounds the whole tunnel, the switch of both sides included.
            let closing = async {
                stop.cancelled().await;
                tokio::time::sleep(grace).await;
            };
            tokio::pin!(closing);
            let switched = tokio::select! {
                switched = async { tokio::try_join!(client, upstream) } => switched,
                () = &mut closing => return,
            };
            let (client, upstream) = match switched {
                Ok(pair) => pair,
                Err(error) => {
                    tracing::debug!(%error, route = %route, "upgrade did not complete");
                    return;
                }
            };
            metrics.tunnel_opened(&route);
            let (client_read, mut client_write) = tokio::io::split(TokioIo::new(client));
            let (upstream_read, mut upstream_write) = tokio::io::split(TokioIo::new(upstream));
            let mut up = Counted::new(client_read);
            let mut down = Counted::new(upstream_read);
            // The tunnel ends when either side closes (a WebSocket has no use for a
            // half-closed connection), after passing that close on to the other side.
            let end = tokio::select! {
                result = pump(&mut up, &mut upstream_write) => result,
                result = pump(&mut down, &mut client_write) => result,
                () = &mut closing => "shutdown",
            };
            metrics.tunnel_closed(&route, up.read, down.read);
            tracing::info!(
                route = %route,
                path = %path,
                bytes_up = up.read,
                bytes_down = down.read,
                duration_ms = started.elapsed().as_secs_f64() * 1000.0,
                end,
                "tunnel closed"
            );
        });
    }
}

/// Copies `from` to `to` until `from` ends, then closes `to`; says how it ended.
async fn pump<R, W>(from: &mut R, to: &mut W) -> &'static str
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    match tokio::io::copy(from, to).await {
        Ok(_) => {
            let _ = to.shutdown().await;
            "closed"
        }
        Err(_) => "error",
    }
}

/// One direction of a tunnel, counting the bytes read.
struct Counted<T> {
    inner: T,
    read: u64,
}

impl<T> Counted<T> {
    fn new(inner: T) -> Self {
        Self { inner, read: 0 }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        this.read += (buf.filled().len().saturating_sub(before)) as u64;
        polled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_http11_upgrades_other_than_h2c_are_handshakes() {
        let req = |version, connection: &str, upgrade: &str| {
            let mut req = Request::builder()
                .version(version)
                .header("connection", connection)
                .header("upgrade", upgrade)
                .body(())
                .unwrap();
            // hyper puts one in every request that may upgrade.
            req.extensions_mut()
                .insert(hyper::upgrade::on(Request::new(())));
            req
        };
        assert!(Handshake::take(&mut req(Version::HTTP_11, "Upgrade", "websocket")).is_some());
        assert!(Handshake::take(&mut req(
            Version::HTTP_11,
            "keep-alive, upgrade",
            "websocket"
        ))
        .is_some());
        assert!(Handshake::take(&mut req(Version::HTTP_11, "keep-alive", "websocket")).is_none());
        assert!(Handshake::take(&mut req(Version::HTTP_10, "upgrade", "websocket")).is_none());
        assert!(Handshake::take(&mut req(Version::HTTP_11, "upgrade", "h2c")).is_none());
    }
}
