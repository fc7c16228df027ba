//! The forwarding service. Every request takes one straight path, a step per phase,
//! and [`Forwarder::handle`] reads as that list:
//!
//! 1. **Route**: the listener's route for the request's host and path
//!    ([`RoutingTable::route`]).
//! 2. **Check**: every input check, in one place ([`admission`]): the peer when its
//!    connection is accepted; then the request's target length, method and path, that
//!    a route matched, `%2F` as the route allows, and a `preserve_host` route's Host.
//! 3. **Prepare**: the upstream URI, the client it goes through, and the headers
//!    without hop-by-hop fields or `Host`.
//! 4. **Attach token**: no token (no provider, or the client's own credential may
//!    pass), the route's provider's, or a keyed provider's for the request's key (the
//!    key header never goes upstream).
//! 5. **Send**: one upstream exchange, bounded by `upstream_timeout`.
//! 6. **Replay once**: an answer in the provider's `invalidate_on` invalidates the
//!    token; the request goes again, once, with a newer token, when its body was kept.
//! 7. **Answer**: the upstream's response without hop-by-hop fields (a `101` also
//!    joins the two connections into a tunnel), or the proxy's own JSON error; then
//!    the route's metrics and the access-log line.
//!
//! Each phase is a function from what the previous one produced to a `Result` whose
//! error is the proxy's answer ([`ProxyError`]), so a refusal at any phase goes
//! straight to the answer. [`Proxy`] is what every worker shares (the routing table,
//! swapped whole on reload, and metrics); each worker forwards through its own
//! [`Forwarder`], which owns its upstream clients and its tunnels.

pub mod access_log;
pub mod admission;
pub mod body;
pub mod client;
pub mod error;
pub mod h1pool;
pub mod headers;
pub mod path;
pub mod routing;
pub mod upgrade;

use std::borrow::Cow;
use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::HeaderName;
use http::uri::Authority;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use ipnet::IpNet;
use tokio::time::Instant;

use crate::config::{Config, ListenAddr};
use crate::error::chain;
use crate::listener::Peer;
use crate::metrics::{Metrics, RouteMetrics};
use crate::token::{KeyedProvider, ProviderSlot, Token, TokenStore};
use access_log::RequestLog;
pub use access_log::ResBody;
use admission::{Admitted, Refused};
use body::{keep_for_replay, Kept, OutBody};
use client::{ClientFactory, Clients, UpstreamClient};
use error::ProxyError;
use h1pool::UpstreamBody;
use routing::{Route, RouteAuth, Router};
use upgrade::{Handshake, Tunnels};

/// Every listener's routes and the settings requests need, swapped whole on reload.
pub struct RoutingTable {
    routers: HashMap<ListenAddr, Router>,
    allowed_clients: Vec<IpNet>,
    allowed_uids: Option<Vec<u32>>,
    upstream_timeout: Duration,
    max_replay_body: u64,
    max_uri_length: u64,
    /// Metrics for requests no route matched.
    unrouted: RouteMetrics,
}

impl RoutingTable {
    /// Builds the routers, resolving each route's provider slot and metrics once, and
    /// the pinned client of each `preserve_host` route.
    pub fn new(
        config: &Config,
        store: &TokenStore,
        metrics: &Arc<Metrics>,
        clients: &ClientFactory,
    ) -> Self {
        let mut by_listener: HashMap<ListenAddr, Vec<Route>> = HashMap::new();
        for rc in &config.routes {
            // A provider is plain or keyed; a name the store lacks (validation refuses
            // one) leaves the route open, as it always did.
            let auth = rc
                .provider
                .as_deref()
                .and_then(|p| {
                    (store.slot(p).map(RouteAuth::Slot))
                        .or_else(|| store.keyed(p).map(RouteAuth::Keyed))
                })
                .unwrap_or(RouteAuth::Open);
            by_listener
                .entry(rc.listen.clone())
                .or_default()
                .push(Route {
                    config: rc.clone(),
                    auth,
                    metrics: metrics.route(&rc.name),
                    name: rc.name.as_str().into(),
                    pinned: rc.preserve_host.then(|| clients.pinned(&rc.upstream)),
                });
        }
        let routers = by_listener
            .into_iter()
            .map(|(addr, routes)| (addr, Router::new(routes)))
            .collect();
        Self {
            routers,
            allowed_clients: config.server.allowed_clients.clone(),
            allowed_uids: config.server.unix_socket.allowed_uids.clone(),
            upstream_timeout: config.server.upstream_timeout,
            max_replay_body: config.server.max_replay_body,
            max_uri_length: config.server.limits.max_uri_length,
            unrouted: metrics.route("-"),
        }
    }

