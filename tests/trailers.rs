//! `TE: trailers` and trailers both ways, as gRPC needs: an h2c client, the proxy, and
//! an upstream over HTTP/1.1 (plain) or HTTP/2 (TLS, by ALPN).

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use crate::support::*;

/// Reads the whole request, then answers with what it saw as JSON and two trailers:
/// `grpc-status: 0` and `x-echo` (the request's `x-checksum` trailer, or `none`).
async fn trailer_echo(req: Request<Incoming>) -> Result<Response<TestBody>, Infallible> {
    let version = format!("{:?}", req.version());
    let te = req
        .headers()
        .get("te")
        .map(|v| v.to_str().unwrap_or("").to_owned());
    let collected = req.into_body().collect().await;
    let (len, checksum) = match collected {
        Ok(c) => {
            let checksum = c
                .trailers()
                .and_then(|t| t.get("x-checksum"))
                .map(|v| v.to_str().unwrap_or("").to_owned());
            (c.to_bytes().len(), checksum)
        }
        Err(_) => (0, None),
    };
    let doc = serde_json::json!({
        "version": version, "te": te, "body_len": len, "checksum": checksum,
    });
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    trailers.insert(
        "x-echo",
        HeaderValue::from_str(checksum.as_deref().unwrap_or("none")).unwrap(),
    );
    let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
        Ok(Frame::data(Bytes::from(doc.to_string()))),
        Ok(Frame::trailers(trailers)),
    ];
    Ok(Response::builder()
        // An HTTP/1.1 server sends only the trailers it declared.
        .header("trailer", "grpc-status, x-echo")
        .body(StreamBody::new(futures_util::stream::iter(frames)).boxed())
        .unwrap())
}

/// `trailer_echo` on plain HTTP (HTTP/1.1 from the proxy).
async fn plain_upstream() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service_fn(trailer_echo))
                    .await;
            });
        }
    });
    addr
}

/// `trailer_echo` over TLS for `localhost`, HTTP/2 by ALPN; returns the certificate PEM.
async fn tls_upstream() -> (std::net::SocketAddr, String) {
    let (acceptor, pem) = self_signed_acceptor(&[b"h2", b"http/1.1"]);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service_fn(trailer_echo))
                    .await;
            });
        }
    });
    (addr, pem)
}

/// A request body of `data` followed by the trailer `x-checksum: checksum`.
fn body_with_trailer(data: &'static [u8], checksum: &'static str) -> TestBody {
    let mut trailers = HeaderMap::new();
    trailers.insert("x-checksum", HeaderValue::from_static(checksum));
    let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
        Ok(Frame::data(Bytes::from_static(data))),
        Ok(Frame::trailers(trailers)),
    ];
    StreamBody::new(futures_util::stream::iter(frames)).boxed()
}

/// Sends a gRPC-like POST over h2c; returns the echoed JSON and the response trailers.
async fn call(url: &str, te: &str) -> (serde_json::Value, Option<HeaderMap>) {
    let h2: Client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let req = Request::post(url)
        .header("te", te)
        .header("content-type", "application/grpc")
        // Declared, so that an HTTP/1.1 hop may send it.
        .header("trailer", "x-checksum")
        .body(body_with_trailer(b"\0\0\0\0\x05hello", "sum-42"))
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(10), h2.request(req))
        .await
        .expect("timed out")
        .expect("request failed");
    assert_eq!(response.status(), 200);
    let collected = response.into_body().collect().await.expect("body");
    let trailers = collected.trailers().cloned();
    let doc = serde_json::from_slice(&collected.to_bytes()).expect("JSON");
    (doc, trailers)
}

#[tokio::test]
async fn trailers_pass_both_ways_over_http1_and_http2_upstreams() {
    let issuer = Issuer::start(Dialect::OAuth2).await;
    let plain = plain_upstream().await;
    let (tls, ca_pem) = tls_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, ca_pem).unwrap();
    let config = TestConfig::default()
        .server(|s| s.extra_ca_file(ca.display().to_string()))
        .with_provider(
            "p",
            ProviderSection::new(&issuer.url(), "c", "secret-value"),
        )
        .route(RouteSection::to(&format!("http://{plain}"), "p").path_prefix("/h1"))
        .route(
            RouteSection::to(&format!("https://localhost:{}", tls.port()), "p").path_prefix("/h2"),
        );
    let proxy = Proxy::start_with(&config).await;
    for (prefix, version) in [("/h1", "HTTP/1.1"), ("/h2", "HTTP/2.0")] {
        let url = proxy.url(&format!("{prefix}/pkg.Service/Method"));
        let (doc, trailers) = call(&url, "trailers").await;
        assert_eq!(doc["version"], version, "{prefix}");
        assert_eq!(doc["te"], "trailers", "{prefix}: TE: trailers passes");
        assert_eq!(doc["body_len"], 10, "{prefix}");
        assert_eq!(
            doc["checksum"], "sum-42",
            "{prefix}: the request's trailer arrived"
        );
        let trailers = trailers.unwrap_or_else(|| panic!("{prefix}: no response trailers"));
        assert_eq!(trailers.get("grpc-status").unwrap(), "0", "{prefix}");
        assert_eq!(trailers.get("x-echo").unwrap(), "sum-42", "{prefix}");
    }
    proxy.stop().await;
}

#[tokio::test]
async fn te_other_than_trailers_is_dropped() {
    let Harness { proxy, .. } = Harness::start().await;
    let c = client();
    for (sent, forwarded) in [
        ("gzip", None),
        ("trailers", Some("trailers")),
        ("deflate;q=0.5, trailers", Some("trailers")),
    ] {
        let req = Request::get(proxy.url("/te"))
            .header("te", sent)
            .header("connection", "te")
            .body(full(""))
            .unwrap();
        let ans = send(&c, req).await;
        let echoed = ans.echoed("te");
        assert_eq!(echoed.first().map(String::as_str), forwarded, "TE: {sent}");
        assert!(echoed.len() <= 1);
    }
    proxy.stop().await;
}
