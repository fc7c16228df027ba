//! The whole running proxy under generated hostile input: the real binary, started once
//! per test, is fed arbitrary bytes on its proxy and admin listeners and answered by an
//! upstream that sends arbitrary bytes back. After every case it must still be alive, not
//! have panicked (its stderr is scanned), answer a normal request with 200, the token and
//! the upstream's echo, not have fetched a second token, and the upstreams must never
//! have seen a request the proxy should have refused.
//!
//! Case counts are bounded so each test takes seconds; proptest shrinks a failure to a
//! small input, printed with the failing property.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, TestCaseError, TestRunner};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::runtime::Runtime;
use tokio::time::{timeout, Instant};

use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_bearer-proxy");

/// How long one hostile exchange may take before it counts as a hang: the config's
/// `header_read_timeout` (1 s) and `upstream_timeout` (3 s) plus room for a loaded machine.
const BOUND: Duration = Duration::from_secs(10);

// === The world: issuers, upstreams, the binary ===

/// One request the recording upstream received.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    uri: String,
    host: Option<String>,
    authorization: Vec<String>,
}

/// The running binary; killed and reaped when dropped.
struct Binary {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
    proxy: SocketAddr,
    admin: SocketAddr,
    /// Log lines already checked for panics.
    scanned: usize,
    _dir: tempfile::TempDir,
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Binary {
    /// Writes `config`, starts `bearer-proxy run` on it and waits for both listeners.
    async fn start(config: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bearer-proxy.toml");
        std::fs::write(&path, config).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let mut child = Command::new(BIN)
            .arg("run")
            .arg("-c")
            .arg(&path)
            .args(["--log-format", "json", "--log-level", "info"])
            .env_remove("RUST_LOG")
            .env_remove("BEARER_PROXY_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn bearer-proxy");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let lines = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                lines.lock().unwrap().push(line);
            }
        });
        let mut binary = Self {
            child,
            log,
            proxy: SocketAddr::from(([0, 0, 0, 0], 0)),
            admin: SocketAddr::from(([0, 0, 0, 0], 0)),
            scanned: 0,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (proxy, admin) = binary.listening();
            if let (Some(proxy), Some(admin)) = (proxy, admin) {
                binary.proxy = proxy;
                binary.admin = admin;
                return binary;
            }
            assert!(
                binary.child.try_wait().unwrap().is_none(),
                "bearer-proxy exited at start:\n{}",
                binary.log_text()
            );
            assert!(
                Instant::now() < deadline,
                "bearer-proxy did not listen in time:\n{}",
                binary.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The proxy and admin addresses from the `listening` log lines.
    fn listening(&self) -> (Option<SocketAddr>, Option<SocketAddr>) {
        let mut found = (None, None);
        for line in self.log.lock().unwrap().iter() {
            let Ok(doc) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            // The JSON format flattens fields next to `message`.
            let fields = &doc;
            if fields["message"] != "listening" {
                continue;
            }
            let addr = fields["addr"].as_str().and_then(|a| a.parse().ok());
            match fields["kind"].as_str() {
                Some("proxy") => found.0 = addr,
                Some("admin") => found.1 = addr,
                _ => {}
            }
        }
        found
    }

    fn log_text(&self) -> String {
        let log = self.log.lock().unwrap();
        let start = log.len().saturating_sub(40);
        log[start..].join("\n")
    }

    /// Alive, and no panic message on stderr since the last check (so that shrinking
    /// pins a panic on the input that causes it).
    fn healthy(&mut self) -> Result<(), TestCaseError> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Err(TestCaseError::fail(format!(
                "bearer-proxy exited ({status}):\n{}",
                self.log_text()
            )));
        }
        let log = self.log.lock().unwrap();
        let from = std::mem::replace(&mut self.scanned, log.len()).min(log.len());
        if let Some(i) = log[from..]
            .iter()
            .position(|l| l.contains("panicked"))
            .map(|i| i + from)
        {
            let end = (i + 5).min(log.len());
            return Err(TestCaseError::fail(format!(
                "bearer-proxy panicked:\n{}",
                log[i..end].join("\n")
            )));
        }
        Ok(())
    }
}

/// Everything a robustness test runs against.
struct World {
    rt: Runtime,
    issuer: Issuer,
    /// Where every routed request with provider `p` must go, and nowhere else.
    upstream: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// Named in hostile Host headers and absolute-form targets: must never be reached.
    decoy: Upstream,
    /// The raw-TCP upstream behind `/bad`: what it answers next.
    script: Arc<Mutex<Script>>,
    binary: Binary,
    client: Client,
    /// How the cases ended (`200`, `400`, `closed`...), printed after the run so the
    /// generators' reach can be judged.
    outcomes: Mutex<std::collections::BTreeMap<String, usize>>,
}

/// What the raw upstream sends on its next connection.
#[derive(Clone, Default)]
struct Script {
    bytes: Vec<u8>,
    /// Keep the connection open after writing (else close it).
    hold: bool,
}

