//! Validation: raw TOML values to typed settings, with `${VAR}` expanded and every
//! problem reported with its key.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, StatusCode};
use ipnet::IpNet;
use url::Url;

use super::raw::{RawConfig, RawProvider, RawRoute, RawServer};
use super::*;
use super::{outbound, values};
use crate::hop_by_hop::is_hop_by_hop;
use crate::secret::Secret;

pub(super) struct Validator<'a> {
    pub(super) path: &'a Path,
    pub(super) env: &'a dyn Fn(&str) -> Option<String>,
    pub(super) inline_secrets: std::cell::RefCell<Vec<String>>,
    pub(super) warnings: std::cell::RefCell<Vec<String>>,
}

pub(super) type VResult<T> = std::result::Result<T, ConfigError>;

impl Validator<'_> {
    pub(super) fn err(&self, key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_owned(),
            key: key.into(),
            problem: problem.into(),
        }
    }

    pub(super) fn string(&self, key: &str, raw: &str) -> VResult<String> {
        values::interpolate(raw, self.env).map_err(|p| self.err(key, p))
    }

    pub(super) fn opt_string(&self, key: &str, raw: Option<&String>) -> VResult<Option<String>> {
        raw.map(|r| self.string(key, r)).transpose()
    }

    fn parsed<T>(
        &self,
        key: &str,
        raw: Option<&String>,
        default: T,
        parse: impl Fn(&str) -> std::result::Result<T, String>,
    ) -> VResult<T> {
        match raw {
            None => Ok(default),
            Some(r) => parse(&self.string(key, r)?).map_err(|p| self.err(key, p)),
        }
    }

    pub(super) fn config(&self, raw: RawConfig) -> VResult<Config> {
        let server = self.server(&raw.server)?;
        let store = match &raw.store {
            None => StoreConfig::Memory,
            Some(store) => self.store(store)?,
        };
        let mut providers = BTreeMap::new();
        for (name, p) in &raw.providers {
            let provider = self.provider(name, p, &server)?;
            providers.insert(name.clone(), Arc::new(provider));
        }
        if raw.routes.is_empty() {
            return Err(self.err("routes", "no [[routes]] defined: nothing to proxy"));
        }
        let mut routes = Vec::with_capacity(raw.routes.len());
        let mut seen: HashSet<(ListenAddr, Option<String>, String)> = HashSet::new();
        for (i, r) in raw.routes.iter().enumerate() {
            let route = self.route(i, r, &server, &providers)?;
            let key = (
                route.listen.clone(),
                route.host.clone(),
                route.path_prefix.clone(),
            );
            if !seen.insert(key) {
                return Err(self.err(
                    format!("routes[{i}]"),
                    format!(
                        "cannot be told apart from an earlier route: same listener {}, host {} and path_prefix {}",
                        route.listen,
                        route.host.as_deref().unwrap_or("(any)"),
                        route.path_prefix
                    ),
                ));
            }
            routes.push(route);
        }
        self.check_listeners(&server, &routes)?;
        Ok(Config {
            source: self.path.to_owned(),
            server,
            providers,
            routes,
            store,
            tuning: Tuning::default(),
            warnings: Vec::new(),
            inline_secrets: Vec::new(),
        })
    }

    fn listen_addr(&self, key: &str, raw: &str, allow_non_loopback: bool) -> VResult<ListenAddr> {
        let value = self.string(key, raw)?;
        if let Some(path) = value.trim().strip_prefix("unix:") {
            return self.unix_path(key, path).map(ListenAddr::Unix);
        }
        let addr = values::socket_addr(&value).map_err(|p| {
            self.err(
                key,
                format!("{p}, or a Unix socket like \"unix:/run/bearer-proxy/api.sock\""),
            )
        })?;
        if !addr.ip().is_loopback() && !allow_non_loopback {
            return Err(self.err(
                key,
                format!(
                    "{addr} is not a loopback address; anyone who can reach it uses your credentials. \
                     Set server.allow_non_loopback = true (and server.allowed_clients) if you mean it"
                ),
            ));
        }
        Ok(ListenAddr::Tcp(addr))
    }

    /// A Unix socket path: relative ones are taken from the config file's directory.
    fn unix_path(&self, key: &str, path: &str) -> VResult<PathBuf> {
        if path.is_empty() {
            return Err(self.err(
                key,
                "unix: needs a socket path, like \"unix:/run/bearer-proxy/api.sock\"",
            ));
        }
        let path = self.relative(path);
        // sockaddr_un holds 108 bytes including the terminating NUL.
        if path.as_os_str().len() > 107 {
            return Err(self.err(
                key,
                format!(
                    "{} is longer than the 107 bytes a Unix socket path may have",
                    path.display()
                ),
            ));
        }
        if path.file_name().is_none() {
            return Err(self.err(key, format!("{} names no file", path.display())));
        }
        Ok(path)
    }

    fn unix_socket(&self, s: &RawServer) -> VResult<UnixSocketConfig> {
        let mode = match &s.unix_socket_mode {
            None => 0o600,
            Some(raw) => {
                let value = self.string("server.unix_socket_mode", raw)?;
                u32::from_str_radix(value.trim(), 8)
                    .ok()
                    .filter(|m| *m <= 0o777)
                    .ok_or_else(|| {
                        self.err(
                            "server.unix_socket_mode",
                            format!("`{value}` is not permission bits in octal, like \"0600\" or \"0660\""),
                        )
                    })?
            }
        };
        let group = match &s.unix_socket_group {
            None => None,
            Some(raw) => {
                let value = self.string("server.unix_socket_group", raw)?;
                Some(group_id(value.trim()).map_err(|p| self.err("server.unix_socket_group", p))?)
            }
        };
        let allowed_uids = match &s.allowed_uids {
            None => None,
            Some(list) => Some(
                list.iter()
                    .enumerate()
                    .map(|(i, &uid)| {
                        u32::try_from(uid).map_err(|_| {
                            self.err(
                                format!("server.allowed_uids[{i}]"),
                                format!("{uid} is not a user id"),
                            )
                        })
                    })
                    .collect::<VResult<Vec<u32>>>()?,
            ),
        };
        Ok(UnixSocketConfig {
            mode,
            group,
            allowed_uids,
        })
    }

    /// The admin listener must be its own; a Unix socket anyone may use gets a warning.
    fn check_listeners(&self, server: &ServerConfig, routes: &[RouteConfig]) -> VResult<()> {
        // Port 0 binds a fresh port for each listener, so it never collides.
        let collides = |admin: &ListenAddr| match admin {
            ListenAddr::Tcp(addr) => addr.port() != 0,
            ListenAddr::Unix(_) => true,
        };
        if let Some(admin) = server.admin_listen.as_ref().filter(|a| collides(a)) {
            if routes.iter().any(|r| &r.listen == admin) {
                return Err(self.err(
                    "server.admin_listen",
                    format!("{admin} is also a route listener; give the admin listener its own"),
                ));
            }
        }
        let has_unix = routes
            .iter()
            .map(|r| &r.listen)
            .chain(server.admin_listen.as_ref())
            .any(|l| matches!(l, ListenAddr::Unix(_)));
        let unix = &server.unix_socket;
        if has_unix && unix.mode & 0o006 != 0 && unix.allowed_uids.is_none() {
            self.warnings.borrow_mut().push(format!(
                "server.unix_socket_mode {:04o} lets every local user connect to the Unix socket \
                 and use the credentials; set server.allowed_uids, or a mode like \"0660\" with \
                 server.unix_socket_group",
                unix.mode
            ));
        }
        Ok(())
    }

    fn server(&self, s: &RawServer) -> VResult<ServerConfig> {
        let allow_non_loopback = s.allow_non_loopback.unwrap_or(false);
        let listen = match &s.listen {
            Some(raw) => self.listen_addr("server.listen", raw, allow_non_loopback)?,
            None => ListenAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], 8080))),
        };
        let admin_listen = s
            .admin_listen
            .as_ref()
            .map(|raw| self.listen_addr("server.admin_listen", raw, allow_non_loopback))
            .transpose()?;
        let allowed_clients = match &s.allowed_clients {
            None => vec![
                "127.0.0.0/8".parse().expect("static CIDR"),
                "::1/128".parse().expect("static CIDR"),
            ],
            Some(list) => list
                .iter()
                .enumerate()
                .map(|(i, raw)| {
                    let key = format!("server.allowed_clients[{i}]");
                    let v = self.string(&key, raw)?;
                    parse_cidr(&v).map_err(|p| self.err(&key, p))
                })
                .collect::<VResult<_>>()?,
        };
        let dur = |key: &str, raw: &Option<String>, default: u64| -> VResult<Duration> {
            let d = self.parsed(
                key,
                raw.as_ref(),
                Duration::from_secs(default),
                values::duration,
            )?;
            if d.is_zero() {
                return Err(self.err(key, "must be more than zero"));
            }
            Ok(d)
        };
        Ok(ServerConfig {
            listen,
            admin_listen,
            unix_socket: self.unix_socket(s)?,
            allow_non_loopback,
            allowed_clients,
            token_cache_dir: self
                .opt_string("server.token_cache_dir", s.token_cache_dir.as_ref())?
                .map(|p| expand_home(&p)),
            connect_timeout: dur("server.connect_timeout", &s.connect_timeout, 10)?,
            upstream_timeout: dur("server.upstream_timeout", &s.upstream_timeout, 60)?,
            token_timeout: dur("server.token_timeout", &s.token_timeout, 10)?,
            token_wait: dur("server.token_wait", &s.token_wait, 10)?,
            max_replay_body: self.parsed(
                "server.max_replay_body",
                s.max_replay_body.as_ref(),
                1024 * 1024,
                values::size,
            )?,
            shutdown_grace: dur("server.shutdown_grace", &s.shutdown_grace, 10)?,
            extra_ca_file: self
                .opt_string("server.extra_ca_file", s.extra_ca_file.as_ref())?
                .map(|p| self.relative(&p)),
            allow_insecure_token_url: s.allow_insecure_token_url.unwrap_or(false),
            limits: self.limits(s)?,
            workers: match s.workers {
                Some(0) => return Err(self.err("server.workers", "must be at least 1")),
                Some(n) => n.min(256) as usize,
                None => std::thread::available_parallelism().map_or(1, |n| n.get()),
            },
            outbound: self.outbound(s)?,
        })
    }

    fn outbound(&self, s: &RawServer) -> VResult<Option<OutboundProxy>> {
        let no_proxy = s
            .no_proxy
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, raw)| {
                let key = format!("server.no_proxy[{i}]");
                outbound::check_no_proxy_entry(&self.string(&key, raw)?)
                    .map_err(|p| self.err(&key, p))
            })
            .collect::<VResult<Vec<_>>>()?;
        let Some(raw) = &s.outbound_proxy else {
            if s.no_proxy.is_some() {
                return Err(self.err("server.no_proxy", "is set but server.outbound_proxy is not"));
            }
            return Ok(None);
        };
        let key = "server.outbound_proxy";
        let value = self.string(key, raw)?;
        if value.trim() == "env" {
            let resolved = OutboundProxy::from_env(self.env, no_proxy)
                .map_err(|p| self.err(key, format!("is \"env\", but the environment's {p}")))?;
            if resolved.is_none() {
                self.warnings.borrow_mut().push(
                    "server.outbound_proxy is \"env\" but none of HTTPS_PROXY, HTTP_PROXY, \
                     ALL_PROXY (or their lower-case forms) is set: connecting directly"
                        .to_owned(),
                );
            }
            return Ok(resolved);
        }
        let url = ProxyUrl::parse(&value, false).map_err(|p| self.err(key, p))?;
        Ok(Some(OutboundProxy {
            http: Some(url.clone()),
            https: Some(url),
            no_proxy,
            from_env: false,
        }))
    }

    fn limits(&self, s: &RawServer) -> VResult<Limits> {
        let d = Limits::default();
        let at_least = |key: &str, value: u64, min: u64| {
            if value < min {
                Err(self.err(key, format!("must be at least {min}")))
            } else {
                Ok(value)
            }
        };
        let limits = Limits {
            max_connections: at_least(
                "server.max_connections",
                u64::from(s.max_connections.unwrap_or(d.max_connections)),
                1,
            )? as u32,
            // hyper needs room for at least one small request in its read buffer.
            max_header_bytes: at_least(
                "server.max_header_bytes",
                self.parsed(
                    "server.max_header_bytes",
                    s.max_header_bytes.as_ref(),
                    d.max_header_bytes,
                    values::size,
                )?,
                8192,
            )?,
            max_headers: at_least(
                "server.max_headers",
                u64::from(s.max_headers.unwrap_or(d.max_headers)),
                8,
            )? as u32,
            max_uri_length: at_least(
                "server.max_uri_length",
                self.parsed(
                    "server.max_uri_length",
                    s.max_uri_length.as_ref(),
                    d.max_uri_length,
                    values::size,
                )?,
                256,
            )?,
            header_read_timeout: self.parsed(
                "server.header_read_timeout",
                s.header_read_timeout.as_ref(),
                d.header_read_timeout,
                values::duration,
            )?,
            max_concurrent_streams: at_least(
                "server.max_concurrent_streams",
                u64::from(s.max_concurrent_streams.unwrap_or(d.max_concurrent_streams)),
                1,
            )? as u32,
        };
        if limits.header_read_timeout.is_zero() {
            return Err(self.err("server.header_read_timeout", "must be more than zero"));
        }
        Ok(limits)
    }

    /// Resolves a path in the config relative to the config file's directory.
    pub(super) fn relative(&self, p: &str) -> PathBuf {
        let p = expand_home(p);
        if p.is_absolute() {
            p
        } else {
            self.path.parent().unwrap_or(Path::new(".")).join(p)
        }
    }

    fn provider(
        &self,
        name: &str,
        p: &RawProvider,
        server: &ServerConfig,
    ) -> VResult<ProviderConfig> {
        let key = |k: &str| format!("providers.{name}.{k}");
        let token_url_raw = p
            .token_url
            .as_ref()
            .ok_or_else(|| self.err(key("token_url"), "is required"))?;
        let token_url = self.url(&key("token_url"), token_url_raw)?;
        if token_url.scheme() == "http"
            && !is_loopback_host(&token_url)
            && !server.allow_insecure_token_url
        {
            return Err(self.err(
                key("token_url"),
                "is http:// to a non-loopback host, which would send the client secret in clear text; \
                 use https:// or set server.allow_insecure_token_url = true",
            ));
        }
        let client_id = self.string(
            &key("client_id"),
            p.client_id
                .as_ref()
                .ok_or_else(|| self.err(key("client_id"), "is required"))?,
        )?;
        let client_auth = self.client_auth(name, p)?;
        let credentials = self.credentials(name, p, client_auth, &token_url)?;
        let mut extra_params = Vec::new();
        for (k, v) in p.extra_params.iter().flatten() {
            let pkey = key(&format!("extra_params.{k}"));
            if matches!(
                k.as_str(),
                "grant_type"
                    | "client_id"
                    | "client_secret"
                    | "client_assertion"
                    | "client_assertion_type"
            ) {
                return Err(self.err(pkey, "is set by the proxy itself and cannot be overridden"));
            }
            extra_params.push((k.clone(), self.string(&pkey, v)?));
        }
        let request_format = match self
            .opt_string(&key("request_format"), p.request_format.as_ref())?
            .as_deref()
        {
            None | Some("form") => RequestFormat::Form,
            Some("json") => RequestFormat::Json,
            Some(other) => {
                return Err(self.err(
                    key("request_format"),
                    format!("`{other}` is not \"form\" or \"json\""),
                ))
            }
        };
        let field = |k: &str, raw: Option<&String>, default: &str| -> VResult<FieldPath> {
            let v = match raw {
                Some(r) => self.string(&key(k), r)?,
                None => default.to_owned(),
            };
            FieldPath::parse(&v).map_err(|p| self.err(key(k), p))
        };
        let header_raw = self
            .opt_string(&key("header"), p.header.as_ref())?
            .unwrap_or_else(|| "Authorization".to_owned());
        let header = HeaderName::from_bytes(header_raw.as_bytes()).map_err(|_| {
            self.err(
                key("header"),
                format!("`{header_raw}` is not a valid header name"),
            )
        })?;
        if is_hop_by_hop(&header) || header == http::header::HOST {
            return Err(self.err(key("header"), format!("`{header}` cannot carry a token")));
        }
        let header_prefix = self
            .opt_string(&key("header_prefix"), p.header_prefix.as_ref())?
            .unwrap_or_else(|| "Bearer ".to_owned());
        if HeaderValue::from_str(&header_prefix).is_err() {
            return Err(self.err(
                key("header_prefix"),
                "holds characters not allowed in a header",
            ));
        }
        let invalidate_on = match &p.invalidate_on {
            None => vec![StatusCode::UNAUTHORIZED],
            Some(list) => list
                .iter()
                .map(|&code| {
                    u16::try_from(code)
                        .ok()
                        .filter(|c| (400..=599).contains(c))
                        .and_then(|c| StatusCode::from_u16(c).ok())
                        .ok_or_else(|| {
                            self.err(
                                key("invalidate_on"),
                                format!("{code} is not an HTTP error status (400-599)"),
                            )
                        })
                })
                .collect::<VResult<_>>()?,
        };
        let refresh_before = self.parsed(
            &key("refresh_before"),
            p.refresh_before.as_ref(),
            RefreshBefore::Fraction(0.1),
            parse_refresh_before,
        )?;
        let default_lifetime = self.parsed(
            &key("default_lifetime"),
            p.default_lifetime.as_ref(),
            Duration::from_secs(300),
            values::duration,
        )?;
        if default_lifetime < Duration::from_secs(1) {
            return Err(self.err(key("default_lifetime"), "must be at least 1s"));
        }
        let keys = self.keys(name, p, &header)?;
        let provider = ProviderConfig {
            name: name.to_owned(),
            token_url,
            client_id,
            client_secret: credentials.secret,
            client_secret_command: credentials.command,
            assertion_key: credentials.assertion_key,
            client_identity: credentials.identity,
            audience: self.opt_string(&key("audience"), p.audience.as_ref())?,
            scope: self.opt_string(&key("scope"), p.scope.as_ref())?,
            extra_params,
            request_format,
            client_auth,
            token_field: field("token_field", p.token_field.as_ref(), "access_token")?,
            expires_in_field: field(
                "expires_in_field",
                p.expires_in_field.as_ref(),
                "expires_in",
            )?,
            expires_at_field: p
                .expires_at_field
                .as_ref()
                .map(|r| field("expires_at_field", Some(r), ""))
                .transpose()?,
            refresh_before,
            default_lifetime,
            header,
            header_prefix,
            invalidate_on,
            prefetch: p.prefetch.unwrap_or(true),
            keys,
            fingerprint_memo: Default::default(),
        };
        match (&provider.keys, provider.uses_key_placeholder()) {
            (Some(_), false) => Err(self.err(
                key("key_header"),
                "is set but no value holds {key}: put {key} in scope, audience or an extra_params value",
            )),
            (None, true) => Err(self.err(
                key("key_header"),
                "is required: a value holds {key}, which only a keyed provider can fill in",
            )),
            _ => Ok(provider),
        }
    }

    /// `key_header`, `key_pattern`, `max_keys` and `key_idle`.
    fn keys(
        &self,
        name: &str,
        p: &RawProvider,
        token_header: &HeaderName,
    ) -> VResult<Option<KeyConfig>> {
        let key = |k: &str| format!("providers.{name}.{k}");
        let Some(raw) = &p.key_header else {
            let stray = [
                ("key_pattern", p.key_pattern.is_some()),
                ("max_keys", p.max_keys.is_some()),
                ("key_idle", p.key_idle.is_some()),
            ];
            if let Some((k, _)) = stray.iter().find(|(_, set)| *set) {
                return Err(self.err(key(k), "only applies with key_header"));
            }
            return Ok(None);
        };
        let value = self.string(&key("key_header"), raw)?;
        let header = HeaderName::from_bytes(value.as_bytes()).map_err(|_| {
            self.err(
                key("key_header"),
                format!("`{value}` is not a valid header name"),
            )
        })?;
        if is_hop_by_hop(&header) || header == http::header::HOST || header == *token_header {
            return Err(self.err(
                key("key_header"),
                format!("`{header}` cannot select a token"),
            ));
        }
        let pattern_raw = self
            .opt_string(&key("key_pattern"), p.key_pattern.as_ref())?
            .unwrap_or_else(|| KeyPattern::DEFAULT.to_owned());
        let pattern = KeyPattern::new(&pattern_raw).map_err(|e| {
            self.err(
                key("key_pattern"),
                format!("is not a valid regular expression: {e}"),
            )
        })?;
        let max_keys = p.max_keys.unwrap_or(1000);
        if !(1..=1_000_000).contains(&max_keys) {
            return Err(self.err(key("max_keys"), "must be between 1 and 1000000"));
        }
        let idle = self.parsed(
            &key("key_idle"),
            p.key_idle.as_ref(),
            Duration::from_secs(15 * 60),
            values::duration,
        )?;
        if idle < Duration::from_secs(1) {
            return Err(self.err(key("key_idle"), "must be at least 1s"));
        }
        Ok(Some(KeyConfig {
            header,
            pattern,
            max_keys: usize::try_from(max_keys).unwrap_or(usize::MAX),
            idle,
        }))
    }

    fn client_auth(&self, name: &str, p: &RawProvider) -> VResult<ClientAuth> {
        let key = format!("providers.{name}.client_auth");
        Ok(match self.opt_string(&key, p.client_auth.as_ref())?.as_deref() {
            None | Some("body") => ClientAuth::Body,
            Some("basic") => ClientAuth::Basic,
            Some("private_key_jwt") => ClientAuth::PrivateKeyJwt,
            Some("tls_client_auth") => ClientAuth::TlsClientAuth,
            Some(other) => {
                return Err(self.err(
                    key,
                    format!(
                        "`{other}` is not \"body\", \"basic\", \"private_key_jwt\" or \"tls_client_auth\""
                    ),
                ))
            }
        })
    }

    /// The secret, key and certificate settings, checked against `client_auth`: the
    /// secret methods take exactly one secret source, the others none.
    fn credentials(
        &self,
        name: &str,
        p: &RawProvider,
        auth: ClientAuth,
        token_url: &Url,
    ) -> VResult<Credentials> {
        let key = |k: &str| format!("providers.{name}.{k}");
        let method = auth.as_str();
        let sources: Vec<&str> = [
            ("client_secret", p.client_secret.is_some()),
            ("client_secret_file", p.client_secret_file.is_some()),
            ("client_secret_command", p.client_secret_command.is_some()),
        ]
        .into_iter()
        .filter_map(|(k, set)| set.then_some(k))
        .collect();
        let mut out = Credentials {
            secret: SecretCell::default(),
            command: None,
            assertion_key: None,
            identity: None,
        };
        let only_with = |k: &str, set: bool, wanted: &[ClientAuth]| -> VResult<()> {
            if set && !wanted.contains(&auth) {
                let names: Vec<&str> = wanted.iter().map(|a| a.as_str()).collect();
                return Err(self.err(
                    key(k),
                    format!(
                        "is only used with client_auth = \"{}\" (this provider has \"{method}\")",
                        names.join("\" or \"")
                    ),
                ));
            }
            Ok(())
        };
        only_with(
            "client_key_file",
            p.client_key_file.is_some(),
            &[ClientAuth::PrivateKeyJwt, ClientAuth::TlsClientAuth],
        )?;
        only_with(
            "client_cert_file",
            p.client_cert_file.is_some(),
            &[ClientAuth::TlsClientAuth],
        )?;
        for (k, set) in [
            ("client_key_id", p.client_key_id.is_some()),
            (
                "client_assertion_audience",
                p.client_assertion_audience.is_some(),
            ),
            ("client_assertion_alg", p.client_assertion_alg.is_some()),
        ] {
            only_with(k, set, &[ClientAuth::PrivateKeyJwt])?;
        }
        if !auth.uses_secret() {
            if let Some(first) = sources.first() {
                return Err(self.err(
                    key(first),
                    format!("is not used with client_auth = \"{method}\", which sends no secret; remove it"),
                ));
            }
        } else {
            match sources.as_slice() {
                [] => {
                    return Err(self.err(
                        key("client_secret"),
                        "is required (or client_secret_file, or client_secret_command)",
                    ))
                }
                [_] => {}
                [first, second, ..] => {
                    return Err(self.err(
                        key(first),
                        format!("{first} and {second} are both set; keep exactly one"),
                    ))
                }
            }
        }
        if let Some(raw) = &p.client_secret {
            if !raw.contains("${") {
                self.inline_secrets.borrow_mut().push(name.to_owned());
            }
            let secret = Secret::new(self.string(&key("client_secret"), raw)?);
            if secret.is_empty() {
                return Err(self.err(key("client_secret"), "is empty"));
            }
            out.secret = SecretCell::new(secret);
        }
        if let Some(raw) = &p.client_secret_file {
            let k = key("client_secret_file");
            let file = self.relative(&self.string(&k, raw)?);
            let bytes = self.read_private(&k, &file)?;
            let text = std::str::from_utf8(&bytes)
                .map_err(|_| self.err(&k, format!("{} is not UTF-8 text", file.display())))?;
            let secret = Secret::new(text.trim_end_matches(['\r', '\n']));
            if secret.is_empty() {
                return Err(self.err(k, format!("{} is empty", file.display())));
            }
            out.secret = SecretCell::new(secret);
        }
        if let Some(raw) = &p.client_secret_command {
            let k = key("client_secret_command");
            let argv = raw
                .iter()
                .map(|a| self.string(&k, a))
                .collect::<VResult<Vec<_>>>()?;
            if argv.first().is_none_or(|program| program.trim().is_empty()) {
                return Err(self.err(
                    k,
                    "must name a program, as a list: [\"vault\", \"kv\", \"get\", \"-field=secret\", \"kv/app\"]",
                ));
            }
            out.command = Some(SecretCommand { argv, key: k });
        }
        let key_file = match &p.client_key_file {
            Some(raw) => {
                let k = key("client_key_file");
                let file = self.relative(&self.string(&k, raw)?);
                Some((file.clone(), self.read_private(&k, &file)?))
            }
            None if !auth.uses_secret() => {
                return Err(self.err(
                    key("client_key_file"),
                    format!("is required with client_auth = \"{method}\""),
                ))
            }
            None => None,
        };
        match (auth, key_file) {
            (ClientAuth::PrivateKeyJwt, Some((file, pem))) => {
                let alg = self
                    .opt_string(
                        &key("client_assertion_alg"),
                        p.client_assertion_alg.as_ref(),
                    )?
                    .map(|a| {
                        crate::client_auth::parse_alg(&a)
                            .map_err(|e| self.err(key("client_assertion_alg"), e))
                    })
                    .transpose()?;
                let audience = self
                    .opt_string(
                        &key("client_assertion_audience"),
                        p.client_assertion_audience.as_ref(),
                    )?
                    .unwrap_or_else(|| token_url.to_string());
                let key_id = self.opt_string(&key("client_key_id"), p.client_key_id.as_ref())?;
                out.assertion_key = Some(
                    AssertionKey::load(&file, pem, alg, key_id, audience).map_err(|e| {
                        let k = if e.starts_with("client_assertion_alg") {
                            "client_assertion_alg"
                        } else {
                            "client_key_file"
                        };
                        self.err(key(k), e)
                    })?,
                );
            }
            (ClientAuth::TlsClientAuth, Some((key_path, key_pem))) => {
                let k = key("client_cert_file");
                let raw = p.client_cert_file.as_ref().ok_or_else(|| {
                    self.err(&k, "is required with client_auth = \"tls_client_auth\"")
                })?;
                let cert_path = self.relative(&self.string(&k, raw)?);
                let cert_pem = read_secret_file(&cert_path).map_err(|e| {
                    self.err(&k, format!("cannot read {}: {e}", cert_path.display()))
                })?;
                if token_url.scheme() != "https" {
                    self.warnings.borrow_mut().push(format!(
                        "{}: client_auth = \"tls_client_auth\" with an http:// token_url sends no certificate",
                        key("token_url")
                    ));
                }
                out.identity = Some(
                    ClientIdentity::load(&cert_path, &cert_pem, &key_path, key_pem)
                        .map_err(|(k, e)| self.err(key(k), e))?,
                );
            }
            _ => {}
        }
        Ok(out)
    }

    /// Reads a secret or key file, warning when group or others may read it.
    fn read_private(&self, key: &str, file: &Path) -> VResult<zeroize::Zeroizing<Vec<u8>>> {
        use std::os::unix::fs::PermissionsExt;
        let bytes = read_secret_file(file)
            .map_err(|e| self.err(key, format!("cannot read {}: {e}", file.display())))?;
        if let Ok(meta) = std::fs::metadata(file) {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                self.warnings.borrow_mut().push(format!(
                    "{key}: {} is readable by group or others (mode {mode:o}); run `chmod 600 {}`",
                    file.display(),
                    file.display()
                ));
            }
        }
        Ok(bytes)
    }

    fn url(&self, key: &str, raw: &str) -> VResult<Url> {
        let value = self.string(key, raw)?;
        let url = Url::parse(&value)
            .map_err(|e| self.err(key, format!("`{value}` is not a valid URL ({e})")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(self.err(key, format!("`{value}` must be an http:// or https:// URL")));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(self.err(key, format!("`{value}` has no host")));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(self.err(key, "must not carry credentials in the URL"));
        }
        if url.fragment().is_some() {
            return Err(self.err(key, format!("`{value}` must not have a #fragment")));
        }
        Ok(url)
    }

    fn route(
        &self,
        i: usize,
        r: &RawRoute,
        server: &ServerConfig,
        providers: &BTreeMap<String, Arc<ProviderConfig>>,
    ) -> VResult<RouteConfig> {
        let key = |k: &str| format!("routes[{i}].{k}");
        let upstream_raw = r
            .upstream
            .as_ref()
            .ok_or_else(|| self.err(key("upstream"), "is required"))?;
        let url = self.url(&key("upstream"), upstream_raw)?;
        if url.query().is_some() {
            return Err(self.err(
                key("upstream"),
                "must not have a ?query (the request's query is appended)",
            ));
        }
        let upstream = upstream_parts(url).map_err(|p| self.err(key("upstream"), p))?;
        let listen = match &r.listen {
            Some(raw) => self.listen_addr(&key("listen"), raw, server.allow_non_loopback)?,
            None => server.listen.clone(),
        };
        let host = self
            .opt_string(&key("host"), r.host.as_ref())?
            .map(|h| {
                let h = h.trim().to_ascii_lowercase();
                if h.is_empty() || h.contains(['/', ':', ' ']) && !h.starts_with('[') {
                    Err(self.err(
                        key("host"),
                        format!("`{h}` is not a host name (give it without scheme or port)"),
                    ))
                } else {
                    Ok(h)
                }
            })
            .transpose()?;
        let prefix = self
            .opt_string(&key("path_prefix"), r.path_prefix.as_ref())?
            .unwrap_or_else(|| "/".to_owned());
        if !prefix.starts_with('/') || prefix.contains(['?', '#']) {
            return Err(self.err(
                key("path_prefix"),
                format!("`{prefix}` must start with / and hold no ? or #"),
            ));
        }
        let path_prefix = match prefix.trim_end_matches('/') {
            "" => "/".to_owned(),
            p => p.to_owned(),
        };
        let provider = match self.opt_string(&key("provider"), r.provider.as_ref())? {
            None => None,
            Some(name) if providers.contains_key(&name) => Some(name),
            Some(name) => {
                let known: Vec<&str> = providers.keys().map(String::as_str).collect();
                return Err(self.err(
                    key("provider"),
                    format!(
                        "no provider named `{name}` (defined: {})",
                        if known.is_empty() {
                            "none".to_owned()
                        } else {
                            known.join(", ")
                        }
                    ),
                ));
            }
        };
        let mut name = String::new();
        if listen != server.listen {
            name.push_str(&listen.to_string());
        }
        if let Some(h) = &host {
            name.push_str(h);
        }
        name.push_str(&path_prefix);
        Ok(RouteConfig {
            name,
            listen,
            host,
            path_prefix,
            strip_prefix: r.strip_prefix.unwrap_or(true),
            preserve_host: r.preserve_host.unwrap_or(false),
            pass_client_authorization: r.pass_client_authorization.unwrap_or(false),
            allow_encoded_slashes: r.allow_encoded_slashes.unwrap_or(false),
            upstream,
            provider,
        })
    }
}

