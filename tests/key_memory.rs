//! Memory per key of a keyed provider, counted by a global allocator. A test binary of
//! its own, so no other test allocates while it measures.

#[path = "support/counting.rs"]
mod counting;
#[path = "support/mod.rs"]
mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bearer_proxy::token::{KeyedProvider, Token};
use http::Response;

use support::*;

#[global_allocator]
static ALLOCATOR: counting::Counting = counting::Counting;

const KEYS: usize = 10_000;

/// Gets a token for keys `from..from + n`, 50 at a time (a burst of first requests).
async fn burst(keyed: &Arc<KeyedProvider>, from: usize, n: usize) -> usize {
    let mut token_bytes = 0;
    for chunk in (from..from + n).collect::<Vec<_>>().chunks(50) {
        let gets = chunk.iter().map(|i| {
            let keyed = keyed.clone();
            async move {
                let slot = keyed.slot(&format!("member-{i:06}")).expect("valid key");
                slot.get().await.expect("token").header_value().len()
            }
        });
        token_bytes += futures_util::future::join_all(gets)
            .await
            .into_iter()
            .sum::<usize>();
    }
    token_bytes
}

async fn settled() -> isize {
    tokio::time::sleep(Duration::from_millis(300)).await;
    counting::LIVE.load(Ordering::Relaxed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_keys_cost_at_most_2_kib_each_beyond_the_token() {
    // A lean issuer that keeps nothing per request, so only the proxy's memory grows.
    let n = Arc::new(AtomicUsize::new(0));
    let issuer = serve(move |_req| {
        let n = n.fetch_add(1, Ordering::Relaxed);
        async move {
            Response::builder()
                .header("content-type", "application/json")
                .body(full(format!(
                    r#"{{"access_token":"tok-{n:08}","expires_in":3600}}"#
                )))
                .unwrap()
        }
    })
    .await;
    let toml = TestConfig::default()
        .with_provider(
            "p",
            ProviderSection::new(&format!("http://{issuer}/token"), "c", "memory-secret")
                .scope("member:{key}")
                .key_header("X-Member")
                .max_keys(20000),
        )
        .route(RouteSection::to("http://127.0.0.1:9", "p"));
    let proxy = Proxy::start_with(&toml).await;
    let keyed = proxy.store.keyed("p").expect("keyed provider");
    // Warm up: connection pools, lazily built tables, the allocator's own state.
    burst(&keyed, 0, 1000).await;
    let before = settled().await;
    let header_bytes = burst(&keyed, 1000, KEYS).await;
    let after = settled().await;
    assert_eq!(keyed.counts().held, 1000 + KEYS);
    assert_eq!(keyed.counts().valid, 1000 + KEYS);
    // The token itself: its Arc'd struct and its header value.
    let token = KEYS * (std::mem::size_of::<Token>() + 16) + header_bytes;
    let grown = usize::try_from(after - before).unwrap_or(0);
    let per_key = grown.saturating_sub(token) / KEYS;
    println!(
        "{KEYS} keys: {grown} bytes live ({} per key), of which tokens {token}: {per_key} bytes per key beyond the token",
        grown / KEYS
    );
    assert!(per_key <= 2048, "{per_key} bytes per key");
    proxy.stop().await;
}
