//! Token-endpoint answers: any body, any status, gets a token or a `FetchError`.
#![no_main]

use std::path::Path;
use std::sync::{Arc, LazyLock};

use bearer_proxy::config::{Config, ProviderConfig};
use http::StatusCode;
use libfuzzer_sys::fuzz_target;

const CONFIG: &str = r#"
[server]
listen = "127.0.0.1:8080"

[providers.oauth2]
token_url = "https://issuer.example/oauth/token"
client_id = "id"
client_secret = "s3cret"

[providers.loyalife]
token_url = "https://issuer.example/Auth/Token"
client_id = "id"
client_secret = "s3cret"
request_format = "json"
token_field = "results.token"
expires_at_field = "results.tokenExpiresOn"

[providers.custom]
token_url = "https://issuer.example/token"
client_id = "id"
client_secret = "s3cret"
header = "X-Api-Token"
header_prefix = ""
expires_in_field = "data.ttl"
default_lifetime = "1m"

[providers.prefixed]
token_url = "https://issuer.example/token"
client_id = "id"
client_secret = "s3cret"
header_prefix = "Token token="
refresh_before = "30s"

[[routes]]
upstream = "https://api.example"
"#;

static PROVIDERS: LazyLock<Vec<Arc<ProviderConfig>>> = LazyLock::new(|| {
    let config = Config::parse(CONFIG, Path::new("fuzz.toml"), &|_| None)
        .unwrap_or_else(|e| panic!("fuzz provider config is invalid: {e}"));
    assert_eq!(config.providers.len(), 4);
    config.providers.values().cloned().collect()
});

fuzz_target!(|data: &[u8]| {
    let (status, body) = match data.split_first() {
        // Mostly 200, sometimes an error status (the first byte picks which).
        Some((&b, rest)) => {
            let code = match b {
                0..=191 => 200,
                192..=223 => 201,
                224..=239 => 400 + u16::from(b - 224),
                240..=247 => 500 + u16::from(b - 240),
                _ => 429,
            };
            (StatusCode::from_u16(code).unwrap(), rest)
        }
        None => (StatusCode::OK, data),
    };
    for p in PROVIDERS.iter() {
        match bearer_proxy::provider::parse_response(p, status, None, "application/json", body) {
            Ok(t) => {
                let _ = format!("{t:?}");
            }
            Err(e) => {
                let _ = e.to_string();
            }
        }
    }
    for bytes in [data, body] {
        if let Ok(s) = std::str::from_utf8(bytes) {
            let _ = bearer_proxy::provider::jwt_exp(s);
            let _ = bearer_proxy::provider::parse_retry_after(s);
        }
    }
});
