//! The shared token store: one slot per provider, read lock-free on the hot path.
//!
//! Each slot is filled and refreshed by its own background task (`refresh`), which
//! is the only code that calls the token endpoint: single flight by construction.
//! Requests read the current token with an `ArcSwap` load; only a request that finds
//! no valid token waits, at most `token_wait`, for the task to publish one.
//!
//! [`one_token`] gets a single token the same way outside a running proxy (the
//! `bearer-proxy token` command): the same cache, freshness rule and token checks.

pub mod cache;
pub mod fleet;
pub mod keyed;
mod redis_link;
mod refresh;
pub mod seal;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, SystemTime};

use arc_swap::{ArcSwap, ArcSwapOption};
use http::HeaderValue;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ProviderConfig, StoreConfig, Tuning};
use crate::metrics::Metrics;
use crate::provider::{TokenClient, MAX_LIFETIME};
use crate::secret::Secret;
use cache::TokenCache;
use fleet::{Fleet, FleetError, FleetEvent};
pub use keyed::{KeyBinding, KeyCounts, KeyedProvider};

/// A token ready to be sent: the whole header value, with its timing.
pub struct Token {
    /// `header_prefix` + token, marked sensitive so hyper and h2 never print it.
    header_value: HeaderValue,
    /// Increases with every token a slot publishes; used to invalidate only the
    /// token a failed request actually carried.
    pub generation: u64,
    /// Random per fetched token and the same on every proxy of a fleet.
    pub id: u64,
    pub expires_at: Instant,
    pub refresh_at: Instant,
    pub fetched_at: SystemTime,
    pub expires_at_wall: SystemTime,
}

impl Token {
    /// The value for the provider's header.
    pub fn header_value(&self) -> &HeaderValue {
        &self.header_value
    }

    /// True while the token may still be sent.
    pub fn is_valid_at(&self, now: Instant) -> bool {
        now < self.expires_at
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("value", &"***")
            .field("generation", &self.generation)
            .field("expires_at_wall", &self.expires_at_wall)
            .finish()
    }
}

/// Why a request got no token.
#[derive(Debug, Clone, thiserror::Error)]
#[error("no valid token for provider {provider}: {reason}")]
pub struct TokenUnavailable {
    pub provider: String,
    pub reason: String,
}

/// How a fetch ended: where a published token came from, or that it failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Fetched from the token endpoint by this process.
    Fetched,
    /// Fetched by another proxy of the fleet and taken from Redis.
    Shared,
    /// Read from the on-disk token cache.
    Cached,
    /// The token endpoint call failed.
    Failed,
}

impl Outcome {
    /// The `outcome` label of metrics and log lines.
    pub fn label(self) -> &'static str {
        match self {
            Self::Fetched => "ok",
            Self::Shared => "shared",
            Self::Cached => "cached",
            Self::Failed => "error",
        }
    }

    /// True when this process called the token endpoint.
    fn called_the_endpoint(self) -> bool {
        matches!(self, Self::Fetched | Self::Failed)
    }
}

/// What a slot reports about itself (for logs, `/tokens` and `/readyz`).
#[derive(Debug, Clone, Default)]
pub struct SlotStatus {
    pub fetches: u64,
    pub failures: u64,
    pub last_error: Option<String>,
    /// When the task will try again after a failure.
    pub next_attempt: Option<Instant>,
    pub fetching: bool,
    /// Times the refresher ended unexpectedly and was started again.
    pub restarts: u64,
    /// Why it last had to be started again.
    pub last_restart: Option<String>,
}

/// Settings every slot shares.
#[derive(Debug, Clone)]
pub struct StoreSettings {
    pub token_timeout: Duration,
    pub token_wait: Duration,
    pub tuning: Tuning,
    pub metrics: Arc<Metrics>,
}

impl StoreSettings {
    /// The settings of `config` that every slot shares.
    fn new(config: &Config, metrics: Arc<Metrics>) -> Self {
        Self {
            token_timeout: config.server.token_timeout,
            token_wait: config.server.token_wait,
            tuning: config.tuning.clone(),
            metrics,
        }
    }
}

