//! Typed, validated configuration.
//!
//! `raw` holds the file as written; [`load`] and [`Config::parse`] expand `${VAR}`,
//! check every key and build the settings the rest of the proxy uses. Every error
//! names the file, the key and the problem.

pub(crate) mod fingerprint;
pub mod outbound;
mod raw;
#[cfg(test)]
mod reference;
mod store;
mod validate;
mod values;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, StatusCode};
use ipnet::IpNet;
use url::Url;

use crate::client_auth::{AssertionKey, ClientIdentity, SecretCell, SecretCommand};
use crate::secret::Secret;
pub use fingerprint::Fingerprint;
use fingerprint::FingerprintMemo;
pub use outbound::{OutboundProxy, ProxyUrl};
use raw::RawConfig;
use validate::{syntax_message, Validator};

/// A configuration problem, with where it is.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    Syntax { path: PathBuf, message: String },
    #[error("{}: {key}: {problem}", path.display())]
    Invalid {
        path: PathBuf,
        key: String,
        problem: String,
    },
}

/// The whole validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from, for messages.
    pub source: PathBuf,
    pub server: ServerConfig,
    /// Providers by name.
    pub providers: BTreeMap<String, Arc<ProviderConfig>>,
    pub routes: Vec<RouteConfig>,
    /// Where tokens are shared (`[store]`).
    pub store: StoreConfig,
    /// Internal knobs not in the file (tests shorten them).
    pub tuning: Tuning,
    /// Problems worth a warning that do not stop the proxy.
    pub warnings: Vec<String>,
    /// Providers whose client secret is written in the file itself.
    pub inline_secrets: Vec<String>,
}

/// Where a listener serves: a TCP address, or a Unix domain socket file.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    /// `unix:/path`: only the users the file's permissions allow can connect.
    Unix(PathBuf),
}

impl ListenAddr {
    /// The TCP address, when this is one.
    pub fn tcp(&self) -> Option<SocketAddr> {
        match self {
            Self::Tcp(addr) => Some(*addr),
            Self::Unix(_) => None,
        }
    }
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp(addr) => addr.fmt(f),
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl std::str::FromStr for ListenAddr {
    type Err = String;

    /// `ip:port`, `localhost:port` or `unix:/path` (the path as written; validation
    /// resolves and checks it).
    fn from_str(value: &str) -> Result<Self, String> {
        match value.trim().strip_prefix("unix:") {
            Some(path) => Ok(Self::Unix(PathBuf::from(path))),
            None => values::socket_addr(value).map(Self::Tcp),
        }
    }
}

impl From<SocketAddr> for ListenAddr {
    fn from(addr: SocketAddr) -> Self {
        Self::Tcp(addr)
    }
}

/// How Unix socket listeners are created and who may use them (`[server]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnixSocketConfig {
    /// Permission bits of the socket file (`unix_socket_mode`, default 0600).
    pub mode: u32,
    /// Group owning the socket file (`unix_socket_group`, resolved to its id).
    pub group: Option<u32>,
    /// Peers whose uid is not listed get 403 (`allowed_uids`); `None`: no uid check.
    pub allowed_uids: Option<Vec<u32>>,
}

impl Default for UnixSocketConfig {
    fn default() -> Self {
        Self {
            mode: 0o600,
            group: None,
            allowed_uids: None,
        }
    }
}

/// `[server]`.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: ListenAddr,
    pub admin_listen: Option<ListenAddr>,
    pub unix_socket: UnixSocketConfig,
    pub allow_non_loopback: bool,
    pub allowed_clients: Vec<IpNet>,
    pub token_cache_dir: Option<PathBuf>,
    pub connect_timeout: Duration,
    pub upstream_timeout: Duration,
    pub token_timeout: Duration,
    pub token_wait: Duration,
    pub max_replay_body: u64,
    pub shutdown_grace: Duration,
    pub extra_ca_file: Option<PathBuf>,
    pub allow_insecure_token_url: bool,
    pub limits: Limits,
    /// Worker threads serving the proxy listeners, each with its own event loop and
    /// upstream pool (default: one per CPU).
    pub workers: usize,
    /// The HTTP proxy token and upstream requests go through (`outbound_proxy`,
    /// `no_proxy`); `None`: direct connections.
    pub outbound: Option<OutboundProxy>,
}

