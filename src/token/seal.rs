//! Sealing stored tokens (the Redis fleet value, the token cache file) with
//! AES-256-GCM under a key derived from the provider's credentials, and checking
//! that what a stored value says about time is plausible.
//!
//! Everything a stored value carries is authenticated: the token is the plaintext,
//! and the id and both times are bound in as associated data, so a value edited
//! by anyone without the credentials fails to open instead of steering a refresher.

use std::time::{Duration, SystemTime};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use hkdf::Hkdf;
use sha2::Sha256;

use crate::config::ProviderConfig;
use crate::provider::MAX_LIFETIME;
use crate::secret::Secret;
use crate::unix_time;

/// Clocks of a fleet (or of one machine across a restart) may disagree this much.
const CLOCK_SLACK: Duration = Duration::from_secs(24 * 3600);

/// Why a stored value is not used. Never holds any part of the value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Unusable {
    #[error("it is not in the expected format")]
    Format,
    #[error("it does not open with this provider's credentials (tampered with, or written for other credentials)")]
    Seal,
    #[error("its times are implausible")]
    Times,
    #[error("it has expired")]
    Expired,
}

/// The AEAD for one provider and one purpose (`redis`, `cache`): different purposes
/// get different keys, so a value cannot be moved from one store to the other.
pub struct Sealer(Aes256Gcm);

impl Sealer {
    /// Derives the key from the provider's credentials (secret, private key), salted with the purpose and bound to
    /// the provider's fingerprint (every setting that shapes the token, and the key's
    /// id for a keyed provider).
    pub fn new(p: &ProviderConfig, key_id: Option<&str>, purpose: &str) -> Self {
        let salt = format!("bearer-proxy/{purpose}/v2");
        let hk = Hkdf::<Sha256>::new(Some(salt.as_bytes()), &p.credential_material());
        let mut key = [0u8; 32];
        // 32 bytes is always a valid HKDF-SHA256 output length.
        let _ = hk.expand(p.fingerprint_for(key_id).as_str().as_bytes(), &mut key);
        Self(Aes256Gcm::new(&key.into()))
    }

    /// Encrypts `plain` bound to `aad`: (nonce, ciphertext), both base64.
    pub fn seal(&self, aad: &[u8], plain: &[u8]) -> Option<(String, String)> {
        let nonce: [u8; 12] = rand::random();
        let ciphertext = self
            .0
            .encrypt(Nonce::from_slice(&nonce), Payload { msg: plain, aad })
            .ok()?;
        let b64 = base64::engine::general_purpose::STANDARD;
        Some((b64.encode(nonce), b64.encode(ciphertext)))
    }

    /// The plaintext, if `nonce`/`ciphertext` were sealed by [`Sealer::seal`] with
    /// the same key and `aad`.
    pub fn open(&self, aad: &[u8], nonce: &str, ciphertext: &str) -> Result<Vec<u8>, Unusable> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let nonce = b64.decode(nonce).map_err(|_| Unusable::Format)?;
        let ciphertext = b64.decode(ciphertext).map_err(|_| Unusable::Format)?;
        if nonce.len() != 12 {
            return Err(Unusable::Format);
        }
        self.0
            .decrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: &ciphertext,
                    aad,
                },
            )
            .map_err(|_| Unusable::Seal)
    }

    /// A stored token (cache file or Redis value): the value [`Sealer::open`] gives,
    /// which must be non-empty UTF-8, and its times, which must pass [`check_times`].
    pub fn open_token(
        &self,
        aad: &[u8],
        nonce: &str,
        ciphertext: &str,
        fetched_at_ms: u64,
        expires_at_ms: u64,
        now: SystemTime,
    ) -> Result<(Secret, SystemTime, SystemTime), Unusable> {
        let plain = self.open(aad, nonce, ciphertext)?;
        let (fetched_at, expires_at) = check_times(fetched_at_ms, expires_at_ms, now)?;
        let value = String::from_utf8(plain).map_err(|_| Unusable::Format)?;
        if value.is_empty() {
            return Err(Unusable::Format);
        }
        Ok((Secret::new(value), fetched_at, expires_at))
    }
}