/// A group name or number to its id.
fn group_id(value: &str) -> std::result::Result<u32, String> {
    if let Ok(gid) = value.parse::<u32>() {
        return Ok(gid);
    }
    match nix::unistd::Group::from_name(value) {
        Ok(Some(group)) => Ok(group.gid.as_raw()),
        Ok(None) => Err(format!("no group named `{value}` on this host")),
        Err(e) => Err(format!("cannot look up group `{value}`: {e}")),
    }
}

fn upstream_parts(url: Url) -> std::result::Result<Upstream, String> {
    let scheme: http::uri::Scheme = url
        .scheme()
        .parse()
        .map_err(|_| "has an unusable scheme".to_owned())?;
    let host = url.host_str().unwrap_or_default();
    let authority_str = match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_owned(),
    };
    let authority: http::uri::Authority = authority_str
        .parse()
        .map_err(|_| format!("`{authority_str}` is not a valid authority"))?;
    Ok(Upstream {
        base_path: url.path().trim_end_matches('/').to_owned(),
        scheme,
        authority,
        url,
    })
}

fn parse_refresh_before(value: &str) -> std::result::Result<RefreshBefore, String> {
    if let Some(pct) = value.trim().strip_suffix('%') {
        let pct: f64 = pct
            .trim()
            .parse()
            .map_err(|_| format!("`{value}` is not a percentage like \"10%\""))?;
        if !(0.0..=90.0).contains(&pct) {
            return Err(format!(
                "`{value}` must be between 0% and 90% of the lifetime"
            ));
        }
        return Ok(RefreshBefore::Fraction(pct / 100.0));
    }
    values::duration(value).map(RefreshBefore::Duration)
}

