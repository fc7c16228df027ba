//! Forwarding: routing, URL joining, header hygiene, streaming, the proxy's own answers.

use std::time::Duration;

use http::Request;

use crate::support::*;

/// Routes by prefix, host and listener over upstreams `a` (the harness's) and `b`.
async fn two_routes() -> (Harness, Upstream) {
    let b = Upstream::start().await;
    let servers = Servers::start(Dialect::OAuth2).await;
    let (a, b_url) = (servers.upstream.url(), b.url());
    let h = servers
        .proxy(|c| {
            c.server(|s| s.upstream_timeout("1s"))
                .without_routes()
                .route(RouteSection::to(&format!("{a}/api/v1"), "p").path_prefix("/wll"))
                .route(
                    RouteSection::to(&format!("{b_url}/special-base"), "p")
                        .path_prefix("/wll/special/"),
                )
                .route(
                    RouteSection::to(&format!("{b_url}/by-host"), "p")
                        .host("api.example.com")
                        .path_prefix("/wll"),
                )
                .route(
                    RouteSection::to(&a, "p")
                        .path_prefix("/keep")
                        .strip_prefix(false)
                        .preserve_host(true),
                )
                .route(
                    RouteSection::to(&a, "p")
                        .path_prefix("/mine")
                        .pass_client_authorization(true),
                )
                .route(RouteSection::open(&format!("{a}/open")).path_prefix("/open"))
                .route(RouteSection::to("http://127.0.0.1:1", "p").path_prefix("/down"))
                .route(
                    RouteSection::to(&format!("{b_url}/own-listener"), "p").listen("127.0.0.3:0"),
                )
        })
        .await;
    (h, b)
}

