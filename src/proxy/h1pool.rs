//! Plain-http HTTP/1.1 upstream connections driven by the request that uses them.
//!
//! hyper-util's pooled client runs every upstream connection as a task of its own: a
//! request hands its head to that task over a channel, the task wakes to write it and
//! again to read the answer, hands the answer back over another channel, and one more
//! task per request waits for the connection to be reusable before it goes back to
//! the pool. For the common case, an `http://` upstream reached without an outbound
//! proxy, this pool keeps hyper's HTTP/1.1 client codec (parsing, framing, checks) but
//! polls each connection from the request that has it checked out, and then from the
//! answer's body until that ends: the client connection's task does all the work, and
//! an idle connection is polled by no one.
//!
//! A request whose body is still being sent when the answer's head arrives (an
//! upstream that answers early, or streams its answer while it reads) hands its
//! connection to a task of its own, as hyper-util would: the upload must go on whether
//! or not the client reads the answer meanwhile, and the connection comes back to the
//! pool once both directions are done.
//!
//! Since nothing polls an idle connection, it cannot notice by itself that the
//! upstream closed it: it is polled once when it is checked out, and a request that
//! still finds it closed before anything was written goes again on a new connection
//! (hyper hands the unsent request back). A sweep every [`SWEEP_EVERY`] drops closed
//! and expired idle connections, and takes hyper's buffers off the ones idle for a
//! whole sweep, so a quiet pool holds sockets only.

use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery};
use http::{header, HeaderValue, Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tower_service::Service;

use super::body::OutBody;
use super::client::ConnectTimeout;
use crate::error::BoxError;

/// How often idle connections are checked (closed by the upstream, expired), and how
/// long one stays idle before its hyper buffers are dropped.
const SWEEP_EVERY: Duration = Duration::from_secs(2);

type Io = TokioIo<TcpStream>;

/// One upstream connection with hyper's state: what sends requests on it, and the
/// connection itself, which must be polled for anything to happen. Boxed wherever it
/// goes: hyper's connection state is most of a kilobyte, and it moves from the pool to
/// the request, its answer's body and back for every request.
type Conn = Box<ConnState>;

struct ConnState {
    sender: http1::SendRequest<SentBody>,
    driver: http1::Connection<Io, SentBody>,
}

/// A request body on its way out, telling whether hyper has taken all of it.
pub struct SentBody {
    inner: OutBody,
    /// Set once the last frame is out; `None` for a body that was empty from the start.
    done: Option<Arc<AtomicBool>>,
}

impl Body for SentBody {
    type Data = Bytes;
    type Error = <OutBody as Body>::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        let last = match &polled {
            Poll::Ready(None) => true,
            Poll::Ready(Some(Ok(frame))) => frame.is_trailers() || this.inner.is_end_stream(),
            _ => false,
        };
        if last {
            if let Some(done) = &this.done {
                done.store(true, Ordering::Relaxed);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// An idle connection: whole, or (idle for a sweep) the bare socket.
enum Idle {
    Live(Conn),
    Bare(Io),
}

struct Parked {
    conn: Idle,
    since: Instant,
}

struct Inner {
    /// Per upstream authority, oldest first. A worker talks to a handful of upstreams,
    /// so a list beats hashing the authority on every request.
    idle: Mutex<Vec<(Authority, VecDeque<Parked>)>>,
    connector: HttpConnector,
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_idle_per_host: usize,
    /// Whether the sweep task runs (started with the first idle connection, on the
    /// runtime the pool is used on).
    sweeping: AtomicBool,
}

/// A pool of plain-http HTTP/1.1 upstream connections, one per worker.
#[derive(Clone)]
pub struct H1Pool {
    inner: Arc<Inner>,
}

impl H1Pool {
    /// `connector` dials the TCP connections; `connect_timeout` bounds each dial whole.
    pub fn new(
        connector: HttpConnector,
        connect_timeout: Duration,
        idle_timeout: Duration,
        max_idle_per_host: usize,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                idle: Mutex::new(Vec::new()),
                connector,
                connect_timeout,
                idle_timeout,
                max_idle_per_host,
                sweeping: AtomicBool::new(false),
            }),
        }
    }

    /// Sends `request` (absolute `http://` URI) on an idle connection to its authority
    /// or a new one; the answer's body keeps driving the connection.
    pub async fn send(
        &self,
        mut request: Request<OutBody>,
    ) -> Result<Response<UpstreamBody>, BoxError> {
        let Some(authority) = request.uri().authority().cloned() else {
            return Err("the upstream URI has no authority".into());
        };
        prepare_head(&mut request, &authority)?;
        // Only a body with something in it can still be on its way when the answer comes.
        let done = (!request.body().is_end_stream()).then(|| Arc::new(AtomicBool::new(false)));
        let mut request = request.map(|inner| SentBody {
            inner,
            done: done.clone(),
        });
        let mut reused = self.checkout(&authority).await;
        let mut fresh = reused.is_none();
        loop {
            let conn = match reused.take() {
                Some(conn) => conn,
                // Boxed: only a new connection takes this step, and its state would
                // otherwise sit in every request's future.
                None => Box::pin(self.connect(&authority)).await?,
            };
            let (answer, running) = exchange(conn, request).await;
            match answer {
                Ok(response) => {
                    let pool = Arc::downgrade(&self.inner);
                    let Some(conn) = running else {
                        return Ok(response.map(|inner| UpstreamBody::new(inner, None)));
                    };
                    let sent = done.as_ref().is_none_or(|d| d.load(Ordering::Relaxed));
                    if !sent {
                        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                            runtime.spawn(finish_detached(conn, pool, authority));
                            return Ok(response.map(|inner| UpstreamBody::new(inner, None)));
                        }
                    }
                    let lease = Lease {
                        conn,
                        pool,
                        authority,
                    };
                    return Ok(response.map(|inner| UpstreamBody::new(inner, Some(lease))));
                }
                // A reused connection the upstream had closed: nothing was written, so
                // the request goes again, once, on a new one.
                Err(mut e) if !fresh => match e.take_message() {
                    Some(unsent) => {
                        request = unsent;
                        fresh = true;
                    }
                    None => return Err(e.into_error().into()),
                },
                Err(e) => return Err(e.into_error().into()),
            }
        }
    }

    /// The most recently used idle connection to `authority` that is still open.
    async fn checkout(&self, authority: &Authority) -> Option<Conn> {
        loop {
            let parked = {
                let mut idle = self.inner.idle.lock().ok()?;
                let (_, list) = idle.iter_mut().find(|(a, _)| a == authority)?;
                let now = Instant::now();
                // Oldest first: the expired ones are at the front.
                while list.front().is_some_and(|p| {
                    now.saturating_duration_since(p.since) >= self.inner.idle_timeout
                }) {
                    list.pop_front();
                }
                list.pop_back()?
            };
            let mut conn = match parked.conn {
                Idle::Live(conn) => conn,
                Idle::Bare(io) => match handshake(io).await {
                    Ok(conn) => conn,
                    Err(_) => continue,
                },
            };
            if until_ready(&mut conn).await {
                return Some(conn);
            }
        }
    }

    async fn connect(&self, authority: &Authority) -> Result<Conn, BoxError> {
        let target = Uri::builder()
            .scheme("http")
            .authority(authority.clone())
            .path_and_query("/")
            .build()?;
        let mut connector = self.inner.connector.clone();
        let timeout = self.inner.connect_timeout;
        let io = match tokio::time::timeout(timeout, connector.call(target)).await {
            Ok(io) => io?,
            Err(_) => return Err(Box::new(ConnectTimeout(timeout))),
        };
        Ok(handshake(io).await?)
    }

    /// Takes back a connection whose exchange is complete, when it can carry another.
    fn release(inner: &Weak<Inner>, authority: Authority, conn: Conn) {
        let Some(inner) = inner.upgrade() else { return };
        if !conn.sender.is_ready() {
            return;
        }
        let Ok(mut idle) = inner.idle.lock() else {
            return;
        };
        let at = match idle.iter().position(|(a, _)| *a == authority) {
            Some(at) => at,
            None => {
                idle.push((authority, VecDeque::new()));
                idle.len() - 1
            }
        };
        let Some((_, list)) = idle.get_mut(at) else {
            return;
        };
        if list.len() >= inner.max_idle_per_host {
            list.pop_front();
        }
        list.push_back(Parked {
            conn: Idle::Live(conn),
            since: Instant::now(),
        });
        drop(idle);
        inner.start_sweeping();
    }
}

