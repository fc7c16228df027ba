//! The forwarding service: route, attach the token, send upstream, replay once.

pub mod access_log;
pub mod body;
pub mod client;
pub mod error;
pub mod headers;
pub mod path;
pub mod routing;
pub mod upgrade;

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http::uri::Authority;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::Either;
use hyper::body::Incoming;
use ipnet::IpNet;
use tokio::time::Instant;

use crate::config::{Config, ListenAddr};
use crate::error::chain;
use crate::listener::Peer;
use crate::metrics::{Metrics, RouteMetrics};
use crate::token::{Token, TokenStore};
use access_log::RequestLog;
pub use access_log::ResBody;
use body::{keep_for_replay, Kept, OutBody};
use client::{ClientFactory, Clients, UpstreamClient};
use error::ProxyError;
use routing::{Route, Router};
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
            let slot = rc.provider.as_ref().and_then(|p| store.slot(p));
            let keyed = rc.provider.as_ref().and_then(|p| store.keyed(p));
            by_listener
                .entry(rc.listen.clone())
                .or_default()
                .push(Route {
                    config: rc.clone(),
                    slot,
                    keyed,
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
}

/// The service shared by every connection of every listener.
pub struct Proxy {
    /// Shared by every worker's `Proxy`, so a reload swaps it once for all.
    table: Arc<ArcSwap<RoutingTable>>,
    clients: Clients,
    metrics: Arc<Metrics>,
    /// This worker's upgraded connections.
    tunnels: Tunnels,
}

/// The upstream's answer and whether it took a replay.
struct Forwarded {
    response: Response<Incoming>,
    replayed: bool,
}

/// Keeps the in-flight gauge right however a request ends (including cancellation).
struct InFlight<'a>(&'a Metrics);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight().dec();
    }
}

impl Proxy {
    /// A proxy over `table`, forwarding through `clients`.
    pub fn new(table: RoutingTable, clients: Clients, metrics: Arc<Metrics>) -> Self {
        Self {
            table: Arc::new(ArcSwap::from_pointee(table)),
            clients,
            metrics,
            tunnels: Tunnels::default(),
        }
    }

    /// A proxy for a worker thread: the same routes and metrics, its own upstream
    /// connection pools (so workers never contend on one pool lock) and tunnels.
    pub fn for_worker(&self, clients: Clients, tunnels: Tunnels) -> Self {
        Self {
            table: self.table.clone(),
            clients,
            metrics: self.metrics.clone(),
            tunnels,
        }
    }

    /// This worker's upgraded connections (shutdown waits for them).
    pub fn tunnels(&self) -> &Tunnels {
        &self.tunnels
    }

    /// Replaces the routing table; requests in flight finish on the old one.
    pub fn swap_table(&self, table: RoutingTable) {
        self.table.store(Arc::new(table));
    }

    /// True when `peer` may use the proxy: a TCP peer's address must be in
    /// `server.allowed_clients`, a Unix peer's uid in `server.allowed_uids` (when set).
    pub fn admits(&self, peer: &Peer) -> bool {
        let table = self.table.load();
        match peer {
            Peer::Tcp(addr) => {
                let ip = addr.ip().to_canonical();
                table.allowed_clients.iter().any(|net| net.contains(&ip))
            }
            Peer::Unix { uid } => match &table.allowed_uids {
                None => true,
                Some(allowed) => uid.is_some_and(|uid| allowed.contains(&uid)),
            },
        }
    }

    /// Handles one request arriving on the listener configured as `listen`.
    pub async fn handle(
        &self,
        listen: &ListenAddr,
        mut req: Request<Incoming>,
    ) -> Result<Response<ResBody>, Infallible> {
        let started = Instant::now();
        let handshake = Handshake::take(&mut req);
        self.metrics.in_flight().inc();
        let _in_flight = InFlight(&self.metrics);
        let table = self.table.load_full();
        let route = table.router(listen).and_then(|router| {
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
        });
        let log = tracing::enabled!(tracing::Level::INFO).then(|| {
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
        });
        let protocol = handshake.as_ref().map(|h| h.protocol.clone());
        let result = match admit(&table, route, &req) {
            Err(refused) => Err(refused),
            Ok(route) => self.forward(route, &table, req, protocol).await,
        };
        let result = match (result, route) {
            (Ok(f), Some(route)) if f.response.status() == StatusCode::SWITCHING_PROTOCOLS => {
                self.switch(f, handshake, route)
            }
            (result, _) => result.map(|f| {
                let (mut parts, body) = f.response.into_parts();
                headers::drop_length_beside_chunked(&mut parts.headers);
                headers::strip_hop_by_hop(&mut parts.headers);
                (Response::from_parts(parts, body), f.replayed)
            }),
        };
        let route_metrics = route.map_or(&table.unrouted, |r| &r.metrics);
        let (response, replayed) = match result {
            Ok((response, replayed)) => (response.map(Either::Left), replayed),
            Err(e) => {
                tracing::debug!(error = %e, "request failed");
                match &e {
                    ProxyError::UpstreamUnreachable(_) => {
                        route_metrics.upstream_error("unreachable")
                    }
                    ProxyError::UpstreamTimeout(_) => route_metrics.upstream_error("timeout"),
                    _ => {}
                }
                let route_name = route.map(|r| r.config.name.as_str());
                let provider = route.and_then(|r| r.config.provider.as_deref());
                (
                    e.to_response(route_name, provider).map(Either::Right),
                    false,
                )
            }
        };
        let status = response.status().as_u16();
        route_metrics.observe(status, started.elapsed().as_secs_f64(), replayed);
        let log = log.map(|mut log| {
            log.status = status;
            log.replayed = replayed;
            log
        });
        Ok(response.map(|body| ResBody::new(body, log)))
    }

