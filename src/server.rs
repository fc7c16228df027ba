//! Listeners and their lifecycle: bind, accept, serve HTTP/1.1 and h2c on worker
//! threads, hand SIGHUP to the app's reload, drain on shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{self, AdminState};
use crate::app::{App, BuildError, ReloadHandle};
use crate::config::{self, Config, Limits, ListenAddr};
use crate::conn::{self, ReadReady};
use crate::error::BoxError;
use crate::listener::{Accept, Peer, UnixBindError, UnixSocket};
use crate::proxy::admission::Refused;
use crate::proxy::upgrade::{ConnPermit, Tunnels};
use crate::proxy::{Forwarder, Proxy};
use crate::token::TokenStore;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    App(#[from] BuildError),
    #[error(transparent)]
    SecretCommand(#[from] crate::client_auth::CommandError),
    #[error("startup task failed")]
    Internal(#[from] tokio::task::JoinError),
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Unix(#[from] UnixBindError),
}

/// A bound, not yet serving proxy.
pub struct Server {
    app: Arc<App>,
    /// Per configured address, one socket per worker (SO_REUSEPORT: the kernel spreads
    /// connections over the workers).
    listeners: Vec<(SocketAddr, Vec<std::net::TcpListener>)>,
    /// Unix socket listeners: one socket each, served by one accept loop on the
    /// caller's runtime (a Unix socket cannot be shared with SO_REUSEPORT).
    unix: Vec<(ListenAddr, UnixSocket)>,
    admin: Option<AdminListener>,
}

enum AdminListener {
    Tcp(TcpListener),
    Unix(UnixSocket),
}

impl Server {
    /// Builds everything and binds every listener; fails before serving anything.
    pub async fn bind(config: Config) -> Result<Self, StartError> {
        config::resolve_secrets(&config).await?;
        let app = tokio::task::spawn_blocking(move || App::build(config)).await??;
        let config = app.config();
        let mut listeners = Vec::new();
        let mut unix = Vec::new();
        for addr in config.listen_addrs() {
            match &addr {
                ListenAddr::Tcp(tcp) => {
                    listeners.push((*tcp, bind_shared(*tcp, config.server.workers)?))
                }
                ListenAddr::Unix(path) => {
                    let socket = bind_unix(path.clone(), &config).await?;
                    unix.push((addr, socket));
                }
            }
        }
        let admin = match &config.server.admin_listen {
            Some(ListenAddr::Tcp(addr)) => Some(AdminListener::Tcp(bind(*addr).await?)),
            Some(ListenAddr::Unix(path)) => {
                Some(AdminListener::Unix(bind_unix(path.clone(), &config).await?))
            }
            None => None,
        };
        Ok(Self {
            app: Arc::new(app),
            listeners,
            unix,
            admin,
        })
    }

    /// The bound address of the listener configured as `configured` (port 0 resolved).
    pub fn local_addr(&self, configured: SocketAddr) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|(c, _)| *c == configured)
            .and_then(|(_, l)| l.first()?.local_addr().ok())
    }

    /// The bound admin address, when `admin_listen` is a TCP address.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        match &self.admin {
            Some(AdminListener::Tcp(l)) => l.local_addr().ok(),
            _ => None,
        }
    }

    /// The token store, for callers that inspect it (tests).
    pub fn store(&self) -> &Arc<TokenStore> {
        &self.app.store
    }

    /// The shared state (reload, metrics).
    pub fn app(&self) -> &Arc<App> {
        &self.app
    }

    /// Serves until `shutdown` completes, then drains connections for at most
    /// `shutdown_grace` and stops the token refreshers. SIGHUP reloads the config.
    ///
    /// The proxy listeners are served by `workers` threads, each running its own
    /// single-threaded event loop with its own upstream pool: a request and the
    /// upstream connection it uses stay on one thread (no cross-thread wake-ups, no
    /// shared pool lock). Token refresh, the admin listener, Unix socket listeners
    /// and signals run on the caller's runtime.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let stop = CancellationToken::new();
        self.app.store.start();
        let config = self.app.config();
        let grace = config.server.shutdown_grace;
        let limits = config.server.limits.clone();
        let permits = Arc::new(Semaphore::new(limits.max_connections as usize));
        let refusals = Arc::new(RefusalLog::new());
        let workers = config.server.workers;
        // Transpose: worker w gets socket w of every listener.
        let mut per_worker: Vec<Vec<(SocketAddr, std::net::TcpListener)>> =
            (0..workers).map(|_| Vec::new()).collect();
        for (configured, sockets) in self.listeners {
            // Once per listener, not once per worker socket.
            if let Some(addr) = sockets.first().and_then(|s| s.local_addr().ok()) {
                tracing::info!(%addr, kind = "proxy", workers, "listening");
            }
            for (w, socket) in sockets.into_iter().enumerate() {
                if let Some(slot) = per_worker.get_mut(w) {
                    slot.push((configured, socket));
                }
            }
        }
        let mut threads = Vec::new();
        for (w, sockets) in per_worker.into_iter().enumerate() {
            let forwarder = Arc::new(self.app.proxy.forwarder(
                self.app.clients.clients(),
                Tunnels::new(stop.clone(), grace),
            ));
            let settings = ListenerSettings {
                limits: limits.clone(),
                permits: permits.clone(),
                grace,
                refusals: refusals.clone(),
            };
            let stop = stop.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("bearer-proxy-w{w}"))
                .spawn(move || serve_worker(sockets, forwarder, settings, stop));
            match spawned {
                Ok(handle) => threads.push(handle),
                Err(error) => tracing::error!(%error, "cannot start a worker thread"),
            }
        }
        let mut tasks = Vec::new();
        // The Unix socket listeners share one forwarder on this runtime, made for the
        // first of them.
        let mut unix_forwarder: Option<Arc<Forwarder>> = None;
        for (configured, socket) in self.unix {
            let path = socket.path().to_owned();
            let listener = match socket.into_listener() {
                Ok(listener) => listener,
                Err(error) => {
                    tracing::error!(path = %path.display(), %error, "cannot serve a Unix socket");
                    continue;
                }
            };
            tracing::info!(addr = %configured, kind = "proxy", "listening");
            let settings = ListenerSettings {
                limits: limits.clone(),
                permits: permits.clone(),
                grace,
                refusals: refusals.clone(),
            };
            let forwarder = unix_forwarder
                .get_or_insert_with(|| {
                    let clients = self.app.clients.clients();
                    // Its tunnels close `grace` after shutdown, as the workers' do.
                    Arc::new(
                        self.app
                            .proxy
                            .forwarder(clients, Tunnels::new(stop.clone(), grace)),
                    )
                })
                .clone();
            let proxy = forwarder.proxy().clone();
            let configured = Arc::new(configured);
            let handler = move |req| {
                let forwarder = forwarder.clone();
                let configured = configured.clone();
                // Boxed for the same reason as the workers' handler.
                Box::pin(async move { forwarder.handle(&configured, req).await })
            };
            tasks.push(tokio::spawn(accept_loop(
                settings,
                listener,
                proxy,
                handler,
                stop.clone(),
            )));
        }
        if let Some(admin) = self.admin {
            let state = AdminState {
                store: self.app.store.clone(),
                metrics: self.app.metrics.clone(),
                reload: self.app.reload_handle(),
            };
            // Boxed: a parked connection is taken apart, so its service's future must move.
            let handler = move |req| Box::pin(admin::handle(state.clone(), req));
            // The admin listener has its own small cap, so a saturated proxy stays observable.
            let settings = ListenerSettings {
                limits: limits.clone(),
                permits: Arc::new(Semaphore::new(64)),
                grace,
                refusals: refusals.clone(),
            };
            let proxy = self.app.proxy.clone();
            match admin {
                AdminListener::Tcp(listener) => {
                    if let Ok(addr) = listener.local_addr() {
                        tracing::info!(%addr, kind = "admin", "listening");
                    }
                    tasks.push(tokio::spawn(accept_loop(
                        settings,
                        listener,
                        proxy,
                        handler,
                        stop.clone(),
                    )));
                }
                AdminListener::Unix(socket) => {
                    let path = socket.path().to_owned();
                    match socket.into_listener() {
                        Ok(listener) => {
                            tracing::info!(addr = %format!("unix:{}", path.display()), kind = "admin", "listening");
                            tasks.push(tokio::spawn(accept_loop(
                                settings,
                                listener,
                                proxy,
                                handler,
                                stop.clone(),
                            )));
                        }
                        Err(error) => {
                            tracing::error!(path = %path.display(), %error, "cannot serve a Unix socket")
                        }
                    }
                }
            }
        }
        let hup = tokio::spawn(reload_on_sighup(self.app.reload_handle(), stop.clone()));
        let trim = tokio::spawn(crate::memory::give_back_when_quiet(stop.clone()));
        shutdown.await;
        tracing::info!(grace_s = grace.as_secs_f64(), "shutting down");
        stop.cancel();
        for task in tasks {
            let _ = task.await;
        }
        if let Some(forwarder) = unix_forwarder {
            forwarder.tunnels().wait().await;
        }
        let _ = tokio::task::spawn_blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
        })
        .await;
        let _ = hup.await;
        let _ = trim.await;
        self.app.store.stop();
    }
}

