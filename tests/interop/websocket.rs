//! WebSocket through the proxy with tokio-tungstenite on both ends: the handshake
//! carries the token, the upgraded connections are joined byte for byte, and the
//! tunnel obeys metrics, `max_connections`, `invalidate_on` and shutdown.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::support::*;

/// What the server saw in one handshake.
#[derive(Clone, Debug)]
pub struct Seen {
    pub authorization: Option<String>,
    pub host: Option<String>,
    pub path: String,
}

/// The code and reason of a client's close frame, if it had one.
type ClientClose = Option<(u16, String)>;

/// A WebSocket server: greets, echoes text and binary, answers pings (tungstenite does),
/// and records each handshake; handshakes with a rejected Authorization get 401.
#[derive(Clone)]
pub struct WsServer {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    reject: Arc<Mutex<HashSet<String>>>,
    /// Close frames received from clients.
    closes: Arc<Mutex<Vec<ClientClose>>>,
}

impl WsServer {
    pub async fn start() -> Self {
        Self::start_inner(None).await
    }

    /// Over TLS for `localhost`, offering HTTP/2 and HTTP/1.1 by ALPN, as most HTTPS
    /// servers do; returns the certificate's PEM too.
    async fn start_tls() -> (Self, String) {
        let (acceptor, pem) = self_signed_acceptor(&[b"h2", b"http/1.1"]);
        (Self::start_inner(Some(acceptor)).await, pem)
    }

    async fn start_inner(tls: Option<tokio_rustls::TlsAcceptor>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = Self {
            addr: listener.local_addr().unwrap(),
            seen: Arc::default(),
            reject: Arc::default(),
            closes: Arc::default(),
        };
        let s = server.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let s = s.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    match tls {
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(stream).await {
                                s.session(stream).await;
                            }
                        }
                        None => s.session(stream).await,
                    }
                });
            }
        });
        server
    }

    async fn session<S>(&self, stream: S)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let seen = self.seen.clone();
        let reject = self.reject.clone();
        // tungstenite's callback signature, not ours to shrink.
        #[allow(clippy::result_large_err)]
        let callback = move |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
            let header = |name: &str| {
                req.headers()
                    .get(name)
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            };
            let authorization = header("authorization");
            seen.lock().unwrap().push(Seen {
                authorization: authorization.clone(),
                host: header("host"),
                path: req.uri().path().to_owned(),
            });
            if authorization.is_some_and(|a| reject.lock().unwrap().contains(&a)) {
                let mut denied = ErrorResponse::new(Some("token rejected".to_owned()));
                *denied.status_mut() = http::StatusCode::UNAUTHORIZED;
                return Err(denied);
            }
            Ok(resp)
        };
        let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await else {
            return;
        };
        if ws
            .send(Message::text("hello from the server"))
            .await
            .is_err()
        {
            return;
        }
        while let Some(Ok(message)) = ws.next().await {
            if let Message::Close(frame) = &message {
                self.closes.lock().unwrap().push(
                    frame
                        .as_ref()
                        .map(|f| (u16::from(f.code), f.reason.to_string())),
                );
            }
            let echo = matches!(message, Message::Text(_) | Message::Binary(_));
            if echo && ws.send(message).await.is_err() {
                return;
            }
        }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Opens a WebSocket to `url` (a `ws://` URL on the proxy), with `host` as Host if given.
pub async fn connect(url: &str, host: Option<&str>) -> Result<Ws, WsError> {
    let mut request = url.into_client_request().unwrap();
    if let Some(host) = host {
        request.headers_mut().insert("host", host.parse().unwrap());
    }
    let addr = request.uri().authority().unwrap().as_str().to_owned();
    let stream = TcpStream::connect(addr).await.unwrap();
    let (ws, response) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::client_async(request, MaybeTlsStream::Plain(stream)),
    )
    .await
    .expect("handshake timed out")?;
    assert_eq!(response.status(), 101);
    Ok(ws)
}

/// The next data, ping/pong or close message, within 10 s.
pub async fn next<S>(ws: &mut WebSocketStream<S>) -> Message
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .expect("no message within 10 s")
        .expect("the stream ended")
        .expect("a WebSocket error")
}

