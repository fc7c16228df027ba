//! Keyed providers (`key_header`): one token per member or tenant.
//!
//! A keyed provider is a map from key to an ordinary [`ProviderSlot`] whose
//! [`KeyBinding`] fills `{key}` into the token request, so every key gets the
//! store's single flight, refresh ahead, backoff and invalidation unchanged. Slots
//! are created by the first request for a key, stop refreshing once the key is idle
//! for `key_idle`, leave when their token expires, and the least recently used one
//! is dropped past `max_keys`.
//!
//! Keys are personal data: they never leave this module except into the token
//! request. Files, Redis names and fleet events use [`KeyBinding::id`], an
//! HMAC-SHA256 of the key under a key derived from the provider's client secret.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock, Weak};

use hmac::digest::KeyInit;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{refresh, ProviderSlot, StoreSettings};
use crate::config::{KeyConfig, ProviderConfig};
use crate::secret::Secret;

/// Shards of the key map: lookups take one shard's read lock, so requests for
/// different keys never wait on each other.
const SHARDS: usize = 16;

type Shard = RwLock<HashMap<Box<str>, Arc<ProviderSlot>>>;

/// The key a slot's token is bound to: the per-slot input of a keyed provider.
pub struct KeyBinding {
    value: Secret,
    /// Keyed hash of the value (hex): names files and Redis keys.
    id: Box<str>,
    /// The fleet tag (fingerprint prefix) of this key's token, for fleet events.
    tag: Box<str>,
    /// Milliseconds after the provider's epoch when a request last used the key.
    last_used: AtomicU64,
    owner: Weak<KeyedProvider>,
}

impl KeyBinding {
    /// Binds `value` for `config` (also used by `bearer-proxy token --key`).
    pub fn new(config: &ProviderConfig, value: &str) -> Self {
        Self::with_mac(config, &key_mac(config), value, Weak::new(), 0)
    }

    fn with_mac(
        config: &ProviderConfig,
        mac: &Hmac<Sha256>,
        value: &str,
        owner: Weak<KeyedProvider>,
        now_ms: u64,
    ) -> Self {
        let mut mac = mac.clone();
        mac.update(value.as_bytes());
        let digest = mac.finalize().into_bytes();
        let id = crate::config::fingerprint::hex(digest.get(..16).unwrap_or_default());
        let tag = config.fingerprint_for(Some(&id)).tag().to_owned();
        Self {
            value: Secret::new(value),
            id: id.into(),
            tag: tag.into(),
            last_used: AtomicU64::new(now_ms),
            owner,
        }
    }

    /// The key itself, for the token request only.
    pub fn value(&self) -> &Secret {
        &self.value
    }

    /// The keyed hash that stands for the key wherever it would be visible.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// True when no request used the key for `key_idle`: its token is no longer
    /// refreshed ahead. A key of a provider that is gone counts as idle.
    pub(super) fn is_idle(&self, now: Instant) -> bool {
        let Some(owner) = self.owner.upgrade() else {
            return true;
        };
        let unused_ms = owner
            .now_ms(now)
            .saturating_sub(self.last_used.load(Ordering::Relaxed));
        u128::from(unused_ms) >= owner.keys.idle.as_millis()
    }

    /// Takes the slot out of its provider's map if the key is still idle (its
    /// refresher then ends); false when a request just used the key again.
    pub(super) fn retire(&self, slot: &Arc<ProviderSlot>) -> bool {
        match self.owner.upgrade() {
            Some(owner) => owner.remove_if(self.value.expose(), slot, |now| self.is_idle(now)),
            None => true,
        }
    }
}

impl std::fmt::Debug for KeyBinding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyBinding").field("id", &self.id).finish()
    }
}

/// The HMAC keyed with a key derived from the provider's credentials, so the
/// ids of a low-entropy key space (member numbers) cannot be brute-forced back by
/// anyone without the credentials.
fn key_mac(config: &ProviderConfig) -> Hmac<Sha256> {
    let hk = hkdf::Hkdf::<Sha256>::new(
        Some(b"bearer-proxy/key-id/v1"),
        &config.credential_material(),
    );
    // One SHA-256 block: HMAC's natural key size, and a valid HKDF-SHA256 output length.
    let mut key = [0u8; 64];
    let _ = hk.expand(config.name.as_bytes(), &mut key);
    <Hmac<Sha256> as KeyInit>::new(&key.into())
}

/// What a keyed provider's slots add up to (for `/tokens` and metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeyCounts {
    /// Keys with a slot.
    pub held: usize,
    /// Keys with a valid token.
    pub valid: usize,
    /// Keys whose token request is under way.
    pub fetching: usize,
    /// Keys whose last token request failed.
    pub failing: usize,
}

/// One keyed provider: its key map and what it needs to start a key's refresher.
pub struct KeyedProvider {
    pub config: Arc<ProviderConfig>,
    keys: KeyConfig,
    shards: Box<[Shard]>,
    hasher: RandomState,
    held: AtomicUsize,
    mac: Hmac<Sha256>,
    epoch: Instant,
    settings: Arc<StoreSettings>,
    refresher: refresh::Ingredients,
    cancel: CancellationToken,
    this: Weak<KeyedProvider>,
}

impl KeyedProvider {
    /// `None` unless `config` has `key_header`.
    pub(super) fn new(
        config: Arc<ProviderConfig>,
        settings: Arc<StoreSettings>,
        refresher: refresh::Ingredients,
        cancel: CancellationToken,
    ) -> Option<Arc<Self>> {
        let keys = config.keys.clone()?;
        let mac = key_mac(&config);
        Some(Arc::new_cyclic(|this| Self {
            config,
            keys,
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
            hasher: RandomState::new(),
            held: AtomicUsize::new(0),
            mac,
            epoch: Instant::now(),
            settings,
            refresher,
            cancel,
            this: this.clone(),
        }))
    }

