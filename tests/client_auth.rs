//! Client authentication: signed client assertions (private_key_jwt), client
//! certificates (tls_client_auth) and secrets read from a command, against issuers
//! that check them.

use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bearer_proxy::config::Config;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;

use crate::support::*;

/// Writes `text` to `path` with `mode`.
fn write_file(path: &Path, text: &str, mode: u32) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn parse(text: &str) -> Result<Config, String> {
    Config::parse(text, Path::new("/tmp/t.toml"), &|_| None).map_err(|e| e.to_string())
}

fn provider_toml(extra: &str) -> String {
    format!(
        "[providers.p]\ntoken_url = \"https://issuer.example/token\"\nclient_id = \"id\"\n{extra}\n[[routes]]\nupstream = \"https://api.example\"\nprovider = \"p\"\n"
    )
}

/// Provider `p` at `token_url` as `client_id` with no client authentication yet (each
/// test picks its own), and one route to `upstream`.
fn auth_config(token_url: &str, client_id: &str, upstream: &str) -> TestConfig {
    TestConfig::default()
        .with_provider(
            "p",
            ProviderSection::default()
                .token_url(token_url)
                .client_id(client_id),
        )
        .route(RouteSection::to(upstream, "p"))
}

/// `private_key_jwt` as `jwt-client` at the assertion issuer `addr`, signing with `key`.
fn jwt_config(addr: std::net::SocketAddr, key: &Path, upstream: &Upstream) -> TestConfig {
    auth_config(
        &format!("http://{addr}/token"),
        "jwt-client",
        &upstream.url(),
    )
    .p(|p| {
        p.client_auth("private_key_jwt")
            .client_key_file(key.display().to_string())
            .client_assertion_audience("https://issuer.test/token")
    })
}

fn assert_err(result: Result<Config, String>, parts: &[&str]) {
    let e = result.expect_err("config should be refused");
    for part in parts {
        assert!(e.contains(part), "`{part}` missing from: {e}");
    }
}

fn key_file(
    dir: &Path,
    name: &str,
    alg: &'static rcgen::SignatureAlgorithm,
) -> (PathBuf, rcgen::KeyPair) {
    let kp = rcgen::KeyPair::generate_for(alg).unwrap();
    let path = dir.join(name);
    write_file(&path, &kp.serialize_pem(), 0o600);
    (path, kp)
}

// === Configuration ===

#[test]
fn exactly_one_secret_source_for_body_and_basic() {
    assert_err(
        parse(&provider_toml(
            "client_secret = \"s\"\nclient_secret_command = [\"echo\", \"x\"]",
        )),
        &["providers.p.client_secret", "client_secret_command", "both"],
    );
    assert_err(
        parse(&provider_toml("client_auth = \"basic\"")),
        &[
            "providers.p.client_secret",
            "required",
            "client_secret_command",
        ],
    );
    assert_err(
        parse(&provider_toml("client_secret_command = []")),
        &["providers.p.client_secret_command", "must name a program"],
    );
    let c = parse(&provider_toml("client_secret_command = [\"echo\", \"x\"]")).unwrap();
    let p = &c.providers["p"];
    assert_eq!(
        p.client_secret_command.as_ref().unwrap().argv,
        ["echo", "x"]
    );
    // Not run by parsing: only at startup, reload and `check`.
    assert!(p.client_secret.current().is_empty());
}

