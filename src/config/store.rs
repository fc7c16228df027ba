//! Validation of `[store]`: the Redis URL, TLS files and Sentinels.
//!
//! Certificate and key files are read and parsed here, so `check`, `run` and a
//! reload refuse the same broken files with the same message. The URL may hold a
//! password: no message ever quotes it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use redis::IntoConnectionInfo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use url::Url;

use super::raw::RawStore;
use super::validate::{read_secret_file, read_small_file, VResult, Validator};
use super::{RedisClientCert, RedisConfig, StoreConfig};
use crate::secret::Secret;

/// Certificate files are public but should still be small.
const CERT_FILE_LIMIT: u64 = 1024 * 1024;

impl Validator<'_> {
    pub(super) fn store(&self, store: &RawStore) -> VResult<StoreConfig> {
        let backend = self.opt_string("store.backend", store.backend.as_ref())?;
        let url = self.opt_string("store.redis_url", store.redis_url.as_ref())?;
        let key_prefix = self
            .opt_string("store.key_prefix", store.key_prefix.as_ref())?
            .unwrap_or_else(|| "bearer-proxy:".to_owned());
        match backend.as_deref() {
            None | Some("memory") => {
                let redis_keys = [
                    ("store.redis_url", store.redis_url.is_some()),
                    ("store.redis_ca_file", store.redis_ca_file.is_some()),
                    (
                        "store.redis_client_cert_file",
                        store.redis_client_cert_file.is_some(),
                    ),
                    (
                        "store.redis_client_key_file",
                        store.redis_client_key_file.is_some(),
                    ),
                    ("store.redis_sentinels", store.redis_sentinels.is_some()),
                    (
                        "store.redis_sentinel_master",
                        store.redis_sentinel_master.is_some(),
                    ),
                ];
                if let Some((key, _)) = redis_keys.iter().find(|(_, set)| *set) {
                    return Err(self.err(*key, "is set but store.backend is not \"redis\""));
                }
                Ok(StoreConfig::Memory)
            }
            Some("redis") => {
                let url = url.ok_or_else(|| {
                    self.err("store.redis_url", "is required with backend = \"redis\"")
                })?;
                self.redis(store, url, key_prefix).map(StoreConfig::Redis)
            }
            Some(other) => Err(self.err(
                "store.backend",
                format!("`{other}` is not a store backend (expected \"memory\" or \"redis\")"),
            )),
        }
    }

    fn redis(&self, store: &RawStore, url: String, key_prefix: String) -> VResult<RedisConfig> {
        const KEY: &str = "store.redis_url";
        let parsed = Url::parse(&url)
            .map_err(|_| self.err(KEY, "is not a URL like redis://127.0.0.1:6379/0"))?;
        let sentinels = self.sentinels(store)?;
        let tls = match parsed.scheme() {
            "rediss" => true,
            "redis" => false,
            "unix" | "redis+unix" if sentinels.is_empty() => false,
            "unix" | "redis+unix" => {
                return Err(self.err(
                    KEY,
                    "must be redis:// or rediss:// with store.redis_sentinels",
                ))
            }
            _ => return Err(self.err(KEY, "must be a redis://, rediss:// (TLS) or unix:// URL")),
        };
        if parsed.fragment() == Some("insecure") {
            return Err(self.err(
                KEY,
                "ends in #insecure, which would turn certificate checks off; \
                 trust the server's CA with store.redis_ca_file instead",
            ));
        }
        // The same parser the client uses, so a URL it would refuse fails here.
        url.as_str().into_connection_info().map_err(|_| {
            self.err(
                KEY,
                "is not a usable Redis URL: expected redis[s]://[user:password@]host[:port][/db]",
            )
        })?;
        let ca_pem = self.ca_file(store, tls)?;
        let client_cert = self.client_cert(store, tls)?;
        let sentinel_master = self.sentinel_master(store, !sentinels.is_empty())?;
        Ok(RedisConfig {
            url: Secret::new(url),
            key_prefix,
            tls,
            ca_pem,
            client_cert,
            sentinels,
            sentinel_master,
        })
    }

    fn tls_file(&self, key: &str, raw: Option<&String>, tls: bool) -> VResult<Option<PathBuf>> {
        let Some(raw) = raw else { return Ok(None) };
        if !tls {
            return Err(self.err(key, "only applies to TLS: use a rediss:// store.redis_url"));
        }
        Ok(Some(self.relative(&self.string(key, raw)?)))
    }

    fn ca_file(&self, store: &RawStore, tls: bool) -> VResult<Option<Vec<u8>>> {
        const KEY: &str = "store.redis_ca_file";
        let Some(path) = self.tls_file(KEY, store.redis_ca_file.as_ref(), tls)? else {
            return Ok(None);
        };
        let pem = self.read_cert_file(KEY, &path)?;
        let certs = certificates(&pem)
            .map_err(|why| self.err(KEY, format!("{}: {why}", path.display())))?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| self.err(KEY, format!("{}: {e}", path.display())))?;
        }
        Ok(Some(pem))
    }

    fn client_cert(&self, store: &RawStore, tls: bool) -> VResult<Option<RedisClientCert>> {
        const CERT: &str = "store.redis_client_cert_file";
        const KEY: &str = "store.redis_client_key_file";
        let cert_path = self.tls_file(CERT, store.redis_client_cert_file.as_ref(), tls)?;
        let key_path = self.tls_file(KEY, store.redis_client_key_file.as_ref(), tls)?;
        let (cert_path, key_path) = match (cert_path, key_path) {
            (None, None) => return Ok(None),
            (Some(c), Some(k)) => (c, k),
            (Some(_), None) => return Err(self.err(KEY, format!("is required with {CERT}"))),
            (None, Some(_)) => return Err(self.err(CERT, format!("is required with {KEY}"))),
        };
        let cert_pem = self.read_cert_file(CERT, &cert_path)?;
        let chain = certificates(&cert_pem)
            .map_err(|why| self.err(CERT, format!("{}: {why}", cert_path.display())))?;
        let key_pem = read_secret_file(&key_path)
            .map_err(|e| self.err(KEY, format!("cannot read {}: {e}", key_path.display())))?;
        // The key's own parse error could quote it: only say what was expected.
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| {
            self.err(
                KEY,
                format!(
                    "{} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)",
                    key_path.display()
                ),
            )
        })?;
        // rustls checks the key is usable and belongs to the certificate.
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| self.err(KEY, e.to_string()))?
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_client_auth_cert(chain, key)
        .map_err(|e| {
            self.err(
                KEY,
                format!(
                    "{} does not fit {}: {e}",
                    key_path.display(),
                    cert_path.display()
                ),
            )
        })?;
        Ok(Some(RedisClientCert {
            cert_pem,
            // PEM is ASCII (it parsed above), so nothing is lost.
            key_pem: Secret::new(String::from_utf8_lossy(&key_pem).into_owned()),
        }))
    }

    fn read_cert_file(&self, key: &str, path: &Path) -> VResult<Vec<u8>> {
        read_small_file(path, CERT_FILE_LIMIT)
            .map(|bytes| bytes.to_vec())
            .map_err(|e| self.err(key, format!("cannot read {}: {e}", path.display())))
    }

    fn sentinels(&self, store: &RawStore) -> VResult<Vec<(String, u16)>> {
        let Some(list) = &store.redis_sentinels else {
            return Ok(Vec::new());
        };
        if list.is_empty() {
            return Err(self.err(
                "store.redis_sentinels",
                "is empty: list the Sentinels as \"host:port\", or remove the key",
            ));
        }
        list.iter()
            .enumerate()
            .map(|(i, raw)| {
                let key = format!("store.redis_sentinels[{i}]");
                let value = self.string(&key, raw)?;
                host_port(&value).ok_or_else(|| {
                    self.err(
                        &key,
                        format!("`{value}` is not \"host:port\" (e.g. 10.0.0.1:26379)"),
                    )
                })
            })
            .collect()
    }

    fn sentinel_master(&self, store: &RawStore, with_sentinels: bool) -> VResult<Option<String>> {
        const KEY: &str = "store.redis_sentinel_master";
        let name = self.opt_string(KEY, store.redis_sentinel_master.as_ref())?;
        match (name, with_sentinels) {
            (None, false) => Ok(None),
            (Some(_), false) => Err(self.err(KEY, "needs store.redis_sentinels")),
            (None, true) => Err(self.err(
                KEY,
                "is required with store.redis_sentinels: the name the Sentinels monitor",
            )),
            (Some(name), true) if name.is_empty() || name.contains(char::is_whitespace) => {
                Err(self.err(KEY, "must be a non-empty name without spaces"))
            }
            (Some(name), true) => Ok(Some(name)),
        }
    }
}

