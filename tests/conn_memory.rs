//! Memory per idle keep-alive client connection, counted by a global allocator. A test
//! binary of its own, so no other test allocates while it measures.

#[path = "support/counting.rs"]
mod counting;
#[path = "support/mod.rs"]
mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::*;

#[global_allocator]
static ALLOCATOR: counting::Counting = counting::Counting;

const CONNS: usize = 300;

/// Sends one GET on `s` and reads its whole answer (the upstream's JSON echo, which
/// has a Content-Length); returns the status line.
async fn one_request(s: &mut TcpStream, path: &str) -> String {
    let req = format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let answer = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let n = s.read(&mut buf).await.expect("read");
            assert!(n > 0, "closed before the answer was complete");
            got.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&got);
            if let Some(end) = text.find("\r\n\r\n") {
                let length = text[..end]
                    .lines()
                    .find_map(|l| {
                        let (name, value) = l.split_once(':')?;
                        name.eq_ignore_ascii_case("content-length")
                            .then(|| value.trim().parse::<usize>().ok())?
                    })
                    .expect("content-length");
                if got.len() >= end + 4 + length {
                    return text.lines().next().unwrap_or_default().to_owned();
                }
            }
        }
    })
    .await;
    answer.expect("answer within 10 s")
}

/// The live heap once it has stopped moving (connections park after a short idle
/// time), bounded in time.
async fn settled() -> isize {
    let mut last = counting::LIVE.load(Ordering::Relaxed);
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = counting::LIVE.load(Ordering::Relaxed);
        if (now - last).abs() < 4096 {
            return now;
        }
        last = now;
    }
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_costs_under_4_kib_and_still_serves() {
    let h = Harness::start().await;
    let (proxy, upstream) = (&h.proxy, &h.upstream);
    // Warm up: the token, the upstream pool, lazily built tables, the allocator's state.
    for _ in 0..50 {
        let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
        assert_eq!(one_request(&mut s, "/warm").await, "HTTP/1.1 200 OK");
    }
    let before = settled().await;
    // One request at a time, so the upstream pool keeps one connection throughout and
    // what grows is the client connections.
    let mut conns = Vec::with_capacity(CONNS);
    for i in 0..CONNS {
        let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
        assert_eq!(
            one_request(&mut s, &format!("/first/{i}")).await,
            "HTTP/1.1 200 OK"
        );
        conns.push(s);
    }
    let after = settled().await;
    let per_conn = usize::try_from(after - before).unwrap_or(0) / CONNS;
    println!(
        "{CONNS} idle keep-alive connections: {per_conn} bytes live each (client side included)"
    );
    // hyper alone keeps 16 KiB of buffers per connection while it waits; parked, with
    // hyper's connection in a box of its own and dropped, about 1.7 KiB is left.
    assert!(per_conn <= 2560, "{per_conn} bytes per idle connection");
    // Every parked connection takes its next request.
    for (i, s) in conns.iter_mut().enumerate() {
        assert_eq!(
            one_request(s, &format!("/second/{i}")).await,
            "HTTP/1.1 200 OK"
        );
    }
    assert_eq!(upstream.hits(), 50 + 2 * CONNS);
    drop(conns);
    h.stop().await;
}