/// One worker thread: a single-threaded runtime serving its share of every listener.
fn serve_worker(
    sockets: Vec<(SocketAddr, std::net::TcpListener)>,
    forwarder: Arc<Forwarder>,
    settings: ListenerSettings,
    stop: CancellationToken,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(%error, "cannot start a worker runtime");
            return;
        }
    };
    runtime.block_on(async move {
        tokio::spawn(timer_heartbeat(
            settings.limits.header_read_timeout,
            stop.clone(),
        ));
        let mut tasks = Vec::new();
        for (configured, socket) in sockets {
            let listener = match TcpListener::from_std(socket) {
                Ok(listener) => listener,
                Err(error) => {
                    tracing::error!(%error, "cannot serve a listener socket");
                    continue;
                }
            };
            let handler_forwarder = forwarder.clone();
            // Boxed: hyper keeps a slot the size of this future in every connection,
            // idle or not; the request path's state (forward, replay, upstream send)
            // is ~4 KiB that only requests in flight should pay for.
            let configured = Arc::new(ListenAddr::Tcp(configured));
            let handler = move |req| {
                let forwarder = handler_forwarder.clone();
                let configured = configured.clone();
                Box::pin(async move { forwarder.handle(&configured, req).await })
            };
            tasks.push(tokio::spawn(accept_loop(
                settings.clone(),
                listener,
                forwarder.proxy().clone(),
                handler,
                stop.clone(),
            )));
        }
        for task in tasks {
            let _ = task.await;
        }
        // Upgraded connections outlive their HTTP connection; they close by themselves
        // `shutdown_grace` after the stop at the latest.
        forwarder.tunnels().wait().await;
    });
}

