//! The real binary: `check`, `token`, `demo`, exit codes, `BEARER_PROXY_CONFIG`.
//!
//! Children run through `std::process` (the crate's tokio has no `process` feature);
//! every child is killed when its guard drops and every wait is bounded.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::{timeout, Instant};

use crate::support;

const BIN: &str = env!("CARGO_BIN_EXE_bearer-proxy");
const LIMIT: Duration = Duration::from_secs(20);

/// Kills and reaps the child when dropped, whatever path the test takes.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The binary with a clean environment for what it reads.
fn command(args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("BEARER_PROXY_CONFIG")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Reads a pipe to its end on a thread; the receiver gets the text.
fn drain(mut pipe: impl Read + Send + 'static) -> oneshot::Receiver<String> {
    let (tx, rx) = oneshot::channel();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        let _ = tx.send(String::from_utf8_lossy(&buf).into_owned());
    });
    rx
}

/// Reads a pipe line by line on a thread; the receiver gets each line as it comes.
fn line_by_line(pipe: impl Read + Send + 'static) -> mpsc::UnboundedReceiver<String> {
    let (tx, lines) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    lines
}

/// `run` on a basic config (one provider, one route) at `level`, listening on a free
/// port, waited for until it accepts connections; its stderr is left for the caller.
async fn run_basic(level: &str) -> (Guard, u16, support::Issuer, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let issuer = support::Issuer::start(support::Dialect::OAuth2).await;
    let upstream = support::Upstream::start().await;
    let port = support::free_port();
    let toml = support::TestConfig::basic(&issuer, &upstream)
        .server(|s| s.listen(format!("127.0.0.1:{port}")))
        .render();
    let config = write(dir.path(), "run.toml", &toml);
    let guard = Guard(
        command(&["--log-level", level, "run", "-c", &config])
            .spawn()
            .expect("spawn bearer-proxy run"),
    );
    let deadline = Instant::now() + LIMIT;
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "the proxy did not listen in time"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Dropping the handle leaves the upstream's server task serving.
    drop(upstream);
    (guard, port, issuer, dir)
}

