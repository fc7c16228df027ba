//! Sharing each provider's token with a fleet of proxies through Redis (`[store]`).
//!
//! Redis holds one encrypted token per provider (its TTL is the token's expiry) and a
//! short lock. The instance holding the lock fetches; the others wait for its token
//! (woken by pub/sub, polling as a fallback) instead of fetching. Any Redis failure is
//! reported to the caller, which falls back to fetching on its own: nothing fails
//! because Redis is away. Requests never touch Redis: they read the slot's local copy.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::redis_link::{explain, RedisLink};
use super::seal::{Sealer, Unusable};
use crate::config::{ProviderConfig, RedisConfig};
use crate::metrics::Metrics;
use crate::secret::Secret;
use crate::unix_time;

/// A Redis problem: the caller falls back to its own memory store.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("redis: {0}")]
    Redis(String),
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("another proxy held the token lock for too long")]
    LockHeld,
}

/// A token as the fleet shares it.
pub struct SharedToken {
    /// Random per fetched token, the same on every instance.
    pub id: u64,
    pub value: Secret,
    pub fetched_at: SystemTime,
    pub expires_at: SystemTime,
}

/// What is stored in Redis: the token sealed with AES-256-GCM under a key derived
/// from the provider's client secret, so a reader of Redis without the credentials
/// learns nothing usable, and a writer cannot change a thing (id and times are
/// associated data). `id` stays readable for the invalidation script.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Sealed {
    v: u8,
    id: String,
    fetched_at_ms: u64,
    expires_at_ms: u64,
    nonce: String,
    ciphertext: String,
}

const FORMAT: u8 = 2;

/// An event from another instance.
#[derive(Debug, PartialEq, Eq)]
pub enum FleetEvent {
    /// A new token for (provider, fingerprint) is in Redis.
    Changed { provider: String, fp: String },
    /// The token `id` of (provider, fingerprint) was rejected by its upstream.
    Invalidated {
        provider: String,
        fp: String,
        id: u64,
    },
}

