//! Request-path hardening: refuses paths that an upstream could decode into a place
//! outside the route's base path.
//!
//! The proxy forwards the path byte for byte, but upstreams read it in their own ways:
//! many decode `%2F` as a separator, Tomcat drops `;parameters` from a segment (so
//! `..;x` is `..`), Windows servers take `\` as `/`, and some decode twice. So the check
//! looks at the path as each of those readings would: it percent-decodes the path again
//! and again until nothing changes, and in every reading splits segments at `/` and `\`,
//! cuts each at `;`, and refuses a `.` or `..` segment. Encoded slashes, backslashes and
//! NULs are refused in every reading too; `%2F` alone may be let through per route.

use std::borrow::Cow;

/// Why a request path is refused (each one a 400 `bad_request`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathRefusal {
    NotAbsolute,
    DotSegment,
    EncodedSlash,
    EncodedBackslash,
    Nul,
    Overlong,
    TooDeep,
}

impl PathRefusal {
    /// The sentence for the client's 400 answer.
    pub fn message(self) -> &'static str {
        match self {
            Self::NotAbsolute => "the request path must start with /",
            Self::DotSegment => {
                "the request path holds a . or .. segment (raw, percent-encoded or with \
                 ;parameters), which an upstream could resolve outside the route"
            }
            Self::EncodedSlash => {
                "the request path holds an encoded slash (%2F), which this route does not \
                 pass (see allow_encoded_slashes)"
            }
            Self::EncodedBackslash => "the request path holds an encoded backslash (%5C)",
            Self::Nul => "the request path holds an encoded NUL (%00)",
            Self::Overlong => "the request path holds an overlong UTF-8 sequence",
            Self::TooDeep => "the request path is percent-encoded too many times over",
        }
    }
}

impl std::fmt::Display for PathRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.message())
    }
}

impl std::error::Error for PathRefusal {}

/// A path that passed [`check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckedPath {
    /// The path holds `%2F` (in some reading): only a route with
    /// `allow_encoded_slashes` may take it, and the route is not known yet.
    pub encoded_slash: bool,
}

/// How many times over a path may be percent-encoded. Real clients encode once; a
/// second layer is kept for IDs holding a `%`; deeper nesting is only ever an attack
/// on an upstream that decodes repeatedly.
const MAX_DECODES: usize = 3;

/// Checks a request path (without the query) against every reading described in
/// the module docs. Runs before routing; `%2F` is reported rather than refused, so
/// the chosen route decides.
pub fn check(path: &str) -> Result<CheckedPath, PathRefusal> {
    if !path.starts_with('/') {
        return Err(PathRefusal::NotAbsolute);
    }
    let mut encoded_slash = false;
    let mut reading: Cow<'_, [u8]> = Cow::Borrowed(path.as_bytes());
    for decodes in 0..=MAX_DECODES {
        encoded_slash |= check_reading(&reading)?;
        if !reading.contains(&b'%') {
            return Ok(CheckedPath { encoded_slash });
        }
        let decoded: Vec<u8> = percent_encoding::percent_decode(&reading).collect();
        if decoded[..] == reading[..] {
            // Only stray `%`s (`100%`, `%zz`): nothing more to decode.
            return Ok(CheckedPath { encoded_slash });
        }
        if decodes == MAX_DECODES {
            break;
        }
        reading = Cow::Owned(decoded);
    }
    Err(PathRefusal::TooDeep)
}

/// Checks one reading of the path; true when it holds `%2F`.
fn check_reading(reading: &[u8]) -> Result<bool, PathRefusal> {
    if contains_ignore_case(reading, b"%5c") {
        return Err(PathRefusal::EncodedBackslash);
    }
    if reading.contains(&0) || contains_ignore_case(reading, b"%00") {
        return Err(PathRefusal::Nul);
    }
    // 0xC0 and 0xC1 never occur in valid UTF-8; lenient decoders read `%c0%ae` as `.`.
    if reading.iter().any(|&b| b == 0xC0 || b == 0xC1) {
        return Err(PathRefusal::Overlong);
    }
    let dot_segment = reading
        .split(|&b| b == b'/' || b == b'\\')
        .map(without_params)
        .any(|segment| segment == b"." || segment == b"..");
    if dot_segment {
        return Err(PathRefusal::DotSegment);
    }
    Ok(contains_ignore_case(reading, b"%2f"))
}

/// The segment without its `;parameters`, as Tomcat and Spring read it.
fn without_params(segment: &[u8]) -> &[u8] {
    match segment.iter().position(|&b| b == b';') {
        Some(at) => &segment[..at],
        None => segment,
    }
}

fn contains_ignore_case(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window.eq_ignore_ascii_case(needle))
}

