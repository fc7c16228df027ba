//! The per-provider refresher: fetch when needed, refresh ahead, back off on failure,
//! and (with a Redis store) share each token with the fleet.
//!
//! It works on its slot only through the slot's methods. What it remembers between
//! rounds (failures, rejections, when it may fetch next) is a [`Schedule`]; how
//! often a refresher that ended is started again is counted by [`Restarts`]. Both
//! are plain values, so their timing is tested on tokio's paused clock.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use rand::RngExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::cache::{CachedToken, TokenCache};
use super::fleet::{Fleet, FleetError, SharedToken};
use super::{Outcome, ProviderSlot, Token};
use crate::config::Tuning;
use crate::provider::{Expiry, FetchError, FetchedToken, TokenClient, MAX_LIFETIME};
use crate::secret::Secret;

/// What one refresher needs besides its slot.
#[derive(Clone)]
pub(super) struct Refresher {
    pub client: TokenClient,
    pub cache: Option<TokenCache>,
    pub fleet: Option<Arc<Fleet>>,
}

/// What starting a refresher takes: shared by the store and its keyed providers,
/// which start one per key from the request path.
#[derive(Clone)]
pub(super) struct Ingredients {
    pub refresher: Refresher,
    /// The store's runtime (set by `TokenStore::start`): refreshers live there,
    /// not on the worker runtime whose request created a key.
    pub runtime: Arc<OnceLock<tokio::runtime::Handle>>,
}

impl Ingredients {
    /// Starts `slot`'s refresher on the store's runtime.
    pub fn spawn(&self, slot: &Arc<ProviderSlot>) {
        let refresher = Arc::new(self.refresher.clone());
        let (run_slot, cancel) = (slot.clone(), slot.cancel_token().clone());
        let task = supervise(slot.clone(), cancel.clone(), move || {
            run(run_slot.clone(), refresher.clone(), cancel.clone())
        });
        match self.runtime.get() {
            Some(runtime) => drop(runtime.spawn(task)),
            None => drop(tokio::spawn(task)),
        }
    }
}

/// A token obtained by one attempt, and where it came from.
struct Obtained {
    token: Token,
    value: Secret,
    /// [`Outcome::Fetched`] or [`Outcome::Shared`].
    outcome: Outcome,
}

/// How often a refresher that ended on its own was started again, for its backoff.
#[derive(Debug, Default)]
pub(super) struct Restarts {
    in_a_row: u32,
}

impl Restarts {
    /// Counts one more restart of a refresher that ran for `ran` and returns how
    /// long to wait before starting it. One that ran a good while before ending
    /// starts a fresh backoff series.
    pub fn next_delay(&mut self, ran: Duration, tuning: &Tuning) -> Duration {
        if ran > tuning.backoff_max * 2 {
            self.in_a_row = 0;
        }
        self.in_a_row = self.in_a_row.saturating_add(1);
        backoff(tuning, self.in_a_row)
    }
}

/// What the refresher remembers between rounds.
#[derive(Debug, Default)]
pub(super) struct Schedule {
    /// Failed token endpoint calls in a row.
    failures: u32,
    /// Tokens the upstream rejected soon after we fetched them, in a row: bad
    /// credentials or a confused API must not turn every request into a fetch.
    quick_rejections: u32,
    /// No fetch before this (backoff, `Retry-After`).
    not_before: Option<Instant>,
    last_fetch: Option<Instant>,
    /// The last token the upstream rejected, until a fetch succeeds: never taken
    /// back from the fleet.
    rejected: Option<u64>,
}

impl Schedule {
    /// Notes that the upstream rejected token `id` at `now`. When fresh tokens keep
    /// being rejected, fetching backs off: returns how many in a row and the delay.
    pub fn rejected(&mut self, id: u64, now: Instant, tuning: &Tuning) -> Option<(u32, Duration)> {
        self.rejected = Some(id);
        let quick = self
            .last_fetch
            .is_some_and(|at| now.duration_since(at) < QUICK_REJECTION);
        self.quick_rejections = if quick {
            self.quick_rejections.saturating_add(1)
        } else {
            0
        };
        if self.quick_rejections < 2 {
            return None;
        }
        let delay = backoff(tuning, self.quick_rejections - 1);
        self.not_before = Some(now + delay);
        Some((self.quick_rejections, delay))
    }

