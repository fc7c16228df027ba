//! Unix socket listeners: the file's mode, HTTP/1.1 and h2c through the same request
//! path as TCP (a hyper client on a `UnixStream`, and curl), other users refused by the
//! file's permissions and by `allowed_uids`, stale files replaced, a live socket kept,
//! the file removed on shutdown.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use bearer_proxy::server::Server;
use http::Request;
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::UnixStream;
use tokio::sync::oneshot;

use crate::interop::require;
use crate::support::*;

/// A config serving one provider route on `unix:<dir>/proxy.sock`.
fn unix_config(dir: &Path, issuer: &Issuer, upstream: &Upstream) -> TestConfig {
    TestConfig::basic(issuer, upstream)
        .server(|s| {
            s.listen(format!("unix:{}/proxy.sock", dir.display()))
                .token_wait("5s")
        })
        .edit_route(0, |r| r.upstream(format!("{}/v1", upstream.url())))
}

/// A proxy serving `toml` in this process; `stop` shuts it down and waits.
struct Running {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    async fn start(toml: &TestConfig) -> Self {
        let config = toml.parse();
        let server = Server::bind(config).await.expect("bind");
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));
        Self { stop, task }
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(15), self.task)
            .await
            .expect("stopped in time")
            .expect("server task");
    }
}

/// `GET path` over HTTP/1.1 on the socket at `sock`: status and body.
async fn http1_get(sock: &Path, path: &str) -> (u16, serde_json::Value) {
    let stream = UnixStream::connect(sock).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("http1 handshake");
    tokio::spawn(conn);
    let req = Request::get(path)
        .header("host", "localhost")
        .body(full(""))
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(15), sender.send_request(req))
        .await
        .expect("answer in time")
        .expect("response");
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&body).unwrap_or_default())
}

/// `curl --unix-socket sock http://localhost<path>`, as `user` when given: the status
/// code (`000` when curl could not connect) and the body.
async fn curl(sock: &Path, path: &str, user: Option<&str>, extra: &[&str]) -> (String, String) {
    let mut cmd = match user {
        Some(user) => {
            let mut cmd = tokio::process::Command::new("runuser");
            cmd.args(["-u", user, "--", "curl"]);
            cmd
        }
        None => tokio::process::Command::new("curl"),
    };
    cmd.args(["-s", "-m", "15", "-w", "\n%{http_code}", "--unix-socket"])
        .arg(sock)
        .args(extra)
        .arg(format!("http://localhost{path}"))
        .stdin(Stdio::null());
    let out = cmd.output().await.expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.to_owned(), body.to_owned())
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

#[tokio::test]
async fn serves_http1_and_h2c_on_a_0600_socket_and_removes_it_on_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let Servers { issuer, upstream } = Servers::start(Dialect::OAuth2).await;
    let admin_sock = dir.path().join("admin.sock");
    let toml = unix_config(dir.path(), &issuer, &upstream)
        .server(|s| s.admin_listen(format!("unix:{}", admin_sock.display())));
    let running = Running::start(&toml).await;
    let sock = dir.path().join("proxy.sock");
    for path in [&sock, &admin_sock] {
        let meta = std::fs::metadata(path).unwrap();
        assert!(meta.file_type().is_socket(), "{}", path.display());
        assert_eq!(
            meta.permissions().mode() & 0o777,
            0o600,
            "{}",
            path.display()
        );
    }

    // HTTP/1.1 from a hyper client on a UnixStream: routed, token added, path kept.
    let (status, echoed) = http1_get(&sock, "/users?id=1").await;
    assert_eq!(status, 200, "{echoed}");
    assert_eq!(echoed["uri"], "/v1/users?id=1");
    assert!(echoed["headers"]
        .as_array()
        .unwrap()
        .iter()
        .any(|h| h[0] == "authorization" && h[1] == format!("Bearer {}", issuer.token(1))));
    // The same request path as TCP: path hardening applies.
    let (status, refused) = http1_get(&sock, "/x/..;/admin").await;
    assert_eq!(status, 400);
    assert_eq!(refused["error"], "bad_request");

    // h2c (prior knowledge) over the socket.
    let stream = UnixStream::connect(&sock).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2c handshake");
    tokio::spawn(conn);
    let req = Request::get("http://localhost/h2").body(full("")).unwrap();
    let response = sender.send_request(req).await.expect("h2 response");
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let echoed: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(echoed["uri"], "/v1/h2");

    // curl, the client side the docs show, over HTTP/1.1 and h2c, and the admin socket.
    if require("curl").is_some() {
        let (code, body) = curl(&sock, "/curl", None, &[]).await;
        assert_eq!(code, "200", "{body}");
        assert!(body.contains("/v1/curl"), "{body}");
        let (code, body) = curl(&sock, "/curl2", None, &["--http2-prior-knowledge"]).await;
        assert_eq!(code, "200", "{body}");
        assert!(body.contains("/v1/curl2"), "{body}");
        let (code, body) = curl(&admin_sock, "/healthz", None, &[]).await;
        assert_eq!(code, "200", "{body}");
    }
    assert_eq!(
        issuer.hits(),
        1,
        "one token for every listener and protocol"
    );

    running.stop().await;
    assert!(!sock.exists(), "the socket file is removed on shutdown");
    assert!(
        !admin_sock.exists(),
        "the admin socket file is removed on shutdown"
    );
}

