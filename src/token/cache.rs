//! The on-disk token cache (`token_cache_dir`): tokens that survive a restart.
//!
//! One file per provider, named by a fingerprint of every setting that shapes the
//! token (the secret included), so changed credentials never reuse an old token.
//! Files are 0600 in a 0700 directory and replaced atomically (temp file + rename).
//! All functions here block: call them from `spawn_blocking` or before serving.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::{ClientAuth, ProviderConfig, RequestFormat};
use crate::secret::Secret;

/// Why the cache directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("token_cache_dir {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "token_cache_dir {} is writable by group or others (mode {mode:o}); run `chmod 700 {}`",
        path.display(),
        path.display()
    )]
    Insecure { path: PathBuf, mode: u32 },
}

/// A token read back from disk.
pub struct CachedToken {
    pub value: Secret,
    pub fetched_at: SystemTime,
    pub expires_at: SystemTime,
}

#[derive(Serialize, Deserialize)]
struct CacheFile {
    provider: String,
    fingerprint: String,
    token: String,
    fetched_at_unix: f64,
    expires_at_unix: f64,
}

/// A checked cache directory.
#[derive(Debug, Clone)]
pub struct TokenCache {
    dir: PathBuf,
}

impl TokenCache {
    /// Creates `dir` (0700) if missing; refuses one that group or others can write.
    pub fn open(dir: &Path) -> Result<Self, CacheError> {
        let io = |source| CacheError::Io {
            path: dir.to_owned(),
            source,
        };
        if !dir.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io)?;
        }
        let meta = fs::metadata(dir).map_err(io)?;
        if !meta.is_dir() {
            return Err(io(std::io::Error::other("not a directory")));
        }
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o022 != 0 {
            return Err(CacheError::Insecure {
                path: dir.to_owned(),
                mode,
            });
        }
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    /// The file holding `provider`'s token (of key `key_id` for a keyed provider).
    pub fn path_for(&self, provider: &ProviderConfig, key_id: Option<&str>) -> PathBuf {
        let name: String = provider
            .name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        self.dir.join(format!(
            "{name}-{}.json",
            &fingerprint_for(provider, key_id)[..16]
        ))
    }

    /// The cached token for `provider`, if there is one that has not expired.
    /// A corrupt or unreadable file is logged and ignored.
    pub fn load(&self, provider: &ProviderConfig, key_id: Option<&str>) -> Option<CachedToken> {
        let path = self.path_for(provider, key_id);
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(error) => {
                tracing::warn!(provider = %provider.name, path = %path.display(), %error, "cannot read cached token; ignoring it");
                return None;
            }
        };
        let file: CacheFile = match serde_json::from_str(&text) {
            Ok(file) => file,
            Err(_) => {
                tracing::warn!(provider = %provider.name, path = %path.display(), "cached token file is corrupt; ignoring it");
                return None;
            }
        };
        if file.fingerprint != fingerprint_for(provider, key_id) || file.token.is_empty() {
            return None;
        }
        let at = |secs: f64| {
            (secs.is_finite() && secs > 0.0)
                .then(|| SystemTime::UNIX_EPOCH + Duration::from_secs_f64(secs))
        };
        let (fetched_at, expires_at) = (at(file.fetched_at_unix)?, at(file.expires_at_unix)?);
        (expires_at > SystemTime::now()).then(|| CachedToken {
            value: Secret::new(file.token),
            fetched_at,
            expires_at,
        })
    }

    /// Writes `provider`'s token atomically with mode 0600.
    pub fn store(
        &self,
        provider: &ProviderConfig,
        key_id: Option<&str>,
        token: &Secret,
        fetched_at: SystemTime,
        expires_at: SystemTime,
    ) -> std::io::Result<()> {
        let unix = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64())
        };
        let file = CacheFile {
            provider: provider.name.clone(),
            fingerprint: fingerprint_for(provider, key_id),
            token: token.expose().to_owned(),
            fetched_at_unix: unix(fetched_at),
            expires_at_unix: unix(expires_at),
        };
        let path = self.path_for(provider, key_id);
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let result = (|| {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(serde_json::to_string(&file)?.as_bytes())?;
            f.sync_all()?;
            fs::rename(&tmp, &path)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }
}

/// [`fingerprint`], and for one key of a keyed provider, of that key's id (a keyed
/// hash: file and Redis key names derived from it never reveal the key).
pub fn fingerprint_for(p: &ProviderConfig, key_id: Option<&str>) -> String {
    match key_id {
        None => fingerprint(p),
        Some(id) => {
            let mut h = Sha256::new();
            h.update(fingerprint(p).as_bytes());
            h.update(b"/key/");
            h.update(id.as_bytes());
            h.finalize().iter().map(|b| format!("{b:02x}")).collect()
        }
    }
}

/// A hash of every provider setting that shapes the token, secret included.
pub fn fingerprint(p: &ProviderConfig) -> String {
    let mut h = Sha256::new();
    let mut field = |s: &str| {
        h.update((s.len() as u64).to_le_bytes());
        h.update(s.as_bytes());
    };
    field(p.token_url.as_str());
    field(&p.client_id);
    field(p.client_secret.expose());
    field(p.audience.as_deref().unwrap_or("\0none"));
    field(p.scope.as_deref().unwrap_or("\0none"));
    for (k, v) in &p.extra_params {
        field(k);
        field(v);
    }
    field(match p.request_format {
        RequestFormat::Form => "form",
        RequestFormat::Json => "json",
    });
    field(match p.client_auth {
        ClientAuth::Body => "body",
        ClientAuth::Basic => "basic",
    });
    field(&p.token_field.to_string());
    field(&p.header_prefix);
    if let Some(keys) = &p.keys {
        field(keys.header.as_str());
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}