    /// The token not to take back from the fleet.
    pub fn rejected_id(&self) -> Option<u64> {
        self.rejected
    }

    /// When to fetch next: when the slot is `due` (see `ProviderSlot::next_due`),
    /// but not before backoff or `Retry-After` allow. `None`: not until woken.
    pub fn next_fetch(&self, due: Option<Instant>) -> Option<Instant> {
        due.map(|due| self.not_before.map_or(due, |nb| due.max(nb)))
    }

    /// Starts an attempt at `now`; returns which attempt in a row it is.
    pub fn attempt(&mut self, now: Instant) -> u32 {
        self.last_fetch = Some(now);
        self.failures.saturating_add(1)
    }

    /// The attempt got a token.
    pub fn succeeded(&mut self) {
        self.failures = 0;
        self.not_before = None;
        self.rejected = None;
    }

    /// The attempt failed; the next one is not before `next_attempt`.
    pub fn failed(&mut self, next_attempt: Instant) {
        self.failures = self.failures.saturating_add(1);
        self.not_before = Some(next_attempt);
    }
}

/// Keeps `slot`'s refresher running until `cancel`: a refresher that ends on its
/// own (a panic included) is logged at error, counted, shown in `/tokens`, and
/// started again after the usual backoff, so no input can stop a provider for good.
pub(super) async fn supervise<F, Fut>(slot: Arc<ProviderSlot>, cancel: CancellationToken, start: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut restarts = Restarts::default();
    loop {
        let started = Instant::now();
        let mut task = tokio::spawn(start());
        let outcome = tokio::select! {
            outcome = &mut task => outcome,
            () = cancel.cancelled() => {
                // The refresher stops on the same token; this only covers one that won't.
                task.abort();
                return;
            }
        };
        if cancel.is_cancelled() {
            return;
        }
        let reason = stop_reason(outcome);
        let delay = restarts.next_delay(started.elapsed(), slot.tuning());
        let next_attempt = Instant::now() + delay;
        tracing::error!(
            provider = %slot.config.name,
            %reason,
            restart_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            "token refresher stopped; restarting it"
        );
        slot.record_restart(&reason, delay, next_attempt);
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep_until(next_attempt) => {}
        }
    }
}

/// Why a refresher task ended, for the log and `/tokens`. A panic's message is never
/// part of it: it may hold the client secret or a token in any form (whole, cut,
/// encoded), which no redaction can promise to catch. The process's panic hook logs
/// where the panic happened.
fn stop_reason(outcome: Result<(), tokio::task::JoinError>) -> String {
    match outcome {
        Ok(()) => "the token refresher stopped unexpectedly".to_owned(),
        Err(e) if e.is_panic() => PANICKED.to_owned(),
        Err(_) => "the token refresher was cancelled".to_owned(),
    }
}

/// The fixed reason recorded for a refresher that panicked.
pub(super) const PANICKED: &str =
    "the token refresher panicked (message withheld; the log names the code location)";

