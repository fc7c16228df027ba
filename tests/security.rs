//! The listener as a security boundary: hostile bytes, limits, who may connect.
//! Every refusal is followed by a normal request on a fresh connection.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

/// How long a hostile exchange may take before what came back is judged.
const RAW_WAIT: Duration = Duration::from_secs(3);

async fn still_serves(proxy: &Proxy) {
    let answer = get(&client(), &proxy.url("/ok")).await;
    assert_eq!(answer.status, 200, "a normal request after the hostile one");
}

async fn setup(server: impl FnOnce(ServerSection) -> ServerSection) -> (Issuer, Upstream, Proxy) {
    let h = Harness::with(|c| c.server(server)).await;
    (h.issuer, h.upstream, h.proxy)
}

#[tokio::test]
async fn garbage_bytes_get_400() {
    let (_i, upstream, proxy) = setup(|s| s).await;
    let out = raw(proxy.addr, b"\x16\x03\x01\x02\x00garbage\r\n\r\n", RAW_WAIT).await;
    assert!(out.is_empty() || out.starts_with("HTTP/1.1 400"), "{out}");
    let out = raw(proxy.addr, b"GET / HTTP/9.9\r\n\r\n", RAW_WAIT).await;
    assert!(
        out.is_empty() || out.starts_with("HTTP/1.1 400") || out.starts_with("HTTP/1.1 505"),
        "{out}"
    );
    assert_eq!(upstream.hits(), 0);
    still_serves(&proxy).await;
}

#[tokio::test]
async fn oversized_headers_get_431() {
    let (_i, upstream, proxy) = setup(|s| s).await;
    let big = format!(
        "GET /x HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
        "a".repeat(100 * 1024)
    );
    let out = raw(proxy.addr, big.as_bytes(), RAW_WAIT).await;
    assert!(out.starts_with("HTTP/1.1 431"), "{out}");
    let mut many = String::from("GET /x HTTP/1.1\r\nHost: a\r\n");
    for i in 0..10_000 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let out = raw(proxy.addr, many.as_bytes(), RAW_WAIT).await;
    assert!(out.starts_with("HTTP/1.1 431"), "{out}");
    assert_eq!(upstream.hits(), 0);
    still_serves(&proxy).await;
}

/// The head limit is `max_header_bytes` exactly, also now that the connection's read
/// buffer may grow past it (to 1 MiB) for large bodies.
#[tokio::test]
async fn max_header_bytes_is_the_head_limit() {
    let (_i, upstream, proxy) = setup(|s| s.max_header_bytes("16KiB")).await;
    let head = |n: usize| {
        format!(
            "GET /x HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
            "a".repeat(n)
        )
    };
    let out = raw(proxy.addr, head(20 * 1024).as_bytes(), RAW_WAIT).await;
    assert!(out.starts_with("HTTP/1.1 431"), "{out}");
    assert_eq!(upstream.hits(), 0);
    let out = raw(proxy.addr, head(12 * 1024).as_bytes(), RAW_WAIT).await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert_eq!(upstream.hits(), 1);
    still_serves(&proxy).await;
}

#[tokio::test]
async fn long_uri_gets_414() {
    let (_i, upstream, proxy) = setup(|s| s.max_uri_length("1KiB")).await;
    let req = format!(
        "GET /{} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        "a".repeat(2000)
    );
    let out = raw(proxy.addr, req.as_bytes(), RAW_WAIT).await;
    assert!(out.starts_with("HTTP/1.1 414"), "{out}");
    assert!(out.contains("uri_too_long"));
    assert_eq!(upstream.hits(), 0);
    still_serves(&proxy).await;
}

