//! nginx (the Debian package) as the upstream: over HTTPS, one server block speaking
//! HTTP/2 by ALPN and one HTTP/1.1 only; over plain http, two blocks with different
//! keep-alive limits, reached through the proxy's own HTTP/1.1 pool (`h1pool`). All of
//! them proxy to the in-process echo upstream so the test sees exactly what arrived.
//! nginx refuses an HTTP/2 request that carries a `host` field beside `:authority`
//! (400), which is what the HTTPS tests guard against; the plain blocks name the nginx
//! connection of every answer, which is how the pool tests tell reuse from redialling.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use http::Request;
use sha2::Digest;

use super::require;
use crate::support::*;

/// A running nginx with its own prefix, logs and temp dirs in a temporary directory.
pub struct Nginx {
    child: tokio::process::Child,
    pub dir: tempfile::TempDir,
    /// `listen ... ssl http2`: HTTP/2 when the client offers it by ALPN.
    pub h2_port: u16,
    /// `listen ... ssl`: HTTP/1.1 only.
    pub h1_port: u16,
    /// Plain http, `keepalive_timeout 1s; keepalive_requests 4;`.
    pub http_port: u16,
    /// Plain http, `keepalive_timeout 60s;`.
    pub http_long_port: u16,
    /// The self-signed certificate for `localhost`, to trust as `extra_ca_file`.
    pub ca_file: PathBuf,
}

/// The part of nginx.conf that every server block shares: `/base/` goes to the echo
/// upstream with the Host and protocol nginx saw, `/base/nocontent` is a 204 of nginx's
/// own, `/base/conn` answers nginx's connection serial number, `/base/static/` serves a
/// file (ETag, so a conditional GET gets 304) and `/base/ws/` passes WebSocket
/// handshakes on to `ws` with the Host nginx saw.
fn locations(dir: &std::path::Path, echo: SocketAddr, ws: SocketAddr) -> String {
    format!(
        r#"
        ssl_certificate {dir}/cert.pem;
        ssl_certificate_key {dir}/key.pem;
        location /base/ {{
            proxy_pass http://{echo}/;
            proxy_http_version 1.1;
            proxy_request_buffering off;
            proxy_buffering off;
            proxy_set_header X-Seen-Host $http_host;
            proxy_set_header X-Seen-Protocol $server_protocol;
        }}
        location /base/ws/ {{
            proxy_pass http://{ws}/;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_set_header Host $http_host;
        }}
        location = /base/nocontent {{
            return 204;
        }}
        location = /base/conn {{
            return 200 "$connection";
        }}
        location /base/static/ {{
            alias {dir}/www/;
        }}
        location / {{
            return 404;
        }}
"#,
        dir = dir.display()
    )
}

