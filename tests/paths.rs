//! Encoded and dotted request paths: refused before anything reaches the upstream,
//! ordinary look-alikes forwarded byte for byte.

use std::net::SocketAddr;
use std::time::Duration;

use crate::support::*;

/// One provider route on `/api` to `upstream`/v1, one on `/ids` with encoded slashes allowed.
async fn setup() -> (Issuer, Upstream, Proxy) {
    let servers = Servers::start(Dialect::OAuth2).await;
    let up = servers.upstream.url();
    let h = servers
        .proxy(|c| {
            c.without_routes()
                .route(RouteSection::to(&format!("{up}/v1"), "p").path_prefix("/api"))
                .route(
                    RouteSection::to(&format!("{up}/v1/ids"), "p")
                        .path_prefix("/ids")
                        .allow_encoded_slashes(true),
                )
        })
        .await;
    h.proxy.token_ready(Duration::from_secs(10)).await;
    (h.issuer, h.upstream, h.proxy)
}

/// Sends `GET <target>` as written (no client-side parsing) and returns the answer.
async fn raw_get(addr: SocketAddr, target: &str) -> (u16, String) {
    let request = format!("GET {target} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    let text = raw_until_close(addr, request.as_bytes(), Duration::from_secs(10)).await;
    let status = text
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (status, body)
}

#[tokio::test]
async fn every_spelling_of_a_way_out_is_refused_before_the_upstream() {
    let (_issuer, upstream, proxy) = setup().await;
    let refused = [
        "/api/..%2fadmin",
        "/api/..%2Fadmin",
        "/api/%2e%2e%2fadmin",
        "/api/x/..;/admin",
        "/api/x/..;x/admin",
        "/api/x/.;x/admin",
        "/api/x%5c..%5cadmin",
        "/api/x%5C..%5Cadmin",
        "/api/x\\..\\admin",
        "/api/../admin",
        "/api/./admin",
        "/api/x/..",
        "/api/%2e%2e/admin",
        "/api/%2E%2e/admin",
        "/api/.%2E/admin",
        "/api/%2e./admin",
        "/api/%2e/admin",
        "/api/%252e%252e/admin",
        "/api/..%3b/admin",
        "/api/a%2Fb",
        "/api/a%2fb",
        "/api/a%5cb",
        "/api/a%00b",
        "/api/a%2500b",
        "/api/%c0%ae%c0%ae/admin",
        // Routes allowing %2F still refuse the rest.
        "/ids/a%2F..%2Fadmin",
        "/ids/a%2F%2e%2e%2Fadmin",
        "/ids/a%5Cb",
        "/ids/a%00b",
        "/ids/..;/admin",
        // No route would match, but the path is refused before routing.
        "/nowhere/../api",
    ];
    for target in refused {
        let (status, body) = raw_get(proxy.addr, target).await;
        assert_eq!(status, 400, "{target}: {body}");
        let json: serde_json::Value =
            serde_json::from_str(&body).unwrap_or_else(|_| panic!("{target}: not JSON: {body}"));
        assert_eq!(json["error"], "bad_request", "{target}");
        assert!(
            json["message"].as_str().unwrap().contains("path"),
            "{target}: {json}"
        );
    }
    assert_eq!(upstream.hits(), 0, "a refused path reached the upstream");
    proxy.stop().await;
}

#[tokio::test]
async fn look_alikes_pass_byte_for_byte() {
    let (_issuer, upstream, proxy) = setup().await;
    let passed = [
        ("/api/a;b/c", "/v1/a;b/c"),
        ("/api/x;jsessionid=1/y", "/v1/x;jsessionid=1/y"),
        ("/api/%2e%2ehidden", "/v1/%2e%2ehidden"),
        ("/api/..hidden/x", "/v1/..hidden/x"),
        ("/api/a..b", "/v1/a..b"),
        ("/api/.well-known/x", "/v1/.well-known/x"),
        ("/api/100%25", "/v1/100%25"),
        (
            "/api/caf%C3%A9?q=%2e%2e%2f..",
            "/v1/caf%C3%A9?q=%2e%2e%2f..",
        ),
        ("/ids/a%2Fb", "/v1/ids/a%2Fb"),
        ("/ids/a%2fb/c", "/v1/ids/a%2fb/c"),
    ];
    for (target, forwarded) in passed {
        let (status, body) = raw_get(proxy.addr, target).await;
        assert_eq!(status, 200, "{target}: {body}");
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json["uri"], forwarded, "{target}");
        let auth = json["headers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|pair| pair[0] == "authorization");
        assert!(auth, "{target} went without the token");
    }
    assert_eq!(upstream.hits(), passed.len());
    proxy.stop().await;
}
