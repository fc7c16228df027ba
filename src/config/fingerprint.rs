//! The provider fingerprint: a digest of every setting that shapes a token, the
//! credentials included. It names the token cache file and the fleet's Redis keys
//! and binds the keys that seal both, so changed settings or credentials never
//! reuse an old token.
//!
//! It is computed once per client secret in force and kept with the provider's
//! settings; a secret re-read after `invalid_client` gets a new one.

use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use sha2::{Digest, Sha256};

use super::{ProviderConfig, RequestFormat};
use crate::secret::Secret;

/// A provider's fingerprint (or one key's of a keyed provider): 64 hex digits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint(Arc<str>);

impl Fingerprint {
    /// The whole fingerprint, as stored in cache files and fed to key derivation.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The short form used in file names, Redis keys and fleet events.
    pub fn tag(&self) -> &str {
        self.0.get(..16).unwrap_or(&self.0)
    }

    /// The fingerprint of one key of a keyed provider, from the key's id (a keyed
    /// hash: names derived from it never reveal the key).
    fn of_key(&self, key_id: &str) -> Self {
        let mut h = Sha256::new();
        h.update(self.0.as_bytes());
        h.update(b"/key/");
        h.update(key_id.as_bytes());
        Self(hex(&h.finalize()).into())
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The fingerprint computed for the secret it was computed with. Derived data, not
/// a setting: it never makes two providers' settings differ, and a copy of the
/// settings starts without one (its fields may be changed before first use).
#[derive(Default)]
pub struct FingerprintMemo(ArcSwapOption<(Arc<Secret>, Fingerprint)>);

impl Clone for FingerprintMemo {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl PartialEq for FingerprintMemo {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl fmt::Debug for FingerprintMemo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FingerprintMemo")
    }
}

impl ProviderConfig {
    /// The fingerprint of these settings with the client secret in force.
    pub fn fingerprint(&self) -> Fingerprint {
        let secret = self.client_secret.current();
        if let Some(memo) = self.fingerprint_memo.0.load().as_ref() {
            // Holding the secret keeps its address from being reused by another one.
            if Arc::ptr_eq(&memo.0, &secret) {
                return memo.1.clone();
            }
        }
        let fingerprint = Fingerprint(compute(self, secret.expose()).into());
        self.fingerprint_memo
            .0
            .store(Some(Arc::new((secret, fingerprint.clone()))));
        fingerprint
    }

    /// [`ProviderConfig::fingerprint`], or for one key of a keyed provider, that
    /// key's fingerprint from its id.
    pub fn fingerprint_for(&self, key_id: Option<&str>) -> Fingerprint {
        match key_id {
            None => self.fingerprint(),
            Some(id) => self.fingerprint().of_key(id),
        }
    }
}

/// The digest itself. Each field is length-prefixed; the order and the spelling of
/// every field are part of the stored format (existing files and Redis values are
/// named and sealed with it), so they never change.
fn compute(p: &ProviderConfig, secret: &str) -> String {
    let mut h = Sha256::new();
    let mut field = |s: &str| {
        h.update((s.len() as u64).to_le_bytes());
        h.update(s.as_bytes());
    };
    field(p.token_url.as_str());
    field(&p.client_id);
    field(secret);
    // Key and certificate by digest: a rotated key or certificate never reuses a token.
    if let Some(key) = &p.assertion_key {
        field(&hex(&key.digest()));
        field(&format!("{:?}", key.alg));
        field(key.key_id.as_deref().unwrap_or("\0none"));
        field(&key.audience);
    }
    if let Some(identity) = &p.client_identity {
        field(&hex(&identity.digest()));
    }
    field(p.audience.as_deref().unwrap_or("\0none"));
    field(p.scope.as_deref().unwrap_or("\0none"));
    for (k, v) in &p.extra_params {
        field(k);
        field(v);
    }
    field(match p.request_format {
        RequestFormat::Form => "form",
        RequestFormat::Json => "json",
    });
    field(p.client_auth.as_str());
    field(&p.token_field.to_string());
    field(&p.header_prefix);
    if let Some(keys) = &p.keys {
        field(keys.header.as_str());
    }
    hex(&h.finalize())
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::Config;
    use crate::secret::Secret;

    fn config() -> Config {
        let text = "[providers.p]\ntoken_url = \"https://issuer.example/token\"\nclient_id = \"id\"\nclient_secret = \"one\"\n[[routes]]\nupstream = \"https://api.example\"\nprovider = \"p\"\n";
        Config::parse(text, Path::new("t.toml"), &|_| None).unwrap()
    }

    #[test]
    fn computed_once_per_secret_and_never_stale() {
        let cfg = config();
        let p = &cfg.providers["p"];
        let first = p.fingerprint();
        // The same value, not recomputed: the memo hands out the same string.
        assert!(std::sync::Arc::ptr_eq(&first.0, &p.fingerprint().0));
        assert_eq!(first.tag(), &first.as_str()[..16]);
        // A re-read secret gets its own fingerprint; the old secret, the old one.
        p.client_secret.set(Secret::new("two"));
        let second = p.fingerprint();
        assert_ne!(first, second);
        p.client_secret.set(Secret::new("one"));
        assert_eq!(p.fingerprint(), first);
        // A copy whose settings are changed does not inherit the memo.
        let mut changed = (**p).clone();
        changed.scope = Some("more".into());
        assert_ne!(changed.fingerprint(), first);
        // Keys of a keyed provider differ from each other and from the provider.
        let (a, b) = (p.fingerprint_for(Some("a")), p.fingerprint_for(Some("b")));
        assert_ne!(a, b);
        assert_ne!(a, first);
        assert_eq!(a, p.fingerprint_for(Some("a")));
    }
}
