//! Serving one client connection: HTTP/2 by prior knowledge, or HTTP/1.1 (with
//! upgrades) whose idle keep-alive periods cost almost no memory.
//!
//! hyper's HTTP/1 connection holds a read buffer (8 KiB or more, reserved before every
//! read) and an 8 KiB write buffer for as long as it lives, idle or not, and has no
//! setting to release them. So once a connection has waited [`PARK_AFTER`] (to twice
//! that) for its next request with its last answer flushed, it is taken apart ("parked"): hyper's state is
//! dropped, the socket waits for readability on its own, and a fresh hyper connection
//! takes over when the client sends again. 1,000 idle keep-alive connections drop from
//! ~20 KiB each to the socket and this task.
//!
//! Knowing that hyper is between requests takes two signals: it arms its header-read
//! timer exactly when it starts waiting for a request head (the timer below sees that,
//! and forgets it when a request is dispatched or bytes arrive), and nothing it wrote
//! is still unflushed (the socket wrapper below sees that).
//!
//! From the moment hyper starts waiting for a request head (or the connection is
//! accepted) until a whole head has arrived, one deadline holds, `header_read_timeout`
//! ahead: parking, waking on readiness and the fresh hyper connection after a wake all
//! keep it. Otherwise each wake would grant a new full wait, and a client dribbling a
//! head across an idle pause (or leaving a partial pipelined head in the buffer) could
//! hold the connection for twice the limit.

use std::future::{poll_fn, Future};
use std::io;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::rt::{Read, ReadBufCursor, Sleep, Timer, Write};
use hyper::server::conn::{http1, http2};
use hyper::service::Service;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

use crate::config::Limits;
use crate::error::BoxError;

/// How long an HTTP/1.1 connection waits for its next request before it is parked (up
/// to twice that: see [`park_deadline`]). Short enough that a burst of connections going
/// idle does not pile up buffers, long enough that a client sending request after
/// request (the usual keep-alive load) keeps its hyper connection and pays nothing for
/// this.
pub const PARK_AFTER: Duration = Duration::from_millis(10);

/// When a connection idle since `now` is parked: on a grid of [`PARK_AFTER`] steps, one
/// to two steps ahead. tokio's timer driver interrupts its own sleep (an eventfd write
/// and an extra `epoll_wait`) whenever a timer is armed earlier than the wake-up it has
/// planned; a connection goes idle after nearly every request under load, and with
/// deadlines on a shared grid only the first connection per step can move the planned
/// wake-up, instead of every request.
fn park_deadline(now: tokio::time::Instant) -> tokio::time::Instant {
    static EPOCH: OnceLock<tokio::time::Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(|| now);
    let step = PARK_AFTER.as_millis().max(1);
    let steps = now.saturating_duration_since(epoch).as_millis() / step + 2;
    let ahead = u64::try_from(steps.saturating_mul(step)).unwrap_or(u64::MAX);
    epoch + Duration::from_millis(ahead)
}

/// The most an HTTP/1 connection reads from its client at once. hyper grows its read
/// buffer towards this only while reads keep filling it (a client sending a large body
/// faster than the proxy forwards it), and each read becomes one frame, so one write
/// upstream. Up from 64 KiB, it cut the proxy's CPU per GiB uploaded by about a third
/// (docs/bench/README.md); the request-head limit is `max_header_size`, apart. hyper
/// also caps the answer bytes queued for a client that reads slowly with it, so it is
/// memory per connection too: 512 KiB moved uploads as fast as 1 MiB did, with half of
/// that.
const READ_BUF_MAX: usize = 512 * 1024;

/// The HTTP/2 client preface; anything else is served as HTTP/1.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A stream that can say when it has bytes to read without reading them.
pub trait ReadReady {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

impl ReadReady for TcpStream {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        TcpStream::poll_read_ready(self, cx)
    }
}

