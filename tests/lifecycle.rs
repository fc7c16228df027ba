//! Token lifecycle under faults: backoff, Retry-After, invalidation with replay, the cache.

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, SystemTime};

use bearer_proxy::config::Config;
use bearer_proxy::secret::Secret;
use bearer_proxy::token::cache::TokenCache;
use http::Request;

use crate::support::*;

const MS: Duration = Duration::from_millis(1);

/// Each failure kind: attempts are retried with growing gaps, a bounded number of
/// times per window, and the store recovers by itself.
#[tokio::test]
async fn every_failure_kind_backs_off_and_recovers() {
    let faults = [
        (
            "500",
            Fault::Status(
                500,
                r#"{"error":"server_error","error_description":"boom"}"#.into(),
            ),
        ),
        ("html", Fault::Html),
        ("garbage", Fault::Garbage),
        ("huge", Fault::Huge),
        ("no token", Fault::NoToken),
        ("timeout", Fault::Hang),
        ("broken", Fault::Close),
    ];
    let mut tasks = Vec::new();
    for (name, fault) in faults {
        tasks.push(tokio::spawn(async move {
            let servers = Servers::start(Dialect::OAuth2).await;
            servers.issuer.set_fault(fault);
            let Harness { issuer, proxy, .. } = servers
                .proxy_tuned(100 * MS, Duration::from_secs(5), |c| {
                    c.server(|s| s.token_wait("200ms").token_timeout("100ms"))
                })
                .await;
            tokio::time::sleep(Duration::from_millis(1600)).await;
            let attempts = issuer.hits();
            // Gaps of at least 50, 100, 200, 400, 800 ms: at most 6 attempts in 1.6 s.
            assert!((3..=6).contains(&attempts), "{name}: {attempts} attempts");
            // The n-th gap is at least base/2 * 2^n whatever the machine's load (a busy
            // machine only makes gaps longer): growth without timing luck.
            let gaps = issuer.intervals();
            for (n, gap) in gaps.iter().enumerate() {
                let floor = 50 * MS * (1 << n);
                assert!(
                    *gap >= floor,
                    "{name}: gap {n} is {gap:?} < {floor:?}: {gaps:?}"
                );
            }
            let answer = get(&client(), &proxy.url("/x")).await;
            assert_eq!(answer.status, 503, "{name}");
            assert_eq!(answer.json()["error"], "token_unavailable");
            issuer.set_fault(Fault::None);
            proxy.token_ready(Duration::from_secs(5)).await;
            assert_eq!(get(&client(), &proxy.url("/x")).await.status, 200);
            proxy.stop().await;
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

#[tokio::test]
async fn connection_refused_backs_off() {
    // Port 1 on loopback: nothing listens there.
    let Harness { proxy, .. } = Servers::start(Dialect::OAuth2)
        .await
        .proxy_tuned(100 * MS, Duration::from_secs(5), |c| {
            c.server(|s| s.token_wait("100ms"))
                .p(|p| p.token_url("http://127.0.0.1:1/token"))
        })
        .await;
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let status = proxy.store.slot("p").unwrap().status();
    assert!(
        (3..=6).contains(&status.fetches),
        "{} attempts",
        status.fetches
    );
    assert!(status.last_error.unwrap().contains("unreachable"));
    let answer = get(&client(), &proxy.url("/x")).await;
    assert_eq!(answer.status, 503);
    assert!(answer.json()["message"]
        .as_str()
        .unwrap()
        .contains("unreachable"));
    proxy.stop().await;
}

#[tokio::test]
async fn backoff_is_capped() {
    let servers = Servers::start(Dialect::OAuth2).await;
    servers.issuer.set_fault(Fault::Status(503, "{}".into()));
    let Harness { issuer, proxy, .. } = servers.proxy_tuned(50 * MS, 200 * MS, |c| c).await;
    // The exact schedule is checked on a paused clock (src/token/tests.rs); here, end
    // to end, the refresher keeps retrying and its gaps stop growing. Uncapped, gaps
    // 5 to 7 would be at least 0.8 + 1.6 + 3.2 s; capped at 200 ms they sum to at most
    // 0.6 s, so 2.4 s leaves a loaded machine four times the room.
    assert!(
        eventually(Duration::from_secs(20), || issuer.hits() >= 9).await,
        "kept retrying: {:?}",
        issuer.intervals()
    );
    let gaps = issuer.intervals();
    let late: Duration = gaps[5..8].iter().sum();
    assert!(late <= 2400 * MS, "capped at 200 ms: {gaps:?}");
    proxy.stop().await;
}

#[tokio::test]
async fn current_token_served_while_refresh_fails_then_503_with_provider_words() {
    let servers = Servers::start(Dialect::OAuth2).await;
    servers.issuer.set_lifetime(2.0);
    let Harness { issuer, proxy, .. } = servers
        .proxy(|c| {
            c.server(|s| s.token_wait("200ms"))
                .p(|p| p.refresh_before("50%"))
        })
        .await;
    let c = client();
    assert_eq!(get(&c, &proxy.url("/x")).await.status, 200);
    issuer.set_fault(Fault::Status(
        400,
        r#"{"error":"invalid_client","error_description":"Client secret test-secret-value was revoked"}"#.into(),
    ));
    // Refresh starts at ~1 s and fails; the token stays valid until 2 s.
    assert!(eventually(Duration::from_secs(3), || issuer.hits() >= 2).await);
    let slot = proxy.store.slot("p").unwrap();
    if slot.current().is_some() {
        let a = get(&c, &proxy.url("/x")).await;
        assert!(a.status == 200 || slot.current().is_none());
    }
    assert!(eventually(Duration::from_secs(3), || slot.current().is_none()).await);
    let answer = get(&c, &proxy.url("/x")).await;
    assert_eq!(answer.status, 503);
    let message = answer.json()["message"].as_str().unwrap().to_owned();
    assert!(message.contains("invalid_client"), "{message}");
    assert!(message.contains("was revoked"), "{message}");
    assert!(
        !message.contains("test-secret-value"),
        "secret echoed: {message}"
    );
    issuer.set_fault(Fault::None);
    assert!(eventually(Duration::from_secs(5), || slot.current().is_some()).await);
    assert_eq!(get(&c, &proxy.url("/x")).await.status, 200);
    proxy.stop().await;
}

#[tokio::test]
async fn served_token_survives_failing_refresh() {
    let servers = Servers::start(Dialect::OAuth2).await;
    servers.issuer.set_lifetime(3.0);
    let Harness { issuer, proxy, .. } = servers.proxy(|c| c.p(|p| p.refresh_before("80%"))).await;
    let c = client();
    assert_eq!(get(&c, &proxy.url("/x")).await.status, 200);
    issuer.set_fault(Fault::Html);
    // Refresh is due at ~0.6 s and fails; until 3 s the first token keeps working.
    assert!(eventually(Duration::from_secs(2), || issuer.hits() >= 2).await);
    let answer = get(&c, &proxy.url("/x")).await;
    assert_eq!(answer.status, 200);
    assert_eq!(
        answer.echoed("authorization"),
        [format!("Bearer {}", issuer.token(1))]
    );
    proxy.stop().await;
}

#[tokio::test]
async fn retry_after_seconds_is_honoured_and_requests_add_no_fetch() {
    // The first attempt comes after this, so the second is due 3 s after it at the
    // earliest: checks before then are sound however slow the machine is.
    let started = tokio::time::Instant::now();
    let servers = Servers::start(Dialect::OAuth2).await;
    servers.issuer.set_fault(Fault::RateLimited("3".into()));
    let Harness { issuer, proxy, .. } = servers.proxy(|c| c).await;
    assert!(eventually(Duration::from_secs(10), || issuer.hits() == 1).await);
    issuer.set_fault(Fault::None);
    let c = client();
    let quiet = |at: tokio::time::Instant| at < started + Duration::from_millis(2900);
    // Requests during the wait fail fast (the next attempt is past token_wait, 2 s,
    // which a waiting request would take) and do not cause a fetch.
    let mut asked = 0;
    while asked < 20 && quiet(tokio::time::Instant::now() + Duration::from_millis(1500)) {
        let t = tokio::time::Instant::now();
        let answer = get(&c, &proxy.url("/x")).await;
        assert_eq!(answer.status, 503);
        assert!(answer.json()["message"].as_str().unwrap().contains("429"));
        assert!(t.elapsed() < Duration::from_millis(1500));
        asked += 1;
    }
    while quiet(tokio::time::Instant::now()) {
        assert_eq!(issuer.hits(), 1, "no attempt before Retry-After");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(eventually(Duration::from_secs(10), || issuer.hits() == 2).await);
    let gap = issuer.intervals()[0];
    assert!(gap >= Duration::from_secs(3), "{gap:?}");
    proxy.stop().await;
}

#[tokio::test]
async fn retry_after_http_date_is_honoured() {
    let servers = Servers::start(Dialect::OAuth2).await;
    let when = SystemTime::now() + Duration::from_secs(3);
    servers
        .issuer
        .set_fault(Fault::RateLimited(httpdate::fmt_http_date(when)));
    let Harness { issuer, proxy, .. } = servers.proxy(|c| c).await;
    assert!(eventually(Duration::from_secs(10), || issuer.hits() == 1).await);
    // The first attempt happened no later than this.
    let seen = SystemTime::now();
    issuer.set_fault(Fault::None);
    // The date has one-second resolution: no attempt before it (a slow machine only
    // makes the first attempt later, never the second one earlier). The exact delay is
    // checked on a paused clock (src/token/tests.rs).
    let date = httpdate::parse_http_date(&httpdate::fmt_http_date(when)).unwrap();
    while SystemTime::now() + Duration::from_millis(100) < date {
        assert_eq!(issuer.hits(), 1, "an attempt before the Retry-After date");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(eventually(Duration::from_secs(10), || issuer.hits() == 2).await);
    // However late the first attempt came, the second waited until the date.
    let gap = issuer.intervals()[0];
    let at_least = date.duration_since(seen).unwrap_or_default();
    assert!(gap + 100 * MS >= at_least, "{gap:?} < {at_least:?}");
    proxy.stop().await;
}

#[tokio::test]
async fn twenty_concurrent_401s_cause_one_fetch_and_all_replay() {
    let servers = Servers::start(Dialect::OAuth2).await;
    servers.issuer.set_delay(Duration::from_millis(100));
    let Harness {
        issuer,
        upstream,
        proxy,
        ..
    } = servers.proxy(|c| c).await;
    let c = client();
    assert_eq!(get(&c, &proxy.url("/x")).await.status, 200);
    upstream.reject(&issuer.token(1), 401);
    let mut tasks = Vec::new();
    for i in 0..20 {
        let c = c.clone();
        let url = proxy.url("/orders");
        tasks.push(tokio::spawn(async move {
            let body = format!("order-{i}");
            let answer = send(&c, Request::post(url).body(full(body.clone())).unwrap()).await;
            (
                answer.status,
                answer.json()["body_len"].as_u64(),
                body.len() as u64,
            )
        }));
    }
    for task in tasks {
        let (status, len, sent) = task.await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(len, Some(sent), "body replayed intact");
    }
    assert_eq!(issuer.hits(), 2, "one fetch for twenty rejections");
    proxy.stop().await;
}

#[tokio::test]
async fn lone_wolf_403_replays_post_body_intact() {
    let Harness {
        issuer,
        upstream,
        proxy,
        ..
    } = Harness::with(|c| c.p(|p| p.invalidate_on([401, 403]))).await;
    let c = client();
    assert_eq!(get(&c, &proxy.url("/x")).await.status, 200);
    upstream.reject(&issuer.token(1), 403);
    let body = "x".repeat(64 * 1024);
    let answer = send(
        &c,
        Request::post(proxy.url("/v1/transactions"))
            .body(full(body.clone()))
            .unwrap(),
    )
    .await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.json()["body_len"], body.len());
    use sha2::Digest;
    assert_eq!(
        answer.json()["body_sha256"],
        hex(&sha2::Sha256::digest(body.as_bytes()))
    );
    assert_eq!(
        answer.echoed("authorization"),
        [format!("Bearer {}", issuer.token(2))]
    );
    proxy.stop().await;
}

#[tokio::test]
async fn body_over_max_replay_body_is_not_replayed() {
    let Harness {
        issuer,
        upstream,
        proxy,
        ..
    } = Harness::with(|c| c.server(|s| s.max_replay_body("1KiB"))).await;
    let c = client();
    assert_eq!(get(&c, &proxy.url("/x")).await.status, 200);
    upstream.reject(&issuer.token(1), 401);
    let before = upstream.hits();
    let answer = send(
        &c,
        Request::post(proxy.url("/big"))
            .body(stream_bytes(4096))
            .unwrap(),
    )
    .await;
    assert_eq!(answer.status, 401, "the upstream's answer, as it was");
    assert_eq!(
        answer.json()["body_len"],
        4096,
        "body streamed through whole"
    );
    assert_eq!(upstream.hits(), before + 1, "no replay");
    // The rejected token was still dropped and replaced.
    assert!(eventually(Duration::from_secs(2), || issuer.hits() == 2).await);
    assert_eq!(
        get(&c, &proxy.url("/x")).await.echoed("authorization"),
        [format!("Bearer {}", issuer.token(2))]
    );
    proxy.stop().await;
}

#[tokio::test]
async fn a_fresh_token_rejected_again_is_not_fetched_a_third_time() {
    let Harness {
        issuer,
        upstream,
        proxy,
        ..
    } = Harness::start().await;
    let c = client();
    assert_eq!(get(&c, &proxy.url("/x")).await.status, 200);
    upstream.reject(&issuer.token(1), 401);
    upstream.reject(&issuer.token(2), 401);
    let before = upstream.hits();
    let answer = send(&c, Request::post(proxy.url("/y")).body(full("b")).unwrap()).await;
    assert_eq!(answer.status, 401);
    assert_eq!(upstream.hits(), before + 2, "exactly one replay");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        issuer.hits(),
        2,
        "not fetched a third time for this request"
    );
    proxy.stop().await;
}

/// The basic config with a token cache in `dir` and this client secret.
fn cache_config(
    issuer: &Issuer,
    upstream: &Upstream,
    dir: &std::path::Path,
    secret: &str,
) -> TestConfig {
    TestConfig::basic(issuer, upstream)
        .server(|s| s.token_cache_dir(dir.display().to_string()))
        .p(|p| p.client_secret(secret))
}

#[tokio::test]
async fn cache_survives_restart_with_safe_modes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cache");
    let Servers { issuer, upstream } = Servers::start(Dialect::OAuth2).await;
    let toml = cache_config(&issuer, &upstream, &dir, "secret-one");
    let proxy = Proxy::start_with(&toml).await;
    assert_eq!(get(&client(), &proxy.url("/x")).await.status, 200);
    proxy.stop().await;
    assert_eq!(issuer.hits(), 1);
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    let files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    assert_eq!(mode(&files[0]), 0o600);

    // Restart: no token request, the cached token is used.
    let proxy = Proxy::start_with(&toml).await;
    let answer = get(&client(), &proxy.url("/x")).await;
    assert_eq!(
        answer.echoed("authorization"),
        [format!("Bearer {}", issuer.token(1))]
    );
    assert_eq!(issuer.hits(), 1);
    proxy.stop().await;

    // Changed credentials: a new fetch.
    let proxy = Proxy::start_with(&cache_config(&issuer, &upstream, &dir, "secret-two")).await;
    let answer = get(&client(), &proxy.url("/x")).await;
    assert_eq!(
        answer.echoed("authorization"),
        [format!("Bearer {}", issuer.token(2))]
    );
    proxy.stop().await;
}

#[tokio::test]
async fn corrupt_cache_file_is_ignored() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cache");
    let Servers { issuer, upstream } = Servers::start(Dialect::OAuth2).await;
    let toml = cache_config(&issuer, &upstream, &dir, "secret-one");
    let proxy = Proxy::start_with(&toml).await;
    assert_eq!(get(&client(), &proxy.url("/x")).await.status, 200);
    proxy.stop().await;
    for entry in std::fs::read_dir(&dir).unwrap() {
        std::fs::write(entry.unwrap().path(), "{ this is not json").unwrap();
    }
    let proxy = Proxy::start_with(&toml).await;
    assert_eq!(get(&client(), &proxy.url("/x")).await.status, 200);
    assert_eq!(issuer.hits(), 2);
    proxy.stop().await;
}

#[tokio::test]
async fn insecure_cache_dir_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cache");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let Servers { issuer, upstream } = Servers::start(Dialect::OAuth2).await;
    let config = Config::parse(
        &cache_config(&issuer, &upstream, &dir, "s3cret").render(),
        std::path::Path::new("t.toml"),
        &|_| None,
    )
    .unwrap();
    let error = bearer_proxy::server::Server::bind(config)
        .await
        .err()
        .expect("refused");
    let message = bearer_proxy::error::chain(&error);
    assert!(
        message.contains("t.toml: server.token_cache_dir"),
        "{message}"
    );
    assert!(message.contains("writable by group or others"), "{message}");
    assert!(message.contains("chmod 700"), "{message}");
}

#[tokio::test]
async fn cached_token_near_expiry_is_refreshed_at_startup() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cache");
    let Servers { issuer, upstream } = Servers::start(Dialect::OAuth2).await;
    let toml = cache_config(&issuer, &upstream, &dir, "secret-one");
    let config = toml.parse();
    let cache = TokenCache::open(&dir).unwrap();
    let now = SystemTime::now();
    // 100 s lifetime, 5 s left: inside the default 10 % refresh window.
    cache
        .store(
            &config.providers["p"],
            None,
            &Secret::new("old-token"),
            now - Duration::from_secs(95),
            now + Duration::from_secs(5),
        )
        .unwrap();
    let proxy = Proxy::start_with(&toml).await;
    // The old token is still valid, so it may serve while the refresh runs...
    assert!(
        eventually(Duration::from_secs(2), || issuer.hits() == 1).await,
        "refreshed at once"
    );
    // ...and afterwards the new one is used.
    assert!(
        eventually(Duration::from_secs(2), || {
            proxy
                .store
                .slot("p")
                .unwrap()
                .current()
                .is_some_and(|t| t.generation == 2)
        })
        .await
    );
    proxy.stop().await;

    // A cached token far from expiry: no fetch at all.
    let issuer2 = Issuer::start(Dialect::OAuth2).await;
    let toml2 = cache_config(&issuer2, &upstream, &dir, "secret-one");
    let config2 = toml2.parse();
    cache
        .store(
            &config2.providers["p"],
            None,
            &Secret::new("cached-token"),
            now,
            now + Duration::from_secs(3600),
        )
        .unwrap();
    let proxy = Proxy::start_with(&toml2).await;
    let answer = get(&client(), &proxy.url("/x")).await;
    assert_eq!(answer.echoed("authorization"), ["Bearer cached-token"]);
    assert_eq!(issuer2.hits(), 0);
    proxy.stop().await;
}

#[tokio::test]
async fn token_command_uses_the_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cache");
    let Servers { issuer, upstream } = Servers::start(Dialect::OAuth2).await;
    let file = tmp.path().join("bp.toml");
    std::fs::write(
        &file,
        cache_config(&issuer, &upstream, &dir, "secret-one").render(),
    )
    .unwrap();
    for _ in 0..3 {
        let out = tokio::time::timeout(
            Duration::from_secs(20),
            tokio::process::Command::new(env!("CARGO_BIN_EXE_bearer-proxy"))
                .args(["token", "-c"])
                .arg(&file)
                .arg("p")
                .kill_on_drop(true)
                .output(),
        )
        .await
        .unwrap()
        .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("{}\n", issuer.token(1))
        );
    }
    assert_eq!(issuer.hits(), 1, "one token request per lifetime");
}
