//! Managed Redis as fleets meet it: TLS with verified certificates and client
//! certificates, ACL users, Sentinel failover, and ten proxies on one Redis under
//! failure. Real redis-server and redis-sentinel processes on loopback.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bearer_proxy::config::Config;
use http::Request;
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};

type CaIssuer = rcgen::Issuer<'static, KeyPair>;

use crate::support::*;

const PASSWORD: &str = "acl-pass-7f3e9c";

/// Starts `program` (a Debian package `.ci/run` installs). Under CI a missing program
/// fails the test.
fn spawn(program: &str, args: &[String], log: &Path) -> Child {
    Command::new(program)
        .args(args)
        .stdout(std::fs::File::create(log).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("{program} not found ({e}): install it (.ci/run does: apt-get install redis-server redis-sentinel)")
        })
}

fn wait_port(port: u16) {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    for _ in 0..1000 {
        if std::net::TcpStream::connect(addr).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("nothing listens on {addr}");
}

/// A Redis process (server or Sentinel) on a loopback port, killed on drop.
struct Node {
    port: u16,
    child: Option<Child>,
    program: &'static str,
    args: Vec<String>,
    log: PathBuf,
}

impl Node {
    fn start(program: &'static str, port: u16, args: Vec<String>, log: PathBuf) -> Self {
        let mut node = Self {
            port,
            child: None,
            program,
            args,
            log,
        };
        node.resume();
        node
    }

    fn resume(&mut self) {
        self.child = Some(spawn(self.program, &self.args, &self.log));
        wait_port(self.port);
    }

    /// SIGKILL: no goodbye to clients, replicas or Sentinels.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| (*s).to_owned()).collect()
}

// === Certificates ===

/// A CA, a server certificate for 127.0.0.1 signed by it, a client certificate, and
/// an unrelated CA; all PEM files in `dir`.
struct Pki {
    ca: PathBuf,
    other_ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

fn new_ca(name: &str) -> (String, CaIssuer) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), rcgen::Issuer::new(params, key))
}