impl ReadReady for UnixStream {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        UnixStream::poll_read_ready(self, cx)
    }
}

/// A client socket [`serve`] can take.
pub trait ClientStream: AsyncRead + AsyncWrite + ReadReady + Unpin + Send + 'static {}

impl<S: AsyncRead + AsyncWrite + ReadReady + Unpin + Send + 'static> ClientStream for S {}

/// A request handler [`serve`] can run: cloned into each fresh hyper connection after a
/// park, with futures that can move (a parked connection is taken apart).
pub trait ConnService:
    Service<
        Request<Incoming>,
        Response = Response<Self::Body>,
        Error: Into<BoxError>,
        Future: Send + Unpin + 'static,
    > + Clone
    + Send
    + Unpin
    + 'static
{
    /// The response body.
    type Body: hyper::body::Body<Data: Send, Error: Into<BoxError>> + Send + 'static;
}

impl<Svc, B> ConnService for Svc
where
    Svc: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + Unpin + 'static,
    Svc::Future: Send + Unpin + 'static,
    Svc::Error: Into<BoxError>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Body = B;
}

/// The connection settings of one listener.
#[derive(Clone)]
pub struct Builders {
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
    header_read_timeout: Duration,
}

impl Builders {
    pub fn new(limits: &Limits) -> Self {
        let max_header_bytes = usize::try_from(limits.max_header_bytes).unwrap_or(usize::MAX);
        let mut h1 = http1::Builder::new();
        h1
            // Also bounds how long an idle keep-alive connection waits for its next request.
            .header_read_timeout(limits.header_read_timeout)
            .max_header_size(max_header_bytes)
            .max_buf_size(READ_BUF_MAX.max(max_header_bytes))
            .max_headers(limits.max_headers as usize);
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .max_concurrent_streams(limits.max_concurrent_streams)
            .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
            // Rapid-reset protection: a client whose streams keep being reset is cut off.
            .max_pending_accept_reset_streams(Some(50))
            .max_local_error_reset_streams(Some(256));
        Self {
            h1,
            h2,
            header_read_timeout: limits.header_read_timeout,
        }
    }
}

/// Serves `stream` until the client leaves, the connection fails, or `stop` is
/// cancelled (then requests in flight finish and the connection closes).
pub async fn serve<S: ClientStream, Svc: ConnService>(
    builders: &Builders,
    mut stream: S,
    svc: Svc,
    stop: &CancellationToken,
) -> Result<(), BoxError> {
    // The first bytes say which protocol (what hyper-util's auto builder does, without
    // holding a buffer for it): at most the preface's length.
    let mut first = [0u8; H2_PREFACE.len()];
    let mut got = 0;
    let deadline = tokio::time::Instant::now() + builders.header_read_timeout;
    while got < first.len() {
        let read = tokio::select! {
            () = stop.cancelled() => return Ok(()),
            read = tokio::time::timeout_at(deadline, stream.read(&mut first[got..])) => read,
        };
        let n = match read {
            Err(_elapsed) => return Ok(()),
            Ok(result) => result?,
        };
        if n == 0 {
            return Ok(());
        }
        got += n;
        if !H2_PREFACE.starts_with(&first[..got]) {
            break;
        }
    }
    let prefix = Bytes::copy_from_slice(first.get(..got).unwrap_or_default());
    if got == H2_PREFACE.len() && prefix == H2_PREFACE {
        let io = ParkIo::new(stream, prefix, Arc::new(Flags::default()));
        // Boxed, as each HTTP/1 connection is below: the connection task's future stays
        // small, which is what a parked connection keeps.
        return Box::pin(serve_h2(builders, io, svc, stop)).await;
    }
    serve_http1(
        builders,
        ParkIo::new(stream, prefix, Arc::default()),
        svc,
        stop,
        deadline,
    )
    .await
}