    /// The router of the listener configured as `listen`.
    pub fn router(&self, listen: &ListenAddr) -> Option<&Router> {
        self.routers.get(listen)
    }

    /// Phase 1, route: the route for `req` on the listener configured as `listen`. The
    /// host is read only when some route of that listener matches on it.
    pub fn route<B>(&self, listen: &ListenAddr, req: &Request<B>) -> Option<&Route> {
        let router = self.router(listen)?;
        let host = if router.has_hosts() {
            req.uri()
                .authority()
                .map(|a| a.as_str())
                .or_else(|| {
                    req.headers()
                        .get(header::HOST)
                        .and_then(|h| h.to_str().ok())
                })
                .and_then(routing::host_without_port)
        } else {
            None
        };
        router.find(host.as_deref(), req.uri().path())
    }
}

/// What every worker shares: the routing table, swapped once for all on reload, and
/// the metrics.
pub struct Proxy {
    table: ArcSwap<RoutingTable>,
    metrics: Arc<Metrics>,
}

impl Proxy {
    /// A proxy over `table`.
    pub fn new(table: RoutingTable, metrics: Arc<Metrics>) -> Self {
        Self {
            table: ArcSwap::from_pointee(table),
            metrics,
        }
    }

    /// A forwarder for one worker: the same routes and metrics, its own upstream
    /// connection pools (so workers never contend on one pool lock) and tunnels.
    pub fn forwarder(self: &Arc<Self>, clients: Clients, tunnels: Tunnels) -> Forwarder {
        Forwarder {
            proxy: self.clone(),
            clients,
            tunnels,
        }
    }

    /// Replaces the routing table; requests in flight finish on the old one.
    pub fn swap_table(&self, table: RoutingTable) {
        self.table.store(Arc::new(table));
    }

    /// Phase 2, check, for a new connection: whether `peer` may use the proxy (see
    /// [`admission`]); a refused connection gets [`Refused::answer`] to every request.
    pub fn admit_peer(&self, peer: &Peer) -> Result<(), Refused> {
        admission::peer(&self.table.load(), peer)
    }
}

/// One worker's request path over the shared [`Proxy`]: it owns the upstream clients
/// the worker's requests go through and the tunnels they become.
pub struct Forwarder {
    proxy: Arc<Proxy>,
    clients: Clients,
    /// This worker's upgraded connections.
    tunnels: Tunnels,
}

/// The upstream's answer and whether it took a replay.
struct Forwarded {
    response: Response<UpstreamBody>,
    replayed: bool,
}

impl Forwarded {
    /// The answer to the first send.
    fn first(response: Response<UpstreamBody>) -> Self {
        Self {
            response,
            replayed: false,
        }
    }
}

/// Keeps the in-flight gauge right however a request ends (including cancellation).
struct InFlight<'a>(&'a Metrics);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight().dec();
    }
}

impl Forwarder {
    /// The shared state this forwarder serves (the accept loop admits peers with it).
    pub fn proxy(&self) -> &Arc<Proxy> {
        &self.proxy
    }

    /// This worker's upgraded connections (shutdown waits for them).
    pub fn tunnels(&self) -> &Tunnels {
        &self.tunnels
    }

