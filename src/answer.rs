//! The small answers the proxy writes itself (its error answers, the admin
//! endpoints, the demo's issuer and echo): a status, a content type, a body.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::Full;

/// `body` as `application/json`.
pub fn json(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    text(status, body.to_string(), "application/json")
}

/// `body` with `content_type`.
pub fn text(
    status: StatusCode,
    body: impl Into<Bytes>,
    content_type: &'static str,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}