#[tokio::test]
async fn slowloris_is_cut_off() {
    let (_i, _u, proxy) = setup(|s| s.header_read_timeout("500ms")).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let started = tokio::time::Instant::now();
    // One byte every 100 ms: the proxy must hang up long before the head is done.
    let closed_at = dribble_until_closed(
        &mut s,
        b"GET /x HTTP/1.1\r\nHost: a\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        Duration::from_millis(100),
        started,
    )
    .await;
    let closed_at = closed_at.expect("connection never closed");
    assert!(closed_at < Duration::from_secs(2), "{closed_at:?}");
    still_serves(&proxy).await;
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed() {
    let (_i, _u, proxy) = setup(|s| s.header_read_timeout("300ms")).await;
    let started = tokio::time::Instant::now();
    let ex = exchange(
        proxy.addr,
        b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n",
        false,
        Duration::from_secs(3),
    )
    .await;
    assert!(String::from_utf8_lossy(&ex.out).starts_with("HTTP/1.1 200"));
    assert!(ex.closed, "idle connection kept open");
    assert!(started.elapsed() < Duration::from_secs(2));
}

/// A connection that never sends a byte holds a connection slot: it is closed after
/// `header_read_timeout` like an idle keep-alive one.
#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed() {
    let (_i, _u, proxy) = setup(|s| s.header_read_timeout("300ms")).await;
    let started = tokio::time::Instant::now();
    let ex = exchange(proxy.addr, b"", false, Duration::from_secs(5)).await;
    assert!(ex.closed, "a silent connection was kept open");
    assert!(started.elapsed() >= Duration::from_millis(250));
    still_serves(&proxy).await;
}