#[tokio::test]
async fn routing_prefix_host_longest_and_own_listener() {
    let (Harness { proxy, .. }, _b) = two_routes().await;
    let c = client();
    let uri = |ans: &Answer| ans.json()["uri"].as_str().unwrap().to_owned();

    assert_eq!(
        uri(&get(&c, &proxy.url("/wll/users/7")).await),
        "/api/v1/users/7"
    );
    assert_eq!(uri(&get(&c, &proxy.url("/wll")).await), "/api/v1");
    // Longest prefix wins.
    assert_eq!(
        uri(&get(&c, &proxy.url("/wll/special/x")).await),
        "/special-base/x"
    );
    // Segment boundary: /wllx is not under /wll, and nothing else matches.
    let miss = get(&c, &proxy.url("/wllx")).await;
    assert_eq!(miss.status, 404);
    assert_eq!(miss.json()["error"], "no_route");
    assert_eq!(miss.headers["content-type"], "application/json");
    // Host-specific route.
    let req = Request::get(proxy.url("/wll/h"))
        .header("host", "API.example.com:8080")
        .body(full(""))
        .unwrap();
    assert_eq!(uri(&send(&c, req).await), "/by-host/h");
    // A listener of its own.
    let own = proxy.listener("127.0.0.3:0");
    assert_eq!(
        uri(&get(&c, &format!("http://{own}/z")).await),
        "/own-listener/z"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn query_string_and_headers_pass_as_sent() {
    let (
        Harness {
            issuer,
            upstream: a,
            proxy,
            ..
        },
        _,
    ) = two_routes().await;
    let c = client();
    let q = "/wll/s?b=2&a=1&a=%2F%20x&empty=&flag&enc=%E2%9C%93";
    let req = Request::get(proxy.url(q))
        .header("x-dup", "one")
        .header("x-dup", "two")
        .header("authorization", "Bearer client-own")
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "secret-hop")
        .header("keep-alive", "timeout=5")
        .header("proxy-authorization", "Basic Zm9vOmJhcg==")
        .header("te", "gzip")
        .body(full(""))
        .unwrap();
    let ans = send(&c, req).await;
    assert_eq!(
        ans.json()["uri"],
        format!("/api/v1/s?{}", q.split_once('?').unwrap().1)
    );
    assert_eq!(ans.echoed("x-dup"), ["one", "two"]);
    assert_eq!(
        ans.echoed("authorization"),
        [format!("Bearer {}", issuer.token(1))]
    );
    for hop in [
        "x-hop",
        "keep-alive",
        "proxy-authorization",
        "te",
        "connection",
    ] {
        assert!(ans.echoed(hop).is_empty(), "{hop} forwarded");
    }
    assert_eq!(ans.echoed("host"), [a.addr.to_string()]);
    // Response hop-by-hop headers are dropped too.
    assert!(ans.headers.get("x-upstream-hop").is_none());

    // preserve_host and strip_prefix = false.
    let req = Request::get(proxy.url("/keep/a?x=1"))
        .header("host", "legacy.local:9000")
        .body(full(""))
        .unwrap();
    let ans = send(&c, req).await;
    assert_eq!(ans.json()["uri"], "/keep/a?x=1");
    assert_eq!(ans.echoed("host"), ["legacy.local:9000"]);

    // pass_client_authorization keeps the client's own header.
    let req = Request::get(proxy.url("/mine"))
        .header("authorization", "Bearer client-own")
        .body(full(""))
        .unwrap();
    assert_eq!(
        send(&c, req).await.echoed("authorization"),
        ["Bearer client-own"]
    );
    assert_eq!(
        get(&c, &proxy.url("/mine")).await.echoed("authorization"),
        [format!("Bearer {}", issuer.token(1))]
    );
    // A route without provider gets no token.
    assert!(get(&c, &proxy.url("/open/x"))
        .await
        .echoed("authorization")
        .is_empty());
    proxy.stop().await;
}

#[tokio::test]
async fn error_answers() {
    let (
        Harness {
            upstream: a, proxy, ..
        },
        _b,
    ) = two_routes().await;
    let c = client();
    let down = get(&c, &proxy.url("/down/x")).await;
    assert_eq!(down.status, 502);
    assert_eq!(down.json()["error"], "upstream_unreachable");
    assert_eq!(down.json()["route"], "/down");
    assert_eq!(down.json()["provider"], "p");

    a.set_delay(Duration::from_millis(1500));
    let t = tokio::time::Instant::now();
    let slow = get(&c, &proxy.url("/wll/slow")).await;
    assert_eq!(slow.status, 504);
    assert_eq!(slow.json()["error"], "upstream_timeout");
    assert!(t.elapsed() < Duration::from_millis(1400));
    a.set_delay(Duration::ZERO);

    let bad = send(
        &c,
        Request::builder()
            .method("TRACE")
            .uri(proxy.url("/wll/x"))
            .body(full(""))
            .unwrap(),
    )
    .await;
    assert_eq!(bad.status, 400);
    assert_eq!(bad.json()["error"], "bad_request");
    let dots = get(&c, &proxy.url("/wll/../admin")).await;
    assert_eq!(dots.status, 400);
    proxy.stop().await;
}

/// How long a raw exchange may take before what came back is judged.
const RAW_WAIT: Duration = Duration::from_secs(2);

#[tokio::test]
async fn token_goes_only_to_the_routes_upstream() {
    let (Harness { proxy, .. }, b) = two_routes().await;
    // Absolute-form naming upstream b: the route (by path) still sends it to a.
    let req = format!(
        "GET http://{}/wll/abs HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        b.addr, b.addr
    );
    let out = raw(proxy.addr, req.as_bytes(), RAW_WAIT).await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains("/api/v1/abs"), "{out}");
    assert_eq!(b.hits(), 0, "the other upstream received nothing");
    // CONNECT is refused.
    let out = raw(
        proxy.addr,
        format!("CONNECT {} HTTP/1.1\r\nHost: {}\r\n\r\n", b.addr, b.addr).as_bytes(),
        RAW_WAIT,
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert_eq!(b.hits(), 0);
    proxy.stop().await;
}

#[tokio::test]
async fn h2c_inbound() {
    let (Harness { issuer, proxy, .. }, _b) = two_routes().await;
    let h2: Client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build_http();
    let ans = get(&h2, &proxy.url("/wll/h2?q=1")).await;
    assert_eq!(ans.status, 200);
    assert_eq!(ans.json()["uri"], "/api/v1/h2?q=1");
    assert_eq!(
        ans.echoed("authorization"),
        [format!("Bearer {}", issuer.token(1))]
    );
    proxy.stop().await;
}

#[tokio::test]
async fn streams_100_mib_each_way() {
    const N: u64 = 100 * 1024 * 1024;
    // invalidate_on = [] so the upload is not held for replay at all.
    let Harness { proxy, .. } = Harness::with(|c| c.p(|p| p.invalidate_on([]))).await;
    let c = client();
    // Upload: the echo hashes what arrived.
    let req = Request::post(proxy.url("/upload"))
        .body(stream_bytes(N))
        .unwrap();
    let ans = send(&c, req).await;
    assert_eq!(ans.status, 200);
    assert_eq!(ans.json()["body_len"], N);
    assert_eq!(ans.json()["body_sha256"], stream_sha256(N));
    // Download.
    let ans = get(&c, &proxy.url(&format!("/download/{N}"))).await;
    assert_eq!(ans.body.len() as u64, N);
    use sha2::Digest;
    assert_eq!(hex(&sha2::Sha256::digest(&ans.body)), stream_sha256(N));
    proxy.stop().await;
}

#[tokio::test]
async fn large_upload_streams_past_replay_limit() {
    const N: u64 = 8 * 1024 * 1024;
    let Harness { proxy, .. } = Harness::start().await;
    let req = Request::post(proxy.url("/upload"))
        .body(stream_bytes(N))
        .unwrap();
    let ans = send(&client(), req).await;
    assert_eq!(ans.json()["body_len"], N);
    assert_eq!(ans.json()["body_sha256"], stream_sha256(N));
    proxy.stop().await;
}
