//! The pool for plain-http upstreams (`h1pool`) against a hand-written HTTP/1.1 server
//! that counts its connections and can misbehave in ways real servers do now and then:
//! close a kept-alive connection without a word, answer before reading the request,
//! hold a stream nobody reads any more, or end a chunked answer with trailers. Each test
//! runs one worker, so one pool sees every request and the connection counts are exact.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::Request;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::time::timeout;

use crate::support::*;

/// Bound on any one read or write of the mock, and on waiting for it to see something.
const BOUND: Duration = Duration::from_secs(5);

/// A request head as the mock read it.
#[derive(Debug)]
struct Head {
    path: String,
    /// Names lowercased.
    headers: Vec<(String, String)>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn chunked(&self) -> bool {
        self.header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
    }

    fn content_length(&self) -> u64 {
        self.header("content-length")
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }
}

/// What the mock does after writing an answer.
#[derive(Clone)]
enum Then {
    /// Reads the next request on the same connection.
    Serve,
    /// Closes without a `Connection: close` (FIN, or with `reset` RST by SO_LINGER 0),
    /// as a server whose keep-alive timer fired a moment after answering.
    Close { reset: bool },
    /// Keeps the connection idle until `Notify` fires, then closes it like `Close`.
    CloseOn(Arc<Notify>, bool),
    /// Keeps the connection idle until `Notify` fires, then closes its sending side and
    /// waits for the proxy to close its own: how long a dead socket stays in the pool.
    HalfCloseOn(Arc<Notify>),
    /// Reads the request body the head announced (an answer sent before it was read),
    /// records its length, then reads the next request on the same connection.
    ReadBodyThenServe,
    /// Reads and throws away whatever comes until the peer closes (an answer sent before
    /// the request body was read leaves the rest of it coming); with `shutdown`, after
    /// closing its own side, as a server does that answered `Connection: close`.
    DrainUntilEof { shutdown: bool },
}

/// How the mock answers one request.
#[derive(Clone)]
struct Script {
    /// Reads the whole request body before answering; otherwise not at all.
    read_body: bool,
    /// The answer's bytes (head and body, or head and the start of a body).
    answer: Vec<u8>,
    /// Bytes of `x` written after `answer`, 64 KiB at a time.
    stream: u64,
    then: Then,
}

impl Script {
    /// A `200` with `body` and `Content-Length`, keeping the connection.
    fn ok(body: &str) -> Self {
        Self {
            read_body: true,
            answer: format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\ncontent-type: text/plain\r\n\r\n{body}",
                body.len()
            )
            .into_bytes(),
            stream: 0,
            then: Then::Serve,
        }
    }

    fn then(mut self, then: Then) -> Self {
        self.then = then;
        self
    }
}

/// How one mock connection ended.
#[derive(Clone, Debug, PartialEq)]
enum Ended {
    /// The mock closed it, as its script said.
    ByMock,
    /// The proxy closed (or reset) it: EOF or an error on a read or write.
    ByPeer,
    /// The mock gave up waiting (`BOUND`) with the connection still open.
    TimedOut,
}

struct MockState {
    accepted: AtomicUsize,
    /// Per connection, in accept order: `None` while open.
    ended: Mutex<Vec<Option<Ended>>>,
    /// The connection each request came on, in arrival order.
    requests: Mutex<Vec<usize>>,
    /// Body lengths read after answering (`Then::ReadBodyThenServe`), in order.
    read_late: Mutex<Vec<u64>>,
}

/// A raw HTTP/1.1 upstream on 127.0.0.1:0 answering each request as `script` says.
struct Mock {
    addr: SocketAddr,
    state: Arc<MockState>,
}

impl Mock {
    async fn start(script: impl Fn(&Head) -> Script + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(MockState {
            accepted: AtomicUsize::new(0),
            ended: Mutex::new(Vec::new()),
            requests: Mutex::new(Vec::new()),
            read_late: Mutex::new(Vec::new()),
        });
        let script = Arc::new(script);
        let s = state.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let n = s.accepted.fetch_add(1, Ordering::SeqCst);
                s.ended.lock().unwrap().push(None);
                let (s, script) = (s.clone(), script.clone());
                tokio::spawn(async move {
                    let how = serve_conn(n, stream, &s, &*script).await;
                    s.ended.lock().unwrap()[n] = Some(how);
                });
            }
        });
        Self { addr, state }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn accepted(&self) -> usize {
        self.state.accepted.load(Ordering::SeqCst)
    }

    /// How connection `n` (0-based) ended, once it has.
    fn ended(&self, n: usize) -> Option<Ended> {
        self.state.ended.lock().unwrap().get(n).cloned().flatten()
    }

    /// Waits (at most `BOUND`) for connection `n` to end; how it did.
    async fn wait_ended(&self, n: usize) -> Option<Ended> {
        eventually(BOUND, || self.ended(n).is_some()).await;
        self.ended(n)
    }

    /// Which connection carried each request, in arrival order.
    fn conn_of_each_request(&self) -> Vec<usize> {
        self.state.requests.lock().unwrap().clone()
    }
}