/// One provider's token and the state of its refresher.
pub struct ProviderSlot {
    pub config: Arc<ProviderConfig>,
    current: ArcSwapOption<Token>,
    /// Notified whenever a fetch ends, so waiters look again. (A `Notify` rather
    /// than a watch channel: a keyed provider has one slot per key, and this is
    /// a tenth of the size.)
    changed: Notify,
    wake: Notify,
    /// A request needs a token (matters for `prefetch = false` and after invalidation).
    wanted: AtomicBool,
    /// The id of the token `invalidate` dropped, for the refresher.
    rejected: Mutex<Option<u64>>,
    /// Another proxy announced a new token: look in the fleet store.
    fleet_hint: AtomicBool,
    /// Wakes a refresher waiting for another proxy's token.
    fleet_wake: Notify,
    generation: AtomicU64,
    status: Mutex<SlotStatus>,
    settings: Arc<StoreSettings>,
    /// Stops this slot's refresher (shutdown, or the provider left the config).
    cancel: CancellationToken,
    /// The key this slot's token is bound to (one slot per key of a keyed provider).
    key: Option<KeyBinding>,
}

impl ProviderSlot {
    fn new(
        config: Arc<ProviderConfig>,
        settings: Arc<StoreSettings>,
        cancel: CancellationToken,
    ) -> Self {
        settings.metrics.provider_started(&config.name);
        Self {
            config,
            current: ArcSwapOption::empty(),
            changed: Notify::new(),
            wake: Notify::new(),
            wanted: AtomicBool::new(false),
            rejected: Mutex::new(None),
            fleet_hint: AtomicBool::new(false),
            fleet_wake: Notify::new(),
            generation: AtomicU64::new(0),
            status: Mutex::new(SlotStatus::default()),
            settings,
            cancel,
            key: None,
        }
    }

    /// The slot of one key of a keyed provider.
    fn with_key(mut self, key: KeyBinding) -> Self {
        self.key = Some(key);
        self
    }

    /// The keyed hash of the slot's key (keyed providers only): what files and
    /// Redis names use instead of the key.
    pub fn key_id(&self) -> Option<&str> {
        self.key.as_ref().map(KeyBinding::id)
    }

    /// The provider's name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// The key this slot's token is bound to (keyed providers only).
    fn key(&self) -> Option<&KeyBinding> {
        self.key.as_ref()
    }

    /// Stops this slot's refresher.
    fn stop(&self) {
        self.cancel.cancel();
    }

    /// Cancelled when the refresher must stop.
    fn cancel_token(&self) -> &CancellationToken {
        &self.cancel
    }

    fn tuning(&self) -> &Tuning {
        &self.settings.tuning
    }

    fn token_timeout(&self) -> Duration {
        self.settings.token_timeout
    }

    /// Wakes the refresher to look at the slot again.
    fn wake(&self) {
        self.wake.notify_one();
    }