/// Whether the peer ends the WebSocket (close, error or end of stream) within `within`,
/// reading past any messages still in flight.
async fn closed_within<S>(ws: &mut WebSocketStream<S>, within: Duration) -> bool
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    tokio::time::timeout(within, async { while let Some(Ok(_)) = ws.next().await {} })
        .await
        .is_ok()
}

/// Provider `p` at `issuer`, a `/ws` route to `upstream`, and an admin listener.
fn ws_config(issuer: &Issuer, upstream: &str) -> TestConfig {
    TestConfig::default()
        .server(|s| s.admin())
        .with_provider(
            "p",
            ProviderSection::new(&issuer.url(), "c", "secret-value"),
        )
        .route(RouteSection::to(upstream, "p").path_prefix("/ws"))
}

#[tokio::test]
async fn websocket_session_through_the_proxy() {
    let issuer = Issuer::start(Dialect::OAuth2).await;
    let server = WsServer::start().await;
    let upstream = format!("http://{}/base", server.addr);
    let proxy = Proxy::start_with(&ws_config(&issuer, &upstream)).await;
    proxy.token_ready(Duration::from_secs(5)).await;

    let mut ws = connect(&format!("ws://{}/ws/chat?room=1", proxy.addr), None)
        .await
        .expect("handshake through the proxy");
    let seen = server.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].authorization,
        Some(format!("Bearer {}", issuer.token(1))),
        "the handshake carries the token"
    );
    assert_eq!(seen[0].path, "/base/chat");
    assert_eq!(seen[0].host, Some(server.addr.to_string()));

    // Server to client first, then text and binary both ways.
    assert_eq!(next(&mut ws).await, Message::text("hello from the server"));
    ws.send(Message::text("héllo")).await.unwrap();
    assert_eq!(next(&mut ws).await, Message::text("héllo"));
    ws.send(Message::binary(vec![0u8, 1, 2, 255]))
        .await
        .unwrap();
    assert_eq!(next(&mut ws).await, Message::binary(vec![0u8, 1, 2, 255]));

    // A 1 MiB message each way.
    let big: Vec<u8> = (0..1024 * 1024).map(|i| (i * 31 % 251) as u8).collect();
    ws.send(Message::binary(big.clone())).await.unwrap();
    match next(&mut ws).await {
        Message::Binary(data) => assert!(data[..] == big[..], "1 MiB came back intact"),
        other => panic!("expected binary, got {other:?}"),
    }

    // Ping, pong.
    ws.send(Message::Ping(b"are you there".to_vec().into()))
        .await
        .unwrap();
    assert_eq!(
        next(&mut ws).await,
        Message::Pong(b"are you there".to_vec().into())
    );

    // An open tunnel shows in the metrics.
    let text = proxy.metrics().await;
    assert_eq!(
        metric(&text, "bearer_proxy_tunnels_open "),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "bearer_proxy_tunnels_total{route=\"/ws\"}"),
        Some(1.0),
        "{text}"
    );

    // Close handshake started by the client.
    ws.send(Message::Close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    })))
    .await
    .unwrap();
    match next(&mut ws).await {
        Message::Close(Some(frame)) => assert_eq!(frame.code, CloseCode::Normal),
        other => panic!("expected the server's close, got {other:?}"),
    }
    assert!(
        tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("the connection closes")
            .is_none_or(|r| r.is_err()),
        "nothing after the close"
    );
    assert_eq!(
        server.closes.lock().unwrap().clone(),
        [Some((1000, "bye".to_owned()))]
    );

    // Closed: the gauge is back to 0 and the bytes are counted.
    let mut text = String::new();
    for _ in 0..200 {
        text = proxy.metrics().await;
        if metric(&text, "bearer_proxy_tunnels_open ") == Some(0.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(
        metric(&text, "bearer_proxy_tunnels_open "),
        Some(0.0),
        "{text}"
    );
    let up = metric(
        &text,
        "bearer_proxy_tunnel_bytes_total{route=\"/ws\",direction=\"up\"}",
    )
    .expect("bytes up");
    let down = metric(
        &text,
        "bearer_proxy_tunnel_bytes_total{route=\"/ws\",direction=\"down\"}",
    )
    .expect("bytes down");
    assert!(
        up > 1024.0 * 1024.0 && down > 1024.0 * 1024.0,
        "{up} {down}"
    );
    assert_eq!(
        metric(
            &text,
            "bearer_proxy_requests_total{route=\"/ws\",status=\"101\"}"
        ),
        Some(1.0),
        "{text}"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn a_refused_handshake_comes_back_as_it_was_and_a_rejected_token_is_replaced() {
    let issuer = Issuer::start(Dialect::OAuth2).await;
    let server = WsServer::start().await;
    let upstream = format!("http://{}", server.addr);
    let proxy = Proxy::start_with(&ws_config(&issuer, &upstream)).await;
    proxy.token_ready(Duration::from_secs(5)).await;

    // invalidate_on = [401] (the default): the 401 drops the token, a new one is
    // fetched and the handshake is sent once more with it.
    server
        .reject
        .lock()
        .unwrap()
        .insert(format!("Bearer {}", issuer.token(1)));
    let mut ws = connect(&format!("ws://{}/ws/x", proxy.addr), None)
        .await
        .expect("the replayed handshake succeeds");
    assert_eq!(next(&mut ws).await, Message::text("hello from the server"));
    let auths: Vec<_> = server.seen().into_iter().map(|s| s.authorization).collect();
    assert_eq!(
        auths,
        [
            Some(format!("Bearer {}", issuer.token(1))),
            Some(format!("Bearer {}", issuer.token(2)))
        ]
    );
    drop(ws);

    // When the fresh token is refused too, the 401 goes back as the server sent it.
    for n in [2, 3] {
        server
            .reject
            .lock()
            .unwrap()
            .insert(format!("Bearer {}", issuer.token(n)));
    }
    match connect(&format!("ws://{}/ws/x", proxy.addr), None).await {
        Err(WsError::Http(response)) => {
            assert_eq!(response.status(), 401);
            // tungstenite reads the body raw: the proxy streams it chunked.
            let body = String::from_utf8_lossy(response.body().as_deref().unwrap_or_default())
                .into_owned();
            assert!(
                body.contains("token rejected"),
                "the server's own body: {body:?}"
            );
        }
        Err(other) => panic!("expected an HTTP error, got {other}"),
        Ok(_) => panic!("expected the handshake to be refused"),
    }
    proxy.stop().await;
}

#[tokio::test]
async fn websocket_to_an_https_upstream_that_prefers_http2_uses_http1() {
    let issuer = Issuer::start(Dialect::OAuth2).await;
    let (server, ca_pem) = WsServer::start_tls().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, ca_pem).unwrap();
    let upstream = format!("https://localhost:{}", server.addr.port());
    let config = ws_config(&issuer, &upstream)
        .server(|s| s.extra_ca_file(ca.display().to_string()))
        .edit_route(0, |r| r.preserve_host(true));
    let proxy = Proxy::start_with(&config).await;
    proxy.token_ready(Duration::from_secs(5)).await;
    let mut ws = connect(
        &format!("ws://{}/ws/tls", proxy.addr),
        Some("app.example:8443"),
    )
    .await
    .expect("handshake over TLS");
    assert_eq!(next(&mut ws).await, Message::text("hello from the server"));
    ws.send(Message::text("over tls")).await.unwrap();
    assert_eq!(next(&mut ws).await, Message::text("over tls"));
    let seen = server.seen();
    assert_eq!(
        seen[0].host.as_deref(),
        Some("app.example:8443"),
        "preserve_host"
    );
    assert_eq!(
        seen[0].authorization,
        Some(format!("Bearer {}", issuer.token(1)))
    );
    ws.close(None).await.unwrap();
    proxy.stop().await;
}

#[tokio::test]
async fn a_preserve_host_handshake_goes_to_the_route_upstream_whatever_its_host() {
    let issuer = Issuer::start(Dialect::OAuth2).await;
    let server = WsServer::start().await;
    // A second server named by the Host: it must never see the handshake.
    let decoy = WsServer::start().await;
    let upstream = format!("http://{}", server.addr);
    let proxy =
        Proxy::start_with(&ws_config(&issuer, &upstream).edit_route(0, |r| r.preserve_host(true)))
            .await;
    proxy.token_ready(Duration::from_secs(5)).await;
    for host in [decoy.addr.to_string(), "elsewhere.example".to_owned()] {
        let mut ws = connect(&format!("ws://{}/ws/x", proxy.addr), Some(&host))
            .await
            .expect("handshake");
        assert_eq!(next(&mut ws).await, Message::text("hello from the server"));
        ws.close(None).await.unwrap();
    }
    let hosts: Vec<_> = server.seen().into_iter().map(|s| s.host).collect();
    assert_eq!(
        hosts,
        [
            Some(decoy.addr.to_string()),
            Some("elsewhere.example".to_owned())
        ]
    );
    assert!(decoy.seen().is_empty());
    proxy.stop().await;
}

/// A proxy with `[server]` as `edit` changes it in front of a fresh server, and a
/// WebSocket through it, past the server's greeting.
async fn open_session(edit: impl FnOnce(ServerSection) -> ServerSection) -> (Proxy, Ws) {
    let issuer = Issuer::start(Dialect::OAuth2).await;
    let server = WsServer::start().await;
    let upstream = format!("http://{}", server.addr);
    let proxy = Proxy::start_with(&ws_config(&issuer, &upstream).server(edit)).await;
    proxy.token_ready(Duration::from_secs(5)).await;
    let mut ws = connect(&format!("ws://{}/ws/a", proxy.addr), None)
        .await
        .unwrap();
    assert_eq!(next(&mut ws).await, Message::text("hello from the server"));
    (proxy, ws)
}

#[tokio::test]
async fn a_tunnel_holds_its_connection_slot_until_it_closes() {
    let (proxy, mut ws) = open_session(|s| s.max_connections(1).workers(1)).await;

    // The one connection allowed is the tunnel's: a second client waits.
    let url = proxy.url("/ws/plain");
    let waiting = tokio::spawn(async move { get(&client(), &url).await.status });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "a second connection was served");

    ws.close(None).await.unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("served once the tunnel closed")
        .unwrap();
    // The WebSocket server answers a plain GET with an error of its own.
    assert_ne!(status, 0);
    proxy.stop().await;
}

#[tokio::test]
async fn shutdown_closes_tunnels_after_the_grace_period() {
    let (proxy, mut ws) = open_session(|s| s.shutdown_grace("1s")).await;
    let started = tokio::time::Instant::now();
    let stopping = tokio::spawn(proxy.stop());
    carries_then_closes_after_grace(&mut ws, started, stopping, "the tunnel").await;
}

/// A Unix socket listener's tunnels obey shutdown as the TCP workers' do: they carry
/// messages through the grace period, are closed after it, and the server waits for them.
#[tokio::test]
async fn shutdown_closes_tunnels_on_a_unix_socket_after_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let issuer = Issuer::start(Dialect::OAuth2).await;
    let server = WsServer::start().await;
    let sock = dir.path().join("proxy.sock");
    let config = ws_config(&issuer, &format!("http://{}", server.addr))
        .server(|s| {
            s.listen(format!("unix:{}", sock.display()))
                .shutdown_grace("1s")
        })
        .parse();
    let bound = bearer_proxy::server::Server::bind(config)
        .await
        .expect("bind");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(bound.run(async {
        let _ = stopped.await;
    }));
    let stream = tokio::net::UnixStream::connect(&sock).await.unwrap();
    let request = "ws://proxy.local/ws/a".into_client_request().unwrap();
    let (mut ws, response) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::client_async(request, stream),
    )
    .await
    .expect("handshake timed out")
    .expect("handshake");
    assert_eq!(response.status(), 101);
    assert_eq!(next(&mut ws).await, Message::text("hello from the server"));

    let started = tokio::time::Instant::now();
    let _ = stop.send(());
    carries_then_closes_after_grace(&mut ws, started, running, "the tunnel on the Unix socket")
        .await;
}

