//! How the fleet reaches Redis: one address, or whichever master the Sentinels
//! name right now, over TLS when the URL says `rediss://`.
//!
//! TLS is the redis crate's own (rustls, the same crypto provider as the rest of the
//! proxy), verifying the server against the system roots plus `redis_ca_file`.
//! The link remembers the node it last reached (`host:port`, never credentials).

use std::sync::Mutex;
use std::time::Duration;

use base64::Engine;
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{ClientTlsConfig, ConnectionAddr, IntoConnectionInfo, TlsCertificates, TlsMode};

use super::fleet::FleetError;
use crate::config::RedisConfig;

/// Where the fleet's Redis is.
pub struct RedisLink {
    target: Target,
    /// `host:port` of the node last connected to.
    node: Mutex<Option<String>>,
}

enum Target {
    Direct(redis::Client),
    /// Asks the Sentinels for the master at every (re)connection.
    Sentinel {
        client: tokio::sync::Mutex<SentinelClient>,
        master: String,
    },
}

impl RedisLink {
    /// Builds the clients; nothing is connected yet. Reads the system roots when
    /// `redis_ca_file` is set: call off the async runtime.
    pub fn new(config: &RedisConfig) -> Result<Self, FleetError> {
        // The redis crate builds its rustls config with the process default provider.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let certificates = config.tls.then(|| certificates(config));
        // The URL may hold a password: errors never quote it.
        let url = config.url.expose();
        let unusable = |_| FleetError::Redis("store.redis_url is not a usable Redis URL".into());
        let (target, node) = match &config.sentinel_master {
            None => {
                let client = match certificates {
                    Some(certs) => redis::Client::build_with_tls(url, certs),
                    None => redis::Client::open(url),
                }
                .map_err(unusable)?;
                let node = client.get_connection_info().addr().to_string();
                (Target::Direct(client), Some(node))
            }
            Some(master) => {
                let info = url.into_connection_info().map_err(unusable)?;
                let settings = info.redis_settings();
                let sentinels = config.sentinels.iter().map(|(host, port)| {
                    if config.tls {
                        ConnectionAddr::TcpTls {
                            host: host.clone(),
                            port: *port,
                            insecure: false,
                            tls_params: None,
                        }
                    } else {
                        ConnectionAddr::Tcp(host.clone(), *port)
                    }
                });
                let mut builder =
                    SentinelClientBuilder::new(sentinels, master, SentinelServerType::Master)
                        .map_err(|e| FleetError::Redis(explain(&e)))?
                        .set_client_to_redis_db(settings.db());
                if let Some(user) = settings.username() {
                    builder = builder.set_client_to_redis_username(user);
                }
                if let Some(password) = settings.password() {
                    builder = builder.set_client_to_redis_password(password);
                }
                if let Some(certs) = certificates {
                    builder = builder
                        .set_client_to_redis_tls_mode(TlsMode::Secure)
                        .set_client_to_redis_certificates(certs.clone())
                        .set_client_to_sentinel_tls_mode(TlsMode::Secure)
                        .set_client_to_sentinel_certificates(certs);
                }
                let client = builder
                    .build()
                    .map_err(|e| FleetError::Redis(explain(&e)))?;
                let target = Target::Sentinel {
                    client: tokio::sync::Mutex::new(client),
                    master: master.clone(),
                };
                (target, None)
            }
        };
        Ok(Self {
            target,
            node: Mutex::new(node),
        })
    }

    /// True when the master is found through Sentinels (and may move).
    pub fn follows_sentinels(&self) -> bool {
        matches!(self.target, Target::Sentinel { .. })
    }

    /// `host:port` of the Redis node in use (for Sentinel: the master last found).
    pub fn node(&self) -> Option<String> {
        self.node.lock().ok().and_then(|node| node.clone())
    }

    /// A client for the node to talk to now: with Sentinels, the master they name
    /// (confirmed by its `ROLE`), within `timeout`.
    pub async fn client(&self, timeout: Duration) -> Result<redis::Client, FleetError> {
        match &self.target {
            Target::Direct(client) => Ok(client.clone()),
            Target::Sentinel { client, master } => {
                let found = tokio::time::timeout(timeout, async {
                    client.lock().await.async_get_client().await
                })
                .await
                .map_err(|_| FleetError::Timeout(timeout))?
                .map_err(|e| {
                    FleetError::Redis(format!("no master `{master}` from the Sentinels: {e}"))
                })?;
                let node = found.get_connection_info().addr().to_string();
                if let Ok(mut last) = self.node.lock() {
                    if last.as_deref() != Some(node.as_str()) {
                        tracing::info!(%node, master = %master, "Sentinels name the Redis master");
                        *last = Some(node);
                    }
                }
                Ok(found)
            }
        }
    }
}

/// The certificates for the redis crate. Its `root_cert` replaces the system roots,
/// so with `redis_ca_file` both go in.
fn certificates(config: &RedisConfig) -> TlsCertificates {
    let root_cert = config.ca_pem.as_ref().map(|extra| {
        let mut pem = system_roots_pem();
        pem.extend_from_slice(extra);
        pem
    });
    let client_tls = config.client_cert.as_ref().map(|c| ClientTlsConfig {
        client_cert: c.cert_pem.clone(),
        client_key: c.key_pem.expose().as_bytes().to_vec(),
    });
    TlsCertificates {
        client_tls,
        root_cert,
    }
}

/// The system's trusted roots as PEM.
fn system_roots_pem() -> Vec<u8> {
    let native = rustls_native_certs::load_native_certs();
    for error in &native.errors {
        tracing::debug!(%error, "skipping a system certificate");
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut pem = String::new();
    for cert in &native.certs {
        // The redis crate refuses the whole bundle over one it cannot parse.
        if rustls::RootCertStore::empty().add(cert.clone()).is_err() {
            continue;
        }
        pem.push_str("-----BEGIN CERTIFICATE-----\n");
        let encoded = b64.encode(cert.as_ref());
        for line in encoded.as_bytes().chunks(64) {
            pem.push_str(&String::from_utf8_lossy(line));
            pem.push('\n');
        }
        pem.push_str("-----END CERTIFICATE-----\n");
    }
    pem.into_bytes()
}

/// A Redis error as the log shows it, with a hint where the fix is in the config.
pub fn explain(e: &redis::RedisError) -> String {
    let text = e.to_string();
    let hint = if text.contains("UnknownIssuer") {
        "; the server's certificate is not signed by a CA in the system roots or \
         store.redis_ca_file"
    } else if text.contains("NotValidForName") {
        "; the server's certificate does not name the host in store.redis_url"
    } else if text.contains("CertificateRequired") || text.contains("certificate required") {
        "; the server asks for a client certificate: set store.redis_client_cert_file and \
         store.redis_client_key_file"
    } else if text.contains("WRONGPASS") || text.contains("NOAUTH") {
        "; check the user and password in store.redis_url"
    } else if text.contains("NOPERM") {
        "; the ACL user lacks a command, key or channel the proxy needs"
    } else {
        ""
    };
    format!("{text}{hint}")
}