/// Limits on what clients may send (`[server]`), with safe defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once over all listeners; more wait to be accepted.
    pub max_connections: u32,
    /// Request line plus headers (HTTP/1.1), header list (HTTP/2); over it: 431.
    pub max_header_bytes: u64,
    /// Number of request headers (HTTP/1.1); over it: 431.
    pub max_headers: u32,
    /// Request target length; over it: 414.
    pub max_uri_length: u64,
    /// Time to receive a request's headers, and the longest an idle HTTP/1.1
    /// keep-alive connection is kept.
    pub header_read_timeout: Duration,
    /// HTTP/2 streams per connection.
    pub max_concurrent_streams: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            max_uri_length: 8 * 1024,
            header_read_timeout: Duration::from_secs(30),
            max_concurrent_streams: 256,
        }
    }
}

/// `[store]`: where tokens live besides this process's memory.
#[derive(Debug, Clone, PartialEq)]
pub enum StoreConfig {
    Memory,
    /// One token per provider for every proxy sharing this Redis.
    Redis(RedisConfig),
}

/// `[store] backend = "redis"`: how to reach the Redis the fleet shares.
#[derive(Debug, Clone, PartialEq)]
pub struct RedisConfig {
    /// As written: may hold a password, so kept as a secret. With Sentinels only its
    /// user, password, database and scheme are used.
    pub url: Secret,
    pub key_prefix: String,
    /// `rediss://`: TLS, certificates verified against the system roots plus `ca_pem`.
    pub tls: bool,
    /// `redis_ca_file`, read and checked at load: PEM certificates.
    pub ca_pem: Option<Vec<u8>>,
    /// `redis_client_cert_file` + `redis_client_key_file`, read and checked at load.
    pub client_cert: Option<RedisClientCert>,
    /// `redis_sentinels` as `host:port`; empty without Sentinel.
    pub sentinels: Vec<(String, u16)>,
    /// `redis_sentinel_master`: the name the Sentinels know the master by.
    pub sentinel_master: Option<String>,
}

/// A client certificate for Redis over TLS.
#[derive(Debug, Clone, PartialEq)]
pub struct RedisClientCert {
    /// PEM certificate chain.
    pub cert_pem: Vec<u8>,
    /// PEM private key.
    pub key_pem: Secret,
}

/// Timing knobs of the token store that are not user settings.
#[derive(Debug, Clone)]
pub struct Tuning {
    /// First retry delay after a failed fetch; doubles per failure.
    pub backoff_base: Duration,
    /// Longest delay between failed fetches.
    pub backoff_max: Duration,
    /// Refresh is moved earlier by up to this fraction of the token's lifetime.
    pub refresh_jitter: f64,
    /// Longest wait for one Redis command before falling back to memory.
    pub redis_timeout: Duration,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
            refresh_jitter: 0.05,
            redis_timeout: Duration::from_millis(500),
        }
    }
}

/// How the token request body is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestFormat {
    /// `application/x-www-form-urlencoded`, RFC 6749.
    Form,
    /// `application/json`, the Auth0 dialect.
    Json,
}

/// Where the client credentials go in the token request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// `client_id` and `client_secret` in the body.
    Body,
    /// HTTP Basic, RFC 6749 §2.3.1.
    Basic,
    /// A signed client assertion, RFC 7523 §2.2; no secret.
    PrivateKeyJwt,
    /// A client certificate on the TLS connection, RFC 8705 §2; no secret.
    TlsClientAuth,
}

impl ClientAuth {
    /// The name used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Body => "body",
            Self::Basic => "basic",
            Self::PrivateKeyJwt => "private_key_jwt",
            Self::TlsClientAuth => "tls_client_auth",
        }
    }

    /// True for the methods that send a client secret.
    pub fn uses_secret(self) -> bool {
        matches!(self, Self::Body | Self::Basic)
    }
}

impl RequestFormat {
    /// What goes on the wire, in the words `check` prints.
    pub fn describe(&self) -> &'static str {
        match self {
            Self::Form => "form-encoded body",
            Self::Json => "JSON body",
        }
    }
}

impl ClientAuth {
    /// How the client authenticates, in the words `check` prints.
    pub fn describe(&self) -> &'static str {
        match self {
            Self::Body => "client_id and client_secret in the body",
            Self::Basic => "client_id and client_secret as HTTP Basic",
            Self::PrivateKeyJwt => "client_id and a client assertion signed with client_key_file",
            Self::TlsClientAuth => "client_id in the body, client_cert_file in the TLS handshake",
        }
    }
}