/// Keeps a timer due within a second in the worker's timer wheel, until `stop`.
///
/// A keep-alive connection re-arms its header-read timer (`header_read_timeout` ahead)
/// each time it waits for the next request. tokio's timer driver interrupts its own
/// wait (an eventfd write, then an extra `epoll_wait` round) whenever a timer is armed
/// earlier than the wake-up it planned when it last went to sleep, and when every
/// connection was busy at that moment the plan was the later upstream-timeout timers:
/// measured at 0.3 eventfd writes per request with 32 busy connections. With a timer
/// always due sooner than any re-armed header timer, the driver never needs that
/// interruption; the cost is one wake-up a second per worker.
async fn timer_heartbeat(header_read_timeout: Duration, stop: CancellationToken) {
    let period = (header_read_timeout / 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(period) => {}
        }
    }
}

/// Binds `workers` sockets to `addr` with SO_REUSEPORT (port 0: the first picks the
/// port, the others join it). Non-blocking std sockets, so each worker registers its
/// own with its own runtime.
fn bind_shared(addr: SocketAddr, workers: usize) -> Result<Vec<std::net::TcpListener>, StartError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let err = |source| StartError::Bind { addr, source };
    // SO_REUSEPORT would let a second proxy started by mistake (same user) share the
    // port silently; a plain bind first turns that into "address in use".
    if addr.port() != 0 {
        drop(std::net::TcpListener::bind(addr).map_err(err)?);
    }
    let mut sockets = Vec::with_capacity(workers);
    let mut target = addr;
    for _ in 0..workers.max(1) {
        let socket = Socket::new(
            Domain::for_address(target),
            Type::STREAM,
            Some(Protocol::TCP),
        )
        .map_err(err)?;
        socket.set_reuse_address(true).map_err(err)?;
        #[cfg(unix)]
        socket.set_reuse_port(true).map_err(err)?;
        socket.set_nonblocking(true).map_err(err)?;
        socket.bind(&target.into()).map_err(err)?;
        socket.listen(1024).map_err(err)?;
        let listener: std::net::TcpListener = socket.into();
        if let Ok(bound) = listener.local_addr() {
            target = bound;
        }
        sockets.push(listener);
    }
    Ok(sockets)
}