impl World {
    fn start() -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(Mutex::new(Script::default()));
        let (issuer, bad_issuer, upstream, decoy, raw, binary) = rt.block_on(async {
            let issuer = Issuer::start(Dialect::OAuth2).await;
            let bad_issuer = Issuer::start_named(Dialect::OAuth2, "q").await;
            let recorded = seen.clone();
            let upstream = serve(move |req| record(req, recorded.clone())).await;
            let decoy = Upstream::start().await;
            let raw = raw_upstream(script.clone()).await;
            let secret = |url: &str| ProviderSection::new(url, "test-client", "test-secret-value");
            let config = TestConfig::default()
                .server(|s| {
                    s.admin()
                        .token_wait("5s")
                        .upstream_timeout("3s")
                        .connect_timeout("2s")
                        .header_read_timeout("1s")
                        .workers(2)
                })
                .with_provider("p", secret(&issuer.url()))
                // The raw upstream may answer 401: its provider must not refetch (that
                // is p's count).
                .with_provider("q", secret(&bad_issuer.url()).invalidate_on([]))
                .route(
                    RouteSection::to(&format!("http://{upstream}/base"), "p").path_prefix("/api"),
                )
                // The client's Host goes upstream as the authority; the connection must
                // not follow it.
                .route(
                    RouteSection::to(&format!("http://{upstream}/kept"), "p")
                        .path_prefix("/keep")
                        .preserve_host(true),
                )
                .route(RouteSection::to(&format!("http://{raw}"), "q").path_prefix("/bad"));
            let binary = Binary::start(&config.render()).await;
            (issuer, bad_issuer, upstream, decoy, raw, binary)
        });
        let _ = (bad_issuer, raw);
        let world = Self {
            rt,
            issuer,
            upstream,
            seen,
            decoy,
            script,
            binary,
            // No pooling: the proxy closes idle connections after header_read_timeout
            // (1 s), and a pooled connection closed just as it is reused fails the send.
            client: hyper_util::client::legacy::Client::builder(
                hyper_util::rt::TokioExecutor::new(),
            )
            .pool_max_idle_per_host(0)
            .build_http(),
            outcomes: Mutex::new(std::collections::BTreeMap::new()),
        };
        world
            .rt
            .block_on(world.still_right_async())
            .unwrap_or_else(|e| panic!("the proxy is not right before any input: {e}"));
        world
    }

    /// A normal request still gets 200 with the token and the right echo, the admin
    /// listener answers, one token was fetched, and no upstream saw a request it should
    /// not have.
    async fn still_right_async(&self) -> Result<(), TestCaseError> {
        let url = format!("http://{}/api/ok?n=1", self.binary.proxy);
        let answer = timeout(
            BOUND,
            self.client
                .request(Request::get(&url).body(full("")).unwrap()),
        )
        .await
        .map_err(|_| TestCaseError::fail("a normal request hung"))?
        .map_err(|e| TestCaseError::fail(format!("a normal request failed: {e}")))?;
        let status = answer.status();
        let body = http_body_util::BodyExt::collect(answer.into_body())
            .await
            .map_err(|e| TestCaseError::fail(format!("a normal body failed: {e}")))?
            .to_bytes();
        prop_assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        let echo: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|_| TestCaseError::fail("the echo is not JSON"))?;
        prop_assert_eq!(&echo["uri"], "/base/ok?n=1");
        prop_assert_eq!(&echo["authorization"], &serde_json::json!(["Bearer tok-1"]));

        let healthz = timeout(
            BOUND,
            self.client.request(
                Request::get(format!("http://{}/healthz", self.binary.admin))
                    .body(full(""))
                    .unwrap(),
            ),
        )
        .await
        .map_err(|_| TestCaseError::fail("/healthz hung"))?
        .map_err(|e| TestCaseError::fail(format!("/healthz failed: {e}")))?;
        prop_assert_eq!(healthz.status(), 200);

        prop_assert_eq!(self.issuer.hits(), 1, "input made the proxy fetch a token");
        prop_assert_eq!(self.decoy.hits(), 0, "a request reached the decoy");
        for seen in self.seen.lock().unwrap().iter() {
            let path = seen.uri.split('?').next().unwrap_or_default();
            let within = |base: &str| {
                path.strip_prefix(base)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            };
            prop_assert!(
                within("/base") || within("/kept"),
                "the upstream got a path outside the routes: {:?}",
                seen
            );
            // No route here allows encoded slashes.
            prop_assert!(
                bearer_proxy::proxy::path::check(path).is_ok_and(|c| !c.encoded_slash),
                "the upstream got a path the proxy must refuse: {:?}",
                seen
            );
            prop_assert_eq!(
                &seen.authorization,
                &vec!["Bearer tok-1".to_owned()],
                "{:?}",
                seen
            );
            // `/kept` is the preserve_host route: there the Host is the client's.
            if within("/base") {
                let upstream = self.upstream.to_string();
                prop_assert_eq!(seen.host.as_deref(), Some(upstream.as_str()), "{:?}", seen);
            }
            prop_assert!(
                seen.method != "CONNECT" && seen.method != "TRACE",
                "{:?}",
                seen
            );
        }
        Ok(())
    }

    /// Counts one case's outcome.
    fn note(&self, outcome: Option<u16>) {
        let key = outcome.map_or_else(|| "closed".to_owned(), |s| s.to_string());
        *self.outcomes.lock().unwrap().entry(key).or_default() += 1;
    }

    fn still_right(&mut self) -> Result<(), TestCaseError> {
        self.binary.healthy()?;
        self.rt.block_on(self.still_right_async())?;
        self.binary.healthy()
    }

    /// Runs `cases` generated inputs through `case`, checking the world after each.
    fn run<S: Strategy>(
        &mut self,
        cases: u32,
        strategy: S,
        case: impl Fn(&World, S::Value) -> Result<(), TestCaseError>,
    ) {
        let mut runner = TestRunner::new(RunnerConfig {
            cases,
            max_shrink_iters: 200,
            max_shrink_time: 60_000,
            failure_persistence: None,
            ..RunnerConfig::default()
        });
        let world = std::cell::RefCell::new(self);
        let result = runner.run(&strategy, |input| {
            let mut world = world.borrow_mut();
            case(&world, input)?;
            world.still_right()
        });
        let world = world.into_inner();
        eprintln!(
            "outcomes: {:?}; the upstream behind /api saw {} requests",
            world.outcomes.lock().unwrap(),
            world.seen.lock().unwrap().len()
        );
        if let Err(e) = result {
            panic!(
                "{e}\n--- bearer-proxy stderr (tail) ---\n{}",
                world.binary.log_text()
            );
        }
    }
}