/// The parser's message with its line, column and key path, but without the quoted
/// source line the parser's own `Display` adds: that line may hold a literal client secret.
pub(super) fn syntax_message(text: &str, e: &toml::de::Error) -> String {
    // Without its input, the error displays as its message plus "in `key.path`".
    let mut bare = e.clone();
    bare.set_input(None);
    let message = bare.to_string().trim_end().replace('\n', " ");
    let Some(before) = e.span().and_then(|span| text.get(..span.start)) else {
        return message;
    };
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    format!("line {line}, column {column}: {message}")
}

fn parse_cidr(value: &str) -> std::result::Result<IpNet, String> {
    let value = value.trim();
    value
        .parse::<IpNet>()
        .or_else(|_| value.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| format!("`{value}` is not a CIDR like \"10.0.0.0/8\" or an IP address"))
}

fn is_loopback_host(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        None => false,
    }
}

/// The credential settings of one provider, validated.
struct Credentials {
    secret: SecretCell,
    command: Option<SecretCommand>,
    assertion_key: Option<AssertionKey>,
    identity: Option<ClientIdentity>,
}

/// Reads a secret or key file: a regular file of at most 64 KiB (a device or FIFO
/// named by mistake must not hang or exhaust the proxy).
pub(super) fn read_secret_file(path: &Path) -> std::io::Result<zeroize::Zeroizing<Vec<u8>>> {
    read_small_file(path, 64 * 1024)
}

/// Reads a regular file of at most `limit` bytes into a buffer that is zeroized when
/// dropped (and sized up front, so no reallocation leaves a copy behind).
pub(super) fn read_small_file(
    path: &Path,
    limit: u64,
) -> std::io::Result<zeroize::Zeroizing<Vec<u8>>> {
    use std::io::Read;
    let file = std::fs::File::open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    if meta.len() > limit {
        let shown = if limit.is_multiple_of(1 << 20) {
            format!("{} MiB", limit >> 20)
        } else {
            format!("{} KiB", limit >> 10)
        };
        return Err(std::io::Error::other(format!("larger than {shown}")));
    }
    let mut bytes = zeroize::Zeroizing::new(Vec::with_capacity(meta.len() as usize + 1));
    file.take(limit).read_to_end(&mut bytes)?;
    Ok(bytes)
}
