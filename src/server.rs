//! Listeners and their lifecycle: bind, accept, serve HTTP/1.1 and h2c, drain on shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use ipnet::IpNet;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::provider::TokenClient;
use crate::proxy::client::upstream_client;
use crate::proxy::error::ProxyError;
use crate::proxy::{Proxy, RoutingTable};
use crate::tls::{self, TlsError};
use crate::token::cache::{CacheError, TokenCache};
use crate::token::TokenStore;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot build the token-endpoint client: {0}")]
    TokenClient(#[from] reqwest::Error),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("startup task failed: {0}")]
    Internal(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Everything a running proxy shares: the store, the routes, the clients.
pub struct Shared {
    pub config: Config,
    pub store: Arc<TokenStore>,
    pub proxy: Arc<Proxy>,
}

impl Shared {
    /// Builds the TLS settings, clients, token store and routing table for `config`.
    /// Reads files (CA bundle, token cache): run it off the async runtime.
    pub fn build(config: Config) -> Result<Self, StartError> {
        let tls = tls::client_config(config.server.extra_ca_file.as_deref())?;
        let token_client = TokenClient::new(tls.clone(), config.server.connect_timeout)?;
        let cache = config
            .server
            .token_cache_dir
            .as_deref()
            .map(TokenCache::open)
            .transpose()?;
        let store = Arc::new(TokenStore::new(&config, token_client, cache));
        store.load_cache();
        let table = RoutingTable::new(&config, &store);
        let client = upstream_client(tls, config.server.connect_timeout);
        let proxy = Arc::new(Proxy::new(&config, table, client));
        Ok(Self {
            config,
            store,
            proxy,
        })
    }
}

/// A bound, not yet serving proxy.
pub struct Server {
    shared: Shared,
    /// (configured address, bound listener)
    listeners: Vec<(SocketAddr, TcpListener)>,
}

impl Server {
    /// Builds everything and binds every listener; fails before serving anything.
    pub async fn bind(config: Config) -> Result<Self, StartError> {
        let shared = tokio::task::spawn_blocking(move || Shared::build(config))
            .await
            .map_err(|e| StartError::Internal(e.to_string()))??;
        let mut listeners = Vec::new();
        for addr in shared.config.listen_addrs() {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind { addr, source })?;
            listeners.push((addr, listener));
        }
        Ok(Self { shared, listeners })
    }

    /// The bound address of the listener configured as `configured` (port 0 resolved).
    pub fn local_addr(&self, configured: SocketAddr) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|(c, _)| *c == configured)
            .and_then(|(_, l)| l.local_addr().ok())
    }

    /// The token store, for callers that inspect it (tests, admin).
    pub fn store(&self) -> &Arc<TokenStore> {
        &self.shared.store
    }

    /// Serves until `shutdown` completes, then drains connections for at most
    /// `shutdown_grace` and stops the token refreshers.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let stop = CancellationToken::new();
        let store_cancel = CancellationToken::new();
        self.shared.store.start(&store_cancel);
        let grace = self.shared.config.server.shutdown_grace;
        let allowed: Arc<[IpNet]> = self.shared.config.server.allowed_clients.clone().into();
        let mut tasks = Vec::new();
        for (configured, listener) in self.listeners {
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(%addr, "listening");
            }
            tasks.push(tokio::spawn(accept_loop(
                listener,
                configured,
                self.shared.proxy.clone(),
                allowed.clone(),
                stop.clone(),
                grace,
            )));
        }
        shutdown.await;
        tracing::info!(grace_s = grace.as_secs_f64(), "shutting down");
        stop.cancel();
        for task in tasks {
            let _ = task.await;
        }
        store_cancel.cancel();
    }
}

fn connection_builder() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30));
    builder.http2().timer(TokioTimer::new());
    builder
}

async fn accept_loop(
    listener: TcpListener,
    configured: SocketAddr,
    proxy: Arc<Proxy>,
    allowed: Arc<[IpNet]>,
    stop: CancellationToken,
    grace: Duration,
) {
    let builder = connection_builder();
    let graceful = GracefulShutdown::new();
    loop {
        let (stream, peer) = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let io = TokioIo::new(stream);
        let peer_ip = peer.ip().to_canonical();
        if !allowed.iter().any(|net| net.contains(&peer_ip)) {
            tracing::warn!(%peer, "client not in server.allowed_clients");
            let svc = service_fn(|_req| async {
                Ok::<_, std::convert::Infallible>(
                    ProxyError::ForbiddenClient.to_response(None, None),
                )
            });
            let conn = builder.serve_connection(io, svc).into_owned();
            tokio::spawn(graceful.watch(conn));
            continue;
        }
        let proxy = proxy.clone();
        let svc = service_fn(move |req| {
            let proxy = proxy.clone();
            async move { proxy.handle(configured, req).await }
        });
        let conn = graceful.watch(builder.serve_connection(io, svc).into_owned());
        tokio::spawn(async move {
            if let Err(error) = conn.await {
                tracing::debug!(%peer, error = %error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("shutdown grace period over; closing remaining connections");
    }
}
