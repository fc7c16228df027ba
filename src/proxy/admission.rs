//! Admission: every check on what a client sends, in one place. The peer is checked
//! once per connection; each request before anything of it goes upstream.

use std::fmt;

use bytes::Bytes;
use http::uri::Authority;
use http::{header, HeaderMap, Method, Request, Response, Uri};
use http_body_util::Full;

use super::error::ProxyError;
use super::path;
use super::routing::Route;
use super::RoutingTable;
use crate::listener::Peer;

/// A peer turned away by the allowlist: every request on its connection gets
/// [`Refused::answer`].
#[derive(Debug, Clone, Copy)]
pub struct Refused(Peer);

impl Refused {
    /// The `403` each request on the refused connection gets.
    pub fn answer(&self) -> Response<Full<Bytes>> {
        self.error().to_response(None, None)
    }

    fn error(&self) -> ProxyError {
        ProxyError::forbidden(&self.0)
    }
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.error().fmt(f)
    }
}

/// The connection's check: a TCP peer's address must be in `server.allowed_clients`,
/// a Unix peer's uid in `server.allowed_uids` (when set).
pub(super) fn peer(table: &RoutingTable, peer: &Peer) -> Result<(), Refused> {
    let admitted = match peer {
        Peer::Tcp(addr) => {
            let ip = addr.ip().to_canonical();
            table.allowed_clients.iter().any(|net| net.contains(&ip))
        }
        Peer::Unix { uid } => match &table.allowed_uids {
            None => true,
            Some(allowed) => uid.is_some_and(|uid| allowed.contains(&uid)),
        },
    };
    if admitted {
        Ok(())
    } else {
        Err(Refused(*peer))
    }
}

/// A request that passed admission.
pub(super) struct Admitted<'t> {
    pub route: &'t Route,
    /// The client's Host, for a `preserve_host` route (`None` when the client sent none).
    pub host: Option<Authority>,
}

/// The checks every request passes before anything is forwarded, in this order:
/// target length, method, the path's readings (see [`path`]), a route, then what
/// depends on the route: `%2F` and a `preserve_host` route's Host. The path is
/// checked before the route is known so that no route sees a path it may not get.
pub(super) fn request<'t, B>(
    table: &'t RoutingTable,
    route: Option<&'t Route>,
    req: &Request<B>,
) -> Result<Admitted<'t>, ProxyError> {
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
    let host = match &route.pinned {
        Some(_) => client_authority(req.uri(), req.headers())?,
        None => None,
    };
    Ok(Admitted { route, host })
}

/// The client's Host: the request URI's authority (absolute form, or HTTP/2's
/// `:authority`), else the `Host` field. `None` when the client sent neither.
fn client_authority(uri: &Uri, headers: &HeaderMap) -> Result<Option<Authority>, ProxyError> {
    let raw = match uri.authority() {
        Some(authority) => authority.as_str().as_bytes(),
        None => match headers.get(header::HOST) {
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
