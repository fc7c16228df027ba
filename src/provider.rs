//! Token-endpoint dialects: build the client-credentials request, parse the answer.
//!
//! One [`TokenClient`] (a pooled reqwest client) serves every provider; a provider
//! with `tls_client_auth` gets a client of its own that presents its certificate,
//! with the same trusted roots. Errors quote the provider's own message but never
//! its raw body, and any echo of the client secret or assertion is cut out first.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use base64::Engine;
use http::StatusCode;
use serde_json::Value;

use hyper_util::client::proxy::matcher::Matcher;

use crate::config::outbound::shown;
use crate::config::{ClientAuth, OutboundProxy, ProviderConfig, RequestFormat, KEY_PLACEHOLDER};
use crate::error::chain;
use crate::secret::{redact, Secret};

/// Token-endpoint bodies above this size are refused.
pub const MAX_TOKEN_RESPONSE: usize = 1024 * 1024;

/// The longest a token is taken to live: an expiry further ahead counts as this.
pub const MAX_LIFETIME: Duration = Duration::from_secs(365 * 86_400);

/// Unix seconds beyond this (year 5138) are read as this: far enough for any cap,
/// small enough for every `Duration` and `SystemTime` arithmetic on it.
const FAR_FUTURE_SECS: f64 = 1e11;

/// A token as the provider returned it.
#[derive(Debug)]
pub struct FetchedToken {
    pub value: Secret,
    pub expiry: Expiry,
}

/// When a fetched token stops being valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// A lifetime relative to the moment the answer arrived (`expires_in`, default).
    In(Duration),
    /// An absolute wall-clock time (`expires_at_field`, JWT `exp`).
    At(SystemTime),
}

/// Why a token fetch failed. Messages never hold a secret or a token.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchError {
    #[error("token endpoint unreachable: {0}")]
    Network(String),
    #[error("token endpoint did not answer within {0:?}")]
    Timeout(Duration),
    #[error("token endpoint answered {status}{}", message.as_ref().map(|m| format!(": {m}")).unwrap_or_default())]
    Status {
        status: StatusCode,
        message: Option<String>,
        retry_after: Option<Duration>,
    },
    #[error("token endpoint answer is larger than 1 MiB")]
    TooLarge,
    #[error("token endpoint answer is not JSON (content-type {content_type:?}, {len} bytes)")]
    NotJson { content_type: String, len: usize },
    #[error("token endpoint answer has no `{field}`{}", message.as_ref().map(|m| format!(": {m}")).unwrap_or_default())]
    NoToken {
        field: String,
        message: Option<String>,
    },
    #[error("token endpoint answer is unusable: {0}")]
    Invalid(String),
    #[error("cannot authenticate to the token endpoint: {0}")]
    Credentials(String),
}

impl FetchError {
    /// How long the provider asked us to wait (`Retry-After`), if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// True when the provider said the client credentials are wrong (RFC 6749 §5.2
    /// `invalid_client`): a secret from a command may have been rotated.
    pub fn is_invalid_client(&self) -> bool {
        match self {
            Self::Status { message, .. } | Self::NoToken { message, .. } => message
                .as_deref()
                .is_some_and(|m| m.split(": ").any(|part| part == "invalid_client")),
            _ => false,
        }
    }
}

/// The HTTP client for token endpoints.
#[derive(Clone)]
pub struct TokenClient {
    http: reqwest::Client,
    /// The outbound proxy's rules, to name the proxy a failed fetch went through.
    outbound: Option<Arc<Matcher>>,
    connect_timeout: Duration,
    /// Behind one pointer: every refresher holds a client, so it stays small.
    identities: Arc<Identities>,
}

/// What building a client that presents a certificate takes, and those built.
struct Identities {
    tls: rustls::ClientConfig,
    /// The outbound proxy, for the clients built per identity.
    outbound: Option<OutboundProxy>,
    /// Clients presenting a certificate, by identity digest. Built on first use and
    /// only touched by token fetches, never by proxied requests.
    clients: Mutex<HashMap<[u8; 32], reqwest::Client>>,
}

/// Identities kept; past this (many reloads with rotated certificates) the map is
/// emptied and rebuilt on demand.
const MAX_IDENTITY_CLIENTS: usize = 64;