/// Checks stored times: fetched before expiry, not from the future, and expiring
/// within [`MAX_LIFETIME`] (plus clock slack) of `now`. `Expired` when all is right
/// but the token is past its time.
pub fn check_times(
    fetched_at_ms: u64,
    expires_at_ms: u64,
    now: SystemTime,
) -> Result<(SystemTime, SystemTime), Unusable> {
    let at = unix_time::from_millis;
    let (Some(fetched_at), Some(expires_at)) = (at(fetched_at_ms), at(expires_at_ms)) else {
        return Err(Unusable::Times);
    };
    let latest = now
        .checked_add(MAX_LIFETIME + CLOCK_SLACK)
        .ok_or(Unusable::Times)?;
    let fetched_latest = now.checked_add(CLOCK_SLACK).ok_or(Unusable::Times)?;
    let lifetime = expires_at.duration_since(fetched_at).unwrap_or_default();
    if fetched_at_ms == 0
        || lifetime.is_zero()
        || lifetime > MAX_LIFETIME + CLOCK_SLACK
        || expires_at > latest
        || fetched_at > fetched_latest
    {
        return Err(Unusable::Times);
    }
    if expires_at <= now {
        return Err(Unusable::Expired);
    }
    Ok((fetched_at, expires_at))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::secret::Secret;
    use crate::token::{cache, fleet};
    use std::path::Path;

    fn provider(secret: &str) -> ProviderConfig {
        let text = format!(
            "[providers.p]\ntoken_url = \"https://issuer.example/token\"\nclient_id = \"id\"\nclient_secret = \"{secret}\"\n[[routes]]\nupstream = \"https://api.example\"\nprovider = \"p\"\n"
        );
        let cfg = Config::parse(&text, Path::new("t.toml"), &|_| None).unwrap();
        (*cfg.providers["p"]).clone()
    }

    fn shared(now: SystemTime) -> fleet::SharedToken {
        fleet::SharedToken {
            id: 42,
            value: Secret::new("the-token"),
            fetched_at: now - Duration::from_secs(60),
            expires_at: now + Duration::from_secs(3600),
        }
    }

    /// Each way to edit a sealed JSON value: replace one field's JSON value.
    fn edits(raw: &str) -> Vec<String> {
        let doc: serde_json::Value = serde_json::from_str(raw).unwrap();
        let mut out = Vec::new();
        for field in doc.as_object().unwrap().keys() {
            for value in [
                serde_json::json!(1e20),
                serde_json::json!(-1),
                serde_json::json!("AAAA"),
                serde_json::json!(null),
                serde_json::json!(u64::MAX),
                serde_json::json!(1),
            ] {
                let mut edited = doc.clone();
                edited[field] = value;
                out.push(edited.to_string());
            }
        }
        // Flip every bit position of one byte at each place of the text.
        for i in 0..raw.len() {
            let mut bytes = raw.as_bytes().to_vec();
            bytes[i] ^= 0x01;
            if let Ok(text) = String::from_utf8(bytes) {
                out.push(text);
            }
        }
        out
    }

    #[test]
    fn a_fleet_value_opens_only_as_written() {
        let (p, now) = (provider("s3cret-value"), SystemTime::now());
        let raw = fleet::seal(&p, None, "k:token", &shared(now)).unwrap();
        let t = fleet::open(&p, None, "k:token", &raw, now).unwrap();
        assert_eq!((t.id, t.value.expose()), (42, "the-token"));
        assert_eq!(
            unix_time::millis(t.expires_at),
            unix_time::millis(now + Duration::from_secs(3600))
        );
        assert!(!raw.contains("the-token"));
        // Other key, other credentials, any edit: unusable, never a panic.
        assert!(fleet::open(&p, None, "k:other", &raw, now).is_err());
        assert!(fleet::open(&provider("other-secret"), None, "k:token", &raw, now).is_err());
        for edited in edits(&raw) {
            if edited != raw {
                assert!(
                    fleet::open(&p, None, "k:token", &edited, now).is_err(),
                    "{edited}"
                );
            }
        }
        // Another key of a keyed provider: another key, so it does not open.
        assert!(fleet::open(&p, Some("member-2"), "k:token", &raw, now).is_err());
        // Later than its expiry: expired, not tampered.
        let later = now + Duration::from_secs(7200);
        assert_eq!(
            fleet::open(&p, None, "k:token", &raw, later).err(),
            Some(Unusable::Expired)
        );
    }

    #[test]
    fn implausible_times_are_refused_even_when_sealed_right() {
        let (p, now) = (provider("s3cret-value"), SystemTime::now());
        let mut t = shared(now);
        t.expires_at = now + MAX_LIFETIME * 3;
        let raw = fleet::seal(&p, None, "k", &t).unwrap();
        assert_eq!(
            fleet::open(&p, None, "k", &raw, now).err(),
            Some(Unusable::Times)
        );
        let mut t = shared(now);
        t.fetched_at = t.expires_at + Duration::from_secs(1);
        let raw = fleet::seal(&p, None, "k", &t).unwrap();
        assert_eq!(
            fleet::open(&p, None, "k", &raw, now).err(),
            Some(Unusable::Times)
        );
        let mut t = shared(now);
        t.fetched_at = SystemTime::UNIX_EPOCH;
        let raw = fleet::seal(&p, None, "k", &t).unwrap();
        assert_eq!(
            fleet::open(&p, None, "k", &raw, now).err(),
            Some(Unusable::Times)
        );
    }

    #[test]
    fn a_cache_file_reads_back_only_as_written() {
        let (p, now) = (provider("s3cret-value"), SystemTime::now());
        let t = shared(now);
        let text = cache::encode(&p, None, &t.value, t.fetched_at, t.expires_at).unwrap();
        assert!(!text.contains("the-token"));
        let back = cache::decode(&p, None, &text, now).unwrap().unwrap();
        assert_eq!(back.value.expose(), "the-token");
        // Other credentials: another fingerprint, so not this provider's file.
        assert!(matches!(
            cache::decode(&provider("other-secret"), None, &text, now),
            Ok(None)
        ));
        for edited in edits(&text) {
            if edited != text {
                let result = cache::decode(&p, None, &edited, now);
                assert!(matches!(result, Err(_) | Ok(None)), "{edited}");
            }
        }
        // The format before sealing (float times, token in the clear) reads as unusable.
        let old = r#"{"provider":"p","fingerprint":"x","token":"t","fetched_at_unix":1e20,"expires_at_unix":1e20}"#;
        assert_eq!(
            cache::decode(&p, None, old, now).err(),
            Some(Unusable::Format)
        );
    }

    /// Values written by earlier versions, byte for byte: a cache file and a Redis
    /// value sealed for a plain provider and for one key of a keyed provider. They
    /// must keep opening, and the fingerprints naming them must not move.
    #[test]
    fn values_written_by_earlier_versions_still_open() {
        let text = "[providers.p]\ntoken_url = \"https://issuer.example/token\"\nclient_id = \"id\"\nclient_secret = \"s3cret-value\"\nscope = \"read {key}\"\nkey_header = \"X-Member\"\nextra_params = { resource = \"r1\" }\n[[routes]]\nupstream = \"https://api.example\"\nprovider = \"p\"\n[providers.q]\ntoken_url = \"https://issuer.example/token\"\nclient_id = \"id\"\nclient_secret = \"s3cret-value\"\n";
        let cfg = Config::parse(text, Path::new("t.toml"), &|_| None).unwrap();
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let now = at + Duration::from_secs(60);
        let key = "0123456789abcdef0123456789abcdef";
        let cases = [
            (
                "q",
                None,
                "93d7d51f91d701b8e43dd13a7d0a6a2d618081ace3245f1f21b5702854ceeded",
                r#"{"v":2,"provider":"q","fingerprint":"93d7d51f91d701b8e43dd13a7d0a6a2d618081ace3245f1f21b5702854ceeded","fetched_at_ms":1800000000000,"expires_at_ms":1800003600000,"nonce":"gwkWo6f7nDC56hlB","ciphertext":"PWrcVc5T1EMxxW9Zvi472DVWzfMnjDNoBw=="}"#,
                "bp:token:q:93d7d51f91d701b8",
                r#"{"v":2,"id":"42","fetched_at_ms":1800000000000,"expires_at_ms":1800003600000,"nonce":"QHkWMouP5PJHn3nL","ciphertext":"tk+XtajqlO475et0Toa6BB4/Id2nO0B0Og=="}"#,
            ),
            (
                "p",
                Some(key),
                "70fa636d90484a40f655d6a3d3f2de644bd71231f741045635e5531f17270418",
                r#"{"v":2,"provider":"p","fingerprint":"70fa636d90484a40f655d6a3d3f2de644bd71231f741045635e5531f17270418","fetched_at_ms":1800000000000,"expires_at_ms":1800003600000,"nonce":"F6phL/6pOR3qnloJ","ciphertext":"tXwiWZ4wlL77Ll6l1gvbwwW6HsBWuOKmIg=="}"#,
                "bp:token:p:70fa636d90484a40",
                r#"{"v":2,"id":"42","fetched_at_ms":1800000000000,"expires_at_ms":1800003600000,"nonce":"LBq7vlL2VuI1WVCr","ciphertext":"PBlvWtCR6fQ13R+5Rr1eCFwflzIDeSCumQ=="}"#,
            ),
        ];
        for (name, key_id, fp, file, redis_key, redis_value) in cases {
            let p = &cfg.providers[name];
            assert_eq!(p.fingerprint_for(key_id).as_str(), fp, "{name}");
            let (tag_name, tag) = fleet::provider_tag(p, key_id);
            assert_eq!(format!("bp:token:{tag_name}:{tag}"), redis_key, "{name}");
            let cached = cache::decode(p, key_id, file, now).unwrap().unwrap();
            assert_eq!(cached.value.expose(), "the-token", "{name}");
            assert_eq!(cached.expires_at, at + Duration::from_secs(3600), "{name}");
            let shared = fleet::open(p, key_id, redis_key, redis_value, now).unwrap();
            assert_eq!(
                (shared.id, shared.value.expose()),
                (42, "the-token"),
                "{name}"
            );
        }
    }
}