    /// Handles one request arriving on the listener configured as `listen`, phase by
    /// phase (see the module documentation).
    pub async fn handle(
        &self,
        listen: &ListenAddr,
        mut req: Request<Incoming>,
    ) -> Result<Response<ResBody>, Infallible> {
        let started = Instant::now();
        let handshake = Handshake::take(&mut req);
        let metrics = &self.proxy.metrics;
        metrics.in_flight().inc();
        let _in_flight = InFlight(metrics);
        let table = self.proxy.table.load_full();
        let route = table.route(listen, &req);
        let log = access_log_line(&req, route, started);
        let outcome = match admission::request(&table, route, &req) {
            Ok(admitted) => {
                let upgrade = handshake.as_ref().map(|h| h.protocol.clone());
                self.forward(admitted, &table, req, upgrade).await
            }
            Err(refused) => Err(refused),
        };
        let outcome = outcome.and_then(|forwarded| self.pass_on(forwarded, handshake, route));
        Ok(answer(outcome, route, &table, started, log))
    }

    /// Phases 3 to 6 for an admitted request: prepare, attach the token, send, replay
    /// once. `upgrade`: the protocol of an Upgrade handshake, which goes over HTTP/1.1
    /// with its `Upgrade`.
    async fn forward(
        &self,
        admitted: Admitted<'_>,
        table: &RoutingTable,
        req: Request<Incoming>,
        upgrade: Option<HeaderValue>,
    ) -> Result<Forwarded, ProxyError> {
        let route = admitted.route;
        let (parts, body) = req.into_parts();
        let (client, mut out) = self.prepare(admitted, parts, upgrade)?;
        let (slot, header) = match credential(route, &mut out.headers)? {
            Credential::AsSent => {
                let request = out.into_request(OutBody::Stream(body));
                let response = send(client, request, table.upstream_timeout).await?;
                return Ok(Forwarded::first(response));
            }
            Credential::Token { slot, header } => (slot, header),
        };
        let token = slot.get().await?;
        let (first_body, kept) = keep_body(&slot, body, table).await?;
        let replay = kept.map(|body| Replay {
            out: out.clone(),
            body,
        });
        let request = out.with_token(header, &token).into_request(first_body);
        let response = send(client, request, table.upstream_timeout).await?;
        if !slot.config.invalidate_on.contains(&response.status()) {
            return Ok(Forwarded::first(response));
        }
        // Boxed: only a rejected token takes this step, and its state (~1.9 KiB) would
        // otherwise sit in every request's future.
        Box::pin(replay_once(
            client, &slot, header, &token, response, replay, table,
        ))
        .await
    }