fn leaf(issuer: &CaIssuer, names: &[&str], usage: ExtendedKeyUsagePurpose) -> (String, String) {
    let mut params = CertificateParams::new(strings(names)).unwrap();
    params.distinguished_name.push(
        DnType::CommonName,
        names.first().copied().unwrap_or("client"),
    );
    params.extended_key_usages.push(usage);
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

impl Pki {
    fn generate(dir: &Path) -> Self {
        let (ca_pem, ca) = new_ca("bearer-proxy test CA");
        let (other_pem, _) = new_ca("some other CA");
        let (server_cert, server_key) = leaf(
            &ca,
            &["127.0.0.1", "localhost"],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let (client_cert, client_key) = leaf(&ca, &[], ExtendedKeyUsagePurpose::ClientAuth);
        let write = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        Self {
            ca: write("ca.pem", &ca_pem),
            other_ca: write("other-ca.pem", &other_pem),
            server_cert: write("server.pem", &server_cert),
            server_key: write("server.key", &server_key),
            client_cert: write("client.pem", &client_cert),
            client_key: write("client.key", &client_key),
        }
    }
}

/// redis-server with TLS only (no plain port), the `default` user off and an ACL
/// user `bp` with a password; `auth_clients` is `no`, `optional` or `yes`.
fn tls_redis(dir: &Path, pki: &Pki, auth_clients: &str) -> Node {
    let port = free_port();
    let path = |p: &PathBuf| p.display().to_string();
    let mut args = strings(&["--bind", "127.0.0.1", "--port", "0"]);
    args.extend([
        "--tls-port".to_owned(),
        port.to_string(),
        "--tls-cert-file".to_owned(),
        path(&pki.server_cert),
        "--tls-key-file".to_owned(),
        path(&pki.server_key),
        "--tls-ca-cert-file".to_owned(),
        path(&pki.ca),
        "--tls-auth-clients".to_owned(),
        auth_clients.to_owned(),
        "--dir".to_owned(),
        dir.display().to_string(),
    ]);
    args.extend(strings(&["--save", "", "--appendonly", "no"]));
    args.extend(strings(&["--user", "default", "off"]));
    args.extend(strings(&["--user", "bp", "on"]));
    args.push(format!(">{PASSWORD}"));
    // The least the proxy needs, as README documents it (prefix `test:`).
    args.extend(strings(&[
        "~test:*",
        "&test:*",
        "+get",
        "+set",
        "+del",
        "+eval",
        "+publish",
        "+subscribe",
        "+unsubscribe",
        "+ping",
        "+hello",
        "+client",
        "+keys",
    ]));
    Node::start(
        "redis-server",
        port,
        args,
        dir.join(format!("redis-{port}.log")),
    )
}

/// The basic config on a Redis `store` under `test:`, provider `p` as `provider` edits it.
fn store_toml(
    store: StoreSection,
    issuer: &Issuer,
    upstream: &Upstream,
    provider: impl FnOnce(ProviderSection) -> ProviderSection,
) -> TestConfig {
    TestConfig::basic(issuer, upstream)
        .store(store.backend("redis").key_prefix("test:"))
        // Generous token waits: the tests count failed requests on a loaded machine.
        .server(|s| s.token_timeout("5s").token_wait("10s"))
        .p(provider)
}

fn parse(toml: &TestConfig) -> Config {
    let mut config = toml.parse();
    // TLS handshakes in a debug build on a loaded machine take a while.
    config.tuning.redis_timeout = Duration::from_millis(1000);
    config
}

/// The ACL user on `node` over TLS, trusting `ca`.
fn tls_store(node: &Node, ca: &Path) -> StoreSection {
    StoreSection::default()
        .redis_url(format!("rediss://bp:{PASSWORD}@127.0.0.1:{}/0", node.port))
        .redis_ca_file(ca.display().to_string())
}

#[tokio::test]
async fn tls_and_acl_user_three_proxies_share_one_token() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate(dir.path());
    let redis = tls_redis(dir.path(), &pki, "no");
    let Servers { issuer, upstream } = Servers::start(Dialect::OAuth2).await;
    issuer.set_delay(Duration::from_millis(200));
    let toml = store_toml(tls_store(&redis, &pki.ca), &issuer, &upstream, |p| {
        p.prefetch(false)
    })
    .server(|s| s.admin());
    let proxies = fleet(&parse(&toml), 3).await;
    let mut tasks = Vec::new();
    for proxy in &proxies {
        for i in 0..50 {
            let url = proxy.url(&format!("/r/{i}"));
            tasks.push(tokio::spawn(async move { get(&client(), &url).await }));
        }
    }
    for task in tasks {
        let answer = task.await.unwrap();
        assert_eq!(answer.status, 200);
        assert_eq!(
            answer.echoed("authorization"),
            [format!("Bearer {}", issuer.token(1))]
        );
    }
    assert_eq!(issuer.hits(), 1, "one token request for the whole fleet");
    for p in &proxies {
        assert_eq!(p.store.fleet_up(), Some(true));
    }
    // /tokens names the node and never the password.
    let tokens = get(&client(), &proxies[0].admin_url("/tokens")).await;
    let text = String::from_utf8_lossy(&tokens.body).to_string();
    let node = format!("127.0.0.1:{}", redis.port);
    assert_eq!(tokens.json()["p"]["redis_node"], node.as_str(), "{text}");
    assert_eq!(tokens.json()["p"]["store"], "redis", "{text}");
    assert!(!text.contains(PASSWORD), "{text}");
    // The token really is in that Redis, behind TLS and the ACL user.
    let keys = tls_keys(&redis, &pki, "test:token:*").await;
    assert_eq!(keys, 1, "one token key");
    for p in proxies {
        p.stop().await;
    }
}

/// Counts keys matching `pattern`, as the ACL user over TLS.
async fn tls_keys(redis: &Node, pki: &Pki, pattern: &str) -> usize {
    let client = redis::Client::build_with_tls(
        format!("rediss://bp:{PASSWORD}@127.0.0.1:{}/0", redis.port),
        redis::TlsCertificates {
            client_tls: Some(redis::ClientTlsConfig {
                client_cert: std::fs::read(&pki.client_cert).unwrap(),
                client_key: std::fs::read(&pki.client_key).unwrap(),
            }),
            root_cert: Some(std::fs::read(&pki.ca).unwrap()),
        },
    )
    .unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(pattern)
        .query_async(&mut conn)
        .await
        .unwrap();
    keys.len()
}

#[tokio::test]
async fn client_certificate_required_by_redis() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate(dir.path());
    let redis = tls_redis(dir.path(), &pki, "yes");
    let Servers { issuer, upstream } = Servers::start(Dialect::OAuth2).await;
    let with_cert = tls_store(&redis, &pki.ca)
        .redis_client_cert_file(pki.client_cert.display().to_string())
        .redis_client_key_file(pki.client_key.display().to_string());
    let proxies = fleet(&parse(&store_toml(with_cert, &issuer, &upstream, |p| p)), 2).await;
    assert!(
        eventually(Duration::from_secs(5), || converged(&proxies)).await,
        "{:?} {:?}",
        token_ids(&proxies),
        proxies
            .iter()
            .map(|p| p.store.fleet_up())
            .collect::<Vec<_>>()
    );
    assert_eq!(
        issuer.hits(),
        1,
        "shared through Redis with a client certificate"
    );
    for p in &proxies {
        assert_eq!(p.store.fleet_up(), Some(true));
        assert_eq!(get(&client(), &p.url("/x")).await.status, 200);
    }
    // Without the certificate Redis refuses the handshake: that proxy serves alone.
    let without = tls_store(&redis, &pki.ca);
    let alone = Proxy::start_config(parse(&store_toml(without, &issuer, &upstream, |p| p))).await;
    assert_eq!(get(&client(), &alone.url("/x")).await.status, 200);
    assert!(
        eventually(Duration::from_secs(3), || alone.store.fleet_up()
            == Some(false))
        .await
    );
    for p in proxies {
        p.stop().await;
    }
    alone.stop().await;
}

