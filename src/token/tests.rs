//! The refresh schedule and the refresher's supervisor, on tokio's paused clock.

use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{refresh, ProviderSlot, StoreSettings};
use crate::config::{Config, Tuning};
use crate::metrics::Metrics;
use crate::provider::MAX_LIFETIME;
use crate::secret::Secret;

fn slot(extra: &str, tuning: Tuning) -> Arc<ProviderSlot> {
    let text = format!(
        "[providers.p]\ntoken_url = \"https://issuer.example/token\"\nclient_id = \"id\"\nclient_secret = \"s3cret-value\"\n{extra}\n[[routes]]\nupstream = \"https://api.example\"\nprovider = \"p\"\n"
    );
    let config = Config::parse(&text, Path::new("t.toml"), &|_| None).unwrap();
    let settings = Arc::new(StoreSettings {
        token_timeout: Duration::from_secs(10),
        token_wait: Duration::from_secs(10),
        tuning,
        metrics: Arc::new(Metrics::new()),
    });
    Arc::new(ProviderSlot::new(
        config.providers["p"].clone(),
        settings,
        CancellationToken::new(),
    ))
}

fn no_jitter() -> Tuning {
    Tuning {
        refresh_jitter: 0.0,
        backoff_base: Duration::from_secs(1),
        backoff_max: Duration::from_secs(8),
        ..Tuning::default()
    }
}

#[tokio::test(start_paused = true)]
async fn refresh_is_due_refresh_before_ahead_of_expiry() {
    let slot = slot("refresh_before = \"10%\"", no_jitter());
    let now = Instant::now();
    let hour = Duration::from_secs(3600);
    let token = slot
        .make_token(&Secret::new("t"), hour, hour, now, SystemTime::now(), 1)
        .unwrap();
    assert_eq!(token.expires_at, now + hour);
    assert_eq!(token.refresh_at, now + Duration::from_secs(3240));
    slot.publish(token, super::Outcome::Fetched);
    assert_eq!(slot.next_due(now), Some(now + Duration::from_secs(3240)));
    // The clock moves; the token stays until it expires, then a fetch is due at once.
    tokio::time::advance(Duration::from_secs(3300)).await;
    assert!(slot.current().is_some());
    tokio::time::advance(Duration::from_secs(301)).await;
    assert!(slot.current().is_none());
    let later = Instant::now();
    assert_eq!(slot.next_due(later), Some(later));
}

#[tokio::test(start_paused = true)]
async fn a_lifetime_beyond_a_year_counts_as_a_year() {
    let slot = slot("refresh_before = \"1m\"", no_jitter());
    let (now, wall) = (Instant::now(), SystemTime::now());
    let forever = Duration::from_secs(u64::MAX / 4);
    let token = slot
        .make_token(&Secret::new("t"), forever, forever, now, wall, 1)
        .unwrap();
    assert_eq!(token.expires_at, now + MAX_LIFETIME);
    assert_eq!(token.expires_at_wall, wall + MAX_LIFETIME);
    assert_eq!(
        token.refresh_at,
        now + MAX_LIFETIME - Duration::from_secs(60)
    );
}

#[tokio::test(start_paused = true)]
async fn a_short_token_is_never_refreshed_sooner_than_half_its_life_or_a_second() {
    let slot = slot("refresh_before = \"10m\"", no_jitter());
    let now = Instant::now();
    let token = slot
        .make_token(
            &Secret::new("t"),
            Duration::from_secs(30),
            Duration::from_secs(30),
            now,
            SystemTime::now(),
            1,
        )
        .unwrap();
    assert_eq!(token.refresh_at, now + Duration::from_secs(3));
    let token = slot
        .make_token(
            &Secret::new("t"),
            Duration::from_millis(1500),
            Duration::from_millis(1500),
            now,
            SystemTime::now(),
            1,
        )
        .unwrap();
    assert_eq!(token.refresh_at, now + Duration::from_millis(750));
}