#[tokio::test]
async fn smuggling_pairs_are_neutralised() {
    let (_i, upstream, proxy) = setup(|s| s).await;
    // CL + TE: parsed as chunked (RFC 9112 §6.1), Content-Length dropped, connection
    // closed after the answer, so the "smuggled" request is never executed.
    let pair = b"POST /first HTTP/1.1\r\nHost: a\r\nContent-Length: 50\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n";
    let out = raw(proxy.addr, pair, RAW_WAIT).await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(
        out.contains("/first") && !out.contains("/smuggled"),
        "{out}"
    );
    assert_eq!(
        out.matches("HTTP/1.1 ").count(),
        1,
        "exactly one answer: {out}"
    );
    // Two different Content-Lengths: refused outright.
    let out = raw(
        proxy.addr,
        b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        RAW_WAIT,
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    // A Transfer-Encoding that is not chunked: refused.
    let out = raw(
        proxy.addr,
        b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\nabc",
        RAW_WAIT,
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert_eq!(upstream.hits(), 1, "the upstream saw only /first");
    still_serves(&proxy).await;
}

#[tokio::test]
async fn bad_chunk_sizes_are_refused() {
    let (_i, upstream, proxy) = setup(|s| s).await;
    let out = raw(
        proxy.addr,
        b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n", RAW_WAIT)
    .await;
    assert!(out.is_empty() || out.starts_with("HTTP/1.1 400"), "{out}");
    assert_eq!(upstream.hits(), 0, "nothing forwarded");
    still_serves(&proxy).await;
}

#[tokio::test]
async fn clients_outside_allowed_clients_get_403() {
    let (_i, upstream, proxy) = setup(|s| s.allowed_clients(["10.0.0.0/8"])).await;
    let answer = get(&client(), &proxy.url("/x")).await;
    assert_eq!(answer.status, 403);
    assert_eq!(answer.json()["error"], "forbidden_client");
    assert_eq!(upstream.hits(), 0);
    // The connection closes after the 403: a refused peer holds no connection slot.
    let out = raw_until_close(
        proxy.addr,
        b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    proxy.stop().await;
    // The same proxy with loopback allowed serves.
    let (_i, _u, proxy) = setup(|s| s.allowed_clients(["127.0.0.1", "::1/128"])).await;
    still_serves(&proxy).await;
}

#[tokio::test]
async fn redirects_are_returned_not_followed() {
    let (_i, upstream, proxy) = setup(|s| s).await;
    let elsewhere = Upstream::start().await;
    let answer = get(
        &client(),
        &proxy.url(&format!("/redirect-to/{}/steal", elsewhere.addr)),
    )
    .await;
    assert_eq!(answer.status, 302);
    assert_eq!(
        answer.headers["location"],
        format!("http://{}/steal", elsewhere.addr)
    );
    assert_eq!(
        elsewhere.hits(),
        0,
        "the token never went to the redirect target"
    );
    assert_eq!(upstream.hits(), 1);
}

#[tokio::test]
async fn connections_over_the_cap_wait_and_in_flight_ones_complete() {
    let (_i, upstream, proxy) = setup(|s| s.max_connections(4)).await;
    upstream.set_delay(Duration::from_millis(200));
    // 16 clients, each on its own connection (a fresh client each), all at once.
    let mut tasks = Vec::new();
    for i in 0..16 {
        let url = proxy.url(&format!("/slow/{i}"));
        tasks.push(tokio::spawn(async move {
            let started = tokio::time::Instant::now();
            let status = get(&client(), &url).await.status;
            (status, started.elapsed())
        }));
    }
    let mut slowest = Duration::ZERO;
    for t in tasks {
        let (status, took) = t.await.unwrap();
        assert_eq!(status, 200);
        slowest = slowest.max(took);
    }
    // 16 requests, 4 at a time, 200 ms each: at least 4 rounds.
    assert!(
        slowest >= Duration::from_millis(750),
        "cap not applied: {slowest:?}"
    );
    assert_eq!(upstream.hits(), 16);
}

#[test]
fn a_readable_config_with_a_literal_secret_gets_a_warning() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bp.toml");
    let text = "[providers.p]\ntoken_url = \"https://issuer.example/t\"\nclient_id = \"i\"\nclient_secret = \"literal-s3cret\"\n[[routes]]\nupstream = \"https://api.example\"\nprovider = \"p\"\n";
    std::fs::write(&file, text).unwrap();
    let check = |mode: u32| {
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_bearer-proxy"))
            .args(["check", "-c"])
            .arg(&file)
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let loud = check(0o644);
    assert!(
        loud.contains("chmod 600") && loud.contains("bp.toml") && loud.contains("providers: p"),
        "{loud}"
    );
    assert!(!loud.contains("literal-s3cret"));
    assert!(!check(0o600).contains("chmod"), "no warning once private");
    // A secret from the environment is not at rest in the file: no warning.
    std::fs::write(&file, text.replace("literal-s3cret", "${HOME}")).unwrap();
    assert!(!check(0o644).contains("chmod"));
}

/// An h2c connection to the proxy, driven in the background; the returned handle
/// finishes when the server closes the connection.
async fn h2c(
    addr: SocketAddr,
) -> (
    h2::client::SendRequest<bytes::Bytes>,
    tokio::task::JoinHandle<(usize, Result<(), h2::Error>)>,
    tokio::sync::oneshot::Receiver<usize>,
) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (send, mut conn) = h2::client::handshake(tcp).await.unwrap();
    let (settings_tx, settings_rx) = tokio::sync::oneshot::channel();
    let driver = tokio::spawn(async move {
        // Report the server's stream limit once its SETTINGS have arrived.
        let mut settings_tx = Some(settings_tx);
        let result = std::future::poll_fn(|cx| {
            let polled = std::future::Future::poll(std::pin::Pin::new(&mut conn), cx);
            if conn.max_concurrent_send_streams() != usize::MAX {
                if let Some(tx) = settings_tx.take() {
                    let _ = tx.send(conn.max_concurrent_send_streams());
                }
            }
            polled
        })
        .await;
        (conn.max_concurrent_send_streams(), result)
    });
    (send, driver, settings_rx)
}

#[tokio::test]
async fn http2_stream_limit_is_advertised() {
    let (_i, _u, proxy) = setup(|s| s.max_concurrent_streams(7)).await;
    let (mut send, driver, settings) = h2c(proxy.addr).await;
    let req = http::Request::get(format!("http://{}/x", proxy.addr))
        .body(())
        .unwrap();
    send = send.ready().await.unwrap();
    let (response, _) = send.send_request(req, true).unwrap();
    assert_eq!(response.await.unwrap().status(), 200);
    let limit = tokio::time::timeout(Duration::from_secs(2), settings)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(limit, 7);
    drop(send);
    driver.abort();
    still_serves(&proxy).await;
}

#[tokio::test]
async fn http2_rapid_reset_flood_is_cut_off() {
    let (_i, upstream, proxy) = setup(|s| s).await;
    upstream.set_delay(Duration::from_millis(200));
    let (mut send, driver, _settings) = h2c(proxy.addr).await;
    // Open streams and reset each at once, far beyond what any client needs.
    let mut sent = 0;
    for _ in 0..20_000 {
        send = match tokio::time::timeout(Duration::from_secs(2), send.ready()).await {
            Ok(Ok(send)) => send,
            _ => break,
        };
        let req = http::Request::get(format!("http://{}/x", proxy.addr))
            .body(())
            .unwrap();
        match send.send_request(req, false) {
            Ok((_response, mut stream)) => stream.send_reset(h2::Reason::CANCEL),
            Err(_) => break,
        }
        sent += 1;
        tokio::task::yield_now().await;
    }
    let closed = tokio::time::timeout(Duration::from_secs(5), driver).await;
    assert!(
        closed.is_ok(),
        "the server kept a flooding connection open after {sent} resets"
    );
    assert!(sent < 20_000, "the flood was never refused");
    assert!(
        upstream.hits() < 1000,
        "most reset streams never reached the upstream: {}",
        upstream.hits()
    );
    still_serves(&proxy).await;
}

/// Reads from `s` until `want` answers have arrived (each the upstream's JSON echo, one
/// per status line), the peer closes, or 3 s pass.
async fn read_answers(s: &mut TcpStream, want: usize) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_secs(3), async {
        while String::from_utf8_lossy(&out)
            .matches("HTTP/1.1 200")
            .count()
            < want
            || !out.ends_with(b"}")
        {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn a_pipelined_head_split_across_an_idle_pause_is_served() {
    // The pause is longer than an idle connection waits before it gives up its buffers:
    // the half-sent second head must survive that.
    let (_i, upstream, proxy) = setup(|s| s).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"GET /first HTTP/1.1\r\nHost: a\r\n\r\nGET /sec")
        .await
        .unwrap();
    // After each answer: pause past the parking point, then send the rest.
    let steps: [(&str, &[u8]); 3] = [
        ("/first", b"ond HTTP/1.1\r\nHost: a\r\n\r\n"),
        ("/second", b"GET /third HTTP/1.1\r\nHost: a\r\n\r\n"),
        ("/third", b""),
    ];
    for (path, next) in steps {
        let out = read_answers(&mut s, 1).await;
        assert!(
            out.starts_with("HTTP/1.1 200") && out.contains(path),
            "{out}"
        );
        if !next.is_empty() {
            tokio::time::sleep(Duration::from_millis(300)).await;
            s.write_all(next).await.unwrap();
        }
    }
    assert_eq!(upstream.hits(), 3);
}

#[tokio::test]
async fn slowloris_after_an_idle_pause_is_cut_off() {
    let (_i, _u, proxy) = setup(|s| s.header_read_timeout("500ms")).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let out = read_answers(&mut s, 1).await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    // Idle long enough to give up its buffers, well within the idle limit.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = tokio::time::Instant::now();
    let closed_at = dribble_until_closed(
        &mut s,
        b"GET /y HTTP/1.1\r\nHost: a\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        Duration::from_millis(100),
        started,
    )
    .await;
    let closed_at = closed_at.expect("connection never closed");
    assert!(closed_at < Duration::from_secs(2), "{closed_at:?}");
    still_serves(&proxy).await;
}

/// Sends `head` one byte every `every` until the proxy closes the connection; how long
/// after `since` that was (`None`: never, within the bytes of `head` repeated 100 times).
async fn dribble_until_closed(
    s: &mut TcpStream,
    head: &[u8],
    every: Duration,
    since: tokio::time::Instant,
) -> Option<Duration> {
    for b in head.iter().cycle().take(100) {
        if s.write_all(&[*b]).await.is_err() {
            return Some(since.elapsed());
        }
        let mut buf = [0u8; 512];
        match tokio::time::timeout(every, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(since.elapsed()),
            Ok(Ok(_)) | Err(_) => {}
        }
    }
    None
}

#[tokio::test]
async fn a_head_dribbled_after_an_idle_pause_gets_one_header_read_timeout_in_all() {
    // The time from an answer to the next whole head is bounded by header_read_timeout,
    // however the wait is split: the connection is parked during the pause and woken by
    // each byte, and (second case) holds a partial pipelined head while parked.
    let limit = Duration::from_secs(2);
    let (_i, _u, proxy) = setup(|s| s.header_read_timeout("2s")).await;
    let cases: [&[u8]; 2] = [
        b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: a\r\n\r\nGET /y HTTP/1.1\r\nHost: a\r\n",
    ];
    for first in cases {
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(first).await.unwrap();
        let out = read_answers(&mut s, 1).await;
        let answered = tokio::time::Instant::now();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        // Long past the parking point, well within the limit.
        tokio::time::sleep(limit * 4 / 5).await;
        let closed_at = dribble_until_closed(
            &mut s,
            b"X-Slow: aaaaaaaaaaaaaaaaaaaaaaaa\r\n",
            Duration::from_millis(200),
            answered,
        )
        .await
        .expect("the connection was never closed");
        // Granting a fresh wait at the wake-up would close it at 1.8x the limit.
        assert!(
            closed_at < limit + Duration::from_millis(800),
            "closed {closed_at:?} after the answer (limit {limit:?})"
        );
        assert!(
            closed_at > limit / 2,
            "closed {closed_at:?} after the answer, long before the limit"
        );
    }
    still_serves(&proxy).await;
}

/// A scanner refused by `allowed_clients` cannot flood the log: at most about one warn
/// line a second, each counting the refusals since the previous one (logged at debug),
/// so the warn lines still account for every refusal.
#[tokio::test]
async fn many_refused_connections_give_few_warn_lines_that_count_them_all() {
    let Servers { issuer, upstream } = Servers::start(Dialect::OAuth2).await;
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bp.toml");
    std::fs::write(
        &file,
        TestConfig::basic(&issuer, &upstream)
            .server(|s| {
                s.listen(format!("127.0.0.1:{port}"))
                    .allowed_clients(["10.0.0.0/8"])
            })
            .render(),
    )
    .unwrap();
    let log = dir.path().join("stderr.log");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_bearer-proxy"))
        .args(["--log-format", "json", "--log-level", "info", "run", "-c"])
        .arg(&file)
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let child = ChildGuard(child);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    assert!(
        listening(addr, Duration::from_secs(10)).await,
        "the proxy never listened"
    );
    let request = b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n";
    let started = tokio::time::Instant::now();
    // The probe that found the listener was refused too.
    let mut refusals = 1;
    for _ in 0..200 {
        let out = raw_until_close(addr, request, Duration::from_secs(2)).await;
        assert!(out.starts_with("HTTP/1.1 403"), "{out}");
        refusals += 1;
    }
    let flood = started.elapsed();
    // After a quiet second, the next refusal is a warn line again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let out = raw_until_close(addr, request, Duration::from_secs(2)).await;
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    refusals += 1;
    let status = child.terminate().await;
    assert!(status.success(), "{status:?}");

    let text = std::fs::read_to_string(&log).unwrap();
    let warned: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["level"] == "WARN" && l["peer"].is_string())
        .collect();
    // One at the start, one a second during the flood, one after the pause.
    let bound = 2 + flood.as_secs() as usize;
    assert!(
        !warned.is_empty() && warned.len() <= bound,
        "{} warn lines for {refusals} refusals in {flood:?}:\n{text}",
        warned.len()
    );
    let counted: u64 = warned
        .iter()
        .map(|l| 1 + l["suppressed"].as_u64().expect("a suppressed count"))
        .sum();
    assert_eq!(
        counted, refusals,
        "the warn lines count every refusal:\n{text}"
    );
    assert!(warned.iter().all(|l| l["message"]
        .as_str()
        .is_some_and(|m| m.contains("allowed_clients"))));
}

/// Whether `addr` accepts a connection within `within`.
async fn listening(addr: SocketAddr, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if TcpStream::connect(addr).await.is_ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}