/// After shutdown began at `started` with a 1 s `shutdown_grace`: the tunnel still
/// carries messages, then the proxy closes it, and `stopping` (the proxy's stop) ends,
/// not before the grace period.
async fn carries_then_closes_after_grace<S>(
    ws: &mut WebSocketStream<S>,
    started: tokio::time::Instant,
    stopping: tokio::task::JoinHandle<()>,
    what: &str,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    // Within the grace period the tunnel still carries messages.
    ws.send(Message::text("still here")).await.unwrap();
    assert_eq!(next(ws).await, Message::text("still here"));
    // Then the proxy closes it.
    let ended = closed_within(ws, Duration::from_secs(10)).await;
    assert!(ended, "{what} was closed");
    tokio::time::timeout(Duration::from_secs(15), stopping)
        .await
        .expect("the proxy stopped")
        .unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "closed after the grace period, not before: {:?}",
        started.elapsed()
    );
}

/// The real binary, logging JSON at trace level: the tunnel's close is one access-log
/// line with the bytes each way and the duration, and no log line holds the token.
#[tokio::test]
async fn a_closed_tunnel_is_logged_with_bytes_and_duration() {
    let issuer = Issuer::start_named(Dialect::OAuth2, "WSLOGTOK").await;
    let server = WsServer::start().await;
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bp.toml");
    let toml = ws_config(&issuer, &format!("http://{}", server.addr))
        .server(|s| s.listen(format!("127.0.0.1:{port}")).unset("admin_listen"));
    std::fs::write(&file, toml.render()).unwrap();
    let log_path = dir.path().join("stderr.log");
    let child = ChildGuard(
        std::process::Command::new(env!("CARGO_BIN_EXE_bearer-proxy"))
            .args(["--log-format", "json", "--log-level", "trace", "run", "-c"])
            .arg(&file)
            .env_remove("RUST_LOG")
            .stdout(std::fs::File::create(dir.path().join("stdout.log")).unwrap())
            .stderr(std::fs::File::create(&log_path).unwrap())
            .stdin(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let url = format!("ws://127.0.0.1:{port}/ws/logged");
    let mut ws = None;
    for _ in 0..500 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            ws = Some(connect(&url, None).await.expect("handshake"));
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut ws = ws.expect("the proxy did not start listening");
    assert_eq!(next(&mut ws).await, Message::text("hello from the server"));
    ws.send(Message::binary(vec![7u8; 1000])).await.unwrap();
    assert_eq!(next(&mut ws).await, Message::binary(vec![7u8; 1000]));
    ws.close(None).await.unwrap();
    // The line is written when the tunnel ends, before the process is stopped.
    let mut line = None;
    for _ in 0..500 {
        let logs = std::fs::read_to_string(&log_path).unwrap_or_default();
        line = logs
            .lines()
            .find(|l| l.contains("tunnel closed"))
            .map(str::to_owned);
        if line.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let line = line.expect("a 'tunnel closed' log line");
    let entry: serde_json::Value = serde_json::from_str(&line).expect("a JSON log line");
    let fields = &entry;
    assert_eq!(fields["route"], "/ws", "{line}");
    assert_eq!(fields["path"], "/ws/logged", "{line}");
    assert_eq!(fields["end"], "closed", "{line}");
    let (up, down) = (
        fields["bytes_up"].as_u64().expect("bytes_up"),
        fields["bytes_down"].as_u64().expect("bytes_down"),
    );
    assert!(up > 1000 && down > 1000, "{line}");
    assert!(fields["duration_ms"].as_f64().is_some(), "{line}");
    drop(child);
    let logs = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(!logs.contains("WSLOGTOK"), "a token in the logs:\n{logs}");
}

/// An upstream that switches protocols on a request that did not ask to: the proxy
/// cannot hand the client a connection it never asked to upgrade, so it answers 502.
#[tokio::test]
async fn an_unasked_for_101_is_a_bad_gateway() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = stream
                    .write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: surprise\r\nConnection: upgrade\r\n\r\n")
                    .await;
                let _ = stream.read(&mut buf).await;
            });
        }
    });
    let issuer = Issuer::start(Dialect::OAuth2).await;
    let proxy = Proxy::start_with(&ws_config(&issuer, &format!("http://{addr}"))).await;
    let answer = get(&client(), &proxy.url("/ws/plain")).await;
    assert_eq!(answer.status, 502);
    assert_eq!(answer.json()["error"], "upstream_unreachable");
    proxy.stop().await;
}