/// Waits for the child to exit, polling so the runtime stays free, within `LIMIT`.
async fn wait_exit(guard: &mut Guard, deadline: Instant) -> ExitStatus {
    loop {
        if let Some(status) = guard.0.try_wait().expect("try_wait") {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "bearer-proxy did not exit in time"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

struct Output {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Output {
    fn code(&self) -> Option<i32> {
        self.status.code()
    }
}

impl std::fmt::Debug for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "status {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// Runs `cmd` to completion within `LIMIT`, without blocking the runtime.
async fn run(mut cmd: Command) -> Output {
    let deadline = Instant::now() + LIMIT;
    let mut guard = Guard(cmd.spawn().expect("spawn bearer-proxy"));
    let stdout = drain(guard.0.stdout.take().unwrap());
    let stderr = drain(guard.0.stderr.take().unwrap());
    let status = wait_exit(&mut guard, deadline).await;
    let left = deadline.saturating_duration_since(Instant::now());
    let (stdout, stderr) = timeout(left, async {
        (stdout.await.unwrap(), stderr.await.unwrap())
    })
    .await
    .expect("output pipes did not close in time");
    Output {
        status,
        stdout,
        stderr,
    }
}

async fn bin(args: &[&str]) -> Output {
    run(command(args)).await
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

const GOOD: &str = r#"
[server]
listen = "127.0.0.1:18080"

[providers.wll]
token_url = "https://auth.wlloyalty.net/oauth/token"
client_id = "wll-client"
client_secret = "${CLI_TEST_SECRET}"
audience = "staging.wlloyalty.net"
request_format = "json"

[providers.lonewolf]
token_url = "https://gateway.lwolf.com/oauth/token"
client_id = "lw-client"
client_secret = "literal-lonewolf-secret"

[[routes]]
path_prefix = "/wll"
upstream = "https://api.staging.wlloyalty.net/api/v1"
provider = "wll"

[[routes]]
listen = "127.0.0.1:18082"
upstream = "https://backoffice.api.dev.lwolf.com"
provider = "lonewolf"

[[routes]]
path_prefix = "/public"
upstream = "https://public.example.com"
"#;

const ENV_SECRET: &str = "env-secret-for-check";

fn assert_no_secret(out: &Output) {
    for secret in [ENV_SECRET, "literal-lonewolf-secret"] {
        assert!(
            !out.stdout.contains(secret),
            "stdout leaks a secret: {out:?}"
        );
        assert!(
            !out.stderr.contains(secret),
            "stderr leaks a secret: {out:?}"
        );
    }
}

// === check ===

#[tokio::test]
async fn check_prints_routes_and_providers_and_no_secret() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "good.toml", GOOD);
    let mut cmd = command(&["check", "-c", &file]);
    cmd.env("CLI_TEST_SECRET", ENV_SECRET);
    let out = run(cmd).await;
    assert_eq!(out.code(), Some(0), "{out:?}");
    for needle in [
        "127.0.0.1:18080",
        "127.0.0.1:18082",
        "/wll",
        "/public",
        "https://api.staging.wlloyalty.net/api/v1",
        "https://backoffice.api.dev.lwolf.com",
        "wll",
        "lonewolf",
        "https://auth.wlloyalty.net/oauth/token",
        "https://gateway.lwolf.com/oauth/token",
    ] {
        assert!(
            out.stdout.contains(needle),
            "stdout lacks {needle:?}: {out:?}"
        );
    }
    assert_no_secret(&out);
}

#[tokio::test]
async fn check_on_a_bad_config_exits_1_naming_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "bad.toml",
        &GOOD.replace("provider = \"lonewolf\"", "provider = \"lonewolff\""),
    );
    let mut cmd = command(&["check", "-c", &file]);
    cmd.env("CLI_TEST_SECRET", ENV_SECRET);
    let out = run(cmd).await;
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(
        out.stderr.contains(&file),
        "stderr does not name the file: {out:?}"
    );
    assert!(
        out.stderr.contains("routes[1].provider"),
        "stderr does not name the key: {out:?}"
    );
    assert!(out.stderr.contains("lonewolff"), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    assert_no_secret(&out);
}

#[tokio::test]
async fn check_with_a_missing_env_var_names_the_variable_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "good.toml", GOOD);
    let out = bin(&["check", "-c", &file]).await;
    assert_eq!(out.code(), Some(1), "{out:?}");
    for needle in [
        file.as_str(),
        "CLI_TEST_SECRET",
        "providers.wll.client_secret",
    ] {
        assert!(
            out.stderr.contains(needle),
            "stderr lacks {needle:?}: {out:?}"
        );
    }
}

#[tokio::test]
async fn check_with_an_unknown_key_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "typo.toml",
        &GOOD.replace("request_format = \"json\"", "request_fromat = \"json\""),
    );
    let mut cmd = command(&["check", "-c", &file]);
    cmd.env("CLI_TEST_SECRET", ENV_SECRET);
    let out = run(cmd).await;
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(out.stderr.contains(&file), "{out:?}");
    assert!(out.stderr.contains("request_fromat"), "{out:?}");
    assert!(out.stderr.contains("providers.wll"), "{out:?}");
}

#[tokio::test]
async fn check_on_a_syntax_error_does_not_quote_a_literal_secret() {
    let dir = tempfile::tempdir().unwrap();
    // The closing quote of the literal secret is missing.
    let file = write(
        dir.path(),
        "broken.toml",
        &GOOD.replace("\"literal-lonewolf-secret\"", "\"literal-lonewolf-secret"),
    );
    let mut cmd = command(&["check", "-c", &file]);
    cmd.env("CLI_TEST_SECRET", ENV_SECRET);
    let out = run(cmd).await;
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(out.stderr.contains(&file), "{out:?}");
    assert!(out.stderr.contains("line 15"), "{out:?}");
    assert_no_secret(&out);
}

#[tokio::test]
async fn check_on_a_missing_file_exits_1_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("absent.toml");
    let out = bin(&["check", "-c", file.to_str().unwrap()]).await;
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(out.stderr.contains("absent.toml"), "{out:?}");
}

#[tokio::test]
async fn usage_errors_exit_2() {
    let out = bin(&["check", "--no-such-flag"]).await;
    assert_eq!(out.code(), Some(2), "{out:?}");
    let out = bin(&["no-such-command"]).await;
    assert_eq!(out.code(), Some(2), "{out:?}");
    let out = bin(&["--log-format", "xml", "check"]).await;
    assert_eq!(out.code(), Some(2), "{out:?}");
    let out = bin(&["token"]).await;
    assert_eq!(out.code(), Some(2), "token without a provider: {out:?}");
}

