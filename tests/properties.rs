//! Property tests: path joining, path hardening and header hygiene, over generated inputs.
//!
//! The cargo-fuzz targets under fuzz/ cover the same functions (and the config and
//! token-response parsers) with unstructured input; these check exact behaviour.

use bearer_proxy::proxy::headers::strip_hop_by_hop;
use bearer_proxy::proxy::path::{self, readings};
use bearer_proxy::proxy::routing::{prefix_matches, upstream_path};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use proptest::prelude::*;

/// `/seg/seg...` with segments as a route's base path or prefix holds them.
fn segments(min: usize, max: usize) -> impl Strategy<Value = String> {
    prop::collection::vec("[a-z0-9%-]{1,8}", min..=max).prop_map(|segs| {
        segs.iter().fold(String::new(), |mut out, s| {
            out.push('/');
            out.push_str(s);
            out
        })
    })
}

/// A route prefix as config validation leaves it: `/`, or `/a/b` without a trailing `/`.
fn prefix() -> impl Strategy<Value = String> {
    prop_oneof![1 => Just("/".to_owned()), 4 => segments(1, 3)]
}

/// What follows the prefix in a matching request path: nothing, or `/...` (a trailing
/// `/` and empty segments included).
fn rest() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("/".to_owned()),
        segments(1, 4),
        segments(1, 3).prop_map(|s| s + "/"),
        segments(0, 2).prop_map(|s| s + "//x"),
    ]
}

/// The request path for `prefix` + `rest` (a path always starts with `/`).
fn join(prefix: &str, rest: &str) -> String {
    if prefix == "/" {
        if rest.is_empty() {
            "/".to_owned()
        } else {
            rest.to_owned()
        }
    } else {
        format!("{prefix}{rest}")
    }
}

proptest! {
    #[test]
    fn strip_joins_base_and_the_rest(base in segments(0, 3), prefix in prefix(), rest in rest()) {
        let path = join(&prefix, &rest);
        prop_assert!(prefix_matches(&prefix, &path));
        let out = upstream_path(&base, &prefix, &path, true);
        // The part after the prefix; a `/` prefix strips nothing.
        let after = if prefix == "/" { path.as_str() } else { &path[prefix.len()..] };
        prop_assert!(out.starts_with('/'), "{out:?}");
        prop_assert!(out.starts_with(&base), "{out:?} lost the base {base:?}");
        prop_assert!(out.ends_with(after), "{out:?} lost the rest {after:?}");
        let exact = format!("{base}{after}");
        prop_assert_eq!(out, if exact.is_empty() { "/".to_owned() } else { exact });
    }

    #[test]
    fn no_strip_keeps_the_whole_path(base in segments(0, 3), prefix in prefix(), rest in rest()) {
        let path = join(&prefix, &rest);
        let out = upstream_path(&base, &prefix, &path, false);
        prop_assert_eq!(out, format!("{base}{path}"));
    }

    #[test]
    fn prefix_matches_only_at_a_segment_boundary(
        prefix in segments(1, 3),
        cont in "[a-z0-9%._~-][a-z0-9/%-]{0,8}",
    ) {
        // `/wll` must not match `/wllx...`: no `/` where the prefix ends.
        let path = format!("{prefix}{cont}");
        prop_assert!(!prefix_matches(&prefix, &path), "{prefix:?} matched {path:?}");
        prop_assert!(prefix_matches(&prefix, &prefix));
        let below = format!("{prefix}/{cont}");
        prop_assert!(prefix_matches(&prefix, &below));
    }
}

/// Hop-by-hop headers (besides `Connection` itself, which the test builds apart).
const HOP_BY_HOP: [&str; 7] = [
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "transfer-encoding",
    "upgrade",
];

/// End-to-end header names: a few well-known ones and `x-...` extensions.
fn end_to_end_name() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "accept",
            "authorization",
            "content-type",
            "cookie",
            "set-cookie",
            "user-agent",
            "via",
            "x-request-id",
        ])
        .prop_map(str::to_owned),
        "x-[a-z0-9]{1,6}",
    ]
}

