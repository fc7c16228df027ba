//! Test servers on 127.0.0.1:0: a mock token issuer (counting, with switchable
//! delay and faults), an echo upstream, and a running proxy.

#![allow(dead_code)]

mod conf;
mod harness;

#[allow(unused_imports)] // not every test binary uses every section
pub use conf::{ProviderSection, RouteSection, ServerSection, StoreSection, TestConfig};
#[allow(unused_imports)]
pub use harness::{Harness, Servers};

use std::collections::HashSet;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bearer_proxy::config::Config;
use bearer_proxy::server::Server;
use bearer_proxy::token::TokenStore;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

pub use bearer_proxy::error::BoxError;
pub type TestBody = http_body_util::combinators::BoxBody<Bytes, BoxError>;

pub fn full(data: impl Into<Bytes>) -> TestBody {
    Full::new(data.into())
        .map_err(|never| match never {})
        .boxed()
}

/// Serves `handler` on 127.0.0.1:0 (HTTP/1.1 and h2c) until the test ends.
pub async fn serve<F, Fut>(handler: F) -> SocketAddr
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<TestBody>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let handler = handler.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let handler = handler.clone();
                    async move { Ok::<_, Infallible>(handler(req).await) }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

// === Issuer ===

/// How the issuer answers.
#[derive(Clone, Debug)]
pub enum Fault {
    None,
    /// This status with this JSON body.
    Status(u16, String),
    /// 429 with `Retry-After: <value>`.
    RateLimited(String),
    /// 200 with an HTML body.
    Html,
    /// 200 with a body that is not JSON.
    Garbage,
    /// 200 with a body over 1 MiB.
    Huge,
    /// 200 JSON without the token field.
    NoToken,
    /// Never answers.
    Hang,
    /// Closes the connection without answering.
    Close,
    /// This status with an error body that echoes the request it received (body and
    /// Authorization header), as some real issuers do.
    Echo(u16),
    /// 401 `invalid_client` whose description echoes the request, as after a rotated
    /// client secret.
    EchoInvalidClient,
}

/// The token response shape.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Dialect {
    /// `access_token` + `expires_in`.
    OAuth2,
    /// `expires_in` as a numeric string.
    OAuth2StringExpiry,
    /// Loyalife: `results.token` + `results.tokenExpiresOn`; errors as 200 + IsSucessful=false.
    Loyalife,
}

/// One request the issuer received.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub content_type: String,
    pub authorization: Option<String>,
    pub body: String,
}

pub struct IssuerState {
    pub hits: AtomicUsize,
    pub delay: Mutex<Duration>,
    pub fault: Mutex<Fault>,
    /// Lifetime of issued tokens in seconds.
    pub lifetime: Mutex<f64>,
    pub dialect: Dialect,
    pub requests: Mutex<Vec<Recorded>>,
    /// When each request arrived.
    pub times: Mutex<Vec<tokio::time::Instant>>,
    /// Token prefix, so tests can tell issuers apart.
    pub prefix: String,
}

#[derive(Clone)]
pub struct Issuer {
    pub addr: SocketAddr,
    pub state: Arc<IssuerState>,
}

impl Issuer {
    pub async fn start(dialect: Dialect) -> Self {
        Self::start_named(dialect, "tok").await
    }

    pub async fn start_named(dialect: Dialect, prefix: &str) -> Self {
        let state = Arc::new(IssuerState {
            hits: AtomicUsize::new(0),
            delay: Mutex::new(Duration::ZERO),
            fault: Mutex::new(Fault::None),
            lifetime: Mutex::new(3600.0),
            dialect,
            requests: Mutex::new(Vec::new()),
            times: Mutex::new(Vec::new()),
            prefix: prefix.to_owned(),
        });
        let s = state.clone();
        let addr = serve(move |req| issue(req, s.clone())).await;
        Self { addr, state }
    }

    pub fn url(&self) -> String {
        format!("http://{}/oauth/token", self.addr)
    }

    pub fn hits(&self) -> usize {
        self.state.hits.load(Ordering::SeqCst)
    }

    pub fn set_delay(&self, d: Duration) {
        *self.state.delay.lock().unwrap() = d;
    }

    pub fn set_fault(&self, f: Fault) {
        *self.state.fault.lock().unwrap() = f;
    }

    pub fn set_lifetime(&self, secs: f64) {
        *self.state.lifetime.lock().unwrap() = secs;
    }