/// The recording echo upstream: `{method, uri, authorization: [...]}`.
async fn record(req: Request<Incoming>, seen: Arc<Mutex<Vec<Seen>>>) -> Response<TestBody> {
    let header = |name: &str| -> Vec<String> {
        req.headers()
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect()
    };
    let entry = Seen {
        method: req.method().to_string(),
        uri: req.uri().to_string(),
        host: header("host").into_iter().next(),
        authorization: header("authorization"),
    };
    seen.lock().unwrap().push(entry.clone());
    // Read the body (bounded by the proxy's own limits), as a real upstream would.
    let _ = timeout(
        Duration::from_secs(5),
        http_body_util::BodyExt::collect(req.into_body()),
    )
    .await;
    let doc = serde_json::json!({
        "method": entry.method,
        "uri": entry.uri,
        "authorization": entry.authorization,
    });
    Response::builder()
        .header("content-type", "application/json")
        .body(full(doc.to_string()))
        .unwrap()
}

/// A TCP server that reads a request head (or what arrives within 1 s), then writes the
/// current script and closes, or holds the connection for at most 4 s (past the
/// proxy's `upstream_timeout`).
async fn raw_upstream(script: Arc<Mutex<Script>>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let script = script.lock().unwrap().clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                let _ = timeout(Duration::from_secs(1), async {
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 1 << 20 {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                })
                .await;
                let _ = timeout(Duration::from_secs(5), stream.write_all(&script.bytes)).await;
                if script.hold {
                    let _ = timeout(Duration::from_secs(4), async {
                        while let Ok(n) = stream.read(&mut buf).await {
                            if n == 0 {
                                break;
                            }
                        }
                    })
                    .await;
                }
                let _ = stream.shutdown().await;
            });
        }
    });
    addr
}

// === Talking to the binary ===

/// Bytes that print as text with escapes, so a failing case reads well.
#[derive(Clone)]
struct Wire(Vec<u8>);

impl std::fmt::Debug for Wire {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.len() > 600 {
            write!(
                f,
                "\"{}\" ...({} bytes)... \"{}\"",
                self.0[..300].escape_ascii(),
                self.0.len(),
                self.0[self.0.len() - 100..].escape_ascii()
            )
        } else {
            write!(f, "\"{}\"", self.0.escape_ascii())
        }
    }
}

/// `HTTP/1.x NNN ...\r\n` at the start of `out`.
fn status_line(out: &[u8]) -> Option<u16> {
    let line_end = out.windows(2).position(|w| w == b"\r\n")?;
    let line = std::str::from_utf8(&out[..line_end]).ok()?;
    let rest = line
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| line.strip_prefix("HTTP/1.0 "))?;
    let code = rest.get(..3)?;
    if !code.bytes().all(|b| b.is_ascii_digit()) || rest.len() > 3 && !rest[3..].starts_with(' ') {
        return None;
    }
    code.parse().ok().filter(|c| (100..600).contains(c))
}

/// An HTTP/1 exchange ended well: a close, or a well-formed status line, within the bound.
/// The proxy closes every connection in the end (keep-alive idles out after
/// `header_read_timeout`), so an open connection at the bound is a hang either way.
fn answered_or_closed(ex: &Exchange, input: &Wire) -> Result<Option<u16>, TestCaseError> {
    prop_assert!(
        ex.closed,
        "the connection was still open after {:?}; got {:?}",
        BOUND,
        Wire(ex.out.clone())
    );
    if ex.out.is_empty() {
        return Ok(None);
    }
    match status_line(&ex.out) {
        Some(code) => Ok(Some(code)),
        None => Err(TestCaseError::fail(format!(
            "not an HTTP answer: {:?} for {input:?}",
            Wire(ex.out.clone())
        ))),
    }
}

// === Generators: requests ===

fn bytes_of(s: &str) -> Vec<u8> {
    s.as_bytes().to_vec()
}

fn pick(items: &[&'static str]) -> BoxedStrategy<Vec<u8>> {
    prop::sample::select(items.to_vec())
        .prop_map(bytes_of)
        .boxed()
}

fn method() -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        12 => pick(&["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"]),
        2 => pick(&["CONNECT", "TRACE", "PRI", "get", "G ET", "", "M-SEARCH", "PROPFIND"]),
        1 => "[A-Z!#$%&'*+.^_`|~-]{1,12}".prop_map(|s| bytes_of(&s)),
        1 => prop::collection::vec(any::<u8>(), 0..12),
    ]
    .boxed()
}

/// A path segment, hostile spellings included.
fn segment() -> BoxedStrategy<String> {
    prop_oneof![
        3 => "[a-z0-9_-]{0,8}",
        2 => prop::sample::select(vec![
            "..", ".", "%2e%2e", "%2E.", ".%2e", "%2F", "%2f..", "%5c", "%5C..", "%00", "a%20b",
            "%", "%zz", "%e2%82%ac", "..;x", ";x=1", "\u{e9}", "~user", "%252e%252e",
        ])
        .prop_map(str::to_owned),
        1 => "[ -~]{0,6}",
    ]
    .boxed()
}

/// An origin-form target: a route prefix or not, hostile segments, a query.
fn path() -> BoxedStrategy<String> {
    (
        prop::sample::select(vec![
            "/api", "/api/", "/keep", "/bad", "/other", "", "/API", "/api%2f",
        ]),
        prop::collection::vec(segment(), 0..5),
        prop::option::of(prop_oneof!["[a-z0-9=&%+]{0,16}", "[ -~]{0,24}"]),
    )
        .prop_map(|(prefix, segs, query)| {
            let mut t = prefix.to_owned();
            for s in segs {
                t.push('/');
                t.push_str(&s);
            }
            if let Some(q) = query {
                t.push('?');
                t.push_str(&q);
            }
            t
        })
        .boxed()
}