/// The binary's log lines while it serves `config_text` for a few requests.
async fn run_binary(dir: &Path, config_text: &str, port: u16, requests: usize) -> (String, usize) {
    let config = dir.join("proxy.toml");
    std::fs::write(&config, config_text).unwrap();
    let log = dir.join("proxy.log");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_bearer-proxy"))
        .args(["--log-level", "trace", "run", "-c"])
        .arg(&config)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_port(port);
    let c = client();
    let mut failed = 0;
    for _ in 0..requests {
        let url = format!("http://127.0.0.1:{port}/x");
        if get(&c, &url).await.status != 200 {
            failed += 1;
        }
    }
    let _ = child.start_kill();
    let _ = child.wait().await;
    (std::fs::read_to_string(&log).unwrap(), failed)
}

#[tokio::test]
async fn wrong_ca_falls_back_to_memory_with_a_clear_log_line() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate(dir.path());
    let redis = tls_redis(dir.path(), &pki, "no");
    let Servers { issuer, upstream } = Servers::start(Dialect::OAuth2).await;
    let port = free_port();
    let toml = store_toml(tls_store(&redis, &pki.other_ca), &issuer, &upstream, |p| p)
        .server(|s| s.listen(format!("127.0.0.1:{port}")));
    let (log, failed) = run_binary(dir.path(), &toml.render(), port, 20).await;
    assert_eq!(failed, 0, "requests never fail because Redis is unusable");
    let line = log
        .lines()
        .find(|l| l.contains("redis unavailable"))
        .unwrap_or_else(|| panic!("no fallback line in:\n{log}"));
    assert!(
        line.contains("certificate")
            && line.contains("UnknownIssuer")
            && line.contains("store.redis_ca_file"),
        "the line names the problem: {line}"
    );
    assert!(
        line.contains(&format!("127.0.0.1:{}", redis.port)),
        "{line}"
    );
    assert!(!log.contains(PASSWORD), "the password leaked:\n{log}");
    assert!(!log.contains(&issuer.token(1)), "a token leaked:\n{log}");
}

