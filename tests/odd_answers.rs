//! Property test of the refresher itself: a real mock issuer answers generated
//! bodies (numbers at the edges, NaN-ish strings, wrong types, JWTs and absolute
//! expiries holding such values) to a real token store, and afterwards every
//! provider is alive: serving a token with a sane expiry, or retrying, and it takes
//! a good answer as soon as one comes.

use std::time::{Duration, SystemTime};

use base64::Engine;
use bearer_proxy::provider::MAX_LIFETIME;
use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, TestCaseError, TestRunner};

use crate::support::*;

/// A JSON value at the edges of what an issuer might put where a time belongs.
fn odd_value() -> impl Strategy<Value = String> {
    let edges = prop::sample::select(vec![
        "1e308",
        "-1e308",
        "1e20",
        "-1e20",
        "-0",
        "0",
        "-0.0",
        "1",
        "0.5",
        "1e-300",
        "18446744073709551615",
        "18446744073709551616",
        "99999999999999999999999999999",
        "-9223372036854775808",
        "3.4e38",
        "1.7976931348623157e308",
        "4e11",
        "253402300800",
        "\"NaN\"",
        "\"nan\"",
        "\"inf\"",
        "\"-Infinity\"",
        "\"1e20\"",
        "\"-0\"",
        "\"\"",
        "\" \"",
        "\"9999-12-31T23:59:59Z\"",
        "\"0000-01-01T00:00:00\"",
        "\"2030-03-16T15:15:02\"",
        "\"2030-03-16T15:15:02.1234567\"",
        "\"2030-02-30T25:61:61\"",
        "\"+275760-09-13T00:00:00Z\"",
        "\"1970-01-01T00:00:00Z\"",
        "true",
        "false",
        "null",
        "[]",
        "[1e20]",
        "{}",
        "{\"exp\":1}",
    ])
    .prop_map(str::to_owned);
    let soon = |secs: i64| {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        (now + secs).to_string()
    };
    prop_oneof![
        4 => edges,
        1 => any::<f64>().prop_map(|f| serde_json::json!(f).to_string()),
        1 => any::<i64>().prop_map(|i| i.to_string()),
        1 => any::<u64>().prop_map(|i| i.to_string()),
        1 => (-7200i64..2 * 365 * 86_400).prop_map(soon),
        1 => "[ -~]{0,24}".prop_map(|s| serde_json::json!(s).to_string()),
    ]
}