/// Runs until `cancel`: the only caller of `slot`'s token endpoint in this process.
pub(super) async fn run(slot: Arc<ProviderSlot>, r: Arc<Refresher>, cancel: CancellationToken) {
    let mut schedule = Schedule::default();
    if let (Some(_), Some(cache)) = (slot.key(), &r.cache) {
        // A key's cached token is read when the key is first used.
        if let Some(cached) = Box::pin(read_cache(&slot, cache)).await {
            slot.publish_cached(cached);
        }
    }
    loop {
        let now = Instant::now();
        if let Some(key) = slot.key() {
            if key.is_idle(now) {
                // Not refreshed ahead: keep the token until it expires, then leave.
                let Some(expires_at) = slot.current().map(|t| t.expires_at) else {
                    if key.retire(&slot) {
                        return;
                    }
                    continue;
                };
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = slot.woken() => {}
                    () = tokio::time::sleep_until(expires_at) => {}
                }
                continue;
            }
        }
        if let Some(id) = slot.take_rejected() {
            if let Some(fleet) = &r.fleet {
                // Drop it for the whole fleet, unless another proxy already replaced it.
                let _ = Box::pin(fleet.invalidate(&slot.config, slot.key_id(), id)).await;
            }
            if let Some((in_a_row, delay)) = schedule.rejected(id, now, slot.tuning()) {
                slot.record_backoff(
                    format!(
                        "the upstream rejected {in_a_row} fresh tokens in a row; next fetch in {delay:?}"
                    ),
                    now + delay,
                );
            }
        }
        if slot.take_fleet_hint() {
            if let Some(fleet) = &r.fleet {
                Box::pin(adopt_from_fleet(&slot, fleet, schedule.rejected_id())).await;
            }
        }
        let due = schedule.next_fetch(slot.next_due(now));
        if due.is_some_and(|due| due <= now) {
            let attempt = schedule.attempt(now);
            // Boxed, as every await but the waits below: the large futures exist only
            // while running, which keeps an idle refresher (one per key) small.
            match Box::pin(fetch_once(&slot, &r, schedule.rejected_id(), attempt)).await {
                Ok(()) => schedule.succeeded(),
                Err(next_attempt) => schedule.failed(next_attempt),
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
            () = slot.woken() => {}
            () = sleep => {}
        }
    }
}

/// A token rejected within this long of its fetch counts as a quick rejection.
const QUICK_REJECTION: Duration = Duration::from_secs(30);

/// Exponential backoff with "equal jitter": uniform in [c/2, c] where
/// c = min(max, base * 2^(n-1)). Unlike full jitter (uniform in [0, c]) the gaps
/// never shrink, so a run of unlucky draws cannot hammer the endpoint, and a fleet
/// still spreads out over half of each interval.
pub(super) fn backoff(tuning: &Tuning, failures: u32) -> Duration {
    let ceiling = backoff_ceiling(tuning, failures);
    rand::rng().random_range(ceiling / 2..=ceiling)
}

/// The longest backoff after `failures` in a row: `base * 2^(n-1)`, at most `max`.
pub(super) fn backoff_ceiling(tuning: &Tuning, failures: u32) -> Duration {
    tuning
        .backoff_base
        .saturating_mul(1u32 << failures.saturating_sub(1).min(20))
        .min(tuning.backoff_max)
}

/// How long to wait after the `attempt`-th failure in a row: the backoff, or longer
/// if the token endpoint asked for it with `Retry-After`.
pub(super) fn retry_delay(
    tuning: &Tuning,
    attempt: u32,
    retry_after: Option<Duration>,
) -> Duration {
    retry_after
        .unwrap_or_default()
        .max(backoff(tuning, attempt))
}

/// One attempt, the `attempt`-th in a row; on failure returns when to try next
/// (backoff, or later if the provider asked with `Retry-After`).
async fn fetch_once(
    slot: &ProviderSlot,
    r: &Refresher,
    rejected: Option<u64>,
    attempt: u32,
) -> Result<(), Instant> {
    slot.mark_fetching();
    let started = Instant::now();
    let result = match &r.fleet {
        Some(fleet) => match coordinate(slot, &r.client, fleet, rejected).await {
            Ok(result) => result,
            Err(error) => {
                tracing::debug!(provider = %slot.config.name, %error, "fetching without the fleet");
                fetch_here(slot, &r.client).await
            }
        },
        None => fetch_here(slot, &r.client).await,
    };
    let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    match result {
        Ok(obtained) => {
            if let Some(cache) = &r.cache {
                write_cache(slot, cache, &obtained).await;
            }
            let token = obtained.token;
            let expires_in = token.expires_at.saturating_duration_since(Instant::now());
            tracing::info!(
                provider = %slot.config.name,
                outcome = obtained.outcome.label(),
                duration_ms = elapsed_ms,
                expires_in_s = expires_in.as_secs(),
                generation = token.generation,
                "token fetched"
            );
            slot.publish(token, obtained.outcome);
            Ok(())
        }
        Err(e) => {
            if e.is_invalid_client() {
                reread_secret(slot).await;
            }
            let delay = retry_delay(slot.tuning(), attempt, e.retry_after());
            let next_attempt = Instant::now() + delay;
            tracing::warn!(
                provider = %slot.config.name,
                outcome = Outcome::Failed.label(),
                duration_ms = elapsed_ms,
                error = %e,
                failures_in_a_row = attempt,
                retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                "token fetch failed"
            );
            slot.record_failure(e.to_string(), next_attempt);
            Err(next_attempt)
        }
    }
}