#[tokio::test]
async fn check_validates_the_store_files_and_never_prints_the_password() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate(dir.path());
    let Servers { issuer, upstream } = Servers::start(Dialect::OAuth2).await;
    let check = |store: StoreSection| {
        let toml = store_toml(store, &issuer, &upstream, |p| p);
        let path = dir.path().join("check.toml");
        std::fs::write(&path, toml.render()).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_bearer-proxy"))
            .args(["--config", &path.display().to_string(), "check"])
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!text.contains(PASSWORD), "password in check output: {text}");
        (out.status.code(), text)
    };
    let tls =
        || StoreSection::default().redis_url(format!("rediss://bp:{PASSWORD}@127.0.0.1:6380/0"));
    let ca = pki.ca.display().to_string();
    let cert = pki.client_cert.display().to_string();
    let key = pki.client_key.display().to_string();
    let (code, out) = check(
        tls()
            .redis_ca_file(&ca)
            .redis_client_cert_file(&cert)
            .redis_client_key_file(&key),
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("127.0.0.1:6380") && out.contains("TLS"),
        "{out}"
    );
    assert!(
        out.contains("user bp") && out.contains("password set"),
        "{out}"
    );
    let (code, out) = check(
        StoreSection::default()
            .redis_url(format!("redis://:{PASSWORD}@sentinel/2"))
            .redis_sentinels(["127.0.0.1:26379", "[::1]:26380"])
            .redis_sentinel_master("bp"),
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("master `bp` via Sentinels 127.0.0.1:26379, ::1:26380")
            && out.contains("db 2"),
        "{out}"
    );
    let no_sentinels: [&str; 0] = [];
    let cases = [
        (
            tls().redis_ca_file("/nonexistent/ca.pem"),
            "store.redis_ca_file",
        ),
        (tls().redis_ca_file(&key), "store.redis_ca_file"),
        (
            tls().redis_client_cert_file(&cert),
            "store.redis_client_key_file",
        ),
        (
            tls().redis_client_key_file(&key),
            "store.redis_client_cert_file",
        ),
        (
            tls()
                .redis_client_cert_file(pki.server_cert.display().to_string())
                .redis_client_key_file(&key),
            "store.redis_client_key_file",
        ),
        (
            StoreSection::default()
                .redis_url("redis://127.0.0.1:6379/0")
                .redis_ca_file(&ca),
            "store.redis_ca_file",
        ),
        (
            StoreSection::default().redis_url(format!("http://bp:{PASSWORD}@127.0.0.1:6379/0")),
            "store.redis_url",
        ),
        (
            StoreSection::default()
                .redis_url(format!("rediss://bp:{PASSWORD}@127.0.0.1:6380/0#insecure")),
            "store.redis_url",
        ),
        (
            tls()
                .redis_sentinels(no_sentinels)
                .redis_sentinel_master("m"),
            "store.redis_sentinels",
        ),
        (
            tls()
                .redis_sentinels(["127.0.0.1"])
                .redis_sentinel_master("m"),
            "store.redis_sentinels[0]",
        ),
        (
            tls().redis_sentinels(["127.0.0.1:26379"]),
            "store.redis_sentinel_master",
        ),
        (
            tls().redis_sentinel_master("m"),
            "store.redis_sentinel_master",
        ),
    ];
    for (store, key) in cases {
        let (code, out) = check(store.clone());
        assert_eq!(code, Some(1), "{store}: {out}");
        assert!(out.contains(key), "{store}: the error names {key}: {out}");
    }
}

