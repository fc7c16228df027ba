//! No secret or token in anything the proxy prints or serves, even at trace level.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

use http::Request;

use crate::support::*;

const SECRET: &str = "S3cr3t+Value/with=chars&more";
/// What `client_secret_command` prints, before and after the secret is rotated.
const CMD_SECRETS: [&str; 2] = ["Cmd+First/S3cret=value", "Cmd+Second/S3cret=value"];

fn forms_of_secret() -> Vec<String> {
    let mut forms = Vec::new();
    for secret in [SECRET, CMD_SECRETS[0], CMD_SECRETS[1]] {
        let form: String = url::form_urlencoded::byte_serialize(secret.as_bytes()).collect();
        let json = serde_json::to_string(secret)
            .unwrap()
            .trim_matches('"')
            .to_owned();
        use base64::Engine;
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("leak-client:{form}"));
        forms.extend([secret.to_owned(), form, json, basic]);
    }
    forms
}

/// Writes the secret helper script: it prints `secret`.
fn secret_script(path: &std::path::Path, secret: &str) {
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("#!/bin/sh\nprintf '%s\\n' '{secret}'\n")).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn assert_clean(what: &str, text: &str, tokens: &[String]) {
    for secret in forms_of_secret() {
        assert!(
            !text.contains(&secret),
            "{what} holds the secret ({secret}):\n{text}"
        );
    }
    for token in tokens {
        assert!(!text.contains(token.as_str()), "{what} holds token {token}");
    }
    // Every JWT starts with this (`{"`): a client assertion, or its header, in the text.
    assert!(!text.contains("eyJ"), "{what} holds a JWT:\n{text}");
    // The issuer's tokens all start with this: catches any token, even unexpected ones.
    assert!(!text.contains("LEAKTOK"), "{what} holds a token:\n{text}");
}