/// Binds a Unix socket listener off the async runtime (it touches the filesystem).
async fn bind_unix(path: std::path::PathBuf, config: &Config) -> Result<UnixSocket, StartError> {
    let settings = config.server.unix_socket.clone();
    tokio::task::spawn_blocking(move || UnixSocket::bind(&path, &settings))
        .await?
        .map_err(StartError::from)
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })
}

#[cfg(unix)]
async fn reload_on_sighup(app: ReloadHandle, stop: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP; reload with POST /reload on the admin listener");
        return;
    };
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            got = hup.recv() => {
                if got.is_none() {
                    return;
                }
                tracing::info!("SIGHUP: reloading the config");
                // The outcome is logged by the reload itself.
                let _ = app.reload().await;
            }
        }
    }
}

#[cfg(not(unix))]
async fn reload_on_sighup(_app: ReloadHandle, _stop: CancellationToken) {}

/// How one listener accepts and serves connections.
#[derive(Clone)]
struct ListenerSettings {
    limits: Limits,
    /// Shared by the proxy listeners: at most `max_connections` at once.
    permits: Arc<Semaphore>,
    grace: Duration,
    /// Shared by every listener: the rate of warn lines is limited overall.
    refusals: Arc<RefusalLog>,
}

/// The log of peers refused by `allowed_clients` / `allowed_uids`. One line per refused
/// connection at warn would let a scanner flood the log, so at most one a second is a
/// warn line (naming its peer, and counting the refusals since the previous one); the
/// others are debug lines.
struct RefusalLog {
    start: tokio::time::Instant,
    /// Milliseconds after `start` before which the next warn line waits.
    next_warn_ms: AtomicU64,
    /// Refusals logged at debug since the last warn line.
    suppressed: AtomicU64,
}

impl RefusalLog {
    const EVERY: Duration = Duration::from_secs(1);