#[test]
fn key_methods_take_no_secret_and_need_their_files() {
    let dir = tempfile::tempdir().unwrap();
    let (key, _) = key_file(dir.path(), "k.pem", &rcgen::PKCS_ECDSA_P256_SHA256);
    let key_line = format!("client_key_file = \"{}\"", key.display());
    assert_err(
        parse(&provider_toml(&format!(
            "client_auth = \"private_key_jwt\"\nclient_secret = \"s\"\n{key_line}"
        ))),
        &["providers.p.client_secret", "private_key_jwt", "no secret"],
    );
    assert_err(
        parse(&provider_toml("client_auth = \"private_key_jwt\"")),
        &["providers.p.client_key_file", "required"],
    );
    assert_err(
        parse(&provider_toml(&format!(
            "client_auth = \"tls_client_auth\"\n{key_line}"
        ))),
        &["providers.p.client_cert_file", "required"],
    );
    assert_err(
        parse(&provider_toml(&format!(
            "client_secret = \"s\"\n{key_line}"
        ))),
        &["providers.p.client_key_file", "only used with"],
    );
    assert_err(
        parse(&provider_toml(&format!(
            "client_auth = \"private_key_jwt\"\n{key_line}\nclient_assertion_alg = \"RS256\""
        ))),
        &["providers.p.client_assertion_alg", "does not fit"],
    );
    assert_err(
        parse(&provider_toml(&format!(
            "client_auth = \"private_key_jwt\"\n{key_line}\nclient_assertion_alg = \"none\""
        ))),
        &["providers.p.client_assertion_alg", "`none`"],
    );
    assert_err(
        parse(&provider_toml(
            "client_auth = \"private_key_jwt\"\nclient_key_file = \"/nonexistent/key.pem\"",
        )),
        &["providers.p.client_key_file", "cannot read"],
    );
    let garbage = dir.path().join("garbage.pem");
    write_file(
        &garbage,
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        0o600,
    );
    let e = parse(&provider_toml(&format!(
        "client_auth = \"private_key_jwt\"\nclient_key_file = \"{}\"",
        garbage.display()
    )))
    .err()
    .unwrap();
    assert!(e.contains("providers.p.client_key_file"), "{e}");
    assert!(!e.contains("AAAA"), "never quotes the key: {e}");

    let c = parse(&provider_toml(&format!(
        "client_auth = \"private_key_jwt\"\n{key_line}\nclient_key_id = \"k1\""
    )))
    .unwrap();
    let p = &c.providers["p"];
    let k = p.assertion_key.as_ref().unwrap();
    assert_eq!(k.alg, bearer_proxy::client_auth::Algorithm::ES256);
    assert_eq!(k.audience, "https://issuer.example/token");
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    let shown = format!("{p:?}");
    assert!(
        !shown.contains("BEGIN"),
        "Debug never prints the key: {shown}"
    );
}

#[test]
fn readable_key_file_is_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let (key, _) = key_file(dir.path(), "k.pem", &rcgen::PKCS_RSA_SHA256);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let c = parse(&provider_toml(&format!(
        "client_auth = \"private_key_jwt\"\nclient_key_file = \"{}\"",
        key.display()
    )))
    .unwrap();
    assert_eq!(
        c.providers["p"].assertion_key.as_ref().unwrap().alg,
        bearer_proxy::client_auth::Algorithm::RS256
    );
    assert!(
        c.warnings
            .iter()
            .any(|w| w.contains("client_key_file") && w.contains("chmod 600")),
        "{:?}",
        c.warnings
    );
}

/// Traditional PEM (`BEGIN RSA PRIVATE KEY`, `BEGIN EC PRIVATE KEY`) as well as PKCS#8.
#[test]
fn traditional_rsa_and_ec_keys_are_read() {
    let dir = tempfile::tempdir().unwrap();
    for (alg, expected, tag) in [
        (
            &rcgen::PKCS_RSA_SHA256,
            bearer_proxy::client_auth::Algorithm::RS256,
            "RSA PRIVATE KEY",
        ),
        (
            &rcgen::PKCS_ECDSA_P256_SHA256,
            bearer_proxy::client_auth::Algorithm::ES256,
            "EC PRIVATE KEY",
        ),
    ] {
        let (pkcs8, _) = key_file(dir.path(), "pkcs8.pem", alg);
        let traditional = dir.path().join("traditional.pem");
        let Some(out) = openssl(&["pkey", "-traditional", "-in"], &pkcs8, &traditional) else {
            return;
        };
        assert!(out.contains(tag), "{out}");
        let c = parse(&provider_toml(&format!(
            "client_auth = \"private_key_jwt\"\nclient_key_file = \"{}\"",
            traditional.display()
        )))
        .unwrap();
        assert_eq!(
            c.providers["p"].assertion_key.as_ref().unwrap().alg,
            expected
        );
    }
}