impl Nginx {
    /// Starts nginx in front of `echo` (and `ws` for WebSocket); `None` when nginx is not
    /// installed (and not in CI).
    pub async fn start(echo: SocketAddr, ws: SocketAddr) -> Option<Self> {
        let program = require("nginx")?;
        let dir = tempfile::tempdir().expect("tempdir");
        let cert =
            rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("certificate");
        std::fs::write(dir.path().join("cert.pem"), cert.cert.pem()).unwrap();
        std::fs::write(dir.path().join("key.pem"), cert.signing_key.serialize_pem()).unwrap();
        std::fs::create_dir(dir.path().join("www")).unwrap();
        std::fs::write(dir.path().join("www/hello.txt"), "hello from nginx\n").unwrap();
        // A port taken between choosing and nginx binding it: try again with others.
        for _attempt in 0..3 {
            let (h2_port, h1_port) = (free_port(), free_port());
            let (http_port, http_long_port) = (free_port(), free_port());
            let d = dir.path().display();
            let conf = format!(
                r#"
daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    client_max_body_size 64m;
    server {{
        listen 127.0.0.1:{h2_port} ssl http2;
        server_name localhost;
        {loc}
    }}
    server {{
        listen 127.0.0.1:{h1_port} ssl;
        server_name localhost;
        {loc}
    }}
    # `$connection` tells which connection carried each answer; `always` puts it on
    # 204 and 304 too.
    server {{
        listen 127.0.0.1:{http_port};
        server_name localhost;
        keepalive_timeout 1s;
        keepalive_requests 4;
        add_header X-Nginx-Connection $connection always;
        {loc}
    }}
    server {{
        listen 127.0.0.1:{http_long_port};
        server_name localhost;
        keepalive_timeout 60s;
        add_header X-Nginx-Connection $connection always;
        {loc}
    }}
}}
"#,
                loc = locations(dir.path(), echo, ws)
            );
            let conf_path = dir.path().join("nginx.conf");
            std::fs::write(&conf_path, conf).unwrap();
            let mut child = tokio::process::Command::new(&program)
                .arg("-p")
                .arg(dir.path())
                .arg("-c")
                .arg(&conf_path)
                .arg("-e")
                .arg(dir.path().join("error.log"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .expect("spawn nginx");
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // exited: most likely a port clash; retry
                }
                let up = |port| tokio::net::TcpStream::connect(("127.0.0.1", port));
                let mut all_up = true;
                for port in [h2_port, h1_port, http_port, http_long_port] {
                    all_up = all_up && up(port).await.is_ok();
                }
                if all_up {
                    return Some(Self {
                        child,
                        ca_file: dir.path().join("cert.pem"),
                        dir,
                        h2_port,
                        h1_port,
                        http_port,
                        http_long_port,
                    });
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "nginx did not start listening: {}",
                    std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        panic!(
            "nginx would not start: {}",
            std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default()
        );
    }

    /// nginx's error log, for assertion messages.
    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// Six routes to nginx: HTTP/2 and HTTP/1.1 server blocks, each with and without
/// `preserve_host`, and the two plain-http blocks (`/plain`, `/plain-long`) without it
/// (with it, they would go through a pinned client rather than the direct pool).
fn nginx_config(issuer: &Issuer, nginx: &Nginx) -> TestConfig {
    let route = |prefix: &str, port: u16, preserve: bool| {
        RouteSection::to(&format!("https://localhost:{port}/base"), "p")
            .path_prefix(prefix)
            .preserve_host(preserve)
    };
    TestConfig::default()
        .server(|s| {
            s.extra_ca_file(nginx.ca_file.display().to_string())
                .connect_timeout("5s")
                .upstream_timeout("30s")
        })
        .with_provider(
            "p",
            ProviderSection::new(&issuer.url(), "c", "secret-value"),
        )
        .route(route("/h2", nginx.h2_port, false))
        .route(route("/h2-host", nginx.h2_port, true))
        .route(route("/h1", nginx.h1_port, false))
        .route(route("/h1-host", nginx.h1_port, true))
        .route(
            RouteSection::to(&format!("http://127.0.0.1:{}/base", nginx.http_port), "p")
                .path_prefix("/plain"),
        )
        .route(
            RouteSection::to(
                &format!("http://127.0.0.1:{}/base", nginx.http_long_port),
                "p",
            )
            .path_prefix("/plain-long"),
        )
}

const FOUR_MIB: u64 = 4 * 1024 * 1024;
const CLIENT_HOST: &str = "api.example.test:8443";

/// One route's checks: what nginx saw (protocol, Host, token, path), bodies both ways,
/// HEAD, and nginx's own 204 and 304.
async fn exercise(proxy: &Proxy, nginx: &Nginx, issuer: &Issuer, prefix: &str) {
    let c = client();
    let h2 = prefix.starts_with("/h2");
    let preserve = prefix.ends_with("-host");
    let (port, host) = match prefix {
        "/plain" => (nginx.http_port, "127.0.0.1"),
        "/plain-long" => (nginx.http_long_port, "127.0.0.1"),
        _ if h2 => (nginx.h2_port, "localhost"),
        _ => (nginx.h1_port, "localhost"),
    };
    let expected_host = if preserve {
        CLIENT_HOST.to_owned()
    } else {
        format!("{host}:{port}")
    };
    let with_host = |builder: http::request::Builder| {
        if preserve {
            builder.header("host", CLIENT_HOST)
        } else {
            builder
        }
    };
    let ctx = |what: &str| format!("{prefix} {what}; nginx error log:\n{}", nginx.error_log());

    // GET: nginx accepted it and passed on what it saw.
    let req = with_host(Request::get(proxy.url(&format!("{prefix}/x?q=1&b=%20"))))
        .body(full(""))
        .unwrap();
    let ans = send(&c, req).await;
    assert_eq!(
        ans.status,
        200,
        "{}",
        ctx(&String::from_utf8_lossy(&ans.body))
    );
    assert_eq!(ans.json()["uri"], "/x?q=1&b=%20", "{prefix}");
    assert_eq!(
        ans.echoed("x-seen-protocol"),
        [if h2 { "HTTP/2.0" } else { "HTTP/1.1" }],
        "{prefix}"
    );
    assert_eq!(
        ans.echoed("x-seen-host"),
        [expected_host.as_str()],
        "{prefix}"
    );
    assert_eq!(
        ans.echoed("authorization"),
        [format!("Bearer {}", issuer.token(1))],
        "{prefix}"
    );

    // POST 4 MiB up.
    let req = with_host(Request::post(proxy.url(&format!("{prefix}/upload"))))
        .body(stream_bytes(FOUR_MIB))
        .unwrap();
    let ans = send(&c, req).await;
    assert_eq!(ans.status, 200, "{}", ctx("upload"));
    assert_eq!(ans.json()["body_len"], FOUR_MIB, "{prefix}");
    assert_eq!(
        ans.json()["body_sha256"],
        stream_sha256(FOUR_MIB),
        "{prefix}"
    );
    assert_eq!(
        ans.echoed("x-seen-host"),
        [expected_host.as_str()],
        "{prefix}"
    );

    // 4 MiB down, chunked by the echo (no Content-Length) and streamed by nginx.
    let req = with_host(Request::get(
        proxy.url(&format!("{prefix}/download/{FOUR_MIB}")),
    ))
    .body(full(""))
    .unwrap();
    let ans = send(&c, req).await;
    assert_eq!(ans.status, 200, "{}", ctx("download"));
    assert!(
        ans.headers.get("content-length").is_none(),
        "{prefix}: a chunked answer"
    );
    assert_eq!(ans.body.len() as u64, FOUR_MIB, "{prefix}");
    assert_eq!(
        hex(&sha2::Sha256::digest(&ans.body)),
        stream_sha256(FOUR_MIB),
        "{prefix}"
    );

    // HEAD: headers only.
    let req = with_host(Request::head(proxy.url(&format!("{prefix}/x"))))
        .body(full(""))
        .unwrap();
    let ans = send(&c, req).await;
    assert_eq!(ans.status, 200, "{}", ctx("HEAD"));
    assert!(ans.body.is_empty(), "{prefix}: HEAD has no body");

    // nginx's own 204.
    let req = with_host(Request::get(proxy.url(&format!("{prefix}/nocontent"))))
        .body(full(""))
        .unwrap();
    let ans = send(&c, req).await;
    assert_eq!(ans.status, 204, "{}", ctx("204"));
    assert!(ans.body.is_empty());

    // A static file, then the same with its ETag: 304 without a body.
    let req = with_host(Request::get(
        proxy.url(&format!("{prefix}/static/hello.txt")),
    ))
    .body(full(""))
    .unwrap();
    let ans = send(&c, req).await;
    assert_eq!(ans.status, 200, "{}", ctx("static"));
    assert_eq!(ans.body, "hello from nginx\n");
    let etag = ans
        .headers
        .get("etag")
        .expect("nginx sends an ETag")
        .clone();
    let req = with_host(Request::get(
        proxy.url(&format!("{prefix}/static/hello.txt")),
    ))
    .header("if-none-match", etag)
    .body(full(""))
    .unwrap();
    let ans = send(&c, req).await;
    assert_eq!(ans.status, 304, "{}", ctx("304"));
    assert!(ans.body.is_empty(), "{prefix}: 304 has no body");
}

#[tokio::test]
async fn nginx_upstream_over_http2_http1_and_plain_http_with_and_without_preserve_host() {
    let echo = Upstream::start().await;
    let Some(nginx) = Nginx::start(echo.addr, echo.addr).await else {
        return;
    };
    let issuer = Issuer::start(Dialect::OAuth2).await;
    let proxy = Proxy::start_with(&nginx_config(&issuer, &nginx)).await;
    proxy.token_ready(Duration::from_secs(5)).await;
    // The plain-http routes go through the direct pool; with `keepalive_requests 4`
    // on `/plain`, nginx closes a connection every fourth answer in the middle of it.
    for prefix in [
        "/h2",
        "/h2-host",
        "/h1",
        "/h1-host",
        "/plain",
        "/plain-long",
    ] {
        exercise(&proxy, &nginx, &issuer, prefix).await;
    }
    assert!(
        !nginx.error_log().contains("duplicate host"),
        "{}",
        nginx.error_log()
    );
    proxy.stop().await;
}

/// One worker, so one pool carries every request; open routes to the plain blocks:
/// `/short` (1 s, 4 requests a connection) and `/long` (60 s).
fn plain_pool_config(nginx: &Nginx) -> TestConfig {
    let route = |prefix: &str, port: u16| {
        RouteSection::open(&format!("http://127.0.0.1:{port}/base")).path_prefix(prefix)
    };
    TestConfig::default()
        .server(|s| s.workers(1).upstream_timeout("5s"))
        .route(route("/short", nginx.http_port))
        .route(route("/long", nginx.http_long_port))
}

/// An answer through the proxy and the nginx connection that carried it.
struct Carried {
    ans: Answer,
    conn: u64,
}

async fn carried(c: &Client, nginx: &Nginx, req: Request<TestBody>) -> Carried {
    let what = format!("{} {}", req.method(), req.uri());
    let ans = send(c, req).await;
    let conn = ans
        .headers
        .get("x-nginx-connection")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "{what}: {} without X-Nginx-Connection: {:?}; nginx error log:\n{}",
                ans.status,
                ans.body,
                nginx.error_log()
            )
        });
    Carried { ans, conn }
}