// === BEARER_PROXY_CONFIG ===

#[tokio::test]
async fn check_without_c_uses_bearer_proxy_config() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "from-env.toml", GOOD);
    let empty = tempfile::tempdir().unwrap();
    let mut cmd = command(&["check"]);
    cmd.current_dir(empty.path())
        .env("BEARER_PROXY_CONFIG", &file)
        .env("CLI_TEST_SECRET", ENV_SECRET);
    let out = run(cmd).await;
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(out.stdout.contains("from-env.toml"), "{out:?}");
    assert!(out.stdout.contains("lonewolf"), "{out:?}");
}

#[tokio::test]
async fn c_overrides_bearer_proxy_config() {
    let dir = tempfile::tempdir().unwrap();
    let good = write(dir.path(), "good.toml", GOOD);
    let bad = write(dir.path(), "bad.toml", "not toml at all [");
    let mut cmd = command(&["check", "-c", &good]);
    cmd.env("BEARER_PROXY_CONFIG", &bad)
        .env("CLI_TEST_SECRET", ENV_SECRET);
    let out = run(cmd).await;
    assert_eq!(out.code(), Some(0), "{out:?}");
}

#[tokio::test]
async fn check_without_any_config_looks_for_bearer_proxy_toml() {
    let empty = tempfile::tempdir().unwrap();
    let mut cmd = command(&["check"]);
    cmd.current_dir(empty.path());
    let out = run(cmd).await;
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(out.stderr.contains("bearer-proxy.toml"), "{out:?}");
}

// === token ===

/// Provider `p` at `issuer` as `cli-client`, and a route nobody serves.
fn typed_token_config(issuer: &support::Issuer) -> support::TestConfig {
    support::TestConfig::default()
        .with_provider(
            "p",
            support::ProviderSection::new(&issuer.url(), "cli-client", "cli-secret-value"),
        )
        .route(support::RouteSection::to("http://127.0.0.1:1", "p"))
}

fn token_config(issuer: &support::Issuer) -> String {
    typed_token_config(issuer).render()
}

#[tokio::test]
async fn token_prints_only_the_token() {
    let issuer = support::Issuer::start(support::Dialect::OAuth2).await;
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "token.toml", &token_config(&issuer));
    let out = bin(&["token", "-c", &file, "p"]).await;
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert_eq!(out.stdout, format!("{}\n", issuer.token(1)), "{out:?}");
    assert_eq!(issuer.hits(), 1);
    assert!(issuer.last_request().body.contains("cli-client"));
    assert!(!out.stderr.contains("cli-secret-value"), "{out:?}");
    assert!(
        !out.stderr.contains(&issuer.token(1)),
        "the token reached a log line: {out:?}"
    );
}

#[tokio::test]
async fn token_for_an_unknown_provider_exits_1() {
    let issuer = support::Issuer::start(support::Dialect::OAuth2).await;
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "token.toml", &token_config(&issuer));
    let out = bin(&["token", "-c", &file, "nope"]).await;
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    assert!(out.stderr.contains("nope"), "{out:?}");
    assert!(out.stderr.contains(&file), "{out:?}");
    assert_eq!(issuer.hits(), 0);
}

#[tokio::test]
async fn token_when_the_issuer_refuses_exits_1_with_nothing_on_stdout() {
    let issuer = support::Issuer::start(support::Dialect::OAuth2).await;
    issuer.set_fault(support::Fault::Status(
        401,
        r#"{"error":"invalid_client","error_description":"bad secret cli-secret-value"}"#
            .to_owned(),
    ));
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "token.toml", &token_config(&issuer));
    let out = bin(&["token", "-c", &file, "p"]).await;
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    assert!(
        out.stderr.contains("401") || out.stderr.contains("invalid_client"),
        "{out:?}"
    );
    assert!(
        !out.stderr.contains("cli-secret-value"),
        "stderr leaks the secret: {out:?}"
    );
}

/// `token_config`'s provider with a token cache directory and `refresh_before`.
fn cached_token_config(issuer: &support::Issuer, cache: &Path, refresh_before: &str) -> String {
    typed_token_config(issuer)
        .server(|s| s.token_cache_dir(cache.display().to_string()))
        .p(|p| p.refresh_before(refresh_before))
        .render()
}