async fn serve_h2<S: ClientStream, Svc: ConnService>(
    builders: &Builders,
    io: ParkIo<S>,
    svc: Svc,
    stop: &CancellationToken,
) -> Result<(), BoxError> {
    let mut conn = pin!(builders.h2.serve_connection(io, svc));
    let mut cancelled = pin!(stop.cancelled());
    let mut shutting_down = false;
    poll_fn(|cx| {
        if !shutting_down && cancelled.as_mut().poll(cx).is_ready() {
            shutting_down = true;
            conn.as_mut().graceful_shutdown();
        }
        conn.as_mut().poll(cx)
    })
    .await
    .map_err(Into::into)
}

/// What ended one hyper HTTP/1 connection.
enum Ended {
    /// The connection is done (closed, failed, upgraded or shut down).
    Done(Result<(), hyper::Error>),
    /// Idle for [`PARK_AFTER`] with nothing unflushed: take the socket back. The
    /// deadline by which the next head must have arrived.
    Idle(tokio::time::Instant),
}

/// Serves HTTP/1.1 on `io`, whose first head must have arrived by `head_deadline`.
async fn serve_http1<S: ClientStream, Svc: ConnService>(
    builders: &Builders,
    mut io: ParkIo<S>,
    svc: Svc,
    stop: &CancellationToken,
    mut head_deadline: tokio::time::Instant,
) -> Result<(), BoxError> {
    let mut cancelled = pin!(stop.cancelled());
    let mut parked = false;
    loop {
        if parked {
            let ready = tokio::select! {
                () = cancelled.as_mut() => return Ok(()),
                ready = tokio::time::timeout_at(head_deadline, poll_fn(|cx| io.stream_mut().poll_read_ready(cx))) => ready,
            };
            match ready {
                Err(_elapsed) => return Ok(()),
                Ok(result) => result?,
            }
        }
        // hyper's connection lives in a box of its own, dropped when the connection
        // parks: the connection task's future, which a parked connection keeps, holds
        // only the socket and this loop's state (about 1.8 KiB less per connection).
        let active = serve_until_idle(
            builders,
            io,
            svc.clone(),
            stop,
            cancelled.as_mut(),
            head_deadline,
        );
        match Box::pin(active).await? {
            Some((socket, deadline)) => {
                io = socket;
                head_deadline = deadline;
                parked = true;
            }
            None => return Ok(()),
        }
    }
}

