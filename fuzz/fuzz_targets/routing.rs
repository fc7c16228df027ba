//! Route matching, URL joining, path hardening and header hygiene on arbitrary input.
//!
//! Input, one field a line (readable seeds, and newlines are not valid in a request
//! target or a header anyway): prefix, path, base path, host, strip flag (`1` = strip),
//! then `name: value` header lines.
//!
//! Path hardening: a path that `path::check` passes must not lead out of the route's
//! base path under any sequence of up to four upstream readings (percent-decoding,
//! `\` as `/`, `;parameters` cut, NUL truncation).
#![no_main]

use std::borrow::Cow;

use bearer_proxy::proxy::headers::strip_hop_by_hop;
use bearer_proxy::proxy::path::{self, readings};
use bearer_proxy::proxy::routing::{host_without_port, prefix_matches, upstream_path};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut lines = data.split(|&b| b == b'\n');
    let mut field = || -> Cow<'_, str> { String::from_utf8_lossy(lines.next().unwrap_or(b"")) };
    let prefix = field().into_owned();
    let path = field().into_owned();
    let base = field().into_owned();
    let host = field().into_owned();
    let strip = field() == "1";

    // The proxy only joins after a match, so with strip = true `upstream_path` is
    // exercised under that precondition; with strip = false it has none.
    if prefix_matches(&prefix, &path) || !strip {
        let joined = upstream_path(&base, &prefix, &path, strip);
        assert!(joined.starts_with('/'), "{joined:?}");
        assert!(
            joined.starts_with(&base) || joined[1..].starts_with(&base),
            "{joined:?} lost the base {base:?}"
        );
        let rest = if strip && prefix != "/" {
            &path[prefix.len()..]
        } else {
            &path[..]
        };
        assert!(joined.ends_with(rest), "{joined:?} lost the path {rest:?}");
    }
    if !prefix.is_empty() {
        assert!(prefix_matches(&prefix, &prefix));
    }
    let _ = host_without_port(&host);
    let plain_base = (base.is_empty() || base.starts_with('/'))
        && !base.ends_with('/')
        && !base.contains("//")
        && base
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'/' || b == b'-' || b == b'_');
    // Long paths only slow the search down; the readings are about a few segments.
    if path::check(&path).is_ok() && prefix_matches(&prefix, &path) && plain_base && path.len() <= 1024 {
        let joined = upstream_path(&base, &prefix, &path, strip);
        let mut sequence = Vec::with_capacity(4);
        for_each_sequence(&mut sequence, 4, &mut |decodings| {
            assert!(
                !readings::escapes(&base, joined.as_bytes(), decodings),
                "{path:?} escapes {base:?} as {joined:?} after {decodings:?}"
            );
        });
    }

    let mut map = HeaderMap::new();
    for line in lines {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let value = line[colon + 1..].trim_ascii();
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(value),
        ) {
            map.append(n, v);
        }
    }
    strip_hop_by_hop(&mut map);
    for name in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
        HeaderName::from_static("keep-alive"),
    ] {
        assert!(!map.contains_key(&name), "{name} survived");
    }
    if let Some(te) = map.get(header::TE) {
        assert_eq!(te, "trailers");
    }
});

/// Calls `f` with every sequence of readings of length 0..=`left` (341 for 4).
fn for_each_sequence(
    prefix: &mut Vec<readings::Decoding>,
    left: usize,
    f: &mut impl FnMut(&[readings::Decoding]),
) {
    f(prefix);
    if left == 0 {
        return;
    }
    for decoding in readings::ALL {
        prefix.push(decoding);
        for_each_sequence(prefix, left - 1, f);
        prefix.pop();
    }
}