    fn new() -> Self {
        Self {
            start: tokio::time::Instant::now(),
            next_warn_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    fn log(&self, peer: &Peer, refused: &Refused) {
        let now = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        let next = self.next_warn_ms.load(Ordering::Relaxed);
        let every = u64::try_from(Self::EVERY.as_millis()).unwrap_or(u64::MAX);
        // Of concurrent refusals in a new second, the one that moves the mark warns.
        let warn = now >= next
            && self
                .next_warn_ms
                .compare_exchange(
                    next,
                    now.saturating_add(every),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok();
        if warn {
            let suppressed = self.suppressed.swap(0, Ordering::Relaxed);
            tracing::warn!(%peer, suppressed, "{refused}");
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%peer, "{refused}");
        }
    }
}

async fn accept_loop<L, H, Fut, B>(
    settings: ListenerSettings,
    listener: L,
    proxy: Arc<Proxy>,
    handler: H,
    stop: CancellationToken,
) where
    L: Accept,
    H: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + Unpin + 'static,
    L::Stream: ReadReady,
    Fut: Future<Output = Result<Response<B>, Infallible>> + Send + Unpin + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let builders = Arc::new(conn::Builders::new(&settings.limits));
    // Every connection of this listener, so shutdown can wait for them to drain.
    let connections = TaskTracker::new();
    // Ends the connections still open when `shutdown_grace` runs out. A worker thread's
    // would end with its runtime anyway, but the Unix socket and admin listeners run
    // on the caller's runtime, which outlives the server.
    let abort = CancellationToken::new();
    loop {
        // At the cap, stop accepting: new connections wait in the kernel's backlog
        // while the ones being served carry on.
        let permit = tokio::select! {
            () = stop.cancelled() => break,
            permit = settings.permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
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
        if let Err(refused) = proxy.admit_peer(&peer) {
            settings.refusals.log(&peer, &refused);
            // A refused peer gets its 403 and the connection closes: it must not keep a
            // connection slot (of `max_connections`) that admitted clients need.
            let svc = service_fn(move |req: Request<Incoming>| {
                let mut answer = refused.answer();
                if req.version() < http::Version::HTTP_2 {
                    answer
                        .headers_mut()
                        .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
                }
                std::future::ready(Ok::<_, Infallible>(answer))
            });
            let builders = builders.clone();
            let stop = stop.clone();
            let bound = settings.limits.header_read_timeout;
            let abort = abort.clone();
            connections.spawn(async move {
                let serve = tokio::time::timeout(bound, conn::serve(&builders, stream, svc, &stop));
                // Selected here rather than with a wrapper such as `run_until_cancelled`,
                // which would hold a second copy of the connection's future in the task.
                tokio::select! {
                    () = abort.cancelled() => {}
                    _ = serve => {}
                }
                drop(permit);
            });
            continue;
        }
        // Every request carries the connection's permit: a tunnel made from one keeps
        // it after the HTTP connection has handed its socket over.
        let permit = ConnPermit(Arc::new(permit));
        let request_permit = permit.clone();
        let handler = handler.clone();
        let svc = service_fn(move |mut req: Request<Incoming>| {
            // Only an Upgrade handshake can become a tunnel; for the rest, inserting it
            // would allocate the request's extension map for nothing.
            if req.headers().contains_key(http::header::UPGRADE) {
                req.extensions_mut().insert(request_permit.clone());
            }
            handler(req)
        });
        let builders = builders.clone();
        let stop = stop.clone();
        let abort = abort.clone();
        connections.spawn(async move {
            // As above: no wrapper future, which would double the task's size.
            tokio::select! {
                () = abort.cancelled() => {}
                served = conn::serve(&builders, stream, svc, &stop) => {
                    if let Err(error) = served {
                        tracing::debug!(%peer, error = %error, "connection ended with an error");
                    }
                }
            }
            drop(permit);
        });
    }
    drop(listener);
    // The connections saw `stop` too: each finishes its requests in flight and closes.
    connections.close();
    if tokio::time::timeout(settings.grace, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!("shutdown grace period over; closing remaining connections");
        abort.cancel();
        // Each is dropped (its socket closed) at its next poll, which is now.
        connections.wait().await;
    }
}