impl Inner {
    fn start_sweeping(self: &Arc<Self>) {
        if self.sweeping.swap(true, Ordering::Relaxed) {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(sweep(Arc::downgrade(self)));
            }
            Err(_) => self.sweeping.store(false, Ordering::Relaxed),
        }
    }

    /// Drops idle connections that closed or expired; strips hyper's buffers from the
    /// ones idle for a whole sweep. Each live one is polled once, with a waker that
    /// does nothing: no task waits on an idle connection, the next sweep looks again.
    fn sweep(&self) {
        let Ok(mut idle) = self.idle.lock() else {
            return;
        };
        let now = Instant::now();
        let mut cx = Context::from_waker(Waker::noop());
        for (_, list) in idle.iter_mut() {
            let kept: VecDeque<Parked> = list
                .drain(..)
                .filter_map(|parked| {
                    let age = now.saturating_duration_since(parked.since);
                    if age >= self.idle_timeout {
                        return None;
                    }
                    let conn = match parked.conn {
                        // A closed socket reads its end; an open idle one would block.
                        Idle::Bare(io) => match io.inner().try_read(&mut [0u8; 1]) {
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Idle::Bare(io),
                            _ => return None,
                        },
                        Idle::Live(mut conn) => {
                            if Pin::new(&mut conn.driver).poll(&mut cx).is_ready() {
                                return None;
                            }
                            if age < SWEEP_EVERY {
                                Idle::Live(conn)
                            } else {
                                let parts = conn.driver.into_parts();
                                // Bytes the upstream sent unasked: not a connection to reuse.
                                if !parts.read_buf.is_empty() {
                                    return None;
                                }
                                Idle::Bare(parts.io)
                            }
                        }
                    };
                    Some(Parked {
                        conn,
                        since: parked.since,
                    })
                })
                .collect();
            *list = kept;
        }
        idle.retain(|(_, list)| !list.is_empty());
    }
}