/// An independent model of how upstreams read a forwarded path, for the property
/// test and the fuzz target: it must never find a way out of the base path for a
/// path that [`check`] passed.
#[doc(hidden)]
pub mod readings {
    /// One step an upstream may apply to a path before resolving dot segments.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Decoding {
        /// `%XX` to the byte.
        Percent,
        /// `\` as `/` (IIS and other Windows servers).
        Backslash,
        /// `;parameters` cut from every segment (Tomcat, Spring).
        StripParams,
        /// Everything from the first NUL cut (C string handling).
        TruncateAtNul,
    }

    /// Every decoding, for generators.
    pub const ALL: [Decoding; 4] = [
        Decoding::Percent,
        Decoding::Backslash,
        Decoding::StripParams,
        Decoding::TruncateAtNul,
    ];

    /// Applies one decoding.
    pub fn apply(decoding: Decoding, path: &[u8]) -> Vec<u8> {
        match decoding {
            Decoding::Percent => percent_encoding::percent_decode(path).collect(),
            Decoding::Backslash => path
                .iter()
                .map(|&b| if b == b'\\' { b'/' } else { b })
                .collect(),
            Decoding::StripParams => {
                let mut out = Vec::with_capacity(path.len());
                for (i, segment) in path.split(|&b| b == b'/').enumerate() {
                    if i > 0 {
                        out.push(b'/');
                    }
                    out.extend_from_slice(super::without_params(segment));
                }
                out
            }
            Decoding::TruncateAtNul => match path.iter().position(|&b| b == 0) {
                Some(at) => path[..at].to_vec(),
                None => path.to_vec(),
            },
        }
    }

    /// True when `path`, after `decodings` in order and dot-segment resolution
    /// (RFC 3986 §5.2.4), no longer lies under `base` (a plain `/a/b` path, or empty).
    pub fn escapes(base: &str, path: &[u8], decodings: &[Decoding]) -> bool {
        let mut path = path.to_vec();
        for &decoding in decodings {
            path = apply(decoding, &path);
        }
        let base_depth = base.split('/').filter(|s| !s.is_empty()).count();
        if !path.starts_with(base.as_bytes()) {
            // A decoding changed the base itself; bases are plain, so this is a bug.
            return true;
        }
        // Resolve from the root: `..` pops a segment, `.` stays; the base's own
        // segments must all survive.
        let mut depth: usize = 0;
        let mut kept_base = base_depth;
        for segment in path.split(|&b| b == b'/').skip(1) {
            match segment {
                b"." => {}
                b".." => {
                    depth = depth.saturating_sub(1);
                    kept_base = kept_base.min(depth);
                }
                _ => depth += 1,
            }
        }
        kept_base < base_depth
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_spellings() {
        for path in [
            "/a/../b",
            "/a/..",
            "/a/./b",
            "/a/.",
            "/..",
            "/a/%2e%2e/b",
            "/a/%2E%2e/b",
            "/a/.%2E/b",
            "/a/%2e./b",
            "/a/%2e/b",
            "/a/..;x/b",
            "/a/.;x/b",
            "/a/..;/b",
            "/a/%2e%2e;x/b",
            "/a/..%3bx/b",
            "/a/x\\..\\b",
            "/a/%252e%252e/b",
            "/a/%c0%ae%c0%ae/b",
        ] {
            assert!(check(path).is_err(), "{path} passed");
        }
        assert_eq!(check("/a/x%5c..%5cb"), Err(PathRefusal::EncodedBackslash));
        assert_eq!(check("/a/x%5Cb"), Err(PathRefusal::EncodedBackslash));
        assert_eq!(check("/a/x%255cb"), Err(PathRefusal::EncodedBackslash));
        assert_eq!(check("/a/b%00"), Err(PathRefusal::Nul));
        assert_eq!(check("/a/b%2500"), Err(PathRefusal::Nul));
        assert_eq!(check("/a/..%2fb"), Err(PathRefusal::DotSegment));
        assert_eq!(check("/a/%c0%afb"), Err(PathRefusal::Overlong));
        assert_eq!(check("/a/%25252525"), Err(PathRefusal::TooDeep));
        assert_eq!(check("a/b"), Err(PathRefusal::NotAbsolute));
        assert_eq!(check("*"), Err(PathRefusal::NotAbsolute));
    }

    #[test]
    fn encoded_slashes_are_reported_not_refused() {
        assert_eq!(
            check("/a/x%2Fy"),
            Ok(CheckedPath {
                encoded_slash: true
            })
        );
        assert_eq!(
            check("/a/x%2fy"),
            Ok(CheckedPath {
                encoded_slash: true
            })
        );
        assert_eq!(
            check("/a/x%252Fy"),
            Ok(CheckedPath {
                encoded_slash: true
            })
        );
        assert_eq!(check("/a/x%2F..%2Fy"), Err(PathRefusal::DotSegment));
    }

    #[test]
    fn ordinary_paths_pass() {
        for path in [
            "/",
            "/a/b",
            "/a;b/c",
            "/a/b;x=1;y=2",
            "/a/%2e%2ehidden",
            "/a/..hidden",
            "/a/a..b",
            "/a/...",
            "/a/.well-known/x",
            "/a//b",
            "/a/100%25",
            "/a/100%",
            "/a/%zz",
            "/a/caf%C3%A9",
            "/a/x%20y",
        ] {
            assert_eq!(
                check(path),
                Ok(CheckedPath {
                    encoded_slash: false
                }),
                "{path}"
            );
        }
    }

    #[test]
    fn readings_find_escapes() {
        use readings::{escapes, Decoding::*};
        assert!(escapes("/v1", b"/v1/../admin", &[]));
        assert!(escapes("/v1", b"/v1/..%2fadmin", &[Percent]));
        assert!(escapes("/v1", b"/v1/x/..;/..;/admin", &[StripParams]));
        assert!(escapes("/v1", b"/v1/x\\..\\..\\admin", &[Backslash]));
        assert!(!escapes("/v1", b"/v1/x/../y", &[]));
        assert!(!escapes("", b"/../x", &[]));
        assert!(!escapes("/v1", b"/v1/a%2Fb", &[Percent]));
    }
}