impl TokenClient {
    /// Builds the client with the proxy's TLS settings, through `outbound` when set
    /// (`None`: direct connections; the environment's proxy variables are ignored).
    pub fn new(
        tls: rustls::ClientConfig,
        connect_timeout: Duration,
        outbound: Option<&OutboundProxy>,
    ) -> Result<Self, reqwest::Error> {
        let http = build_http(tls.clone(), connect_timeout, outbound)?;
        Ok(Self {
            http,
            outbound: outbound.map(|o| Arc::new(o.matcher())),
            connect_timeout,
            identities: Arc::new(Identities {
                tls,
                outbound: outbound.cloned(),
                clients: Mutex::default(),
            }),
        })
    }

    /// The HTTP client for `p`: the shared one, or one presenting its certificate.
    fn http_for(&self, p: &ProviderConfig) -> Result<reqwest::Client, FetchError> {
        let Some(identity) = &p.client_identity else {
            return Ok(self.http.clone());
        };
        let digest = identity.digest();
        let mut clients = self
            .identities
            .clients
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(client) = clients.get(&digest) {
            return Ok(client.clone());
        }
        let client = build_http(
            identity.client_config(&self.identities.tls),
            self.connect_timeout,
            self.identities.outbound.as_ref(),
        )
        .map_err(|e| {
            FetchError::Credentials(format!(
                "cannot set up TLS with the client certificate: {}",
                chain(&e)
            ))
        })?;
        if clients.len() >= MAX_IDENTITY_CLIENTS {
            clients.clear();
        }
        clients.insert(digest, client.clone());
        Ok(client)
    }

    /// A network failure's description, naming the outbound proxy (never its
    /// credentials) when the token endpoint is reached through one.
    async fn network_error(&self, provider: &ProviderConfig, e: reqwest::Error) -> FetchError {
        let e = &e;
        let described = chain(e);
        let url = &provider.token_url;
        let proxy = self
            .outbound
            .as_ref()
            .zip(url.as_str().parse::<http::Uri>().ok())
            .and_then(|(m, uri)| m.intercept(&uri));
        let Some(proxy) = proxy else {
            return FetchError::Network(described);
        };
        let name = shown(&proxy);
        let target = format!(
            "{}:{}",
            url.host_str().unwrap_or_default(),
            url.port_or_known_default().unwrap_or(443)
        );
        // hyper-util's tunnel error type is not exported, so its kind is read from its
        // message; anything unrecognised still names the proxy.
        let mut source = std::error::Error::source(e);
        let mut tunnel = None;
        while let Some(s) = source {
            if let Some(kind) = s.to_string().strip_prefix("tunnel error: ") {
                tunnel = Some(kind.to_owned());
                break;
            }
            source = s.source();
        }
        FetchError::Network(match tunnel.as_deref() {
            Some("failed to create underlying connection") => {
                format!("outbound proxy {name} unreachable: {described}")
            }
            Some("proxy authorization required") => format!(
                "outbound proxy {name} refused the tunnel to {target}: it answered 407 Proxy Authentication Required"
            ),
            Some("unsuccessful") => {
                // reqwest does not say which status; one more CONNECT asks (only after a
                // failure, which the refresher backs off from).
                let probe = format!("https://{target}/").parse::<http::Uri>().ok();
                let status = match (probe, &self.outbound) {
                    (Some(uri), Some(m)) => {
                        crate::outbound::refusal_status(m.clone(), uri, self.connect_timeout).await
                    }
                    _ => None,
                };
                format!(
                    "outbound proxy {name} refused the tunnel to {target}: it answered {}",
                    status.as_deref().unwrap_or("a status other than 200")
                )
            }
            _ => format!("through outbound proxy {name}: {described}"),
        })
    }

    /// Runs one client-credentials request, bounded by `timeout` start to end.
    /// `key` (for a keyed provider) replaces `{key}` in the request's values; an
    /// error never quotes it, even when the provider echoes it.
    pub async fn fetch(
        &self,
        provider: &ProviderConfig,
        key: Option<&Secret>,
        timeout: Duration,
    ) -> Result<FetchedToken, FetchError> {
        match tokio::time::timeout(timeout, self.fetch_inner(provider, key)).await {
            Ok(result) => result,
            Err(_) => Err(FetchError::Timeout(timeout)),
        }
    }