fn target(decoy: SocketAddr) -> BoxedStrategy<Vec<u8>> {
    let path = path().prop_map(String::into_bytes);
    let d = decoy.to_string();
    let absolute = prop::sample::select(vec![
        format!("http://{d}/api/x"),
        format!("http://{d}/api/../../x"),
        format!("https://{d}/api/x"),
        format!("http://user:pw@{d}/api/x"),
        format!("{d}"),
        format!("//{d}/api/x"),
        format!("http://{d}"),
        format!("http://[::1]:1/api/x"),
        "http:///api/x".to_owned(),
        "HTTP://A/api/x".to_owned(),
        "ws://a/api/x".to_owned(),
        "localhost:443".to_owned(),
        "*".to_owned(),
    ])
    .prop_map(String::into_bytes);
    prop_oneof![
        8 => path,
        3 => absolute,
        1 => (1000usize..20_000).prop_map(|n| format!("/api/{}", "a".repeat(n)).into_bytes()),
        1 => prop::collection::vec(prop_oneof![0u8..32, 127u8..=255], 1..8).prop_map(|b| {
            let mut t = b"/api/x".to_vec();
            t.extend(b);
            t
        }),
        1 => prop::collection::vec(any::<u8>(), 0..24),
    ]
    .boxed()
}

fn version() -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        16 => Just(bytes_of("HTTP/1.1")),
        2 => Just(bytes_of("HTTP/1.0")),
        2 => pick(&["HTTP/0.9", "HTTP/2.0", "HTTP/1.2", "http/1.1", "HTTP/1.1 x", "", "HTTP/11"]),
    ]
    .boxed()
}

fn header_line(decoy: SocketAddr) -> BoxedStrategy<Vec<u8>> {
    let d = decoy.to_string();
    let host = prop::sample::select(vec![
        format!("Host: {d}"),
        "Host: ".to_owned(),
        "Host: a b".to_owned(),
        "Host: [::1".to_owned(),
        "Host: x@y".to_owned(),
        format!("Host: user@{d}"),
        "Host: 127.0.0.1:99999".to_owned(),
        "Host: a:b:c".to_owned(),
        "Host: \u{e9}vil".to_owned(),
        format!("Host: {}", "h".repeat(5000)),
        "Host: a\tb".to_owned(),
        "host: A".to_owned(),
    ])
    .prop_map(String::into_bytes);
    let framing = prop_oneof![
        pick(&[
            "Content-Length: 0",
            "Content-Length: 5",
            "Content-Length: -1",
            "Content-Length: 99999999999999999999999",
            "Content-Length: 1,1",
            "Content-Length: +5",
            "Content-Length:  5 ",
            "Content-Length: 0x10",
            "Content-Length: 5, 6",
            "Content-Length: 18446744073709551615",
        ]),
        (0u32..400).prop_map(|n| format!("Content-Length: {n}").into_bytes()),
        pick(&[
            "Transfer-Encoding: chunked",
            "Transfer-Encoding: gzip, chunked",
            "Transfer-Encoding: chunked, gzip",
            "Transfer-Encoding: identity",
            "Transfer-Encoding:  chunked",
            "Transfer-Encoding: Chunked",
            "Transfer-Encoding: xchunked",
            "Transfer-Encoding: chunked\x0b",
        ]),
    ];
    let hop = pick(&[
        "Upgrade: websocket",
        "Upgrade: h2c",
        "Upgrade: foo/1, bar",
        "Connection: upgrade",
        "Connection: Upgrade, HTTP2-Settings",
        "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA",
        "Connection: close",
        "Connection: keep-alive",
        "Connection: host",
        "Connection: authorization, content-length",
        "Connection: te, transfer-encoding",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
        "Expect: 100-continue",
        "Expect: 100-Continue",
        "Expect: something-else",
        "TE: trailers",
        "TE: gzip",
        "Keep-Alive: timeout=1",
        "Proxy-Authorization: Basic dTpw",
    ]);
    let steer = prop::sample::select(vec![
        "Authorization: Bearer stolen".to_owned(),
        "authorization: Basic dTpw".to_owned(),
        format!("X-Forwarded-Host: {d}"),
        format!("Forwarded: host={d}"),
        "X-Original-URL: /../admin".to_owned(),
    ])
    .prop_map(String::into_bytes);
    let odd = prop_oneof![
        (
            "[!-~&&[^:]]{1,20}",
            prop::collection::vec(any::<u8>(), 0..48)
        )
            .prop_map(|(n, v)| {
                let mut line = n.into_bytes();
                line.extend_from_slice(b": ");
                line.extend(v);
                line
            }),
        (1000usize..120_000).prop_map(|n| format!("X-Big: {}", "a".repeat(n)).into_bytes()),
        pick(&[
            "X-Fold: a\r\n b",
            "NoColonHere",
            "X Bad: v",
            ": empty-name",
            "X-Nul: a\0b",
            " Leading: space",
            "X-Empty:",
        ]),
    ];
    prop_oneof![3 => host, 3 => framing, 3 => hop, 2 => steer, 1 => odd].boxed()
}

fn body() -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        4 => Just(Vec::new()),
        2 => prop::collection::vec(any::<u8>(), 0..300),
        2 => prop::collection::vec(prop::collection::vec(any::<u8>(), 1..40), 0..4).prop_map(|chunks| {
            let mut out = Vec::new();
            for c in chunks {
                out.extend(format!("{:x}\r\n", c.len()).into_bytes());
                out.extend(c);
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(b"0\r\n\r\n");
            out
        }),
        2 => pick(&[
            "zz\r\nhello\r\n0\r\n\r\n",
            "-1\r\nx\r\n0\r\n\r\n",
            "ffffffffffffffffffff\r\nx\r\n",
            "5\r\nhel",
            "5;ext=\"x\r\nhello\r\n0\r\n\r\n",
            "0\r\nTrailer: x\r\nAuthorization: Bearer t\r\n\r\n",
            "5\r\nhelloXX\r\n0\r\n\r\n",
            "5\nhello\n0\n\n",
            "0\r\n\r\nGET /api/smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
            "hello",
        ]),
    ]
    .boxed()
}

#[derive(Debug, Clone)]
struct RawRequest {
    wire: Wire,
    half_close: bool,
}