/// After `invalid_client`, runs `client_secret_command` again (once per failed
/// attempt, so at most once per backoff step): the secret may have been rotated.
async fn reread_secret(slot: &ProviderSlot) {
    let Some(command) = &slot.config.client_secret_command else {
        return;
    };
    match command.run(slot.token_timeout()).await {
        Ok(secret) => {
            let changed = slot.config.client_secret.set(secret);
            tracing::info!(
                provider = %slot.config.name,
                changed,
                "the token endpoint answered invalid_client; client secret read again from client_secret_command"
            );
        }
        Err(error) => tracing::warn!(
            provider = %slot.config.name,
            %error,
            "the token endpoint answered invalid_client and client_secret_command failed"
        ),
    }
}

/// One token without a refresher (see `super::one_token`).
pub(super) async fn once(
    slot: &ProviderSlot,
    client: &TokenClient,
    cache: Option<&TokenCache>,
) -> Result<Secret, FetchError> {
    if let Some(cache) = cache {
        if let Some(cached) = read_cache(slot, cache).await {
            if slot
                .not_yet_due(cached.fetched_at, cached.expires_at, SystemTime::now())
                .is_some()
            {
                return Ok(cached.value);
            }
        }
    }
    let obtained = fetch_here(slot, client).await?;
    if let Some(cache) = cache {
        write_cache(slot, cache, &obtained).await;
    }
    Ok(obtained.value)
}

/// The slot's token from the cache, read off the runtime threads.
async fn read_cache(slot: &ProviderSlot, cache: &TokenCache) -> Option<CachedToken> {
    let (cache, config) = (cache.clone(), slot.config.clone());
    let key_id = slot.key_id().map(str::to_owned);
    tokio::task::spawn_blocking(move || cache.load(&config, key_id.as_deref()))
        .await
        .ok()
        .flatten()
}

async fn write_cache(slot: &ProviderSlot, cache: &TokenCache, obtained: &Obtained) {
    let (cache, config) = (cache.clone(), slot.config.clone());
    let key_id = slot.key_id().map(str::to_owned);
    let value = obtained.value.clone();
    let (fetched_at, expires_at) = (obtained.token.fetched_at, obtained.token.expires_at_wall);
    // Awaited so a restart right after sees the file; off the runtime threads.
    let written = tokio::task::spawn_blocking(move || {
        cache.store(&config, key_id.as_deref(), &value, fetched_at, expires_at)
    })
    .await;
    if let Ok(Err(error)) = written {
        tracing::warn!(provider = %slot.config.name, %error, "cannot write the token cache");
    }
}

/// Calls the token endpoint from this process.
async fn fetch_here(slot: &ProviderSlot, client: &TokenClient) -> Result<Obtained, FetchError> {
    let started = Instant::now();
    let fetched = client
        .fetch(
            &slot.config,
            slot.key().map(|k| k.value()),
            slot.token_timeout(),
        )
        .await?;
    let token = build_token(slot, &fetched, started)?;
    Ok(Obtained {
        token,
        value: fetched.value,
        outcome: Outcome::Fetched,
    })
}