    async fn fetch_inner(
        &self,
        provider: &ProviderConfig,
        key: Option<&Secret>,
    ) -> Result<FetchedToken, FetchError> {
        let http = self.http_for(provider)?;
        let secret = provider.client_secret.current();
        let assertion = match &provider.assertion_key {
            Some(k) => Some(k.assertion(&provider.client_id).map_err(|e| {
                FetchError::Credentials(format!("cannot sign the client assertion: {e}"))
            })?),
            None => None,
        };
        let sent = Sent {
            secret: &secret,
            assertion: assertion.as_ref(),
            key,
        };
        let response = request(&http, provider, &sent).send().await;
        let mut response = match response {
            Ok(response) => response,
            Err(e) => return Err(self.network_error(provider, e).await),
        };
        let status = response.status();
        let retry_after = response
            .headers()
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let content_type = response
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        if response
            .content_length()
            .is_some_and(|len| len > MAX_TOKEN_RESPONSE as u64)
        {
            return Err(FetchError::TooLarge);
        }
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| FetchError::Network(chain(&e)))?
        {
            if body.len() + chunk.len() > MAX_TOKEN_RESPONSE {
                return Err(FetchError::TooLarge);
            }
            body.extend_from_slice(&chunk);
        }
        let answer = Answer {
            status,
            retry_after,
            content_type: &content_type,
            body: &body,
        };
        parse_answer(provider, &sent, &answer)
    }
}

/// The credentials (and key) one token request carried, so an echo of them can be
/// cut out of the provider's answer.
struct Sent<'a> {
    secret: &'a Secret,
    assertion: Option<&'a Secret>,
    key: Option<&'a Secret>,
}

fn build_http(
    tls: rustls::ClientConfig,
    connect_timeout: Duration,
    outbound: Option<&OutboundProxy>,
) -> Result<reqwest::Client, reqwest::Error> {
    let mut builder = reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .connect_timeout(connect_timeout)
        // A token endpoint that redirects is misconfigured; following it would
        // send the credentials somewhere the operator did not name.
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("bearer-proxy/", env!("CARGO_PKG_VERSION")));
    match outbound {
        // Without this, reqwest would read HTTPS_PROXY and friends by itself.
        None => builder = builder.no_proxy(),
        Some(o) => {
            let direct = reqwest::NoProxy::from_string(&o.no_proxy.join(","));
            if let Some(p) = &o.https {
                builder =
                    builder.proxy(reqwest::Proxy::https(p.expose())?.no_proxy(direct.clone()));
            }
            if let Some(p) = &o.http {
                builder = builder.proxy(reqwest::Proxy::http(p.expose())?.no_proxy(direct));
            }
        }
    }
    builder.build()
}

