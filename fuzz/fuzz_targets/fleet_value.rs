//! Sealed fleet values in Redis: any value gets a token with sane times or is
//! refused; a value this proxy sealed opens exactly, and any edit of it is refused.
#![no_main]

use std::path::Path;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, SystemTime};

use bearer_proxy::config::{Config, ProviderConfig};
use bearer_proxy::provider::MAX_LIFETIME;
use bearer_proxy::secret::Secret;
use bearer_proxy::token::fleet::{open, seal, SharedToken};
use libfuzzer_sys::fuzz_target;

const CONFIG: &str = r#"
[providers.p]
token_url = "https://issuer.example/oauth/token"
client_id = "id"
client_secret = "s3cret"

[[routes]]
upstream = "https://api.example"
provider = "p"
"#;

const KEY: &str = "bearer-proxy:token:p:0123456789abcdef";

static PROVIDER: LazyLock<Arc<ProviderConfig>> = LazyLock::new(|| {
    let config = Config::parse(CONFIG, Path::new("fuzz.toml"), &|_| None)
        .unwrap_or_else(|e| panic!("fuzz provider config is invalid: {e}"));
    config.providers["p"].clone()
});

fn sane(t: &SharedToken, now: SystemTime) {
    assert!(t.fetched_at < t.expires_at);
    assert!(t.expires_at > now);
    assert!(t.expires_at <= now + MAX_LIFETIME + Duration::from_secs(86_400));
}

fuzz_target!(|data: &[u8]| {
    let p = &**PROVIDER;
    let now = SystemTime::now();
    // Any value as someone with write access to Redis might leave it.
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(t) = open(p, None, KEY, text, now) {
            sane(&t, now);
        }
    }
    // A value this proxy seals, from fuzzed id, times and token, then one byte edited.
    if data.len() >= 25 {
        let (head, rest) = data.split_at(25);
        let word = |i: usize| u64::from_le_bytes(head[i..i + 8].try_into().unwrap_or_default());
        let fetched_at = SystemTime::UNIX_EPOCH + Duration::from_millis(word(8) % (1 << 45));
        let shared = SharedToken {
            id: word(0),
            value: Secret::new(String::from_utf8_lossy(rest).into_owned()),
            fetched_at,
            expires_at: fetched_at + Duration::from_millis(word(16) % (1 << 40)),
        };
        let Some(raw) = seal(p, None, KEY, &shared) else {
            return;
        };
        if let Ok(t) = open(p, None, KEY, &raw, now) {
            sane(&t, now);
            assert_eq!((t.id, t.value.expose()), (shared.id, shared.value.expose()));
        }
        let mut bytes = raw.into_bytes();
        let at = usize::from(head[24]) * bytes.len() / 256;
        bytes[at] ^= 1 << (head[24] % 8);
        if let Ok(edited) = String::from_utf8(bytes) {
            if let Ok(t) = open(p, None, KEY, &edited, now) {
                sane(&t, now);
                assert_eq!((t.id, t.value.expose()), (shared.id, shared.value.expose()));
            }
        }
    }
});
