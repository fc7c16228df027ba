//! The admin listener: `/healthz`, `/readyz`, `/metrics`, `/tokens`, `POST /reload`.
//! Nothing here ever shows a token or a secret: only states, times and counts.
//!
//! It is handed only what it serves ([`AdminState`]): the token store to read, the
//! metrics to encode and a handle that reloads; never the listeners or the proxy.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use serde_json::{json, Value};
use tokio::time::Instant;

use crate::answer::{self, text};
use crate::app::ReloadHandle;
use crate::metrics::Metrics;
use crate::token::{KeyCounts, ProviderSlot, TokenStore};

/// What the admin endpoints answer from.
#[derive(Clone)]
pub struct AdminState {
    /// Read for `/readyz` and `/tokens`, and for the token gauges in `/metrics`.
    pub store: Arc<TokenStore>,
    pub metrics: Arc<Metrics>,
    /// `POST /reload`.
    pub reload: ReloadHandle,
}

/// Answers one admin request. No endpoint reads a body, so any body type will do
/// (the listener passes hyper's; the tests pass none).
pub async fn handle<B>(
    state: AdminState,
    req: Request<B>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let response = match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n".to_owned(), "text/plain"),
        (&Method::GET, "/readyz") => readyz(&state),
        (&Method::GET, "/metrics") => metrics(&state),
        (&Method::GET, "/tokens") => tokens(&state),
        (&Method::POST, "/reload") => match state.reload.reload().await {
            Ok(report) => answer::json(
                StatusCode::OK,
                json!({
                    "reloaded": true,
                    "providers_kept": report.providers.kept,
                    "providers_started": report.providers.started,
                    "providers_stopped": report.providers.stopped,
                    "routes": report.routes,
                    "needs_restart": report.listener_changes,
                }),
            ),
            Err(error) => answer::json(
                StatusCode::UNPROCESSABLE_ENTITY,
                json!({"error": "reload_failed", "message": crate::error::chain(&error)}),
            ),
        },
        (_, "/healthz" | "/readyz" | "/metrics" | "/tokens" | "/reload") => answer::json(
            StatusCode::METHOD_NOT_ALLOWED,
            json!({"error": "method_not_allowed", "message": "see the README for the admin endpoints"}),
        ),
        _ => answer::json(
            StatusCode::NOT_FOUND,
            json!({"error": "not_found", "message": "admin endpoints: /healthz /readyz /metrics /tokens, POST /reload"}),
        ),
    };
    Ok(response)
}

fn readyz(state: &AdminState) -> Response<Full<Bytes>> {
    let missing: Vec<String> = state
        .store
        .slots()
        .iter()
        .filter(|slot| slot.config.prefetch && slot.current().is_none())
        .map(|slot| slot.name().to_owned())
        .collect();
    if missing.is_empty() {
        answer::json(StatusCode::OK, json!({"ready": true}))
    } else {
        answer::json(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({
                "ready": false,
                "message": format!("no valid token for: {}", missing.join(", ")),
                "providers": missing,
            }),
        )
    }
}

fn metrics(state: &AdminState) -> Response<Full<Bytes>> {
    let now = Instant::now();
    for slot in state.store.slots() {
        let seconds = slot.current().map_or(0.0, |t| {
            t.expires_at.saturating_duration_since(now).as_secs_f64()
        });
        state.metrics.set_token_expires_in(slot.name(), seconds);
    }
    for keyed in state.store.keyed_providers() {
        let counts = keyed.counts();
        state.metrics.set_token_keys(
            keyed.name(),
            [
                ("held", counts.held),
                ("valid", counts.valid),
                ("fetching", counts.fetching),
                ("failing", counts.failing),
            ],
        );
    }
    text(
        StatusCode::OK,
        state.metrics.encode(),
        "text/plain; version=0.0.4; charset=utf-8",
    )
}

fn tokens(state: &AdminState) -> Response<Full<Bytes>> {
    let store = match state.store.fleet_up() {
        None => "memory",
        Some(true) => "redis",
        Some(false) => "memory (redis unavailable)",
    };
    let node = state.store.redis_node();
    let mut providers: serde_json::Map<String, Value> = state
        .store
        .slots()
        .iter()
        .map(|slot| {
            let mut status = token_status(slot);
            status["store"] = store.into();
            if let Some(node) = &node {
                status["redis_node"] = node.as_str().into();
            }
            (slot.name().to_owned(), status)
        })
        .collect();
    // Keyed providers: counts only, since keys are personal data.
    for keyed in state.store.keyed_providers() {
        let counts = keyed.counts();
        let state = match counts {
            KeyCounts { held: 0, .. } => "idle",
            KeyCounts { failing, .. } if failing > 0 => "some_failing",
            _ => "valid",
        };
        providers.insert(
            keyed.name().to_owned(),
            json!({
                "state": state,
                "keyed": true,
                "key_header": keyed.keys().header.as_str(),
                "max_keys": keyed.keys().max_keys,
                "keys_held": counts.held,
                "keys_valid": counts.valid,
                "keys_fetching": counts.fetching,
                "keys_failing": counts.failing,
                "token_url": keyed.config.token_url.as_str(),
                "store": store,
            }),
        );
    }
    answer::json(StatusCode::OK, Value::Object(providers))
}

