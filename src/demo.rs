//! `bearer-proxy demo`: a token issuer, an echo upstream and the proxy, all on loopback.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::Context;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use crate::answer;
use crate::config::Config;
use crate::server::Server;

/// Runs the demo until `shutdown`, printing curl lines that work against it.
pub async fn run(listen: SocketAddr, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let issued = Arc::new(AtomicU64::new(0));
    let issuer = spawn_server(move |req| issue(req, issued.clone())).await?;
    let upstream = spawn_server(|req| async move { Ok(echo(req)) }).await?;
    let text = format!(
        r#"
[server]
listen = "{listen}"

[providers.demo]
token_url = "http://{issuer}/oauth/token"
client_id = "demo-client"
client_secret = "demo-secret"
audience = "demo.local"
request_format = "json"

[[routes]]
path_prefix = "/api"
upstream = "http://{upstream}/v1"
provider = "demo"

[[routes]]
path_prefix = "/public"
upstream = "http://{upstream}/public"
"#
    );
    let config = Config::parse(&text, Path::new("(demo)"), &|_| None)?;
    let server = Server::bind(config)
        .await
        .context("try another address with `bearer-proxy demo --listen 127.0.0.1:0`")?;
    let addr = server
        .local_addr(listen)
        .context("the demo listener has no address")?;
    println!("bearer-proxy demo on http://{addr}");
    println!("  token issuer:  http://{issuer}/oauth/token");
    println!("  echo upstream: http://{upstream}/ (answers with the request it received)");
    println!();
    println!("Try (the echo shows the Authorization header the proxy added):");
    println!("curl -s http://{addr}/api/hello?name=world");
    println!("curl -s -X POST -d '{{\"x\":1}}' http://{addr}/api/orders");
    println!("curl -s http://{addr}/public/no-token-here");
    println!();
    println!("Ctrl-C stops it.");
    server.run(shutdown).await;
    Ok(())
}

async fn spawn_server<F, Fut>(handler: F) -> anyhow::Result<SocketAddr>
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let handler = handler.clone();
            tokio::spawn(async move {
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service_fn(handler))
                    .await;
            });
        }
    });
    Ok(addr)
}

async fn issue(
    req: Request<Incoming>,
    issued: Arc<AtomicU64>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let n = issued.fetch_add(1, Ordering::Relaxed) + 1;
    let body = if req.uri().path() == "/oauth/token" {
        serde_json::json!({
            "access_token": format!("demo-token-{n}"),
            "token_type": "Bearer",
            "expires_in": 3600,
        })
    } else {
        serde_json::json!({ "error": "not_found" })
    };
    Ok(answer::json(StatusCode::OK, body))
}

fn echo(req: Request<Incoming>) -> Response<Full<Bytes>> {
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    answer::json(
        StatusCode::OK,
        serde_json::json!({
            "method": req.method().as_str(),
            "uri": req.uri().to_string(),
            "headers": headers,
        }),
    )
}