    pub fn last_request(&self) -> Recorded {
        self.state
            .requests
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("issuer got no request")
    }

    /// Gaps between consecutive requests.
    pub fn intervals(&self) -> Vec<Duration> {
        let times = self.state.times.lock().unwrap();
        times.windows(2).map(|w| w[1] - w[0]).collect()
    }

    /// The token the issuer handed out as its `n`th (1-based) answer.
    pub fn token(&self, n: usize) -> String {
        format!("{}-{n}", self.state.prefix)
    }
}

async fn issue(req: Request<Incoming>, state: Arc<IssuerState>) -> Response<TestBody> {
    state
        .times
        .lock()
        .unwrap()
        .push(tokio::time::Instant::now());
    let n = state.hits.fetch_add(1, Ordering::SeqCst) + 1;
    let header = |name: &str| {
        req.headers()
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    };
    let content_type = header("content-type").unwrap_or_default();
    let authorization = header("authorization");
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    state.requests.lock().unwrap().push(Recorded {
        content_type,
        authorization,
        body: String::from_utf8_lossy(&body).into_owned(),
    });
    let delay = *state.delay.lock().unwrap();
    let fault = state.fault.lock().unwrap().clone();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let lifetime = *state.lifetime.lock().unwrap();
    let token = format!("{}-{n}", state.prefix);
    let json = json_answer;
    match fault {
        Fault::None => {}
        Fault::Status(code, body) => return json(code, body),
        Fault::RateLimited(after) => {
            return Response::builder()
                .status(429)
                .header("retry-after", after)
                .header("content-type", "application/json")
                .body(full(r#"{"error":"rate_limited","error_description":"slow down"}"#))
                .unwrap()
        }
        Fault::Html => {
            return Response::builder()
                .header("content-type", "text/html")
                .body(full("<html><body>Gateway maintenance</body></html>"))
                .unwrap()
        }
        Fault::Garbage => return json(200, "{not json".to_owned()),
        Fault::Huge => {
            let padding = "x".repeat(1024 * 1024 + 10);
            return json(200, format!(r#"{{"access_token":"{token}","pad":"{padding}"}}"#));
        }
        Fault::NoToken => {
            return match state.dialect {
                Dialect::Loyalife => json(
                    200,
                    r#"{"results":{"IsSucessful":false,"ErrorCode":"E401","ExceptionMessage":"Invalid client credentials"}}"#.to_owned(),
                ),
                _ => json(200, r#"{"token_type":"Bearer"}"#.to_owned()),
            }
        }
        Fault::Echo(_) | Fault::EchoInvalidClient => {
            let last = state.requests.lock().unwrap().last().cloned().unwrap();
            let description = format!(
                "bad request: body was {} with authorization {:?}",
                last.body, last.authorization
            );
            let (code, error) = match fault {
                Fault::Echo(code) => (code, "invalid_request"),
                _ => (401, "invalid_client"),
            };
            return json(
                code,
                serde_json::json!({"error": error, "error_description": description}).to_string(),
            );
        }
        Fault::Hang => {
            std::future::pending::<()>().await;
        }
        Fault::Close => {
            // Headers, part of the body, then the connection is cut.
            let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
                Ok(Frame::data(Bytes::from_static(b"{\"access_"))),
                Err("connection cut".into()),
            ];
            return Response::builder()
                .status(200)
                .header("content-type", "application/json")
                .body(StreamBody::new(IterStream(frames.into_iter())).boxed())
                .unwrap();
        }
    }
    match state.dialect {
        Dialect::OAuth2 => json(
            200,
            serde_json::json!({"access_token": token, "token_type": "Bearer", "expires_in": lifetime})
                .to_string(),
        ),
        Dialect::OAuth2StringExpiry => json(
            200,
            serde_json::json!({"access_token": token, "expires_in": format!("{}", lifetime as u64)})
                .to_string(),
        ),
        Dialect::Loyalife => loyalife_answer(&token, lifetime),
    }
}

// === Provider answers ===

/// A JSON answer with this status.
pub fn json_answer(status: u16, body: String) -> Response<TestBody> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(full(body))
        .unwrap()
}

/// A plain OAuth2 token answer: `access_token` + numeric `expires_in`.
pub fn oauth2_answer(token: &str, lifetime_secs: f64) -> Response<TestBody> {
    json_answer(
        200,
        serde_json::json!({"access_token": token, "expires_in": lifetime_secs}).to_string(),
    )
}

/// Loyalife's token answer: `results.token` and an RFC 3339 `results.tokenExpiresOn`
/// `lifetime_secs` from now.
pub fn loyalife_answer(token: &str, lifetime_secs: f64) -> Response<TestBody> {
    let expires = time::OffsetDateTime::now_utc()
        + time::Duration::milliseconds((lifetime_secs * 1000.0) as i64);
    let expires = expires
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    json_answer(
        200,
        serde_json::json!({"results": {"token": token, "tokenExpiresOn": expires}}).to_string(),
    )
}

// === Upstream ===

pub struct UpstreamState {
    pub hits: AtomicUsize,
    /// Requests carrying one of these header values are answered with `reject_status`.
    pub reject: Mutex<HashSet<String>>,
    pub reject_status: Mutex<u16>,
    pub delay: Mutex<Duration>,
    /// Authorization headers seen, in order.
    pub seen_auth: Mutex<Vec<Option<String>>>,
}

/// An upstream that echoes what it received as JSON:
/// `{method, uri, version, headers: [[name, value]...], body_len, body_sha256}`.
/// `GET /download/N` streams N bytes instead.
#[derive(Clone)]
pub struct Upstream {
    pub addr: SocketAddr,
    pub state: Arc<UpstreamState>,
}

impl Upstream {
    pub async fn start() -> Self {
        let state = Arc::new(UpstreamState {
            hits: AtomicUsize::new(0),
            reject: Mutex::new(HashSet::new()),
            reject_status: Mutex::new(401),
            delay: Mutex::new(Duration::ZERO),
            seen_auth: Mutex::new(Vec::new()),
        });
        let s = state.clone();
        let addr = serve(move |req| echo(req, s.clone())).await;
        Self { addr, state }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn hits(&self) -> usize {
        self.state.hits.load(Ordering::SeqCst)
    }

    /// Answer `status` to requests whose Authorization is `Bearer <token>`.
    pub fn reject(&self, token: &str, status: u16) {
        *self.state.reject_status.lock().unwrap() = status;
        self.state
            .reject
            .lock()
            .unwrap()
            .insert(format!("Bearer {token}"));
    }

    pub fn set_delay(&self, d: Duration) {
        *self.state.delay.lock().unwrap() = d;
    }

    pub fn seen_auth(&self) -> Vec<Option<String>> {
        self.state.seen_auth.lock().unwrap().clone()
    }
}

async fn echo(req: Request<Incoming>, state: Arc<UpstreamState>) -> Response<TestBody> {
    state.hits.fetch_add(1, Ordering::SeqCst);
    let delay = *state.delay.lock().unwrap();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let auth = req
        .headers()
        .get("authorization")
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    state.seen_auth.lock().unwrap().push(auth.clone());
    if let Some(target) = req.uri().path().strip_prefix("/redirect-to/") {
        return Response::builder()
            .status(302)
            .header("location", format!("http://{target}"))
            .body(full(""))
            .unwrap();
    }
    if let Some(n) = req.uri().path().strip_prefix("/download/") {
        let n: u64 = n.parse().unwrap_or(0);
        return Response::new(stream_bytes(n));
    }
    let method = req.method().to_string();
    let uri = req.uri().to_string();
    let version = format!("{:?}", req.version());
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let mut body = req.into_body();
    let mut hasher = Sha256::new();
    let mut len = 0u64;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { break };
        if let Ok(data) = frame.into_data() {
            len += data.len() as u64;
            hasher.update(&data);
        }
    }
    let rejected = auth
        .as_ref()
        .is_some_and(|a| state.reject.lock().unwrap().contains(a));
    let status = if rejected {
        *state.reject_status.lock().unwrap()
    } else {
        200
    };
    let doc = serde_json::json!({
        "method": method,
        "uri": uri,
        "version": version,
        "headers": headers,
        "body_len": len,
        "body_sha256": hex(&hasher.finalize()),
    });
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("connection", "x-upstream-hop")
        .header("x-upstream-hop", "should-be-dropped")
        .body(full(doc.to_string()))
        .unwrap()
}

/// A body of `n` pseudo-random bytes in 64 KiB frames, generated as it is read.
pub fn stream_bytes(n: u64) -> TestBody {
    let chunk = Bytes::from(
        (0..64 * 1024)
            .map(|i| (i * 7 % 251) as u8)
            .collect::<Vec<u8>>(),
    );
    let frames = (0..n.div_ceil(chunk.len() as u64)).map(move |i| {
        let start = i * chunk.len() as u64;
        let len = (n - start).min(chunk.len() as u64) as usize;
        Ok::<_, BoxError>(Frame::data(chunk.slice(..len)))
    });
    StreamBody::new(futures_iter(frames)).boxed()
}

fn futures_iter<I: Iterator + Unpin>(iter: I) -> IterStream<I> {
    IterStream(iter)
}

/// A `Stream` over an iterator, without pulling in the futures crate.
pub struct IterStream<I>(I);

impl<I: Iterator + Unpin> futures_core::Stream for IterStream<I> {
    type Item = I::Item;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        std::task::Poll::Ready(self.0.next())
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of what `stream_bytes(n)` produces.
pub fn stream_sha256(n: u64) -> String {
    let chunk: Vec<u8> = (0..64 * 1024).map(|i| (i * 7 % 251) as u8).collect();
    let mut hasher = Sha256::new();
    let mut left = n;
    while left > 0 {
        let len = left.min(chunk.len() as u64) as usize;
        hasher.update(&chunk[..len]);
        left -= len as u64;
    }
    hex(&hasher.finalize())
}

// === Proxy ===

pub struct Proxy {
    pub addr: SocketAddr,
    /// The admin listener, when the config has `admin_listen`.
    pub admin: Option<SocketAddr>,
    pub shared: Arc<bearer_proxy::app::App>,
    pub store: Arc<TokenStore>,
    pub config: Config,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    server_addrs: Vec<(SocketAddr, SocketAddr)>,
}

impl Proxy {
    /// Parses `toml` (no env vars), shortens backoff for tests, binds and serves.
    pub async fn start(toml: &str) -> Self {
        let config = Config::parse(toml, Path::new("test.toml"), &|_| None).expect("test config");
        Self::start_config(config).await
    }

    /// Starts a typed config with test backoff.
    pub async fn start_with(config: &TestConfig) -> Self {
        Self::start_config(config.parse()).await
    }

    /// Like `start`, with backoff from `base` doubling up to `max`.
    pub async fn start_tuned(toml: &str, base: Duration, max: Duration) -> Self {
        let mut config =
            Config::parse(toml, Path::new("test.toml"), &|_| None).expect("test config");
        config.tuning.backoff_base = base;
        config.tuning.backoff_max = max;
        Self::start_exact(config).await
    }

    /// Starts `config` with test backoff (100 ms doubling to 2 s).
    pub async fn start_config(mut config: Config) -> Self {
        config.tuning.backoff_base = Duration::from_millis(100);
        config.tuning.backoff_max = Duration::from_secs(2);
        Self::start_exact(config).await
    }

    /// Starts `config` as given.
    pub async fn start_exact(config: Config) -> Self {
        let server = Server::bind(config.clone()).await.expect("bind");
        let addr = config
            .server
            .listen
            .tcp()
            .and_then(|listen| server.local_addr(listen))
            .expect("listener");
        let server_addrs = config
            .listen_addrs()
            .into_iter()
            .filter_map(|c| c.tcp())
            .filter_map(|c| server.local_addr(c).map(|b| (c, b)))
            .collect();
        let store = server.store().clone();
        let admin = server.admin_addr();
        let shared = server.app().clone();
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));
        Self {
            addr,
            admin,
            shared,
            store,
            config,
            stop: Some(stop),
            task: Some(task),
            server_addrs,
        }
    }

    /// The bound address of a listener configured as `configured`.
    pub fn listener(&self, configured: &str) -> SocketAddr {
        let configured: SocketAddr = configured.parse().unwrap();
        self.server_addrs
            .iter()
            .find(|(c, _)| *c == configured)
            .map(|(_, b)| *b)
            .expect("no such listener")
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Waits until provider `p` holds a valid token; fails the test after `within`.
    pub async fn token_ready(&self, within: Duration) {
        let slot = self.store.slot("p").expect("provider p");
        assert!(
            eventually(within, || slot.current().is_some()).await,
            "provider p got no token within {within:?}"
        );
    }

    /// The admin listener's `/metrics` text.
    pub async fn metrics(&self) -> String {
        let answer = get(&client(), &self.admin_url("/metrics")).await;
        String::from_utf8(answer.body.to_vec()).expect("metrics are UTF-8")
    }

    /// A URL on the admin listener.
    pub fn admin_url(&self, path: &str) -> String {
        format!(
            "http://{}{path}",
            self.admin.expect("no admin_listen in this config")
        )
    }

    /// Signals shutdown and waits for the server to finish draining.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(15), task)
                .await
                .expect("proxy did not stop in time")
                .expect("proxy task panicked");
        }
    }
}

// === Fleet ===

/// `n` proxies started from one config: a fleet when it has a Redis `[store]`.
pub async fn fleet(config: &Config, n: usize) -> Vec<Proxy> {
    let mut proxies = Vec::new();
    for _ in 0..n {
        proxies.push(Proxy::start_config(config.clone()).await);
    }
    proxies
}

/// The id of the token each proxy holds for provider `p`.
pub fn token_ids(proxies: &[Proxy]) -> Vec<Option<u64>> {
    proxies
        .iter()
        .map(|p| p.store.slot("p").unwrap().current().map(|t| t.id))
        .collect()
}

/// Every proxy holds the same token for provider `p`.
pub fn converged(proxies: &[Proxy]) -> bool {
    let ids = token_ids(proxies);
    ids[0].is_some() && ids.iter().all(|id| *id == ids[0])
}

// === Client ===

pub type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    TestBody,
>;

pub fn client() -> Client {
    hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(64)
        .build_http()
}

pub struct Answer {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&self.body)))
    }

    /// The echoed request's headers named `name`, in order.
    pub fn echoed(&self, name: &str) -> Vec<String> {
        self.json()["headers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|pair| pair[0].as_str() == Some(name))
            .map(|pair| pair[1].as_str().unwrap().to_owned())
            .collect()
    }
}

