//! The token store through the proxy: dialects, single flight, reuse, refresh-ahead, waits.

use std::time::Duration;

use http::Request;

use crate::support::*;

#[tokio::test]
async fn oauth2_json_with_audience_and_extra_params() {
    let Harness { issuer, proxy, .. } = Harness::with(|c| {
        c.p(|p| {
            p.request_format("json")
                .audience("https://api.lwolf.com")
                .extra_params([("lwt_client_id", "tenant-42")])
        })
    })
    .await;
    let answer = get(&client(), &proxy.url("/v1/transactions")).await;
    assert_eq!(answer.status, 200);
    assert_eq!(
        answer.echoed("authorization"),
        [format!("Bearer {}", issuer.token(1))]
    );
    let sent = issuer.last_request();
    assert_eq!(sent.content_type, "application/json");
    let body: serde_json::Value = serde_json::from_str(&sent.body).unwrap();
    assert_eq!(body["grant_type"], "client_credentials");
    assert_eq!(body["client_id"], "test-client");
    assert_eq!(body["client_secret"], "test-secret-value");
    assert_eq!(body["audience"], "https://api.lwolf.com");
    assert_eq!(body["lwt_client_id"], "tenant-42");
    proxy.stop().await;
}

#[tokio::test]
async fn form_with_basic_auth_and_string_expiry() {
    let Harness { issuer, proxy, .. } = Servers::start(Dialect::OAuth2StringExpiry)
        .await
        .proxy(|c| c.p(|p| p.client_auth("basic").scope("read write")))
        .await;
    let answer = get(&client(), &proxy.url("/x")).await;
    assert_eq!(
        answer.echoed("authorization"),
        [format!("Bearer {}", issuer.token(1))]
    );
    let sent = issuer.last_request();
    assert_eq!(sent.content_type, "application/x-www-form-urlencoded");
    assert_eq!(sent.body, "grant_type=client_credentials&scope=read+write");
    // base64("test-client:test-secret-value")
    assert_eq!(
        sent.authorization.as_deref(),
        Some("Basic dGVzdC1jbGllbnQ6dGVzdC1zZWNyZXQtdmFsdWU=")
    );
    let slot = proxy.store.slot("p").unwrap();
    let token = slot.current().unwrap();
    let lifetime = token.expires_at - token.refresh_at;
    assert!(
        lifetime > Duration::from_secs(300),
        "3600 s string expiry understood"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn loyalife_dialect_and_custom_header() {
    let Harness { issuer, proxy, .. } = Servers::start(Dialect::Loyalife)
        .await
        .proxy(|c| c.p(|p| p.loyalife().header("X-Api-Token").header_prefix("")))
        .await;
    let answer = get(&client(), &proxy.url("/members")).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.echoed("x-api-token"), [issuer.token(1)]);
    assert!(answer.echoed("authorization").is_empty());
    proxy.stop().await;
}

#[tokio::test]
async fn loyalife_error_shape_gives_503_with_its_message() {
    let servers = Servers::start(Dialect::Loyalife).await;
    servers.issuer.set_fault(Fault::NoToken);
    let Harness {
        upstream, proxy, ..
    } = servers.proxy(|c| c.p(|p| p.loyalife())).await;
    let answer = get(&client(), &proxy.url("/members")).await;
    assert_eq!(answer.status, 503);
    let body = answer.json();
    assert_eq!(body["error"], "token_unavailable");
    assert_eq!(body["provider"], "p");
    let message = body["message"].as_str().unwrap();
    assert!(message.contains("Invalid client credentials"), "{message}");
    assert_eq!(upstream.hits(), 0, "nothing sent upstream without a token");
    proxy.stop().await;
}

#[tokio::test]
async fn single_flight_200_concurrent_first_requests() {
    let servers = Servers::start(Dialect::OAuth2).await;
    servers.issuer.set_delay(Duration::from_millis(300));
    let Harness { issuer, proxy, .. } = servers.proxy(|c| c.p(|p| p.prefetch(false))).await;
    let client = client();
    let mut tasks = Vec::new();
    for i in 0..200 {
        let client = client.clone();
        let url = proxy.url(&format!("/r/{i}"));
        tasks.push(tokio::spawn(async move { get(&client, &url).await.status }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap(), 200);
    }
    assert_eq!(issuer.hits(), 1);
    proxy.stop().await;
}

#[tokio::test]
async fn token_reused_across_many_requests_and_routes() {
    let Harness { issuer, proxy, .. } = Harness::with(|c| {
        let up = c.routes[0].clone();
        c.without_routes()
            .route(up.clone().path_prefix("/a"))
            .route(up.listen("127.0.0.2:0"))
    })
    .await;
    let other = proxy.listener("127.0.0.2:0");
    let client = client();
    for i in 0..300 {
        let url = if i % 2 == 0 {
            proxy.url("/a/x")
        } else {
            format!("http://{other}/y")
        };
        assert_eq!(get(&client, &url).await.status, 200);
    }
    assert_eq!(issuer.hits(), 1);
    proxy.stop().await;
}

#[tokio::test]
async fn refresh_ahead_keeps_requests_off_a_slow_issuer() {
    let servers = Servers::start(Dialect::OAuth2).await;
    servers.issuer.set_lifetime(3.0);
    let Harness { issuer, proxy, .. } = servers.proxy(|c| c.p(|p| p.refresh_before("50%"))).await;
    let client = client();
    assert!(eventually(Duration::from_secs(5), || issuer.hits() == 1).await);
    proxy.token_ready(Duration::from_secs(5)).await;
    issuer.set_delay(Duration::from_millis(700));
    // Requests for 5 s, across at least two refreshes of a 3 s token.
    let started = tokio::time::Instant::now();
    let mut slowest = Duration::ZERO;
    let mut count = 0;
    while started.elapsed() < Duration::from_secs(5) && count < 2000 {
        let t = tokio::time::Instant::now();
        let answer = get(&client, &proxy.url("/x")).await;
        assert_eq!(answer.status, 200);
        slowest = slowest.max(t.elapsed());
        count += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        issuer.hits() >= 3,
        "refreshed in the background: {}",
        issuer.hits()
    );
    assert!(
        slowest < Duration::from_millis(700),
        "no request waited for the issuer: slowest {slowest:?}"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn token_wait_bounds_a_request_when_the_issuer_hangs() {
    let servers = Servers::start(Dialect::OAuth2).await;
    servers.issuer.set_fault(Fault::Hang);
    let Harness { proxy, .. } = servers.proxy(|c| c.server(|s| s.token_wait("300ms"))).await;
    let t = tokio::time::Instant::now();
    let answer = get(&client(), &proxy.url("/x")).await;
    assert_eq!(answer.status, 503);
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "bounded by token_wait: {:?}",
        t.elapsed()
    );
    assert_eq!(answer.json()["error"], "token_unavailable");
    proxy.stop().await;
}

#[tokio::test]
async fn failing_provider_does_not_stop_startup_and_recovers() {
    let servers = Servers::start(Dialect::OAuth2).await;
    servers
        .issuer
        .set_fault(Fault::Status(500, r#"{"error":"server_error"}"#.into()));
    let Harness { issuer, proxy, .. } = servers.proxy(|c| c).await;
    let client = client();
    let answer = get(&client, &proxy.url("/x")).await;
    assert_eq!(answer.status, 503);
    assert!(answer.json()["message"]
        .as_str()
        .unwrap()
        .contains("server_error"));
    issuer.set_fault(Fault::None);
    proxy.token_ready(Duration::from_secs(5)).await;
    assert_eq!(get(&client, &proxy.url("/x")).await.status, 200);
    proxy.stop().await;
}

#[tokio::test]
async fn upstream_401_invalidates_and_replays_once() {
    let Harness {
        issuer,
        upstream,
        proxy,
        ..
    } = Harness::start().await;
    let client = client();
    assert_eq!(get(&client, &proxy.url("/x")).await.status, 200);
    upstream.reject(&issuer.token(1), 401);
    let req = Request::post(proxy.url("/orders"))
        .body(full("payload-123"))
        .unwrap();
    let answer = send(&client, req).await;
    assert_eq!(answer.status, 200);
    assert_eq!(
        answer.echoed("authorization"),
        [format!("Bearer {}", issuer.token(2))]
    );
    assert_eq!(answer.json()["body_len"], 11);
    assert_eq!(issuer.hits(), 2);
    proxy.stop().await;
}