fn request(decoy: SocketAddr) -> impl Strategy<Value = RawRequest> {
    (
        method(),
        target(decoy),
        version(),
        prop::collection::vec(header_line(decoy), 0..6),
        prop::sample::select(vec!["\r\n", "\r\n", "\r\n", "\n"]),
        body(),
        prop::option::weighted(
            0.15,
            Just(b"GET /api/next HTTP/1.1\r\nHost: a\r\n\r\n".to_vec()),
        ),
        prop::bool::weighted(0.85),
    )
        .prop_map(|(m, t, v, headers, eol, body, next, half_close)| {
            let eol = eol.as_bytes();
            let mut w = m;
            w.push(b' ');
            w.extend(t);
            if !v.is_empty() {
                w.push(b' ');
                w.extend(v);
            }
            w.extend_from_slice(eol);
            for h in headers {
                w.extend(h);
                w.extend_from_slice(eol);
            }
            w.extend_from_slice(eol);
            w.extend(body);
            if let Some(next) = next {
                w.extend(next);
            }
            RawRequest {
                wire: Wire(w),
                half_close,
            }
        })
}

// === The tests ===

#[test]
fn generated_http1_requests_never_break_the_proxy() {
    let mut world = World::start();
    let decoy = world.decoy.addr;
    let addr = world.binary.proxy;
    world.run(256, request(decoy), |world, req| {
        let ex = world
            .rt
            .block_on(exchange(addr, &req.wire.0, req.half_close, BOUND));
        world.note(answered_or_closed(&ex, &req.wire)?);
        Ok(())
    });
}

#[test]
fn random_bytes_never_break_the_proxy() {
    let mut world = World::start();
    let addr = world.binary.proxy;
    let strategy = (
        prop::collection::vec(any::<u8>(), 0..2048),
        prop::bool::weighted(0.9),
    );
    world.run(96, strategy, |world, (bytes, half_close)| {
        let wire = Wire(bytes);
        let ex = world
            .rt
            .block_on(exchange(addr, &wire.0, half_close, BOUND));
        world.note(answered_or_closed(&ex, &wire)?);
        Ok(())
    });
}

#[test]
fn generated_h2c_frames_never_break_the_proxy() {
    let mut world = World::start();
    let decoy = world.decoy.addr;
    let addr = world.binary.proxy;
    world.run(128, h2c_connection(decoy), |world, conn| {
        let wire = conn.encode();
        let ex = world
            .rt
            .block_on(exchange(addr, &wire, conn.half_close, BOUND));
        if ex.out.is_empty() {
            prop_assert!(ex.closed, "no answer and no close within {:?}", BOUND);
            world.note(None);
        } else if wire.starts_with(PREFACE) {
            world.note(Some(2));
            // The server speaks first with its SETTINGS frame.
            prop_assert!(
                ex.out.len() >= 9 && ex.out[3] == 4,
                "not an HTTP/2 answer: {:?}",
                Wire(ex.out.clone())
            );
        } else {
            // A mangled preface may be read as HTTP/1.1 and refused as such.
            world.note(answered_or_closed(&ex, &Wire(wire))?);
        }
        Ok(())
    });
}

#[test]
fn generated_admin_requests_never_break_the_admin_listener() {
    let mut world = World::start();
    let decoy = world.decoy.addr;
    let addr = world.binary.admin;
    world.run(128, admin_request(decoy), |world, req| {
        let ex = world
            .rt
            .block_on(exchange(addr, &req.wire.0, req.half_close, BOUND));
        world.note(answered_or_closed(&ex, &req.wire)?);
        Ok(())
    });
}

#[test]
fn generated_upstream_answers_get_502_or_pass_and_the_proxy_keeps_serving() {
    let mut world = World::start();
    let addr = world.binary.proxy;
    world.run(128, upstream_answer(), |world, answer| {
        *world.script.lock().unwrap() = Script {
            bytes: answer.wire.0.clone(),
            hold: answer.hold,
        };
        let request = b"GET /bad/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";
        let ex = world.rt.block_on(exchange(addr, request, false, BOUND));
        prop_assert!(ex.closed, "no close within {:?}", BOUND);
        let status = status_line(&ex.out);
        prop_assert!(
            status.is_some(),
            "no HTTP answer for the client: {:?}",
            Wire(ex.out.clone())
        );
        // The client asked for no upgrade: a 101 would leave it with a dead connection.
        prop_assert_ne!(status, Some(101));
        // Any answer but the proxy's own 502/504 is the upstream's, passed on.
        if let Some(code) = status.filter(|c| *c != 502 && *c != 504) {
            let sent = format!(" {code}");
            prop_assert!(
                answer
                    .wire
                    .0
                    .windows(sent.len())
                    .any(|w| w == sent.as_bytes()),
                "{} is not the upstream's status",
                code
            );
        }
        world.note(status);
        Ok(())
    });
}

// === Generators: HTTP/2 ===

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[derive(Debug, Clone)]
enum H2Frame {
    Settings(Vec<(u16, u32)>),
    Headers {
        stream: u32,
        end_stream: bool,
        end_headers: bool,
        fields: Vec<(Wire, Wire)>,
    },
    Data {
        stream: u32,
        end_stream: bool,
        payload: Wire,
    },
    Raw {
        kind: u8,
        flags: u8,
        stream: u32,
        payload: Wire,
        /// A length field that lies about the payload.
        declared: Option<u32>,
    },
}

#[derive(Debug, Clone)]
struct H2Connection {
    /// Bytes flipped in the preface: (index, xor).
    mangle: Vec<(usize, u8)>,
    frames: Vec<H2Frame>,
    /// End with a GOAWAY: the server finishes the open streams, then closes, so the
    /// exchange ends without a timeout and generated requests reach the upstream.
    goaway: bool,
    half_close: bool,
}

/// HPACK integer with an `n`-bit prefix (RFC 7541 §5.1).
fn hpack_int(out: &mut Vec<u8>, mut value: usize, n: u32, first: u8) {
    let max = (1usize << n) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128 + 128) as u8);
        value /= 128;
    }
    out.push(value as u8);
}