    /// The upstream switched protocols: hand the client its `101` and join the two
    /// connections once both have switched.
    fn switch(
        &self,
        forwarded: Forwarded,
        handshake: Option<Handshake>,
        route: &Route,
    ) -> Result<(Response<Incoming>, bool), ProxyError> {
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
            self.metrics.clone(),
        );
        Ok((Response::from_parts(parts, body), forwarded.replayed))
    }

    /// Sends the request to the route's upstream with its token, replaying it once with
    /// a fresh token when the answer says the token was rejected. `upgrade`: the
    /// protocol of an Upgrade handshake, which goes over HTTP/1.1 with its `Upgrade`.
    async fn forward(
        &self,
        route: &Route,
        table: &RoutingTable,
        req: Request<Incoming>,
        upgrade: Option<HeaderValue>,
    ) -> Result<Forwarded, ProxyError> {
        let rc = &route.config;
        let (parts, body) = req.into_parts();
        // The authority in the URI is what goes out as `:authority` (HTTP/2) or `Host`
        // (HTTP/1.1): see `client`. The connection always goes to the route's upstream.
        let preserved = match &route.pinned {
            Some(_) => client_authority(&parts)?,
            None => None,
        };
        let upstream_authority = || rc.upstream.authority.clone();
        // Every request of a `preserve_host` route, Upgrade handshakes included, goes
        // through its pinned clients: on the shared ones a proxied http:// upstream would
        // get the handshake in absolute form beside the client's Host.
        let (authority, client) = match (&route.pinned, &upgrade) {
            (Some(pinned), Some(_)) => {
                (preserved.unwrap_or_else(upstream_authority), &pinned.http1)
            }
            (Some(pinned), None) => (preserved.unwrap_or_else(upstream_authority), &pinned.pooled),
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

        // The key never goes upstream, whatever happens next.
        let key = route.keyed.as_ref().map(|keyed| {
            let header = &keyed.keys().header;
            let once = headers.get_all(header).iter().nth(1).is_none();
            (keyed, header, headers.remove(header).filter(|_| once))
        });
        let config = match (&route.slot, &key) {
            (Some(slot), _) => &slot.config,
            (None, Some((keyed, _, _))) => &keyed.config,
            (None, None) => {
                let request = build(&parts.method, uri, headers, OutBody::Stream(body));
                return Ok(Forwarded {
                    response: self.send(client, request, table.upstream_timeout).await?,
                    replayed: false,
                });
            }
        };
        let token_header = &config.header;
        if rc.pass_client_authorization && headers.contains_key(token_header) {
            let request = build(&parts.method, uri, headers, OutBody::Stream(body));
            return Ok(Forwarded {
                response: self.send(client, request, table.upstream_timeout).await?,
                replayed: false,
            });
        }
        let keyed_slot;
        let slot = match (&route.slot, key) {
            (Some(slot), _) => slot,
            (None, Some((keyed, header, value))) => {
                let bad = |problem| ProxyError::BadKey {
                    header: header.clone(),
                    problem,
                };
                let value = value.ok_or_else(|| bad("is required on this route, exactly once"))?;
                let value = value
                    .to_str()
                    .map_err(|_| bad("does not match the provider's key_pattern"))?;
                keyed_slot = keyed
                    .slot(value)
                    .ok_or_else(|| bad("does not match the provider's key_pattern"))?;
                &keyed_slot
            }
            (None, None) => return Err(ProxyError::NoRoute),
        };
        let token = slot.get().await?;
        let (first_body, kept) = if slot.config.invalidate_on.is_empty() {
            (OutBody::Stream(body), None)
        } else {
            // Bounded: a client that announces more body than it sends would otherwise
            // hold the request (and its connection) forever.
            let kept = keep_for_replay(body, table.max_replay_body);
            match tokio::time::timeout(table.upstream_timeout, kept).await {
                Ok(Ok(Kept::Whole(bytes))) => (OutBody::Full(Some(bytes.clone())), Some(bytes)),
                Ok(Ok(Kept::TooLarge(stream))) => (stream, None),
                Ok(Err(_)) => {
                    return Err(ProxyError::BadRequest("the request body could not be read"))
                }
                Err(_) => return Err(ProxyError::BodyTimeout(table.upstream_timeout)),
            }
        };
        let replay_headers = kept.as_ref().map(|_| headers.clone());
        let request = build(
            &parts.method,
            uri.clone(),
            with_token(headers, token_header, &token),
            first_body,
        );
        let response = self.send(client, request, table.upstream_timeout).await?;
        if !slot.config.invalidate_on.contains(&response.status()) {
            return Ok(Forwarded {
                response,
                replayed: false,
            });
        }
        slot.invalidate(token.generation);
        let (Some(bytes), Some(headers)) = (kept, replay_headers) else {
            return Ok(Forwarded {
                response,
                replayed: false,
            });
        };
        // At most one replay, and only with a token newer than the rejected one.
        let fresh = match slot.get().await {
            Ok(fresh) if fresh.generation != token.generation => fresh,
            _ => {
                return Ok(Forwarded {
                    response,
                    replayed: false,
                })
            }
        };
        drop(response);
        let request = build(
            &parts.method,
            uri,
            with_token(headers, token_header, &fresh),
            OutBody::Full(Some(bytes)),
        );
        // A fresh token rejected again is left alone here: the next request that
        // sees it rejected invalidates it, so one request never causes two fetches.
        let response = self.send(client, request, table.upstream_timeout).await?;
        Ok(Forwarded {
            response,
            replayed: true,
        })
    }

    async fn send(
        &self,
        client: &UpstreamClient,
        request: Request<OutBody>,
        timeout: Duration,
    ) -> Result<Response<Incoming>, ProxyError> {
        match tokio::time::timeout(timeout, client.request(request)).await {
            // 600-999 parse, but are no HTTP status (RFC 9110 §15): not an answer to pass on.
            Ok(Ok(response)) if response.status().as_u16() > 599 => {
                Err(ProxyError::UpstreamUnreachable(format!(
                    "the upstream answered with status {}, which HTTP does not define",
                    response.status().as_u16()
                )))
            }
            Ok(Ok(response)) => Ok(response),
            Ok(Err(e)) => Err(ProxyError::UpstreamUnreachable(chain(&e))),
            Err(_) => Err(ProxyError::UpstreamTimeout(timeout)),
        }
    }
}

