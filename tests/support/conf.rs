//! A typed builder for test configs: tests pick sections and keys by method and the
//! builder renders TOML (quoting and escaping by the `toml` crate), so no test edits
//! config text by string replacement. Tests about the config text itself stay text.

use std::path::Path;

use bearer_proxy::config::Config;
use toml::{Table, Value};

use super::{Issuer, Upstream};

/// Declares one setter a key: `name: kind`, where the kind says how the value is written.
macro_rules! keys {
    ($($name:ident: $kind:ident),* $(,)?) => {
        $( keys!(@one $name $kind); )*
    };
    (@one $name:ident text) => {
        pub fn $name(self, value: impl Into<String>) -> Self {
            self.set(stringify!($name), Value::String(value.into()))
        }
    };
    (@one $name:ident flag) => {
        pub fn $name(self, value: bool) -> Self {
            self.set(stringify!($name), Value::Boolean(value))
        }
    };
    (@one $name:ident number) => {
        pub fn $name(self, value: i64) -> Self {
            self.set(stringify!($name), Value::Integer(value))
        }
    };
    (@one $name:ident texts) => {
        pub fn $name<S: Into<String>>(self, values: impl IntoIterator<Item = S>) -> Self {
            let list = values.into_iter().map(|v| Value::String(v.into())).collect();
            self.set(stringify!($name), Value::Array(list))
        }
    };
    (@one $name:ident numbers) => {
        pub fn $name(self, values: impl IntoIterator<Item = i64>) -> Self {
            let list = values.into_iter().map(Value::Integer).collect();
            self.set(stringify!($name), Value::Array(list))
        }
    };
}

/// Shared by every section: a table of keys, and a raw setter for keys that have no
/// method (such as ones a test checks are refused).
macro_rules! section {
    ($ty:ident) => {
        #[derive(Clone, Debug, Default)]
        pub struct $ty(Table);

        impl $ty {
            /// Sets `key` to `value`, whatever the key.
            pub fn set(mut self, key: &str, value: impl Into<Value>) -> Self {
                self.0.insert(key.to_owned(), value.into());
                self
            }

            /// Removes `key`, so the parser's default applies.
            pub fn unset(mut self, key: &str) -> Self {
                self.0.remove(key);
                self
            }

            pub fn table(&self) -> &Table {
                &self.0
            }
        }

        /// The section's keys as TOML, for assertion messages.
        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&toml::to_string(&self.0).map_err(|_| std::fmt::Error)?)
            }
        }
    };
}

section!(ServerSection);
section!(ProviderSection);
section!(RouteSection);
section!(StoreSection);

impl ServerSection {
    keys! {
        listen: text, admin_listen: text, unix_socket_mode: text, unix_socket_group: text,
        allowed_uids: numbers, allow_non_loopback: flag, allowed_clients: texts,
        token_cache_dir: text, connect_timeout: text, upstream_timeout: text,
        token_timeout: text, token_wait: text, max_replay_body: text, shutdown_grace: text,
        extra_ca_file: text, allow_insecure_token_url: flag, max_connections: number,
        max_header_bytes: text, max_headers: number, max_uri_length: text,
        header_read_timeout: text, max_concurrent_streams: number, workers: number,
        outbound_proxy: text, no_proxy: texts,
    }

    /// An admin listener on a free loopback port.
    pub fn admin(self) -> Self {
        self.admin_listen("127.0.0.1:0")
    }
}

impl ProviderSection {
    keys! {
        token_url: text, client_id: text, client_secret: text, client_secret_file: text,
        client_secret_command: texts, client_key_file: text, client_cert_file: text,
        client_key_id: text, client_assertion_audience: text, client_assertion_alg: text,
        audience: text, scope: text, request_format: text, client_auth: text,
        token_field: text, expires_in_field: text, expires_at_field: text,
        refresh_before: text, default_lifetime: text, header: text, header_prefix: text,
        invalidate_on: numbers, prefetch: flag, key_header: text, key_pattern: text,
        max_keys: number, key_idle: text,
    }

    /// A provider fetching from `token_url` as `client_id` / `client_secret`.
    pub fn new(token_url: &str, client_id: &str, client_secret: &str) -> Self {
        Self::default()
            .token_url(token_url)
            .client_id(client_id)
            .client_secret(client_secret)
    }

    /// `extra_params`, as an inline table.
    pub fn extra_params<'a>(self, params: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        let table: Table = params
            .into_iter()
            .map(|(k, v)| (k.to_owned(), Value::String(v.to_owned())))
            .collect();
        self.set("extra_params", Value::Table(table))
    }

    /// Loyalife's token shape: JSON request, token and expiry under `results`.
    pub fn loyalife(self) -> Self {
        self.request_format("json")
            .token_field("results.token")
            .expires_at_field("results.tokenExpiresOn")
    }
}

impl RouteSection {
    keys! {
        upstream: text, provider: text, listen: text, host: text, path_prefix: text,
        strip_prefix: flag, preserve_host: flag, pass_client_authorization: flag,
        allow_encoded_slashes: flag,
    }

