//! Keyed providers (`key_header`): one token per member (Loyalife `scope`) or tenant
//! (Lone Wolf `lwt_client_id`), against issuers whose tokens depend on that subject.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bearer_proxy::config::Config;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::support::*;

/// The subject-binding dialects of the provider docs.
#[derive(Clone, Copy, PartialEq)]
pub enum Binding {
    /// Loyalife: JSON body, `scope` = `["LOGIN","<member>"]`, token in `results.token`.
    LoyalifeScope,
    /// Lone Wolf: form body, `lwt_client_id` = tenant, OAuth2 answer.
    LoneWolfTenant,
}

#[derive(Default)]
pub struct KeyedIssuerState {
    pub hits: AtomicUsize,
    /// Tokens issued per subject, in order.
    pub issued: Mutex<HashMap<String, Vec<String>>>,
    /// Raw `scope` strings received (Loyalife).
    pub scopes: Mutex<Vec<String>>,
    pub delay: Mutex<Duration>,
    /// Lifetime of issued tokens in seconds.
    pub lifetime: Mutex<f64>,
    /// Subjects refused with an error that echoes the request body.
    pub refuse: Mutex<Vec<String>>,
}

/// A mock issuer whose token depends on the subject the request names. Tokens are
/// `KTOK-<n>` and never contain the subject, so a leak scan can look for keys alone.
#[derive(Clone)]
pub struct KeyedIssuer {
    pub addr: SocketAddr,
    pub state: Arc<KeyedIssuerState>,
}

impl KeyedIssuer {
    pub async fn start(binding: Binding) -> Self {
        let state = Arc::new(KeyedIssuerState::default());
        *state.lifetime.lock().unwrap() = 3600.0;
        let s = state.clone();
        let addr = serve(move |req| keyed_issue(req, binding, s.clone())).await;
        Self { addr, state }
    }