/// One provider's entry in `/tokens`.
fn token_status(slot: &ProviderSlot) -> Value {
    let now = Instant::now();
    let status = slot.status();
    let token = slot.current();
    let state = match (&token, status.fetching, &status.last_error) {
        (Some(_), true, _) => "refreshing",
        (Some(_), false, Some(_)) => "valid_refresh_failing",
        (Some(_), false, None) => "valid",
        (None, true, _) => "fetching",
        (None, false, Some(_)) => "failing",
        (None, false, None) if slot.config.prefetch => "starting",
        (None, false, None) => "idle",
    };
    json!({
        "state": state,
        "expires_in_s": token.as_ref().map(|t| t.expires_at.saturating_duration_since(now).as_secs()),
        "refresh_in_s": token.as_ref().map(|t| t.refresh_at.saturating_duration_since(now).as_secs()),
        "fetched_at": token.as_ref().map(|t| rfc3339(t.fetched_at)),
        "expires_at": token.as_ref().map(|t| rfc3339(t.expires_at_wall)),
        "generation": token.as_ref().map(|t| t.generation),
        "fetches": status.fetches,
        "failures": status.failures,
        "last_error": status.last_error,
        "refresher_restarts": status.restarts,
        "last_restart_reason": status.last_restart,
        "next_attempt_in_s": status.next_attempt.map(|at| at.saturating_duration_since(now).as_secs_f64()),
        "token_url": slot.config.token_url.as_str(),
    })
}

fn rfc3339(t: SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use http_body_util::BodyExt;

    use super::*;
    use crate::app::App;
    use crate::config::Config;

    /// An admin state from a config whose file is gone, so a reload must fail.
    fn state() -> AdminState {
        let text = r#"
[server]
listen = "127.0.0.1:0"

[providers.p]
token_url = "http://127.0.0.1:9/token"
client_id = "id"
client_secret = "secret"

[[routes]]
path_prefix = "/"
upstream = "http://127.0.0.1:9"
provider = "p"
"#;
        let config = Config::parse(text, Path::new("/nonexistent/admin-test.toml"), &|_| None)
            .expect("config");
        let app = Arc::new(App::build(config).expect("app"));
        AdminState {
            store: app.store.clone(),
            metrics: app.metrics.clone(),
            reload: app.reload_handle(),
        }
    }

    async fn call(method: Method, path: &str) -> (StatusCode, String) {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .body(())
            .expect("request");
        let Ok(response) = handle(state(), req).await;
        let status = response.status();
        let body = response.into_body().collect().await.expect("body");
        (
            status,
            String::from_utf8_lossy(&body.to_bytes()).into_owned(),
        )
    }

    #[tokio::test]
    async fn answers_from_the_state_alone() {
        assert_eq!(
            call(Method::GET, "/healthz").await,
            (StatusCode::OK, "ok\n".to_owned())
        );
        let (status, body) = call(Method::GET, "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(body.contains(r#""providers":["p"]"#), "{body}");
        let (status, body) = call(Method::GET, "/tokens").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(body.contains(r#""state":"starting""#), "{body}");
        assert!(!body.contains("secret"), "{body}");
        let (status, body) = call(Method::GET, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            body.contains("bearer_proxy_token_expires_in_seconds"),
            "{body}"
        );
        assert_eq!(
            call(Method::DELETE, "/tokens").await.0,
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(call(Method::GET, "/nope").await.0, StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn a_failed_reload_answers_with_its_causes() {
        let (status, body) = call(Method::POST, "/reload").await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        let body: Value = serde_json::from_str(&body).expect("json");
        assert_eq!(body["error"], "reload_failed");
        let message = body["message"].as_str().unwrap_or_default();
        // The file, then the OS's reason: the cause chain, not only the top error.
        assert!(
            message.contains("/nonexistent/admin-test.toml"),
            "{message}"
        );
        assert!(message.contains("No such file"), "{message}");
    }
}