/// A mock connection's socket and what was read past the last request.
struct Wire {
    stream: TcpStream,
    buf: Vec<u8>,
    /// A read waited `BOUND` for nothing: the connection did not end, the mock gave up.
    gave_up: bool,
}

impl Wire {
    /// Reads more into `buf`; `false` at EOF or on an error (or after `BOUND`).
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 64 * 1024];
        match timeout(BOUND, self.stream.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
            Ok(_) => false,
            Err(_) => {
                self.gave_up = true;
                false
            }
        }
    }

    /// How the connection ended when a read came up short.
    fn ended(&self) -> Ended {
        if self.gave_up {
            Ended::TimedOut
        } else {
            Ended::ByPeer
        }
    }

    /// One CRLF-terminated line (without it).
    async fn line(&mut self) -> Option<String> {
        loop {
            if let Some(at) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..at]).into_owned();
                self.buf.drain(..at + 2);
                return Some(line);
            }
            if self.buf.len() > 64 * 1024 || !self.fill().await {
                return None;
            }
        }
    }

    /// Throws away `n` bytes.
    async fn skip(&mut self, mut n: u64) -> bool {
        loop {
            let here = n.min(self.buf.len() as u64);
            self.buf.drain(..here as usize);
            n -= here;
            if n == 0 {
                return true;
            }
            if !self.fill().await {
                return false;
            }
        }
    }

    /// The next request head; `None` when the peer closed first.
    async fn head(&mut self) -> Option<Head> {
        let request_line = self.line().await?;
        let mut parts = request_line.split(' ');
        let _method = parts.next()?;
        let path = parts.next()?.to_owned();
        let mut headers = Vec::new();
        loop {
            let line = self.line().await?;
            if line.is_empty() {
                break;
            }
            let (name, value) = line.split_once(':')?;
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
        }
        Some(Head { path, headers })
    }

    /// Reads the body `head` announces, whole; `false` when it never came.
    async fn body(&mut self, head: &Head) -> bool {
        if !head.chunked() {
            return self.skip(head.content_length()).await;
        }
        loop {
            let Some(size) = self.line().await else {
                return false;
            };
            let size = size.split(';').next().unwrap_or_default().trim();
            let Ok(size) = u64::from_str_radix(size, 16) else {
                return false;
            };
            if size == 0 {
                // Trailer fields, up to the empty line.
                loop {
                    match self.line().await {
                        Some(line) if line.is_empty() => return true,
                        Some(_) => {}
                        None => return false,
                    }
                }
            }
            if !self.skip(size + 2).await {
                return false;
            }
        }
    }
}

async fn serve_conn(
    n: usize,
    stream: TcpStream,
    state: &MockState,
    script: &(dyn Fn(&Head) -> Script + Send + Sync),
) -> Ended {
    let mut wire = Wire {
        stream,
        buf: Vec::new(),
        gave_up: false,
    };
    loop {
        let Some(head) = wire.head().await else {
            return wire.ended();
        };
        state.requests.lock().unwrap().push(n);
        let script = script(&head);
        if script.read_body && !wire.body(&head).await {
            return wire.ended();
        }
        if !matches!(
            timeout(BOUND, wire.stream.write_all(&script.answer)).await,
            Ok(Ok(()))
        ) {
            return Ended::ByPeer;
        }
        let chunk = vec![b'x'; 64 * 1024];
        let mut left = script.stream;
        while left > 0 {
            let len = left.min(chunk.len() as u64) as usize;
            match timeout(BOUND, wire.stream.write_all(&chunk[..len])).await {
                Ok(Ok(())) => left -= len as u64,
                Ok(Err(_)) => return Ended::ByPeer,
                Err(_) => return Ended::TimedOut,
            }
        }
        match script.then {
            Then::Serve => continue,
            Then::HalfCloseOn(notify) => {
                if timeout(BOUND * 2, notify.notified()).await.is_err() {
                    return Ended::TimedOut;
                }
                let _ = wire.stream.shutdown().await;
                let mut sink = [0u8; 1024];
                return match timeout(BOUND, wire.stream.read(&mut sink)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => Ended::ByPeer,
                    _ => Ended::TimedOut,
                };
            }
            Then::ReadBodyThenServe => {
                if !wire.body(&head).await {
                    return wire.ended();
                }
                state.read_late.lock().unwrap().push(head.content_length());
            }
            Then::Close { reset } => return close(wire.stream, reset).await,
            Then::CloseOn(notify, reset) => {
                if timeout(BOUND * 2, notify.notified()).await.is_err() {
                    return Ended::TimedOut;
                }
                return close(wire.stream, reset).await;
            }
            Then::DrainUntilEof { shutdown } => {
                if shutdown {
                    let _ = wire.stream.shutdown().await;
                }
                let mut sink = vec![0u8; 64 * 1024];
                loop {
                    match timeout(BOUND, wire.stream.read(&mut sink)).await {
                        Ok(Ok(0)) | Ok(Err(_)) => return Ended::ByPeer,
                        Ok(Ok(_)) => {}
                        Err(_) => return Ended::TimedOut,
                    }
                }
            }
        }
    }
}

