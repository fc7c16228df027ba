//! Header hygiene: hop-by-hop headers never cross the proxy.

use http::header::{self, HeaderMap, HeaderName};

use crate::hop_by_hop::HOP_BY_HOP;

/// Removes hop-by-hop headers and every header named in `Connection`.
///
/// `TE: trailers` is kept when the client's `TE` lists `trailers` (any other codings
/// are dropped): it is the one value HTTP/2 allows, gRPC needs it, and an HTTP/1.1
/// upstream sends trailers only to a client that asked for them.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Read before `Connection` is applied: HTTP/1.1 senders of TE list it there.
    let te_trailers = headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|coding| {
            // `trailers` takes no parameters; tolerate the odd `;q=1` anyway.
            let name = coding.split(';').next().unwrap_or_default();
            name.trim().eq_ignore_ascii_case("trailers")
        });
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    if te_trailers {
        headers.insert(header::TE, header::HeaderValue::from_static("trailers"));
    }
}

/// Drops `Content-Length` from an answer that came with `Transfer-Encoding`.
///
/// The body was read as chunked (RFC 9112 §6.3: `Transfer-Encoding` wins), so the length
/// describes nothing; passed on, a bogus one (`-1`) made the proxy's own HTTP/1.1 writer
/// give up on the answer and close the client's connection without a byte. Without it,
/// the answer is framed by what the body really holds. Runs before the hop-by-hop strip,
/// which removes `Transfer-Encoding` itself.
pub fn drop_length_beside_chunked(headers: &mut HeaderMap) {
    if headers.contains_key(header::TRANSFER_ENCODING) {
        headers.remove(header::CONTENT_LENGTH);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_hop_by_hop_and_connection_named() {
        let mut h = HeaderMap::new();
        h.insert("connection", "close, x-private".parse().unwrap());
        h.insert("x-private", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("transfer-encoding", "chunked".parse().unwrap());
        h.append("x-multi", "a".parse().unwrap());
        h.append("x-multi", "b".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 2);
        let multi: Vec<_> = h.get_all("x-multi").iter().collect();
        assert_eq!(multi, ["a", "b"]);
    }

    #[test]
    fn keeps_te_trailers_only() {
        let mut h = HeaderMap::new();
        h.insert("te", "trailers".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.get("te").unwrap(), "trailers");
        let mut h = HeaderMap::new();
        h.insert("te", "gzip".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert!(h.get("te").is_none());
        let mut h = HeaderMap::new();
        h.insert("te", "deflate;q=0.5, Trailers".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.get("te").unwrap(), "trailers");
        let mut h = HeaderMap::new();
        h.insert("te", "trailers".parse().unwrap());
        h.insert("connection", "TE".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.get("te").unwrap(), "trailers");
        let mut h = HeaderMap::new();
        h.insert("te", "trailersx".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert!(h.get("te").is_none());
    }
}