#[tokio::test]
async fn token_reuses_the_cached_token_and_the_proxy_reads_the_file_it_writes() {
    let issuer = support::Issuer::start(support::Dialect::OAuth2).await;
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let toml = cached_token_config(&issuer, &cache, "10%");
    let file = write(dir.path(), "token.toml", &toml);
    for _ in 0..2 {
        let out = bin(&["token", "-c", &file, "p"]).await;
        assert_eq!(out.code(), Some(0), "{out:?}");
        assert_eq!(out.stdout, format!("{}\n", issuer.token(1)), "{out:?}");
    }
    assert_eq!(issuer.hits(), 1, "the second run used the cache");
    let files: Vec<_> = std::fs::read_dir(&cache).unwrap().collect();
    assert_eq!(files.len(), 1, "{files:?}");
    // The proxy starts with the token the command cached, without a fetch.
    let proxy = support::Proxy::start(&toml).await;
    let slot = proxy.store.slot("p").unwrap();
    let token = slot.current().expect("the cached token");
    assert_eq!(
        token.header_value().to_str().unwrap(),
        format!("Bearer {}", issuer.token(1))
    );
    assert_eq!(issuer.hits(), 1);
    proxy.stop().await;
}

#[tokio::test]
async fn token_fetches_again_once_the_proxy_would_refresh_the_cached_token() {
    let issuer = support::Issuer::start(support::Dialect::OAuth2).await;
    issuer.set_lifetime(20.0);
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    // Refreshed 18 s before its expiry: due 2 s after the fetch, valid for 20 s.
    let file = write(
        dir.path(),
        "token.toml",
        &cached_token_config(&issuer, &cache, "90%"),
    );
    let out = bin(&["token", "-c", &file, "p"]).await;
    assert_eq!(out.stdout, format!("{}\n", issuer.token(1)), "{out:?}");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let out = bin(&["token", "-c", &file, "p"]).await;
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert_eq!(out.stdout, format!("{}\n", issuer.token(2)), "{out:?}");
    assert_eq!(issuer.hits(), 2);
    // The new token replaced the old one in the cache (read with a short lead, so a
    // slow machine cannot make it due; `refresh_before` does not name the file).
    let file = write(
        dir.path(),
        "token.toml",
        &cached_token_config(&issuer, &cache, "10%"),
    );
    let out = bin(&["token", "-c", &file, "p"]).await;
    assert_eq!(out.stdout, format!("{}\n", issuer.token(2)), "{out:?}");
    assert_eq!(issuer.hits(), 2);
}

// === demo ===

#[tokio::test]
async fn demo_serves_and_adds_a_bearer_token() {
    let deadline = Instant::now() + LIMIT;
    let mut guard = Guard(
        command(&["demo", "--listen", "127.0.0.1:0"])
            .spawn()
            .expect("spawn bearer-proxy demo"),
    );
    let stderr = drain(guard.0.stderr.take().unwrap());
    let mut lines = line_by_line(guard.0.stdout.take().unwrap());

    // The first curl line is the GET.
    let mut seen = Vec::new();
    let curl = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match timeout(left, lines.recv()).await {
            Ok(Some(line)) if line.starts_with("curl -s http://") => break line,
            Ok(Some(line)) => seen.push(line),
            Ok(None) => panic!("demo exited before printing curl lines; stdout: {seen:?}"),
            Err(_) => panic!("no curl line from the demo in time; stdout: {seen:?}"),
        }
    };
    let url = curl
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .expect("a URL in the curl line")
        .to_owned();

    let left = deadline.saturating_duration_since(Instant::now());
    let answer = timeout(left, support::get(&support::client(), &url))
        .await
        .expect("demo did not answer in time");
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    let auth = answer.echoed("authorization");
    assert!(
        auth.iter().any(|v| v.starts_with("Bearer ")),
        "no bearer token reached the echo upstream: {auth:?}"
    );

    // A clean shutdown on SIGTERM exits 0.
    let pid = guard.0.id().to_string();
    let killed = Command::new("kill").args(["-TERM", &pid]).status();
    assert!(
        killed.is_ok_and(|s| s.success()),
        "cannot send SIGTERM to the demo"
    );
    {
        let status = wait_exit(&mut guard, deadline).await;
        let left = deadline.saturating_duration_since(Instant::now());
        let log = timeout(left, stderr)
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        assert_eq!(
            status.code(),
            Some(0),
            "demo did not exit cleanly on SIGTERM; stderr:\n{log}"
        );
        assert!(
            !log.contains("demo-secret"),
            "the demo's secret reached a log line:\n{log}"
        );
    }
}