pub async fn send(client: &Client, req: Request<TestBody>) -> Answer {
    let response = tokio::time::timeout(Duration::from_secs(30), client.request(req))
        .await
        .expect("request timed out")
        .expect("request failed");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

pub async fn get(client: &Client, url: &str) -> Answer {
    send(client, Request::get(url).body(full("")).unwrap()).await
}

/// How a raw exchange ended.
pub struct Exchange {
    pub out: Vec<u8>,
    /// The peer closed (or reset) the connection.
    pub closed: bool,
}

/// Writes `bytes` on a fresh connection (then half-closes when `half_close`), and reads
/// until the peer closes or `within` passes: the one raw-socket helper.
pub async fn exchange(
    addr: SocketAddr,
    bytes: &[u8],
    half_close: bool,
    within: Duration,
) -> Exchange {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let deadline = tokio::time::Instant::now() + within;
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the proxy");
    // The proxy may refuse and close before reading everything: write errors are fine.
    if let Ok(Ok(())) = tokio::time::timeout_at(deadline, s.write_all(bytes)).await {
        if half_close {
            let _ = s.shutdown().await;
        }
    }
    let mut out = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Exchange { out, closed: true },
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => return Exchange { out, closed: false },
        }
    }
}

/// `exchange` as text: what came back (possibly nothing) within `wait`.
pub async fn raw(addr: SocketAddr, bytes: &[u8], wait: Duration) -> String {
    let ex = exchange(addr, bytes, false, wait).await;
    String::from_utf8_lossy(&ex.out).into_owned()
}