#[tokio::test]
async fn trace_logs_admin_pages_and_check_never_show_secrets_or_tokens() {
    let issuer = Issuer::start_named(Dialect::OAuth2, "LEAKTOK").await;
    let upstream = Upstream::start().await;
    let (port, admin_port) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bp.toml");
    let script = dir.path().join("secret-helper.sh");
    secret_script(&script, CMD_SECRETS[0]);
    let key_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let key_pem = key_pair.serialize_pem();
    let key_file = dir.path().join("client.key");
    std::fs::write(&key_file, &key_pem).unwrap();
    let (url, up) = (issuer.url(), upstream.url());
    let provider = || {
        ProviderSection::default()
            .token_url(&url)
            .client_id("leak-client")
    };
    let config = TestConfig::default()
        .server(|s| {
            s.listen(format!("127.0.0.1:{port}"))
                .admin_listen(format!("127.0.0.1:{admin_port}"))
                .token_wait("300ms")
                .token_cache_dir(dir.path().join("cache").display().to_string())
        })
        .with_provider(
            "basic",
            provider()
                .client_secret(SECRET)
                .client_auth("basic")
                .invalidate_on([401]),
        )
        .with_provider(
            "body",
            provider()
                .client_secret(SECRET)
                .request_format("json")
                .audience("aud"),
        )
        .with_provider(
            "cmd",
            provider().client_secret_command([script.display().to_string()]),
        )
        .with_provider(
            "jwt",
            provider()
                .client_auth("private_key_jwt")
                .client_key_file(key_file.display().to_string()),
        )
        .route(RouteSection::to(&up, "basic").path_prefix("/basic"))
        .route(RouteSection::to(&up, "cmd").path_prefix("/cmd"))
        .route(RouteSection::to(&up, "jwt").path_prefix("/jwt"))
        .route(RouteSection::to(&up, "body").path_prefix("/body"));
    let toml = config.render();
    std::fs::write(&file, &toml).unwrap();
    let log_path = dir.path().join("stderr.log");
    let out_path = dir.path().join("stdout.log");
    let child = ChildGuard(
        Command::new(env!("CARGO_BIN_EXE_bearer-proxy"))
            .args(["--log-level", "trace", "run", "-c"])
            .arg(&file)
            .env_remove("RUST_LOG")
            .stdout(std::fs::File::create(&out_path).unwrap())
            .stderr(std::fs::File::create(&log_path).unwrap())
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let c = client();
    let base = format!("http://127.0.0.1:{port}");
    let admin = format!("http://127.0.0.1:{admin_port}");
    let mut up = false;
    for _ in 0..500 {
        if tokio::time::timeout(
            Duration::from_secs(1),
            c.request(
                Request::get(format!("{admin}/readyz"))
                    .body(full(""))
                    .unwrap(),
            ),
        )
        .await
        .is_ok_and(|r| r.is_ok_and(|r| r.status() == 200))
        {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(up, "proxy did not become ready");

    // Success, over HTTP/1.1 and h2c, with bodies.
    assert_eq!(get(&c, &format!("{base}/basic/a?q=1")).await.status, 200);
    assert_eq!(
        send(
            &c,
            Request::post(format!("{base}/body/b"))
                .body(full("payload"))
                .unwrap()
        )
        .await
        .status,
        200
    );
    let h2: Client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build_http();
    assert_eq!(get(&h2, &format!("{base}/basic/h2")).await.status, 200);
    assert_eq!(get(&c, &format!("{base}/cmd/a")).await.status, 200);
    assert_eq!(get(&c, &format!("{base}/jwt/a")).await.status, 200);
    let mut bodies = String::new();

    // The command's secret is rotated: the issuer answers invalid_client (echoing the
    // request), the proxy runs the command again and recovers with the new secret.
    secret_script(&script, CMD_SECRETS[1]);
    issuer.set_fault(Fault::EchoInvalidClient);
    for t in upstream.seen_auth().into_iter().flatten() {
        upstream.reject(t.trim_start_matches("Bearer "), 401);
    }
    // The first requests meet the upstream's 401 (and its echo, which holds the old
    // token: not collected); the next ones get the proxy's 503.
    for path in ["/cmd/r", "/jwt/r"] {
        let _ = get(&c, &format!("{base}{path}")).await;
    }
    for path in ["/cmd/t", "/jwt/t"] {
        let answer = get(&c, &format!("{base}{path}")).await;
        assert_eq!(answer.status, 503);
        bodies.push_str(&String::from_utf8_lossy(&answer.body));
    }
    assert!(bodies.contains("invalid_client"), "{bodies}");
    issuer.set_fault(Fault::None);
    // Both recover (the command's provider with its new secret), and the upstream sees
    // their new tokens, so the echo phase below can reject them.
    for path in ["/cmd/s", "/jwt/s"] {
        let mut recovered = false;
        for _ in 0..100 {
            if get(&c, &format!("{base}{path}")).await.status == 200 {
                recovered = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(recovered, "{path}: recovered without a restart");
    }
    let rotated: String = url::form_urlencoded::byte_serialize(CMD_SECRETS[1].as_bytes()).collect();
    assert!(
        issuer
            .state
            .requests
            .lock()
            .unwrap()
            .iter()
            .any(|r| r.body.contains(&rotated)),
        "the rotated secret was sent"
    );

    // Invalidation with replay: the basic provider's token is rejected once.
    let basic_token = upstream.seen_auth().into_iter().flatten().next().unwrap();
    upstream.reject(basic_token.trim_start_matches("Bearer "), 401);
    assert_eq!(
        send(
            &c,
            Request::post(format!("{base}/basic/c"))
                .body(full("again"))
                .unwrap()
        )
        .await
        .status,
        200
    );

    // Fetch failures whose error bodies echo the request (secret in the body and in
    // the Basic header), then a 503 carrying that error.
    issuer.set_fault(Fault::Echo(400));
    for t in upstream.seen_auth().into_iter().flatten() {
        upstream.reject(t.trim_start_matches("Bearer "), 401);
    }
    for path in ["/basic/d", "/body/e", "/cmd/d", "/jwt/d"] {
        let _ = get(&c, &format!("{base}{path}")).await;
    }
    for path in ["/basic/f", "/body/g", "/cmd/g", "/jwt/g"] {
        let answer = get(&c, &format!("{base}{path}")).await;
        bodies.push_str(&String::from_utf8_lossy(&answer.body));
    }
    assert!(bodies.contains("token_unavailable"), "{bodies}");
    assert!(
        bodies.contains("bad request: body was"),
        "the provider's words are kept: {bodies}"
    );

    // Admin pages.
    for page in ["/tokens", "/metrics", "/readyz", "/healthz"] {
        bodies.push_str(&String::from_utf8_lossy(
            &get(&c, &format!("{admin}{page}")).await.body,
        ));
    }
    // A bad reload (its error comes back and is logged), then SIGHUP.
    std::fs::write(
        &file,
        config
            .clone()
            .provider("body", |p| p.request_format("xml"))
            .render(),
    )
    .unwrap();
    let bad = send(
        &c,
        Request::post(format!("{admin}/reload"))
            .body(full(""))
            .unwrap(),
    )
    .await;
    assert_eq!(bad.status, 422);
    bodies.push_str(&String::from_utf8_lossy(&bad.body));
    std::fs::write(&file, &toml).unwrap();
    Command::new("kill")
        .args(["-HUP", &child.0.id().to_string()])
        .status()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = child.terminate().await;
    assert!(status.success(), "clean exit on SIGTERM: {status:?}");

    let mut logs = String::new();
    std::fs::File::open(&log_path)
        .unwrap()
        .read_to_string(&mut logs)
        .unwrap();
    std::fs::File::open(&out_path)
        .unwrap()
        .read_to_string(&mut logs)
        .unwrap();
    assert!(logs.contains("TRACE"), "really ran at trace level");
    assert!(logs.contains("token fetched") && logs.contains("config reloaded"));
    assert!(
        logs.contains("client secret read again"),
        "ran the command again"
    );
    // No line of the private key, in any output.
    let key_lines: Vec<&str> = key_pem
        .lines()
        .filter(|l| !l.starts_with("-----") && l.len() > 16)
        .collect();
    for text in [&logs, &bodies] {
        for line in &key_lines {
            assert!(!text.contains(line), "a private key line leaked:\n{text}");
        }
    }
    let tokens: Vec<String> = (1..=issuer.hits()).map(|n| issuer.token(n)).collect();
    assert!(tokens.len() >= 3);
    assert_clean("the proxy's logs", &logs, &tokens);
    assert_clean("answers and admin pages", &bodies, &tokens);

    // check, on the good file and on files with errors next to the secret.
    let mut check_out = String::new();
    let bad_key = config
        .clone()
        .provider("body", |p| p.unset("audience").set("audiance", "aud"))
        .render();
    // Broken TOML text: the secret's closing quote is missing, so the error is next to it.
    let quoted = format!("client_secret = \"{SECRET}\"");
    assert!(toml.contains(&quoted), "{toml}");
    let bad_syntax = toml.replacen(&quoted, &format!("client_secret = \"{SECRET}"), 1);
    for (i, text) in [toml.clone(), bad_key, bad_syntax].into_iter().enumerate() {
        let f = dir.path().join(format!("check{i}.toml"));
        std::fs::write(&f, text).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_bearer-proxy"))
            .args(["--log-level", "trace", "check", "-c"])
            .arg(&f)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(if i == 0 { 0 } else { 1 }));
        check_out.push_str(&String::from_utf8_lossy(&out.stdout));
        check_out.push_str(&String::from_utf8_lossy(&out.stderr));
    }
    assert_clean("check output", &check_out, &tokens);
}

/// Member references that must never leave the proxy except towards the issuer.
const KEYS: [&str; 3] = ["MBR-PRIVATE-4711", "MBR-REFUSED-0815", "MBR-ABSENT-2323"];

#[tokio::test]
async fn keys_never_reach_trace_logs_admin_pages_errors_cache_file_names_or_redis() {
    use crate::keyed::{Binding, KeyedIssuer};
    let redis = crate::fleet::Redis::start();
    let issuer = KeyedIssuer::start(Binding::LoyalifeScope).await;
    issuer.state.refuse.lock().unwrap().push(KEYS[1].to_owned());
    let upstream = Upstream::start().await;
    let (port, admin_port) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let file = dir.path().join("bp.toml");
    let toml = TestConfig::default()
        .store(StoreSection::redis(&redis.url()).key_prefix("leak:"))
        .server(|s| {
            s.listen(format!("127.0.0.1:{port}"))
                .admin_listen(format!("127.0.0.1:{admin_port}"))
                .token_wait("10s")
                .token_cache_dir(cache.display().to_string())
        })
        .with_provider(
            "member",
            ProviderSection::new(&issuer.url(), "leak-client", SECRET)
                .loyalife()
                .scope(r#"["LOGIN","{key}"]"#)
                .key_header("X-Loyalife-Member"),
        )
        .route(RouteSection::to(&upstream.url(), "member"))
        .render();
    std::fs::write(&file, &toml).unwrap();
    let log_path = dir.path().join("stderr.log");
    let child = ChildGuard(
        Command::new(env!("CARGO_BIN_EXE_bearer-proxy"))
            .args(["--log-level", "trace", "run", "-c"])
            .arg(&file)
            .env_remove("RUST_LOG")
            .stdout(std::fs::File::create(dir.path().join("stdout.log")).unwrap())
            .stderr(std::fs::File::create(&log_path).unwrap())
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let c = client();
    let (base, admin) = (
        format!("http://127.0.0.1:{port}"),
        format!("http://127.0.0.1:{admin_port}"),
    );
    let mut up = false;
    for _ in 0..500 {
        let probe = Request::get(format!("{admin}/healthz"))
            .body(full(""))
            .unwrap();
        if tokio::time::timeout(Duration::from_secs(1), c.request(probe))
            .await
            .is_ok_and(|r| r.is_ok_and(|r| r.status() == 200))
        {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(up, "proxy did not start");
    let member = |key: &str| {
        Request::get(format!("{base}/profile"))
            .header("X-Loyalife-Member", key)
            .body(full(""))
            .unwrap()
    };
    let mut bodies = String::new();
    // A member served, invalidated and replayed.
    let ok = send(&c, member(KEYS[0])).await;
    assert_eq!(ok.status, 200);
    upstream.reject(&issuer.token_for(KEYS[0]), 401);
    let replayed = send(&c, member(KEYS[0])).await;
    assert_eq!(
        replayed.status,
        200,
        "{}",
        String::from_utf8_lossy(&replayed.body)
    );
    // A member the issuer refuses with an answer echoing the request.
    let refused = send(&c, member(KEYS[1])).await;
    assert_eq!(refused.status, 503);
    // Malformed keys carrying a real key.
    for bad in [format!("{} x", KEYS[2]), format!("{}\"", KEYS[2])] {
        let answer = send(&c, member(&bad)).await;
        assert_eq!(answer.status, 400);
        bodies.push_str(&String::from_utf8_lossy(&answer.body));
    }
    bodies.push_str(&String::from_utf8_lossy(&ok.body));
    bodies.push_str(&String::from_utf8_lossy(&refused.body));
    for page in ["/tokens", "/metrics", "/readyz"] {
        bodies.push_str(&String::from_utf8_lossy(
            &get(&c, &format!("{admin}{page}")).await.body,
        ));
    }
    // The CLI, at trace level, for a member.
    let out = Command::new(env!("CARGO_BIN_EXE_bearer-proxy"))
        .args([
            "--log-level",
            "trace",
            "token",
            "member",
            "--key",
            KEYS[0],
            "-c",
        ])
        .arg(&file)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert_eq!(
        printed,
        issuer.token_for(KEYS[0]),
        "the member's cached token"
    );
    let mut logs = String::from_utf8_lossy(&out.stderr).into_owned();

    let status = child.terminate().await;
    assert!(status.success());
    std::fs::File::open(&log_path)
        .unwrap()
        .read_to_string(&mut logs)
        .unwrap();
    assert!(logs.contains("TRACE") && logs.contains("token fetched"));
    assert!(
        bodies.contains("invalid_scope"),
        "the provider's words are kept: {bodies}"
    );

    let mut names = String::new();
    for entry in std::fs::read_dir(&cache).unwrap() {
        let entry = entry.unwrap();
        names.push_str(&entry.file_name().to_string_lossy());
        names.push_str(&std::fs::read_to_string(entry.path()).unwrap());
    }
    let mut conn = redis.conn().await;
    let redis_keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!redis_keys.is_empty());
    for key in &redis_keys {
        names.push_str(key);
        let value: Option<String> = redis::cmd("GET")
            .arg(key)
            .query_async(&mut conn)
            .await
            .unwrap_or(None);
        names.push_str(&value.unwrap_or_default());
    }
    for (what, text) in [
        ("the logs", &logs),
        ("answers and admin pages", &bodies),
        ("cache files and redis", &names),
    ] {
        for key in KEYS {
            assert!(!text.contains(key), "{what} hold key {key}:\n{text}");
            assert!(
                !text.contains(&key[4..]),
                "{what} hold part of key {key}:\n{text}"
            );
        }
        assert_clean(what, text, &[]);
    }
}