fn value() -> impl Strategy<Value = String> {
    "[!-~]([ -~]{0,10}[!-~])?"
}

#[derive(Debug, Clone)]
struct Headers {
    /// Every header line in arrival order, `Connection` lines included.
    lines: Vec<(String, String)>,
    /// Names listed in `Connection` (lower case).
    named: Vec<String>,
}

fn headers() -> impl Strategy<Value = Headers> {
    let e2e = prop::collection::vec((end_to_end_name(), value()), 0..12);
    let hop = prop::collection::vec(
        (
            prop::sample::select(HOP_BY_HOP.to_vec()).prop_map(str::to_owned),
            prop_oneof![
                value(),
                Just("trailers".to_owned()),
                Just("chunked".to_owned())
            ],
        ),
        0..5,
    );
    (e2e, hop)
        .prop_flat_map(|(e2e, hop)| {
            let names: Vec<String> = e2e.iter().map(|(n, _)| n.clone()).collect();
            // Connection names some of the end-to-end headers (any case), maybe some
            // hop-by-hop ones and `close`, over one or more `Connection` lines.
            let pick = if names.is_empty() {
                Just(Vec::new()).boxed()
            } else {
                prop::collection::vec(prop::sample::select(names), 0..4).boxed()
            };
            let extra = prop::collection::vec(
                prop::sample::select(vec!["close", "keep-alive", "te", "upgrade"]),
                0..2,
            );
            (
                Just(e2e),
                Just(hop),
                pick,
                extra,
                any::<bool>(),
                any::<bool>(),
            )
        })
        .prop_flat_map(|(e2e, hop, pick, extra, upper, split)| {
            let named: Vec<String> = pick
                .into_iter()
                .chain(extra.into_iter().map(str::to_owned))
                .collect();
            let listed: Vec<String> = named
                .iter()
                .map(|n| {
                    if upper {
                        n.to_ascii_uppercase()
                    } else {
                        n.clone()
                    }
                })
                .collect();
            let mut connection = Vec::new();
            if !listed.is_empty() {
                if split {
                    connection.extend(listed.iter().map(|n| ("connection".to_owned(), n.clone())));
                } else {
                    connection.push(("connection".to_owned(), listed.join(" , ")));
                }
            }
            let lines: Vec<(String, String)> =
                e2e.into_iter().chain(hop).chain(connection).collect();
            (Just(lines).prop_shuffle(), Just(named))
        })
        .prop_map(|(lines, named)| Headers {
            lines,
            named: named.iter().map(|n| n.to_ascii_lowercase()).collect(),
        })
}

proptest! {
    #[test]
    fn strip_hop_by_hop_keeps_exactly_the_end_to_end_headers(h in headers()) {
        let mut map = HeaderMap::new();
        for (name, value) in &h.lines {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        // `TE: trailers` survives when any TE value lists `trailers`, also when
        // Connection names TE (RFC 9110 §10.1.4 asks HTTP/1.1 senders to): it is the
        // one TE value HTTP/2 allows.
        let te_kept = h.lines.iter().filter(|(n, _)| n == "te").any(|(_, v)| {
            v.split(',').any(|c| {
                c.split(';').next().unwrap_or_default().trim().eq_ignore_ascii_case("trailers")
            })
        });

        strip_hop_by_hop(&mut map);

        let dropped = |name: &str| {
            name == "connection" || HOP_BY_HOP.contains(&name) || h.named.iter().any(|n| n == name)
        };
        let mut expected: Vec<(String, Vec<String>)> = Vec::new();
        for (name, value) in &h.lines {
            if dropped(name) {
                continue;
            }
            match expected.iter_mut().find(|(n, _)| n == name) {
                Some((_, values)) => values.push(value.clone()),
                None => expected.push((name.clone(), vec![value.clone()])),
            }
        }
        if te_kept {
            expected.push(("te".to_owned(), vec!["trailers".to_owned()]));
        }
        let mut kept_names: Vec<&str> = map.keys().map(HeaderName::as_str).collect();
        kept_names.sort_unstable();
        let mut expected_names: Vec<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
        expected_names.sort_unstable();
        prop_assert_eq!(kept_names, expected_names);
        for (name, values) in &expected {
            let got: Vec<&str> = map.get_all(name.as_str()).iter().map(|v| v.to_str().unwrap()).collect();
            prop_assert_eq!(&got, values, "values of {}", name);
        }
    }
}

/// A separator an upstream may see: `/`, `\\`, or one of them encoded (once or twice).
fn separator() -> impl Strategy<Value = &'static str> {
    prop_oneof![
        6 => Just("/"),
        2 => prop::sample::select(vec!["\\", "%2f", "%2F", "%252f"]),
        1 => prop::sample::select(vec!["%5c", "%5C", "%255c"]),
    ]
}