/// A JWT whose payload's `exp` is `exp` (any JSON value).
fn jwt(exp: &str) -> String {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    format!(
        "{}.{}.sig",
        b64.encode(r#"{"alg":"none"}"#),
        b64.encode(format!(r#"{{"exp":{exp}}}"#))
    )
}

/// One odd answer: which provider gets it, and its body.
#[derive(Debug, Clone)]
enum Answer {
    /// `access_token` + `expires_in` (provider `p`).
    ExpiresIn(String),
    /// A JWT and no `expires_in`: its `exp` claim counts (provider `p`).
    JwtExp(String),
    /// Loyalife's `results.tokenExpiresOn` (provider `l`).
    ExpiresAt(String),
    /// The token field itself holds the odd value (provider `p`).
    Token(String),
    /// Any text at all (provider `p`).
    Raw(String),
}

impl Answer {
    fn provider(&self) -> &'static str {
        match self {
            Self::ExpiresAt(_) => "l",
            _ => "p",
        }
    }

    fn body(&self) -> String {
        match self {
            Self::ExpiresIn(v) => format!(r#"{{"access_token":"odd","expires_in":{v}}}"#),
            Self::JwtExp(v) => format!(r#"{{"access_token":"{}"}}"#, jwt(v)),
            Self::ExpiresAt(v) => {
                format!(r#"{{"results":{{"token":"odd","tokenExpiresOn":{v}}}}}"#)
            }
            Self::Token(v) => format!(r#"{{"access_token":{v},"expires_in":3600}}"#),
            Self::Raw(text) => text.clone(),
        }
    }
}

fn answer() -> impl Strategy<Value = Answer> {
    prop_oneof![
        3 => odd_value().prop_map(Answer::ExpiresIn),
        3 => odd_value().prop_map(Answer::JwtExp),
        3 => odd_value().prop_map(Answer::ExpiresAt),
        1 => odd_value().prop_map(Answer::Token),
        1 => "\\PC{0,64}".prop_map(Answer::Raw),
    ]
}

struct Bench {
    proxy: Proxy,
    oauth2: Issuer,
    loyalife: Issuer,
}

impl Bench {
    async fn start() -> Self {
        let oauth2 = Issuer::start_named(Dialect::OAuth2, "good").await;
        let loyalife = Issuer::start_named(Dialect::Loyalife, "good").await;
        let upstream = Upstream::start().await;
        let provider =
            |issuer: &Issuer| ProviderSection::new(&issuer.url(), "id", "test-secret-value");
        let mut config = TestConfig::default()
            .server(|s| s.token_wait("2s"))
            .with_provider("p", provider(&oauth2))
            .with_provider("l", provider(&loyalife).loyalife())
            .route(RouteSection::to(&upstream.url(), "p").path_prefix("/p"))
            .route(RouteSection::to(&upstream.url(), "l").path_prefix("/l"))
            .parse();
        // Short backoff: a failing provider retries within tens of milliseconds.
        config.tuning.backoff_base = Duration::from_millis(10);
        config.tuning.backoff_max = Duration::from_millis(50);
        let proxy = Proxy::start_exact(config).await;
        Self {
            proxy,
            oauth2,
            loyalife,
        }
    }

    fn issuer(&self, provider: &str) -> &Issuer {
        if provider == "l" {
            &self.loyalife
        } else {
            &self.oauth2
        }
    }

    /// Serves `answer` once to its provider, then checks the provider is alive.
    async fn check(&self, answer: &Answer) -> Result<(), String> {
        let name = answer.provider();
        let slot = self.proxy.store.slot(name).unwrap();
        let issuer = self.issuer(name);
        let within = Duration::from_secs(10);
        if !eventually(within, || good(&slot)).await {
            return Err(format!("{name} holds no good token before the case"));
        }
        let before = slot.status().fetches;
        issuer.set_fault(Fault::Status(200, answer.body()));
        // Drop the good token so the refresher fetches now, and meets the odd answer.
        if let Some(token) = slot.current() {
            slot.invalidate(token.generation);
        }
        // A restart ends the wait at once: a panicking refresher never finishes a
        // fetch, and waiting out `within` per case would make shrinking take hours.
        if !eventually(within, || {
            let s = slot.status();
            s.restarts != 0 || s.fetches > before && !s.fetching
        })
        .await
        {
            return Err(format!("{name}: no fetch finished: {:?}", slot.status()));
        }
        let status = slot.status();
        if status.restarts != 0 {
            return Err(format!(
                "{name}: the refresher had to be restarted: {status:?}"
            ));
        }
        match slot.current() {
            Some(token) => {
                let left = token
                    .expires_at_wall
                    .duration_since(SystemTime::now())
                    .map_err(|_| format!("{name}: serving an expired token"))?;
                if left > MAX_LIFETIME || token.refresh_at > token.expires_at {
                    return Err(format!("{name}: insane schedule: {token:?}"));
                }
            }
            None => {
                if status.last_error.is_none() || status.next_attempt.is_none() {
                    return Err(format!(
                        "{name}: no token, and no retry planned: {status:?}"
                    ));
                }
            }
        }
        // Alive: the next good answer is taken.
        issuer.set_fault(Fault::None);
        if let Some(token) = slot.current() {
            slot.invalidate(token.generation);
        }
        if !eventually(within, || good(&slot)).await {
            return Err(format!("{name}: did not recover: {:?}", slot.status()));
        }
        Ok(())
    }
}

/// The slot holds one of the issuer's good tokens.
fn good(slot: &bearer_proxy::token::ProviderSlot) -> bool {
    slot.current().is_some_and(|t| {
        t.header_value()
            .to_str()
            .is_ok_and(|v| v.starts_with("Bearer good-"))
    })
}

#[test]
fn no_token_endpoint_answer_stops_a_provider() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let bench = rt.block_on(Bench::start());
    let mut runner = TestRunner::new(RunnerConfig {
        cases: 128,
        failure_persistence: None,
        // Each shrink step runs a real fetch; a bounded number keeps a failure quick to report.
        max_shrink_iters: 64,
        ..RunnerConfig::default()
    });
    let result = runner.run(&answer(), |answer| {
        rt.block_on(bench.check(&answer))
            .map_err(TestCaseError::fail)
    });
    rt.block_on(bench.proxy.stop());
    if let Err(e) = result {
        panic!("{e}");
    }
}