/// Runs `openssl ARGS in -out out`; the written file's text. Fails under CI when
/// openssl is missing, skips with a message elsewhere.
fn openssl(args: &[&str], input: &Path, out: &Path) -> Option<String> {
    let status = std::process::Command::new("openssl")
        .args(args)
        .arg(input)
        .arg("-out")
        .arg(out)
        .status();
    match status {
        Ok(s) if s.success() => Some(std::fs::read_to_string(out).unwrap()),
        _ if std::env::var("CI").as_deref() == Ok("true") => panic!("openssl is required under CI"),
        _ => {
            eprintln!("SKIPPED: openssl not available");
            None
        }
    }
}

// === private_key_jwt against an issuer that verifies the assertion ===

/// An issuer that accepts a client assertion only when its signature verifies with
/// `public_pem`, its claims are right and its `jti` is new.
struct AssertionIssuer {
    addr: std::net::SocketAddr,
    seen: Arc<Mutex<Vec<serde_json::Value>>>,
}

async fn assertion_issuer(
    public_pem: String,
    rsa: bool,
    client_id: &'static str,
) -> AssertionIssuer {
    let seen: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
    let jtis: Arc<Mutex<HashSet<String>>> = Arc::default();
    let record = seen.clone();
    let addr = serve(move |req: Request<Incoming>| {
        let (public_pem, record, jtis) = (public_pem.clone(), record.clone(), jtis.clone());
        async move {
            let json_body = req
                .headers()
                .get("content-type")
                .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
            let bytes = req.into_body().collect().await.unwrap().to_bytes();
            let fields: serde_json::Value = if json_body {
                serde_json::from_slice(&bytes).unwrap()
            } else {
                url::form_urlencoded::parse(&bytes)
                    .map(|(k, v)| (k.into_owned(), serde_json::Value::String(v.into_owned())))
                    .collect::<serde_json::Map<_, _>>()
                    .into()
            };
            let deny = |why: &str| {
                Response::builder()
                    .status(401)
                    .header("content-type", "application/json")
                    .body(full(
                        serde_json::json!({"error": "invalid_client", "error_description": why})
                            .to_string(),
                    ))
                    .unwrap()
            };
            if fields["client_assertion_type"]
                != "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
                || fields.get("client_secret").is_some()
            {
                return deny("wrong client authentication");
            }
            let jwt = fields["client_assertion"].as_str().unwrap_or_default();
            let key = if rsa {
                jsonwebtoken::DecodingKey::from_rsa_pem(public_pem.as_bytes())
            } else {
                jsonwebtoken::DecodingKey::from_ec_pem(public_pem.as_bytes())
            }
            .unwrap();
            let header = jsonwebtoken::decode_header(jwt).unwrap();
            let mut validation = jsonwebtoken::Validation::new(header.alg);
            validation.set_audience(&["https://issuer.test/token"]);
            validation.set_issuer(&[client_id]);
            validation.sub = Some(client_id.to_owned());
            validation.set_required_spec_claims(&["exp", "iat", "jti", "aud", "iss", "sub"]);
            let claims = match jsonwebtoken::decode::<serde_json::Value>(jwt, &key, &validation) {
                Ok(data) => data.claims,
                Err(e) => return deny(&format!("assertion rejected: {e}")),
            };
            let jti = claims["jti"].as_str().unwrap_or_default().to_owned();
            if !jtis.lock().unwrap().insert(jti) {
                return deny("jti reused");
            }
            let mut entry = claims.clone();
            entry["_header_kid"] = serde_json::json!(header.kid);
            entry["_header_alg"] = serde_json::json!(format!("{:?}", header.alg));
            entry["_client_id"] = fields["client_id"].clone();
            entry["_json"] = serde_json::json!(json_body);
            let n = {
                let mut seen = record.lock().unwrap();
                seen.push(entry);
                seen.len()
            };
            Response::builder()
                .header("content-type", "application/json")
                .body(full(
                    serde_json::json!({"access_token": format!("jwt-tok-{n}"), "expires_in": 3600})
                        .to_string(),
                ))
                .unwrap()
        }
    })
    .await;
    AssertionIssuer { addr, seen }
}