// === run ===

/// At `info` every request writes an access line. Those lines go out from a thread of
/// their own: with stderr a pipe nobody reads (a stalled log collector), the 64 KiB pipe
/// fills after a few hundred lines, and requests must still be answered rather than
/// wait on a blocked `write(2)` on a worker thread. Once the reader catches up, every
/// line is there.
#[tokio::test]
async fn requests_are_answered_while_nobody_reads_the_log_and_no_line_is_lost() {
    const REQUESTS: usize = 2_000;
    let (mut guard, port, issuer, _dir) = run_basic("info").await;
    // Held open and not read until every request has been answered.
    let stderr = guard.0.stderr.take().unwrap();

    let client = support::client();
    let url = format!("http://127.0.0.1:{port}/logged");
    let deadline = Instant::now() + Duration::from_secs(60);
    for n in 0..REQUESTS {
        let left = deadline.saturating_duration_since(Instant::now());
        let answer = timeout(left, support::get(&client, &url))
            .await
            .unwrap_or_else(|_| panic!("request {n} waited on the unread log"));
        assert_eq!(answer.status, 200, "request {n}");
    }

    // A clean stop writes out what is still queued.
    let log = drain(stderr);
    let pid = guard.0.id().to_string();
    let killed = Command::new("kill").args(["-TERM", &pid]).status();
    assert!(killed.is_ok_and(|s| s.success()), "cannot send SIGTERM");
    let status = wait_exit(&mut guard, Instant::now() + LIMIT).await;
    assert_eq!(status.code(), Some(0));
    let log = timeout(LIMIT, log).await.unwrap().unwrap();
    let access_lines = log.lines().filter(|l| l.contains("/logged")).count();
    assert!(
        access_lines >= REQUESTS,
        "{access_lines} access lines for {REQUESTS} requests"
    );
    assert_eq!(issuer.hits(), 1);
}

/// A config with `[server]` and provider `p` (its secret from `CLI_TEST_SECRET`) as the
/// edits change them, written to `preflight.toml`.
fn preflight_config(
    dir: &Path,
    server: impl FnOnce(support::ServerSection) -> support::ServerSection,
    provider: impl FnOnce(support::ProviderSection) -> support::ProviderSection,
) -> String {
    let config = support::TestConfig::default()
        .server(server)
        .with_provider(
            "p",
            support::ProviderSection::new(
                "https://issuer.example/token",
                "id",
                "${CLI_TEST_SECRET}",
            ),
        )
        .p(provider)
        .route(support::RouteSection::to("https://api.example", "p"));
    write(dir, "preflight.toml", &config.render())
}

/// `check` and `run` both exit 1 on `file`, naming it, `key` and `named`, each once.
async fn refused_by_check_and_run(file: &str, key: &str, named: &str, problem: &str) {
    for verb in ["check", "run"] {
        let mut cmd = command(&[verb, "-c", file]);
        cmd.env("CLI_TEST_SECRET", ENV_SECRET);
        let out = run(cmd).await;
        assert_eq!(out.code(), Some(1), "{verb}: {out:?}");
        let error = out
            .stderr
            .lines()
            .find(|l| l.starts_with("error:"))
            .unwrap_or_else(|| panic!("{verb}: no error line: {out:?}"));
        assert!(error.contains(&format!("{file}: {key}")), "{verb}: {error}");
        assert!(error.contains(named), "{verb}: {error}");
        assert_eq!(error.matches(problem).count(), 1, "{verb}: {error}");
        assert!(out.stdout.is_empty(), "{verb}: {out:?}");
        assert_no_secret(&out);
    }
}

#[tokio::test]
async fn check_refuses_a_missing_extra_ca_file_as_run_does() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("missing-ca.pem");
    let file = preflight_config(
        dir.path(),
        |s| s.extra_ca_file(ca.display().to_string()),
        |p| p,
    );
    let named = ca.display().to_string();
    refused_by_check_and_run(
        &file,
        "server.extra_ca_file",
        &named,
        "No such file or directory",
    )
    .await;
}

#[tokio::test]
async fn check_refuses_an_extra_ca_file_without_a_certificate_as_run_does() {
    let dir = tempfile::tempdir().unwrap();
    let ca = write(dir.path(), "not-a-ca.pem", "this is no certificate\n");
    let file = preflight_config(dir.path(), |s| s.extra_ca_file(&ca), |p| p);
    refused_by_check_and_run(
        &file,
        "server.extra_ca_file",
        &ca,
        "no usable PEM certificate",
    )
    .await;
}

