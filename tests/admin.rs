//! Operability: admin endpoints, metrics, reload under load.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::Request;

use crate::support::*;

/// The basic config with an admin listener.
fn with_admin(c: TestConfig) -> TestConfig {
    c.server(|s| s.admin())
}

#[tokio::test]
async fn readiness_flips_with_the_token() {
    let servers = Servers::start(Dialect::OAuth2).await;
    servers.issuer.set_delay(Duration::from_millis(500));
    servers.issuer.set_lifetime(2.0);
    let Harness { issuer, proxy, .. } = servers.proxy(with_admin).await;
    let c = client();
    assert_eq!(get(&c, &proxy.admin_url("/healthz")).await.status, 200);
    let not_ready = get(&c, &proxy.admin_url("/readyz")).await;
    assert_eq!(not_ready.status, 503);
    assert_eq!(not_ready.json()["providers"][0], "p");
    let mut ready = false;
    for _ in 0..200 {
        if get(&c, &proxy.admin_url("/readyz")).await.status == 200 {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(ready, "ready once the token arrived");
    // The refresh fails; once the token expires, readiness goes away again.
    issuer.set_delay(Duration::ZERO);
    issuer.set_fault(Fault::Status(500, "{}".into()));
    let slot = proxy.store.slot("p").unwrap();
    assert!(eventually(Duration::from_secs(4), || slot.current().is_none()).await);
    let answer = get(&c, &proxy.admin_url("/readyz")).await;
    assert_eq!(answer.status, 503);
    assert!(answer.json()["message"].as_str().unwrap().contains('p'));
    proxy.stop().await;
}

#[tokio::test]
async fn metrics_and_tokens_move_with_traffic() {
    let Harness {
        issuer,
        upstream,
        proxy,
        ..
    } = Harness::with(with_admin).await;
    let c = client();
    for _ in 0..7 {
        assert_eq!(get(&c, &proxy.url("/x")).await.status, 200);
    }
    let text = proxy.metrics().await;
    assert_eq!(
        metric(
            &text,
            "bearer_proxy_requests_total{route=\"/\",status=\"200\"}"
        ),
        Some(7.0),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "bearer_proxy_request_duration_seconds_count{route=\"/\"}"
        ),
        Some(7.0)
    );
    assert_eq!(
        metric(
            &text,
            "bearer_proxy_token_fetches_total{provider=\"p\",outcome=\"ok\"}"
        ),
        Some(1.0)
    );
    let expires = metric(
        &text,
        "bearer_proxy_token_expires_in_seconds{provider=\"p\"}",
    )
    .unwrap();
    assert!(expires > 3500.0 && expires <= 3600.0, "{expires}");
    assert_eq!(metric(&text, "bearer_proxy_requests_in_flight"), Some(0.0));

    // An upstream rejection shows up as an invalidation, a replay and a second fetch.
    upstream.reject(&issuer.token(1), 401);
    assert_eq!(get(&c, &proxy.url("/x")).await.status, 200);
    let text = proxy.metrics().await;
    assert_eq!(
        metric(
            &text,
            "bearer_proxy_token_fetches_total{provider=\"p\",outcome=\"ok\"}"
        ),
        Some(2.0)
    );
    assert_eq!(
        metric(
            &text,
            "bearer_proxy_token_invalidations_total{provider=\"p\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(&text, "bearer_proxy_replays_total{route=\"/\"}"),
        Some(1.0)
    );

    let tokens = get(&c, &proxy.admin_url("/tokens")).await.json();
    let p = &tokens["p"];
    assert_eq!(p["state"], "valid");
    assert_eq!(p["fetches"], 2);
    assert_eq!(p["failures"], 0);
    assert_eq!(p["generation"], 2);
    assert!(p["expires_in_s"].as_u64().unwrap() > 3500);
    assert!(p["fetched_at"].as_str().unwrap().ends_with('Z'));
    let raw = serde_json::to_string(&tokens).unwrap();
    assert!(!raw.contains(&issuer.token(2)) && !raw.contains("test-secret-value"));

    // A failing fetch: counted, and its error shown.
    issuer.set_fault(Fault::Status(401, r#"{"error":"invalid_client"}"#.into()));
    upstream.reject(&issuer.token(2), 401);
    assert_eq!(get(&c, &proxy.url("/x")).await.status, 401);
    assert!(
        eventually(Duration::from_secs(2), || proxy
            .store
            .slot("p")
            .unwrap()
            .status()
            .failures
            >= 1)
        .await
    );
    let text = proxy.metrics().await;
    assert!(
        metric(
            &text,
            "bearer_proxy_token_fetches_total{provider=\"p\",outcome=\"error\"}"
        )
        .unwrap()
            >= 1.0
    );
    assert!(metric(
        &text,
        "bearer_proxy_requests_total{route=\"/\",status=\"401\"}"
    )
    .is_some());
    let tokens = get(&c, &proxy.admin_url("/tokens")).await.json();
    assert!(tokens["p"]["last_error"]
        .as_str()
        .unwrap()
        .contains("invalid_client"));
    proxy.stop().await;
}

#[tokio::test]
async fn upstream_errors_and_unrouted_requests_are_counted() {
    let Harness { proxy, .. } = Harness::with(|c| {
        let api = c.routes[0].clone().path_prefix("/api");
        with_admin(c)
            .without_routes()
            .route(RouteSection::open("http://127.0.0.1:1").path_prefix("/down"))
            .route(api)
    })
    .await;
    let c = client();
    assert_eq!(get(&c, &proxy.url("/down/x")).await.status, 502);
    assert_eq!(get(&c, &proxy.url("/nowhere")).await.status, 404);
    let text = proxy.metrics().await;
    assert_eq!(
        metric(
            &text,
            "bearer_proxy_upstream_errors_total{route=\"/down\",kind=\"unreachable\"}"
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "bearer_proxy_requests_total{route=\"-\",status=\"404\"}"
        ),
        Some(1.0)
    );
    assert_eq!(get(&c, &proxy.admin_url("/nope")).await.status, 404);
    proxy.stop().await;
}

/// `POST /reload` on the proxy's admin listener.
async fn reload(c: &Client, proxy: &Proxy) -> Answer {
    send(
        c,
        Request::post(proxy.admin_url("/reload"))
            .body(full(""))
            .unwrap(),
    )
    .await
}

/// Providers `p` and `q`, a route `/a` for `p`, and an admin listener to reload through.
/// A proxy started from `reload_config` written to a file, ready to be reloaded.
struct Reloadable {
    issuer: Issuer,
    other: Issuer,
    upstream: Upstream,
    /// Holds `file`; dropped last.
    dir: tempfile::TempDir,
    file: std::path::PathBuf,
    proxy: Proxy,
}

impl Reloadable {
    async fn start() -> Self {
        let issuer = Issuer::start(Dialect::OAuth2).await;
        let other = Issuer::start_named(Dialect::OAuth2, "q").await;
        let upstream = Upstream::start().await;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bp.toml");
        std::fs::write(&file, reload_config(&issuer, &other, &upstream).render()).unwrap();
        let proxy = Proxy::start_config(bearer_proxy::config::load(&file).unwrap()).await;
        Self {
            issuer,
            other,
            upstream,
            dir,
            file,
            proxy,
        }
    }
}

fn reload_config(issuer: &Issuer, other: &Issuer, upstream: &Upstream) -> TestConfig {
    TestConfig::default()
        .server(|s| s.admin())
        .with_provider(
            "p",
            ProviderSection::new(&issuer.url(), "id", "secret-value"),
        )
        .with_provider("q", ProviderSection::new(&other.url(), "id-q", "secret-q"))
        .route(RouteSection::to(&format!("{}/a", upstream.url()), "p").path_prefix("/a"))
}

#[tokio::test]
async fn reload_under_load_drops_nothing_and_keeps_unchanged_tokens() {
    let Reloadable {
        issuer,
        other,
        upstream,
        dir: _dir,
        file,
        proxy,
    } = Reloadable::start().await;
    let c = client();
    assert_eq!(get(&c, &proxy.url("/a/x")).await.status, 200);
    assert!(eventually(Duration::from_secs(2), || other.hits() == 1).await);

    // 500 requests from 5 workers, spread across a reload that adds a route and
    // changes provider q (new client_id) but leaves p alone.
    let failures = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..5 {
        let (c, url) = (c.clone(), proxy.url("/a/load"));
        let (failures, done) = (failures.clone(), done.clone());
        workers.push(tokio::spawn(async move {
            for _ in 0..100 {
                if get(&c, &url).await.status != 200 {
                    failures.fetch_add(1, Ordering::SeqCst);
                }
                done.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }));
    }
    assert!(
        eventually(Duration::from_secs(10), || done.load(Ordering::SeqCst)
            >= 200)
        .await
    );
    let changed = reload_config(&issuer, &other, &upstream)
        .route(RouteSection::to(&format!("{}/b", upstream.url()), "q").path_prefix("/b"))
        .provider("q", |q| q.client_id("id-q2"));
    std::fs::write(&file, changed.render()).unwrap();
    let report = reload(&c, &proxy).await;
    assert_eq!(
        report.status,
        200,
        "{}",
        String::from_utf8_lossy(&report.body)
    );
    let report = report.json();
    assert_eq!(report["providers_kept"], serde_json::json!(["p"]));
    assert_eq!(report["providers_started"], serde_json::json!(["q"]));
    for w in workers {
        w.await.unwrap();
    }
    assert_eq!(
        failures.load(Ordering::SeqCst),
        0,
        "no failed request across the reload"
    );
    assert_eq!(issuer.hits(), 1, "unchanged provider kept its token");
    // The new route works with the changed provider's new token.
    let answer = get(&c, &proxy.url("/b/y")).await;
    assert_eq!(answer.status, 200);
    assert_eq!(
        answer.echoed("authorization"),
        [format!("Bearer {}", other.token(2))]
    );
    assert_eq!(other.hits(), 2);
    proxy.stop().await;
}

/// Settings the running listeners were built with are reported as needing a restart;
/// `max_uri_length`, checked per request, reloads silently.
#[tokio::test]
async fn a_reload_that_changes_connection_settings_says_it_needs_a_restart() {
    let Reloadable {
        issuer,
        other,
        upstream,
        dir: _dir,
        file,
        proxy,
    } = Reloadable::start().await;
    let report = proxy.shared.reload().await.expect("reload");
    assert!(report.listener_changes.is_empty(), "{report:?}");
    let changed = reload_config(&issuer, &other, &upstream).server(|s| {
        s.workers(3)
            .shutdown_grace("7s")
            .header_read_timeout("9s")
            .max_uri_length("4000")
    });
    std::fs::write(&file, changed.render()).unwrap();
    let report = proxy.shared.reload().await.expect("reload");
    assert_eq!(
        report.listener_changes,
        [
            "workers changed",
            "shutdown_grace changed",
            "max_connections/max_header_bytes/max_headers/header_read_timeout/max_concurrent_streams changed",
        ],
        "{report:?}"
    );
    let only_uri = reload_config(&issuer, &other, &upstream).server(|s| s.max_uri_length("4000"));
    std::fs::write(&file, only_uri.render()).unwrap();
    proxy.shared.reload().await.expect("reload");
    std::fs::write(
        &file,
        only_uri.server(|s| s.max_uri_length("5000")).render(),
    )
    .unwrap();
    let report = proxy.shared.reload().await.expect("reload");
    assert!(report.listener_changes.is_empty(), "{report:?}");
    proxy.stop().await;
}

#[tokio::test]
async fn bad_reload_keeps_serving() {
    let Reloadable {
        issuer,
        other,
        upstream,
        dir: _dir,
        file,
        proxy,
    } = Reloadable::start().await;
    let c = client();
    assert_eq!(get(&c, &proxy.url("/a/x")).await.status, 200);
    std::fs::write(
        &file,
        reload_config(&issuer, &other, &upstream)
            .route(RouteSection::open("not a url"))
            .render(),
    )
    .unwrap();
    let answer = reload(&c, &proxy).await;
    assert_eq!(answer.status, 422);
    let message = answer.json()["message"].as_str().unwrap().to_owned();
    assert!(
        message.contains("bp.toml") && message.contains("routes[1].upstream"),
        "{message}"
    );
    assert_eq!(get(&c, &proxy.url("/a/x")).await.status, 200);
    assert_eq!(issuer.hits(), 1);
    proxy.stop().await;
}

#[tokio::test]
async fn a_reload_runs_the_startup_file_checks_and_keeps_serving_when_they_fail() {
    let Reloadable {
        issuer,
        other,
        upstream,
        dir,
        file,
        proxy,
    } = Reloadable::start().await;
    let c = client();
    assert_eq!(get(&c, &proxy.url("/a/x")).await.status, 200);
    let ca = dir.path().join("no-such-ca.pem");
    let text = reload_config(&issuer, &other, &upstream)
        .server(|s| s.extra_ca_file(ca.display().to_string()));
    std::fs::write(&file, text.render()).unwrap();
    let answer = reload(&c, &proxy).await;
    assert_eq!(answer.status, 422);
    let message = answer.json()["message"].as_str().unwrap().to_owned();
    assert!(
        message.contains("bp.toml: server.extra_ca_file")
            && message.contains("no-such-ca.pem")
            && message.matches("No such file or directory").count() == 1,
        "{message}"
    );
    assert_eq!(get(&c, &proxy.url("/a/x")).await.status, 200);
    proxy.stop().await;
}

#[tokio::test]
async fn json_logs_have_one_object_per_line_with_the_request_fields() {
    let Servers { issuer, upstream } = Servers::start(Dialect::OAuth2).await;
    // The first fetch fails, so the log also shows a failure with its next attempt.
    issuer.set_fault(Fault::Status(
        503,
        r#"{"error":"temporarily_unavailable"}"#.into(),
    ));
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bp.toml");
    std::fs::write(
        &file,
        TestConfig::basic(&issuer, &upstream)
            .server(|s| s.listen(format!("127.0.0.1:{port}")))
            .render(),
    )
    .unwrap();
    let log = dir.path().join("stderr.log");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_bearer-proxy"))
        .args(["--log-format", "json", "run", "-c"])
        .arg(&file)
        .env_remove("RUST_LOG")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    assert!(eventually(Duration::from_secs(5), || issuer.hits() >= 1).await);
    issuer.set_fault(Fault::None);
    let c = client();
    let url = format!("http://127.0.0.1:{port}/orders/7?secret-query=1");
    let mut ok = false;
    for _ in 0..300 {
        let attempt = tokio::time::timeout(
            Duration::from_secs(1),
            c.request(Request::get(&url).body(full("")).unwrap()),
        )
        .await;
        if let Ok(Ok(response)) = attempt {
            ok = response.status() == 200;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(ok && status.success());
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}")))
        .collect();
    let request = lines
        .iter()
        .find(|l| l["message"] == "request")
        .unwrap_or_else(|| panic!("no request line in {text}"));
    assert_eq!(request["method"], "GET");
    assert_eq!(request["route"], "/");
    assert_eq!(
        request["path"], "/orders/7",
        "path without the query string"
    );
    assert_eq!(request["status"], 200);
    assert_eq!(request["replayed"], false);
    assert!(request["bytes"].as_u64().unwrap() > 0);
    assert!(request["duration_ms"].as_f64().is_some());
    assert!(!text.contains("secret-query"));
    let failed = lines
        .iter()
        .find(|l| l["message"] == "token fetch failed")
        .unwrap_or_else(|| panic!("no failure line in {text}"));
    assert_eq!(failed["provider"], "p");
    assert_eq!(failed["outcome"], "error");
    assert!(failed["error"]
        .as_str()
        .unwrap()
        .contains("temporarily_unavailable"));
    assert!(failed["duration_ms"].as_u64().is_some());
    let retry_in_ms = failed["retry_in_ms"].as_u64().unwrap();
    assert!(
        (500..=1000).contains(&retry_in_ms),
        "first retry about 1 s: {retry_in_ms}"
    );
    let fetched = lines
        .iter()
        .find(|l| l["message"] == "token fetched")
        .unwrap();
    assert_eq!(fetched["provider"], "p");
    assert_eq!(fetched["outcome"], "ok");
}