/// The client-credentials request, with the client authentication of `p`.
fn request(http: &reqwest::Client, p: &ProviderConfig, sent: &Sent) -> reqwest::RequestBuilder {
    let key = sent.key;
    // The key goes in verbatim: keys are visible ASCII without `"` or `\`
    // (KeyPattern::accepts), and the body encoders below escape whole values.
    fn keyed<'a>(v: &'a str, key: Option<&Secret>) -> Cow<'a, str> {
        match key {
            Some(key) => Cow::Owned(v.replace(KEY_PLACEHOLDER, key.expose())),
            None => Cow::Borrowed(v),
        }
    }
    let mut fields: Vec<(&str, Cow<'_, str>)> =
        vec![("grant_type", Cow::Borrowed("client_credentials"))];
    match p.client_auth {
        ClientAuth::Body => {
            fields.push(("client_id", Cow::Borrowed(&p.client_id)));
            fields.push(("client_secret", Cow::Borrowed(sent.secret.expose())));
        }
        ClientAuth::Basic => {}
        ClientAuth::PrivateKeyJwt => {
            // RFC 7521 §4.2 makes client_id optional; servers that look the
            // client up before reading the assertion need it.
            fields.push(("client_id", Cow::Borrowed(&p.client_id)));
            fields.push(("client_assertion_type", Cow::Borrowed(JWT_BEARER)));
            if let Some(assertion) = sent.assertion {
                fields.push(("client_assertion", Cow::Borrowed(assertion.expose())));
            }
        }
        ClientAuth::TlsClientAuth => fields.push(("client_id", Cow::Borrowed(&p.client_id))),
    }
    if let Some(a) = &p.audience {
        fields.push(("audience", keyed(a, key)));
    }
    if let Some(s) = &p.scope {
        fields.push(("scope", keyed(s, key)));
    }
    for (k, v) in &p.extra_params {
        fields.push((k, keyed(v, key)));
    }
    let mut req = http
        .post(p.token_url.clone())
        .header(http::header::ACCEPT, "application/json");
    if p.client_auth == ClientAuth::Basic {
        req = req.header(http::header::AUTHORIZATION, basic_auth(p, sent.secret));
    }
    match p.request_format {
        RequestFormat::Json => {
            let map: serde_json::Map<String, Value> = fields
                .into_iter()
                .map(|(k, v)| (k.to_owned(), Value::String(v.into_owned())))
                .collect();
            req.header(http::header::CONTENT_TYPE, "application/json")
                .body(Value::Object(map).to_string())
        }
        RequestFormat::Form => {
            let body = url::form_urlencoded::Serializer::new(String::new())
                .extend_pairs(fields.iter().map(|(k, v)| (*k, v.as_ref())))
                .finish();
            req.header(
                http::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(body)
        }
    }
}

/// RFC 7523 §2.2: the `client_assertion_type` of a JWT client assertion.
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// RFC 6749 §2.3.1: id and secret are form-encoded, then joined and base64'd.
fn basic_auth(p: &ProviderConfig, secret: &Secret) -> http::HeaderValue {
    let enc = |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let raw = format!("{}:{}", enc(&p.client_id), enc(secret.expose()));
    let value = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    );
    let mut header =
        http::HeaderValue::from_str(&value).unwrap_or(http::HeaderValue::from_static(""));
    header.set_sensitive(true);
    header
}

/// The longest a `Retry-After` holds back the next fetch: a provider asking for more
/// (a date in year 9999) must not silence a provider for good.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

/// Parses `Retry-After` as delay-seconds or an HTTP date (at most a day ahead).
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs).min(MAX_RETRY_AFTER));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(
        when.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO)
            .min(MAX_RETRY_AFTER),
    )
}

/// Turns a token-endpoint answer into a token or a typed error.
pub fn parse_response(
    p: &ProviderConfig,
    status: StatusCode,
    retry_after: Option<Duration>,
    content_type: &str,
    body: &[u8],
) -> Result<FetchedToken, FetchError> {
    let answer = Answer {
        status,
        retry_after,
        content_type,
        body,
    };
    let secret = p.client_secret.current();
    let sent = Sent {
        secret: &secret,
        assertion: None,
        key: None,
    };
    parse_answer(p, &sent, &answer)
}

/// A token endpoint's answer, as received.
struct Answer<'a> {
    status: StatusCode,
    retry_after: Option<Duration>,
    content_type: &'a str,
    body: &'a [u8],
}

/// [`parse_response`] for the token of `key` (a keyed provider), which no error
/// message may quote.
fn parse_answer(
    p: &ProviderConfig,
    sent: &Sent,
    answer: &Answer<'_>,
) -> Result<FetchedToken, FetchError> {
    let Answer {
        status,
        retry_after,
        content_type,
        body,
    } = *answer;
    let doc: Option<Value> = serde_json::from_slice(body).ok();
    let message = doc.as_ref().and_then(|d| provider_message(d, p, sent));
    if !status.is_success() {
        return Err(FetchError::Status {
            status,
            message,
            retry_after,
        });
    }
    let Some(doc) = doc else {
        return Err(FetchError::NotJson {
            content_type: content_type.chars().take(80).collect(),
            len: body.len(),
        });
    };
    let token = match p.token_field.get(&doc) {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        _ => {
            return Err(FetchError::NoToken {
                field: p.token_field.to_string(),
                message,
            })
        }
    };
    if http::HeaderValue::from_str(&format!("{}{}", p.header_prefix, token)).is_err() {
        return Err(FetchError::Invalid(
            "the token holds characters not allowed in a header".to_owned(),
        ));
    }
    let expiry = expiry(p, &doc, &token)?;
    Ok(FetchedToken {
        value: Secret::new(token),
        expiry,
    })
}

