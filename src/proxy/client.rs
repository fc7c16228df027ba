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
//!
//! With an outbound proxy, connections go through it (see `outbound`): https:// by
//! `CONNECT` with TLS inside the tunnel; http:// in absolute form with the proxy's
//! `Proxy-Authorization`, except on pinned clients, whose URI names the client's Host
//! and so must not steer the proxy: they tunnel http:// upstreams too.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use std::sync::Arc;

use http::uri::{Authority, Scheme};
use http::{header, Request, Uri};
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tower_service::Service;

use super::body::OutBody;
use super::h1pool::{H1Pool, UpstreamBody};
use crate::config::Upstream;
use crate::error::BoxError;
use crate::outbound::{OutboundConnector, OutboundStream};

/// A pooled client the proxy forwards through.
#[derive(Clone)]
pub struct UpstreamClient {
    pool: Client<UpstreamConnector, OutBody>,
    /// The outbound proxy's rules when this client sends plain-http requests to it in
    /// absolute form (they carry `Proxy-Authorization`; tunnels carry theirs in the
    /// `CONNECT`).
    forwarding: Option<Arc<Matcher>>,
    /// The pool for `http://` upstreams reached directly (see `h1pool`); `None` on
    /// clients that go through an outbound proxy, pin their upstream or carry
    /// Upgrade handshakes.
    direct: Option<H1Pool>,
}

impl UpstreamClient {
    /// Sends `request` (absolute URI) on a pooled connection.
    pub async fn request(
        &self,
        mut request: Request<OutBody>,
    ) -> Result<http::Response<UpstreamBody>, BoxError> {
        if let Some(direct) = &self.direct {
            if request.uri().scheme() == Some(&Scheme::HTTP) {
                return direct.send(request).await;
            }
        }
        if let Some(matcher) = &self.forwarding {
            if request.uri().scheme() == Some(&Scheme::HTTP) {
                if let Some(auth) = matcher
                    .intercept(request.uri())
                    .and_then(|proxy| proxy.basic_auth().cloned())
                {
                    request
                        .headers_mut()
                        .insert(header::PROXY_AUTHORIZATION, auth);
                }
            }
        }
        let response = self.pool.request(request).await?;
        Ok(response.map(UpstreamBody::pooled))
    }
}

/// Builds upstream clients that share one TLS configuration, connect timeout and
/// outbound proxy.
#[derive(Clone)]
pub struct ClientFactory {
    tls: rustls::ClientConfig,
    connect_timeout: Duration,
    /// The outbound proxy's rules; `None`: direct connections.
    outbound: Option<Arc<Matcher>>,
}

/// The clients of one `preserve_host` route, both pinned to its upstream.
pub struct Pinned {
    /// HTTP/2 or HTTP/1.1 by ALPN.
    pub pooled: UpstreamClient,
    /// HTTP/1.1 only, for Upgrade handshakes.
    pub http1: UpstreamClient,
}

/// The clients one worker forwards through (each worker has its own pools).
pub struct Clients {
    /// HTTP/2 or HTTP/1.1 by ALPN.
    pub pooled: UpstreamClient,
    /// HTTP/1.1 only: an Upgrade handshake has no HTTP/2 form.
    pub http1: UpstreamClient,
}

impl ClientFactory {
    /// `connect_timeout` bounds TCP, the proxy's `CONNECT` and TLS together;
    /// `outbound`: the outbound proxy's rules (`None`: direct connections).
    pub fn new(
        tls: rustls::ClientConfig,
        connect_timeout: Duration,
        outbound: Option<Arc<Matcher>>,
    ) -> Self {
        Self {
            tls,
            connect_timeout,
            outbound,
        }
    }

    /// A worker's clients.
    pub fn clients(&self) -> Clients {
        let mut pooled = self.build(true, None);
        // Without an outbound proxy, http:// upstreams go through the pool driven by
        // the requests themselves.
        if self.outbound.is_none() {
            pooled.direct = Some(H1Pool::new(
                tcp_connector(self.connect_timeout),
                self.connect_timeout,
                IDLE_TIMEOUT,
                MAX_IDLE_PER_HOST,
            ));
        }
        Clients {
            pooled,
            http1: self.build(false, None),
        }
    }