    /// A route to `upstream` (a URL) that injects `provider`'s token.
    pub fn to(upstream: &str, provider: &str) -> Self {
        Self::default().upstream(upstream).provider(provider)
    }

    /// A route to `upstream` without a provider.
    pub fn open(upstream: &str) -> Self {
        Self::default().upstream(upstream)
    }
}

impl StoreSection {
    keys! {
        backend: text, redis_url: text, key_prefix: text, redis_ca_file: text,
        redis_client_cert_file: text, redis_client_key_file: text,
        redis_sentinels: texts, redis_sentinel_master: text,
    }

    /// A Redis store at `url`.
    pub fn redis(url: &str) -> Self {
        Self::default().backend("redis").redis_url(url)
    }
}

/// A whole config: `[server]`, `[providers.*]` in the order added, `[[routes]]`,
/// and an optional `[store]`.
#[derive(Clone, Debug)]
pub struct TestConfig {
    pub server: ServerSection,
    pub providers: Vec<(String, ProviderSection)>,
    pub routes: Vec<RouteSection>,
    pub store: Option<StoreSection>,
}

impl Default for TestConfig {
    /// A listener on a free loopback port and nothing else.
    fn default() -> Self {
        Self {
            server: ServerSection::default().listen("127.0.0.1:0"),
            providers: Vec::new(),
            routes: Vec::new(),
            store: None,
        }
    }
}

impl TestConfig {
    /// One provider `p` at `issuer` (`test-client` / `test-secret-value`), a catch-all
    /// route to `upstream`, and `token_wait = "2s"`.
    pub fn basic(issuer: &Issuer, upstream: &Upstream) -> Self {
        Self::default()
            .server(|s| s.token_wait("2s"))
            .with_provider(
                "p",
                ProviderSection::new(&issuer.url(), "test-client", "test-secret-value"),
            )
            .route(RouteSection::to(&upstream.url(), "p"))
    }

    /// Edits `[server]`.
    pub fn server(mut self, edit: impl FnOnce(ServerSection) -> ServerSection) -> Self {
        self.server = edit(self.server);
        self
    }

    /// Adds (or replaces) provider `name`.
    pub fn with_provider(mut self, name: &str, provider: ProviderSection) -> Self {
        match self.providers.iter_mut().find(|(n, _)| n == name) {
            Some((_, p)) => *p = provider,
            None => self.providers.push((name.to_owned(), provider)),
        }
        self
    }

    /// Edits provider `name`, which must exist.
    pub fn provider(
        mut self,
        name: &str,
        edit: impl FnOnce(ProviderSection) -> ProviderSection,
    ) -> Self {
        let (_, p) = self
            .providers
            .iter_mut()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no provider {name} in this test config"));
        *p = edit(std::mem::take(p));
        self
    }

    /// Edits provider `p`, the one `basic` makes.
    pub fn p(self, edit: impl FnOnce(ProviderSection) -> ProviderSection) -> Self {
        self.provider("p", edit)
    }

    /// Appends a route (routes keep their order: first match wins among equals).
    pub fn route(mut self, route: RouteSection) -> Self {
        self.routes.push(route);
        self
    }

    /// Drops every route, to lay out others.
    pub fn without_routes(mut self) -> Self {
        self.routes.clear();
        self
    }

    /// Edits route `index` (0 is the first).
    pub fn edit_route(
        mut self,
        index: usize,
        edit: impl FnOnce(RouteSection) -> RouteSection,
    ) -> Self {
        let route = &mut self.routes[index];
        *route = edit(std::mem::take(route));
        self
    }

    /// Sets `[store]`.
    pub fn store(mut self, store: StoreSection) -> Self {
        self.store = Some(store);
        self
    }

    /// The TOML text.
    pub fn render(&self) -> String {
        let mut root = Table::new();
        root.insert("server".into(), Value::Table(self.server.table().clone()));
        if let Some(store) = &self.store {
            root.insert("store".into(), Value::Table(store.table().clone()));
        }
        if !self.providers.is_empty() {
            let providers: Table = self
                .providers
                .iter()
                .map(|(name, p)| (name.clone(), Value::Table(p.table().clone())))
                .collect();
            root.insert("providers".into(), Value::Table(providers));
        }
        if !self.routes.is_empty() {
            let routes = self
                .routes
                .iter()
                .map(|r| Value::Table(r.table().clone()))
                .collect();
            root.insert("routes".into(), Value::Array(routes));
        }
        toml::to_string(&root).expect("a test config renders as TOML")
    }

    /// Parsed as the proxy parses a file (no environment variables).
    pub fn parse(&self) -> Config {
        let text = self.render();
        Config::parse(&text, Path::new("test.toml"), &|_| None)
            .unwrap_or_else(|e| panic!("test config refused: {e:#}\n{text}"))
    }
}

impl std::fmt::Display for TestConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.render())
    }
}