/// Serves requests on `io` with one hyper connection until the client leaves (`None`)
/// or the connection has been idle long enough to park: then the socket, with a
/// pipelining client's partial next head, and the deadline for that head.
async fn serve_until_idle<S: ClientStream, Svc: ConnService>(
    builders: &Builders,
    mut io: ParkIo<S>,
    svc: Svc,
    stop: &CancellationToken,
    mut cancelled: Pin<&mut WaitForCancellationFuture<'_>>,
    head_deadline: tokio::time::Instant,
) -> Result<Option<(ParkIo<S>, tokio::time::Instant)>, BoxError> {
    let mut idle_timer = pin!(tokio::time::sleep(PARK_AFTER));
    // Until this hyper connection has read a whole head, its head wait ends at
    // `head_deadline`, not a full `header_read_timeout` after it started.
    let flags = Arc::new(Flags::carrying(head_deadline));
    io.flags = flags.clone();
    let mut h1 = builders.h1.clone();
    h1.timer(HeadTimer {
        inner: TokioTimer::new(),
        flags: flags.clone(),
    });
    let tracked = Tracked {
        inner: svc,
        flags: flags.clone(),
    };
    let mut conn = h1.serve_connection(io, tracked).with_upgrades();
    let mut shutting_down = false;
    // The arming of the head wait the idle timer runs for.
    let mut timing: Option<u32> = None;
    // Polled once to register this task's waker, then only once `stop` says it fired:
    // re-polling a registered cancellation future takes a lock on every wake-up of
    // the connection (~1.3k instructions per request), and the task's waker does not
    // change while the connection lives.
    let mut watching = false;
    let ended = poll_fn(|cx| {
        let look = !watching || stop.is_cancelled();
        watching = true;
        if !shutting_down && look && cancelled.as_mut().poll(cx).is_ready() {
            shutting_down = true;
            Pin::new(&mut conn).graceful_shutdown();
        }
        if let Poll::Ready(done) = Pin::new(&mut conn).poll(cx) {
            return Poll::Ready(Ended::Done(done));
        }
        if shutting_down {
            return Poll::Pending;
        }
        match flags.idle() {
            Some((arming, head_deadline)) => {
                if timing != Some(arming) {
                    // A new head wait: the park timer starts now. The head deadline
                    // is the one hyper armed, however long the last answer's flush
                    // took before the connection counted as idle.
                    timing = Some(arming);
                    let park_at = park_deadline(tokio::time::Instant::now());
                    if idle_timer.deadline() != park_at {
                        idle_timer.as_mut().reset(park_at);
                    }
                }
                if idle_timer.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Ended::Idle(head_deadline));
                }
            }
            None => timing = None,
        }
        Poll::Pending
    })
    .await;
    match ended {
        Ended::Done(result) => result.map(|()| None).map_err(Into::into),
        Ended::Idle(deadline) => Ok(conn.into_parts().map(|parts| {
            let mut io = parts.io;
            // A pipelining client's partial next head, if any, is read again; copied,
            // because the bytes hyper hands back keep its whole read buffer alive.
            io.prefix = if parts.read_buf.is_empty() {
                Bytes::new()
            } else {
                Bytes::copy_from_slice(&parts.read_buf)
            };
            (io, deadline)
        })),
    }
}

const ARMED: u8 = 1;
const UNFLUSHED: u8 = 2;
const SERVED: u8 = 4;

/// What one hyper connection is doing, as far as parking is concerned.
#[derive(Default)]
struct Flags {
    /// `ARMED`: waiting for a request head, no byte of it read yet; `UNFLUSHED`: bytes
    /// written and not flushed yet; `SERVED`: a whole head has been read.
    state: AtomicU8,
    /// Counts the head waits, so a new one restarts the idle timer.
    armings: AtomicU32,
    /// The deadline of the head wait this hyper connection took over (from the
    /// protocol sniff or a parked one); it bounds head waits until `SERVED`.
    carried: Option<tokio::time::Instant>,
    /// When hyper's current head wait ends, as it armed it: nanoseconds after
    /// [`armed_epoch`] (set before `ARMED`).
    armed: AtomicU64,
}

/// What [`Flags::armed`] counts from.
fn armed_epoch() -> tokio::time::Instant {
    static EPOCH: OnceLock<tokio::time::Instant> = OnceLock::new();
    *EPOCH.get_or_init(tokio::time::Instant::now)
}

impl Flags {
    fn carrying(deadline: tokio::time::Instant) -> Self {
        Self {
            carried: Some(deadline),
            ..Self::default()
        }
    }

    fn arm(&self, deadline: tokio::time::Instant) {
        let nanos = deadline.saturating_duration_since(armed_epoch()).as_nanos();
        self.armed
            .store(u64::try_from(nanos).unwrap_or(u64::MAX), Ordering::Relaxed);
        self.armings.fetch_add(1, Ordering::Relaxed);
        self.state.fetch_or(ARMED, Ordering::Relaxed);
    }

    fn disarm(&self) {
        self.state.fetch_and(!ARMED, Ordering::Relaxed);
    }

    /// A whole head has arrived: later head waits are the client's next request's.
    fn served(&self) {
        self.state.fetch_or(SERVED, Ordering::Relaxed);
        self.disarm();
    }

    /// The deadline of a head wait that would otherwise end at `deadline`.
    fn head_deadline(&self, deadline: tokio::time::Instant) -> tokio::time::Instant {
        match self.carried {
            Some(carried) if self.state.load(Ordering::Relaxed) & SERVED == 0 => {
                carried.min(deadline)
            }
            _ => deadline,
        }
    }