/// How long before expiry a token is refreshed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RefreshBefore {
    /// A fraction (0..1) of the token's lifetime.
    Fraction(f64),
    Duration(Duration),
}

impl RefreshBefore {
    /// The lead time for a token of `lifetime`, never more than 90 % of it.
    pub fn lead(&self, lifetime: Duration) -> Duration {
        let lead = match *self {
            Self::Fraction(f) => lifetime.mul_f64(f),
            Self::Duration(d) => d,
        };
        lead.min(lifetime.mul_f64(0.9))
    }
}

/// A dotted path into a JSON document, e.g. `results.token`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldPath(Vec<String>);

impl FieldPath {
    fn parse(value: &str) -> Result<Self, String> {
        let parts: Vec<String> = value.split('.').map(str::to_owned).collect();
        if parts.iter().any(String::is_empty) {
            return Err(format!(
                "`{value}` is not a dotted field path like \"results.token\""
            ));
        }
        Ok(Self(parts))
    }

    /// Looks the path up in `doc`.
    pub fn get<'a>(&self, doc: &'a serde_json::Value) -> Option<&'a serde_json::Value> {
        self.0.iter().try_fold(doc, |v, key| v.get(key))
    }
}

impl std::fmt::Display for FieldPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join("."))
    }
}

/// `[providers.NAME]`.
#[derive(Debug, Clone, PartialEq)]
pub struct ProviderConfig {
    pub name: String,
    pub token_url: Url,
    pub client_id: String,
    /// The secret in force (empty for `private_key_jwt` and `tls_client_auth`). With
    /// `client_secret_command` it is filled by [`resolve_secrets`] and replaced when
    /// the token endpoint answers `invalid_client`.
    pub client_secret: SecretCell,
    pub client_secret_command: Option<SecretCommand>,
    /// The signing key of `private_key_jwt`.
    pub assertion_key: Option<AssertionKey>,
    /// The certificate and key of `tls_client_auth`.
    pub client_identity: Option<ClientIdentity>,
    pub audience: Option<String>,
    pub scope: Option<String>,
    pub extra_params: Vec<(String, String)>,
    pub request_format: RequestFormat,
    pub client_auth: ClientAuth,
    pub token_field: FieldPath,
    pub expires_in_field: FieldPath,
    pub expires_at_field: Option<FieldPath>,
    pub refresh_before: RefreshBefore,
    pub default_lifetime: Duration,
    pub header: HeaderName,
    pub header_prefix: String,
    pub invalidate_on: Vec<StatusCode>,
    pub prefetch: bool,
    /// Set for a keyed provider: one token per value of a request header.
    pub keys: Option<KeyConfig>,
    /// Kept by [`ProviderConfig::fingerprint`]; starts empty.
    pub(crate) fingerprint_memo: FingerprintMemo,
}

/// `key_header` and friends: a keyed provider holds one token per key.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyConfig {
    /// The request header holding the key; removed before forwarding.
    pub header: HeaderName,
    pub pattern: KeyPattern,
    /// Tokens held at most; past it the least recently used key is dropped.
    pub max_keys: usize,
    /// A key unused this long is no longer refreshed ahead.
    pub idle: Duration,
}

/// The placeholder replaced by the key in `scope`, `audience` and `extra_params`.
pub const KEY_PLACEHOLDER: &str = "{key}";

/// Which header values are keys (`key_pattern`).
#[derive(Debug, Clone)]
pub struct KeyPattern(regex::Regex);

impl KeyPattern {
    /// The default `key_pattern`.
    pub const DEFAULT: &'static str = "^[A-Za-z0-9._@+-]{1,128}$";

    /// Compiles `pattern`, refusing ones too large to match cheaply per request.
    pub fn new(pattern: &str) -> Result<Self, regex::Error> {
        regex::RegexBuilder::new(pattern)
            .size_limit(1 << 20)
            .build()
            .map(Self)
    }