    /// Completes when someone calls [`ProviderSlot::wake`] (a wake-up while the
    /// refresher is busy is kept for its next wait).
    fn woken(&self) -> tokio::sync::futures::Notified<'_> {
        self.wake.notified()
    }

    /// Another proxy announced a new token: look in the fleet store, and wake a
    /// refresher waiting for another proxy's fetch.
    fn fleet_changed(&self) {
        self.fleet_hint.store(true, Ordering::Release);
        self.fleet_wake.notify_waiters();
        self.wake();
    }

    /// Asks the refresher to look in the fleet store (after Redis came back).
    fn look_in_fleet(&self) {
        self.fleet_hint.store(true, Ordering::Release);
        self.wake();
    }

    /// True once after [`ProviderSlot::fleet_changed`] or [`ProviderSlot::look_in_fleet`].
    fn take_fleet_hint(&self) -> bool {
        self.fleet_hint.swap(false, Ordering::AcqRel)
    }

    /// Completes when another proxy announces a token ([`ProviderSlot::fleet_changed`]).
    fn fleet_woken(&self) -> tokio::sync::futures::Notified<'_> {
        self.fleet_wake.notified()
    }

    /// The id of the token held, valid or not.
    fn held_id(&self) -> Option<u64> {
        self.current.load().as_ref().map(|t| t.id)
    }

    /// When the token held expires on the wall clock, valid or not.
    fn held_expiry(&self) -> Option<SystemTime> {
        self.current.load().as_ref().map(|t| t.expires_at_wall)
    }

    /// When the slot next needs a fetch, ignoring backoff; `None`: not until asked.
    fn next_due(&self, now: Instant) -> Option<Instant> {
        match self.current.load().as_ref() {
            Some(token) if token.is_valid_at(now) => Some(token.refresh_at),
            _ if (self.config.prefetch && self.key.is_none())
                || self.wanted.load(Ordering::Acquire) =>
            {
                Some(now)
            }
            _ => None,
        }
    }

    /// The current token if it is still valid, without waiting or locking.
    pub fn current(&self) -> Option<Arc<Token>> {
        let token = self.current.load_full()?;
        token.is_valid_at(Instant::now()).then_some(token)
    }

    /// A copy of the slot's status.
    pub fn status(&self) -> SlotStatus {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// A valid token, waiting at most `token_wait` for the refresher to get one.
    pub async fn get(&self) -> Result<Arc<Token>, TokenUnavailable> {
        if let Some(token) = self.current() {
            return Ok(token);
        }
        let deadline = Instant::now() + self.settings.token_wait;
        self.wanted.store(true, Ordering::Release);
        self.wake.notify_one();
        loop {
            // Registered before looking, so a fetch ending in between still wakes us.
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(token) = self.current() {
                return Ok(token);
            }
            let status = self.status();
            // In backoff past our deadline: answer now instead of holding the client.
            if !status.fetching && status.next_attempt.is_some_and(|at| at >= deadline) {
                return Err(self.unavailable(status));
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return Err(self.unavailable(self.status()));
            }
        }
    }

    fn unavailable(&self, status: SlotStatus) -> TokenUnavailable {
        let reason = match status.last_error {
            Some(e) => format!("last fetch failed: {e}"),
            None if status.fetching => format!(
                "the token endpoint did not answer within token_wait ({:?})",
                self.settings.token_wait
            ),
            None => "no token fetched yet".to_owned(),
        };
        TokenUnavailable {
            provider: self.config.name.clone(),
            reason,
        }
    }

    /// Drops the token of `generation` if it is still the current one and asks for a
    /// new one. Returns true when this call did the drop (so N rejections of one
    /// token cause one fetch).
    pub fn invalidate(&self, generation: u64) -> bool {
        let current = self.current.load();
        let Some(token) = current.as_ref() else {
            return false;
        };
        if token.generation != generation {
            return false;
        }
        // The drop and the note of what was rejected happen under one lock, so the
        // refresher never sees "no token" without also seeing which one not to
        // take back from the fleet (see `current_and_rejected`).
        let dropped = {
            let mut rejected = self.rejected.lock().unwrap_or_else(PoisonError::into_inner);
            let previous = self.current.compare_and_swap(&*current, None);
            let dropped = previous
                .as_ref()
                .is_some_and(|t| t.generation == generation);
            if dropped {
                *rejected = Some(token.id);
            }
            dropped
        };
        if dropped {
            self.settings.metrics.token_invalidated(&self.config.name);
            tracing::info!(provider = %self.config.name, generation, "token rejected by upstream; fetching a new one");
            self.wanted.store(true, Ordering::Release);
            self.wake();
        }
        dropped
    }

    /// The current token's id and the id of a token just rejected and not yet seen
    /// by the refresher, read together.
    fn current_and_rejected(&self) -> (Option<u64>, Option<u64>) {
        let rejected = self.rejected.lock().unwrap_or_else(PoisonError::into_inner);
        (self.current.load().as_ref().map(|t| t.id), *rejected)
    }

    /// The lifetime and what remains at `now` of a stored token (cache file, fleet)
    /// fetched at `fetched_at`, if the proxy would not be refreshing it yet.
    fn not_yet_due(
        &self,
        fetched_at: SystemTime,
        expires_at: SystemTime,
        now: SystemTime,
    ) -> Option<(Duration, Duration)> {
        let remaining = expires_at.duration_since(now).ok()?;
        let lifetime = expires_at
            .duration_since(fetched_at)
            .unwrap_or(remaining)
            .max(remaining);
        (remaining > self.config.refresh_before.lead(lifetime)).then_some((lifetime, remaining))
    }

    /// `token`'s bare value (without `header_prefix`), for sharing it. Takes the token
    /// already loaded, so its id, times and value are one token's even while the
    /// refresher publishes another.
    fn bare_value(&self, token: &Token) -> Option<Secret> {
        let header = token.header_value.to_str().ok()?;
        header
            .strip_prefix(self.config.header_prefix.as_str())
            .map(Secret::new)
    }

    fn take_rejected(&self) -> Option<u64> {
        self.rejected.lock().ok().and_then(|mut r| r.take())
    }

    /// Drops the current token if it is the fleet token `id` another proxy saw rejected.
    fn drop_fleet_token(&self, id: u64) {
        let current = self.current.load();
        if current.as_ref().is_some_and(|t| t.id == id) {
            self.current.compare_and_swap(&*current, None);
            self.wanted.store(true, Ordering::Release);
            self.wake();
        }
    }

    /// Builds a token whose whole lifetime is `lifetime` and of which `remaining` is
    /// left at monotonic instant `now` (wall clock `now_wall`). Both are capped at
    /// [`MAX_LIFETIME`], so no time arithmetic here can overflow. `None` when the
    /// value cannot be sent in a header.
    fn make_token(
        &self,
        value: &Secret,
        lifetime: Duration,
        remaining: Duration,
        now: Instant,
        now_wall: SystemTime,
        id: u64,
    ) -> Option<Token> {
        let mut header_value =
            HeaderValue::from_str(&format!("{}{}", self.config.header_prefix, value.expose()))
                .ok()?;
        header_value.set_sensitive(true);
        let lifetime = lifetime.min(MAX_LIFETIME);
        let remaining = remaining.min(lifetime);
        let lead = self.config.refresh_before.lead(lifetime);
        // Jitter spreads a fleet started together over a little window.
        let spread = (self.settings.tuning.refresh_jitter * rand::random::<f64>()).clamp(0.0, 1.0);
        let jitter = lifetime.mul_f64(spread);
        // Never refresh sooner than this after a fetch, whatever the settings say.
        let earliest = if remaining == lifetime {
            (lifetime / 2).min(Duration::from_secs(1))
        } else {
            Duration::ZERO
        };
        let refresh_in = remaining
            .saturating_sub(lead)
            .saturating_sub(jitter)
            .max(earliest);
        Some(Token {
            header_value,
            generation: self.generation.fetch_add(1, Ordering::AcqRel) + 1,
            id,
            expires_at: now.checked_add(remaining)?,
            refresh_at: now.checked_add(refresh_in)?,
            fetched_at: now_wall.checked_sub(lifetime - remaining)?,
            expires_at_wall: now_wall.checked_add(remaining)?,
        })
    }

    /// Publishes a token read from the on-disk cache.
    fn publish_cached(&self, cached: cache::CachedToken) {
        let now_wall = SystemTime::now();
        let (Ok(remaining), Ok(lifetime)) = (
            cached.expires_at.duration_since(now_wall),
            cached.expires_at.duration_since(cached.fetched_at),
        ) else {
            return;
        };
        let Some(token) = self.make_token(
            &cached.value,
            lifetime.max(remaining),
            remaining,
            Instant::now(),
            now_wall,
            rand::random(),
        ) else {
            return;
        };
        tracing::info!(
            provider = %self.config.name,
            outcome = Outcome::Cached.label(),
            expires_in_s = remaining.as_secs(),
            "token loaded from the token cache"
        );
        self.publish(token, Outcome::Cached);
    }

    /// Makes `token` the current one and wakes every request waiting for it.
    /// `outcome` is where it came from; only [`Outcome::Fetched`] counts as a
    /// token-endpoint call.
    fn publish(&self, token: Token, outcome: Outcome) {
        self.current.store(Some(Arc::new(token)));
        self.settings
            .metrics
            .token_fetch(&self.config.name, outcome.label());
        self.wanted.store(false, Ordering::Release);
        self.update_status(|s| {
            s.fetching = false;
            s.fetches += u64::from(outcome.called_the_endpoint());
            s.last_error = None;
            s.next_attempt = None;
        });
    }

    /// Notes that a fetch started (for `/tokens` and for requests deciding to wait).
    fn mark_fetching(&self) {
        self.update_status(|s| s.fetching = true);
    }

    /// Notes a failed token endpoint call and when the next one is due.
    fn record_failure(&self, error: String, next_attempt: Instant) {
        self.settings
            .metrics
            .token_fetch(&self.config.name, Outcome::Failed.label());
        self.update_status(|s| {
            s.fetching = false;
            s.fetches += 1;
            s.failures += 1;
            s.last_error = Some(error);
            s.next_attempt = Some(next_attempt);
        });
    }

    /// Notes that fetching waits (after fresh tokens were rejected) and why.
    fn record_backoff(&self, why: String, next_attempt: Instant) {
        self.update_status(|s| {
            s.last_error = Some(why);
            s.next_attempt = Some(next_attempt);
        });
    }

    /// Notes that the refresher ended unexpectedly and starts again at `next_attempt`.
    fn record_restart(&self, reason: &str, delay: Duration, next_attempt: Instant) {
        self.settings.metrics.refresher_restart(&self.config.name);
        self.update_status(|s| {
            s.fetching = false;
            s.restarts += 1;
            s.last_restart = Some(reason.to_owned());
            s.last_error = Some(format!("{reason}; restarting it in {delay:?}"));
            s.next_attempt = Some(next_attempt);
        });
    }

    fn update_status(&self, f: impl FnOnce(&mut SlotStatus)) {
        if let Ok(mut s) = self.status.lock() {
            f(&mut s);
        }
        self.changed.notify_waiters();
    }
}

