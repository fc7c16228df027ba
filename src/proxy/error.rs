//! The proxy's own answers: the one place an error becomes an HTTP response.

use std::time::Duration;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;

use crate::token::TokenUnavailable;

/// What went wrong, and whose fault it was: the client's (4xx), the token
/// endpoint's (503) or the upstream's (502/504).
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no route matches this request")]
    NoRoute,
    #[error("{0}")]
    BadRequest(&'static str),
    /// A keyed route's key header is missing or malformed; names the header only,
    /// never the value (keys are personal data).
    #[error("the {header} header {problem}")]
    BadKey {
        header: http::HeaderName,
        problem: &'static str,
    },
    #[error("{0}")]
    TokenUnavailable(#[from] TokenUnavailable),
    #[error("cannot reach the upstream: {0}")]
    UpstreamUnreachable(String),
    #[error("the upstream sent no response headers within {0:?}")]
    UpstreamTimeout(Duration),
    #[error("this address is not in server.allowed_clients")]
    ForbiddenClient,
    #[error("this user id is not in server.allowed_uids")]
    ForbiddenUid,
    #[error("the request target is longer than server.max_uri_length ({0} bytes)")]
    UriTooLong(u64),
    #[error("the request body did not arrive within upstream_timeout ({0:?})")]
    BodyTimeout(Duration),
}

impl ProxyError {
    /// The status and the `error` code users see (README: "The proxy's own answers").
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            Self::NoRoute => (StatusCode::NOT_FOUND, "no_route"),
            Self::BadRequest(_) | Self::BadKey { .. } => (StatusCode::BAD_REQUEST, "bad_request"),
            Self::TokenUnavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "token_unavailable"),
            Self::UpstreamUnreachable(_) => (StatusCode::BAD_GATEWAY, "upstream_unreachable"),
            Self::UpstreamTimeout(_) => (StatusCode::GATEWAY_TIMEOUT, "upstream_timeout"),
            Self::ForbiddenClient | Self::ForbiddenUid => {
                (StatusCode::FORBIDDEN, "forbidden_client")
            }
            Self::UriTooLong(_) => (StatusCode::URI_TOO_LONG, "uri_too_long"),
            Self::BodyTimeout(_) => (StatusCode::REQUEST_TIMEOUT, "request_timeout"),
        }
    }

    /// The refusal for a peer the allowlist turned away (see `admission`).
    pub fn forbidden(peer: &crate::listener::Peer) -> Self {
        match peer {
            crate::listener::Peer::Tcp(_) => Self::ForbiddenClient,
            crate::listener::Peer::Unix { .. } => Self::ForbiddenUid,
        }
    }

    /// The JSON answer, naming the route and provider when known.
    pub fn to_response(
        &self,
        route: Option<&str>,
        provider: Option<&str>,
    ) -> Response<Full<Bytes>> {
        let (status, code) = self.status_and_code();
        let mut body = serde_json::json!({ "error": code, "message": self.to_string() });
        if let Some(route) = route {
            body["route"] = route.into();
        }
        if let Some(provider) = provider {
            body["provider"] = provider.into();
        }
        crate::answer::json(status, body)
    }
}