#[tokio::test]
async fn other_users_are_refused_by_the_mode_and_by_allowed_uids() {
    if !is_root() {
        eprintln!("SKIPPED: needs root to run curl as another user (runuser -u nobody)");
        return;
    }
    if require("curl").is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Let others reach the directory, so the socket's own mode is what decides.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let Servers { issuer, upstream } = Servers::start(Dialect::OAuth2).await;
    let sock = dir.path().join("proxy.sock");

    // Default mode 0600: nobody cannot even connect; root (the owner) can.
    let running = Running::start(&unix_config(dir.path(), &issuer, &upstream)).await;
    let (code, _) = curl(&sock, "/x", Some("nobody"), &[]).await;
    assert_eq!(code, "000", "nobody connected to a 0600 socket");
    let (code, body) = curl(&sock, "/x", None, &[]).await;
    assert_eq!(code, "200", "{body}");
    running.stop().await;
    assert_eq!(upstream.hits(), 1);

    // Mode 0666 lets nobody connect; allowed_uids = [0] answers it 403.
    let running = Running::start(
        &unix_config(dir.path(), &issuer, &upstream)
            .server(|s| s.unix_socket_mode("0666").allowed_uids([0])),
    )
    .await;
    let meta = std::fs::metadata(&sock).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o666);
    let (code, body) = curl(&sock, "/x", Some("nobody"), &[]).await;
    assert_eq!(code, "403", "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["error"], "forbidden_client");
    assert!(json["message"].as_str().unwrap().contains("allowed_uids"));
    let (code, body) = curl(&sock, "/x", None, &[]).await;
    assert_eq!(code, "200", "{body}");
    assert_eq!(
        upstream.hits(),
        2,
        "the refused request reached the upstream"
    );
    running.stop().await;

    // unix_socket_group: the file's group is set.
    let running = Running::start(
        &unix_config(dir.path(), &issuer, &upstream)
            .server(|s| s.unix_socket_mode("0660").unix_socket_group("nogroup")),
    )
    .await;
    let meta = std::fs::metadata(&sock).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    let nogroup = nix::unistd::Group::from_name("nogroup")
        .unwrap()
        .expect("group nogroup");
    assert_eq!(
        std::os::unix::fs::MetadataExt::gid(&meta),
        nogroup.gid.as_raw()
    );
    running.stop().await;
}

/// The built binary on `config`, with its stderr kept.
fn spawn_binary(config: &Path) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_bearer-proxy"))
        .args(["run", "-c"])
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn bearer-proxy")
}