/// The checks every request passes before anything is forwarded: target length,
/// method, the path's readings (see [`path`]) and a route. The path is checked
/// before the route is known; only `%2F` waits for the route's verdict.
fn admit<'t>(
    table: &'t RoutingTable,
    route: Option<&'t Route>,
    req: &Request<Incoming>,
) -> Result<&'t Route, ProxyError> {
    let target_len = req.uri().path_and_query().map_or(0, |pq| pq.as_str().len()) as u64;
    if target_len > table.max_uri_length {
        return Err(ProxyError::UriTooLong(table.max_uri_length));
    }
    if req.method() == Method::CONNECT || req.method() == Method::TRACE {
        // CONNECT would tunnel past the route; TRACE would echo the token back.
        return Err(ProxyError::BadRequest("this method is not forwarded"));
    }
    let checked = path::check(req.uri().path())
        .map_err(|refusal| ProxyError::BadRequest(refusal.message()))?;
    let route = route.ok_or(ProxyError::NoRoute)?;
    if checked.encoded_slash && !route.config.allow_encoded_slashes {
        return Err(ProxyError::BadRequest(
            path::PathRefusal::EncodedSlash.message(),
        ));
    }
    Ok(route)
}

/// The client's Host: the request URI's authority (absolute form, or HTTP/2's
/// `:authority`), else the `Host` field. `None` when the client sent neither.
fn client_authority(parts: &http::request::Parts) -> Result<Option<Authority>, ProxyError> {
    let raw = match parts.uri.authority() {
        Some(authority) => authority.as_str().as_bytes(),
        None => match parts.headers.get(header::HOST) {
            Some(host) => host.as_bytes(),
            None => return Ok(None),
        },
    };
    match Authority::try_from(raw) {
        // A Host never carries user info; refuse rather than pass it on.
        Ok(authority) if !authority.as_str().contains('@') => Ok(Some(authority)),
        _ => Err(ProxyError::BadRequest(
            "the Host header is not a valid host[:port]",
        )),
    }
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

fn with_token(mut headers: HeaderMap, name: &header::HeaderName, token: &Token) -> HeaderMap {
    headers.insert(name, token.header_value().clone());
    headers
}

fn build(method: &Method, uri: Uri, headers: HeaderMap, body: OutBody) -> Request<OutBody> {
    let mut request = Request::new(body);
    *request.method_mut() = method.clone();
    *request.uri_mut() = uri;
    // HTTP/1.1 on the way out; the pool upgrades to HTTP/2 when ALPN agrees.
    *request.version_mut() = Version::HTTP_11;
    *request.headers_mut() = headers;
    request
}