    /// The provider's name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// The key settings.
    pub fn keys(&self) -> &KeyConfig {
        &self.keys
    }

    fn now_ms(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX)
    }

    fn shard(&self, key: &str) -> &Shard {
        let index = usize::try_from(self.hasher.hash_one(key) % SHARDS as u64).unwrap_or(0);
        &self.shards[index]
    }

    /// The slot of `key`, created (and its refresher started) on first use; `None`
    /// when the key does not match `key_pattern`. Marks the key as in use.
    pub fn slot(&self, key: &str) -> Option<Arc<ProviderSlot>> {
        if !self.keys.pattern.accepts(key) {
            return None;
        }
        let now_ms = self.now_ms(Instant::now());
        let shard = self.shard(key);
        // The key is marked in use under the shard lock, so a refresher retiring an
        // idle key (under the write lock) never retires one a request just took.
        if let Some(slot) = shard
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
        {
            self.touch(slot, now_ms);
            return Some(slot.clone());
        }
        let (slot, created) = {
            let mut map = shard.write().unwrap_or_else(PoisonError::into_inner);
            match map.get(key) {
                Some(slot) => {
                    self.touch(slot, now_ms);
                    (slot.clone(), false)
                }
                None => {
                    let slot = Arc::new(self.new_slot(key, now_ms));
                    map.insert(key.into(), slot.clone());
                    (slot, true)
                }
            }
        };
        if created {
            self.refresher.spawn(&slot);
            if self.held.fetch_add(1, Ordering::AcqRel) + 1 > self.keys.max_keys {
                self.evict_least_recent(&slot);
            }
        }
        Some(slot)
    }

    fn touch(&self, slot: &ProviderSlot, now_ms: u64) {
        if let Some(binding) = slot.key() {
            let last = binding.last_used.swap(now_ms, Ordering::Relaxed);
            // Back from idle: the refresher may be waiting for the token to expire;
            // wake it so the key is refreshed ahead again.
            if u128::from(now_ms.saturating_sub(last)) >= self.keys.idle.as_millis() {
                slot.wake();
            }
        }
    }

    fn new_slot(&self, key: &str, now_ms: u64) -> ProviderSlot {
        let binding = KeyBinding::with_mac(&self.config, &self.mac, key, self.this.clone(), now_ms);
        ProviderSlot::new(
            self.config.clone(),
            self.settings.clone(),
            self.cancel.child_token(),
        )
        .with_key(binding)
    }

    /// Drops the least recently used key other than `keep` (O(keys), only when a new
    /// key pushes the count past `max_keys`).
    fn evict_least_recent(&self, keep: &Arc<ProviderSlot>) {
        let mut oldest: Option<(u64, Arc<ProviderSlot>)> = None;
        for shard in self.shards.iter() {
            let map = shard.read().unwrap_or_else(PoisonError::into_inner);
            for slot in map.values() {
                if Arc::ptr_eq(slot, keep) {
                    continue;
                }
                let used = slot
                    .key()
                    .map_or(0, |k| k.last_used.load(Ordering::Relaxed));
                if oldest.as_ref().is_none_or(|(at, _)| used < *at) {
                    oldest = Some((used, slot.clone()));
                }
            }
        }
        if let Some((_, slot)) = oldest {
            if let Some(binding) = slot.key() {
                tracing::debug!(provider = %self.config.name, key_id = %binding.id, "max_keys reached: dropping the least recently used key");
                self.remove_if(binding.value.expose(), &slot, |_| true);
            }
        }
    }

    /// Removes `slot` if it is still the one held for `key` and `cond` holds (checked
    /// under the shard's write lock), and stops its refresher. False when kept.
    fn remove_if(
        &self,
        key: &str,
        slot: &Arc<ProviderSlot>,
        cond: impl FnOnce(Instant) -> bool,
    ) -> bool {
        let removed = {
            let mut map = self
                .shard(key)
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            match map.get(key) {
                Some(held) if Arc::ptr_eq(held, slot) => {
                    if !cond(Instant::now()) {
                        return false;
                    }
                    map.remove(key).is_some()
                }
                _ => false,
            }
        };
        if removed {
            self.held.fetch_sub(1, Ordering::AcqRel);
        }
        slot.stop();
        true
    }

    /// Every key's slot (for fleet events and counts).
    pub(super) fn slots(&self) -> Vec<Arc<ProviderSlot>> {
        self.shards
            .iter()
            .flat_map(|shard| {
                shard
                    .read()
                    .unwrap_or_else(PoisonError::into_inner)
                    .values()
                    .cloned()
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// The slot whose fleet tag is `tag`, if this proxy holds that key.
    pub(super) fn slot_by_tag(&self, tag: &str) -> Option<Arc<ProviderSlot>> {
        self.shards.iter().find_map(|shard| {
            shard
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .values()
                .find(|slot| slot.key().is_some_and(|k| &*k.tag == tag))
                .cloned()
        })
    }

    /// How many keys are held, valid, fetching and failing.
    pub fn counts(&self) -> KeyCounts {
        let mut counts = KeyCounts::default();
        for shard in self.shards.iter() {
            let map = shard.read().unwrap_or_else(PoisonError::into_inner);
            for slot in map.values() {
                let status = slot.status();
                counts.held += 1;
                counts.valid += usize::from(slot.current().is_some());
                counts.fetching += usize::from(status.fetching);
                counts.failing += usize::from(status.last_error.is_some());
            }
        }
        counts
    }

    /// Stops every key's refresher.
    pub(super) fn stop(&self) {
        self.cancel.cancel();
    }
}