#[tokio::test(start_paused = true)]
async fn backoff_doubles_within_equal_jitter_bounds_up_to_the_maximum() {
    let slot = slot("", no_jitter());
    for (failures, ceiling) in [(1, 1), (2, 2), (3, 4), (4, 8), (5, 8), (40, 8)] {
        for _ in 0..50 {
            let d = refresh::backoff(&slot.settings.tuning, failures);
            let ceiling = Duration::from_secs(ceiling);
            assert!(d >= ceiling / 2 && d <= ceiling, "{failures}: {d:?}");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_panicking_refresher_is_restarted_with_backoff_and_reported() {
    let slot = slot("", no_jitter());
    let cancel = CancellationToken::new();
    let starts = Arc::new(AtomicU32::new(0));
    let counter = starts.clone();
    let started_at = Instant::now();
    let supervisor = tokio::spawn(refresh::supervise(
        slot.clone(),
        cancel.clone(),
        move || {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            async move {
                match n {
                    0 | 1 => panic!("cannot convert float seconds to Duration"),
                    2 => {}
                    _ => std::future::pending().await,
                }
            }
        },
    ));
    // Two panics and one plain return: three restarts, backoff 0.5-1 s, 1-2 s, 2-4 s.
    while starts.load(Ordering::SeqCst) < 4 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let waited = started_at.elapsed();
    assert!(
        waited >= Duration::from_millis(3500) && waited <= Duration::from_millis(7200),
        "{waited:?}"
    );
    let status = slot.status();
    assert_eq!(status.restarts, 3);
    assert!(!status.fetching);
    assert_eq!(
        status.last_restart.as_deref(),
        Some("the token refresher stopped unexpectedly")
    );
    let metrics = slot.settings.metrics.encode();
    assert!(
        metrics.contains("bearer_proxy_refresher_restarts_total{provider=\"p\"} 3"),
        "{metrics}"
    );
    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(1), supervisor)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(starts.load(Ordering::SeqCst), 4);
}

#[tokio::test(start_paused = true)]
async fn the_panic_message_reaches_the_status_without_the_secret() {
    let slot = slot("", no_jitter());
    let cancel = CancellationToken::new();
    let starts = Arc::new(AtomicU32::new(0));
    let counter = starts.clone();
    tokio::spawn(refresh::supervise(
        slot.clone(),
        cancel.clone(),
        move || {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            async move {
                if n == 0 {
                    panic!("boom near s3cret-value");
                }
                std::future::pending().await
            }
        },
    ));
    while starts.load(Ordering::SeqCst) < 2 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = slot.status();
    assert_eq!(status.last_restart.as_deref(), Some(refresh::PANICKED));
    let last_error = status.last_error.unwrap();
    assert!(last_error.contains("restarting it in"), "{last_error}");
    assert!(!last_error.contains("s3cret") && !last_error.contains("boom"));
    cancel.cancel();
}

#[tokio::test(start_paused = true)]
async fn no_part_of_a_panic_payload_reaches_the_status() {
    // A token-like value, not the client secret, placed across the old 200-character
    // cut: neither whole nor as a prefix may show.
    let token = "tok-0123456789abcdefghij-THE-CURRENT-TOKEN";
    let payload = format!("{}{token}", "x".repeat(190));
    let slot = slot("", no_jitter());
    let cancel = CancellationToken::new();
    let starts = Arc::new(AtomicU32::new(0));
    let counter = starts.clone();
    tokio::spawn(refresh::supervise(
        slot.clone(),
        cancel.clone(),
        move || {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            let payload = payload.clone();
            async move {
                if n == 0 {
                    std::panic::panic_any(payload);
                }
                std::future::pending().await
            }
        },
    ));
    while starts.load(Ordering::SeqCst) < 2 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = slot.status();
    for text in [status.last_restart.unwrap(), status.last_error.unwrap()] {
        assert!(!text.contains("tok-") && !text.contains("xxxx"), "{text}");
        assert!(text.contains("panicked"), "{text}");
    }
    cancel.cancel();
}

#[test]
fn outcome_labels_are_the_metric_and_log_text() {
    use super::Outcome;
    let labels = [
        Outcome::Fetched,
        Outcome::Shared,
        Outcome::Cached,
        Outcome::Failed,
    ]
    .map(Outcome::label);
    assert_eq!(labels, ["ok", "shared", "cached", "error"]);
}

#[tokio::test(start_paused = true)]
async fn only_a_fetch_here_counts_as_a_token_endpoint_call() {
    use super::Outcome;
    let slot = slot("", no_jitter());
    let hour = Duration::from_secs(3600);
    for outcome in [Outcome::Cached, Outcome::Shared, Outcome::Fetched] {
        let token = slot
            .make_token(
                &Secret::new("t"),
                hour,
                hour,
                Instant::now(),
                SystemTime::now(),
                1,
            )
            .unwrap();
        slot.publish(token, outcome);
    }
    slot.record_failure("boom".into(), Instant::now());
    let status = slot.status();
    assert_eq!((status.fetches, status.failures), (2, 1));
    let metrics = slot.settings.metrics.encode();
    for label in ["ok", "shared", "cached", "error"] {
        let line =
            format!("bearer_proxy_token_fetches_total{{provider=\"p\",outcome=\"{label}\"}} 1");
        assert!(metrics.contains(&line), "{line}: {metrics}");
    }
}

fn capped() -> Tuning {
    Tuning {
        backoff_base: Duration::from_millis(50),
        backoff_max: Duration::from_millis(200),
        ..no_jitter()
    }
}

/// Drives a [`refresh::Schedule`] through `failures` failed attempts the way the
/// refresher does (wait until the next fetch, attempt, note the failure), each
/// answered with `retry_after`; returns the gaps between attempts.
async fn failing_attempts(
    tuning: &Tuning,
    failures: usize,
    retry_after: impl Fn(usize) -> Option<Duration>,
) -> Vec<Duration> {
    let mut schedule = refresh::Schedule::default();
    let mut times = Vec::new();
    for n in 0..failures {
        // No token: a fetch is due at once, backoff permitting.
        let next = schedule.next_fetch(Some(Instant::now())).unwrap();
        tokio::time::sleep_until(next).await;
        let now = Instant::now();
        times.push(now);
        let attempt = schedule.attempt(now);
        assert_eq!(attempt as usize, n + 1);
        schedule.failed(now + refresh::retry_delay(tuning, attempt, retry_after(n)));
    }
    times.windows(2).map(|w| w[1] - w[0]).collect()
}

#[tokio::test(start_paused = true)]
async fn failed_attempts_follow_the_backoff_schedule_up_to_its_cap() {
    let tuning = capped();
    let ceilings: Vec<_> = (1..=10)
        .map(|n| refresh::backoff_ceiling(&tuning, n).as_millis())
        .collect();
    assert_eq!(ceilings, [50, 100, 200, 200, 200, 200, 200, 200, 200, 200]);
    // Far past the cap, no overflow.
    assert_eq!(
        refresh::backoff_ceiling(&tuning, u32::MAX),
        Duration::from_millis(200)
    );
    for _ in 0..20 {
        let gaps = failing_attempts(&tuning, 11, |_| None).await;
        assert_eq!(gaps.len(), 10);
        for (n, gap) in gaps.iter().enumerate() {
            let ceiling = refresh::backoff_ceiling(&tuning, u32::try_from(n).unwrap() + 1);
            assert!(*gap >= ceiling / 2 && *gap <= ceiling, "gap {n}: {gaps:?}");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn retry_after_sets_the_next_attempt_when_longer_than_the_backoff() {
    let tuning = capped();
    // Asked for 3 s, then nothing: exactly 3 s, then the backoff of the second failure.
    let gaps = failing_attempts(&tuning, 3, |n| (n == 0).then(|| Duration::from_secs(3))).await;
    assert_eq!(gaps[0], Duration::from_secs(3));
    assert!(gaps[1] >= Duration::from_millis(50) && gaps[1] <= Duration::from_millis(100));
    // Asked for less than the backoff: the backoff wins.
    for _ in 0..20 {
        let d = refresh::retry_delay(&tuning, 3, Some(Duration::from_millis(1)));
        assert!(d >= Duration::from_millis(100) && d <= Duration::from_millis(200));
    }
    // An HTTP date 3 s ahead has one-second resolution: between 2 and 3 s remain.
    let when = SystemTime::now() + Duration::from_secs(3);
    let asked = crate::provider::parse_retry_after(&httpdate::fmt_http_date(when)).unwrap();
    assert!(
        asked > Duration::from_secs(2) - Duration::from_millis(100)
            && asked <= Duration::from_secs(3)
    );
    assert_eq!(refresh::retry_delay(&tuning, 1, Some(asked)), asked);
}

#[tokio::test(start_paused = true)]
async fn a_success_starts_a_fresh_backoff_series() {
    let tuning = capped();
    let mut schedule = refresh::Schedule::default();
    let now = Instant::now();
    for _ in 0..5 {
        let attempt = schedule.attempt(now);
        schedule.failed(now + refresh::retry_delay(&tuning, attempt, None));
    }
    assert_eq!(schedule.attempt(now), 6);
    assert!(schedule.next_fetch(Some(now)).unwrap() > now);
    schedule.succeeded();
    assert_eq!(schedule.attempt(now), 1);
    assert_eq!(schedule.next_fetch(Some(now)), Some(now));
    assert_eq!(schedule.next_fetch(None), None);
}

#[tokio::test(start_paused = true)]
async fn fresh_tokens_rejected_in_a_row_hold_fetching_back() {
    let tuning = capped();
    let mut schedule = refresh::Schedule::default();
    let start = Instant::now();
    // The first rejection of a fresh token fetches at once.
    schedule.attempt(start);
    assert_eq!(
        schedule.rejected(1, start + Duration::from_secs(1), &tuning),
        None
    );
    assert_eq!(schedule.rejected_id(), Some(1));
    // The second in a row backs off by the first step, the third by the second.
    let now = start + Duration::from_secs(2);
    schedule.attempt(now);
    let (in_a_row, delay) = schedule.rejected(2, now, &tuning).unwrap();
    assert_eq!(in_a_row, 2);
    assert!(delay >= Duration::from_millis(25) && delay <= Duration::from_millis(50));
    assert_eq!(schedule.next_fetch(Some(now)), Some(now + delay));
    schedule.attempt(now);
    let (in_a_row, delay) = schedule.rejected(3, now, &tuning).unwrap();
    assert_eq!(in_a_row, 3);
    assert!(delay >= Duration::from_millis(50) && delay <= Duration::from_millis(100));
    // A token that lived past the quick-rejection window resets the count.
    let later = now + Duration::from_secs(31);
    assert_eq!(schedule.rejected(4, later, &tuning), None);
}

#[tokio::test(start_paused = true)]
async fn restarts_back_off_and_a_long_run_starts_a_fresh_series() {
    let tuning = capped();
    let mut restarts = refresh::Restarts::default();
    let quick = Duration::from_millis(1);
    for ceiling in [50, 100, 200, 200] {
        let d = restarts.next_delay(quick, &tuning);
        let ceiling = Duration::from_millis(ceiling);
        assert!(d >= ceiling / 2 && d <= ceiling, "{d:?}");
    }
    // Ran longer than twice the cap: back to the first step.
    let d = restarts.next_delay(Duration::from_millis(401), &tuning);
    assert!(
        d >= Duration::from_millis(25) && d <= Duration::from_millis(50),
        "{d:?}"
    );
}