async fn close(mut stream: TcpStream, reset: bool) -> Ended {
    if reset {
        let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    } else {
        let _ = stream.shutdown().await;
    }
    Ended::ByMock
}

/// One worker (one pool), an open route to `mock`, and a short `upstream_timeout` so a
/// request stuck on a dead connection fails the test quickly instead of hanging it.
async fn proxy_to(mock: &Mock) -> Proxy {
    let config = TestConfig::default()
        .server(|s| s.workers(1).upstream_timeout("5s"))
        .route(RouteSection::open(&mock.url()));
    Proxy::start_with(&config).await
}

/// `GET path` through the proxy on a client of its own, so that no client-side pooling
/// enters the counts.
async fn get_fresh(proxy: &Proxy, path: &str) -> Answer {
    get(&client(), &proxy.url(path)).await
}

/// The upstream closes a kept-alive connection without a word, right after its answer
/// (the proxy may see the close as the answer ends) or later, once the connection is
/// surely idle in the pool (only checkout can see it then).
#[tokio::test]
async fn an_idle_connection_the_upstream_closed_silently_is_not_used_again() {
    for (later, reset) in [(false, false), (false, true), (true, false), (true, true)] {
        let kind = format!(
            "{} {}",
            if reset { "RST" } else { "FIN" },
            if later {
                "once idle"
            } else {
                "after answering"
            }
        );
        let notify = Arc::new(Notify::new());
        let n = notify.clone();
        let mock = Mock::start(move |_| {
            Script::ok("hello").then(if later {
                Then::CloseOn(n.clone(), reset)
            } else {
                Then::Close { reset }
            })
        })
        .await;
        let proxy = proxy_to(&mock).await;
        let first = get_fresh(&proxy, "/one").await;
        assert_eq!(first.status, 200, "{kind}");
        assert_eq!(first.body, "hello", "{kind}");
        // The answer has reached the client, so its body ended and the proxy has
        // pooled the connection (or seen it close).
        notify.notify_one();
        // The next request must come after the close, or it would test nothing.
        assert_eq!(mock.wait_ended(0).await, Some(Ended::ByMock), "{kind}");
        let second = get_fresh(&proxy, "/two").await;
        assert_eq!(
            second.status,
            200,
            "{kind}: {}",
            String::from_utf8_lossy(&second.body)
        );
        assert_eq!(second.body, "hello", "{kind}");
        assert_eq!(mock.accepted(), 2, "{kind}: one new connection, no more");
        assert_eq!(mock.conn_of_each_request(), [0, 1], "{kind}");
        proxy.stop().await;
    }
}