/// Gets a token through the fleet: adopt the one in Redis, or take the lock and
/// fetch, or wait for the lock holder's token. `Err` only for Redis trouble, after
/// which the caller fetches on its own; a failed fetch is `Ok(Err(..))`.
async fn coordinate(
    slot: &ProviderSlot,
    client: &TokenClient,
    fleet: &Fleet,
    rejected: Option<u64>,
) -> Result<Result<Obtained, FetchError>, FleetError> {
    let (p, key) = (&slot.config, slot.key_id());
    let current = slot.held_id();
    // Long enough for a holder to finish one fetch; a dead holder's lock expires.
    let lock_ttl = slot.token_timeout() + Duration::from_secs(1);
    let give_up = Instant::now() + lock_ttl * 2;
    let owner = format!("{:016x}", rand::random::<u64>());
    loop {
        if let Some(shared) = fleet.read(p, key).await? {
            if let Some(obtained) = adoptable(slot, shared, current, rejected) {
                return Ok(Ok(obtained));
            }
        }
        if fleet.try_lock(p, key, &owner, lock_ttl).await? {
            // Look again under the lock: the previous holder may have just written.
            if let Some(shared) = fleet.read(p, key).await? {
                if let Some(obtained) = adoptable(slot, shared, current, rejected) {
                    let _ = fleet.unlock(p, key, &owner).await;
                    return Ok(Ok(obtained));
                }
            }
            let result = fetch_here(slot, client).await;
            if let Ok(obtained) = &result {
                let shared = SharedToken {
                    id: obtained.token.id,
                    value: obtained.value.clone(),
                    fetched_at: obtained.token.fetched_at,
                    expires_at: obtained.token.expires_at_wall,
                };
                if fleet.write(p, key, &shared, false).await.is_ok() {
                    let _ = fleet.publish_changed(p, key).await;
                }
            }
            let _ = fleet.unlock(p, key, &owner).await;
            return Ok(result);
        }
        if Instant::now() >= give_up {
            return Err(FleetError::LockHeld);
        }
        // Another proxy is fetching: wait for its token (pub/sub wakes us early).
        tokio::select! {
            () = slot.fleet_woken() => {}
            () = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
}

/// A token from the fleet, if it is one this slot should use: not the one it holds
/// or just saw rejected, and not already due for refresh.
fn adoptable(
    slot: &ProviderSlot,
    shared: SharedToken,
    current: Option<u64>,
    rejected: Option<u64>,
) -> Option<Obtained> {
    if Some(shared.id) == current || Some(shared.id) == rejected {
        return None;
    }
    let now_wall = SystemTime::now();
    let (lifetime, remaining) = slot.not_yet_due(shared.fetched_at, shared.expires_at, now_wall)?;
    let token = slot.make_token(
        &shared.value,
        lifetime,
        remaining,
        Instant::now(),
        now_wall,
        shared.id,
    )?;
    Some(Obtained {
        token,
        value: shared.value,
        outcome: Outcome::Shared,
    })
}

/// Takes the fleet's token after another proxy announced one.
async fn adopt_from_fleet(slot: &ProviderSlot, fleet: &Fleet, rejected: Option<u64>) {
    // A token rejected while this runs must not come back from Redis (where our
    // own fetch may still hold it) under a new generation.
    let (current, pending) = slot.current_and_rejected();
    let rejected = pending.or(rejected);
    let Ok(Some(shared)) = fleet.read(&slot.config, slot.key_id()).await else {
        return;
    };
    // Only move to a token that lives longer than ours (or when we have none).
    let ours = slot.held_expiry();
    if ours.is_some_and(|ours| shared.expires_at <= ours) {
        return;
    }
    if let Some(obtained) = adoptable(slot, shared, current, rejected) {
        tracing::info!(provider = %slot.config.name, outcome = Outcome::Shared.label(), "token adopted from the fleet");
        slot.publish(obtained.token, obtained.outcome);
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
    let lifetime = lifetime.min(MAX_LIFETIME);
    if lifetime < Duration::from_secs(1) {
        return Err(FetchError::Invalid(
            "the token expires in less than a second".to_owned(),
        ));
    }
    slot.make_token(
        &fetched.value,
        lifetime,
        lifetime,
        received,
        now_wall,
        rand::random(),
    )
    .ok_or_else(|| FetchError::Invalid("the token is not a valid header value".to_owned()))
}