    /// Clients that dial `upstream` whatever authority the request URI names; their
    /// requests carry the client's Host as the URI authority.
    pub fn pinned(&self, upstream: &Upstream) -> Pinned {
        let pin = PinnedTo {
            scheme: upstream.scheme.clone(),
            authority: upstream.authority.clone(),
        };
        Pinned {
            pooled: self.build(true, Some(pin.clone())),
            http1: self.build(false, Some(pin)),
        }
    }

    fn build(&self, http2: bool, pin: Option<PinnedTo>) -> UpstreamClient {
        let http = tcp_connector(self.connect_timeout);
        // A pinned client's request URI names the client's Host, which must not pick
        // the proxy's destination: it tunnels to the pinned upstream instead.
        let tunnel_http = pin.is_some();
        let outbound = OutboundConnector::new(http, self.outbound.clone(), tunnel_http);
        // TLS sits on top of the outbound connector, so through a proxy it runs inside
        // the tunnel and checks the real host's certificate.
        let builder = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(self.tls.clone())
            .https_or_http()
            .enable_http1();
        let https = if http2 {
            builder.enable_http2().wrap_connector(outbound)
        } else {
            builder.wrap_connector(outbound)
        };
        // A pinned client's pool is keyed by the client's Host, not by the upstream it
        // dials, so every distinct Host gets its own idle connections to that upstream:
        // a small cap keeps many Hosts from holding hundreds of idle sockets each.
        let max_idle = if tunnel_http {
            PINNED_MAX_IDLE_PER_HOST
        } else {
            MAX_IDLE_PER_HOST
        };
        let pool = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(IDLE_TIMEOUT)
            .pool_max_idle_per_host(max_idle)
            .build(UpstreamConnector {
                https,
                pin,
                timeout: self.connect_timeout,
            });
        UpstreamClient {
            pool,
            forwarding: if tunnel_http {
                None
            } else {
                self.outbound.clone()
            },
            direct: None,
        }
    }
}

/// The TCP dialer every upstream client starts from: no Nagle delay, each address tried
/// for at most `connect_timeout`; any scheme, since TLS and the outbound proxy sit on top.
fn tcp_connector(connect_timeout: Duration) -> HttpConnector {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    http
}

/// How long an idle upstream connection is kept.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle connections kept per upstream on the shared clients.
const MAX_IDLE_PER_HOST: usize = 256;
/// Idle connections kept per client Host on a pinned client (see `build`).
const PINNED_MAX_IDLE_PER_HOST: usize = 8;

/// The upstream a pinned client always dials.
#[derive(Clone)]
struct PinnedTo {
    scheme: Scheme,
    authority: Authority,
}

impl PinnedTo {
    /// The URI the connector dials. Built from a valid scheme and authority, so it
    /// cannot fail in practice; if it ever did, the connect fails rather than falling
    /// back to the authority the request names.
    fn target(&self) -> Result<Uri, BoxError> {
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query("/")
            .build()
            .map_err(|e| Box::new(e) as BoxError)
    }
}

/// Dials the request's upstream (or the pinned one) over TCP (directly or through the
/// outbound proxy) and TLS, bounded by `connect_timeout` as a whole.
#[derive(Clone)]
pub struct UpstreamConnector {
    https: HttpsConnector<OutboundConnector>,
    /// When set, every connection goes here, whatever the request URI names.
    pin: Option<PinnedTo>,
    timeout: Duration,
}

/// The connect did not finish within `connect_timeout`.
#[derive(Debug, thiserror::Error)]
#[error("connect timed out after {0:?}")]
pub struct ConnectTimeout(pub(super) Duration);

impl Service<Uri> for UpstreamConnector {
    type Response = MaybeHttpsStream<OutboundStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.https.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let timeout = self.timeout;
        let target = match &self.pin {
            Some(pin) => pin.target(),
            None => Ok(uri),
        };
        let fut = target.map(|target| self.https.call(target));
        Box::pin(async move {
            let fut = fut?;
            match tokio::time::timeout(timeout, fut).await {
                Ok(result) => result,
                Err(_) => Err(Box::new(ConnectTimeout(timeout)) as BoxError),
            }
        })
    }
}