/// Two sweeps strip an idle connection down to its socket; the upstream then closes
/// that socket. Checkout has to handshake it again before it can tell it is closed.
#[tokio::test]
async fn a_stripped_idle_connection_the_upstream_closed_is_not_used_again() {
    let close = Arc::new(Notify::new());
    let c = close.clone();
    let mock = Mock::start(move |head| {
        if head.path == "/first" {
            Script::ok("hello").then(Then::CloseOn(c.clone(), false))
        } else {
            Script::ok("hello")
        }
    })
    .await;
    let proxy = proxy_to(&mock).await;
    assert_eq!(get_fresh(&proxy, "/first").await.status, 200);
    // Past two 2 s sweeps: whatever the sweep's phase, one finds the connection idle
    // for a whole sweep.
    tokio::time::sleep(Duration::from_millis(4500)).await;
    assert_eq!(mock.ended(0), None, "the idle connection is still open");
    close.notify_one();
    assert_eq!(mock.wait_ended(0).await, Some(Ended::ByMock));
    let ans = get_fresh(&proxy, "/second").await;
    assert_eq!(ans.status, 200, "{}", String::from_utf8_lossy(&ans.body));
    assert_eq!(mock.accepted(), 2);
    assert_eq!(mock.conn_of_each_request(), [0, 1]);
    proxy.stop().await;
}