/// Waits until a request over `sock` is answered 200.
async fn serving(sock: &Path) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::time::Instant::now() < deadline {
        if UnixStream::connect(sock).await.is_ok() {
            let (status, _) = http1_get(sock, "/ready").await;
            if status == 200 {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

async fn exit_of(child: &mut tokio::process::Child) -> (Option<i32>, String) {
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("exited in time")
        .expect("wait");
    let mut stderr = String::new();
    if let Some(mut err) = child.stderr.take() {
        use tokio::io::AsyncReadExt;
        let _ = err.read_to_string(&mut stderr).await;
    }
    (status.code(), stderr)
}

fn signal(child: &tokio::process::Child, sig: &str) {
    let pid = child.id().expect("running").to_string();
    let status = std::process::Command::new("kill")
        .args([sig, &pid])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill {sig} {pid}");
}

#[tokio::test]
async fn live_socket_is_kept_stale_one_replaced_and_removed_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let Servers { issuer, upstream } = Servers::start(Dialect::OAuth2).await;
    let config: PathBuf = dir.path().join("proxy.toml");
    std::fs::write(
        &config,
        unix_config(dir.path(), &issuer, &upstream).render(),
    )
    .unwrap();
    let sock = dir.path().join("proxy.sock");

    let mut first = spawn_binary(&config);
    assert!(serving(&sock).await, "the first proxy never served");

    // A second instance on the live socket: exit 1, naming the path; the first serves on.
    let mut second = spawn_binary(&config);
    let (code, stderr) = exit_of(&mut second).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains(&sock.display().to_string()), "{stderr}");
    assert!(stderr.contains("another process is serving"), "{stderr}");
    assert!(serving(&sock).await, "the first proxy stopped serving");

    // SIGKILL leaves the file behind; the next start replaces it.
    first.kill().await.expect("SIGKILL");
    assert!(
        sock.exists(),
        "a killed process cannot remove its socket file"
    );
    assert!(
        UnixStream::connect(&sock).await.is_err(),
        "nobody answers on it"
    );
    let mut third = spawn_binary(&config);
    assert!(
        serving(&sock).await,
        "the stale socket file was not replaced"
    );

    // A reload (SIGHUP) keeps the socket; SIGTERM removes it and exits 0.
    signal(&third, "-HUP");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(serving(&sock).await, "the socket is gone after a reload");
    signal(&third, "-TERM");
    let (code, stderr) = exit_of(&mut third).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(!sock.exists(), "the socket file is removed on SIGTERM");
}

#[tokio::test]
async fn a_regular_file_in_the_way_is_an_error_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let Servers { issuer, upstream } = Servers::start(Dialect::OAuth2).await;
    let sock = dir.path().join("proxy.sock");
    std::fs::write(&sock, "not a socket").unwrap();
    let config = unix_config(dir.path(), &issuer, &upstream).parse();
    let error = match Server::bind(config).await {
        Ok(_) => panic!("bound over a regular file"),
        Err(e) => e.to_string(),
    };
    assert!(error.contains("is not a socket"), "{error}");
    assert!(error.contains(&sock.display().to_string()), "{error}");
    assert_eq!(std::fs::read_to_string(&sock).unwrap(), "not a socket");
}

/// Reads `s` until the server closes it; how long after `since` that was (`None`: still
/// open after `within`).
async fn closed_after(
    mut s: impl tokio::io::AsyncRead + Unpin,
    since: tokio::time::Instant,
    within: Duration,
) -> Option<Duration> {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 1024];
    tokio::time::timeout(within, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return since.elapsed(),
                Ok(_) => {}
            }
        }
    })
    .await
    .ok()
}

/// When `shutdown_grace` runs out, connections still open on a Unix socket listener and
/// on the admin listener are closed, as the worker threads' are, and the server is done.
#[tokio::test]
async fn shutdown_grace_ends_held_unix_socket_and_admin_connections() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let Servers { issuer, upstream } = Servers::start(Dialect::OAuth2).await;
    let grace = Duration::from_secs(1);
    let config = unix_config(dir.path(), &issuer, &upstream)
        .server(|s| {
            s.admin()
                .shutdown_grace("1s")
                .header_read_timeout("60s")
                .upstream_timeout("60s")
        })
        .parse();
    let server = Server::bind(config).await.expect("bind");
    let admin = server.admin_addr().expect("admin listener");
    let (stop, stopped) = oneshot::channel::<()>();
    let running = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));

    // A request the upstream never answers in time, on the Unix socket...
    upstream.set_delay(Duration::from_secs(60));
    let mut slow = UnixStream::connect(dir.path().join("proxy.sock"))
        .await
        .unwrap();
    slow.write_all(b"GET /slow HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(10), || upstream.hits() >= 1).await,
        "the slow request reached the upstream"
    );
    // ...and a request head never finished, on the admin listener.
    let mut unfinished = tokio::net::TcpStream::connect(admin).await.unwrap();
    unfinished
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: a\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let started = tokio::time::Instant::now();
    let _ = stop.send(());
    let within = Duration::from_secs(10);
    let (slow_closed, admin_closed) = tokio::join!(
        closed_after(slow, started, within),
        closed_after(unfinished, started, within)
    );
    for (what, closed) in [("Unix socket", slow_closed), ("admin", admin_closed)] {
        let closed = closed.unwrap_or_else(|| panic!("the {what} connection was left open"));
        assert!(
            closed >= grace * 9 / 10 && closed < grace + Duration::from_secs(3),
            "the {what} connection closed {closed:?} after shutdown (grace {grace:?})"
        );
    }
    tokio::time::timeout(Duration::from_secs(15), running)
        .await
        .expect("the server finished")
        .unwrap();
}
