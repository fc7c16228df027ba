//! The pooled upstream clients over rustls: one choosing HTTP/2 or HTTP/1.1 by ALPN,
//! one HTTP/1.1 only (Upgrade handshakes), and clients pinned to one upstream for
//! `preserve_host` routes.
//!
//! Over HTTP/2 the request URI's authority becomes `:authority` and a `host` field must
//! not be sent beside it (strict servers such as nginx answer 400); over HTTP/1.1 the
//! client derives `Host` from the same authority. Which one a request gets is decided by
//! ALPN after the request is built, so the proxy never sets `Host` itself on the pooled
//! clients: it puts the authority it wants sent in the URI. For `preserve_host` that is
//! the client's Host, so the connection must not be dialled from the URI: a pinned
//! client's connector always dials the route's upstream (TLS name included), and its
//! pool only ever holds connections to that upstream.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tower_service::Service;

use super::body::OutBody;
use crate::config::Upstream;

/// A pooled client the proxy forwards through.
pub type UpstreamClient = Client<UpstreamConnector, OutBody>;

/// Builds upstream clients that share one TLS configuration and connect timeout.
#[derive(Clone)]
pub struct ClientFactory {
    tls: rustls::ClientConfig,
    connect_timeout: Duration,
}

/// The clients one worker forwards through (each worker has its own pools).
pub struct Clients {
    /// HTTP/2 or HTTP/1.1 by ALPN.
    pub pooled: UpstreamClient,
    /// HTTP/1.1 only: an Upgrade handshake has no HTTP/2 form.
    pub http1: UpstreamClient,
}

impl ClientFactory {
    /// `connect_timeout` bounds TCP and TLS together.
    pub fn new(tls: rustls::ClientConfig, connect_timeout: Duration) -> Self {
        Self {
            tls,
            connect_timeout,
        }
    }

    /// A worker's clients.
    pub fn clients(&self) -> Clients {
        Clients {
            pooled: self.build(true, None),
            http1: self.build(false, None),
        }
    }

    /// A client that dials `upstream` whatever authority the request URI names; its
    /// requests carry the client's Host as the URI authority.
    pub fn pinned(&self, upstream: &Upstream) -> UpstreamClient {
        let pin = Uri::builder()
            .scheme(upstream.scheme.clone())
            .authority(upstream.authority.clone())
            .path_and_query("/")
            .build()
            .ok();
        self.build(true, pin)
    }

    fn build(&self, http2: bool, pin: Option<Uri>) -> UpstreamClient {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(self.connect_timeout));
        let builder = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(self.tls.clone())
            .https_or_http()
            .enable_http1();
        let https = if http2 {
            builder.enable_http2().wrap_connector(http)
        } else {
            builder.wrap_connector(http)
        };
        Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(256)
            .build(UpstreamConnector {
                https,
                pin,
                timeout: self.connect_timeout,
            })
    }
}

/// Dials the request's upstream (or the pinned one) over TCP and TLS, bounded by
/// `connect_timeout` as a whole.
#[derive(Clone)]
pub struct UpstreamConnector {
    https: HttpsConnector<HttpConnector>,
    /// When set, every connection goes here, whatever the request URI names.
    pin: Option<Uri>,
    timeout: Duration,
}

/// The connect did not finish within `connect_timeout`.
#[derive(Debug, thiserror::Error)]
#[error("connect timed out after {0:?}")]
pub struct ConnectTimeout(Duration);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Service<Uri> for UpstreamConnector {
    type Response = MaybeHttpsStream<TokioIo<TcpStream>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.https.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let timeout = self.timeout;
        let target = self.pin.clone().unwrap_or(uri);
        let fut = self.https.call(target);
        Box::pin(async move {
            match tokio::time::timeout(timeout, fut).await {
                Ok(result) => result,
                Err(_) => Err(Box::new(ConnectTimeout(timeout)) as BoxError),
            }
        })
    }
}
