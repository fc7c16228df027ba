//! A fleet of proxies sharing tokens through a real Redis (redis-server on loopback).

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bearer_proxy::config::Config;
use bearer_proxy::token::fleet::provider_tag;
use http::Request;

use crate::support::*;

/// A redis-server on a loopback port, without persistence; killed on drop.
pub struct Redis {
    port: u16,
    child: Option<Child>,
}

impl Redis {
    pub fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut redis = Self { port, child: None };
        redis.resume();
        redis
    }

    /// (Re)starts the server on the same port and waits until it answers.
    fn resume(&mut self) {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "redis-server not found: install it (.ci/run does: apt-get install redis-server)",
            );
        self.child = Some(child);
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        for _ in 0..500 {
            if std::net::TcpStream::connect(addr).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("redis-server did not start");
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The basic config sharing tokens through `redis` under `test:`.
fn fleet_toml(redis: &Redis, issuer: &Issuer, upstream: &Upstream) -> TestConfig {
    TestConfig::basic(issuer, upstream).store(StoreSection::redis(&redis.url()).key_prefix("test:"))
}

/// `fleet_toml` with a 1 s token timeout, provider `p` as `provider` edits it, and a
/// short Redis timeout.
fn fleet_config(
    redis: &Redis,
    issuer: &Issuer,
    upstream: &Upstream,
    provider: impl FnOnce(ProviderSection) -> ProviderSection,
) -> Config {
    let mut config = fleet_toml(redis, issuer, upstream)
        .server(|s| s.token_timeout("1s"))
        .p(provider)
        .parse();
    config.tuning.redis_timeout = Duration::from_millis(200);
    config
}

#[tokio::test]
async fn three_instances_300_first_requests_one_fetch() {
    let redis = Redis::start();
    let Servers { issuer, upstream } = Servers::start(Dialect::OAuth2).await;
    issuer.set_delay(Duration::from_millis(200));
    let config = fleet_config(&redis, &issuer, &upstream, |p| p.prefetch(false));
    let proxies = fleet(&config, 3).await;
    let mut tasks = Vec::new();
    for proxy in &proxies {
        for i in 0..100 {
            let url = proxy.url(&format!("/r/{i}"));
            tasks.push(tokio::spawn(async move { get(&client(), &url).await }));
        }
    }
    for task in tasks {
        let answer = task.await.unwrap();
        assert_eq!(answer.status, 200);
        assert_eq!(
            answer.echoed("authorization"),
            [format!("Bearer {}", issuer.token(1))]
        );
    }
    assert_eq!(issuer.hits(), 1, "one token request for the whole fleet");
    for p in proxies {
        p.stop().await;
    }
}

#[tokio::test]
async fn refresh_across_the_fleet_is_one_fetch_per_refresh() {
    let redis = Redis::start();
    let Servers { issuer, upstream } = Servers::start(Dialect::OAuth2).await;
    issuer.set_lifetime(3.0);
    let config = fleet_config(&redis, &issuer, &upstream, |p| p.refresh_before("50%"));
    let proxies = fleet(&config, 3).await;
    assert!(eventually(Duration::from_secs(3), || converged(&proxies)).await);
    // About three refreshes of a 3 s token refreshed at half-life.
    let c = client();
    let started = tokio::time::Instant::now();
    while started.elapsed() < Duration::from_millis(4500) {
        for p in &proxies {
            assert_eq!(get(&c, &p.url("/x")).await.status, 200);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let hits = issuer.hits();
    assert!(
        (3..=5).contains(&hits),
        "one fetch per refresh, not per instance: {hits}"
    );
    for gap in issuer.intervals() {
        assert!(
            gap > Duration::from_millis(700),
            "two fetches for one refresh: {:?}",
            issuer.intervals()
        );
    }
    assert!(eventually(Duration::from_secs(2), || converged(&proxies)).await);
    for p in proxies {
        p.stop().await;
    }
}

#[tokio::test]
async fn invalidation_on_one_instance_switches_all_with_one_fetch() {
    let redis = Redis::start();
    let Servers { issuer, upstream } = Servers::start(Dialect::OAuth2).await;
    let config = fleet_config(&redis, &issuer, &upstream, |p| p);
    let proxies = fleet(&config, 3).await;
    assert!(eventually(Duration::from_secs(3), || converged(&proxies)).await);
    assert_eq!(issuer.hits(), 1);
    upstream.reject(&issuer.token(1), 401);
    let c = client();
    let answer = send(
        &c,
        Request::post(proxies[0].url("/orders"))
            .body(full("x"))
            .unwrap(),
    )
    .await;
    assert_eq!(answer.status, 200);
    assert_eq!(
        answer.echoed("authorization"),
        [format!("Bearer {}", issuer.token(2))]
    );
    // The others drop the rejected token and take the new one without fetching.
    assert!(eventually(Duration::from_secs(3), || converged(&proxies)).await);
    for p in &proxies[1..] {
        let answer = get(&c, &p.url("/y")).await;
        assert_eq!(
            answer.echoed("authorization"),
            [format!("Bearer {}", issuer.token(2))]
        );
    }
    assert_eq!(issuer.hits(), 2, "one fetch for the fleet");
    for p in proxies {
        p.stop().await;
    }
}

#[tokio::test]
async fn redis_away_then_back() {
    let mut redis = Redis::start();
    let Servers { issuer, upstream } = Servers::start(Dialect::OAuth2).await;
    issuer.set_lifetime(2.0);
    let config = fleet_config(&redis, &issuer, &upstream, |p| p.refresh_before("50%"));
    let proxies = fleet(&config, 3).await;
    assert!(eventually(Duration::from_secs(3), || converged(&proxies)).await);
    let before = issuer.hits();
    redis.stop();
    // Across several refreshes without Redis: no failed request.
    let c = client();
    let started = tokio::time::Instant::now();
    let mut failed = 0;
    while started.elapsed() < Duration::from_secs(3) {
        for p in &proxies {
            if get(&c, &p.url("/x")).await.status != 200 {
                failed += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(failed, 0, "nothing fails because Redis is away");
    assert!(
        issuer.hits() >= before + 3,
        "each instance fetched on its own"
    );
    for p in &proxies {
        assert_eq!(p.store.fleet_up(), Some(false));
    }
    // Redis back: the fleet converges on one token again.
    redis.resume();
    assert!(
        eventually(Duration::from_secs(6), || converged(&proxies)
            && proxies.iter().all(|p| p.store.fleet_up() == Some(true)))
        .await,
        "{:?}",
        token_ids(&proxies)
    );
    for p in proxies {
        p.stop().await;
    }
}

#[tokio::test]
async fn a_dead_holders_lock_is_taken_over() {
    let redis = Redis::start();
    let Servers { issuer, upstream } = Servers::start(Dialect::OAuth2).await;
    let config = fleet_config(&redis, &issuer, &upstream, |p| p);
    let (name, fp) = provider_tag(&config.providers["p"], None);
    let mut conn = redis.conn().await;
    // A holder that died right after taking the lock.
    let _: () = redis::cmd("SET")
        .arg(format!("test:lock:{name}:{fp}"))
        .arg("dead-holder")
        .arg("PX")
        .arg(1500)
        .query_async(&mut conn)
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    let proxy = Proxy::start_config(config).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(issuer.hits(), 0, "waits for the lock holder");
    assert!(eventually(Duration::from_secs(3), || issuer.hits() == 1).await);
    assert!(
        started.elapsed() < Duration::from_millis(3000),
        "taken over once the lock expired"
    );
    assert_eq!(get(&client(), &proxy.url("/x")).await.status, 200);
    proxy.stop().await;
}

#[tokio::test]
async fn values_in_redis_are_sealed_and_expire_with_the_token() {
    let redis = Redis::start();
    let Servers { issuer, upstream } = Servers::start(Dialect::OAuth2).await;
    issuer.set_lifetime(600.0);
    let config = fleet_config(&redis, &issuer, &upstream, |p| p);
    let proxy = Proxy::start_config(config.clone()).await;
    assert_eq!(get(&client(), &proxy.url("/x")).await.status, 200);
    let (name, fp) = provider_tag(&config.providers["p"], None);
    let key = format!("test:token:{name}:{fp}");
    let mut conn = redis.conn().await;
    let raw: String = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        !raw.contains(&issuer.token(1)),
        "plain token in Redis: {raw}"
    );
    assert!(!raw.contains("test-secret-value"));
    assert!(raw.contains("ciphertext"));
    let ttl_ms: i64 = redis::cmd("PTTL")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        (590_000..=600_000).contains(&ttl_ms),
        "TTL is the token's expiry: {ttl_ms}"
    );
    // A proxy with other credentials cannot use it: it fetches its own.
    let other = fleet_toml(&redis, &issuer, &upstream)
        .p(|p| p.client_secret("other-secret"))
        .parse();
    let proxy2 = Proxy::start_config(other).await;
    let answer = get(&client(), &proxy2.url("/x")).await;
    assert_eq!(
        answer.echoed("authorization"),
        [format!("Bearer {}", issuer.token(2))]
    );
    proxy.stop().await;
    proxy2.stop().await;
}

/// Ways to edit a sealed value, as someone who can write to Redis but holds no
/// credentials might: times set absurdly far or moved, bytes flipped, id swapped,
/// the older unauthenticated format, plain garbage.
fn tampered(raw: &str) -> Vec<(&'static str, String)> {
    use base64::Engine as _;
    let doc: serde_json::Value = serde_json::from_str(raw).unwrap();
    let edit = |field: &str, value: serde_json::Value| {
        let mut d = doc.clone();
        d[field] = value;
        d.to_string()
    };
    let expires = doc["expires_at_ms"].as_u64().unwrap();
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut ciphertext = b64.decode(doc["ciphertext"].as_str().unwrap()).unwrap();
    ciphertext[0] ^= 0xff;
    let last = ciphertext.len() - 1;
    ciphertext[last] ^= 0x01;
    vec![
        (
            "expires_at 1e20",
            edit("expires_at_ms", serde_json::json!(1e20)),
        ),
        (
            "fetched_at 1e20",
            edit("fetched_at_ms", serde_json::json!(1e20)),
        ),
        (
            "expires_at ten years on",
            edit(
                "expires_at_ms",
                serde_json::json!(expires + 10 * 365 * 86_400_000),
            ),
        ),
        (
            "ciphertext bytes flipped",
            edit("ciphertext", serde_json::json!(b64.encode(&ciphertext))),
        ),
        ("id swapped", edit("id", serde_json::json!("12345"))),
        (
            "older format, times 1e20",
            serde_json::json!({
                "id": doc["id"], "fetched_at": 1e20, "expires_at": 1e20,
                "nonce": doc["nonce"], "ciphertext": doc["ciphertext"],
            })
            .to_string(),
        ),
        ("garbage", "\u{0}not json at all".to_owned()),
    ]
}

#[tokio::test]
async fn tampered_values_in_redis_are_ignored_and_replaced_while_every_proxy_serves() {
    let redis = Redis::start();
    let Servers { issuer, upstream } = Servers::start(Dialect::OAuth2).await;
    // Short-lived tokens: each refresh meets the tampered value and must replace it.
    issuer.set_lifetime(2.0);
    let config = fleet_config(&redis, &issuer, &upstream, |p| p);
    let proxies = fleet(&config, 3).await;
    assert!(eventually(Duration::from_secs(5), || converged(&proxies)).await);
    let (name, fp) = provider_tag(&config.providers["p"], None);
    let key = format!("test:token:{name}:{fp}");
    let mut conn = redis.conn().await;
    let get_raw = |mut conn: redis::aio::MultiplexedConnection, key: String| async move {
        redis::cmd("GET")
            .arg(&key)
            .query_async::<Option<String>>(&mut conn)
            .await
            .unwrap()
    };
    let original = get_raw(conn.clone(), key.clone()).await.unwrap();
    let c = client();
    for (what, value) in tampered(&original) {
        let _: () = redis::cmd("SET")
            .arg(&key)
            .arg(&value)
            .arg("PX")
            .arg(60_000)
            .query_async(&mut conn)
            .await
            .unwrap();
        // Wake every proxy to look at it, as a writer could.
        let _: i64 = redis::cmd("PUBLISH")
            .arg("test:events")
            .arg(format!("changed {name} {fp}"))
            .query_async(&mut conn)
            .await
            .unwrap();
        // Through the next refresh, every proxy keeps answering with a valid token,
        // and the tampered value is replaced by a fresh, sealed one.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            for p in &proxies {
                let answer = get(&c, &p.url("/x")).await;
                assert_eq!(answer.status, 200, "{what}: {:?}", answer.body);
                let auth = answer.echoed("authorization");
                assert!(
                    auth.len() == 1 && auth[0].starts_with("Bearer tok-"),
                    "{what}: {auth:?}"
                );
            }
            let now = get_raw(conn.clone(), key.clone()).await;
            if now
                .as_deref()
                .is_some_and(|v| v != value && v.contains("\"v\":2"))
            {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: the tampered value was not replaced: {now:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    for p in &proxies {
        let status = p.store.slot("p").unwrap().status();
        assert_eq!(status.restarts, 0, "{status:?}");
    }
    for p in proxies {
        p.stop().await;
    }
}

#[tokio::test]
async fn an_offer_is_judged_on_the_authenticated_expiry_not_the_clear_one() {
    use bearer_proxy::config::StoreConfig;
    use bearer_proxy::metrics::Metrics;
    use bearer_proxy::secret::Secret;
    use bearer_proxy::token::fleet::{Fleet, SharedToken};
    use std::time::SystemTime;

    let redis = Redis::start();
    let Servers { issuer, upstream } = Servers::start(Dialect::OAuth2).await;
    let config = fleet_config(&redis, &issuer, &upstream, |p| p);
    let StoreConfig::Redis(rc) = &config.store else {
        panic!("the fleet config has no Redis store");
    };
    let fleet = Fleet::new(
        rc,
        Duration::from_secs(2),
        std::sync::Arc::new(Metrics::new()),
    )
    .unwrap();
    let p = &config.providers["p"];
    let token = |id: u64, secs: u64| SharedToken {
        id,
        value: Secret::new(format!("tok-offer-{id}")),
        fetched_at: SystemTime::now(),
        expires_at: SystemTime::now() + Duration::from_secs(secs),
    };
    assert!(fleet.offer(p, None, &token(1, 3600)).await.unwrap());

    // A writer to Redis stretches the clear expiry of the stored value far ahead.
    let (name, fp) = provider_tag(p, None);
    let key = format!("test:token:{name}:{fp}");
    let mut conn = redis.conn().await;
    let raw: String = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut doc: serde_json::Value = serde_json::from_str(&raw).unwrap();
    doc["expires_at_ms"] = serde_json::json!(1e15);
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg(doc.to_string())
        .query_async(&mut conn)
        .await
        .unwrap();

    // The forged value does not open, so a longer-lived offer replaces it...
    assert!(fleet.offer(p, None, &token(2, 7200)).await.unwrap());
    // ...and a genuinely longer-lived stored token still wins over a shorter offer.
    assert!(!fleet.offer(p, None, &token(3, 1800)).await.unwrap());
    let stored: String = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    let opened =
        bearer_proxy::token::fleet::open(p, None, &key, &stored, SystemTime::now()).unwrap();
    assert_eq!(opened.id, 2);
}
