//! Command-line interface: subcommands and global flags.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// A local reverse proxy that adds OAuth2 client-credentials bearer tokens.
#[derive(Debug, Parser)]
#[command(name = "bearer-proxy", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Config file [default: $BEARER_PROXY_CONFIG, then ./bearer-proxy.toml]
    #[arg(short = 'c', long = "config", global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Log output format
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Log level (error, warn, info, debug, trace); RUST_LOG overrides it
    #[arg(long, global = true, default_value = "info", value_name = "LEVEL")]
    pub log_level: String,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve (the default)
    Run,
    /// Validate the config and print its routes and providers
    Check,
    /// Print a valid token for PROVIDER on stdout and exit
    Token {
        /// The provider's name in the config
        provider: String,
        /// The key (member, tenant) for a provider with key_header
        #[arg(long, value_name = "VALUE")]
        key: Option<String>,
    },
    /// Run a self-contained demo on loopback: token issuer, echo upstream, proxy
    Demo {
        /// Where the demo proxy listens
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

impl Cli {
    /// The config path: `-c`, then `$BEARER_PROXY_CONFIG`, then `./bearer-proxy.toml`.
    pub fn config_path(&self) -> PathBuf {
        self.config
            .clone()
            .or_else(|| std::env::var_os("BEARER_PROXY_CONFIG").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("bearer-proxy.toml"))
    }
}