/// POSTs `len` bytes (chunked) to `path` on a raw connection while reading the answer:
/// the answer's text, once its `Content-Length` body is in (or whatever came before the
/// connection ended or `BOUND` passed). Unlike hyper's client, which fails the request
/// when a write fails before it has read the answer waiting in its socket, this client
/// reads what came back whether or not the rest of its upload got through, as curl
/// does. Whether the proxy should linger to let every client read an early answer is
/// beside the point here (hyper-util's pool behaves the same).
async fn post_reading_meanwhile(addr: SocketAddr, path: &str, len: u64) -> String {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut rx, mut tx) = stream.into_split();
    let head = format!("POST {path} HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n");
    let upload = tokio::spawn(async move {
        let chunk = [b'u'; 64 * 1024];
        let mut frame = format!("{:x}\r\n", chunk.len()).into_bytes();
        frame.extend_from_slice(&chunk);
        frame.extend_from_slice(b"\r\n");
        let _ = timeout(BOUND, async {
            tx.write_all(head.as_bytes()).await?;
            for _ in 0..len / chunk.len() as u64 {
                tx.write_all(&frame).await?;
            }
            tx.write_all(b"0\r\n\r\n").await
        })
        .await;
        tx
    });
    let mut out = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    let complete = |out: &[u8]| {
        let Some(end) = out.windows(4).position(|w| w == b"\r\n\r\n") else {
            return false;
        };
        let head = String::from_utf8_lossy(&out[..end]).to_ascii_lowercase();
        let length = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(0);
        out.len() >= end + 4 + length
    };
    let _ = timeout(BOUND, async {
        while !complete(&out) {
            match rx.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    upload.abort();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn an_answer_before_the_request_body_is_read_reaches_the_client() {
    const UPLOAD: u64 = 32 * 1024 * 1024;
    for close in [true, false] {
        let mock = Mock::start(move |head| {
            if head.path != "/upload" {
                return Script::ok("after");
            }
            let connection = if close { "connection: close\r\n" } else { "" };
            Script {
                read_body: false,
                answer: format!(
                    "HTTP/1.1 413 Payload Too Large\r\ncontent-length: 9\r\n{connection}\r\ntoo large"
                )
                .into_bytes(),
                stream: 0,
                then: Then::DrainUntilEof { shutdown: close },
            }
        })
        .await;
        let proxy = proxy_to(&mock).await;
        // More than loopback socket buffers hold, so the proxy is still sending it
        // when the answer comes.
        let answer = post_reading_meanwhile(proxy.addr, "/upload", UPLOAD).await;
        assert!(
            answer.starts_with("HTTP/1.1 413 ") && answer.ends_with("\r\n\r\ntoo large"),
            "close = {close}: {answer:?}"
        );
        // Half-sent, the connection cannot carry another request: the proxy closes it.
        assert_eq!(
            mock.wait_ended(0).await,
            Some(Ended::ByPeer),
            "close = {close}: the proxy let go of the half-sent connection"
        );
        let after = get_fresh(&proxy, "/next").await;
        assert_eq!(after.status, 200, "close = {close}");
        assert_eq!(after.body, "after", "close = {close}");
        assert_eq!(mock.accepted(), 2, "close = {close}");
        proxy.stop().await;
    }
}

#[tokio::test]
async fn a_client_gone_mid_download_closes_the_upstream_connection() {
    const BIG: u64 = 256 * 1024 * 1024;
    let mock = Mock::start(|head| {
        if head.path != "/big" {
            return Script::ok("small");
        }
        Script {
            read_body: true,
            answer: format!("HTTP/1.1 200 OK\r\ncontent-length: {BIG}\r\n\r\n").into_bytes(),
            stream: BIG,
            then: Then::Serve,
        }
    })
    .await;
    let proxy = proxy_to(&mock).await;
    let mut conn = TcpStream::connect(proxy.addr).await.unwrap();
    conn.write_all(b"GET /big HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut got = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    while got < 1024 * 1024 {
        match timeout(BOUND, conn.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got += n,
            other => panic!("the download stopped after {got} bytes: {other:?}"),
        }
    }
    drop(conn);
    assert_eq!(
        mock.wait_ended(0).await,
        Some(Ended::ByPeer),
        "the proxy kept the upstream connection of a download nobody reads"
    );
    let ans = get_fresh(&proxy, "/small").await;
    assert_eq!(ans.status, 200);
    assert_eq!(ans.body, "small");
    assert_eq!(mock.accepted(), 2);
    assert_eq!(mock.conn_of_each_request(), [0, 1]);
    proxy.stop().await;
}

#[tokio::test]
async fn a_client_gone_before_the_answer_closes_the_upstream_connection() {
    let mock = Mock::start(|head| {
        if head.path != "/slow" {
            return Script::ok("quick");
        }
        // No answer: the connection stays busy until the proxy lets go of it.
        Script {
            read_body: true,
            answer: Vec::new(),
            stream: 0,
            then: Then::DrainUntilEof { shutdown: false },
        }
    })
    .await;
    let proxy = proxy_to(&mock).await;
    let mut conn = TcpStream::connect(proxy.addr).await.unwrap();
    conn.write_all(b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(
        eventually(BOUND, || !mock.conn_of_each_request().is_empty()).await,
        "the request never reached the mock"
    );
    drop(conn);
    assert_eq!(
        mock.wait_ended(0).await,
        Some(Ended::ByPeer),
        "the proxy kept waiting on the upstream for a client that left"
    );
    let ans = get_fresh(&proxy, "/quick").await;
    assert_eq!(ans.status, 200);
    assert_eq!(ans.body, "quick");
    assert_eq!(mock.conn_of_each_request(), [0, 1]);
    proxy.stop().await;
}

/// A chunked answer, `trailers` after its last chunk (or none).
fn chunked(trailers: bool) -> Script {
    let (declare, fields) = if trailers {
        ("trailer: x-checksum\r\n", "x-checksum: sum-42\r\n")
    } else {
        ("", "")
    };
    Script {
        read_body: true,
        answer: format!(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n{declare}\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n{fields}\r\n"
        )
        .into_bytes(),
        stream: 0,
        then: Then::Serve,
    }
}

/// Two chunked answers through the proxy, as an HTTP/1.1 client asking for trailers
/// sees them; `(body, x-checksum trailer)` of each.
async fn two_chunked(proxy: &Proxy) -> Vec<(String, Option<String>)> {
    let c = client();
    let mut seen = Vec::new();
    for round in 0..2 {
        let req = Request::get(proxy.url(&format!("/chunked/{round}")))
            .header("te", "trailers")
            .body(full(""))
            .unwrap();
        let response = timeout(BOUND, c.request(req))
            .await
            .expect("timed out")
            .expect("request failed");
        assert_eq!(response.status(), 200, "round {round}");
        let collected = timeout(BOUND, response.into_body().collect())
            .await
            .expect("timed out")
            .expect("body");
        let trailer = collected
            .trailers()
            .and_then(|t| t.get("x-checksum"))
            .map(|v| v.to_str().unwrap().to_owned());
        seen.push((
            String::from_utf8_lossy(&collected.to_bytes()).into_owned(),
            trailer,
        ));
    }
    seen
}

#[tokio::test]
async fn a_chunked_answer_leaves_the_connection_reusable() {
    let mock = Mock::start(|_| chunked(false)).await;
    let proxy = proxy_to(&mock).await;
    let seen = two_chunked(&proxy).await;
    assert_eq!(
        seen,
        [
            ("hello world".to_owned(), None),
            ("hello world".to_owned(), None)
        ]
    );
    assert_eq!(mock.accepted(), 1, "both answers came on one connection");
    proxy.stop().await;
}

#[tokio::test]
async fn a_chunked_answer_with_trailers_leaves_the_connection_reusable() {
    let mock = Mock::start(|_| chunked(true)).await;
    let proxy = proxy_to(&mock).await;
    let seen = two_chunked(&proxy).await;
    let expected = ("hello world".to_owned(), Some("sum-42".to_owned()));
    assert_eq!(seen, [expected.clone(), expected]);
    assert_eq!(
        mock.accepted(),
        1,
        "both answers came on one connection (requests went on connections {:?})",
        mock.conn_of_each_request()
    );
    proxy.stop().await;
}

/// The upstream answers (small, complete) as soon as it has the head, then reads the
/// upload: the proxy must go on sending the rest of the body after the answer has ended,
/// and a client that writes its whole upload before reading must still get the answer.
/// Once both directions are done the connection is reusable.
#[tokio::test]
async fn an_answer_before_the_upload_ends_does_not_cut_the_upload_short() {
    const UPLOAD: usize = 16 * 1024 * 1024;
    let mock = Mock::start(|head| {
        if head.path != "/upload" {
            return Script::ok("after");
        }
        Script {
            read_body: false,
            answer: b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nearly".to_vec(),
            stream: 0,
            then: Then::ReadBodyThenServe,
        }
    })
    .await;
    let proxy = proxy_to(&mock).await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    let head = format!("POST /upload HTTP/1.1\r\nhost: x\r\ncontent-length: {UPLOAD}\r\n\r\n");
    // The whole upload first, the answer only then.
    let wrote = timeout(BOUND * 2, async {
        stream.write_all(head.as_bytes()).await?;
        let chunk = vec![b'u'; 64 * 1024];
        for _ in 0..UPLOAD / chunk.len() {
            stream.write_all(&chunk).await?;
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
    assert!(
        matches!(wrote, Ok(Ok(()))),
        "the upload went through: {wrote:?}"
    );
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let _ = timeout(BOUND, async {
        while !answer.ends_with(b"early") {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    let answer = String::from_utf8_lossy(&answer).into_owned();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("early"), "{answer}");
    assert!(
        eventually(BOUND, || !mock.state.read_late.lock().unwrap().is_empty()).await,
        "the upstream read the whole upload"
    );
    assert_eq!(*mock.state.read_late.lock().unwrap(), [UPLOAD as u64]);
    let next = get_fresh(&proxy, "/next").await;
    assert_eq!(next.status, 200);
    assert_eq!(next.body, "after");
    assert_eq!(
        mock.accepted(),
        1,
        "the connection came back once the upload was done"
    );
    proxy.stop().await;
}

/// An answer in the provider's `invalidate_on` is dropped unread for the replay; its
/// small body is already in hyper's buffer, so the same connection carries the replay.
#[tokio::test]
async fn a_rejected_answer_left_unread_leaves_its_connection_to_the_replay() {
    let issuer = Issuer::start(Dialect::OAuth2).await;
    let stale = format!("Bearer {}", issuer.token(1));
    let mock = Mock::start(move |head| {
        if head.header("authorization") == Some(stale.as_str()) {
            let mut script = Script::ok("stale");
            script.answer = b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 5\r\n\r\nstale".to_vec();
            script
        } else {
            Script::ok("fresh")
        }
    })
    .await;
    let config = TestConfig::default()
        .server(|s| s.workers(1).upstream_timeout("5s"))
        .with_provider("p", ProviderSection::new(&issuer.url(), "c", "s"))
        .route(RouteSection::to(&mock.url(), "p"));
    let proxy = Proxy::start_with(&config).await;
    proxy.token_ready(BOUND).await;
    let ans = get_fresh(&proxy, "/api").await;
    assert_eq!(ans.status, 200, "{}", String::from_utf8_lossy(&ans.body));
    assert_eq!(ans.body, "fresh");
    assert_eq!(
        mock.conn_of_each_request(),
        [0, 0],
        "the replay reused the connection"
    );
    proxy.stop().await;
}

/// A connection stripped to its socket by the sweep, which the upstream then closes, is
/// let go by the next sweep: the proxy closes its end instead of keeping a dead socket
/// (in CLOSE_WAIT) in the pool until the idle timeout.
#[tokio::test]
async fn a_stripped_idle_connection_closed_by_the_upstream_is_let_go_by_the_sweep() {
    let close = Arc::new(Notify::new());
    let c = close.clone();
    let mock = Mock::start(move |_| Script::ok("hello").then(Then::HalfCloseOn(c.clone()))).await;
    let proxy = proxy_to(&mock).await;
    assert_eq!(get_fresh(&proxy, "/first").await.status, 200);
    // Past two 2 s sweeps: the connection is a bare socket by now.
    tokio::time::sleep(Duration::from_millis(4500)).await;
    close.notify_one();
    // The mock waits `BOUND` (more than two sweeps) for the proxy to close its end.
    assert_eq!(mock.wait_ended(0).await, Some(Ended::ByPeer));
    proxy.stop().await;
}
