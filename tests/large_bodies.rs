//! Large bodies, streamed rather than kept for a replay: trailers still pass both ways,
//! and a body cut off on one side never arrives complete on the other.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioExecutor;
use sha2::Digest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::*;

/// Past what is kept for a replay (1 MiB), so it streams.
const LARGE: u64 = 3 * 1024 * 1024 + 123;

/// `stream_bytes(n)` followed by the trailer `x-checksum: checksum`.
fn large_with_trailer(n: u64, checksum: &'static str) -> TestBody {
    let mut trailers = HeaderMap::new();
    trailers.insert("x-checksum", HeaderValue::from_static(checksum));
    let trailer = futures_util::stream::iter([Ok::<_, BoxError>(Frame::trailers(trailers))]);
    let data = StreamBody::new(futures_util::StreamExt::chain(
        http_body_util::BodyStream::new(stream_bytes(n)),
        trailer,
    ));
    data.boxed()
}

/// Reads the request whole, then answers with `LARGE` bytes and the trailers
/// `x-len` (the body length it read), `x-sha` (its SHA-256) and `x-echo` (the
/// request's `x-checksum` trailer, or `none`).
async fn large_echo(req: Request<Incoming>) -> Response<TestBody> {
    let collected = req.into_body().collect().await;
    let (len, sha, checksum) = match collected {
        Ok(c) => {
            let checksum = c
                .trailers()
                .and_then(|t| t.get("x-checksum"))
                .map(|v| v.to_str().unwrap_or("").to_owned());
            let bytes = c.to_bytes();
            (bytes.len(), hex(&sha2::Sha256::digest(&bytes)), checksum)
        }
        Err(_) => (0, String::new(), None),
    };
    let mut trailers = HeaderMap::new();
    trailers.insert("x-len", HeaderValue::from(len));
    trailers.insert("x-sha", HeaderValue::from_str(&sha).unwrap());
    trailers.insert(
        "x-echo",
        HeaderValue::from_str(checksum.as_deref().unwrap_or("none")).unwrap(),
    );
    let body = futures_util::StreamExt::chain(
        http_body_util::BodyStream::new(stream_bytes(LARGE)),
        futures_util::stream::iter([Ok::<_, BoxError>(Frame::trailers(trailers))]),
    );
    Response::builder()
        .header("trailer", "x-len, x-sha, x-echo")
        .body(StreamBody::new(body).boxed())
        .unwrap()
}

/// Provider `p` at `issuer` and one route to the test server at `upstream`.
fn to_upstream(issuer: &Issuer, upstream: SocketAddr) -> TestConfig {
    TestConfig::default()
        .with_provider(
            "p",
            ProviderSection::new(&issuer.url(), "c", "secret-value"),
        )
        .route(RouteSection::to(&format!("http://{upstream}"), "p"))
}

#[tokio::test]
async fn large_bodies_keep_their_trailers_both_ways() {
    let issuer = Issuer::start(Dialect::OAuth2).await;
    let upstream = serve(large_echo).await;
    let proxy = Proxy::start_with(&to_upstream(&issuer, upstream)).await;
    // h2c to the proxy, HTTP/1.1 chunked with trailers from it to the upstream.
    let h2: Client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    for round in 0..2 {
        let req = Request::post(proxy.url("/large"))
            .header("te", "trailers")
            .header("trailer", "x-checksum")
            .body(large_with_trailer(LARGE, "sum-42"))
            .unwrap();
        let response = tokio::time::timeout(Duration::from_secs(30), h2.request(req))
            .await
            .expect("timed out")
            .expect("request failed");
        assert_eq!(response.status(), 200, "round {round}");
        let collected = tokio::time::timeout(Duration::from_secs(30), response.collect())
            .await
            .expect("timed out")
            .expect("response body");
        let trailers = collected.trailers().cloned().expect("response trailers");
        let body = collected.to_bytes();
        assert_eq!(body.len() as u64, LARGE, "round {round}");
        assert_eq!(hex(&sha2::Sha256::digest(&body)), stream_sha256(LARGE));
        assert_eq!(trailers.get("x-len").unwrap(), &LARGE.to_string());
        assert_eq!(trailers.get("x-sha").unwrap(), &stream_sha256(LARGE));
        assert_eq!(trailers.get("x-echo").unwrap(), "sum-42", "request trailer");
    }
    assert_eq!(issuer.hits(), 1);
    proxy.stop().await;
}

