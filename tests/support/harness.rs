//! The usual test bench in one call: a mock issuer, an echo upstream and a proxy whose
//! config starts from `TestConfig::basic` and is edited by type.

use std::time::Duration;

use super::{client, get, Answer, Dialect, Issuer, Proxy, TestConfig, Upstream};

/// An issuer and an upstream, before a proxy: set faults or delays that must hold from
/// the proxy's first fetch, then call `proxy`.
pub struct Servers {
    pub issuer: Issuer,
    pub upstream: Upstream,
}

impl Servers {
    pub async fn start(dialect: Dialect) -> Self {
        Self {
            issuer: Issuer::start(dialect).await,
            upstream: Upstream::start().await,
        }
    }

    /// The basic config for these servers (provider `p`, one catch-all route).
    pub fn config(&self) -> TestConfig {
        TestConfig::basic(&self.issuer, &self.upstream)
    }

    /// Starts a proxy on the basic config as `edit` changes it.
    pub async fn proxy(self, edit: impl FnOnce(TestConfig) -> TestConfig) -> Harness {
        let config = edit(self.config());
        let proxy = Proxy::start_with(&config).await;
        Harness {
            issuer: self.issuer,
            upstream: self.upstream,
            proxy,
            config,
        }
    }

    /// Like `proxy`, with token backoff from `base` doubling up to `max`.
    pub async fn proxy_tuned(
        self,
        base: Duration,
        max: Duration,
        edit: impl FnOnce(TestConfig) -> TestConfig,
    ) -> Harness {
        let config = edit(self.config());
        let proxy = Proxy::start_tuned(&config.render(), base, max).await;
        Harness {
            issuer: self.issuer,
            upstream: self.upstream,
            proxy,
            config,
        }
    }
}

/// A running issuer, upstream and proxy.
pub struct Harness {
    pub issuer: Issuer,
    pub upstream: Upstream,
    pub proxy: Proxy,
    /// The config the proxy was started from.
    pub config: TestConfig,
}

impl Harness {
    /// An OAuth2 issuer, an upstream, and a proxy on the basic config.
    pub async fn start() -> Self {
        Self::with(|c| c).await
    }

    /// An OAuth2 issuer, an upstream, and a proxy on the basic config as `edit` changes it.
    pub async fn with(edit: impl FnOnce(TestConfig) -> TestConfig) -> Self {
        Servers::start(Dialect::OAuth2).await.proxy(edit).await
    }

    /// A URL on the proxy's main listener.
    pub fn url(&self, path: &str) -> String {
        self.proxy.url(path)
    }

    /// `GET path` through the proxy on a fresh client.
    pub async fn get(&self, path: &str) -> Answer {
        get(&client(), &self.url(path)).await
    }

    /// Stops the proxy and waits for it to drain.
    pub async fn stop(self) {
        self.proxy.stop().await;
    }
}
