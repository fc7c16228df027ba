//! curl as the client: HTTP/1.0 without Host, HTTP/1.1 keep-alive over several URLs,
//! h2c with prior knowledge, `Expect: 100-continue` with a large body, chunked upload.

use std::path::Path;
use std::time::Duration;

use sha2::Digest;

use super::require;
use crate::support::*;

/// Runs curl with `args` (plus `-sS --max-time 30`); returns stdout and stderr, and
/// fails the test when curl fails.
async fn curl(program: &Path, args: &[&str]) -> (String, String) {
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(program)
            .args(["-sS", "--max-time", "30"])
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("curl did not finish within 60 s")
    .expect("curl runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "curl {args:?} failed: {:?}\n{stderr}",
        out.status
    );
    (stdout, stderr)
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|_| panic!("not JSON: {text}"))
}

/// The echoed headers named `name`.
fn echoed(doc: &serde_json::Value, name: &str) -> Vec<String> {
    doc["headers"]
        .as_array()
        .expect("headers")
        .iter()
        .filter(|pair| pair[0].as_str() == Some(name))
        .map(|pair| pair[1].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// A file of `n` bytes as `stream_bytes(n)` makes them, so `stream_sha256(n)` is its hash.
fn body_file(dir: &Path, n: u64) -> std::path::PathBuf {
    let chunk: Vec<u8> = (0..64 * 1024).map(|i| (i * 7 % 251) as u8).collect();
    let mut data = Vec::with_capacity(n as usize);
    while (data.len() as u64) < n {
        let take = (n - data.len() as u64).min(chunk.len() as u64) as usize;
        data.extend_from_slice(&chunk[..take]);
    }
    assert_eq!(hex(&sha2::Sha256::digest(&data)), stream_sha256(n));
    let path = dir.join(format!("body-{n}"));
    std::fs::write(&path, data).unwrap();
    path
}

#[tokio::test]
async fn curl_as_the_client() {
    let Some(program) = require("curl") else {
        return;
    };
    let Harness {
        issuer,
        upstream,
        proxy,
        ..
    } = Harness::start().await;
    proxy.token_ready(Duration::from_secs(5)).await;
    let token = format!("Bearer {}", issuer.token(1));
    let base = format!("http://{}", proxy.addr);

    // HTTP/1.0 without a Host header: the upstream still gets its own.
    let (out, _) = curl(
        &program,
        &["--http1.0", "-H", "Host:", &format!("{base}/old?v=1")],
    )
    .await;
    let doc = json(&out);
    assert_eq!(doc["uri"], "/old?v=1");
    assert_eq!(echoed(&doc, "host"), [upstream.addr.to_string()]);
    assert_eq!(echoed(&doc, "authorization"), std::slice::from_ref(&token));

    // HTTP/1.1 keep-alive: three URLs in one curl, one connection.
    let (out, err) = curl(
        &program,
        &[
            "-v",
            "-o",
            "/dev/null",
            "-o",
            "/dev/null",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{num_connects}\\n",
            &format!("{base}/a"),
            &format!("{base}/b"),
            &format!("{base}/c"),
        ],
    )
    .await;
    assert_eq!(out, "200 1\n200 0\n200 0\n", "{err}");
    assert!(err.contains("Re-using existing connection"), "{err}");

    // h2c with prior knowledge.
    let (out, _) = curl(
        &program,
        &[
            "--http2-prior-knowledge",
            "-w",
            "\\n%{http_version}",
            &format!("{base}/h2c?x=%20y"),
        ],
    )
    .await;
    let (body, version) = out.rsplit_once('\n').expect("body and version");
    assert_eq!(version, "2");
    let doc = json(body);
    assert_eq!(doc["uri"], "/h2c?x=%20y");
    assert_eq!(echoed(&doc, "authorization"), std::slice::from_ref(&token));

    // HTTP/2 has no Upgrade: a WebSocket handshake sent over h2c reaches the upstream
    // as a plain GET, whose answer comes back as it is.
    let (out, _) = curl(
        &program,
        &[
            "--http2-prior-knowledge",
            "-H",
            "Connection: Upgrade",
            "-H",
            "Upgrade: websocket",
            "-H",
            "Sec-WebSocket-Version: 13",
            "-w",
            "\n%{http_code}",
            &format!("{base}/ws-over-h2"),
        ],
    )
    .await;
    let (body, status) = out.rsplit_once('\n').expect("body and status");
    assert_eq!(status, "200");
    let doc = json(body);
    assert!(echoed(&doc, "upgrade").is_empty(), "{doc}");
    assert!(echoed(&doc, "connection").is_empty(), "{doc}");
    assert_eq!(echoed(&doc, "sec-websocket-version"), ["13"]);

    let dir = tempfile::tempdir().unwrap();
    const N: u64 = 4 * 1024 * 1024;
    let file = body_file(dir.path(), N);
    let data = format!("@{}", file.display());

    // Expect: 100-continue with a 4 MiB body: the proxy says 100 and the body arrives.
    let (out, err) = curl(
        &program,
        &[
            "-v",
            "-H",
            "Expect: 100-continue",
            "-H",
            "Content-Type: application/octet-stream",
            "--data-binary",
            &data,
            &format!("{base}/upload"),
        ],
    )
    .await;
    assert!(err.contains("HTTP/1.1 100 Continue"), "{err}");
    let doc = json(&out);
    assert_eq!(doc["body_len"], N);
    assert_eq!(doc["body_sha256"], stream_sha256(N));

    // Chunked upload.
    let (out, err) = curl(
        &program,
        &[
            "-v",
            "-H",
            "Transfer-Encoding: chunked",
            "--data-binary",
            &data,
            &format!("{base}/chunked"),
        ],
    )
    .await;
    assert!(err.contains("Transfer-Encoding: chunked"), "{err}");
    let doc = json(&out);
    assert_eq!(doc["body_len"], N);
    assert_eq!(doc["body_sha256"], stream_sha256(N));
    assert_eq!(echoed(&doc, "authorization"), [token]);
    proxy.stop().await;
}