    /// Which head wait the connection is idle in, and when that wait ends, if it is
    /// idle.
    fn idle(&self) -> Option<(u32, tokio::time::Instant)> {
        if self.state.load(Ordering::Relaxed) & !SERVED != ARMED {
            return None;
        }
        let nanos = self.armed.load(Ordering::Relaxed);
        // Beyond what an Instant holds only for an absurd timeout: then hyper's own
        // timer, not parking, ends the wait.
        let deadline = armed_epoch().checked_add(Duration::from_nanos(nanos))?;
        Some((self.armings.load(Ordering::Relaxed), deadline))
    }
}

/// hyper's timer, which also tells [`Flags`] when hyper starts waiting for a head:
/// that is the only time hyper arms it on an HTTP/1 server connection.
struct HeadTimer {
    inner: TokioTimer,
    flags: Arc<Flags>,
}

impl Timer for HeadTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Sleep>> {
        self.inner.sleep(duration)
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn Sleep>> {
        let deadline = self.head_deadline(deadline);
        self.flags.arm(tokio::time::Instant::from_std(deadline));
        self.inner.sleep_until(deadline)
    }

    fn reset(&self, sleep: &mut Pin<Box<dyn Sleep>>, new_deadline: Instant) {
        let deadline = self.head_deadline(new_deadline);
        self.flags.arm(tokio::time::Instant::from_std(deadline));
        self.inner.reset(sleep, deadline);
    }

    fn now(&self) -> Instant {
        self.inner.now()
    }
}

impl HeadTimer {
    fn head_deadline(&self, deadline: Instant) -> Instant {
        let deadline = tokio::time::Instant::from_std(deadline);
        self.flags.head_deadline(deadline).into_std()
    }
}

/// The service, telling [`Flags`] that a head has been read.
#[derive(Clone)]
struct Tracked<Svc> {
    inner: Svc,
    flags: Arc<Flags>,
}

impl<Svc: Service<Request<Incoming>>> Service<Request<Incoming>> for Tracked<Svc> {
    type Response = Svc::Response;
    type Error = Svc::Error;
    type Future = Svc::Future;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        self.flags.served();
        self.inner.call(req)
    }
}

/// The client socket as hyper sees it: bytes read ahead first (`prefix`), and what
/// [`Flags`] needs to know about reads and flushes.
struct ParkIo<S> {
    inner: TokioIo<S>,
    prefix: Bytes,
    flags: Arc<Flags>,
}

impl<S> ParkIo<S> {
    fn new(stream: S, prefix: Bytes, flags: Arc<Flags>) -> Self {
        Self {
            inner: TokioIo::new(stream),
            prefix,
            flags,
        }
    }

    /// Mutable only so a future waiting on it need not require `S: Sync`.
    fn stream_mut(&mut self) -> &mut S {
        self.inner.inner_mut()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Read for ParkIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(self.prefix.get(..n).unwrap_or_default());
            self.prefix.advance(n);
            self.flags.disarm();
            return Poll::Ready(Ok(()));
        }
        // A ready read means bytes arrived (or the end of the stream, after which hyper
        // closes the connection): either way the connection is no longer idle.
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if polled.is_ready() {
            self.flags.disarm();
        }
        polled
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Write for ParkIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.flags.state.fetch_or(UNFLUSHED, Ordering::Relaxed);
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.flags.state.fetch_or(UNFLUSHED, Ordering::Relaxed);
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let flushed = Pin::new(&mut self.inner).poll_flush(cx);
        if let Poll::Ready(Ok(())) = flushed {
            self.flags.state.fetch_and(!UNFLUSHED, Ordering::Relaxed);
        }
        flushed
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.flags.state.fetch_or(UNFLUSHED, Ordering::Relaxed);
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