    /// True when `key` may select a token: it matches the pattern and, whatever the
    /// pattern allows, is at most 1024 bytes of visible ASCII without `"` or `\`,
    /// so once placed in a value it cannot end the JSON string around it (as in
    /// `scope = '["LOGIN","{key}"]'`) nor add a space-separated scope.
    pub fn accepts(&self, key: &str) -> bool {
        key.len() <= 1024
            && key
                .bytes()
                .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
            && self.0.is_match(key)
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
}

impl PartialEq for KeyPattern {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl ProviderConfig {
    /// True when `{key}` appears in a value sent to the token endpoint.
    pub fn uses_key_placeholder(&self) -> bool {
        let has = |v: &str| v.contains(KEY_PLACEHOLDER);
        self.audience.as_deref().is_some_and(has)
            || self.scope.as_deref().is_some_and(has)
            || self.extra_params.iter().any(|(_, v)| has(v))
    }
}

impl ProviderConfig {
    /// Every credential byte this provider authenticates with (secret, private key),
    /// for deriving keys that only holders of the same credentials can derive.
    pub fn credential_material(&self) -> zeroize::Zeroizing<Vec<u8>> {
        let mut out = zeroize::Zeroizing::new(Vec::new());
        out.extend_from_slice(self.client_secret.current().expose().as_bytes());
        if let Some(key) = &self.assertion_key {
            out.extend_from_slice(key.material());
        }
        if let Some(identity) = &self.client_identity {
            out.extend_from_slice(identity.material());
        }
        out
    }
}

/// Runs every provider's `client_secret_command` and stores what it printed.
/// Call at startup, on reload and in `check`; errors name the config key.
pub async fn resolve_secrets(config: &Config) -> Result<(), crate::client_auth::CommandError> {
    for p in config.providers.values() {
        if let Some(command) = &p.client_secret_command {
            let secret = command.run(config.server.token_timeout).await?;
            p.client_secret.set(secret);
        }
    }
    Ok(())
}

/// The parts of an upstream URL a request is forwarded to.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub url: Url,
    pub scheme: http::uri::Scheme,
    pub authority: http::uri::Authority,
    /// The URL's path without a trailing `/`; empty for the root.
    pub base_path: String,
}

/// `[[routes]]`.
#[derive(Debug, Clone)]
pub struct RouteConfig {
    /// A label for logs and metrics: `[listen]host/prefix`.
    pub name: String,
    pub listen: ListenAddr,
    /// Lower-case host name without port.
    pub host: Option<String>,
    /// Starts with `/`, no trailing `/` except for the root.
    pub path_prefix: String,
    pub strip_prefix: bool,
    pub preserve_host: bool,
    pub pass_client_authorization: bool,
    /// Pass request paths holding `%2F` as they are (IDs with slashes in one segment);
    /// every other encoded-path refusal still applies.
    pub allow_encoded_slashes: bool,
    pub upstream: Upstream,
    pub provider: Option<String>,
}

impl Config {
    /// Parses and validates `text`, reading variables through `env`.
    pub fn parse(
        text: &str,
        path: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.to_owned(),
            message: syntax_message(text, &e),
        })?;
        let validator = Validator {
            path,
            env,
            inline_secrets: Default::default(),
            warnings: Default::default(),
        };
        let mut config = validator.config(raw)?;
        config.inline_secrets = validator.inline_secrets.into_inner();
        config.warnings = validator.warnings.into_inner();
        Ok(config)
    }

    /// Every listener address that has routes, in the order routes name them.
    /// `server.listen` is not bound when every route has a listener of its own.
    pub fn listen_addrs(&self) -> Vec<ListenAddr> {
        let mut addrs = Vec::new();
        for route in &self.routes {
            if !addrs.contains(&route.listen) {
                addrs.push(route.listen.clone());
            }
        }
        addrs
    }
}

/// Reads and validates the config file at `path`, with the process environment.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mut config = Config::parse(&text, path, &|name| std::env::var(name).ok())?;
    if let Some(warning) = exposed_secret_warning(path, &config.inline_secrets) {
        config.warnings.push(warning);
    }
    Ok(config)
}

/// A warning when the file holds a literal secret that group or others can read.
fn exposed_secret_warning(path: &Path, inline: &[String]) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    if inline.is_empty() {
        return None;
    }
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
    (mode & 0o077 != 0).then(|| {
        format!(
            "{} holds a literal client_secret (providers: {}) and is readable by group or others \
             (mode {mode:o}); run `chmod 600 {}`, or better, use client_secret = \"${{VAR}}\" or client_secret_file",
            path.display(),
            inline.join(", "),
            path.display()
        )
    })
}

/// Expands a leading `~/` to `$HOME`.
pub fn expand_home(p: &str) -> PathBuf {
    match (p.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ if p == "~" => std::env::var_os("HOME").map_or_else(|| PathBuf::from(p), PathBuf::from),
        _ => PathBuf::from(p),
    }
}
