//! bearer-proxy: a local reverse proxy that adds OAuth2 client-credentials tokens.
//!
//! # Layout, top down
//!
//! - [`cli`], [`logging`]: the command-line edge; [`demo`]: the self-contained loopback demo
//! - [`app`]: the shared state (config in force, token store, routes, clients, metrics) and reload
//! - [`server`]: listeners, worker threads and graceful shutdown
//! - `conn`: serving one client connection (HTTP/2 by prior knowledge, or HTTP/1.1 whose
//!   idle keep-alive waits give hyper's buffers back)
//! - [`admin`]: health, readiness, metrics, token status, reload endpoints (narrow handles only)
//! - [`listener`]: Unix socket files (permissions, stale files, peer uid)
//! - [`proxy`]: routing, header hygiene, forwarding, error answers
//! - [`token`]: the shared refresh-ahead token store
//! - [`provider`]: token-endpoint dialects (request and response)
//! - [`config`]: the TOML file, validated into typed settings
//! - [`preflight`]: the file checks `check`, `run` and reload share
//! - [`client_auth`]: secret commands, client assertion keys, client certificates
//! - leaves: [`secret`] (secrets that never print), [`metrics`] (the Prometheus registry),
//!   [`hop_by_hop`] (the header names that never cross the proxy), [`answer`] (the small
//!   JSON and text answers the proxy writes itself), [`error`] (the boxed error type and the
//!   one-line cause chain), [`unix_time`] (`SystemTime` to and from Unix time), [`tls`] (the
//!   TLS client settings), [`outbound`] (connections directly or through the outbound HTTP
//!   proxy)
//!
//! A request is accepted by a [`server`] worker, routed, checked and given its route's
//! token by the [`proxy`], which reads the token from the [`token`] store without a lock.
//! Each provider's token is fetched and refreshed ahead of expiry by its own task in the
//! store, which builds the request and reads the answer through [`provider`]. The
//! architecture document in `docs/architecture.md` walks both paths in more detail.
// The one exception is `memory`'s two calls into glibc, which have no preconditions.
#![deny(unsafe_code)]

pub mod admin;
pub mod answer;
pub mod app;
pub mod cli;
pub mod client_auth;
pub mod config;
mod conn;
pub mod demo;
pub mod error;
pub mod hop_by_hop;
pub mod listener;
pub mod logging;
pub mod memory;
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