/// What the upstream saw of each request body: its length when it ended cleanly.
type Outcomes = Arc<Mutex<Vec<Result<u64, String>>>>;

#[tokio::test]
async fn a_large_upload_cut_off_never_reaches_the_upstream_complete() {
    let issuer = Issuer::start(Dialect::OAuth2).await;
    let outcomes: Outcomes = Arc::default();
    let seen = outcomes.clone();
    let upstream = serve(move |req: Request<Incoming>| {
        let seen = seen.clone();
        async move {
            let outcome = match req.into_body().collect().await {
                Ok(c) => Ok(c.to_bytes().len() as u64),
                Err(e) => Err(e.to_string()),
            };
            seen.lock().unwrap().push(outcome);
            Response::new(full("ok"))
        }
    })
    .await;
    let proxy = Proxy::start_with(&to_upstream(&issuer, upstream)).await;
    let addr: SocketAddr = proxy.url("").trim_start_matches("http://").parse().unwrap();
    let chunk = vec![b'x'; 64 * 1024];
    for framing in ["chunked", "length"] {
        let mut conn = TcpStream::connect(addr).await.unwrap();
        let head = match framing {
            "chunked" => {
                "POST /cut HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n".to_owned()
            }
            _ => format!(
                "POST /cut HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n",
                64 * chunk.len()
            ),
        };
        conn.write_all(head.as_bytes()).await.unwrap();
        // Half the body, past what is kept for a replay (1 MiB), then the end.
        for _ in 0..32 {
            if framing == "chunked" {
                conn.write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
                    .await
                    .unwrap();
                conn.write_all(&chunk).await.unwrap();
                conn.write_all(b"\r\n").await.unwrap();
            } else {
                conn.write_all(&chunk).await.unwrap();
            }
        }
        conn.flush().await.unwrap();
        drop(conn);
        let done = eventually(Duration::from_secs(20), || {
            !outcomes.lock().unwrap().is_empty()
        })
        .await;
        assert!(
            done,
            "{framing}: the upstream never finished with the request"
        );
        let outcome = outcomes.lock().unwrap().remove(0);
        assert!(
            outcome.is_err(),
            "{framing}: a cut-off body reached the upstream as complete: {outcome:?}"
        );
    }
    proxy.stop().await;
}

#[tokio::test]
async fn a_large_download_cut_off_never_reaches_the_client_complete() {
    let issuer = Issuer::start(Dialect::OAuth2).await;
    // A raw upstream: a chunked answer that breaks off after 2 MiB without its last chunk.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let mut head = Vec::new();
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                    .await;
                let chunk = vec![b'y'; 64 * 1024];
                for _ in 0..32 {
                    let _ = stream
                        .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
                        .await;
                    let _ = stream.write_all(&chunk).await;
                    let _ = stream.write_all(b"\r\n").await;
                }
            });
        }
    });
    let proxy = Proxy::start_with(&to_upstream(&issuer, upstream)).await;
    let c = client();
    let req = Request::get(proxy.url("/cut")).body(full("")).unwrap();
    let response = tokio::time::timeout(Duration::from_secs(20), c.request(req))
        .await
        .expect("timed out")
        .expect("response head");
    assert_eq!(response.status(), 200);
    let body = tokio::time::timeout(Duration::from_secs(20), response.collect())
        .await
        .expect("timed out");
    assert!(
        body.is_err(),
        "a cut-off answer reached the client as complete ({} bytes)",
        body.map(|c| c.to_bytes().len()).unwrap_or(0)
    );
    proxy.stop().await;
}
