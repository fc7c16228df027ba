//! The config file exactly as written: serde structs that reject unknown keys.
//!
//! Strings are kept raw here (`${VAR}` not yet expanded); `config::load` validates
//! them into typed settings, naming the key of anything wrong.

use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    pub store: Option<RawStore>,
    #[serde(default)]
    pub providers: BTreeMap<String, RawProvider>,
    #[serde(default)]
    pub routes: Vec<RawRoute>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub listen: Option<String>,
    pub admin_listen: Option<String>,
    pub unix_socket_mode: Option<String>,
    pub unix_socket_group: Option<String>,
    pub allowed_uids: Option<Vec<i64>>,
    pub allow_non_loopback: Option<bool>,
    pub allowed_clients: Option<Vec<String>>,
    pub token_cache_dir: Option<String>,
    pub connect_timeout: Option<String>,
    pub upstream_timeout: Option<String>,
    pub token_timeout: Option<String>,
    pub token_wait: Option<String>,
    pub max_replay_body: Option<String>,
    pub shutdown_grace: Option<String>,
    pub extra_ca_file: Option<String>,
    pub allow_insecure_token_url: Option<bool>,
    pub max_connections: Option<u32>,
    pub max_header_bytes: Option<String>,
    pub max_headers: Option<u32>,
    pub max_uri_length: Option<String>,
    pub header_read_timeout: Option<String>,
    pub max_concurrent_streams: Option<u32>,
    pub workers: Option<u32>,
    pub outbound_proxy: Option<String>,
    pub no_proxy: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    pub backend: Option<String>,
    pub redis_url: Option<String>,
    pub key_prefix: Option<String>,
    pub redis_ca_file: Option<String>,
    pub redis_client_cert_file: Option<String>,
    pub redis_client_key_file: Option<String>,
    pub redis_sentinels: Option<Vec<String>>,
    pub redis_sentinel_master: Option<String>,
}

// No Debug: it holds the client secret before it is wrapped.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProvider {
    pub token_url: Option<String>,
    pub client_id: Option<String>,
    pub client_secret: Option<String>,
    pub client_secret_file: Option<String>,
    pub client_secret_command: Option<Vec<String>>,
    pub client_key_file: Option<String>,
    pub client_cert_file: Option<String>,
    pub client_key_id: Option<String>,
    pub client_assertion_audience: Option<String>,
    pub client_assertion_alg: Option<String>,
    pub audience: Option<String>,
    pub scope: Option<String>,
    pub extra_params: Option<BTreeMap<String, String>>,
    pub request_format: Option<String>,
    pub client_auth: Option<String>,
    pub token_field: Option<String>,
    pub expires_in_field: Option<String>,
    pub expires_at_field: Option<String>,
    pub refresh_before: Option<String>,
    pub default_lifetime: Option<String>,
    pub header: Option<String>,
    pub header_prefix: Option<String>,
    pub invalidate_on: Option<Vec<i64>>,
    pub prefetch: Option<bool>,
    pub key_header: Option<String>,
    pub key_pattern: Option<String>,
    pub max_keys: Option<u32>,
    pub key_idle: Option<String>,
}

impl std::fmt::Debug for RawProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawProvider")
            .field("token_url", &self.token_url)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub upstream: Option<String>,
    pub provider: Option<String>,
    pub listen: Option<String>,
    pub host: Option<String>,
    pub path_prefix: Option<String>,
    pub strip_prefix: Option<bool>,
    pub preserve_host: Option<bool>,
    pub pass_client_authorization: Option<bool>,
    pub allow_encoded_slashes: Option<bool>,
}