#[tokio::test]
async fn a_reload_that_changes_the_store_says_it_needs_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate(dir.path());
    let redis = tls_redis(dir.path(), &pki, "no");
    let Servers { issuer, upstream } = Servers::start(Dialect::OAuth2).await;
    let file = dir.path().join("bp.toml");
    let toml = store_toml(tls_store(&redis, &pki.ca), &issuer, &upstream, |p| p);
    std::fs::write(&file, toml.render()).unwrap();
    let proxy = Proxy::start_config(bearer_proxy::config::load(&file).unwrap()).await;
    proxy.token_ready(Duration::from_secs(5)).await;
    // The same config again: nothing to restart.
    let report = proxy.shared.reload().await.expect("reload");
    assert!(report.listener_changes.is_empty(), "{report:?}");
    // A rotated CA file is a store change.
    std::fs::copy(&pki.other_ca, &pki.ca).unwrap();
    let report = proxy.shared.reload().await.expect("reload");
    assert_eq!(report.listener_changes, ["[store] changed"], "{report:?}");
    assert!(!format!("{report:?}").contains(PASSWORD));
    assert_eq!(
        proxy.store.fleet_up(),
        Some(true),
        "still on the running link"
    );
    proxy.stop().await;
}

// === Sentinel ===

/// Every proxy shares tokens through `node` right now.
fn on_node(proxies: &[Proxy], node: &Node) -> bool {
    let addr = format!("127.0.0.1:{}", node.port);
    proxies.iter().all(|p| {
        p.store.redis_node().as_deref() == Some(addr.as_str()) && p.store.fleet_up() == Some(true)
    })
}

/// A master, a replica and three Sentinels, all with password `PASSWORD`; with
/// `pki`, every one of them speaks TLS only.
struct Sentinels {
    master: Node,
    replica: Node,
    sentinels: Vec<Node>,
    pki: Option<Pki>,
}

const MASTER_NAME: &str = "bp-master";

/// `redis-server` or `redis-sentinel` arguments serving TLS only on `port`.
fn tls_args(pki: &Pki, port: u16) -> Vec<String> {
    let path = |p: &PathBuf| p.display().to_string();
    vec![
        "--port".to_owned(),
        "0".to_owned(),
        "--tls-port".to_owned(),
        port.to_string(),
        "--tls-cert-file".to_owned(),
        path(&pki.server_cert),
        "--tls-key-file".to_owned(),
        path(&pki.server_key),
        "--tls-ca-cert-file".to_owned(),
        path(&pki.ca),
        "--tls-auth-clients".to_owned(),
        "no".to_owned(),
        "--tls-replication".to_owned(),
        "yes".to_owned(),
    ]
}

fn data_node(dir: &Path, port: u16, replica_of: Option<u16>, tls: Option<&Pki>) -> Node {
    let mut args = strings(&["--bind", "127.0.0.1"]);
    match tls {
        Some(pki) => args.extend(tls_args(pki, port)),
        None => args.extend(["--port".to_owned(), port.to_string()]),
    }
    args.extend(strings(&["--save", "", "--appendonly", "no"]));
    args.extend(strings(&[
        "--requirepass",
        PASSWORD,
        "--masterauth",
        PASSWORD,
    ]));
    args.extend(["--dir".to_owned(), dir.display().to_string()]);
    if let Some(master) = replica_of {
        args.extend(strings(&["--replicaof", "127.0.0.1"]));
        args.push(master.to_string());
    }
    Node::start(
        "redis-server",
        port,
        args,
        dir.join(format!("redis-{port}.log")),
    )
}