fn frame(out: &mut Vec<u8>, len: u32, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

impl H2Connection {
    fn encode(&self) -> Vec<u8> {
        let mut out = PREFACE.to_vec();
        for (i, x) in &self.mangle {
            let i = i % out.len();
            out[i] ^= x;
        }
        for f in &self.frames {
            match f {
                H2Frame::Settings(pairs) => {
                    let mut p = Vec::new();
                    for (id, v) in pairs {
                        p.extend_from_slice(&id.to_be_bytes());
                        p.extend_from_slice(&v.to_be_bytes());
                    }
                    frame(&mut out, p.len() as u32, 4, 0, 0, &p);
                }
                H2Frame::Headers {
                    stream,
                    end_stream,
                    end_headers,
                    fields,
                } => {
                    // Literal fields without indexing, no Huffman: any bytes fit.
                    let mut p = Vec::new();
                    for (name, value) in fields {
                        p.push(0);
                        hpack_int(&mut p, name.0.len(), 7, 0);
                        p.extend_from_slice(&name.0);
                        hpack_int(&mut p, value.0.len(), 7, 0);
                        p.extend_from_slice(&value.0);
                    }
                    let flags = u8::from(*end_stream) | (u8::from(*end_headers) << 2);
                    frame(&mut out, p.len() as u32, 1, flags, *stream, &p);
                }
                H2Frame::Data {
                    stream,
                    end_stream,
                    payload,
                } => frame(
                    &mut out,
                    payload.0.len() as u32,
                    0,
                    u8::from(*end_stream),
                    *stream,
                    &payload.0,
                ),
                H2Frame::Raw {
                    kind,
                    flags,
                    stream,
                    payload,
                    declared,
                } => {
                    let len = declared.unwrap_or(payload.0.len() as u32) & 0xff_ffff;
                    frame(&mut out, len, *kind, *flags, *stream, &payload.0);
                }
            }
        }
        if self.goaway {
            // The h2 crate fails streams above the last stream id whoever opened them.
            frame(&mut out, 8, 7, 0, 0, &[0x7f, 0xff, 0xff, 0xff, 0, 0, 0, 0]);
        }
        out
    }
}

fn wire_of(items: Vec<String>) -> BoxedStrategy<Wire> {
    prop::sample::select(items)
        .prop_map(|s| Wire(s.into_bytes()))
        .boxed()
}

/// A request's header block: well-formed (with hostile paths and steering fields), or
/// with mutated pseudo-headers and fields HTTP/2 forbids.
fn h2_fields(decoy: SocketAddr) -> BoxedStrategy<Vec<(Wire, Wire)>> {
    let w = |n: &str, v: &str| (Wire(n.as_bytes().to_vec()), Wire(v.as_bytes().to_vec()));
    let d = decoy.to_string();
    let benign = prop::sample::select(vec![
        w("authorization", "Bearer stolen"),
        w("te", "trailers"),
        w("x-ok", "1"),
        w("host", &d),
        w("content-length", "0"),
        w("forwarded", &format!("host={d}")),
    ]);
    let well_formed = (
        prop::sample::select(vec!["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS"]),
        prop_oneof![
            3 => path().prop_map(|p| format!("/api/{}", p.trim_start_matches('/'))),
            1 => path(),
        ],
        prop::sample::select(vec![d.clone(), "a".to_owned()]),
        prop::collection::vec(benign, 0..3),
    )
        .prop_map(move |(method, path, authority, extra)| {
            let mut fields = vec![
                w(":method", method),
                w(":scheme", "http"),
                w(":path", &path),
                w(":authority", &authority),
            ];
            fields.extend(extra);
            fields
        });
    prop_oneof![1 => well_formed, 1 => h2_mutated_fields(decoy)].boxed()
}

fn h2_mutated_fields(decoy: SocketAddr) -> BoxedStrategy<Vec<(Wire, Wire)>> {
    let d = decoy.to_string();
    let s = |v: &[&str]| v.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
    let pseudo = (
        prop::option::weighted(
            0.9,
            wire_of(s(&["GET", "POST", "CONNECT", "TRACE", "", "get", "PUT"])),
        ),
        prop::option::weighted(0.9, wire_of(s(&["http", "https", "foo", ""]))),
        prop::option::weighted(
            0.9,
            wire_of(vec![
                "/api/x".into(),
                "/api/../x".into(),
                "/api/%2e%2e/x".into(),
                "/api/x?q=%00".into(),
                "/bad/x".into(),
                "*".into(),
                "".into(),
                "api".into(),
                format!("http://{d}/api/x"),
                "/api/x\r\nX: y".into(),
            ]),
        ),
        prop::option::weighted(
            0.9,
            wire_of(vec![
                d.clone(),
                "".into(),
                "a b".into(),
                "x@y".into(),
                "[::1".into(),
            ]),
        ),
    );
    let extra = prop_oneof![
        wire_of(s(&[
            "host",
            "connection",
            "te",
            "authorization",
            "content-length",
            "transfer-encoding",
            "upgrade",
            ":protocol",
            ":status",
            "X-Upper",
            "x-ok",
            "expect",
        ]))
        .prop_flat_map(move |name| {
            let d = d.clone();
            (
                Just(name),
                wire_of(vec![
                    d,
                    "close".into(),
                    "trailers".into(),
                    "gzip".into(),
                    "Bearer stolen".into(),
                    "5".into(),
                    "x".into(),
                    "chunked".into(),
                    "websocket".into(),
                    "100-continue".into(),
                    "".into(),
                ]),
            )
        }),
        (
            prop::collection::vec(any::<u8>(), 0..12).prop_map(Wire),
            prop::collection::vec(any::<u8>(), 0..24).prop_map(Wire),
        ),
    ];
    (pseudo, prop::collection::vec(extra, 0..5), any::<bool>())
        .prop_map(|((m, sch, p, a), extra, pseudo_last)| {
            let mut fields: Vec<(Wire, Wire)> = [
                (":method", m),
                (":scheme", sch),
                (":path", p),
                (":authority", a),
            ]
            .into_iter()
            .filter_map(|(n, v)| v.map(|v| (Wire(n.as_bytes().to_vec()), v)))
            .collect();
            if pseudo_last {
                let mut all = extra;
                all.extend(fields);
                fields = all;
            } else {
                fields.extend(extra);
            }
            fields
        })
        .boxed()
}

fn stream_id() -> BoxedStrategy<u32> {
    prop_oneof![4 => Just(1u32), 2 => Just(3u32), 1 => 0u32..12, 1 => any::<u32>()].boxed()
}

fn h2_frame(decoy: SocketAddr) -> BoxedStrategy<H2Frame> {
    prop_oneof![
        2 => prop::collection::vec((0u16..10, any::<u32>()), 0..4).prop_map(H2Frame::Settings),
        5 => (stream_id(), any::<bool>(), prop::bool::weighted(0.9), h2_fields(decoy)).prop_map(
            |(stream, end_stream, end_headers, fields)| H2Frame::Headers {
                stream,
                end_stream,
                end_headers,
                fields,
            }
        ),
        2 => (stream_id(), any::<bool>(), prop::collection::vec(any::<u8>(), 0..64)).prop_map(
            |(stream, end_stream, payload)| H2Frame::Data {
                stream,
                end_stream,
                payload: Wire(payload),
            }
        ),
        3 => (
            0u8..12,
            any::<u8>(),
            stream_id(),
            prop::collection::vec(any::<u8>(), 0..64),
            prop::option::weighted(0.2, any::<u32>()),
        )
            .prop_map(|(kind, flags, stream, payload, declared)| H2Frame::Raw {
                kind,
                flags,
                stream,
                payload: Wire(payload),
                declared,
            }),
    ]
    .boxed()
}

fn h2c_connection(decoy: SocketAddr) -> impl Strategy<Value = H2Connection> {
    (
        prop::option::weighted(
            0.1,
            prop::collection::vec((any::<usize>(), 1u8..=255), 1..3),
        ),
        prop::bool::weighted(0.8),
        // Most connections open with a request on stream 1, so some reach the upstream
        // before the frames after it break the connection.
        prop::option::weighted(0.7, (any::<bool>(), h2_fields(decoy))),
        prop_oneof![
            2 => Just(Vec::new()),
            1 => prop::collection::vec(h2_frame(decoy), 1..5),
        ],
        prop::bool::weighted(0.8),
        prop::bool::weighted(0.5),
    )
        .prop_map(
            |(mangle, settings_first, request, mut frames, goaway, half_close)| {
                if let Some((end_stream, fields)) = request {
                    let headers = H2Frame::Headers {
                        stream: 1,
                        end_stream,
                        end_headers: true,
                        fields,
                    };
                    frames.insert(0, headers);
                }
                if settings_first {
                    frames.insert(0, H2Frame::Settings(Vec::new()));
                }
                H2Connection {
                    mangle: mangle.unwrap_or_default(),
                    frames,
                    goaway,
                    // Without GOAWAY the connection would idle: end it from our side.
                    half_close: half_close || !goaway,
                }
            },
        )
}

// === Generators: admin requests and upstream answers ===

fn admin_request(decoy: SocketAddr) -> impl Strategy<Value = RawRequest> {
    (
        method(),
        pick(&[
            "/healthz",
            "/readyz",
            "/metrics",
            "/tokens",
            "/reload",
            "/",
            "/healthz/",
            "//healthz",
            "/HEALTHZ",
            "*",
            "http://x/healthz",
            "/tokens/p",
            "",
            "/reload/../healthz",
        ]),
        prop::option::of("[ -~]{0,16}"),
        version(),
        prop::collection::vec(header_line(decoy), 0..4),
        body(),
        prop::bool::weighted(0.85),
    )
        .prop_map(|(m, path, query, v, headers, body, half_close)| {
            let mut w = m;
            w.push(b' ');
            w.extend(path);
            if let Some(q) = query {
                w.push(b'?');
                w.extend(q.into_bytes());
            }
            w.push(b' ');
            w.extend(v);
            w.extend_from_slice(b"\r\n");
            for h in headers {
                w.extend(h);
                w.extend_from_slice(b"\r\n");
            }
            w.extend_from_slice(b"\r\n");
            w.extend(body);
            RawRequest {
                wire: Wire(w),
                half_close,
            }
        })
}

#[derive(Debug, Clone)]
struct UpstreamAnswer {
    wire: Wire,
    hold: bool,
}

fn upstream_answer() -> impl Strategy<Value = UpstreamAnswer> {
    let interim = prop_oneof![
        4 => Just(Vec::new()),
        2 => (
            1usize..50,
            pick(&[
                "HTTP/1.1 100 Continue\r\n\r\n",
                "HTTP/1.1 103 Early Hints\r\nLink: </x>; rel=preload\r\n\r\n",
                "HTTP/1.1 102 Processing\r\n\r\n",
                "HTTP/1.1 100 Continue\r\nContent-Length: 5\r\n\r\n",
            ]),
        )
            .prop_map(|(n, one)| one.repeat(n)),
        1 => (500usize..5000).prop_map(|n| b"HTTP/1.1 100 Continue\r\n\r\n".repeat(n)),
    ];
    let status = prop_oneof![
        6 => pick(&[
            "HTTP/1.1 200 OK",
            "HTTP/1.1 404 Not Found",
            "HTTP/1.1 401 Unauthorized",
            "HTTP/1.0 200 OK",
            "HTTP/1.1 204 No Content",
            "HTTP/1.1 304 Not Modified",
            "HTTP/1.1 500 x",
        ]),
        4 => pick(&[
            "HTTP/1.1 101 Switching Protocols",
            "HTTP/1.1 199 Odd",
            "HTTP/1.1 600 Beyond",
            "HTTP/1.1 2000 OK",
            "HTTP/1.1 20 OK",
            "HTTP/9.9 200 OK",
            "HTTP/2 200",
            "ICY 200 OK",
            "HTTP/1.1 200",
            "HTTP/1.1  200 OK",
            "",
            "garbage",
        ]),
        1 => prop::collection::vec(any::<u8>(), 0..40),
    ];
    let header = prop_oneof![
        8 => pick(&[
            "Content-Length: 5",
            "Content-Length: 100",
            "Content-Length: 0",
            "Content-Length: -1",
            "Content-Length: 5, 6",
            "Content-Length: 99999999999999999999",
            "Transfer-Encoding: chunked",
            "Transfer-Encoding: gzip",
            "Connection: close",
            "Connection: upgrade",
            "Upgrade: websocket",
            "Content-Type: text/plain",
            "X-Nul: a\0b",
            "NoColon",
            "X-Fold: a\r\n b",
            "Set-Cookie: a=b",
            "Proxy-Authenticate: Basic",
            "Keep-Alive: timeout=0",
            "Trailer: x",
            "Content-Encoding: gzip",
        ]),
        1 => (1000usize..300_000).prop_map(|n| format!("X-Big: {}", "a".repeat(n)).into_bytes()),
        1 => (50usize..2000).prop_map(|n| {
            (0..n).map(|i| format!("X-H{i}: v")).collect::<Vec<_>>().join("\r\n").into_bytes()
        }),
        1 => ("[!-~&&[^:]]{1,12}", prop::collection::vec(any::<u8>(), 0..32)).prop_map(|(n, v)| {
            let mut line = n.into_bytes();
            line.extend_from_slice(b": ");
            line.extend(v);
            line
        }),
    ];
    (
        interim,
        status,
        prop::collection::vec(header, 0..6),
        prop::sample::select(vec!["\r\n", "\r\n", "\r\n", "\n"]),
        prop_oneof![4 => body(), 1 => (1usize..200_000).prop_map(|n| vec![b'x'; n])],
        prop::bool::weighted(0.05),
    )
        .prop_map(|(interim, status, headers, eol, body, hold)| {
            let eol = eol.as_bytes();
            let mut w = interim;
            w.extend(status);
            w.extend_from_slice(eol);
            for h in headers {
                w.extend(h);
                w.extend_from_slice(eol);
            }
            w.extend_from_slice(eol);
            w.extend(body);
            UpstreamAnswer {
                wire: Wire(w),
                hold,
            }
        })
}

// === Regressions found by the properties above ===

/// A body kept for replay (`invalidate_on`, on by default) that never fully arrives:
/// the proxy used to wait for it forever, holding the request and its connection.
#[tokio::test]
async fn a_short_body_kept_for_replay_gets_408_not_a_hang() {
    let Harness {
        upstream, proxy, ..
    } = Harness::with(|c| c.server(|s| s.upstream_timeout("1s"))).await;
    let started = Instant::now();
    // 28 bytes announced, 5 sent, the connection left open.
    let ex = exchange(
        proxy.addr,
        b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 28\r\n\r\nhello",
        false,
        Duration::from_secs(10),
    )
    .await;
    let text = String::from_utf8_lossy(&ex.out);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("request_timeout"), "{text}");
    assert!(started.elapsed() < Duration::from_secs(8));
    assert_eq!(upstream.hits(), 0, "nothing was forwarded");
    let answer = get(&client(), &proxy.url("/ok")).await;
    assert_eq!(answer.status, 200);
}

