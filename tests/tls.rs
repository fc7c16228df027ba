//! Outbound TLS: certificates verified against the system roots plus `extra_ca_file`,
//! HTTP/2 chosen by ALPN, and graceful shutdown of requests in flight.

use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use crate::support::*;

/// An HTTPS upstream for `localhost` with a self-signed certificate, speaking HTTP/2
/// and HTTP/1.1 by ALPN; answers with the protocol version and the Authorization seen.
async fn tls_upstream() -> (std::net::SocketAddr, String) {
    tls_upstream_alpn(&[b"h2", b"http/1.1"]).await
}

/// Like `tls_upstream`, offering `alpn`; the answer also has the request's authority
/// and every `host` field that arrived.
async fn tls_upstream_alpn(alpn: &[&[u8]]) -> (std::net::SocketAddr, String) {
    let (acceptor, pem) = self_signed_acceptor(alpn);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let svc = service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                    let auth = req
                        .headers()
                        .get("authorization")
                        .map(|v| v.to_str().unwrap_or("").to_owned());
                    let hosts: Vec<String> = req
                        .headers()
                        .get_all("host")
                        .iter()
                        .map(|v| v.to_str().unwrap_or("").to_owned())
                        .collect();
                    let body = serde_json::json!({
                        "version": format!("{:?}", req.version()),
                        "authorization": auth,
                        "uri": req.uri().path(),
                        "authority": req.uri().authority().map(|a| a.to_string()),
                        "host_fields": hosts,
                    });
                    Ok::<_, std::convert::Infallible>(http::Response::new(full(body.to_string())))
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (addr, pem)
}

/// Provider `p` at `issuer`, no routes yet, and a short connect timeout.
fn tls_base(issuer: &Issuer) -> TestConfig {
    TestConfig::default()
        .server(|s| s.connect_timeout("2s"))
        .with_provider(
            "p",
            ProviderSection::new(&issuer.url(), "i", "secret-value"),
        )
}

/// A route to `https://localhost:<port>/base`, trusting `ca_file` when given.
fn tls_config(issuer: &Issuer, port: u16, ca_file: Option<&std::path::Path>) -> TestConfig {
    let config = tls_base(issuer).route(RouteSection::to(
        &format!("https://localhost:{port}/base"),
        "p",
    ));
    match ca_file {
        Some(ca) => config.server(|s| s.extra_ca_file(ca.display().to_string())),
        None => config,
    }
}

#[tokio::test]
async fn https_upstream_with_extra_ca_speaks_http2() {
    let issuer = Issuer::start(Dialect::OAuth2).await;
    let (addr, ca_pem) = tls_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, ca_pem).unwrap();
    let proxy = Proxy::start_with(&tls_config(&issuer, addr.port(), Some(&ca))).await;
    let answer = get(&client(), &proxy.url("/x")).await;
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    let body = answer.json();
    assert_eq!(body["version"], "HTTP/2.0", "ALPN chose HTTP/2");
    assert_eq!(body["uri"], "/base/x");
    assert_eq!(body["authorization"], format!("Bearer {}", issuer.token(1)));
    proxy.stop().await;
}

