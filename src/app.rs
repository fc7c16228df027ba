//! The running proxy's shared state: the configuration in force, the token store, the
//! routing table, the upstream client factory and the metrics, built once from a
//! config and changed only by [`App::reload`].
//!
//! The listeners ([`crate::server`]) serve what this holds; the admin listener gets
//! only the narrow handles it answers from (see [`crate::admin::AdminState`]).

use std::sync::{Arc, Mutex, PoisonError};

use crate::client_auth::CommandError;
use crate::config::{self, Config, ConfigError, Limits};
use crate::metrics::Metrics;
use crate::preflight::{self, PreflightError, Prepared};
use crate::provider::TokenClient;
use crate::proxy::client::ClientFactory;
use crate::proxy::{Proxy, RoutingTable};
use crate::token::fleet::FleetError;
use crate::token::{ProviderChanges, TokenStore};

/// Why the shared state could not be built from a config.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Preflight(#[from] PreflightError),
    #[error("cannot build the token-endpoint client")]
    TokenClient(#[from] reqwest::Error),
    #[error("[store]: {0}")]
    Fleet(#[from] FleetError),
}

/// Why a reload was refused; the running config stays in force.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The file does not read or validate.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A `client_secret_command` failed when run again.
    #[error(transparent)]
    SecretCommand(#[from] CommandError),
    /// A file the new config names cannot be used (the checks `run` starts with).
    #[error(transparent)]
    Preflight(#[from] PreflightError),
    /// The blocking part of the reload panicked or was cancelled.
    #[error("reload task failed")]
    Task(#[from] tokio::task::JoinError),
}

/// What a successful reload changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadReport {
    pub providers: ProviderChanges,
    pub routes: usize,
    /// Listener addresses that differ from the running ones: they need a restart.
    pub listener_changes: Vec<String>,
}

/// Everything a running proxy shares: the store, the routes, the clients, metrics.
pub struct App {
    /// The configuration in force (replaced by a successful reload).
    config: Mutex<Config>,
    pub store: Arc<TokenStore>,
    pub proxy: Arc<Proxy>,
    pub metrics: Arc<Metrics>,
    /// For each worker's own upstream clients, and `preserve_host` routes' pinned ones.
    pub(crate) clients: ClientFactory,
    /// Serializes reloads (SIGHUP and `POST /reload` may race).
    reloading: tokio::sync::Mutex<()>,
}

/// A handle that can reload the app and do nothing else: what the admin listener's
/// `POST /reload` and the SIGHUP handler hold.
#[derive(Clone)]
pub struct ReloadHandle(Arc<App>);

impl ReloadHandle {
    /// See [`App::reload`].
    pub async fn reload(&self) -> Result<ReloadReport, ReloadError> {
        self.0.reload().await
    }
}

impl App {
    /// Builds the TLS settings, clients, token store and routing table for `config`.
    /// Reads files (CA bundle, token cache): run it off the async runtime.
    pub fn build(config: Config) -> Result<Self, BuildError> {
        let Prepared { tls, cache } = preflight::run(&config)?;
        let token_client = TokenClient::new(
            tls.clone(),
            config.server.connect_timeout,
            config.server.outbound.as_ref(),
        )?;
        let metrics = Arc::new(Metrics::new());
        let store = Arc::new(TokenStore::new(
            &config,
            token_client,
            cache,
            metrics.clone(),
        )?);
        store.load_cache();
        let outbound = config
            .server
            .outbound
            .as_ref()
            .map(|o| Arc::new(o.matcher()));
        let clients = ClientFactory::new(tls, config.server.connect_timeout, outbound);
        let table = RoutingTable::new(&config, &store, &metrics, &clients);
        let proxy = Arc::new(Proxy::new(table, metrics.clone()));
        Ok(Self {
            config: Mutex::new(config),
            store,
            proxy,
            metrics,
            clients,
            reloading: tokio::sync::Mutex::new(()),
        })
    }

    /// A copy of the configuration in force.
    pub fn config(&self) -> Config {
        self.config
            .lock()
            .map(|c| c.clone())
            .unwrap_or_else(|poisoned| poisoned.into_inner().clone())
    }

    /// Re-reads the config file. When it validates, providers and routes are swapped
    /// atomically (unchanged providers keep their token); otherwise nothing changes and
    /// the error is returned. Listener changes are reported, not applied.
    pub async fn reload(self: &Arc<Self>) -> Result<ReloadReport, ReloadError> {
        let _serial = self.reloading.lock().await;
        let result = self.reload_inner().await;
        match &result {
            Ok(report) => {
                tracing::info!(
                    kept = ?report.providers.kept,
                    started = ?report.providers.started,
                    stopped = ?report.providers.stopped,
                    routes = report.routes,
                    "config reloaded"
                );
                for change in &report.listener_changes {
                    tracing::warn!(
                        change = %change,
                        "this change needs a restart to take effect; the running listeners and clients are unchanged"
                    );
                }
            }
            Err(error) => {
                let error = crate::error::chain(error);
                tracing::error!(%error, "config reload failed; the running config stays")
            }
        }
        result
    }

    /// A handle that reloads this app, for the admin listener and SIGHUP.
    pub fn reload_handle(self: &Arc<Self>) -> ReloadHandle {
        ReloadHandle(self.clone())
    }

    async fn reload_inner(self: &Arc<Self>) -> Result<ReloadReport, ReloadError> {
        let old = self.config();
        let path = old.source.clone();
        let new = tokio::task::spawn_blocking(move || config::load(&path)).await??;
        for warning in &new.warnings {
            tracing::warn!("{warning}");
        }
        // A secret command runs again: a rotated secret is picked up by a reload.
        config::resolve_secrets(&new).await?;
        let this = self.clone();
        tokio::task::spawn_blocking(move || -> Result<ReloadReport, ReloadError> {
            let mut new = new;
            // The same checks as at startup, so a reload never adopts a config that
            // would not start; what they build is used only after a restart.
            preflight::run(&new)?;
            new.tuning = old.tuning.clone();
            let mut listener_changes = Vec::new();
            if new.listen_addrs() != old.listen_addrs() {
                listener_changes.push(format!(
                    "listeners {:?} -> {:?}",
                    old.listen_addrs(),
                    new.listen_addrs()
                ));
            }
            if new.server.admin_listen != old.server.admin_listen {
                listener_changes.push(format!(
                    "admin_listen {:?} -> {:?}",
                    old.server.admin_listen, new.server.admin_listen
                ));
            }
            for (key, changed) in [
                (
                    "token_cache_dir",
                    new.server.token_cache_dir != old.server.token_cache_dir,
                ),
                (
                    "extra_ca_file",
                    new.server.extra_ca_file != old.server.extra_ca_file,
                ),
                (
                    "connect_timeout",
                    new.server.connect_timeout != old.server.connect_timeout,
                ),
                // The socket files were created with them; allowed_uids reloads.
                (
                    "unix_socket_mode/unix_socket_group",
                    new.server.unix_socket.mode != old.server.unix_socket.mode
                        || new.server.unix_socket.group != old.server.unix_socket.group,
                ),
                // Both clients are built with it, and pooled connections were opened
                // through (or around) the old proxy.
                (
                    "outbound_proxy/no_proxy",
                    new.server.outbound != old.server.outbound,
                ),
                // The Redis link (node or Sentinels, TLS files) is built once at start.
                ("[store]", new.store != old.store),
                // The worker threads, the connection cap and the connection builders
                // are made once at start; max_uri_length is checked per request and
                // reloads.
                ("workers", new.server.workers != old.server.workers),
                (
                    "shutdown_grace",
                    new.server.shutdown_grace != old.server.shutdown_grace,
                ),
                (
                    "max_connections/max_header_bytes/max_headers/header_read_timeout/max_concurrent_streams",
                    Limits {
                        max_uri_length: old.server.limits.max_uri_length,
                        ..new.server.limits.clone()
                    } != old.server.limits,
                ),
            ] {
                if changed {
                    listener_changes.push(format!("{key} changed"));
                }
            }
            let providers = this.store.apply(&new);
            this.proxy.swap_table(RoutingTable::new(
                &new,
                &this.store,
                &this.metrics,
                &this.clients,
            ));
            let routes = new.routes.len();
            // Routes and providers are already swapped: the config must follow them
            // even past a poisoned lock.
            *this.config.lock().unwrap_or_else(PoisonError::into_inner) = new;
            Ok(ReloadReport {
                providers,
                routes,
                listener_changes,
            })
        })
        .await?
    }
}