#[tokio::test]
async fn private_key_jwt_assertions_verify_in_form_and_json() {
    let dir = tempfile::tempdir().unwrap();
    for (alg, rsa, format) in [
        (&rcgen::PKCS_RSA_SHA256, true, "form"),
        (&rcgen::PKCS_ECDSA_P256_SHA256, false, "json"),
    ] {
        let (key, kp) = key_file(dir.path(), &format!("{format}.pem"), alg);
        let issuer = assertion_issuer(kp.public_key_pem(), rsa, "jwt-client").await;
        let upstream = Upstream::start().await;
        let toml = jwt_config(issuer.addr, &key, &upstream)
            .server(|s| s.token_wait("3s"))
            .p(|p| p.client_key_id("key-2026").request_format(format));
        let proxy = Proxy::start_with(&toml).await;
        let answer = get(&client(), &proxy.url("/a")).await;
        assert_eq!(
            answer.status,
            200,
            "{}",
            String::from_utf8_lossy(&answer.body)
        );
        assert_eq!(answer.echoed("authorization"), ["Bearer jwt-tok-1"]);
        // A second fetch (the first token rejected upstream) carries a new jti.
        upstream.reject("jwt-tok-1", 401);
        let answer = get(&client(), &proxy.url("/b")).await;
        assert_eq!(
            answer.status,
            200,
            "{}",
            String::from_utf8_lossy(&answer.body)
        );
        assert_eq!(answer.echoed("authorization"), ["Bearer jwt-tok-2"]);
        let seen = issuer.seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 2);
        for claims in &seen {
            assert_eq!(claims["_header_kid"], "key-2026");
            assert_eq!(claims["_header_alg"], if rsa { "RS256" } else { "ES256" });
            assert_eq!(claims["_client_id"], "jwt-client");
            assert_eq!(claims["_json"], format == "json");
            assert_eq!(
                claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(),
                60
            );
        }
        assert_ne!(seen[0]["jti"], seen[1]["jti"]);
        proxy.stop().await;
    }
}

#[tokio::test]
async fn private_key_jwt_with_the_wrong_key_is_a_503_with_the_issuers_words() {
    let dir = tempfile::tempdir().unwrap();
    let (_, registered) = key_file(dir.path(), "registered.pem", &rcgen::PKCS_ECDSA_P256_SHA256);
    let (wrong, _) = key_file(dir.path(), "wrong.pem", &rcgen::PKCS_ECDSA_P256_SHA256);
    let issuer = assertion_issuer(registered.public_key_pem(), false, "jwt-client").await;
    let upstream = Upstream::start().await;
    let toml = jwt_config(issuer.addr, &wrong, &upstream).server(|s| s.token_wait("1s"));
    let proxy = Proxy::start_with(&toml).await;
    let answer = get(&client(), &proxy.url("/a")).await;
    assert_eq!(answer.status, 503);
    let text = String::from_utf8_lossy(&answer.body);
    assert!(
        text.contains("invalid_client") && text.contains("assertion rejected"),
        "{text}"
    );
    assert_eq!(upstream.hits(), 0);
    proxy.stop().await;
}

// === tls_client_auth against a token endpoint that requires client certificates ===

struct Pki {
    ca_pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    ca_der: CertificateDer<'static>,
}

fn pki(name: &str) -> Pki {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    Pki {
        ca_pem: cert.pem(),
        ca_der: cert.der().clone(),
        issuer: rcgen::Issuer::new(params, key),
    }
}

/// A leaf certificate for `names` signed by `ca`: (cert PEM, key PEM, cert DER, key).
fn leaf(
    ca: &Pki,
    names: &[&str],
) -> (
    String,
    String,
    CertificateDer<'static>,
    PrivateKeyDer<'static>,
) {
    let params =
        rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    (cert.pem(), key.serialize_pem(), cert.der().clone(), der)
}