impl Sentinels {
    fn start(dir: &Path, pki: Option<Pki>) -> Self {
        let master_port = free_port();
        let master = data_node(dir, master_port, None, pki.as_ref());
        let replica = data_node(dir, free_port(), Some(master_port), pki.as_ref());
        let sentinels = (0..3)
            .map(|i| {
                let port = free_port();
                let conf = dir.join(format!("sentinel-{i}.conf"));
                let listen = match &pki {
                    // Config-file lines: the command-line flags without their dashes.
                    Some(pki) => tls_args(pki, port)
                        .chunks(2)
                        .map(|kv| format!("{} {}\n", kv[0].trim_start_matches('-'), kv[1]))
                        .collect::<String>(),
                    None => format!("port {port}\n"),
                };
                std::fs::write(
                    &conf,
                    format!(
                        "{listen}bind 127.0.0.1\ndir {}\n\
                         sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 2\n\
                         sentinel auth-pass {MASTER_NAME} {PASSWORD}\n\
                         sentinel down-after-milliseconds {MASTER_NAME} 1000\n\
                         sentinel failover-timeout {MASTER_NAME} 4000\n\
                         sentinel parallel-syncs {MASTER_NAME} 1\n",
                        dir.display()
                    ),
                )
                .unwrap();
                Node::start(
                    "redis-sentinel",
                    port,
                    vec![conf.display().to_string()],
                    dir.join(format!("sentinel-{i}.log")),
                )
            })
            .collect();
        Self {
            master,
            replica,
            sentinels,
            pki,
        }
    }

    /// What Sentinel `i` knows about the master.
    async fn master_info(&self, i: usize) -> Option<HashMap<String, String>> {
        let port = self.sentinels[i].port;
        let client = match &self.pki {
            Some(pki) => redis::Client::build_with_tls(
                format!("rediss://127.0.0.1:{port}"),
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(std::fs::read(&pki.ca).unwrap()),
                },
            ),
            None => redis::Client::open(format!("redis://127.0.0.1:{port}")),
        }
        .ok()?;
        let mut conn = client.get_multiplexed_async_connection().await.ok()?;
        redis::cmd("SENTINEL")
            .arg("master")
            .arg(MASTER_NAME)
            .query_async(&mut conn)
            .await
            .ok()
    }

    /// Waits until every Sentinel sees the replica and the two other Sentinels.
    async fn settled(&self) -> bool {
        for _ in 0..300 {
            let mut ready = 0;
            for i in 0..self.sentinels.len() {
                if let Some(info) = self.master_info(i).await {
                    let n = |k: &str| info.get(k).and_then(|v| v.parse::<u32>().ok()) == Some(1);
                    let others = info.get("num-other-sentinels").map(String::as_str) == Some("2");
                    if n("num-slaves") && others {
                        ready += 1;
                    }
                }
            }
            if ready == self.sentinels.len() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }

    fn store(&self) -> StoreSection {
        let sentinels = self
            .sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port));
        let store = match &self.pki {
            Some(pki) => StoreSection::default()
                .redis_url(format!("rediss://:{PASSWORD}@sentinel/0"))
                .redis_ca_file(pki.ca.display().to_string()),
            None => StoreSection::default().redis_url(format!("redis://:{PASSWORD}@sentinel/0")),
        };
        store
            .redis_sentinels(sentinels)
            .redis_sentinel_master(MASTER_NAME)
    }
}