/// The Redis side of the token store.
pub struct Fleet {
    link: RedisLink,
    conn: tokio::sync::Mutex<Option<ConnectionManager>>,
    prefix: String,
    timeout: Duration,
    up: AtomicBool,
    /// Woken when commands work again after failing, so the listener can offer and
    /// adopt tokens even if its own subscription never broke.
    back: tokio::sync::Notify,
    metrics: Arc<Metrics>,
    /// Per token key, a digest of the last unusable value logged (log it once).
    unusable_seen: std::sync::Mutex<std::collections::HashMap<String, [u8; 32]>>,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// Short provider tag used in key names: name plus fingerprint prefix (of the key's
/// id too for a keyed provider, so names never reveal the key).
pub fn provider_tag(p: &ProviderConfig, key_id: Option<&str>) -> (String, String) {
    (p.name.clone(), p.fingerprint_for(key_id).tag().to_owned())
}

/// Builds the Redis clients for `config` without connecting, as [`Fleet::new`] does:
/// the startup checks run it so `check` refuses what `run` would.
pub fn preflight(config: &RedisConfig) -> Result<(), FleetError> {
    RedisLink::new(config).map(drop)
}

impl Fleet {
    /// Prepares the Redis client (no connection yet: Redis may be down at startup).
    /// Reads the system roots with `redis_ca_file`: call off the async runtime.
    pub fn new(
        config: &RedisConfig,
        timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Result<Self, FleetError> {
        let link = RedisLink::new(config)?;
        metrics.set_redis_up(true);
        Ok(Self {
            link,
            conn: tokio::sync::Mutex::new(None),
            prefix: config.key_prefix.clone(),
            timeout,
            up: AtomicBool::new(true),
            back: tokio::sync::Notify::new(),
            metrics,
            unusable_seen: Default::default(),
        })
    }

    /// True while the last Redis command succeeded.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// `host:port` of the Redis node in use, when known.
    pub fn node(&self) -> Option<String> {
        self.link.node()
    }

    fn mark(&self, up: bool, why: Option<&FleetError>) {
        if self.up.swap(up, Ordering::AcqRel) != up {
            self.metrics.set_redis_up(up);
            let node = self.node().unwrap_or_default();
            match why {
                None => {
                    tracing::info!(
                        %node,
                        "redis is back: tokens are shared with the fleet again"
                    );
                    self.back.notify_waiters();
                }
                Some(error) => tracing::warn!(
                    %node,
                    %error,
                    "redis unavailable: each proxy keeps and fetches its own tokens until it returns"
                ),
            }
        }
    }

    async fn connection(&self) -> Result<ConnectionManager, FleetError> {
        let mut guard = self.conn.lock().await;
        if let Some(conn) = guard.as_ref() {
            return Ok(conn.clone());
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let client = self.link.client(self.timeout * 2).await?;
        let conn = tokio::time::timeout(
            self.timeout * 2,
            ConnectionManager::new_with_config(client, config),
        )
        .await
        .map_err(|_| FleetError::Timeout(self.timeout))?
        .map_err(|e| FleetError::Redis(explain(&e)))?;
        *guard = Some(conn.clone());
        Ok(conn)
    }

    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, FleetError> {
        let result = async {
            let mut conn = self.connection().await?;
            tokio::time::timeout(self.timeout, cmd.query_async::<T>(&mut conn))
                .await
                .map_err(|_| FleetError::Timeout(self.timeout))?
                .map_err(|e| FleetError::Redis(explain(&e)))
        }
        .await;
        if result.is_err() && self.link.follows_sentinels() {
            // The master may have moved (a failover): ask the Sentinels again next time
            // rather than letting the connection manager retry the old address.
            *self.conn.lock().await = None;
        }
        self.mark(result.is_ok(), result.as_ref().err());
        result
    }

    fn token_key(&self, p: &ProviderConfig, key_id: Option<&str>) -> String {
        let (name, fp) = provider_tag(p, key_id);
        format!("{}token:{name}:{fp}", self.prefix)
    }

    fn lock_key(&self, p: &ProviderConfig, key_id: Option<&str>) -> String {
        let (name, fp) = provider_tag(p, key_id);
        format!("{}lock:{name}:{fp}", self.prefix)
    }

    fn channel(&self) -> String {
        format!("{}events", self.prefix)
    }

    /// The fleet's current token for `p`, if there is a usable one. A value that
    /// does not open or whose times are implausible counts as none (the caller
    /// fetches and overwrites it), and is logged once.
    pub async fn read(
        &self,
        p: &ProviderConfig,
        key_id: Option<&str>,
    ) -> Result<Option<SharedToken>, FleetError> {
        let key = self.token_key(p, key_id);
        let raw: Option<String> = self.query(redis::cmd("GET").arg(&key)).await?;
        let Some(raw) = raw else {
            return Ok(None);
        };
        match open(p, key_id, &key, &raw, SystemTime::now()) {
            Ok(token) => Ok(Some(token)),
            Err(Unusable::Expired) => Ok(None),
            Err(why) => {
                self.report_unusable(p, &key, &raw, why);
                Ok(None)
            }
        }
    }

    /// Warns about an unusable stored value the first time this process sees it.
    fn report_unusable(&self, p: &ProviderConfig, key: &str, raw: &str, why: Unusable) {
        let digest: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest(raw.as_bytes()).into();
        let first = self
            .unusable_seen
            .lock()
            .map(|mut seen| seen.insert(key.to_owned(), digest) != Some(digest))
            .unwrap_or(true);
        if first {
            tracing::warn!(
                provider = %p.name,
                reason = %why,
                "the token stored in Redis is unusable: {why}; ignoring it and fetching a new one"
            );
        }
    }

    /// Stores `t` with a Redis TTL ending at its expiry; `only_if_absent` for NX.
    pub async fn write(
        &self,
        p: &ProviderConfig,
        key_id: Option<&str>,
        t: &SharedToken,
        only_if_absent: bool,
    ) -> Result<bool, FleetError> {
        let key = self.token_key(p, key_id);
        let sealed =
            seal(p, key_id, &key, t).ok_or_else(|| FleetError::Redis("cannot encrypt".into()))?;
        let expires_ms = unix_time::millis(t.expires_at);
        let mut cmd = redis::cmd("SET");
        cmd.arg(&key).arg(sealed).arg("PXAT").arg(expires_ms);
        if only_if_absent {
            cmd.arg("NX");
        }
        let set: Option<String> = self.query(&cmd).await?;
        Ok(set.is_some())
    }

    /// Offers this instance's token `t` after a (re)connection: stored when Redis has
    /// none for `p`, or only one that expires earlier (e.g. the one a promoted replica
    /// kept, while this instance fetched a newer one during the outage). Returns
    /// true when stored; the caller then tells the fleet, which adopts the
    /// longer-lived token, so the fleet converges without a fetch.
    pub async fn offer(
        &self,
        p: &ProviderConfig,
        key_id: Option<&str>,
        t: &SharedToken,
    ) -> Result<bool, FleetError> {
        // The decision rests on the stored value as `open` authenticates it, never on
        // its clear fields (anyone who can write to Redis could set those). The
        // script then replaces exactly the bytes that were judged, so a value written
        // meanwhile by another instance is left alone.
        const SCRIPT: &str = "local v = redis.call('GET', KEYS[1]) \
             if (v or '') ~= ARGV[3] then return 0 end \
             redis.call('SET', KEYS[1], ARGV[1], 'PXAT', ARGV[2]) \
             return 1";
        let key = self.token_key(p, key_id);
        let raw: Option<String> = self.query(redis::cmd("GET").arg(&key)).await?;
        let raw = raw.unwrap_or_default();
        if !raw.is_empty() {
            match open(p, key_id, &key, &raw, SystemTime::now()) {
                Ok(stored) if stored.expires_at >= t.expires_at => return Ok(false),
                Ok(_) | Err(Unusable::Expired) => {}
                Err(why) => self.report_unusable(p, &key, &raw, why),
            }
        }
        let sealed =
            seal(p, key_id, &key, t).ok_or_else(|| FleetError::Redis("cannot encrypt".into()))?;
        let expires_ms = unix_time::millis(t.expires_at);
        let stored: i64 = self
            .query(
                redis::cmd("EVAL")
                    .arg(SCRIPT)
                    .arg(1)
                    .arg(&key)
                    .arg(sealed)
                    .arg(expires_ms)
                    .arg(&raw),
            )
            .await?;
        Ok(stored == 1)
    }

    /// Takes the fetch lock for `p` for `ttl`, owned by `owner`.
    pub async fn try_lock(
        &self,
        p: &ProviderConfig,
        key_id: Option<&str>,
        owner: &str,
        ttl: Duration,
    ) -> Result<bool, FleetError> {
        let set: Option<String> = self
            .query(
                redis::cmd("SET")
                    .arg(self.lock_key(p, key_id))
                    .arg(owner)
                    .arg("NX")
                    .arg("PX")
                    .arg(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)),
            )
            .await?;
        Ok(set.is_some())
    }

    /// Releases the lock only if `owner` still holds it (it may have expired and
    /// been taken by another instance meanwhile).
    pub async fn unlock(
        &self,
        p: &ProviderConfig,
        key_id: Option<&str>,
        owner: &str,
    ) -> Result<(), FleetError> {
        const SCRIPT: &str =
            "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end";
        let _: i64 = self
            .query(
                redis::cmd("EVAL")
                    .arg(SCRIPT)
                    .arg(1)
                    .arg(self.lock_key(p, key_id))
                    .arg(owner),
            )
            .await?;
        Ok(())
    }

    /// Deletes the fleet's token only if it is still token `id`, and tells the fleet.
    pub async fn invalidate(
        &self,
        p: &ProviderConfig,
        key_id: Option<&str>,
        id: u64,
    ) -> Result<bool, FleetError> {
        const SCRIPT: &str = "local v = redis.call('GET', KEYS[1]) \
             if not v then return 0 end \
             local ok, doc = pcall(cjson.decode, v) \
             if not ok or type(doc) ~= 'table' or doc['id'] == ARGV[1] then return redis.call('DEL', KEYS[1]) end \
             return 0";
        let deleted: i64 = self
            .query(
                redis::cmd("EVAL")
                    .arg(SCRIPT)
                    .arg(1)
                    .arg(self.token_key(p, key_id))
                    .arg(id.to_string()),
            )
            .await?;
        let (name, fp) = provider_tag(p, key_id);
        self.publish(&format!("invalidated {name} {fp} {id}"))
            .await?;
        Ok(deleted == 1)
    }

    /// Tells the fleet a new token for `p` is in Redis.
    pub async fn publish_changed(
        &self,
        p: &ProviderConfig,
        key_id: Option<&str>,
    ) -> Result<(), FleetError> {
        let (name, fp) = provider_tag(p, key_id);
        self.publish(&format!("changed {name} {fp}")).await
    }

    async fn publish(&self, message: &str) -> Result<(), FleetError> {
        let _: i64 = self
            .query(redis::cmd("PUBLISH").arg(self.channel()).arg(message))
            .await?;
        Ok(())
    }

    /// Delivers fleet events to `on_event` until `cancel`, reconnecting after Redis
    /// outages; `on_connect` runs after every (re)subscription and whenever commands
    /// work again after failing.
    pub async fn listen(
        self: Arc<Self>,
        cancel: CancellationToken,
        on_event: impl Fn(FleetEvent) + Send,
        on_connect: impl Fn() + Send,
    ) {
        loop {
            let connected = tokio::time::timeout(self.timeout * 4, async {
                let client = self.link.client(self.timeout * 2).await?;
                let mut pubsub = client
                    .get_async_pubsub()
                    .await
                    .map_err(|e| FleetError::Redis(explain(&e)))?;
                pubsub
                    .subscribe(self.channel())
                    .await
                    .map_err(|e| FleetError::Redis(explain(&e)))?;
                Ok::<_, FleetError>(pubsub)
            })
            .await;
            if let Ok(Ok(mut pubsub)) = connected {
                tracing::debug!("subscribed to fleet events");
                on_connect();
                let mut messages = pubsub.on_message();
                // While commands fail but the subscription holds, look for Redis
                // answering again rather than waiting for the next refresh.
                let mut probe = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        () = self.back.notified() => on_connect(),
                        _ = probe.tick(), if !self.is_up() => {
                            if self.query::<String>(&redis::cmd("PING")).await.is_ok() {
                                on_connect();
                            }
                        }
                        message = messages.next() => match message {
                            Some(message) => {
                                let text: String = message.get_payload().unwrap_or_default();
                                if let Some(event) = parse_event(&text) {
                                    on_event(event);
                                }
                            }
                            None => break,
                        },
                    }
                }
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }
}

fn parse_event(text: &str) -> Option<FleetEvent> {
    let mut parts = text.split(' ');
    let kind = parts.next()?;
    let provider = parts.next()?.to_owned();
    let fp = parts.next()?.to_owned();
    match kind {
        "changed" => Some(FleetEvent::Changed { provider, fp }),
        "invalidated" => Some(FleetEvent::Invalidated {
            provider,
            fp,
            id: parts.next()?.parse().ok()?,
        }),
        _ => None,
    }
}

/// The associated data: the Redis key (so a value cannot move to another provider's
/// key) and every field stored in the clear.
fn associated(key: &str, id: &str, fetched_at_ms: u64, expires_at_ms: u64) -> Vec<u8> {
    format!("{key}\n{id}\n{fetched_at_ms}\n{expires_at_ms}").into_bytes()
}

/// Seals `t` for the Redis key `key` (of `p`'s key `key_id` for a keyed provider).
pub fn seal(
    p: &ProviderConfig,
    key_id: Option<&str>,
    key: &str,
    t: &SharedToken,
) -> Option<String> {
    let id = t.id.to_string();
    let (fetched_at_ms, expires_at_ms) = (
        unix_time::millis(t.fetched_at),
        unix_time::millis(t.expires_at),
    );
    let (nonce, ciphertext) = Sealer::new(p, key_id, "redis").seal(
        &associated(key, &id, fetched_at_ms, expires_at_ms),
        t.value.expose().as_bytes(),
    )?;
    serde_json::to_string(&Sealed {
        v: FORMAT,
        id,
        fetched_at_ms,
        expires_at_ms,
        nonce,
        ciphertext,
    })
    .ok()
}

/// Opens a value read from the Redis key `key`, checking its times against `now`.
/// Any value, however made, gets a token or a reason.
pub fn open(
    p: &ProviderConfig,
    key_id: Option<&str>,
    key: &str,
    raw: &str,
    now: SystemTime,
) -> Result<SharedToken, Unusable> {
    let sealed: Sealed = serde_json::from_str(raw).map_err(|_| Unusable::Format)?;
    if sealed.v != FORMAT {
        return Err(Unusable::Format);
    }
    let (value, fetched_at, expires_at) = Sealer::new(p, key_id, "redis").open_token(
        &associated(key, &sealed.id, sealed.fetched_at_ms, sealed.expires_at_ms),
        &sealed.nonce,
        &sealed.ciphertext,
        sealed.fetched_at_ms,
        sealed.expires_at_ms,
        now,
    )?;
    Ok(SharedToken {
        id: sealed.id.parse().map_err(|_| Unusable::Format)?,
        value,
        fetched_at,
        expires_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip() {
        assert_eq!(
            parse_event("changed wll 0123456789abcdef"),
            Some(FleetEvent::Changed {
                provider: "wll".into(),
                fp: "0123456789abcdef".into()
            })
        );
        assert_eq!(
            parse_event("invalidated wll ab 42"),
            Some(FleetEvent::Invalidated {
                provider: "wll".into(),
                fp: "ab".into(),
                id: 42
            })
        );
        assert_eq!(parse_event("bogus"), None);
    }
}