/// An HTTPS token endpoint for `localhost` that requires a client certificate
/// issued by `client_ca`; answers a token naming the client_id it got.
async fn mtls_issuer(server_ca: &Pki, client_ca: &Pki) -> std::net::SocketAddr {
    let (_, _, cert, key) = leaf(server_ca, &["localhost"]);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(client_ca.ca_der.clone()).unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![cert], key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut n = 0u32;
        while let Ok((stream, _)) = listener.accept().await {
            n += 1;
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let svc = service_fn(move |req: Request<Incoming>| async move {
                    let body = req.into_body().collect().await.unwrap().to_bytes();
                    let fields: std::collections::HashMap<String, String> =
                        url::form_urlencoded::parse(&body).into_owned().collect();
                    let answer = serde_json::json!({
                        "access_token": format!("mtls-{}-{n}", fields.get("client_id").map_or("none", |s| s.as_str())),
                        "expires_in": 3600,
                    });
                    Ok::<_, std::convert::Infallible>(
                        Response::builder()
                            .header("content-type", "application/json")
                            .body(full(answer.to_string()))
                            .unwrap(),
                    )
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn tls_client_auth_right_certificate_gets_a_token_none_or_wrong_is_a_503() {
    let server_ca = pki("server CA");
    let client_ca = pki("client CA");
    let other_ca = pki("other CA");
    let addr = mtls_issuer(&server_ca, &client_ca).await;
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("server-ca.pem");
    write_file(&ca_file, &server_ca.ca_pem, 0o644);
    let mut files = Vec::new();
    for (name, ca) in [("good", &client_ca), ("wrong", &other_ca)] {
        let (cert_pem, key_pem, _, _) = leaf(ca, &["mtls-client"]);
        let cert = dir.path().join(format!("{name}.crt"));
        let key = dir.path().join(format!("{name}.key"));
        write_file(&cert, &cert_pem, 0o644);
        write_file(&key, &key_pem, 0o600);
        files.push((cert, key));
    }
    let config = auth_config(
        &format!("https://localhost:{}/token", addr.port()),
        "mtls-client",
        &upstream.url(),
    )
    .server(|s| {
        s.token_wait("2s")
            .extra_ca_file(ca_file.display().to_string())
    });
    let with_cert = |(cert, key): &(PathBuf, PathBuf)| {
        config.clone().p(|p| {
            p.client_auth("tls_client_auth")
                .client_cert_file(cert.display().to_string())
                .client_key_file(key.display().to_string())
        })
    };

    let proxy = Proxy::start_with(&with_cert(&files[0])).await;
    let answer = get(&client(), &proxy.url("/a")).await;
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    let auth = answer.echoed("authorization");
    assert!(auth[0].starts_with("Bearer mtls-mtls-client-"), "{auth:?}");
    proxy.stop().await;

    // The TLS alert the endpoint sent is in the 503.
    for (what, toml, why) in [
        ("wrong certificate", with_cert(&files[1]), "UnknownCA"),
        (
            "no certificate",
            config.clone().p(|p| p.client_secret("s")),
            "CertificateRequired",
        ),
    ] {
        let proxy = Proxy::start_with(&toml).await;
        let answer = get(&client(), &proxy.url("/a")).await;
        let text = String::from_utf8_lossy(&answer.body).into_owned();
        assert_eq!(answer.status, 503, "{what}: {text}");
        assert!(text.contains("token_unavailable"), "{what}: {text}");
        assert!(text.contains(why), "{what}: the 503 says why: {text}");
        proxy.stop().await;
    }
    assert_eq!(upstream.hits(), 1);
}

// === client_secret_command ===

/// An issuer that accepts only `expected` as the client secret and answers
/// `invalid_client` otherwise.
async fn secret_checking_issuer(
    expected: Arc<Mutex<String>>,
) -> (std::net::SocketAddr, Arc<Mutex<usize>>) {
    let hits: Arc<Mutex<usize>> = Arc::default();
    let counter = hits.clone();
    let addr = serve(move |req: Request<Incoming>| {
        let (expected, counter) = (expected.clone(), counter.clone());
        async move {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let fields: std::collections::HashMap<String, String> =
                url::form_urlencoded::parse(&body).into_owned().collect();
            let n = {
                let mut c = counter.lock().unwrap();
                *c += 1;
                *c
            };
            let ok = fields.get("client_secret") == Some(&*expected.lock().unwrap());
            let (status, answer) = if ok {
                (200, serde_json::json!({"access_token": format!("cmd-tok-{n}"), "expires_in": 3600}))
            } else {
                (401, serde_json::json!({"error": "invalid_client", "error_description": "client authentication failed"}))
            };
            Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(full(answer.to_string()))
                .unwrap()
        }
    })
    .await;
    (addr, hits)
}

fn secret_script(path: &Path, secret: &str) {
    // Written to a new file and renamed: the proxy may run it at any moment.
    let tmp = path.with_extension("tmp");
    write_file(
        &tmp,
        &format!("#!/bin/sh\nprintf '%s\\n' '{secret}'\n"),
        0o700,
    );
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test]
async fn rotated_secret_from_a_command_recovers_without_a_restart() {
    let expected = Arc::new(Mutex::new("first-secret-value".to_owned()));
    let (addr, hits) = secret_checking_issuer(expected.clone()).await;
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("secret.sh");
    secret_script(&script, "first-secret-value");
    let toml = auth_config(
        &format!("http://{addr}/token"),
        "cmd-client",
        &upstream.url(),
    )
    .server(|s| s.token_wait("3s"))
    .p(|p| p.client_secret_command([script.display().to_string()]));
    let proxy = Proxy::start_with(&toml).await;
    let answer = get(&client(), &proxy.url("/a")).await;
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    assert_eq!(answer.echoed("authorization"), ["Bearer cmd-tok-1"]);

    // The secret is regenerated: the issuer now wants the new one, the helper prints
    // it, and the old token is rejected upstream.
    *expected.lock().unwrap() = "second-secret-value".to_owned();
    secret_script(&script, "second-secret-value");
    upstream.reject("cmd-tok-1", 401);
    let mut recovered = None;
    for _ in 0..50 {
        let answer = get(&client(), &proxy.url("/b")).await;
        if answer.status == 200 {
            recovered = Some(answer);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let answer = recovered.expect("recovered after the secret was rotated");
    let auth = answer.echoed("authorization");
    assert!(auth[0].starts_with("Bearer cmd-tok-"), "{auth:?}");
    assert_ne!(auth[0], "Bearer cmd-tok-1");
    let p = &proxy.store.slot("p").unwrap().config;
    assert_eq!(p.client_secret.current().expose(), "second-secret-value");
    // One refused fetch with the old secret, then success: no storm.
    assert!(
        *hits.lock().unwrap() <= 4,
        "{} fetches",
        hits.lock().unwrap()
    );
    proxy.stop().await;
}

#[tokio::test]
async fn failing_or_silent_secret_command_is_an_error_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let failing = dir.path().join("fail.sh");
    write_file(
        &failing,
        "#!/bin/sh\necho 'leaked-in-output-value'\nexit 3\n",
        0o700,
    );
    let silent = dir.path().join("silent.sh");
    write_file(&silent, "#!/bin/sh\nexit 0\n", 0o700);
    let slow = dir.path().join("slow.sh");
    write_file(&slow, "#!/bin/sh\nexec sleep 30\n", 0o700);
    for (script, expect) in [
        (failing.display().to_string(), "failed"),
        (silent.display().to_string(), "printed no secret"),
        (slow.display().to_string(), "did not finish within"),
        ("/nonexistent/helper".to_owned(), "cannot run"),
    ] {
        let toml = auth_config("http://127.0.0.1:9/token", "c", "http://127.0.0.1:9")
            .server(|s| s.token_timeout("1s"))
            .p(|p| p.client_secret_command([script]))
            .render();
        let config = Config::parse(&toml, Path::new("t.toml"), &|_| None).unwrap();
        let started = std::time::Instant::now();
        let e = bearer_proxy::server::Server::bind(config)
            .await
            .err()
            .expect("start refused")
            .to_string();
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(e.contains("providers.p.client_secret_command"), "{e}");
        assert!(e.contains(expect), "{e}");
        assert!(!e.contains("leaked-in-output-value"), "{e}");

        // `check` runs the command too.
        let file = dir.path().join("check.toml");
        std::fs::write(&file, &toml).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_bearer-proxy"))
            .args(["check", "-c"])
            .arg(&file)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.status.code(), Some(1), "{text}");
        assert!(
            text.contains("providers.p.client_secret_command") && text.contains(expect),
            "{text}"
        );
        assert!(!text.contains("leaked-in-output-value"), "{text}");
    }
}