impl RedisConfig {
    /// Where the store is, for `check`: node or Sentinels, TLS, user and database,
    /// never the password.
    pub fn describe(&self) -> String {
        let info = self.url.expose().into_connection_info().ok();
        let settings = info.as_ref().map(|i| i.redis_settings());
        let mut out = match &self.sentinel_master {
            Some(master) => {
                let list: Vec<String> = self
                    .sentinels
                    .iter()
                    .map(|(host, port)| format!("{host}:{port}"))
                    .collect();
                format!("redis master `{master}` via Sentinels {}", list.join(", "))
            }
            None => format!(
                "redis at {}",
                info.as_ref()
                    .map_or_else(|| "?".to_owned(), |i| i.addr().to_string())
            ),
        };
        if self.tls {
            out.push_str(", TLS");
            if self.ca_pem.is_some() {
                out.push_str(" (system roots + redis_ca_file)");
            }
            if self.client_cert.is_some() {
                out.push_str(", client certificate");
            }
        }
        if let Some(user) = settings.and_then(|s| s.username()) {
            out.push_str(&format!(", user {user}"));
        }
        if settings.and_then(|s| s.password()).is_some() {
            out.push_str(", password set");
        }
        if let Some(db) = settings.map(|s| s.db()) {
            out.push_str(&format!(", db {db}"));
        }
        out.push_str(&format!(", key prefix {}", self.key_prefix));
        out
    }
}