async fn sweep(pool: Weak<Inner>) {
    loop {
        tokio::time::sleep(SWEEP_EVERY).await;
        let Some(inner) = pool.upgrade() else { return };
        inner.sweep();
    }
}

async fn handshake(io: Io) -> Result<Conn, hyper::Error> {
    let (sender, driver) = http1::handshake(io).await?;
    Ok(Box::new(ConnState { sender, driver }))
}

/// Drives `conn` until it can take a request (true) or has ended (false).
async fn until_ready(conn: &mut ConnState) -> bool {
    poll_fn(|cx| {
        if Pin::new(&mut conn.driver).poll(cx).is_ready() {
            return Poll::Ready(false);
        }
        conn.sender.poll_ready(cx).map(|r| r.is_ok())
    })
    .await
}

/// Origin-form target and `Host` from the URI's authority (without the default port),
/// as hyper-util's client sends them to an upstream reached directly.
fn prepare_head(request: &mut Request<OutBody>, authority: &Authority) -> Result<(), BoxError> {
    if !request.headers().contains_key(header::HOST) {
        let host = match authority.port_u16() {
            Some(80) => HeaderValue::from_str(authority.host())?,
            _ => HeaderValue::from_str(authority.as_str())?,
        };
        request.headers_mut().insert(header::HOST, host);
    }
    let path = request
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    *request.uri_mut() = Uri::from(path);
    Ok(())
}

/// Sends `request` on `conn` and drives the connection until the answer's head is in;
/// the connection too while it still runs. One that ends meanwhile is dropped at once:
/// only then does hyper give up the queued request, handing the request itself back
/// when none of it was written.
async fn exchange(
    mut conn: Conn,
    request: Request<SentBody>,
) -> (
    Result<Response<Incoming>, hyper::client::conn::TrySendError<Request<SentBody>>>,
    Option<Conn>,
) {
    let mut answer = pin!(conn.sender.try_send_request(request));
    let mut slot = Some(conn);
    let result = poll_fn(|cx| {
        if let Some(conn) = slot.as_mut() {
            if Pin::new(&mut conn.driver).poll(cx).is_ready() {
                slot = None;
            }
        }
        answer.as_mut().poll(cx)
    })
    .await;
    (result, slot)
}

/// Runs a connection whose request body was still going out when the answer's head
/// came, until both are done; then it goes back to the pool.
async fn finish_detached(mut conn: Conn, pool: Weak<Inner>, authority: Authority) {
    if until_ready(&mut conn).await {
        H1Pool::release(&pool, authority, conn);
    }
}

/// A checked-out connection carrying an answer's body.
struct Lease {
    conn: Conn,
    pool: Weak<Inner>,
    authority: Authority,
}

/// An upstream answer's body; on this pool's connections it also drives the connection
/// it arrives on, which goes back to the pool once the body has ended.
pub struct UpstreamBody {
    /// `None` only while being dropped.
    inner: Option<Incoming>,
    lease: Option<Lease>,
}

impl UpstreamBody {
    fn new(inner: Incoming, lease: Option<Lease>) -> Self {
        Self {
            inner: Some(inner),
            lease,
        }
    }

    /// A body from hyper-util's client, whose connection runs on its own.
    pub fn pooled(inner: Incoming) -> Self {
        Self::new(inner, None)
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        if let Some(lease) = &mut this.lease {
            if Pin::new(&mut lease.conn.driver).poll(cx).is_ready() {
                // The connection ended: what it read is in the body's channel.
                this.lease = None;
            }
        }
        let polled = Pin::new(&mut *inner).poll_frame(cx);
        let ended = match &polled {
            Poll::Ready(None) => true,
            // hyper's servers stop polling a body once its trailers are out.
            Poll::Ready(Some(Ok(frame))) => frame.is_trailers() || inner.is_end_stream(),
            Poll::Ready(Some(Err(_))) => {
                this.lease = None;
                false
            }
            Poll::Pending => false,
        };
        if ended {
            if let Some(mut lease) = this.lease.take() {
                // One more poll lets hyper finish the exchange and ask for the next.
                if Pin::new(&mut lease.conn.driver).poll(cx).is_pending() {
                    H1Pool::release(&lease.pool, lease.authority, lease.conn);
                }
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // A body nobody read to its end (an empty one, a HEAD answer, a rejected
        // answer before a replay): with its receiver gone, hyper skips what is left
        // when that is already in its buffer, and the connection can carry another
        // request; otherwise it closes here, as HTTP/1.1 requires for an unread body.
        let Some(mut lease) = self.lease.take() else {
            return;
        };
        drop(self.inner.take());
        let mut cx = Context::from_waker(Waker::noop());
        if Pin::new(&mut lease.conn.driver).poll(&mut cx).is_pending() {
            H1Pool::release(&lease.pool, lease.authority, lease.conn);
        }
    }
}