    /// Phase 3, prepare: the upstream request short of its token and body, and the
    /// client it goes through.
    fn prepare<'a>(
        &'a self,
        admitted: Admitted<'a>,
        parts: http::request::Parts,
        upgrade: Option<HeaderValue>,
    ) -> Result<(&'a UpstreamClient, Outgoing), ProxyError> {
        let Admitted { route, host } = admitted;
        // The authority in the URI is what goes out as `:authority` (HTTP/2) or `Host`
        // (HTTP/1.1): see `client`. The connection always goes to the route's upstream.
        let upstream_authority = || route.config.upstream.authority.clone();
        // Every request of a `preserve_host` route, Upgrade handshakes included, goes
        // through its pinned clients: on the shared ones a proxied http:// upstream would
        // get the handshake in absolute form beside the client's Host.
        let (authority, client) = match (&route.pinned, &upgrade) {
            (Some(pinned), Some(_)) => (host.unwrap_or_else(upstream_authority), &pinned.http1),
            (Some(pinned), None) => (host.unwrap_or_else(upstream_authority), &pinned.pooled),
            (None, Some(_)) => (upstream_authority(), &self.clients.http1),
            (None, None) => (upstream_authority(), &self.clients.pooled),
        };
        let uri = upstream_uri(route, &parts.uri, authority)?;
        let mut headers = parts.headers;
        headers::strip_hop_by_hop(&mut headers);
        headers.remove(header::HOST);
        if let Some(protocol) = upgrade {
            upgrade::restore_headers(&mut headers, protocol);
        }
        Ok((
            client,
            Outgoing {
                method: parts.method,
                uri,
                headers,
            },
        ))
    }

    /// Phase 7, the upstream's side: its response made ready for the client. On `101`
    /// the client gets its `101` and the two connections are joined once both have
    /// switched.
    fn pass_on(
        &self,
        forwarded: Forwarded,
        handshake: Option<Handshake>,
        route: Option<&Route>,
    ) -> Result<(Response<UpstreamBody>, bool), ProxyError> {
        match route {
            Some(route) if forwarded.response.status() == StatusCode::SWITCHING_PROTOCOLS => {
                self.switch(forwarded, handshake, route)
            }
            _ => {
                let (mut parts, body) = forwarded.response.into_parts();
                headers::drop_length_beside_chunked(&mut parts.headers);
                headers::strip_hop_by_hop(&mut parts.headers);
                Ok((Response::from_parts(parts, body), forwarded.replayed))
            }
        }
    }

    fn switch(
        &self,
        forwarded: Forwarded,
        handshake: Option<Handshake>,
        route: &Route,
    ) -> Result<(Response<UpstreamBody>, bool), ProxyError> {
        let Some(handshake) = handshake else {
            return Err(ProxyError::UpstreamUnreachable(
                "the upstream switched protocols on a request that did not ask to".to_owned(),
            ));
        };
        let mut response = forwarded.response;
        let upstream = hyper::upgrade::on(&mut response);
        let (mut parts, body) = response.into_parts();
        let protocol = parts
            .headers
            .get(header::UPGRADE)
            .cloned()
            .unwrap_or_else(|| handshake.protocol.clone());
        headers::strip_hop_by_hop(&mut parts.headers);
        upgrade::restore_headers(&mut parts.headers, protocol);
        self.tunnels.open(
            handshake,
            upstream,
            route.name.clone(),
            self.proxy.metrics.clone(),
        );
        Ok((Response::from_parts(parts, body), forwarded.replayed))
    }
}

/// The upstream request short of its token and body.
#[derive(Clone)]
struct Outgoing {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
}

impl Outgoing {
    fn with_token(mut self, header: &HeaderName, token: &Token) -> Self {
        self.headers.insert(header, token.header_value().clone());
        self
    }

    fn into_request(self, body: OutBody) -> Request<OutBody> {
        let mut request = Request::new(body);
        *request.method_mut() = self.method;
        *request.uri_mut() = self.uri;
        // HTTP/1.1 on the way out; the pool upgrades to HTTP/2 when ALPN agrees.
        *request.version_mut() = Version::HTTP_11;
        *request.headers_mut() = self.headers;
        request
    }
}

/// Phase 4's verdict: what authorizes the request upstream.
enum Credential<'r> {
    /// Nothing added: the route has no provider, or the client's own credential passes.
    AsSent,
    /// A token from `slot`, sent in `header`.
    Token {
        slot: Cow<'r, Arc<ProviderSlot>>,
        header: &'r HeaderName,
    },
}

/// Phase 4, attach token: which credential goes upstream. A keyed route's key header
/// is taken out of `headers` whatever the verdict, so the key never goes upstream. The
/// key is checked here rather than at admission because a request whose own
/// credential passes needs none.
fn credential<'r>(route: &'r Route, headers: &mut HeaderMap) -> Result<Credential<'r>, ProxyError> {
    match &route.auth {
        RouteAuth::Open => Ok(Credential::AsSent),
        RouteAuth::Slot(slot) => {
            let header = &slot.config.header;
            if own_credential_passes(route, headers, header) {
                return Ok(Credential::AsSent);
            }
            let slot = Cow::Borrowed(slot);
            Ok(Credential::Token { slot, header })
        }
        RouteAuth::Keyed(keyed) => {
            let key = take_key(keyed, headers);
            let header = &keyed.config.header;
            if own_credential_passes(route, headers, header) {
                return Ok(Credential::AsSent);
            }
            let slot = Cow::Owned(keyed_slot(keyed, key)?);
            Ok(Credential::Token { slot, header })
        }
    }
}

