//! Header hygiene: hop-by-hop headers never cross the proxy.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::hop_by_hop::HOP_BY_HOP;

/// Removes hop-by-hop headers and every header named in `Connection`.
///
/// `TE: trailers` is kept when the client's `TE` lists `trailers` (any other codings
/// are dropped): it is the one value HTTP/2 allows, gRPC needs it, and an HTTP/1.1
/// upstream sends trailers only to a client that asked for them.
///
/// Runs twice per request, so it looks before it hashes: one pass over the names
/// finds which hop-by-hop headers are present (most requests carry none, most answers
/// only `Connection: keep-alive`), and only those are removed.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let mut present = 0u16;
    for name in headers.keys() {
        present |= bit(name);
    }
    if present == 0 {
        return;
    }
    // Read before `Connection` is applied: HTTP/1.1 senders of TE list it there.
    let te_trailers = present & bit(&header::TE) != 0
        && headers
            .get_all(header::TE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|coding| {
                // `trailers` takes no parameters; tolerate the odd `;q=1` anyway.
                let name = coding.split(';').next().unwrap_or_default();
                name.trim().eq_ignore_ascii_case("trailers")
            });
    if present & bit(&header::CONNECTION) != 0 {
        // Taken out before the headers it names are removed; one value (the usual
        // case) without copying it.
        let mut values = headers.get_all(header::CONNECTION).iter();
        let several = values.next().is_some() && values.next().is_some();
        if several {
            let all: Vec<HeaderValue> = headers
                .get_all(header::CONNECTION)
                .iter()
                .cloned()
                .collect();
            headers.remove(header::CONNECTION);
            for value in &all {
                remove_named(headers, value);
            }
        } else if let Some(value) = headers.remove(header::CONNECTION) {
            remove_named(headers, &value);
        }
        present &= !bit(&header::CONNECTION);
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// `name`'s bit in a set of [`HOP_BY_HOP`] names; 0 for any other name.
fn bit(name: &HeaderName) -> u16 {
    HOP_BY_HOP
        .iter()
        .position(|h| h == name)
        .map_or(0, |i| 1 << i)
}

/// Removes the headers a `Connection` value names (names that are no valid header
/// name name nothing to remove).
fn remove_named(headers: &mut HeaderMap, connection: &HeaderValue) {
    let Ok(value) = connection.to_str() else {
        return;
    };
    for name in value.split(',') {
        let name = name.trim();
        // `close` names no header, and the hop-by-hop ones go anyway: the usual
        // `Connection: keep-alive` costs no lookup.
        if name.is_empty()
            || name.eq_ignore_ascii_case("close")
            || HOP_BY_HOP
                .iter()
                .any(|h| name.eq_ignore_ascii_case(h.as_str()))
        {
            continue;
        }
        if headers.contains_key(name) {
            headers.remove(name);
        }
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
    fn connection_names_match_whatever_their_case() {
        let mut h = HeaderMap::new();
        h.insert("connection", "X-Private , Keep-Alive".parse().unwrap());
        h.append("connection", "x-other".parse().unwrap());
        h.insert("x-private", "1".parse().unwrap());
        h.insert("x-other", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-kept"]);
        let mut h = HeaderMap::new();
        h.insert("connection", "X-PRIVATE, bad name, ,".parse().unwrap());
        h.insert("x-private", "1".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-kept"]);
    }

    #[test]
    fn without_hop_by_hop_headers_nothing_changes() {
        let mut h = HeaderMap::new();
        h.insert("content-type", "text/plain".parse().unwrap());
        h.append("x-multi", "a".parse().unwrap());
        h.append("x-multi", "b".parse().unwrap());
        let before = h.clone();
        strip_hop_by_hop(&mut h);
        assert_eq!(h, before);
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
