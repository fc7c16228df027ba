//! The on-disk token cache (`token_cache_dir`): tokens that survive a restart.
//!
//! One file per provider, named by the provider's fingerprint (every setting that
//! shapes the token, the secret included: see `ProviderConfig::fingerprint`), so
//! changed credentials never reuse an old token.
//! Files are 0600 in a 0700 directory and replaced atomically (temp file + rename).
//! All functions here block: call them from `spawn_blocking` or before serving.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::seal::{Sealer, Unusable};

use crate::config::ProviderConfig;
use crate::secret::Secret;
use crate::unix_time;

/// Why the cache directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cannot use {} as the token cache directory", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{} is writable by group or others (mode {mode:o}); run `chmod 700 {}`",
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

/// The file as written: the token sealed like the fleet's Redis value (see
/// `seal`), the provider and times in the clear but authenticated.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CacheFile {
    v: u8,
    provider: String,
    fingerprint: String,
    fetched_at_ms: u64,
    expires_at_ms: u64,
    nonce: String,
    ciphertext: String,
}

const FORMAT: u8 = 2;

/// Every field stored in the clear, bound to the sealed token.
fn associated(file: &CacheFile) -> Vec<u8> {
    format!(
        "cache\n{}\n{}\n{}\n{}\n{}",
        file.v, file.provider, file.fingerprint, file.fetched_at_ms, file.expires_at_ms
    )
    .into_bytes()
}

/// The cache file's text for `provider`'s token.
pub fn encode(
    provider: &ProviderConfig,
    key_id: Option<&str>,
    token: &Secret,
    fetched_at: SystemTime,
    expires_at: SystemTime,
) -> Option<String> {
    let mut file = CacheFile {
        v: FORMAT,
        provider: provider.name.clone(),
        fingerprint: provider.fingerprint_for(key_id).to_string(),
        fetched_at_ms: unix_time::millis(fetched_at),
        expires_at_ms: unix_time::millis(expires_at),
        nonce: String::new(),
        ciphertext: String::new(),
    };
    (file.nonce, file.ciphertext) = Sealer::new(provider, key_id, "cache")
        .seal(&associated(&file), token.expose().as_bytes())?;
    serde_json::to_string(&file).ok()
}

/// Reads a cache file's text for `provider`, checking its times against `now`.
/// Any text, however made, gets a token or a reason; `Ok(None)` for a file of other
/// settings or credentials (the fingerprint differs: not ours to judge).
pub fn decode(
    provider: &ProviderConfig,
    key_id: Option<&str>,
    text: &str,
    now: SystemTime,
) -> Result<Option<CachedToken>, Unusable> {
    let file: CacheFile = serde_json::from_str(text).map_err(|_| Unusable::Format)?;
    if file.v != FORMAT {
        return Err(Unusable::Format);
    }
    if file.fingerprint != provider.fingerprint_for(key_id).as_str() {
        return Ok(None);
    }
    let (value, fetched_at, expires_at) = Sealer::new(provider, key_id, "cache").open_token(
        &associated(&file),
        &file.nonce,
        &file.ciphertext,
        file.fetched_at_ms,
        file.expires_at_ms,
        now,
    )?;
    Ok(Some(CachedToken {
        value,
        fetched_at,
        expires_at,
    }))
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
            provider.fingerprint_for(key_id).tag()
        ))
    }

    /// The cached token for `provider` (its key `key_id` for a keyed provider), if
    /// there is one that has not expired. A file that cannot be used (corrupt, tampered
    /// with, implausible times) is logged and ignored; the next fetch overwrites it.
    pub fn load(&self, provider: &ProviderConfig, key_id: Option<&str>) -> Option<CachedToken> {
        let path = self.path_for(provider, key_id);
        let text = match read_small(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(error) => {
                tracing::warn!(provider = %provider.name, path = %path.display(), %error, "cannot read cached token; ignoring it");
                return None;
            }
        };
        match decode(provider, key_id, &text, SystemTime::now()) {
            Ok(token) => token,
            Err(Unusable::Expired) => None,
            Err(why) => {
                tracing::warn!(
                    provider = %provider.name,
                    path = %path.display(),
                    reason = %why,
                    "cached token file is unusable: {why}; ignoring it and fetching a new token"
                );
                None
            }
        }
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
        let text = encode(provider, key_id, token, fetched_at, expires_at)
            .ok_or_else(|| std::io::Error::other("cannot seal the token"))?;
        let path = self.path_for(provider, key_id);
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let result = (|| {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            fs::rename(&tmp, &path)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }
}

/// Reads a cache file of at most 64 KiB (a token file is far smaller; anything
/// bigger is not ours and is not read into memory).
fn read_small(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut text = String::new();
    fs::File::open(path)?
        .take(64 * 1024 + 1)
        .read_to_string(&mut text)?;
    if text.len() > 64 * 1024 {
        return Err(std::io::Error::other("larger than 64 KiB"));
    }
    Ok(text)
}