/// A proxy in front of a raw upstream that answers `script` to every request.
async fn behind_raw_upstream(script: &[u8]) -> Proxy {
    let issuer = Issuer::start(Dialect::OAuth2).await;
    let raw = raw_upstream(Arc::new(Mutex::new(Script {
        bytes: script.to_vec(),
        hold: false,
    })))
    .await;
    let toml = TestConfig::default()
        .with_provider("p", ProviderSection::new(&issuer.url(), "c", "s"))
        .route(RouteSection::to(&format!("http://{raw}"), "p"));
    Proxy::start_with(&toml).await
}

const ASK: &[u8] = b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";

/// An upstream that sends its head and then breaks off: the client used to get a close
/// and not one byte (hyper drops what it buffered on a body error).
#[tokio::test]
async fn an_upstream_head_without_its_body_still_reaches_the_client() {
    for script in [
        &b"HTTP/1.1 500 x\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
        b"HTTP/1.1 500 x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 500 x\r\nContent-Length: 100\r\n\r\nshort",
    ] {
        let proxy = behind_raw_upstream(script).await;
        let ex = exchange(proxy.addr, ASK, false, Duration::from_secs(10)).await;
        assert!(ex.closed);
        let text = String::from_utf8_lossy(&ex.out);
        assert!(
            text.starts_with("HTTP/1.1 500 "),
            "{text:?} for {:?}",
            Wire(script.to_vec())
        );
        // The body is cut, not ended: no last chunk, so the client knows it is incomplete.
        assert!(!text.contains("\r\n0\r\n\r\n"), "{text:?}");
    }
}

