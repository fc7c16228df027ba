//! Prometheus metrics: one registry, with per-route handles resolved ahead of time so
//! the request path touches only atomics.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: Arc<str>,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamErrorLabels {
    route: Arc<str>,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TunnelBytesLabels {
    route: Arc<str>,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FetchLabels {
    provider: Arc<str>,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KeyLabels {
    provider: Arc<str>,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProviderLabels {
    provider: Arc<str>,
}

type HistogramFamily = Family<RouteLabels, Histogram, fn() -> Histogram>;

fn duration_histogram() -> Histogram {
    // 0.5 ms .. ~16 s: a local hop is sub-millisecond, a slow upstream is seconds.
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// Every metric the proxy exports.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    duration: HistogramFamily,
    upstream_errors: Family<UpstreamErrorLabels, Counter>,
    replays: Family<RouteLabels, Counter>,
    in_flight: Gauge,
    tunnels_open: Gauge,
    tunnels: Family<RouteLabels, Counter>,
    tunnel_bytes: Family<TunnelBytesLabels, Counter>,
    token_fetches: Family<FetchLabels, Counter>,
    token_expires_in: Family<ProviderLabels, Gauge<f64, AtomicU64>>,
    token_invalidations: Family<ProviderLabels, Counter>,
    token_keys: Family<KeyLabels, Gauge>,
    refresher_restarts: Family<ProviderLabels, Counter>,
    redis_up: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("bearer_proxy");
        let requests = Family::<RequestLabels, Counter>::default();
        let duration =
            HistogramFamily::new_with_constructor(duration_histogram as fn() -> Histogram);
        let upstream_errors = Family::<UpstreamErrorLabels, Counter>::default();
        let replays = Family::<RouteLabels, Counter>::default();
        let in_flight = Gauge::default();
        let tunnels_open = Gauge::default();
        let tunnels = Family::<RouteLabels, Counter>::default();
        let tunnel_bytes = Family::<TunnelBytesLabels, Counter>::default();
        let token_fetches = Family::<FetchLabels, Counter>::default();
        let token_expires_in = Family::<ProviderLabels, Gauge<f64, AtomicU64>>::default();
        let token_invalidations = Family::<ProviderLabels, Counter>::default();
        let refresher_restarts = Family::<ProviderLabels, Counter>::default();
        let redis_up = Gauge::default();
        let token_keys = Family::<KeyLabels, Gauge>::default();
        registry.register(
            "requests",
            "Requests answered, by route and status",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from request to response headers, by route",
            duration.clone(),
        );
        registry.register(
            "upstream_errors",
            "Upstream failures (unreachable, timeout), by route",
            upstream_errors.clone(),
        );
        registry.register(
            "replays",
            "Requests replayed with a fresh token, by route",
            replays.clone(),
        );
        registry.register(
            "requests_in_flight",
            "Requests being handled now",
            in_flight.clone(),
        );
        registry.register(
            "tunnels_open",
            "Upgraded connections (WebSocket) joined to their upstream now",
            tunnels_open.clone(),
        );
        registry.register(
            "tunnels",
            "Upgraded connections (WebSocket) opened, by route",
            tunnels.clone(),
        );
        registry.register(
            "tunnel_bytes",
            "Bytes carried by closed tunnels, by route and direction (up: client to upstream, down: upstream to client)",
            tunnel_bytes.clone(),
        );
        registry.register(
            "token_fetches",
            "Token-endpoint calls by provider and outcome (ok, error); tokens from the disk cache (cached) or the fleet (shared)",
            token_fetches.clone(),
        );
        registry.register(
            "token_expires_in_seconds",
            "Seconds until the provider's current token expires (0: none)",
            token_expires_in.clone(),
        );
        registry.register(
            "token_invalidations",
            "Tokens dropped because the upstream rejected them",
            token_invalidations.clone(),
        );
        registry.register(
            "token_keys",
            "Keys of a keyed provider (key_header) by state: held (with a token or getting one), valid, fetching, failing",
            token_keys.clone(),
        );
        registry.register(
            "refresher_restarts",
            "Token refreshers that ended unexpectedly (a panic included) and were started again",
            refresher_restarts.clone(),
        );
        registry.register(
            "store_redis_up",
            "1 while the shared Redis store answers, 0 while this proxy falls back to memory (0 without a Redis [store])",
            redis_up.clone(),
        );
        Self {
            redis_up,
            registry,
            requests,
            duration,
            upstream_errors,
            replays,
            in_flight,
            tunnels_open,
            tunnels,
            tunnel_bytes,
            token_fetches,
            token_expires_in,
            token_invalidations,
            token_keys,
            refresher_restarts,
        }
    }

    /// Handles for one route, so requests never look up a label set.
    pub fn route(self: &Arc<Self>, route: &str) -> RouteMetrics {
        let route: Arc<str> = route.into();
        let labels = RouteLabels {
            route: route.clone(),
        };
        RouteMetrics {
            duration: self.duration.get_or_create_owned(&labels),
            replays: self.replays.get_or_create_owned(&labels),
            statuses: (0..STATUS_SLOTS).map(|_| OnceLock::new()).collect(),
            route,
            metrics: self.clone(),
        }
    }

    /// Counts a token fetch by outcome: `ok`, `error` or `cached`.
    pub fn token_fetch(&self, provider: &str, outcome: &'static str) {
        self.token_fetches
            .get_or_create(&FetchLabels {
                provider: provider.into(),
                outcome,
            })
            .inc();
    }

    /// Counts a token dropped on an upstream rejection.
    pub fn token_invalidated(&self, provider: &str) {
        self.token_invalidations
            .get_or_create(&ProviderLabels {
                provider: provider.into(),
            })
            .inc();
    }

    /// Counts a provider's refresher started again after it ended unexpectedly.
    pub fn refresher_restart(&self, provider: &str) {
        self.refresher_restarts
            .get_or_create(&ProviderLabels {
                provider: provider.into(),
            })
            .inc();
    }

    /// Shows a provider's restart counter at 0 before anything happens to it.
    pub fn provider_started(&self, provider: &str) {
        let _ = self.refresher_restarts.get_or_create(&ProviderLabels {
            provider: provider.into(),
        });
    }

    /// Sets a provider's seconds-to-expiry gauge (called at scrape time).
    pub fn set_token_expires_in(&self, provider: &str, seconds: f64) {
        self.token_expires_in
            .get_or_create(&ProviderLabels {
                provider: provider.into(),
            })
            .set(seconds);
    }

    /// Sets a keyed provider's key counts, one `(state, keys)` pair per `state` label
    /// (called at scrape time).
    pub fn set_token_keys(
        &self,
        provider: &str,
        counts: impl IntoIterator<Item = (&'static str, usize)>,
    ) {
        let provider: Arc<str> = provider.into();
        for (state, n) in counts {
            self.token_keys
                .get_or_create(&KeyLabels {
                    provider: provider.clone(),
                    state,
                })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    /// Records whether Redis answers.
    pub fn set_redis_up(&self, up: bool) {
        self.redis_up.set(i64::from(up));
    }

    /// The in-flight gauge.
    pub fn in_flight(&self) -> &Gauge {
        &self.in_flight
    }

    /// Counts a tunnel that has just been joined.
    pub fn tunnel_opened(&self, route: &Arc<str>) {
        self.tunnels_open.inc();
        self.tunnels
            .get_or_create(&RouteLabels {
                route: route.clone(),
            })
            .inc();
    }

    /// Counts a tunnel's end and the bytes it carried each way.
    pub fn tunnel_closed(&self, route: &Arc<str>, up: u64, down: u64) {
        self.tunnels_open.dec();
        for (direction, bytes) in [("up", up), ("down", down)] {
            self.tunnel_bytes
                .get_or_create(&TunnelBytesLabels {
                    route: route.clone(),
                    direction,
                })
                .inc_by(bytes);
        }
    }

    /// The Prometheus text exposition of everything.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Status codes 0..600 get one lazily created counter each.
const STATUS_SLOTS: usize = 600;

/// One route's metric handles.
pub struct RouteMetrics {
    route: Arc<str>,
    duration: Histogram,
    replays: Counter,
    statuses: Box<[OnceLock<Counter>]>,
    metrics: Arc<Metrics>,
}

impl RouteMetrics {
    /// Records one answered request.
    pub fn observe(&self, status: u16, seconds: f64, replayed: bool) {
        self.duration.observe(seconds);
        if replayed {
            self.replays.inc();
        }
        match self.statuses.get(usize::from(status)) {
            Some(slot) => slot.get_or_init(|| self.counter(status)).inc(),
            None => self.counter(status).inc(),
        };
    }

    fn counter(&self, status: u16) -> Counter {
        self.metrics.requests.get_or_create_owned(&RequestLabels {
            route: self.route.clone(),
            status,
        })
    }

    /// Records an upstream failure: `unreachable` or `timeout`.
    pub fn upstream_error(&self, kind: &'static str) {
        self.metrics
            .upstream_errors
            .get_or_create(&UpstreamErrorLabels {
                route: self.route.clone(),
                kind,
            })
            .inc();
    }
}