/// Like `raw`, but the peer must answer and close within `within`.
pub async fn raw_until_close(addr: SocketAddr, bytes: &[u8], within: Duration) -> String {
    let ex = exchange(addr, bytes, false, within).await;
    let text = String::from_utf8_lossy(&ex.out).into_owned();
    assert!(ex.closed, "answer within {within:?}, got so far: {text:?}");
    text
}

/// Polls `check` every 10 ms until it holds or `within` passes.
pub async fn eventually(within: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The value of the first metric line starting with `prefix` (name plus labels).
pub fn metric(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

// === TLS ===

/// A TLS acceptor for `localhost` with a fresh self-signed certificate, offering `alpn`;
/// also the certificate's PEM, to trust as `extra_ca_file`.
pub fn self_signed_acceptor(alpn: &[&[u8]]) -> (tokio_rustls::TlsAcceptor, String) {
    use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .unwrap();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    (
        tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        cert.cert.pem(),
    )
}

/// A port that was free a moment ago, for programs that take a port number.
/// A child process (the real binary), killed and reaped on every path out of a test.
pub struct ChildGuard(pub std::process::Child);

impl ChildGuard {
    /// Sends SIGTERM and waits for the exit.
    pub async fn terminate(mut self) -> std::process::ExitStatus {
        std::process::Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status()
            .expect("run kill");
        tokio::task::spawn_blocking(move || self.0.wait())
            .await
            .expect("the waiting task")
            .expect("wait for the child")
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}
