//! Secrets (client secrets, tokens) held in a type that cannot be printed.
//!
//! `Debug` prints `***`, there is no `Display`, and the bytes are zeroized on drop,
//! so a secret can only leave the process where code calls [`Secret::expose`].

use std::fmt;

use zeroize::Zeroizing;

/// A string that must never reach a log line, an error message or a metric.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Zeroizing<String>);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(Zeroizing::new(value.into()))
    }

    /// The secret itself: call only where it is written to the wire or to the token cache.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// True when the secret is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self::new(value)
    }
}

/// Replaces every occurrence of each secret in `text` with `***`.
///
/// Used on text that comes from outside (a token endpoint's error message may echo
/// the request it received) before it is logged or returned.
pub fn redact(text: &str, secrets: &[&Secret]) -> String {
    let mut out = text.to_owned();
    for secret in secrets {
        // Very short values would redact half the message and protect nothing.
        if secret.expose().len() >= 4 && out.contains(secret.expose()) {
            out = out.replace(secret.expose(), "***");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_is_redacted() {
        let s = Secret::new("hunter2-very-secret");
        assert_eq!(format!("{s:?}"), "***");
        assert_eq!(format!("{:?}", Some(&s)), "Some(***)");
        assert_eq!(s.expose(), "hunter2-very-secret");
    }

    #[test]
    fn redact_replaces_every_occurrence() {
        let s = Secret::new("abcdef");
        assert_eq!(
            redact("bad secret abcdef, again abcdef", &[&s]),
            "bad secret ***, again ***"
        );
    }
}