/// Whether the route lets the client's own credential in `header` through.
fn own_credential_passes(route: &Route, headers: &HeaderMap, header: &HeaderName) -> bool {
    route.config.pass_client_authorization && headers.contains_key(header)
}

/// Removes the key header; its value when it was sent exactly once.
fn take_key(keyed: &KeyedProvider, headers: &mut HeaderMap) -> Option<HeaderValue> {
    let header = &keyed.keys().header;
    let once = headers.get_all(header).iter().nth(1).is_none();
    headers.remove(header).filter(|_| once)
}

/// The slot of the request's key; the error names the header, never the value.
fn keyed_slot(
    keyed: &KeyedProvider,
    value: Option<HeaderValue>,
) -> Result<Arc<ProviderSlot>, ProxyError> {
    let bad = |problem| ProxyError::BadKey {
        header: keyed.keys().header.clone(),
        problem,
    };
    let value = value.ok_or_else(|| bad("is required on this route, exactly once"))?;
    let value = value
        .to_str()
        .map_err(|_| bad("does not match the provider's key_pattern"))?;
    keyed
        .slot(value)
        .ok_or_else(|| bad("does not match the provider's key_pattern"))
}

/// The request again, for a replay: everything but the token.
struct Replay {
    out: Outgoing,
    body: Bytes,
}

/// The body for the first send, and its bytes again when a rejected token may need a
/// replay: only for a provider with `invalidate_on`, and only up to `max_replay_body`.
async fn keep_body(
    slot: &ProviderSlot,
    body: Incoming,
    table: &RoutingTable,
) -> Result<(OutBody, Option<Bytes>), ProxyError> {
    if slot.config.invalidate_on.is_empty() {
        return Ok((OutBody::Stream(body), None));
    }
    // Bounded: a client that announces more body than it sends would otherwise hold the
    // request (and its connection) forever.
    let kept = keep_for_replay(body, table.max_replay_body);
    match tokio::time::timeout(table.upstream_timeout, kept).await {
        Ok(Ok(Kept::Whole(bytes))) => Ok((OutBody::Full(Some(bytes.clone())), Some(bytes))),
        Ok(Ok(Kept::TooLarge(stream))) => Ok((stream, None)),
        Ok(Err(_)) => Err(ProxyError::BadRequest("the request body could not be read")),
        Err(_) => Err(ProxyError::BodyTimeout(table.upstream_timeout)),
    }
}

/// Phase 6, replay once, for an answer in `invalidate_on`: the token that got it is
/// invalidated, and the request goes again, at most once and only with a newer token,
/// when its body was kept. Otherwise the first answer stands.
async fn replay_once(
    client: &UpstreamClient,
    slot: &ProviderSlot,
    header: &HeaderName,
    rejected: &Token,
    response: Response<UpstreamBody>,
    replay: Option<Replay>,
    table: &RoutingTable,
) -> Result<Forwarded, ProxyError> {
    slot.invalidate(rejected.generation);
    let fresh = match replay {
        Some(replay) => match slot.get().await {
            Ok(fresh) if fresh.generation != rejected.generation => Some((replay, fresh)),
            _ => None,
        },
        None => None,
    };
    let Some((replay, fresh)) = fresh else {
        return Ok(Forwarded::first(response));
    };
    drop(response);
    let request = replay
        .out
        .with_token(header, &fresh)
        .into_request(OutBody::Full(Some(replay.body)));
    // A fresh token rejected again is left alone here: the next request that sees it
    // rejected invalidates it, so one request never causes two fetches.
    let response = send(client, request, table.upstream_timeout).await?;
    Ok(Forwarded {
        response,
        replayed: true,
    })
}

