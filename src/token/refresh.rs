//! The per-provider refresher: fetch when needed, refresh ahead, back off on failure.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rand::Rng;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{ProviderSlot, Token};
use crate::provider::{Expiry, FetchError, FetchedToken, TokenClient};

/// Runs until `cancel`: the only caller of `slot`'s token endpoint.
pub(super) async fn run(slot: Arc<ProviderSlot>, client: TokenClient, cancel: CancellationToken) {
    let mut failures: u32 = 0;
    let mut not_before: Option<Instant> = None;
    loop {
        let now = Instant::now();
        let due = next_due(&slot, now).map(|due| not_before.map_or(due, |nb| due.max(nb)));
        if due.is_some_and(|due| due <= now) {
            match fetch_once(&slot, &client).await {
                Ok(()) => {
                    failures = 0;
                    not_before = None;
                }
                Err(delay) => {
                    failures = failures.saturating_add(1);
                    let delay = delay.max(backoff(&slot, failures));
                    not_before = Some(Instant::now() + delay);
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

/// When the slot next needs a fetch, ignoring backoff; `None`: not until asked.
fn next_due(slot: &ProviderSlot, now: Instant) -> Option<Instant> {
    match slot.current.load().as_ref() {
        Some(token) if token.is_valid_at(now) => Some(token.refresh_at),
        _ if slot.config.prefetch || slot.wanted.load(Ordering::Acquire) => Some(now),
        _ => None,
    }
}

/// Full-jitter exponential backoff: uniform in [base/2, min(max, base * 2^(n-1))].
fn backoff(slot: &ProviderSlot, failures: u32) -> Duration {
    let tuning = &slot.settings.tuning;
    let ceiling = tuning
        .backoff_base
        .saturating_mul(1u32 << failures.saturating_sub(1).min(20))
        .min(tuning.backoff_max);
    // A floor of half the base keeps a run of unlucky draws from hammering the endpoint.
    let floor = (tuning.backoff_base / 2).min(ceiling);
    rand::rng().random_range(floor..=ceiling)
}

/// One fetch; on failure returns the least delay the provider asked for.
async fn fetch_once(slot: &ProviderSlot, client: &TokenClient) -> Result<(), Duration> {
    slot.update_status(|s| s.fetching = true);
    let started = Instant::now();
    let result = client
        .fetch(&slot.config, slot.settings.token_timeout)
        .await
        .and_then(|fetched| build_token(slot, fetched, started));
    let elapsed_ms = started.elapsed().as_millis() as u64;
    match result {
        Ok(token) => {
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
    fetched: FetchedToken,
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
    let mut header_value = http::HeaderValue::from_str(&format!(
        "{}{}",
        slot.config.header_prefix,
        fetched.value.expose()
    ))
    .map_err(|_| FetchError::Invalid("the token is not a valid header value".to_owned()))?;
    header_value.set_sensitive(true);
    let lead = slot.config.refresh_before.lead(lifetime);
    let jitter = lifetime.mul_f64(slot.settings.tuning.refresh_jitter * rand::rng().random::<f64>());
    // Never refresh sooner than this after a fetch, whatever the settings say.
    let earliest = (lifetime / 2).min(Duration::from_secs(1));
    let refresh_in = lifetime
        .saturating_sub(lead)
        .saturating_sub(jitter)
        .max(earliest);
    Ok(Token {
        header_value,
        generation: slot.generation.fetch_add(1, Ordering::AcqRel) + 1,
        expires_at: received + lifetime,
        refresh_at: received + refresh_in,
        fetched_at: now_wall,
        expires_at_wall: now_wall + lifetime,
    })
}