/// Over HTTP/2 the authority travels as `:authority` alone; a `host` field beside it
/// is what nginx refuses. Over HTTP/1.1 it is the `Host` field. With `preserve_host`
/// the client's Host takes its place in both, and the connection still goes to the
/// route's upstream.
#[tokio::test]
async fn authority_over_http2_and_host_over_http1() {
    let issuer = Issuer::start(Dialect::OAuth2).await;
    let (h2, ca_pem) = tls_upstream_alpn(&[b"h2", b"http/1.1"]).await;
    let (h1, ca1_pem) = tls_upstream_alpn(&[b"http/1.1"]).await;
    let other = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, format!("{ca_pem}{ca1_pem}")).unwrap();
    let route = |prefix: &str, port: u16, preserve: bool| {
        RouteSection::to(&format!("https://localhost:{port}/base"), "p")
            .path_prefix(prefix)
            .preserve_host(preserve)
    };
    let toml = tls_base(&issuer)
        .server(|s| s.extra_ca_file(ca.display().to_string()))
        .route(route("/h2", h2.port(), false))
        .route(route("/h2-host", h2.port(), true))
        .route(route("/h1", h1.port(), false))
        .route(route("/h1-host", h1.port(), true));
    let proxy = Proxy::start_with(&toml).await;
    let c = client();
    let ask = |path: &str, host: Option<&str>| {
        let mut req = http::Request::get(proxy.url(path));
        if let Some(host) = host {
            req = req.header("host", host);
        }
        send(&c, req.body(full("")).unwrap())
    };

    let body = ask("/h2/x", None).await.json();
    assert_eq!(body["version"], "HTTP/2.0");
    assert_eq!(body["authority"], format!("localhost:{}", h2.port()));
    assert_eq!(
        body["host_fields"],
        serde_json::json!([]),
        "no host field on HTTP/2"
    );

    let body = ask("/h2-host/x", Some("legacy.example:9000")).await.json();
    assert_eq!(body["version"], "HTTP/2.0");
    assert_eq!(body["authority"], "legacy.example:9000");
    assert_eq!(body["host_fields"], serde_json::json!([]));
    assert_eq!(body["authorization"], format!("Bearer {}", issuer.token(1)));

    let body = ask("/h1/x", None).await.json();
    assert_eq!(body["version"], "HTTP/1.1");
    assert_eq!(
        body["host_fields"],
        serde_json::json!([format!("localhost:{}", h1.port())])
    );

    let body = ask("/h1-host/x", Some("legacy.example:9000")).await.json();
    assert_eq!(body["version"], "HTTP/1.1");
    assert_eq!(
        body["host_fields"],
        serde_json::json!(["legacy.example:9000"])
    );

    // A Host naming another server changes only the header: the token goes to the
    // route's upstream, over a connection verified for it.
    for prefix in ["/h2-host", "/h1-host"] {
        let ans = ask(&format!("{prefix}/y"), Some(&other.addr.to_string())).await;
        assert_eq!(ans.status, 200, "{prefix}");
        assert_eq!(
            ans.json()["authority"].as_str().is_some(),
            prefix == "/h2-host"
        );
    }
    assert_eq!(other.hits(), 0, "the server named by Host received nothing");

    // Without a Host (HTTP/1.0), a preserve_host route sends the upstream's.
    let out = raw_until_close(
        proxy.addr,
        b"GET /h2-host/z HTTP/1.0\r\n\r\n",
        Duration::from_secs(10),
    )
    .await;
    assert!(out.starts_with("HTTP/1.0 200"), "{out}");
    assert!(
        out.contains(&format!("\"authority\":\"localhost:{}\"", h2.port())),
        "{out}"
    );

    // A Host that is no host[:port] is refused on a preserve_host route.
    let ans = ask("/h2-host/x", Some("user@evil.example")).await;
    assert_eq!(ans.status, 400);
    assert_eq!(ans.json()["error"], "bad_request");
    proxy.stop().await;
}

#[tokio::test]
async fn untrusted_certificate_is_refused() {
    let issuer = Issuer::start(Dialect::OAuth2).await;
    let (addr, _) = tls_upstream().await;
    let proxy = Proxy::start_with(&tls_config(&issuer, addr.port(), None)).await;
    let answer = get(&client(), &proxy.url("/x")).await;
    assert_eq!(answer.status, 502);
    assert_eq!(answer.json()["error"], "upstream_unreachable");
    let message = answer.json()["message"].as_str().unwrap().to_lowercase();
    assert!(message.contains("certificate"), "{message}");
    proxy.stop().await;
}

#[tokio::test]
async fn shutdown_lets_requests_in_flight_finish() {
    let Harness {
        upstream, proxy, ..
    } = Harness::start().await;
    upstream.set_delay(Duration::from_millis(500));
    proxy.token_ready(Duration::from_secs(2)).await;
    let url = proxy.url("/slow");
    let request = tokio::spawn(async move { get(&client(), &url).await.status });
    assert!(eventually(Duration::from_secs(2), || upstream.hits() == 1).await);
    let addr = proxy.addr;
    proxy.stop().await;
    assert_eq!(
        request.await.unwrap(),
        200,
        "the request in flight completed"
    );
    // And the listener is gone.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn a_client_that_goes_away_cancels_the_upstream_request() {
    let Harness {
        upstream, proxy, ..
    } = Harness::with(|c| c.server(|s| s.admin())).await;
    upstream.set_delay(Duration::from_secs(3));
    proxy.token_ready(Duration::from_secs(2)).await;
    let url = proxy.url("/slow");
    let request = tokio::spawn(async move { get(&client(), &url).await });
    assert!(eventually(Duration::from_secs(2), || upstream.hits() == 1).await);
    request.abort();
    let mut in_flight = f64::MAX;
    for _ in 0..100 {
        in_flight = metric(&proxy.metrics().await, "bearer_proxy_requests_in_flight")
            .expect("in-flight gauge");
        if in_flight == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(in_flight, 0.0, "the proxy stopped waiting for the upstream");
    proxy.stop().await;
}