    pub fn url(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    pub fn hits(&self) -> usize {
        self.state.hits.load(Ordering::SeqCst)
    }

    /// Fetches made for `subject`.
    pub fn hits_for(&self, subject: &str) -> usize {
        self.state
            .issued
            .lock()
            .unwrap()
            .get(subject)
            .map_or(0, Vec::len)
    }

    /// The latest token issued for `subject`.
    pub fn token_for(&self, subject: &str) -> String {
        self.state.issued.lock().unwrap()[subject]
            .last()
            .unwrap()
            .clone()
    }
}

async fn keyed_issue(
    req: Request<Incoming>,
    binding: Binding,
    state: Arc<KeyedIssuerState>,
) -> Response<TestBody> {
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let body = String::from_utf8_lossy(&body).into_owned();
    let subject = match binding {
        Binding::LoyalifeScope => {
            let doc: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            let scope = doc["scope"].as_str().unwrap_or_default().to_owned();
            state.scopes.lock().unwrap().push(scope.clone());
            // The scope is itself a JSON array, as Loyalife documents it.
            let parsed: Vec<String> = serde_json::from_str(&scope).unwrap_or_default();
            match parsed.as_slice() {
                [login, member] if login == "LOGIN" => member.clone(),
                _ => String::new(),
            }
        }
        Binding::LoneWolfTenant => url::form_urlencoded::parse(body.as_bytes())
            .find(|(k, _)| k == "lwt_client_id")
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default(),
    };
    let delay = *state.delay.lock().unwrap();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let json = json_answer;
    if subject.is_empty() || state.refuse.lock().unwrap().contains(&subject) {
        let echo = format!("unknown subject in request {body}");
        return json(
            400,
            serde_json::json!({"error": "invalid_scope", "error_description": echo}).to_string(),
        );
    }
    let n = state.hits.fetch_add(1, Ordering::SeqCst) + 1;
    let token = format!("KTOK-{n}");
    state
        .issued
        .lock()
        .unwrap()
        .entry(subject)
        .or_default()
        .push(token.clone());
    let lifetime = *state.lifetime.lock().unwrap();
    match binding {
        Binding::LoyalifeScope => loyalife_answer(&token, lifetime),
        Binding::LoneWolfTenant => oauth2_answer(&token, lifetime),
    }
}

/// A keyed Loyalife provider `p`, one route, and an admin listener.
pub fn loyalife_config(issuer: &KeyedIssuer, upstream: &Upstream) -> TestConfig {
    TestConfig::default()
        .server(|s| s.admin().token_wait("3s"))
        .with_provider(
            "p",
            ProviderSection::new(&issuer.url(), "member-client", "member-secret-value")
                .loyalife()
                .scope(r#"["LOGIN","{key}"]"#)
                .key_header("X-Loyalife-Member"),
        )
        .route(RouteSection::to(&upstream.url(), "p"))
}

/// A proxy on `loyalife_config` as `edit` changes it.
async fn loyalife_proxy(
    issuer: &KeyedIssuer,
    upstream: &Upstream,
    edit: impl FnOnce(ProviderSection) -> ProviderSection,
) -> Proxy {
    Proxy::start_with(&loyalife_config(issuer, upstream).p(edit)).await
}

pub async fn as_member(proxy: &Proxy, member: &str) -> Answer {
    send(
        &client(),
        Request::get(proxy.url("/members/profile"))
            .header("X-Loyalife-Member", member)
            .body(full(""))
            .unwrap(),
    )
    .await
}

fn auth(answer: &Answer) -> String {
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    answer.echoed("authorization").concat()
}

#[tokio::test]
async fn loyalife_members_get_their_own_tokens_bound_by_scope() {
    let issuer = KeyedIssuer::start(Binding::LoyalifeScope).await;
    let upstream = Upstream::start().await;
    let proxy = loyalife_proxy(&issuer, &upstream, |p| p).await;
    let a1 = as_member(&proxy, "MBR-1001").await;
    let b = as_member(&proxy, "MBR-2002").await;
    let a2 = as_member(&proxy, "MBR-1001").await;
    assert_eq!(
        auth(&a1),
        format!("Bearer {}", issuer.token_for("MBR-1001"))
    );
    assert_eq!(auth(&b), format!("Bearer {}", issuer.token_for("MBR-2002")));
    assert_eq!(auth(&a1), auth(&a2), "the member's token is reused");
    assert_ne!(auth(&a1), auth(&b));
    assert_eq!(issuer.hits(), 2, "one fetch per member");
    // The scope goes out exactly as configured, with the member filled in.
    let scopes = issuer.state.scopes.lock().unwrap().clone();
    assert!(
        scopes.contains(&r#"["LOGIN","MBR-1001"]"#.to_owned()),
        "{scopes:?}"
    );
    // The key header never reaches the upstream.
    assert!(a1.echoed("x-loyalife-member").is_empty());
    proxy.stop().await;
}

#[tokio::test]
async fn lonewolf_tenants_get_their_own_tokens_bound_by_lwt_client_id() {
    let issuer = KeyedIssuer::start(Binding::LoneWolfTenant).await;
    let upstream = Upstream::start().await;
    let config = TestConfig::default()
        .server(|s| s.token_wait("3s"))
        .with_provider(
            "lonewolf",
            ProviderSection::new(&issuer.url(), "lw-client", "lw-secret-value")
                .audience("https://api.lwolf.com")
                .extra_params([("lwt_client_id", "{key}")])
                .key_header("X-LoneWolf-Tenant"),
        )
        .route(RouteSection::to(&upstream.url(), "lonewolf"));
    let proxy = Proxy::start_with(&config).await;
    let c = client();
    let mut seen = Vec::new();
    for tenant in ["tenant-a", "tenant-b", "tenant-a"] {
        let answer = send(
            &c,
            Request::get(proxy.url("/v1/transactions"))
                .header("X-LoneWolf-Tenant", tenant)
                .body(full(""))
                .unwrap(),
        )
        .await;
        assert!(answer.echoed("x-lonewolf-tenant").is_empty());
        seen.push(auth(&answer));
    }
    assert_eq!(seen[0], format!("Bearer {}", issuer.token_for("tenant-a")));
    assert_eq!(seen[1], format!("Bearer {}", issuer.token_for("tenant-b")));
    assert_eq!(seen[0], seen[2]);
    assert_eq!(issuer.hits(), 2);
    proxy.stop().await;
}

#[tokio::test]
async fn a_missing_or_malformed_key_is_400_naming_the_header_and_fetches_nothing() {
    let issuer = KeyedIssuer::start(Binding::LoyalifeScope).await;
    let upstream = Upstream::start().await;
    let proxy = loyalife_proxy(&issuer, &upstream, |p| p).await;
    let c = client();
    let missing = get(&c, &proxy.url("/members/profile")).await;
    let mut answers = vec![missing];
    // Outside the default pattern, a JSON break-out attempt, and too long.
    for bad in [
        "MBR 1001",
        r#"MBR","ADMIN"#,
        "x".repeat(129).as_str(),
        "MBR-é",
    ] {
        answers.push(
            send(
                &c,
                Request::get(proxy.url("/members/profile"))
                    .header("X-Loyalife-Member", bad)
                    .body(full(""))
                    .unwrap(),
            )
            .await,
        );
        assert!(!String::from_utf8_lossy(&answers.last().unwrap().body).contains(bad));
    }
    // Twice: ambiguous, refused.
    answers.push(
        send(
            &c,
            Request::get(proxy.url("/members/profile"))
                .header("X-Loyalife-Member", "MBR-1")
                .header("X-Loyalife-Member", "MBR-2")
                .body(full(""))
                .unwrap(),
        )
        .await,
    );
    for answer in &answers {
        assert_eq!(answer.status, 400);
        let body = answer.json();
        assert_eq!(body["error"], "bad_request");
        let message = body["message"].as_str().unwrap();
        assert!(message.contains("x-loyalife-member"), "{message}");
        assert!(!message.contains("MBR"), "{message}");
    }
    assert_eq!(issuer.hits(), 0, "no token fetch without a valid key");
    assert_eq!(upstream.hits(), 0);
    proxy.stop().await;
}

#[tokio::test]
async fn a_custom_key_pattern_still_never_admits_quotes_or_spaces() {
    let issuer = KeyedIssuer::start(Binding::LoyalifeScope).await;
    let upstream = Upstream::start().await;
    let proxy = loyalife_proxy(&issuer, &upstream, |p| p.key_pattern("^.{1,64}$")).await;
    for bad in [r#"a","b"#, "a b", r"a\b"] {
        let answer = as_member(&proxy, bad).await;
        assert_eq!(answer.status, 400, "{bad}");
    }
    let ok = as_member(&proxy, "anything:goes/here").await;
    assert_eq!(
        auth(&ok),
        format!("Bearer {}", issuer.token_for("anything:goes/here"))
    );
    assert_eq!(issuer.hits(), 1);
    proxy.stop().await;
}

#[tokio::test]
async fn a_hundred_concurrent_first_requests_for_one_member_cause_one_fetch() {
    let issuer = KeyedIssuer::start(Binding::LoyalifeScope).await;
    *issuer.state.delay.lock().unwrap() = Duration::from_millis(300);
    let upstream = Upstream::start().await;
    let proxy = loyalife_proxy(&issuer, &upstream, |p| p).await;
    let c = client();
    let requests = (0..100).map(|_| {
        let c = c.clone();
        let url = proxy.url("/members/profile");
        tokio::spawn(async move {
            send(
                &c,
                Request::get(url)
                    .header("X-Loyalife-Member", "MBR-7")
                    .body(full(""))
                    .unwrap(),
            )
            .await
        })
    });
    let answers = futures_util::future::join_all(requests).await;
    let expected = format!("Bearer {}", issuer.token_for("MBR-7"));
    for answer in answers {
        assert_eq!(auth(&answer.unwrap()), expected);
    }
    assert_eq!(issuer.hits(), 1);
    proxy.stop().await;
}

#[tokio::test]
async fn past_max_keys_the_least_recently_used_key_is_dropped() {
    let issuer = KeyedIssuer::start(Binding::LoyalifeScope).await;
    let upstream = Upstream::start().await;
    let proxy = loyalife_proxy(&issuer, &upstream, |p| p.max_keys(3)).await;
    for member in ["M1", "M2", "M3", "M1", "M4"] {
        auth(&as_member(&proxy, member).await);
    }
    let keyed = proxy.store.keyed("p").unwrap();
    assert_eq!(keyed.counts().held, 3);
    // M2 was the least recently used: dropped, so it needs a new token; M1 did not.
    auth(&as_member(&proxy, "M1").await);
    assert_eq!(issuer.hits_for("M1"), 1);
    auth(&as_member(&proxy, "M2").await);
    assert_eq!(issuer.hits_for("M2"), 2);
    assert_eq!(keyed.counts().held, 3);
    assert_eq!(issuer.hits(), 5);
    proxy.stop().await;
}

#[tokio::test]
async fn idle_keys_stop_refreshing_and_leave_when_their_token_expires() {
    let issuer = KeyedIssuer::start(Binding::LoyalifeScope).await;
    *issuer.state.lifetime.lock().unwrap() = 3.0;
    let upstream = Upstream::start().await;
    let proxy = loyalife_proxy(&issuer, &upstream, |p| p.key_idle("1s")).await;
    auth(&as_member(&proxy, "IDLE").await);
    // BUSY is used all along: refreshed ahead (3 s tokens, refresh_before 10 %).
    let deadline = tokio::time::Instant::now() + Duration::from_millis(6500);
    while tokio::time::Instant::now() < deadline {
        auth(&as_member(&proxy, "BUSY").await);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(issuer.hits_for("BUSY") >= 2, "a key in use is refreshed");
    assert_eq!(issuer.hits_for("IDLE"), 1, "an idle key is not refreshed");
    let keyed = proxy.store.keyed("p").unwrap();
    assert!(
        eventually(Duration::from_secs(5), || keyed.counts().held == 1).await,
        "the idle key left once its token expired"
    );
    // Coming back is a fresh start.
    auth(&as_member(&proxy, "IDLE").await);
    assert_eq!(issuer.hits_for("IDLE"), 2);
    proxy.stop().await;
}

#[tokio::test]
async fn a_401_for_one_member_refetches_only_that_members_token_and_replays() {
    let issuer = KeyedIssuer::start(Binding::LoyalifeScope).await;
    let upstream = Upstream::start().await;
    let proxy = loyalife_proxy(&issuer, &upstream, |p| p).await;
    let first_a = auth(&as_member(&proxy, "A").await);
    let first_b = auth(&as_member(&proxy, "B").await);
    upstream.reject(first_a.trim_start_matches("Bearer "), 401);
    let replayed = as_member(&proxy, "A").await;
    let fresh_a = auth(&replayed);
    assert_ne!(fresh_a, first_a);
    assert_eq!(fresh_a, format!("Bearer {}", issuer.token_for("A")));
    assert_eq!(issuer.hits_for("A"), 2);
    assert_eq!(issuer.hits_for("B"), 1);
    assert_eq!(auth(&as_member(&proxy, "B").await), first_b);
    proxy.stop().await;
}

#[tokio::test]
async fn tokens_and_metrics_count_keys_and_never_show_them() {
    let issuer = KeyedIssuer::start(Binding::LoyalifeScope).await;
    let upstream = Upstream::start().await;
    let proxy = loyalife_proxy(&issuer, &upstream, |p| p).await;
    issuer
        .state
        .refuse
        .lock()
        .unwrap()
        .push("MBR-REFUSED".into());
    auth(&as_member(&proxy, "MBR-1001").await);
    auth(&as_member(&proxy, "MBR-2002").await);
    let refused = as_member(&proxy, "MBR-REFUSED").await;
    assert_eq!(refused.status, 503);
    let body = String::from_utf8_lossy(&refused.body).into_owned();
    assert!(!body.contains("MBR-REFUSED"), "{body}");
    assert!(body.contains("invalid_scope"), "{body}");
    let tokens = get(&client(), &proxy.admin_url("/tokens")).await;
    let json = tokens.json();
    assert_eq!(json["p"]["keyed"], true);
    assert_eq!(json["p"]["keys_held"], 3);
    assert_eq!(json["p"]["keys_valid"], 2);
    assert_eq!(json["p"]["keys_failing"], 1);
    let metrics = proxy.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "bearer_proxy_token_keys{provider=\"p\",state=\"held\"}"
        ),
        Some(3.0)
    );
    assert_eq!(
        metric(
            &metrics,
            "bearer_proxy_token_keys{provider=\"p\",state=\"failing\"}"
        ),
        Some(1.0)
    );
    for text in [String::from_utf8_lossy(&tokens.body).into_owned(), metrics] {
        assert!(!text.contains("MBR"), "{text}");
    }
    proxy.stop().await;
}

#[tokio::test]
async fn each_key_has_its_own_cache_file_named_without_the_key() {
    let issuer = KeyedIssuer::start(Binding::LoyalifeScope).await;
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let config = loyalife_config(&issuer, &upstream)
        .server(|s| s.token_cache_dir(cache.display().to_string()));
    let proxy = Proxy::start_with(&config).await;
    let a = auth(&as_member(&proxy, "MBR-1001").await);
    let b = auth(&as_member(&proxy, "MBR-2002").await);
    proxy.stop().await;
    let names: Vec<String> = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    for name in &names {
        assert!(!name.contains("MBR") && !name.contains("1001"), "{name}");
    }
    // A restart serves each member its cached token without a fetch.
    let proxy = Proxy::start_with(&config).await;
    assert_eq!(auth(&as_member(&proxy, "MBR-2002").await), b);
    assert_eq!(auth(&as_member(&proxy, "MBR-1001").await), a);
    assert_eq!(issuer.hits(), 2);
    proxy.stop().await;
}

#[tokio::test]
async fn keyed_settings_are_checked() {
    let parse = |extra: &str| {
        let toml = format!(
            r#"
[providers.p]
token_url = "https://issuer.example/token"
client_id = "id"
client_secret = "secret"
{extra}

[[routes]]
upstream = "https://api.example"
provider = "p"
"#
        );
        Config::parse(&toml, Path::new("t.toml"), &|_| None).map_err(|e| e.to_string())
    };
    let e = parse("key_header = \"X-Member\"\nscope = \"read\"").unwrap_err();
    assert!(
        e.contains("providers.p.key_header") && e.contains("{key}"),
        "{e}"
    );
    let e = parse("scope = '[\"LOGIN\",\"{key}\"]'").unwrap_err();
    assert!(
        e.contains("providers.p.key_header") && e.contains("required"),
        "{e}"
    );
    let e = parse("extra_params = { lwt_client_id = \"{key}\" }").unwrap_err();
    assert!(e.contains("key_header"), "{e}");
    let e = parse("max_keys = 10").unwrap_err();
    assert!(
        e.contains("providers.p.max_keys") && e.contains("key_header"),
        "{e}"
    );
    let keyed = "key_header = \"X-Member\"\naudience = \"aud-{key}\"";
    let e = parse(&format!("{keyed}\nkey_pattern = \"([a-z\"")).unwrap_err();
    assert!(e.contains("providers.p.key_pattern"), "{e}");
    let e = parse(&format!("{keyed}\nmax_keys = 0")).unwrap_err();
    assert!(e.contains("providers.p.max_keys"), "{e}");
    let e = parse(&format!("{keyed}\nkey_idle = \"10ms\"")).unwrap_err();
    assert!(e.contains("providers.p.key_idle"), "{e}");
    let e = parse("key_header = \"Authorization\"\nscope = \"{key}\"").unwrap_err();
    assert!(e.contains("providers.p.key_header"), "{e}");
    let config = parse(keyed).unwrap();
    let keys = config.providers["p"].keys.clone().unwrap();
    assert_eq!(keys.header, "x-member");
    assert_eq!(keys.max_keys, 1000);
    assert_eq!(keys.idle, Duration::from_secs(900));
    assert_eq!(keys.pattern.as_str(), "^[A-Za-z0-9._@+-]{1,128}$");
}

#[tokio::test]
async fn a_fleet_shares_each_members_token_under_a_name_without_the_member() {
    let redis = crate::fleet::Redis::start();
    let issuer = KeyedIssuer::start(Binding::LoyalifeScope).await;
    *issuer.state.delay.lock().unwrap() = Duration::from_millis(200);
    let upstream = Upstream::start().await;
    let config = loyalife_config(&issuer, &upstream)
        .store(StoreSection::redis(&redis.url()).key_prefix("kt:"));
    let (one, two) = (
        Proxy::start_with(&config).await,
        Proxy::start_with(&config).await,
    );
    // Both proxies ask for the same member at once: one fetch for the fleet.
    let (a, b) = tokio::join!(as_member(&one, "MBR-1001"), as_member(&two, "MBR-1001"));
    assert_eq!(auth(&a), auth(&b));
    assert_eq!(issuer.hits_for("MBR-1001"), 1);
    // Another member is a token of its own.
    let c = as_member(&two, "MBR-2002").await;
    assert_eq!(auth(&c), format!("Bearer {}", issuer.token_for("MBR-2002")));
    let mut conn = redis.conn().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("kt:*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        keys.iter().filter(|k| k.starts_with("kt:token:p:")).count(),
        2,
        "{keys:?}"
    );
    for key in &keys {
        assert!(!key.contains("MBR") && !key.contains("1001"), "{key}");
        let value: Option<String> = redis::cmd("GET")
            .arg(key)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(!value.unwrap_or_default().contains("MBR"));
    }
    one.stop().await;
    two.stop().await;
}

#[tokio::test]
async fn a_reload_keeps_an_unchanged_keyed_provider_and_restarts_a_changed_one() {
    let issuer = KeyedIssuer::start(Binding::LoyalifeScope).await;
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bp.toml");
    let config = loyalife_config(&issuer, &upstream);
    std::fs::write(&file, config.render()).unwrap();
    let proxy = Proxy::start_config(bearer_proxy::config::load(&file).unwrap()).await;
    let first = auth(&as_member(&proxy, "MBR-1").await);
    // Unchanged: the member keeps its token.
    let report = proxy.shared.reload().await.expect("reload");
    assert_eq!(report.providers.kept, ["p"]);
    assert_eq!(auth(&as_member(&proxy, "MBR-1").await), first);
    // Changed: keys start over.
    std::fs::write(&file, config.p(|p| p.max_keys(5)).render()).unwrap();
    let report = proxy.shared.reload().await.expect("reload");
    assert_eq!(report.providers.started, ["p"]);
    assert_ne!(auth(&as_member(&proxy, "MBR-1").await), first);
    assert_eq!(issuer.hits_for("MBR-1"), 2);
    assert_eq!(proxy.store.keyed("p").unwrap().keys().max_keys, 5);
    proxy.stop().await;
}

#[tokio::test]
async fn the_token_command_needs_a_valid_key_for_a_keyed_provider_and_never_quotes_it() {
    let issuer = KeyedIssuer::start(Binding::LoyalifeScope).await;
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bp.toml");
    let config = loyalife_config(&issuer, &upstream).with_provider(
        "plain",
        ProviderSection::new("http://127.0.0.1:9/t", "c", "s"),
    );
    std::fs::write(&file, config.render()).unwrap();
    let run = move |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_bearer-proxy"))
            .args(args)
            .arg("-c")
            .arg(&file)
            .output()
            .unwrap();
        // stdout: the token alone; stderr: messages (and a warning about this file).
        let text = format!(
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code(), text)
    };
    let (code, out) = tokio::task::spawn_blocking(move || {
        (
            run(&["token", "p", "--key", "MBR-CLI-1"]),
            run(&["token", "p"]),
            run(&["token", "p", "--key", "MBR CLI 2"]),
            run(&["token", "plain", "--key", "MBR-CLI-3"]),
        )
    })
    .await
    .map(|(ok, missing, bad, unkeyed)| {
        assert_eq!(ok.0, Some(0), "{}", ok.1);
        assert_eq!(
            ok.1.lines().next(),
            Some(issuer.token_for("MBR-CLI-1").as_str())
        );
        assert!(
            missing.1.contains("x-loyalife-member") && missing.1.contains("--key"),
            "{}",
            missing.1
        );
        assert!(bad.1.contains("key_pattern"), "{}", bad.1);
        assert!(unkeyed.1.contains("key_header"), "{}", unkeyed.1);
        let errors = format!("{}{}{}", missing.1, bad.1, unkeyed.1);
        ((missing.0, bad.0, unkeyed.0), errors)
    })
    .unwrap();
    assert_eq!(code, (Some(1), Some(1), Some(1)));
    assert!(!out.contains("MBR"), "{out}");
}