#[tokio::test]
async fn check_refuses_a_world_writable_token_cache_dir_as_run_does() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    std::fs::create_dir(&cache).unwrap();
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o777)).unwrap();
    let file = preflight_config(
        dir.path(),
        |s| s.token_cache_dir(cache.display().to_string()),
        |p| p,
    );
    let named = cache.display().to_string();
    refused_by_check_and_run(&file, "server.token_cache_dir", &named, "mode 777").await;
}

#[tokio::test]
async fn check_refuses_a_token_cache_dir_that_is_a_file_as_run_does() {
    let dir = tempfile::tempdir().unwrap();
    let cache = write(dir.path(), "cache", "");
    let file = preflight_config(dir.path(), |s| s.token_cache_dir(&cache), |p| p);
    refused_by_check_and_run(&file, "server.token_cache_dir", &cache, "not a directory").await;
}

#[tokio::test]
async fn check_refuses_an_unreadable_client_secret_file_as_run_does() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("missing-secret");
    let file = preflight_config(
        dir.path(),
        |s| s,
        |p| {
            p.unset("client_secret")
                .client_secret_file(secret.display().to_string())
        },
    );
    let named = secret.display().to_string();
    refused_by_check_and_run(
        &file,
        "providers.p.client_secret_file",
        &named,
        "No such file or directory",
    )
    .await;
}

#[tokio::test]
async fn check_passes_a_config_whose_files_are_fine() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["ca.test".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let ca = write(dir.path(), "ca.pem", &cert.pem());
    let cache = dir.path().join("cache");
    std::fs::create_dir(&cache).unwrap();
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o700)).unwrap();
    let file = preflight_config(
        dir.path(),
        |s| {
            s.extra_ca_file(&ca)
                .token_cache_dir(cache.display().to_string())
        },
        |p| p,
    );
    let mut cmd = command(&["check", "-c", &file]);
    cmd.env("CLI_TEST_SECRET", ENV_SECRET);
    let out = run(cmd).await;
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(out.stdout.contains(": OK"), "{out:?}");
}

/// After a burst of connections, once nothing has moved for a second, the running
/// proxy gives the memory the burst freed back to the OS (glibc only: elsewhere the
/// allocator does it by itself and the task does nothing).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[tokio::test]
async fn memory_freed_by_a_burst_goes_back_to_the_os_once_quiet() {
    const CONNS: usize = 200;
    let (mut guard, port, _issuer, _dir) = run_basic("debug").await;
    let mut lines = line_by_line(guard.0.stderr.take().unwrap());

    // The burst: every connection makes one request and stays open.
    let mut held = Vec::new();
    let request = format!("GET /burst HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n");
    for _ in 0..CONNS {
        let mut s = timeout(LIMIT, tokio::net::TcpStream::connect(("127.0.0.1", port)))
            .await
            .expect("connect in time")
            .expect("connect");
        tokio::io::AsyncWriteExt::write_all(&mut s, request.as_bytes())
            .await
            .expect("write");
        held.push(s);
    }
    for s in &mut held {
        let mut head = [0u8; 12];
        timeout(LIMIT, tokio::io::AsyncReadExt::read_exact(s, &mut head))
            .await
            .expect("answer in time")
            .expect("read");
        assert_eq!(&head, b"HTTP/1.1 200");
    }

    // Quiet now: the trim comes within a few seconds, and it released pages.
    let trimmed = timeout(Duration::from_secs(15), async {
        while let Some(line) = lines.recv().await {
            if line.contains("gave freed memory back to the OS") {
                return line;
            }
        }
        panic!("the log ended without a trim");
    })
    .await
    .expect("a trim within 15 s of the burst");
    assert!(trimmed.contains("released=true"), "{trimmed}");
    // Idle from then on: no more trims (the trim's own bookkeeping once made one every
    // two seconds).
    let more = timeout(Duration::from_secs(5), async {
        while let Some(line) = lines.recv().await {
            if line.contains("gave freed memory back to the OS") {
                return line;
            }
        }
        std::future::pending().await
    })
    .await;
    assert!(more.is_err(), "trimmed again while idle: {more:?}");
    drop(held);
}