/// What a reload did to the providers.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ProviderChanges {
    /// Unchanged: the slot and its token were kept.
    pub kept: Vec<String>,
    /// New or changed: a fresh slot.
    pub started: Vec<String>,
    /// Gone from the config: the refresher was stopped.
    pub stopped: Vec<String>,
}

type Slots = BTreeMap<String, Arc<ProviderSlot>>;

/// Every provider's slot, shared by all routes and listeners.
pub struct TokenStore {
    slots: ArcSwap<Slots>,
    /// Keyed providers (`key_header`), by name; not in `slots`.
    keyed: ArcSwap<BTreeMap<String, Arc<KeyedProvider>>>,
    cache: Option<TokenCache>,
    fleet: Option<Arc<Fleet>>,
    ingredients: refresh::Ingredients,
    settings: Arc<StoreSettings>,
    /// Parent of every refresher's cancel token.
    root: CancellationToken,
}

impl TokenStore {
    /// Creates one slot per provider; nothing is fetched until [`TokenStore::start`].
    pub fn new(
        config: &Config,
        client: TokenClient,
        cache: Option<TokenCache>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, FleetError> {
        let fleet = match &config.store {
            StoreConfig::Memory => None,
            StoreConfig::Redis(redis) => Some(Arc::new(Fleet::new(
                redis,
                config.tuning.redis_timeout,
                metrics.clone(),
            )?)),
        };
        let settings = Arc::new(StoreSettings::new(config, metrics));
        let root = CancellationToken::new();
        let ingredients = refresh::Ingredients {
            refresher: refresh::Refresher {
                client,
                cache: cache.clone(),
                fleet: fleet.clone(),
            },
            runtime: Arc::new(OnceLock::new()),
        };
        let slots = config
            .providers
            .iter()
            .filter(|(_, p)| p.keys.is_none())
            .map(|(name, p)| {
                let slot = ProviderSlot::new(p.clone(), settings.clone(), root.child_token());
                (name.clone(), Arc::new(slot))
            })
            .collect();
        let keyed = config
            .providers
            .iter()
            .filter_map(|(name, p)| {
                let keyed = KeyedProvider::new(
                    p.clone(),
                    settings.clone(),
                    ingredients.clone(),
                    root.child_token(),
                )?;
                Some((name.clone(), keyed))
            })
            .collect();
        Ok(Self {
            slots: ArcSwap::from_pointee(slots),
            keyed: ArcSwap::from_pointee(keyed),
            cache,
            fleet,
            ingredients,
            settings,
            root,
        })
    }

    /// Fills slots from the token cache. Blocks on file reads: call before serving,
    /// off the async runtime.
    pub fn load_cache(&self) {
        for slot in self.slots.load().values() {
            self.load_cached(slot);
        }
    }

    fn load_cached(&self, slot: &ProviderSlot) {
        if let Some(cached) = self.cache.as_ref().and_then(|c| c.load(&slot.config, None)) {
            slot.publish_cached(cached);
        }
    }

    /// Spawns each slot's refresher, and the fleet listener with a Redis store.
    pub fn start(self: &Arc<Self>) {
        let _ = self
            .ingredients
            .runtime
            .set(tokio::runtime::Handle::current());
        for slot in self.slots.load().values() {
            self.spawn(slot);
        }
        if let Some(fleet) = &self.fleet {
            let (on_event, on_connect) = (self.clone(), self.clone());
            tokio::spawn(fleet.clone().listen(
                self.root.child_token(),
                move |event| on_event.fleet_event(event),
                move || on_connect.fleet_connected(),
            ));
        }
    }

    fn spawn(&self, slot: &Arc<ProviderSlot>) {
        self.ingredients.spawn(slot);
    }

    /// The slot a fleet event names: a provider's, or one key's of a keyed provider.
    fn slot_for(&self, provider: &str, fp: &str) -> Option<Arc<ProviderSlot>> {
        if let Some(keyed) = self.keyed(provider) {
            return keyed.slot_by_tag(fp);
        }
        self.slot(provider)
            .filter(|slot| slot.config.fingerprint().tag() == fp)
    }

    fn fleet_event(&self, event: FleetEvent) {
        match event {
            FleetEvent::Changed { provider, fp } => {
                if let Some(slot) = self.slot_for(&provider, &fp) {
                    slot.fleet_changed();
                }
            }
            FleetEvent::Invalidated { provider, fp, id } => {
                if let Some(slot) = self.slot_for(&provider, &fp) {
                    slot.drop_fleet_token(id);
                }
            }
        }
    }

    /// After (re)connecting to Redis: offer our tokens to a store that lost them
    /// (Redis restarted) or holds shorter-lived ones (a failover while we fetched
    /// alone), and look for better ones, so the fleet converges again without a fetch.
    fn fleet_connected(&self) {
        let Some(fleet) = self.fleet.clone() else {
            return;
        };
        let keyed = self
            .keyed
            .load()
            .values()
            .flat_map(|k| k.slots())
            .collect::<Vec<_>>();
        for slot in self.slots().into_iter().chain(keyed) {
            let fleet = fleet.clone();
            tokio::spawn(async move {
                if let Some(token) = slot.current() {
                    if let Some(value) = slot.bare_value(&token) {
                        let shared = fleet::SharedToken {
                            id: token.id,
                            value,
                            fetched_at: token.fetched_at,
                            expires_at: token.expires_at_wall,
                        };
                        let (p, key) = (&slot.config, slot.key_id());
                        if let Ok(true) = fleet.offer(p, key, &shared).await {
                            let _ = fleet.publish_changed(p, key).await;
                        }
                    }
                }
                slot.look_in_fleet();
            });
        }
    }

    /// `host:port` of the Redis node in use: `None` without `[store]` or before a
    /// Sentinel named the master.
    pub fn redis_node(&self) -> Option<String> {
        self.fleet.as_ref().and_then(|f| f.node())
    }

    /// Whether tokens are shared through Redis right now: `None` without `[store]`.
    pub fn fleet_up(&self) -> Option<bool> {
        self.fleet.as_ref().map(|f| f.is_up())
    }

    /// Stops every refresher.
    pub fn stop(&self) {
        self.root.cancel();
    }

    /// Adopts the providers of a reloaded `config`: unchanged ones keep their slot
    /// and token, changed and new ones get a fresh slot, removed ones stop. Reads the
    /// token cache for new slots, so call it off the async runtime (with a runtime
    /// handle entered, for spawning).
    pub fn apply(&self, config: &Config) -> ProviderChanges {
        let old = self.slots.load_full();
        let mut changes = ProviderChanges::default();
        let mut next = Slots::new();
        let mut fresh = Vec::new();
        self.apply_keyed(config, &mut changes);
        for (name, provider) in &config.providers {
            if provider.keys.is_some() {
                continue;
            }
            match old.get(name) {
                Some(slot) if *slot.config == **provider => {
                    changes.kept.push(name.clone());
                    next.insert(name.clone(), slot.clone());
                }
                _ => {
                    let slot = Arc::new(ProviderSlot::new(
                        provider.clone(),
                        self.settings.clone(),
                        self.root.child_token(),
                    ));
                    self.load_cached(&slot);
                    changes.started.push(name.clone());
                    fresh.push(slot.clone());
                    next.insert(name.clone(), slot);
                }
            }
        }
        self.slots.store(Arc::new(next));
        for slot in &fresh {
            self.spawn(slot);
        }
        for (name, slot) in old.iter() {
            let replaced = self
                .slots
                .load()
                .get(name)
                .is_none_or(|now| !Arc::ptr_eq(now, slot));
            if replaced {
                slot.stop();
                if !config.providers.contains_key(name) {
                    changes.stopped.push(name.clone());
                }
            }
        }
        changes
    }

    /// The keyed part of [`TokenStore::apply`]: an unchanged keyed provider keeps its
    /// keys and tokens; a changed one starts empty.
    fn apply_keyed(&self, config: &Config, changes: &mut ProviderChanges) {
        let old = self.keyed.load_full();
        let mut next = BTreeMap::new();
        for (name, provider) in &config.providers {
            match old.get(name) {
                Some(keyed) if *keyed.config == **provider => {
                    changes.kept.push(name.clone());
                    next.insert(name.clone(), keyed.clone());
                }
                _ => {
                    if let Some(keyed) = KeyedProvider::new(
                        provider.clone(),
                        self.settings.clone(),
                        self.ingredients.clone(),
                        self.root.child_token(),
                    ) {
                        changes.started.push(name.clone());
                        next.insert(name.clone(), keyed);
                    }
                }
            }
        }
        for (name, keyed) in old.iter() {
            if next.get(name).is_none_or(|now| !Arc::ptr_eq(now, keyed)) {
                keyed.stop();
                if !config.providers.contains_key(name) {
                    changes.stopped.push(name.clone());
                }
            }
        }
        self.keyed.store(Arc::new(next));
    }

    /// The slot of provider `name`.
    pub fn slot(&self, name: &str) -> Option<Arc<ProviderSlot>> {
        self.slots.load().get(name).cloned()
    }

    /// All slots of providers without `key_header`, by provider name.
    pub fn slots(&self) -> Vec<Arc<ProviderSlot>> {
        self.slots.load().values().cloned().collect()
    }

    /// The keyed provider `name` (one with `key_header`).
    pub fn keyed(&self, name: &str) -> Option<Arc<KeyedProvider>> {
        self.keyed.load().get(name).cloned()
    }

    /// Every keyed provider, by name.
    pub fn keyed_providers(&self) -> Vec<Arc<KeyedProvider>> {
        self.keyed.load().values().cloned().collect()
    }
}

/// One token for `provider` (for its key `key` if keyed) outside a running proxy:
/// the cached one while the proxy would not be refreshing it yet, else one fetched
/// now, checked as the proxy checks it, and written to the cache. The fleet store
/// is not used.
pub async fn one_token(
    config: &Config,
    provider: Arc<ProviderConfig>,
    key: Option<KeyBinding>,
    client: TokenClient,
    cache: Option<TokenCache>,
) -> Result<Secret, crate::provider::FetchError> {
    let settings = Arc::new(StoreSettings::new(config, Arc::new(Metrics::new())));
    let mut slot = ProviderSlot::new(provider, settings, CancellationToken::new());
    if let Some(key) = key {
        slot = slot.with_key(key);
    }
    refresh::once(&slot, &client, cache.as_ref()).await
}

#[cfg(test)]
mod tests;
