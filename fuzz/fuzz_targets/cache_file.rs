//! Token cache files: any text read from `token_cache_dir` gets a token with sane
//! times or is refused; a file this proxy wrote reads back exactly, and any edit
//! of it is refused.
#![no_main]

use std::path::Path;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, SystemTime};

use bearer_proxy::config::{Config, ProviderConfig};
use bearer_proxy::provider::MAX_LIFETIME;
use bearer_proxy::secret::Secret;
use bearer_proxy::token::cache::{decode, encode};
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

static PROVIDER: LazyLock<Arc<ProviderConfig>> = LazyLock::new(|| {
    let config = Config::parse(CONFIG, Path::new("fuzz.toml"), &|_| None)
        .unwrap_or_else(|e| panic!("fuzz provider config is invalid: {e}"));
    config.providers["p"].clone()
});

fn sane(fetched_at: SystemTime, expires_at: SystemTime, now: SystemTime) {
    assert!(fetched_at < expires_at);
    assert!(expires_at > now);
    assert!(expires_at <= now + MAX_LIFETIME + Duration::from_secs(86_400));
}

fuzz_target!(|data: &[u8]| {
    let p = &**PROVIDER;
    let now = SystemTime::now();
    // Any text as it might be found on disk.
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(Some(t)) = decode(p, None, text, now) {
            sane(t.fetched_at, t.expires_at, now);
        }
    }
    // A file this proxy writes, from fuzzed times and token, then one byte edited.
    if data.len() >= 17 {
        let (head, rest) = data.split_at(17);
        let fetched_ms = u64::from_le_bytes(head[0..8].try_into().unwrap_or_default());
        let lifetime_ms = u64::from_le_bytes(head[8..16].try_into().unwrap_or_default());
        let fetched_at = SystemTime::UNIX_EPOCH + Duration::from_millis(fetched_ms % (1 << 45));
        let expires_at = fetched_at + Duration::from_millis(lifetime_ms % (1 << 40));
        let token = Secret::new(String::from_utf8_lossy(rest).into_owned());
        let Some(text) = encode(p, None, &token, fetched_at, expires_at) else {
            return;
        };
        if let Ok(Some(t)) = decode(p, None, &text, now) {
            sane(t.fetched_at, t.expires_at, now);
            assert_eq!(t.value.expose(), token.expose());
        }
        let mut bytes = text.into_bytes();
        let at = usize::from(head[16]) * bytes.len() / 256;
        bytes[at] ^= 1 << (head[16] % 8);
        if let Ok(edited) = String::from_utf8(bytes) {
            if let Ok(Some(t)) = decode(p, None, &edited, now) {
                // Only an edit JSON does not see (e.g. whitespace) may still read.
                sane(t.fetched_at, t.expires_at, now);
                assert_eq!(t.value.expose(), token.expose());
            }
        }
    }
});
