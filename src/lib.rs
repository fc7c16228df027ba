//! bearer-proxy: a local reverse proxy that adds OAuth2 client-credentials tokens.
//!
//! - [`config`]: the TOML file, validated into typed settings
//! - [`secret`]: a type that keeps secrets and tokens out of logs
//! - [`client_auth`]: secret commands, client assertion keys, client certificates
//! - [`provider`]: token-endpoint dialects (request and response)
//! - [`token`]: the shared refresh-ahead token store
//! - [`proxy`]: routing, header hygiene, forwarding, error answers
//! - [`app`]: the shared state (config in force, token store, routes, clients, metrics) and reload
//! - [`server`]: listeners, worker threads and graceful shutdown
//! - [`listener`]: Unix socket files (permissions, stale files, peer uid)
//! - [`answer`]: the small JSON and text answers the proxy writes itself
//! - [`admin`]: health, readiness, metrics, token status, reload endpoints
//! - [`metrics`]: the Prometheus registry
//! - [`error`]: the boxed error type and the one-line cause chain
//! - [`hop_by_hop`]: the header names that never cross the proxy
//! - [`unix_time`]: `SystemTime` to and from Unix seconds and milliseconds
//! - [`tls`]: the TLS client settings
//! - [`outbound`]: connections directly or through the outbound HTTP proxy
//! - [`preflight`]: the file checks `check`, `run` and reload share
//! - [`demo`]: the self-contained loopback demo
//! - [`cli`], [`logging`]: the command-line edge
#![forbid(unsafe_code)]

pub mod admin;
pub mod answer;
pub mod app;
pub mod cli;
pub mod client_auth;
pub mod config;
pub mod demo;
pub mod error;
pub mod hop_by_hop;
pub mod listener;
pub mod logging;
pub mod metrics;
pub mod outbound;
pub mod preflight;
pub mod provider;
pub mod proxy;
pub mod secret;
pub mod server;
pub mod tls;
pub mod token;
pub mod unix_time;