/// A chunked answer that also carries `Content-Length: -1`: passed on, the length made
/// the proxy's writer give up and close the client's connection without a byte.
#[tokio::test]
async fn a_content_length_beside_chunked_is_dropped() {
    let proxy = behind_raw_upstream(
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    let ex = exchange(proxy.addr, ASK, false, Duration::from_secs(10)).await;
    assert!(ex.closed);
    let text = String::from_utf8_lossy(&ex.out).to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 200 ok\r\n"), "{text:?}");
    assert!(!text.contains("content-length"), "{text:?}");
    assert!(text.contains("\r\n5\r\nhello\r\n0\r\n\r\n"), "{text:?}");
}

/// Status codes 600-999 parse but are no HTTP status: the proxy used to pass them on.
#[tokio::test]
async fn an_upstream_status_above_599_gets_502() {
    let proxy = behind_raw_upstream(b"HTTP/1.1 600 Beyond\r\nContent-Length: 0\r\n\r\n").await;
    let ex = exchange(proxy.addr, ASK, false, Duration::from_secs(10)).await;
    let text = String::from_utf8_lossy(&ex.out);
    assert!(text.starts_with("HTTP/1.1 502 "), "{text:?}");
    assert!(
        text.contains("600"),
        "the message names the status: {text:?}"
    );
}
