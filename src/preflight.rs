//! The checks `check`, `run` and reload share: every file or directory a config
//! names is opened and judged here, once, so `check` passes exactly the configs
//! `run` starts with.
//!
//! Files that settings name and the config loader already reads (secret files,
//! `redis_ca_file`, client certificates and keys) fail `config::load`, which
//! `check`, `run` and reload all start with. What remains is here: each step names the
//! config file and the key it checks. A setting that reads a file or runs a command
//! at startup joins by adding a step to [`run`] and, when `run` needs what it
//! produced, a field to [`Prepared`].

use std::path::PathBuf;

use crate::config::{Config, StoreConfig};
use crate::tls::{self, TlsError};
use crate::token::cache::{CacheError, TokenCache};
use crate::token::fleet::{self, FleetError};

/// What the checks produced, for the server to use as it is.
pub struct Prepared {
    /// The TLS client settings (system roots plus `extra_ca_file`).
    pub tls: rustls::ClientConfig,
    /// The token cache directory, checked (and created 0700 when missing).
    pub cache: Option<TokenCache>,
}

/// A check that failed: the config file, the key, and the problem as its source.
#[derive(Debug, thiserror::Error)]
#[error("{}: {key}", config.display())]
pub struct PreflightError {
    pub config: PathBuf,
    pub key: &'static str,
    #[source]
    pub problem: Problem,
}

/// Why a file or directory named by the config cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum Problem {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Store(#[from] FleetError),
}

/// Runs every check on `config`. Reads files (and creates `token_cache_dir` as
/// `run` does): call it off the async runtime.
pub fn run(config: &Config) -> Result<Prepared, PreflightError> {
    let fail = |key, problem: Problem| PreflightError {
        config: config.source.clone(),
        key,
        problem,
    };
    let tls = tls::client_config(config.server.extra_ca_file.as_deref())
        .map_err(|e| fail("server.extra_ca_file", e.into()))?;
    let cache = config
        .server
        .token_cache_dir
        .as_deref()
        .map(TokenCache::open)
        .transpose()
        .map_err(|e| fail("server.token_cache_dir", e.into()))?;
    // Files the store names (`redis_ca_file`, client certificates) are read with the
    // config; what is left is building the clients from them.
    if let StoreConfig::Redis(redis) = &config.store {
        fleet::preflight(redis).map_err(|e| fail("store", e.into()))?;
    }
    Ok(Prepared { tls, cache })
}