fn expiry(p: &ProviderConfig, doc: &Value, token: &str) -> Result<Expiry, FetchError> {
    if let Some(field) = &p.expires_at_field {
        return match field.get(doc) {
            None | Some(Value::Null) => jwt_or_default(p, token),
            Some(value) => expires_at(value, SystemTime::now())
                .map_err(|why| FetchError::Invalid(format!("`{field}` {why}"))),
        };
    }
    let seconds = match p.expires_in_field.get(doc) {
        None | Some(Value::Null) => return jwt_or_default(p, token),
        Some(Value::Number(n)) => n.as_f64(),
        Some(Value::String(s)) => s.trim().parse::<f64>().ok(),
        Some(_) => None,
    };
    match seconds {
        // `min` first: no float is too big for a Duration after it.
        Some(s) if s.is_finite() && s >= 1.0 => {
            Duration::try_from_secs_f64(s.min(MAX_LIFETIME.as_secs_f64()))
                .map(Expiry::In)
                .map_err(|_| {
                    FetchError::Invalid(format!(
                        "`{}` is not a number of seconds",
                        p.expires_in_field
                    ))
                })
        }
        _ => Err(FetchError::Invalid(format!(
            "`{}` is not a positive number of seconds",
            p.expires_in_field
        ))),
    }
}

/// `[year]-[month]-[day]T[hour]:[minute]:[second]` with optional fractional seconds
/// of any length (.NET writes seven digits) and no offset.
const LOCAL_DATE_TIME: &[time::format_description::BorrowedFormatItem<'static>] = time::macros::format_description!(
    version = 2,
    "[year]-[month]-[day][first [T] [t] [ ]][hour]:[minute]:[second][optional [.[subsecond digits:1+]]]"
);

/// An absolute expiry (`expires_at_field`): RFC 3339, an ISO 8601 date-time without
/// offset (UTC), or Unix seconds. More than [`MAX_LIFETIME`] ahead counts as that.
fn expires_at(value: &Value, now: SystemTime) -> Result<Expiry, &'static str> {
    let at = match value {
        Value::String(s) => {
            let s = s.trim();
            let parsed =
                time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                    .or_else(|_| {
                        time::PrimitiveDateTime::parse(s, LOCAL_DATE_TIME).map(|t| t.assume_utc())
                    })
                    .map_err(|_| "is not an RFC 3339 or ISO 8601 date-time")?;
            let nanos = parsed.unix_timestamp_nanos();
            if nanos <= 0 {
                return Err("is not a positive time");
            }
            unix_time_nanos(nanos)
        }
        Value::Number(n) => {
            let secs = n
                .as_f64()
                .filter(|s| s.is_finite() && *s > 0.0)
                .ok_or("is not a positive number of Unix seconds")?;
            unix_time(secs)
        }
        _ => return Err("is not a time (a date-time string or Unix seconds)"),
    };
    if at <= now {
        return Err("is already past (is this machine's clock right?)");
    }
    Ok(cap(at, now))
}