/// A piece of a segment: dots in several encodings, parameter marks, ordinary text;
/// the pieces the check refuses outright (`%00`, overlong UTF-8) are rare, so that
/// most generated paths pass and the property has something to test.
fn segment_piece() -> impl Strategy<Value = &'static str> {
    prop_oneof![
        8 => prop::sample::select(vec![".", "..", "..", "%2e", "%2E", "%252e", "%25252e"]),
        4 => prop::sample::select(vec![";", "%3b", "%3B", "%253b", ";x", "=1"]),
        4 => prop::sample::select(vec!["a", "x1", "hidden", "%25", "%"]),
        1 => prop::sample::select(vec!["%00", "%2500", "%c0%ae"]),
    ]
}

/// A request path under `prefix`: the prefix, then 0..6 separators each followed by
/// 0..3 pieces, so that whole dot segments in their many spellings come up often.
fn hostile_path() -> impl Strategy<Value = (String, String)> {
    (
        prefix(),
        prop::collection::vec(
            (separator(), prop::collection::vec(segment_piece(), 0..=3)),
            0..6,
        ),
    )
        .prop_map(|(prefix, segments)| {
            // After a `/` prefix the first separator is the path's leading `/`.
            let mut path = if prefix == "/" {
                String::new()
            } else {
                prefix.clone()
            };
            if segments.is_empty() {
                path.push('/');
            }
            for (i, (separator, pieces)) in segments.into_iter().enumerate() {
                path.push_str(if i == 0 && prefix == "/" {
                    "/"
                } else {
                    separator
                });
                path.extend(pieces);
            }
            (prefix, path)
        })
}

/// A route's base path as operators write them: `/v1`, `/api/v2`, or none.
fn plain_base() -> impl Strategy<Value = String> {
    prop::collection::vec("[a-z0-9-]{1,6}", 0..=2)
        .prop_map(|segs| segs.iter().map(|s| format!("/{s}")).collect())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(8192))]

    /// No path the check passes, on any route (encoded slashes allowed or not), leads
    /// out of the route's base path however the upstream decodes it: percent-decoding
    /// (once or repeatedly), `\` as `/`, `;parameters` cut, NUL truncation, in any order.
    #[test]
    fn checked_paths_never_climb_above_the_base_path(
        base in plain_base(),
        (prefix, path) in hostile_path(),
        strip in any::<bool>(),
        decodings in prop::collection::vec(prop::sample::select(readings::ALL.to_vec()), 0..6),
    ) {
        let Ok(checked) = path::check(&path) else { return Ok(()) };
        if !prefix_matches(&prefix, &path) {
            return Ok(());
        }
        let upstream = upstream_path(&base, &prefix, &path, strip);
        prop_assert!(
            !readings::escapes(&base, upstream.as_bytes(), &decodings),
            "{path:?} (encoded slash: {}) escapes {base:?} as {upstream:?} after {decodings:?}",
            checked.encoded_slash
        );
    }

    /// A path without `%`, `\`, or `.`/`..` segments is never refused.
    #[test]
    fn plain_paths_pass(path in "(/[a-zA-Z0-9_~;=.-]{0,6}){1,5}") {
        let dotted = path.split('/').any(|s| {
            let s = s.split(';').next().unwrap_or("");
            s == "." || s == ".."
        });
        prop_assert_eq!(path::check(&path).is_ok(), !dotted, "{}", path);
    }
}