/// `GET prefix/conn`: 200, and the connection serial in the body matches the header's.
async fn conn_get(c: &Client, proxy: &Proxy, nginx: &Nginx, prefix: &str) -> u64 {
    let req = Request::get(proxy.url(&format!("{prefix}/conn")))
        .body(full(""))
        .unwrap();
    let got = carried(c, nginx, req).await;
    assert_eq!(got.ans.status, 200, "{prefix}/conn");
    assert_eq!(got.ans.body, got.conn.to_string(), "{prefix}/conn");
    got.conn
}

#[tokio::test]
async fn nginx_plain_http_connections_are_reused_until_nginx_closes_them() {
    let echo = Upstream::start().await;
    let Some(nginx) = Nginx::start(echo.addr, echo.addr).await else {
        return;
    };
    let proxy = Proxy::start_with(&plain_pool_config(&nginx)).await;
    let c = client();

    // nginx answers a connection's 4th request with `Connection: close`: that one still
    // succeeds, and the next goes on a new connection, which is then reused in turn.
    let mut serials = Vec::new();
    for _ in 0..10 {
        serials.push(conn_get(&c, &proxy, &nginx, "/short").await);
    }
    let runs: Vec<&[u64]> = serials.chunks(4).collect();
    for run in &runs {
        assert!(
            run.iter().all(|s| *s == run[0]),
            "4 requests a connection: {serials:?}"
        );
    }
    assert!(
        runs.windows(2).all(|w| w[0][0] != w[1][0]),
        "a new connection after each 4th request: {serials:?}"
    );

    // Idle past nginx's 1 s keepalive_timeout: nginx closed the pooled connection, and
    // the next request goes on another.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after_idle = conn_get(&c, &proxy, &nginx, "/short").await;
    assert!(
        !serials.contains(&after_idle),
        "a connection nginx timed out was used again: {serials:?} then {after_idle}"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn nginx_plain_http_connection_outlives_empty_answers_and_sweeps() {
    let echo = Upstream::start().await;
    let Some(nginx) = Nginx::start(echo.addr, echo.addr).await else {
        return;
    };
    let proxy = Proxy::start_with(&plain_pool_config(&nginx)).await;
    let c = client();
    let first = conn_get(&c, &proxy, &nginx, "/long").await;
    assert_eq!(conn_get(&c, &proxy, &nginx, "/long").await, first);

    // Answers without a body, each followed by a request that must find the same
    // connection: HEAD proxied by nginx and HEAD of nginx's own file, nginx's 204, and
    // a 304 to a conditional GET.
    let file = proxy.url("/long/static/hello.txt");
    let static_get = carried(&c, &nginx, Request::get(&file).body(full("")).unwrap()).await;
    assert_eq!(static_get.ans.status, 200);
    assert_eq!(static_get.conn, first);
    let etag = static_get.ans.headers["etag"].clone();
    let empty_answers = [
        (Request::head(proxy.url("/long/x")), 200),
        (Request::head(file.as_str()), 200),
        (Request::get(proxy.url("/long/nocontent")), 204),
        (
            Request::get(file.as_str()).header("if-none-match", etag),
            304,
        ),
    ];
    for (req, status) in empty_answers {
        let req = req.body(full("")).unwrap();
        let what = format!("{} {}", req.method(), req.uri());
        let got = carried(&c, &nginx, req).await;
        assert_eq!(got.ans.status, status, "{what}");
        assert!(got.ans.body.is_empty(), "{what}");
        assert_eq!(got.conn, first, "{what} came on another connection");
        assert_eq!(
            conn_get(&c, &proxy, &nginx, "/long").await,
            first,
            "the request after {what} found another connection"
        );
    }

    // Idle past two 2 s sweeps: whatever their phase, one found the connection idle for
    // a whole sweep and stripped it to its socket. nginx keeps it for 60 s, so the next
    // request goes on that very connection, handshaken again rather than redialled.
    tokio::time::sleep(Duration::from_millis(4500)).await;
    assert_eq!(conn_get(&c, &proxy, &nginx, "/long").await, first);
    proxy.stop().await;
}

/// A WebSocket session through the proxy and nginx's HTTPS listener that offers HTTP/2:
/// the handshake goes over HTTP/1.1 with the token (and the client's Host with
/// `preserve_host`), nginx passes it on, and messages flow both ways.
#[tokio::test]
async fn websocket_through_nginx_over_tls() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    use super::websocket::next;

    let ws_server = super::websocket::WsServer::start().await;
    let echo = Upstream::start().await;
    let Some(nginx) = Nginx::start(echo.addr, ws_server.addr).await else {
        return;
    };
    let issuer = Issuer::start(Dialect::OAuth2).await;
    let proxy = Proxy::start_with(&nginx_config(&issuer, &nginx)).await;
    proxy.token_ready(Duration::from_secs(5)).await;
    for (prefix, host) in [("/h2", None), ("/h2-host", Some(CLIENT_HOST))] {
        let url = format!("ws://{}{prefix}/ws/chat", proxy.addr);
        let mut ws = super::websocket::connect(&url, host)
            .await
            .unwrap_or_else(|e| panic!("{prefix}: {e}; nginx error log:\n{}", nginx.error_log()));
        assert_eq!(next(&mut ws).await, Message::text("hello from the server"));
        ws.send(Message::text("through nginx")).await.unwrap();
        assert_eq!(next(&mut ws).await, Message::text("through nginx"));
        ws.send(Message::binary(vec![9u8; 256 * 1024]))
            .await
            .unwrap();
        assert_eq!(next(&mut ws).await, Message::binary(vec![9u8; 256 * 1024]));
        ws.close(None).await.unwrap();
        while let Some(Ok(_)) = ws.next().await {}
        let seen = ws_server.seen();
        let last = seen.last().expect("a handshake reached the server");
        assert_eq!(last.path, "/chat", "{prefix}");
        assert_eq!(
            last.authorization,
            Some(format!("Bearer {}", issuer.token(1))),
            "{prefix}"
        );
        let expected_host = host.map_or(format!("localhost:{}", nginx.h2_port), str::to_owned);
        assert_eq!(
            last.host.as_deref(),
            Some(expected_host.as_str()),
            "{prefix}"
        );
    }
    proxy.stop().await;
}