/// Phase 5, send: one exchange with the upstream, bounded by `timeout` up to the
/// response headers.
async fn send(
    client: &UpstreamClient,
    request: Request<OutBody>,
    timeout: Duration,
) -> Result<Response<UpstreamBody>, ProxyError> {
    match tokio::time::timeout(timeout, client.request(request)).await {
        // 600-999 parse, but are no HTTP status (RFC 9110 §15): not an answer to pass on.
        Ok(Ok(response)) if response.status().as_u16() > 599 => {
            Err(ProxyError::UpstreamUnreachable(format!(
                "the upstream answered with status {}, which HTTP does not define",
                response.status().as_u16()
            )))
        }
        Ok(Ok(response)) => Ok(response),
        Ok(Err(e)) => Err(ProxyError::UpstreamUnreachable(chain(&*e))),
        Err(_) => Err(ProxyError::UpstreamTimeout(timeout)),
    }
}

/// Phase 7, answer: the upstream's response or the proxy's own, counted in the route's
/// metrics; the access-log line goes with the body and is written when it is sent.
fn answer(
    outcome: Result<(Response<UpstreamBody>, bool), ProxyError>,
    route: Option<&Route>,
    table: &RoutingTable,
    started: Instant,
    log: Option<Box<RequestLog>>,
) -> Response<ResBody> {
    let route_metrics = route.map_or(&table.unrouted, |r| &r.metrics);
    let (response, replayed) = match outcome {
        Ok((response, replayed)) => (response.map(Either::Left), replayed),
        Err(e) => (
            error_answer(&e, route, route_metrics).map(Either::Right),
            false,
        ),
    };
    let status = response.status().as_u16();
    route_metrics.observe(status, started.elapsed().as_secs_f64(), replayed);
    let log = log.map(|mut log| {
        log.status = status;
        log.replayed = replayed;
        log
    });
    response.map(|body| ResBody::new(body, log))
}

/// The proxy's own answer for `e`, naming the route and provider when known.
fn error_answer(
    e: &ProxyError,
    route: Option<&Route>,
    route_metrics: &RouteMetrics,
) -> Response<Full<Bytes>> {
    tracing::debug!(error = %e, "request failed");
    match e {
        ProxyError::UpstreamUnreachable(_) => route_metrics.upstream_error("unreachable"),
        ProxyError::UpstreamTimeout(_) => route_metrics.upstream_error("timeout"),
        _ => {}
    }
    let route_name = route.map(|r| r.config.name.as_str());
    let provider = route.and_then(|r| r.config.provider.as_deref());
    e.to_response(route_name, provider)
}

/// The access-log line's fields known up front; `None` when info logging is off.
fn access_log_line<B>(
    req: &Request<B>,
    route: Option<&Route>,
    started: Instant,
) -> Option<Box<RequestLog>> {
    tracing::enabled!(tracing::Level::INFO).then(|| {
        Box::new(RequestLog {
            method: req.method().clone(),
            route: route.map(|r| r.name.clone()),
            path: req.uri().path().to_owned(),
            status: 0,
            started,
            replayed: false,
            bytes: 0,
            complete: false,
        })
    })
}

/// The absolute upstream URI: route's scheme and base path, `authority`, then the
/// request's path and its query byte for byte. The connection is made to the route's
/// upstream whatever `authority` says (see `client`), so no request can steer the
/// token elsewhere.
fn upstream_uri(route: &Route, uri: &Uri, authority: Authority) -> Result<Uri, ProxyError> {
    let rc = &route.config;
    let mut pq = routing::upstream_path(
        &rc.upstream.base_path,
        &rc.path_prefix,
        uri.path(),
        rc.strip_prefix,
    );
    if let Some(query) = uri.query() {
        pq.push('?');
        pq.push_str(query);
    }
    Uri::builder()
        .scheme(rc.upstream.scheme.clone())
        .authority(authority)
        .path_and_query(pq)
        .build()
        .map_err(|_| ProxyError::BadRequest("the request target cannot be forwarded"))
}
