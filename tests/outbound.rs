//! The outbound HTTP proxy (`outbound_proxy`, `no_proxy`): token and upstream requests
//! through a real tinyproxy with Basic auth, and through a recording proxy that shows
//! exactly what crossed the wire.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::*;

const SECRET: &str = "client-secret-through-proxy";

// === An HTTPS token endpoint and upstream for `localhost` ===

/// One HTTPS server (self-signed for `localhost`, HTTP/2 and HTTP/1.1 by ALPN):
/// `/oauth/token` issues `proxied-token-N`, anything else echoes what it received.
struct Backend {
    port: u16,
    tokens: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
    ca_file: PathBuf,
    _dir: tempfile::TempDir,
}

impl Backend {
    async fn start() -> Self {
        let (acceptor, ca_pem) = self_signed_acceptor(&[b"h2", b"http/1.1"]);
        let dir = tempfile::tempdir().unwrap();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca_pem).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let tokens = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let (t, r) = (tokens.clone(), requests.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let (t, r) = (t.clone(), r.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let (t, r) = (t.clone(), r.clone());
                        async move {
                            let body = if req.uri().path() == "/oauth/token" {
                                let n = t.fetch_add(1, Ordering::SeqCst) + 1;
                                serde_json::json!({
                                    "access_token": format!("proxied-token-{n}"),
                                    "expires_in": 3600,
                                })
                            } else {
                                r.fetch_add(1, Ordering::SeqCst);
                                let header = |name: &str| {
                                    req.headers()
                                        .get(name)
                                        .map(|v| v.to_str().unwrap_or("").to_owned())
                                };
                                serde_json::json!({
                                    "version": format!("{:?}", req.version()),
                                    "authorization": header("authorization"),
                                    "proxy_authorization": header("proxy-authorization"),
                                    "path": req.uri().path(),
                                })
                            };
                            let mut response = http::Response::new(full(body.to_string()));
                            response.headers_mut().insert(
                                "content-type",
                                http::HeaderValue::from_static("application/json"),
                            );
                            Ok::<_, std::convert::Infallible>(response)
                        }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        Self {
            port,
            tokens,
            requests,
            ca_file,
            _dir: dir,
        }
    }

    fn token_url(&self) -> String {
        format!("https://localhost:{}/oauth/token", self.port)
    }

    fn url(&self) -> String {
        format!("https://localhost:{}/api", self.port)
    }
}

/// A config with provider `p` at the backend's token endpoint and routes `/api` (with
/// the token) and `/open` (without) to the backend.
fn backend_config(backend: &Backend) -> TestConfig {
    TestConfig::default()
        .server(|s| {
            s.connect_timeout("5s")
                .token_wait("5s")
                .extra_ca_file(backend.ca_file.display().to_string())
        })
        .with_provider(
            "p",
            ProviderSection::new(&backend.token_url(), "proxied-client", SECRET),
        )
        .route(RouteSection::to(&backend.url(), "p").path_prefix("/api"))
        .route(RouteSection::open(&backend.url()).path_prefix("/open"))
}

/// `outbound_config` through `recorder` to `localhost:<port>` with `preserve_host`.
fn preserve_host_config(issuer: &Issuer, recorder: &RecordingProxy, port: u16) -> TestConfig {
    outbound_config(
        issuer,
        &format!("http://u:p@127.0.0.1:{}", recorder.port),
        &format!("http://localhost:{port}"),
    )
    .edit_route(0, |r| r.preserve_host(true))
}

/// Provider `p` at `issuer` and one route to `upstream` (a URL) through the outbound
/// proxy at `outbound`, with loopback direct.
fn outbound_config(issuer: &Issuer, outbound: &str, upstream: &str) -> TestConfig {
    TestConfig::default()
        .server(|s| s.outbound_proxy(outbound).no_proxy(["127.0.0.1"]))
        .with_provider("p", ProviderSection::new(&issuer.url(), "c", SECRET))
        .route(RouteSection::to(upstream, "p"))
}

async fn wait_listening(port: u16, what: &str) {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    for _ in 0..1000 {
        if TcpStream::connect(addr).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{what} did not start listening on {addr}");
}

// === tinyproxy ===

/// A real tinyproxy on loopback with `BasicAuth user pass`, logging every request.
struct Tinyproxy {
    port: u16,
    log: PathBuf,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Tinyproxy {
    /// Starts one allowing CONNECT to `connect_ports` only. `None` (test skipped) when
    /// tinyproxy is not installed outside CI; in CI (`CI=true`) a missing one fails.
    async fn start(connect_ports: &[u16]) -> Option<Self> {
        if Command::new("tinyproxy")
            .arg("-v")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_err()
        {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "tinyproxy not found: .ci/run installs it (apt-get install tinyproxy)"
            );
            eprintln!("SKIPPED: tinyproxy is not installed (apt-get install tinyproxy)");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let log = dir.path().join("tinyproxy.log");
        let mut conf = format!(
            "Port {port}\nListen 127.0.0.1\nTimeout 30\nMaxClients 100\nAllow 127.0.0.1\n\
             LogFile \"{}\"\nLogLevel Connect\nBasicAuth user pass\n",
            log.display()
        );
        for p in connect_ports {
            conf.push_str(&format!("ConnectPort {p}\n"));
        }
        let file = dir.path().join("tinyproxy.conf");
        std::fs::write(&file, conf).unwrap();
        let child = Command::new("tinyproxy")
            .arg("-d")
            .arg("-c")
            .arg(&file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start tinyproxy");
        let proxy = Self {
            port,
            log,
            child,
            _dir: dir,
        };
        wait_listening(port, "tinyproxy").await;
        Some(proxy)
    }

    fn url(&self, credentials: &str) -> String {
        format!("http://{credentials}@127.0.0.1:{}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// How many requests tinyproxy logged whose request line contains `needle`.
    fn requests(&self, needle: &str) -> usize {
        self.log()
            .lines()
            .filter(|l| l.contains("Request (file descriptor") && l.contains(needle))
            .count()
    }
}

impl Drop for Tinyproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn token_and_https_upstream_go_through_tinyproxy_with_tls_end_to_end() {
    let backend = Backend::start().await;
    let Some(tinyproxy) = Tinyproxy::start(&[backend.port]).await else {
        return;
    };
    let toml = backend_config(&backend).server(|s| s.outbound_proxy(tinyproxy.url("user:pass")));
    let proxy = Proxy::start_with(&toml).await;
    let answer = get(&client(), &proxy.url("/api/x")).await;
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    let body = answer.json();
    assert_eq!(body["authorization"], "Bearer proxied-token-1");
    // HTTP/2 by ALPN: the TLS handshake ran with the backend itself, inside the tunnel.
    assert_eq!(body["version"], "HTTP/2.0");
    assert_eq!(body["path"], "/api/x");
    assert_eq!(body["proxy_authorization"], serde_json::Value::Null);
    let connect = format!("CONNECT localhost:{}", backend.port);
    assert!(
        eventually(Duration::from_secs(5), || tinyproxy.requests(&connect) >= 2).await,
        "tinyproxy did not log a CONNECT for both the token and the upstream request:\n{}",
        tinyproxy.log()
    );
    assert_eq!(backend.tokens.load(Ordering::SeqCst), 1);
    proxy.stop().await;
}

#[tokio::test]
async fn no_proxy_hosts_go_direct_and_plain_http_goes_through_in_absolute_form() {
    let issuer = Issuer::start(Dialect::OAuth2).await;
    let direct = Upstream::start().await;
    let proxied = Upstream::start().await;
    let Some(tinyproxy) = Tinyproxy::start(&[443]).await else {
        return;
    };
    let toml = TestConfig::default()
        .server(|s| {
            s.token_wait("5s")
                .outbound_proxy(tinyproxy.url("user:pass"))
                .no_proxy(["127.0.0.1", ".example.invalid"])
        })
        .with_provider("p", ProviderSection::new(&issuer.url(), "c", SECRET))
        .route(
            RouteSection::to(&format!("http://127.0.0.1:{}", direct.addr.port()), "p")
                .path_prefix("/direct"),
        )
        .route(
            RouteSection::to(&format!("http://localhost:{}", proxied.addr.port()), "p")
                .path_prefix("/via"),
        );
    let proxy = Proxy::start_with(&toml).await;
    let answer = get(&client(), &proxy.url("/direct/a")).await;
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    assert_eq!(answer.echoed("authorization"), ["Bearer tok-1"]);
    assert!(answer.echoed("via").is_empty(), "went through a proxy");

    let answer = get(&client(), &proxy.url("/via/b?q=1")).await;
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    assert_eq!(answer.echoed("authorization"), ["Bearer tok-1"]);
    let via = answer.echoed("via");
    assert!(
        via.iter().any(|v| v.contains("tinyproxy")),
        "no Via from tinyproxy: {via:?}"
    );
    assert!(answer.echoed("proxy-authorization").is_empty());
    assert_eq!(
        tinyproxy.requests(&format!(
            "GET http://localhost:{}/b?q=1 ",
            proxied.addr.port()
        )),
        1,
        "{}",
        tinyproxy.log()
    );
    for port in [issuer.addr.port(), direct.addr.port()] {
        assert!(
            !tinyproxy.log().contains(&format!(":{port}")),
            "a no_proxy host went through the proxy:\n{}",
            tinyproxy.log()
        );
    }
    assert_eq!(issuer.hits(), 1);
    proxy.stop().await;
}

#[tokio::test]
async fn a_proxy_refusing_the_tunnel_gives_502_naming_it_and_its_status() {
    let backend = Backend::start().await;
    // tinyproxy refuses CONNECT to a port not listed in ConnectPort: 403.
    let Some(tinyproxy) = Tinyproxy::start(&[443]).await else {
        return;
    };
    let toml = backend_config(&backend).server(|s| s.outbound_proxy(tinyproxy.url("user:pass")));
    let proxy = Proxy::start_with(&toml).await;
    let answer = get(&client(), &proxy.url("/open/x")).await;
    assert_eq!(
        answer.status,
        502,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    assert_eq!(answer.json()["error"], "upstream_unreachable");
    let message = answer.json()["message"].as_str().unwrap().to_owned();
    let shown = format!("http://***@127.0.0.1:{}", tinyproxy.port);
    assert!(message.contains(&shown), "{message}");
    assert!(message.contains("403"), "{message}");
    assert!(
        message.contains(&format!("localhost:{}", backend.port)),
        "{message}"
    );
    assert!(!message.contains("pass"), "{message}");
    assert_eq!(backend.requests.load(Ordering::SeqCst), 0);
    // The token client's error names the proxy and the status too.
    let token_error = last_token_error(&proxy).await;
    assert!(
        token_error.contains(&format!("{shown} refused the tunnel"))
            && token_error.contains("it answered 403"),
        "{token_error}"
    );
    proxy.stop().await;

    // Credentials refused: tinyproxy answers 401 to wrong ones and 407 to none.
    let open = tinyproxy_open(&backend).await;
    for (credentials, status) in [("user:wrong-pass", "401"), ("", "407")] {
        let url = if credentials.is_empty() {
            format!("http://127.0.0.1:{}", open.port)
        } else {
            open.url(credentials)
        };
        let proxy =
            Proxy::start_with(&backend_config(&backend).server(|s| s.outbound_proxy(&url))).await;
        let answer = get(&client(), &proxy.url("/open/x")).await;
        assert_eq!(
            answer.status,
            502,
            "{}",
            String::from_utf8_lossy(&answer.body)
        );
        let message = answer.json()["message"].as_str().unwrap().to_owned();
        let shown = url.replace("user:wrong-pass", "***");
        assert!(
            message.contains(&format!("{shown} refused the tunnel")),
            "{message}"
        );
        assert!(
            message.contains(&format!("it answered {status}")),
            "{message}"
        );
        assert!(!message.contains("wrong-pass"), "{message}");
        let token_error = last_token_error(&proxy).await;
        assert!(
            token_error.contains(&format!("{shown} refused the tunnel"))
                && token_error.contains(&format!("it answered {status}")),
            "{token_error}"
        );
        assert!(!token_error.contains("wrong-pass"), "{token_error}");
        proxy.stop().await;
    }
    assert_eq!(backend.requests.load(Ordering::SeqCst), 0);

    // Proxy down: 502 naming it.
    let proxy = Proxy::start_with(&toml).await;
    drop(tinyproxy);
    let answer = get(&client(), &proxy.url("/open/y")).await;
    assert_eq!(
        answer.status,
        502,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    let message = answer.json()["message"].as_str().unwrap().to_owned();
    assert!(
        message.contains(&shown) && message.contains("unreachable"),
        "{message}"
    );
    proxy.stop().await;
}

/// Provider `p`'s last token fetch error, once there is one.
async fn last_token_error(proxy: &Proxy) -> String {
    let slot = proxy.store.slot("p").expect("provider p");
    assert!(
        eventually(Duration::from_secs(10), || slot
            .status()
            .last_error
            .is_some())
        .await,
        "no token fetch failed"
    );
    slot.status().last_error.unwrap_or_default()
}

/// A tinyproxy that allows CONNECT to the backend (the test was skipped before if
/// tinyproxy is missing, so here it must start).
async fn tinyproxy_open(backend: &Backend) -> Tinyproxy {
    Tinyproxy::start(&[backend.port])
        .await
        .expect("tinyproxy started a moment ago")
}

// === The real binary: wrong credentials, `env` mode, `check` ===

/// A `bearer-proxy run` child with its stderr in a file; killed on drop.
struct Running {
    child: Child,
    port: u16,
    admin: u16,
    stderr: PathBuf,
    _dir: tempfile::TempDir,
}

impl Running {
    /// Runs `toml` (its `listen`/`admin_listen` set here) with `env` added.
    async fn start(toml: &TestConfig, env: &[(&str, String)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (port, admin) = (free_port(), free_port());
        let toml = toml.clone().server(|s| {
            s.listen(format!("127.0.0.1:{port}"))
                .admin_listen(format!("127.0.0.1:{admin}"))
        });
        let file = dir.path().join("proxy.toml");
        std::fs::write(&file, toml.render()).unwrap();
        let stderr = dir.path().join("stderr.log");
        let mut cmd = bin_command(&["run", "-c", file.to_str().unwrap()]);
        cmd.stderr(std::fs::File::create(&stderr).unwrap());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn bearer-proxy");
        let running = Self {
            child,
            port,
            admin,
            stderr,
            _dir: dir,
        };
        wait_listening(port, "bearer-proxy").await;
        running
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The binary with no proxy variables of the test's own environment.
fn bin_command(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_bearer-proxy"));
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::null());
    for var in [
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "ALL_PROXY",
        "all_proxy",
        "NO_PROXY",
        "no_proxy",
        "RUST_LOG",
        "BEARER_PROXY_CONFIG",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

#[tokio::test]
async fn wrong_proxy_credentials_give_502_and_503_naming_407_without_the_credentials() {
    let backend = Backend::start().await;
    let recorder = RecordingProxy::start_requiring(Some("user:right-pass")).await;
    let wrong = "user:wrong-proxy-pass";
    let toml = backend_config(&backend).server(|s| {
        s.outbound_proxy(format!("http://{wrong}@127.0.0.1:{}", recorder.port))
            .token_wait("1s")
    });
    let running = Running::start(&toml, &[]).await;
    let shown = format!("http://***@127.0.0.1:{}", recorder.port);

    let answer = get(&client(), &running.url("/open/x")).await;
    assert_eq!(
        answer.status,
        502,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    assert_eq!(answer.json()["error"], "upstream_unreachable");
    let upstream_message = answer.json()["message"].as_str().unwrap().to_owned();
    assert!(
        upstream_message.contains(&shown)
            && upstream_message.contains("407 Proxy Authentication Required"),
        "{upstream_message}"
    );

    let answer = get(&client(), &running.url("/api/x")).await;
    assert_eq!(
        answer.status,
        503,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    assert_eq!(answer.json()["error"], "token_unavailable");
    let token_message = answer.json()["message"].as_str().unwrap().to_owned();
    assert!(
        token_message.contains(&shown) && token_message.contains("407"),
        "{token_message}"
    );
    let tokens = get(
        &client(),
        &format!("http://127.0.0.1:{}/tokens", running.admin),
    )
    .await;
    let tokens_text = String::from_utf8_lossy(&tokens.body).into_owned();
    assert!(
        tokens_text.contains(&shown) && tokens_text.contains("407"),
        "{tokens_text}"
    );

    let basic = base64::engine::general_purpose::STANDARD.encode(wrong);
    // The request log line and the token fetch warning are written as they happen.
    assert!(
        eventually(Duration::from_secs(5), || running.logs().contains(&shown)).await,
        "the logs do not name the proxy:\n{}",
        running.logs()
    );
    let logs = running.logs();
    for text in [&upstream_message, &token_message, &tokens_text, &logs] {
        assert!(!text.contains("wrong-proxy-pass"), "{text}");
        assert!(!text.contains(&basic), "{text}");
        assert!(!text.contains(SECRET), "{text}");
    }
    // The proxy did see the (wrong) credentials: they were sent, and only to it.
    assert!(recorder.conns().iter().all(
        |c| head_headers(&c.head).get("proxy-authorization") == Some(&format!("Basic {basic}"))
    ));
    assert_eq!(backend.requests.load(Ordering::SeqCst), 0);
    assert_eq!(backend.tokens.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn env_mode_reads_https_proxy_and_no_proxy_and_is_ignored_otherwise() {
    let backend = Backend::start().await;
    let Some(tinyproxy) = Tinyproxy::start(&[backend.port]).await else {
        return;
    };
    let upstream = Upstream::start().await;
    let direct_route = RouteSection::open(&format!("http://127.0.0.1:{}", upstream.addr.port()))
        .path_prefix("/plain");
    let env = [
        ("https_proxy", tinyproxy.url("user:pass")),
        // A proxy for http:// that does not exist: only NO_PROXY keeps /plain working.
        ("HTTP_PROXY", format!("http://127.0.0.1:{}", free_port())),
        ("NO_PROXY", "127.0.0.1".to_owned()),
    ];
    let toml = backend_config(&backend)
        .server(|s| s.outbound_proxy("env"))
        .route(direct_route.clone());

    // `check` shows the proxies from the environment, without credentials.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("check.toml");
    std::fs::write(&file, toml.render()).unwrap();
    let mut check = bin_command(&["check", "-c", file.to_str().unwrap()]);
    check.stdout(Stdio::piped()).stderr(Stdio::piped());
    for (k, v) in &env {
        check.env(k, v);
    }
    let out = check.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!(
            "https:// via http://***@127.0.0.1:{}",
            tinyproxy.port
        )),
        "{stdout}"
    );
    assert!(!stdout.contains("user:pass"), "{stdout}");

    let running = Running::start(&toml, &env).await;
    let answer = get(&client(), &running.url("/api/x")).await;
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    assert_eq!(answer.json()["authorization"], "Bearer proxied-token-1");
    let answer = get(&client(), &running.url("/plain/y")).await;
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    let connect = format!("CONNECT localhost:{}", backend.port);
    assert!(
        eventually(Duration::from_secs(5), || tinyproxy.requests(&connect) >= 2).await,
        "{}",
        tinyproxy.log()
    );
    drop(running);

    // Without outbound_proxy the same environment is ignored: direct connections.
    let before = tinyproxy.requests(&connect);
    let toml = backend_config(&backend).route(direct_route);
    let running = Running::start(&toml, &env).await;
    let answer = get(&client(), &running.url("/api/x")).await;
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    let answer = get(&client(), &running.url("/plain/y")).await;
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    assert_eq!(tinyproxy.requests(&connect), before, "{}", tinyproxy.log());
}

// === A recording proxy: what crossed the wire ===

/// One connection the recording proxy accepted.
#[derive(Clone, Debug, Default)]
struct Conn {
    /// The request head, as received.
    head: String,
    /// Every byte the client sent after the head, and every byte sent back to it.
    from_client: Vec<u8>,
    to_client: Vec<u8>,
}

/// A small forward proxy over TCP: `CONNECT host:port` (answered 200, then bytes
/// copied both ways) and absolute-form requests (passed on as they are). Records all.
#[derive(Clone)]
struct RecordingProxy {
    port: u16,
    conns: Arc<Mutex<Vec<Arc<Mutex<Conn>>>>>,
}

impl RecordingProxy {
    async fn start() -> Self {
        Self::start_requiring(None).await
    }

    /// Answers 407 to requests whose `Proxy-Authorization` is not `Basic <credentials>`.
    async fn start_requiring(credentials: Option<&str>) -> Self {
        let required = credentials.map(|c| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(c)
            )
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let conns: Arc<Mutex<Vec<Arc<Mutex<Conn>>>>> = Arc::default();
        let all = conns.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let conn = Arc::new(Mutex::new(Conn::default()));
                all.lock().unwrap().push(conn.clone());
                tokio::spawn(relay(stream, conn, required.clone()));
            }
        });
        Self { port, conns }
    }

    fn conns(&self) -> Vec<Conn> {
        self.conns
            .lock()
            .unwrap()
            .iter()
            .map(|c| c.lock().unwrap().clone())
            .collect()
    }
}

async fn relay(mut client: TcpStream, conn: Arc<Mutex<Conn>>, required: Option<String>) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 64 * 1024 || !matches!(client.read(&mut byte).await, Ok(1)) {
            return;
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    conn.lock().unwrap().head = head.clone();
    if let Some(required) = required {
        if head_headers(&head).get("proxy-authorization") != Some(&required) {
            let _ = client
                .write_all(
                    b"HTTP/1.1 407 Proxy Authentication Required\r\n\
                      Proxy-Authenticate: Basic realm=\"test\"\r\nContent-Length: 0\r\n\r\n",
                )
                .await;
            return;
        }
    }
    let mut words = head.split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let authority = if method == "CONNECT" {
        target.to_owned()
    } else {
        target
            .strip_prefix("http://")
            .and_then(|rest| rest.split('/').next())
            .unwrap_or("")
            .to_owned()
    };
    let Ok(mut server) = TcpStream::connect(authority.replace("localhost", "127.0.0.1")).await
    else {
        let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
        return;
    };
    if method == "CONNECT" {
        let _ = client
            .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            .await;
    } else {
        let _ = server.write_all(head.as_bytes()).await;
    }
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let up = {
        let conn = conn.clone();
        async move {
            let mut buf = vec![0u8; 16 * 1024];
            while let Ok(n @ 1..) = client_read.read(&mut buf).await {
                conn.lock()
                    .unwrap()
                    .from_client
                    .extend_from_slice(&buf[..n]);
                if server_write.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    };
    let down = async move {
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(n @ 1..) = server_read.read(&mut buf).await {
            conn.lock().unwrap().to_client.extend_from_slice(&buf[..n]);
            if client_write.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
    };
    tokio::join!(up, down);
}

/// The request head's headers, names lower-cased.
fn head_headers(head: &str) -> HashMap<String, String> {
    head.lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn on_the_wire_only_connect_with_proxy_authorization_then_tls() {
    let backend = Backend::start().await;
    let recorder = RecordingProxy::start().await;
    let toml = backend_config(&backend).server(|s| {
        s.outbound_proxy(format!(
            "http://wire-user:wire-pass@127.0.0.1:{}",
            recorder.port
        ))
    });
    let proxy = Proxy::start_with(&toml).await;
    for path in ["/api/one", "/api/two", "/open/three"] {
        let answer = get(&client(), &proxy.url(path)).await;
        assert_eq!(
            answer.status,
            200,
            "{}",
            String::from_utf8_lossy(&answer.body)
        );
    }
    let conns = recorder.conns();
    assert!(
        conns.len() >= 2,
        "token and upstream connections: {conns:?}"
    );
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("wire-user:wire-pass")
    );
    for conn in &conns {
        let first_line = conn.head.lines().next().unwrap_or("");
        assert_eq!(
            first_line,
            format!("CONNECT localhost:{} HTTP/1.1", backend.port),
            "{conn:?}"
        );
        assert_eq!(
            head_headers(&conn.head).get("proxy-authorization"),
            Some(&basic),
            "{}",
            conn.head
        );
        // TLS from the first byte: a handshake record (0x16) carrying a ClientHello (1).
        assert_eq!(conn.from_client.first(), Some(&0x16), "{conn:?}");
        assert_eq!(conn.from_client.get(5), Some(&0x01), "not a ClientHello");
        assert_eq!(conn.to_client.first(), Some(&0x16), "no TLS ServerHello");
        for secret in [
            SECRET.as_bytes(),
            b"proxied-token-1",
            b"Bearer",
            b"proxied-client",
            b"/oauth/token",
            b"/api/one",
        ] {
            assert!(
                !contains(&conn.from_client, secret) && !contains(&conn.to_client, secret),
                "{} crossed the proxy in clear",
                String::from_utf8_lossy(secret)
            );
        }
        assert!(!conn.head.contains(SECRET) && !conn.head.contains("Bearer"));
    }
    assert_eq!(backend.tokens.load(Ordering::SeqCst), 1);
    assert_eq!(backend.requests.load(Ordering::SeqCst), 3);
    proxy.stop().await;
}

#[tokio::test]
async fn on_the_wire_plain_http_is_absolute_form_with_proxy_authorization() {
    let issuer = Issuer::start(Dialect::OAuth2).await;
    let upstream = Upstream::start().await;
    let recorder = RecordingProxy::start().await;
    let toml = outbound_config(
        &issuer,
        &format!("http://u%40corp:p%3Ass@127.0.0.1:{}", recorder.port),
        &format!("http://localhost:{}/base", upstream.addr.port()),
    );
    let proxy = Proxy::start_with(&toml).await;
    let answer = get(&client(), &proxy.url("/x?y=1")).await;
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    let conns = recorder.conns();
    assert_eq!(conns.len(), 1, "only the upstream goes through: {conns:?}");
    let head = &conns[0].head;
    assert!(
        head.starts_with(&format!(
            "GET http://localhost:{}/base/x?y=1 HTTP/1.1\r\n",
            upstream.addr.port()
        )),
        "{head}"
    );
    // Percent-encoded credentials are decoded before they are encoded for Basic.
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("u@corp:p:ss")
    );
    assert_eq!(head_headers(head).get("proxy-authorization"), Some(&basic));
    proxy.stop().await;
}

#[tokio::test]
async fn check_shows_the_proxy_without_credentials_and_rejects_bad_settings() {
    let dir = tempfile::tempdir().unwrap();
    // The secret comes from the environment, so `check` has one to hide.
    let base = |server: ServerSection| {
        // No listen address: `check` takes the default.
        TestConfig {
            server,
            ..TestConfig::default()
        }
        .with_provider(
            "p",
            ProviderSection::new("https://auth.example.com/t", "c", "${S}"),
        )
        .route(RouteSection::to("https://api.example.com", "p"))
    };
    let run = |toml: TestConfig| {
        let file = dir.path().join("c.toml");
        std::fs::write(&file, toml.render()).unwrap();
        let mut cmd = bin_command(&["check", "-c", file.to_str().unwrap()]);
        cmd.env("S", "s3cret-value")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let out = cmd.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (code, out) = run(base(
        ServerSection::default()
            .outbound_proxy("http://corp-user:corp-pass@proxy.corp:3128")
            .no_proxy(["localhost", ".corp.example", "10.0.0.0/8"]),
    ));
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("outbound proxy (outbound_proxy): http://***@proxy.corp:3128; direct: localhost, .corp.example, 10.0.0.0/8"),
        "{out}"
    );
    assert!(
        !out.contains("corp-pass") && !out.contains("corp-user"),
        "{out}"
    );

    let s = ServerSection::default;
    for (server, needle) in [
        (
            s().outbound_proxy("https://corp-user:corp-pass@proxy.corp:3128"),
            "server.outbound_proxy: is an https:// proxy",
        ),
        (
            s().outbound_proxy("proxy.corp:3128"),
            "server.outbound_proxy: must start with http://",
        ),
        (
            s().outbound_proxy("http://proxy.corp:3128")
                .no_proxy(["*.corp"]),
            "server.no_proxy[0]",
        ),
        (s().no_proxy(["localhost"]), "server.outbound_proxy is not"),
    ] {
        let (code, out) = run(base(server.clone()));
        assert_eq!(code, Some(1), "{server}: {out}");
        assert!(out.contains(needle), "{server}: {out}");
        assert!(!out.contains("corp-pass"), "{out}");
    }
}

#[tokio::test]
async fn a_reload_that_changes_the_proxy_says_it_needs_a_restart() {
    let issuer = Issuer::start(Dialect::OAuth2).await;
    let upstream = Upstream::start().await;
    let recorder = RecordingProxy::start().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bp.toml");
    let toml = TestConfig::basic(&issuer, &upstream);
    std::fs::write(&file, toml.render()).unwrap();
    let proxy = Proxy::start_config(bearer_proxy::config::load(&file).unwrap()).await;
    assert_eq!(get(&client(), &proxy.url("/x")).await.status, 200);

    let with_proxy = toml
        .server(|s| s.outbound_proxy(format!("http://u:reload-pass@127.0.0.1:{}", recorder.port)));
    std::fs::write(&file, with_proxy.render()).unwrap();
    let report = proxy.shared.reload().await.expect("reload");
    assert_eq!(
        report.listener_changes,
        ["outbound_proxy/no_proxy changed"],
        "{report:?}"
    );
    assert!(!format!("{report:?}").contains("reload-pass"));
    // The running clients are unchanged until the restart: still direct.
    assert_eq!(get(&client(), &proxy.url("/y")).await.status, 200);
    assert!(recorder.conns().is_empty());
    proxy.stop().await;
}

#[test]
fn env_mode_in_the_config_names_bad_variables_and_warns_when_none_is_set() {
    use bearer_proxy::config::Config;
    let toml = "[server]\noutbound_proxy = \"env\"\nno_proxy = [\"internal.corp\"]\n\
                [[routes]]\nupstream = \"https://api.example.com\"\n";
    let path = std::path::Path::new("env.toml");
    let config = Config::parse(toml, path, &|name| match name {
        "HTTPS_PROXY" => Some("http://a:b@proxy.corp:3128".to_owned()),
        "no_proxy" => Some("localhost".to_owned()),
        _ => None,
    })
    .unwrap();
    let outbound = config
        .server
        .outbound
        .expect("a proxy from the environment");
    assert_eq!(
        outbound.https.as_ref().map(|p| p.shown()),
        Some("http://***@proxy.corp:3128")
    );
    assert!(
        outbound.http.is_none(),
        "HTTP_PROXY and ALL_PROXY are unset"
    );
    assert_eq!(outbound.no_proxy, ["localhost", "internal.corp"]);
    assert!(config.warnings.is_empty());

    let config = Config::parse(toml, path, &|_| None).unwrap();
    assert!(config.server.outbound.is_none());
    assert!(
        config
            .warnings
            .iter()
            .any(|w| w.contains("connecting directly")),
        "{:?}",
        config.warnings
    );

    let err = Config::parse(toml, path, &|name| {
        (name == "ALL_PROXY").then(|| "socks5://u:pw-in-env@proxy:1080".to_owned())
    })
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("server.outbound_proxy") && err.contains("ALL_PROXY"),
        "{err}"
    );
    assert!(!err.contains("pw-in-env"), "{err}");
}

#[tokio::test]
async fn preserve_host_routes_tunnel_to_their_upstream_so_the_client_host_never_steers_the_proxy() {
    let issuer = Issuer::start(Dialect::OAuth2).await;
    let upstream = Upstream::start().await;
    let recorder = RecordingProxy::start().await;
    let toml = preserve_host_config(&issuer, &recorder, upstream.addr.port());
    let proxy = Proxy::start_with(&toml).await;
    let request = http::Request::get(proxy.url("/x"))
        .header("host", "elsewhere.example:8443")
        .body(full(""))
        .unwrap();
    let answer = send(&client(), request).await;
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    assert_eq!(answer.echoed("host"), ["elsewhere.example:8443"]);
    assert!(answer.echoed("proxy-authorization").is_empty());
    assert_eq!(answer.json()["uri"], "/x");
    let conns = recorder.conns();
    assert_eq!(conns.len(), 1, "{conns:?}");
    assert!(
        conns[0].head.starts_with(&format!(
            "CONNECT localhost:{} HTTP/1.1\r\n",
            upstream.addr.port()
        )),
        "{}",
        conns[0].head
    );
    assert!(head_headers(&conns[0].head).contains_key("proxy-authorization"));
    proxy.stop().await;
}

#[tokio::test]
async fn preserve_host_websocket_handshakes_tunnel_to_their_upstream_too() {
    use crate::interop::websocket::{connect, next, WsServer};
    use tokio_tungstenite::tungstenite::Message;

    let issuer = Issuer::start(Dialect::OAuth2).await;
    let server = WsServer::start().await;
    let recorder = RecordingProxy::start().await;
    let toml = preserve_host_config(&issuer, &recorder, server.addr.port());
    let proxy = Proxy::start_with(&toml).await;
    proxy.token_ready(Duration::from_secs(5)).await;
    let mut ws = connect(
        &format!("ws://{}/chat", proxy.addr),
        Some("elsewhere.example:8443"),
    )
    .await
    .expect("handshake through the tunnel");
    assert_eq!(next(&mut ws).await, Message::text("hello from the server"));
    let seen = server.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].host.as_deref(), Some("elsewhere.example:8443"));
    assert_eq!(
        seen[0].authorization,
        Some(format!("Bearer {}", issuer.token(1)))
    );
    let conns = recorder.conns();
    assert_eq!(conns.len(), 1, "{conns:?}");
    // A tunnel to the route's upstream: the proxy never sees the handshake, its Host
    // or its token.
    assert!(
        conns[0].head.starts_with(&format!(
            "CONNECT localhost:{} HTTP/1.1\r\n",
            server.addr.port()
        )),
        "{}",
        conns[0].head
    );
    assert!(!conns[0].head.contains("elsewhere") && !conns[0].head.contains("Bearer"));
    ws.close(None).await.unwrap();
    proxy.stop().await;
}

#[tokio::test]
async fn the_token_command_goes_through_the_proxy_too() {
    let backend = Backend::start().await;
    let recorder = RecordingProxy::start().await;
    let toml = backend_config(&backend)
        .server(|s| s.outbound_proxy(format!("http://u:p@127.0.0.1:{}", recorder.port)));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token.toml");
    std::fs::write(&file, toml.render()).unwrap();
    let mut cmd = bin_command(&["token", "-c", file.to_str().unwrap(), "p"]);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    // Off the runtime: the backend and the recorder run on it.
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::task::spawn_blocking(move || cmd.output().unwrap()),
    )
    .await
    .expect("token command timed out")
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.trim(), "proxied-token-1");
    let conns = recorder.conns();
    assert_eq!(conns.len(), 1, "{conns:?}");
    assert!(conns[0]
        .head
        .starts_with(&format!("CONNECT localhost:{} ", backend.port)));
}