/// Requests to every proxy in a loop (bounded in count) until `stop`; returns
/// (sent, failed).
fn load(proxies: &[Proxy], stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<(usize, usize)> {
    let urls: Vec<String> = proxies.iter().map(|p| p.url("/load")).collect();
    tokio::spawn(async move {
        let (sent, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let mut tasks = Vec::new();
        for url in urls {
            let (stop, sent, failed) = (stop.clone(), sent.clone(), failed.clone());
            tasks.push(tokio::spawn(async move {
                let c = client();
                for _ in 0..20_000 {
                    if stop.load(Ordering::Acquire) {
                        break;
                    }
                    let answer = tokio::time::timeout(
                        Duration::from_secs(10),
                        c.request(Request::get(&url).body(full("")).unwrap()),
                    )
                    .await;
                    sent.fetch_add(1, Ordering::Relaxed);
                    match answer {
                        Ok(Ok(r)) if r.status() == 200 => {}
                        _ => {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        (sent.load(Ordering::Relaxed), failed.load(Ordering::Relaxed))
    })
}

#[tokio::test]
async fn sentinel_failover_zero_failed_requests_converges_and_one_fetch_per_refresh_after() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = Sentinels::start(dir.path(), None);
    assert!(nodes.settled().await, "the Sentinels did not settle");
    let Servers { issuer, upstream } = Servers::start(Dialect::OAuth2).await;
    issuer.set_lifetime(600.0);
    let config = parse(&store_toml(nodes.store(), &issuer, &upstream, |p| p));
    let proxies = fleet(&config, 3).await;
    assert!(
        eventually(Duration::from_secs(5), || converged(&proxies)
            && on_node(&proxies, &nodes.master))
        .await,
        "the fleet uses the master the Sentinels name"
    );
    assert_eq!(issuer.hits(), 1);

    let stop = Arc::new(AtomicBool::new(false));
    let running = load(&proxies, stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    nodes.master.kill();
    let killed = tokio::time::Instant::now();
    // While the master is away, proxy 0 needs a new token (its own refresh): it
    // fetches alone, so the fleet holds two tokens until Redis is back.
    let slot0 = proxies[0].store.slot("p").unwrap();
    assert!(slot0.invalidate(slot0.current().unwrap().generation));
    assert!(
        eventually(Duration::from_secs(5), || slot0
            .current()
            .is_some_and(|t| Some(t.id) != token_ids(&proxies)[1]))
        .await,
        "proxy 0 fetched on its own"
    );
    let alone = slot0.current().unwrap().id;
    assert_eq!(issuer.hits(), 2);
    let followed = eventually(Duration::from_secs(30), || {
        on_node(&proxies, &nodes.replica)
    })
    .await;
    let took = killed.elapsed();
    stop.store(true, Ordering::Release);
    let (sent, failed) = running.await.unwrap();
    eprintln!("failover: fleet on the new master {took:?} after SIGKILL; {sent} requests, {failed} failed");
    assert!(
        followed,
        "the proxies follow the promoted replica: {:?}",
        proxies
            .iter()
            .map(|p| (p.store.redis_node(), p.store.fleet_up()))
            .collect::<Vec<_>>()
    );
    assert!(sent > 100, "the load ran: {sent}");
    assert_eq!(failed, 0, "zero failed requests out of {sent}");
    // The promoted replica kept the fleet's older token; proxy 0 offers its newer
    // one and the others adopt it: one token again, without a fetch.
    assert!(
        eventually(Duration::from_secs(10), || converged(&proxies)
            && token_ids(&proxies)[0] == Some(alone))
        .await,
        "the fleet converges on the longer-lived token: {:?}",
        token_ids(&proxies)
    );
    assert_eq!(issuer.hits(), 2, "no token request to converge");

    // A refresh after the failover: the upstream rejects the token once.
    let before = token_ids(&proxies)[0];
    upstream.reject(&issuer.token(2), 401);
    let answer = send(
        &client(),
        Request::post(proxies[1].url("/orders"))
            .body(full("x"))
            .unwrap(),
    )
    .await;
    assert_eq!(answer.status, 200);
    assert_eq!(
        answer.echoed("authorization"),
        [format!("Bearer {}", issuer.token(3))]
    );
    assert!(
        eventually(Duration::from_secs(5), || converged(&proxies)
            && token_ids(&proxies)[0] != before)
        .await,
        "every proxy switched to the new token"
    );
    assert_eq!(
        issuer.hits(),
        3,
        "one token request for the fleet's refresh"
    );
    for p in proxies {
        p.stop().await;
    }
}

#[tokio::test]
async fn sentinels_master_and_replica_all_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate(dir.path());
    let mut nodes = Sentinels::start(dir.path(), Some(pki));
    assert!(nodes.settled().await, "the Sentinels did not settle");
    let Servers { issuer, upstream } = Servers::start(Dialect::OAuth2).await;
    issuer.set_lifetime(600.0);
    let config = parse(&store_toml(nodes.store(), &issuer, &upstream, |p| p));
    let proxies = fleet(&config, 2).await;
    assert!(
        eventually(Duration::from_secs(5), || converged(&proxies)
            && on_node(&proxies, &nodes.master))
        .await,
        "{:?}",
        proxies
            .iter()
            .map(|p| (p.store.redis_node(), p.store.fleet_up()))
            .collect::<Vec<_>>()
    );
    nodes.master.kill();
    assert!(
        eventually(Duration::from_secs(30), || on_node(
            &proxies,
            &nodes.replica
        ))
        .await,
        "the proxies follow the promoted replica over TLS"
    );
    assert!(converged(&proxies));
    assert_eq!(get(&client(), &proxies[1].url("/x")).await.status, 200);
    assert_eq!(issuer.hits(), 1);
    for p in proxies {
        p.stop().await;
    }
}

// === Ten proxies ===

#[tokio::test]
async fn ten_proxies_one_redis_first_requests_refresh_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut args = strings(&["--bind", "127.0.0.1", "--port"]);
    args.push(port.to_string());
    args.extend(strings(&["--save", "", "--appendonly", "no", "--dir"]));
    args.push(dir.path().display().to_string());
    let mut redis = Node::start("redis-server", port, args, dir.path().join("redis.log"));
    let Servers { issuer, upstream } = Servers::start(Dialect::OAuth2).await;
    issuer.set_delay(Duration::from_millis(200));
    issuer.set_lifetime(600.0);
    let config = parse(&store_toml(
        StoreSection::default().redis_url(format!("redis://127.0.0.1:{port}/0")),
        &issuer,
        &upstream,
        |p| p.prefetch(false),
    ));
    let proxies = fleet(&config, 10).await;

    // 1,000 concurrent first requests, 100 per proxy.
    let mut tasks = Vec::new();
    for proxy in &proxies {
        let c = client();
        for i in 0..100 {
            let (c, url) = (c.clone(), proxy.url(&format!("/first/{i}")));
            tasks.push(tokio::spawn(async move { get(&c, &url).await.status }));
        }
    }
    for task in tasks {
        assert_eq!(task.await.unwrap(), 200);
    }
    assert_eq!(
        issuer.hits(),
        1,
        "one token request for 1,000 first requests"
    );
    assert!(eventually(Duration::from_secs(5), || converged(&proxies)).await);

    // A forced refresh (the upstream rejects the token): one token request.
    let before = token_ids(&proxies)[0];
    upstream.reject(&issuer.token(1), 401);
    let answer = send(
        &client(),
        Request::post(proxies[3].url("/orders"))
            .body(full("x"))
            .unwrap(),
    )
    .await;
    assert_eq!(answer.status, 200);
    assert_eq!(
        answer.echoed("authorization"),
        [format!("Bearer {}", issuer.token(2))]
    );
    assert!(
        eventually(Duration::from_secs(5), || converged(&proxies)
            && token_ids(&proxies)[0] != before)
        .await,
        "every proxy switched to the new token"
    );
    assert_eq!(issuer.hits(), 2, "one token request for the refresh");

    // Redis stopped and restarted under load: nothing fails.
    let stop = Arc::new(AtomicBool::new(false));
    let running = load(&proxies, stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.kill();
    tokio::time::sleep(Duration::from_secs(1)).await;
    redis.resume();
    let back = eventually(Duration::from_secs(10), || {
        converged(&proxies) && proxies.iter().all(|p| p.store.fleet_up() == Some(true))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Release);
    let (sent, failed) = running.await.unwrap();
    eprintln!("redis restart under load: {sent} requests, {failed} failed");
    assert!(
        back,
        "the fleet shares Redis again: {:?}",
        token_ids(&proxies)
    );
    assert!(sent > 100, "the load ran: {sent}");
    assert_eq!(failed, 0, "zero failed requests out of {sent}");
    assert_eq!(issuer.hits(), 2, "a restart costs no token request");
    for p in proxies {
        p.stop().await;
    }
}
