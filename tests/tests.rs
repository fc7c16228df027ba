//! One integration-test binary (faster to link than one per file).

mod support;

mod admin;
mod cli;
mod client_auth;
mod config;
mod fleet;
mod forwarding;
mod interop;
mod keyed;
mod large_bodies;
mod leaks;
mod lifecycle;
mod managed_redis;
mod odd_answers;
mod oidc;
mod outbound;
mod paths;
mod properties;
mod robustness;
mod security;
mod tls;
mod tokens;
mod trailers;
mod unix_socket;
mod upstream_pool;