/// Unix seconds as far as [`FAR_FUTURE_SECS`]; `secs` must be finite and positive.
fn unix_time(secs: f64) -> SystemTime {
    // Every value up to FAR_FUTURE_SECS fits a Duration and a SystemTime.
    crate::unix_time::from_secs_f64(secs.clamp(0.0, FAR_FUTURE_SECS))
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

/// Unix nanoseconds as far as [`FAR_FUTURE_SECS`]; `nanos` must be positive.
fn unix_time_nanos(nanos: i128) -> SystemTime {
    // FAR_FUTURE_SECS is a whole number of seconds (1e11), exact as an i128.
    let far = FAR_FUTURE_SECS as i128 * 1_000_000_000;
    crate::unix_time::from_nanos(nanos.clamp(0, far)).unwrap_or(SystemTime::UNIX_EPOCH)
}

/// An absolute expiry with at most [`MAX_LIFETIME`] left after `now`.
fn cap(at: SystemTime, now: SystemTime) -> Expiry {
    match at.duration_since(now) {
        Ok(left) if left > MAX_LIFETIME => Expiry::In(MAX_LIFETIME),
        _ => Expiry::At(at),
    }
}

fn jwt_or_default(p: &ProviderConfig, token: &str) -> Result<Expiry, FetchError> {
    Ok(jwt_exp(token).map_or(Expiry::In(p.default_lifetime), |at| {
        cap(at, SystemTime::now())
    }))
}

/// The `exp` claim of a JWT, read without verifying the signature; `None` when the
/// token is no JWT or `exp` is not a positive number. Far-future claims are capped
/// (to a time still far beyond [`MAX_LIFETIME`]), never an error.
pub fn jwt_exp(token: &str) -> Option<SystemTime> {
    let mut parts = token.split('.');
    let (_, payload, _) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: Value = serde_json::from_slice(&bytes).ok()?;
    let exp = claims.get("exp")?.as_f64()?;
    (exp.is_finite() && exp > 0.0).then(|| unix_time(exp))
}

/// Cuts the client secret out of provider text in every form the provider may have
/// echoed it: raw, form- or percent-encoded, JSON-escaped, or inside a Basic header;
/// and the client assertion, which is a credential until it expires.
fn redact_credentials(text: &str, p: &ProviderConfig, sent: &Sent) -> String {
    let basic = basic_auth(p, sent.secret);
    let basic = basic.to_str().unwrap_or_default();
    let basic = basic.strip_prefix("Basic ").unwrap_or(basic);
    let mut variants: Vec<Secret> = encodings(sent.secret.expose())
        .into_iter()
        .map(Secret::new)
        .collect();
    variants.push(Secret::new(basic));
    if let Some(assertion) = sent.assertion {
        variants.push(assertion.clone());
        // Each part on its own too: an echo may be cut anywhere.
        variants.extend(assertion.expose().split('.').map(Secret::new));
    }
    redact(text, &variants.iter().collect::<Vec<_>>())
}

/// `raw` as a provider may echo it: raw, form- or percent-encoded, JSON-escaped.
fn encodings(raw: &str) -> [String; 3] {
    let form: String = url::form_urlencoded::byte_serialize(raw.as_bytes()).collect();
    let json = serde_json::to_string(raw).unwrap_or_default();
    let json = json.trim_matches('"').to_owned();
    [raw.to_owned(), form, json]
}

/// The provider's own explanation, from the fields the seed dialects use.
fn provider_message(doc: &Value, p: &ProviderConfig, sent: &Sent) -> Option<String> {
    const FIELDS: [&str; 7] = [
        "error",
        "error_description",
        "ExceptionMessage",
        "ErrorCode",
        "message",
        "detail",
        "title",
    ];
    let mut parts: Vec<String> = Vec::new();
    let mut scopes = vec![doc];
    scopes.extend(
        doc.as_object()
            .into_iter()
            .flat_map(|o| o.values())
            .filter(|v| v.is_object()),
    );
    for scope in scopes {
        for field in FIELDS {
            match scope.get(field) {
                Some(Value::String(s)) if !s.is_empty() => parts.push(s.clone()),
                Some(Value::Number(n)) => parts.push(n.to_string()),
                _ => {}
            }
        }
    }
    if parts.is_empty() {
        return None;
    }
    parts.dedup();
    // Redacted before shortening, so no cut can leave part of a secret or key.
    let mut joined = redact_credentials(&parts.join(": "), p, sent);
    if let Some(key) = sent.key {
        // Unlike secrets, keys may be short ("42"): cut them whatever their length.
        for variant in encodings(key.expose()).iter().filter(|v| !v.is_empty()) {
            joined = joined.replace(variant.as_str(), "***");
        }
    }
    let clean: String = joined
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(300)
        .collect();
    Some(clean)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::path::Path;

    fn provider(extra: &str) -> ProviderConfig {
        let text = format!(
            "[providers.p]\ntoken_url = \"https://issuer.example/token\"\nclient_id = \"id\"\nclient_secret = \"s3cret-value\"\n{extra}\n[[routes]]\nupstream = \"https://api.example\"\nprovider = \"p\"\n"
        );
        let cfg = Config::parse(&text, Path::new("t.toml"), &|_| None).unwrap();
        (*cfg.providers["p"]).clone()
    }

    fn parse(p: &ProviderConfig, status: u16, body: &str) -> Result<FetchedToken, FetchError> {
        parse_response(
            p,
            StatusCode::from_u16(status).unwrap(),
            None,
            "application/json",
            body.as_bytes(),
        )
    }

    #[test]
    fn oauth2_expires_in_number_or_string() {
        let p = provider("");
        let t = parse(&p, 200, r#"{"access_token":"abc","expires_in":86400}"#).unwrap();
        assert_eq!(t.value.expose(), "abc");
        assert_eq!(t.expiry, Expiry::In(Duration::from_secs(86400)));
        let t = parse(&p, 200, r#"{"access_token":"abc","expires_in":"60"}"#).unwrap();
        assert_eq!(t.expiry, Expiry::In(Duration::from_secs(60)));
    }

    #[test]
    fn loyalife_dialect_and_its_error_shape() {
        let p = provider(
            "token_field = \"results.token\"\nexpires_at_field = \"results.tokenExpiresOn\"",
        );
        let t = parse(
            &p,
            200,
            &format!(
                r#"{{"results":{{"token":"tok","tokenExpiresOn":"{}"}}}}"#,
                soon()
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap()
            ),
        )
        .unwrap();
        assert_eq!(t.value.expose(), "tok");
        assert_eq!(t.expiry, Expiry::At(soon().into()));
        let e = parse(
            &p,
            200,
            r#"{"results":{"IsSucessful":false,"ErrorCode":"AUTH01","ExceptionMessage":"Invalid client s3cret-value"}}"#,
        )
        .unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("results.token"), "{msg}");
        assert!(msg.contains("Invalid client ***"), "{msg}");
        assert!(!msg.contains("s3cret-value"));
    }

    #[test]
    fn oauth2_error_quotes_provider() {
        let p = provider("");
        let e = parse(
            &p,
            401,
            r#"{"error":"invalid_client","error_description":"Unknown client"}"#,
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "token endpoint answered 401 Unauthorized: invalid_client: Unknown client"
        );
        let e = parse(&p, 200, "<html>oops</html>").unwrap_err();
        assert!(matches!(e, FetchError::NotJson { .. }));
    }

    #[test]
    fn jwt_exp_fallback_then_default() {
        let p = provider("default_lifetime = \"2m\"");
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(format!(r#"{{"exp":{}}}"#, soon().unix_timestamp()));
        let jwt = format!("eyJhbGciOiJub25lIn0.{payload}.sig");
        let t = parse(&p, 200, &format!(r#"{{"access_token":"{jwt}"}}"#)).unwrap();
        assert_eq!(t.expiry, Expiry::At(soon().into()));
        let t = parse(&p, 200, r#"{"access_token":"opaque"}"#).unwrap();
        assert_eq!(t.expiry, Expiry::In(Duration::from_secs(120)));
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_retry_after("3"), Some(Duration::from_secs(3)));
        let later = SystemTime::now() + Duration::from_secs(120);
        let d = parse_retry_after(&httpdate::fmt_http_date(later)).unwrap();
        assert!(d > Duration::from_secs(100) && d <= Duration::from_secs(120));
        assert_eq!(parse_retry_after("soon"), None);
        assert_eq!(
            parse_retry_after("Fri, 31 Dec 9999 23:59:59 GMT"),
            Some(MAX_RETRY_AFTER)
        );
        assert_eq!(parse_retry_after("99999999999999999999"), None);
        assert_eq!(parse_retry_after("999999999"), Some(MAX_RETRY_AFTER));
    }

    fn loyalife(expires: &str) -> Result<FetchedToken, FetchError> {
        let p = provider(
            "token_field = \"results.token\"\nexpires_at_field = \"results.tokenExpiresOn\"",
        );
        parse(
            &p,
            200,
            &format!(r#"{{"results":{{"token":"tok","tokenExpiresOn":{expires}}}}}"#),
        )
    }

    /// A whole second about 30 days from now, in UTC.
    fn soon() -> time::OffsetDateTime {
        let t = time::OffsetDateTime::now_utc() + Duration::from_secs(30 * 86_400);
        t.replace_nanosecond(0).unwrap()
    }

    #[test]
    fn expires_at_formats() {
        let t = soon();
        let at = |nanos: u64| Expiry::At(SystemTime::from(t) + Duration::from_nanos(nanos));
        let (date, clock) = (
            format!("{:04}-{:02}-{:02}", t.year(), u8::from(t.month()), t.day()),
            format!("{:02}:{:02}:{:02}", t.hour(), t.minute(), t.second()),
        );
        let plus2 = t.to_offset(time::UtcOffset::from_hms(2, 0, 0).unwrap());
        let rfc3339_plus2 = plus2
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap();
        for (value, expected) in [
            (format!(r#""{date}T{clock}Z""#), at(0)),
            (format!(r#""{rfc3339_plus2}""#), at(0)),
            // ISO 8601 without offset, as .NET writes it: UTC.
            (format!(r#""{date}T{clock}""#), at(0)),
            (format!(r#""{date}T{clock}.1234567""#), at(123_456_700)),
            (format!(r#""{date}T{clock}.5Z""#), at(500_000_000)),
            (t.unix_timestamp().to_string(), at(0)),
            (format!("{}.25", t.unix_timestamp()), at(250_000_000)),
        ] {
            assert_eq!(loyalife(&value).unwrap().expiry, expected, "{value}");
        }
    }

    #[test]
    fn expires_at_far_ahead_counts_as_a_year() {
        for value in [
            "1e20",
            "1e308",
            "18446744073709551616000",
            r#""9999-12-31T23:59:59Z""#,
        ] {
            assert_eq!(
                loyalife(value).unwrap().expiry,
                Expiry::In(MAX_LIFETIME),
                "{value}"
            );
        }
    }

    #[test]
    fn expires_at_that_is_no_time_is_an_error_of_the_answer() {
        for value in [
            "-1",
            "0",
            "-0",
            "-1e308",
            "1000",
            r#""NaN""#,
            r#""Infinity""#,
            r#""""#,
            r#""tomorrow""#,
            r#""2030-13-40T99:00:00""#,
            r#""1970-01-01T00:00:00Z""#,
            r#""0001-01-01T00:00:00""#,
            "true",
            "[]",
            "{}",
            r#""2001-01-01T00:00:00Z""#,
        ] {
            let e = loyalife(value).unwrap_err();
            assert!(matches!(e, FetchError::Invalid(_)), "{value}: {e}");
            assert!(
                e.to_string().contains("results.tokenExpiresOn"),
                "{value}: {e}"
            );
        }
        // Absent or null: the JWT or default_lifetime, as without expires_at_field.
        assert_eq!(
            loyalife("null").unwrap().expiry,
            Expiry::In(Duration::from_secs(300))
        );
    }

    #[test]
    fn expires_in_at_the_edges() {
        let p = provider("");
        for (value, expected) in [
            ("1e20", Some(MAX_LIFETIME)),
            ("1e308", Some(MAX_LIFETIME)),
            ("18446744073709551616", Some(MAX_LIFETIME)),
            ("\"1e20\"", Some(MAX_LIFETIME)),
            ("1.5", Some(Duration::from_millis(1500))),
            ("0", None),
            ("-0", None),
            ("-1e308", None),
            ("0.5", None),
            ("\"NaN\"", None),
            ("\"inf\"", None),
            ("\"-inf\"", None),
            ("true", None),
            ("[3600]", None),
        ] {
            let got = parse(
                &p,
                200,
                &format!(r#"{{"access_token":"abc","expires_in":{value}}}"#),
            );
            match expected {
                Some(d) => assert_eq!(got.unwrap().expiry, Expiry::In(d), "{value}"),
                None => assert!(matches!(got, Err(FetchError::Invalid(_))), "{value}"),
            }
        }
    }

    #[test]
    fn jwt_exp_at_the_edges() {
        let p = provider("");
        let jwt = |exp: &str| {
            let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(format!(r#"{{"exp":{exp}}}"#));
            format!("eyJhbGciOiJub25lIn0.{payload}.sig")
        };
        for exp in ["1e20", "1e308", "99999999999999999999999"] {
            let t = parse(&p, 200, &format!(r#"{{"access_token":"{}"}}"#, jwt(exp))).unwrap();
            assert_eq!(t.expiry, Expiry::In(MAX_LIFETIME), "{exp}");
        }
        // Not a positive number: as if there were no claim.
        for exp in ["-1e308", "0", "-0", "\"soon\"", "null"] {
            let t = parse(&p, 200, &format!(r#"{{"access_token":"{}"}}"#, jwt(exp))).unwrap();
            assert_eq!(t.expiry, Expiry::In(Duration::from_secs(300)), "{exp}");
        }
    }
}