/// Every certificate in a PEM file; at least one.
fn certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not PEM certificates: {e}"))?;
    if certs.is_empty() {
        return Err("no CERTIFICATE block found".to_owned());
    }
    Ok(certs)
}

/// `host:port` or `[v6]:port` with a non-zero port.
fn host_port(value: &str) -> Option<(String, u16)> {
    let (host, port) = value.rsplit_once(':')?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let port: u16 = port.parse().ok()?;
    if host.is_empty() || port == 0 || host.contains(['/', '@', ' ']) {
        return None;
    }
    Some((host.to_owned(), port))
}

#[cfg(test)]
mod tests {
    use super::host_port;

    #[test]
    fn size_in_messages() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big");
        std::fs::write(&path, vec![b'x'; 70_000]).unwrap();
        let e = super::read_small_file(&path, 64 * 1024).unwrap_err();
        assert_eq!(e.to_string(), "larger than 64 KiB");
    }

    #[test]
    fn sentinel_addresses() {
        assert_eq!(
            host_port("10.0.0.1:26379"),
            Some(("10.0.0.1".into(), 26379))
        );
        assert_eq!(host_port("[::1]:26379"), Some(("::1".into(), 26379)));
        assert_eq!(host_port("sentinel-a:1"), Some(("sentinel-a".into(), 1)));
        for bad in [
            "",
            "host",
            "host:",
            ":26379",
            "host:0",
            "host:99999",
            "u@h:1",
        ] {
            assert_eq!(host_port(bad), None, "{bad}");
        }
    }
}
