//! The hop-by-hop header names: the one list both header hygiene (which strips them)
//! and config validation (which refuses to set them) read.

use http::header::{self, HeaderName};

/// RFC 9110 §7.6.1 hop-by-hop headers, plus the legacy proxy ones.
pub static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Whether `name` is one of [`HOP_BY_HOP`].
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name)
}
