//! The per-provider refresher: fetch when needed, refresh ahead, back off on failure.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rand::Rng;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::cache::TokenCache;
use super::{ProviderSlot, Token};
use crate::provider::{Expiry, FetchError, FetchedToken, TokenClient};

/// Runs until `cancel`: the only caller of `slot`'s token endpoint.
pub(super) async fn run(
    slot: Arc<ProviderSlot>,
    client: TokenClient,
    cache: Option<TokenCache>,
    cancel: CancellationToken,
) {
    let mut failures: u32 = 0;
    // Tokens the upstream rejected soon after we fetched them, in a row: bad
    // credentials or a confused API must not turn every request into a fetch.
    let mut quick_rejections: u32 = 0;
    let mut not_before: Option<Instant> = None;
    let mut last_fetch: Option<Instant> = None;
    loop {
        let now = Instant::now();
        if slot.invalidated.swap(false, Ordering::AcqRel) {
            let quick = last_fetch.is_some_and(|at| now.duration_since(at) < QUICK_REJECTION);
            quick_rejections = if quick { quick_rejections + 1 } else { 0 };
            if quick_rejections >= 2 {
                let delay = backoff(&slot, quick_rejections - 1);
                not_before = Some(now + delay);
                slot.update_status(|s| {
                    s.last_error = Some(format!(
                        "the upstream rejected {quick_rejections} fresh tokens in a row; next fetch in {delay:?}"
                    ));
                    s.next_attempt = not_before;
                });
            }
        }
        let due = next_due(&slot, now).map(|due| not_before.map_or(due, |nb| due.max(nb)));
        if due.is_some_and(|due| due <= now) {
            last_fetch = Some(now);
            match fetch_once(&slot, &client, cache.as_ref()).await {
                Ok(()) => {
                    failures = 0;
                    not_before = None;
                }
                Err(asked) => {
                    failures = failures.saturating_add(1);
                    let delay = asked.max(backoff(&slot, failures));
                    not_before = Some(Instant::now() + delay);
                    tracing::info!(provider = %slot.config.name, failures, retry_in_ms = delay.as_millis() as u64, "next token fetch scheduled");
                    slot.update_status(|s| s.next_attempt = not_before);
                }
            }
            continue;
        }
        let sleep = async {
            match due {
                Some(due) => tokio::time::sleep_until(due).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = cancel.cancelled() => return,
            () = slot.wake.notified() => {}
            () = sleep => {}
        }
    }
}

/// A token rejected within this long of its fetch counts as a quick rejection.
const QUICK_REJECTION: Duration = Duration::from_secs(30);

/// When the slot next needs a fetch, ignoring backoff; `None`: not until asked.
fn next_due(slot: &ProviderSlot, now: Instant) -> Option<Instant> {
    match slot.current.load().as_ref() {
        Some(token) if token.is_valid_at(now) => Some(token.refresh_at),
        _ if slot.config.prefetch || slot.wanted.load(Ordering::Acquire) => Some(now),
        _ => None,
    }
}

/// Exponential backoff with "equal jitter": uniform in [c/2, c] where
/// c = min(max, base * 2^(n-1)). Unlike full jitter (uniform in [0, c]) the gaps
/// never shrink, so a run of unlucky draws cannot hammer the endpoint, and a fleet
/// still spreads out over half of each interval.
fn backoff(slot: &ProviderSlot, failures: u32) -> Duration {
    let tuning = &slot.settings.tuning;
    let ceiling = tuning
        .backoff_base
        .saturating_mul(1u32 << failures.saturating_sub(1).min(20))
        .min(tuning.backoff_max);
    rand::rng().random_range(ceiling / 2..=ceiling)
}

/// One fetch; on failure returns the least delay the provider asked for.
async fn fetch_once(
    slot: &ProviderSlot,
    client: &TokenClient,
    cache: Option<&TokenCache>,
) -> Result<(), Duration> {
    slot.update_status(|s| s.fetching = true);
    let started = Instant::now();
    let result = client
        .fetch(&slot.config, slot.settings.token_timeout)
        .await
        .and_then(|fetched| {
            let token = build_token(slot, &fetched, started)?;
            Ok((token, fetched.value))
        });
    let elapsed_ms = started.elapsed().as_millis() as u64;
    match result {
        Ok((token, value)) => {
            if let Some(cache) = cache {
                let (cache, config) = (cache.clone(), slot.config.clone());
                let (fetched_at, expires_at) = (token.fetched_at, token.expires_at_wall);
                // Awaited so a restart right after sees the file; off the runtime threads.
                let written = tokio::task::spawn_blocking(move || {
                    cache.store(&config, &value, fetched_at, expires_at)
                })
                .await;
                if let Ok(Err(error)) = written {
                    tracing::warn!(provider = %slot.config.name, %error, "cannot write the token cache");
                }
            }
            let expires_in = token.expires_at.saturating_duration_since(Instant::now());
            tracing::info!(
                provider = %slot.config.name,
                outcome = "ok",
                duration_ms = elapsed_ms,
                expires_in_s = expires_in.as_secs(),
                generation = token.generation,
                "token fetched"
            );
            slot.current.store(Some(Arc::new(token)));
            slot.settings.metrics.token_fetch(&slot.config.name, "ok");
            slot.wanted.store(false, Ordering::Release);
            slot.update_status(|s| {
                s.fetching = false;
                s.fetches += 1;
                s.last_error = None;
                s.next_attempt = None;
            });
            Ok(())
        }
        Err(e) => {
            let retry_after = e.retry_after().unwrap_or_default();
            tracing::warn!(
                provider = %slot.config.name,
                outcome = "error",
                duration_ms = elapsed_ms,
                error = %e,
                "token fetch failed"
            );
            slot.settings
                .metrics
                .token_fetch(&slot.config.name, "error");
            slot.update_status(|s| {
                s.fetching = false;
                s.fetches += 1;
                s.failures += 1;
                s.last_error = Some(e.to_string());
            });
            Err(retry_after)
        }
    }
}

/// Turns an answer into a publishable token, measuring relative lifetimes from
/// `received` on the monotonic clock.
fn build_token(
    slot: &ProviderSlot,
    fetched: &FetchedToken,
    received: Instant,
) -> Result<Token, FetchError> {
    let now_wall = SystemTime::now();
    let lifetime = match fetched.expiry {
        Expiry::In(d) => d,
        Expiry::At(at) => at.duration_since(now_wall).map_err(|_| {
            FetchError::Invalid(
                "the token is already expired (is this machine's clock right?)".to_owned(),
            )
        })?,
    };
    if lifetime < Duration::from_secs(1) {
        return Err(FetchError::Invalid(
            "the token expires in less than a second".to_owned(),
        ));
    }
    slot.make_token(&fetched.value, lifetime, lifetime, received, now_wall)
        .ok_or_else(|| FetchError::Invalid("the token is not a valid header value".to_owned()))
}
