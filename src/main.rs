//! The `bearer-proxy` binary: parses the command line and runs one command.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;

use bearer_proxy::cli::{Cli, Command};
use bearer_proxy::config::{self, Config};
use bearer_proxy::preflight::{self, Prepared};
use bearer_proxy::provider::TokenClient;
use bearer_proxy::server::Server;
use bearer_proxy::token::{self, KeyBinding};
use bearer_proxy::{demo, logging};

fn main() -> ExitCode {
    // clap exits with 2 on usage errors and 0 for --help/--version.
    let cli = Cli::parse();
    let log_writer = match logging::init(cli.log_format, &cli.log_level) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    log_panics_without_payload();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            drop(log_writer);
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let outcome = runtime.block_on(run(cli));
    // Queued log lines go out before the final error line, in the order they happened.
    drop(log_writer);
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Replaces the default panic hook, which prints the panic's message to stderr: that
/// message may hold a secret or a token. Only where it happened is logged.
fn log_panics_without_payload() {
    std::panic::set_hook(Box::new(|info| {
        let location = info.location().map_or_else(
            || "an unknown location".to_owned(),
            |l| format!("{}:{}:{}", l.file(), l.line(), l.column()),
        );
        tracing::error!(%location, "panic (message withheld: it may hold a secret)");
    }));
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match &cli.command {
        None | Some(Command::Run) => serve(load(&cli)?).await,
        Some(Command::Check) => {
            let config = load(&cli)?;
            // A secret command that fails must fail `check`, not the first start.
            config::resolve_secrets(&config).await?;
            preflight(&config).await?;
            print!("{}", describe(&config));
            Ok(())
        }
        Some(Command::Token { provider, key }) => {
            token(&load(&cli)?, provider, key.as_deref()).await
        }
        Some(Command::Demo { listen }) => demo::run(*listen, shutdown_signal()).await,
    }
}

fn load(cli: &Cli) -> anyhow::Result<Config> {
    let config = config::load(&cli.config_path())?;
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
    Ok(config)
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let server = Server::bind(config).await.context("cannot start")?;
    server.run(shutdown_signal()).await;
    Ok(())
}

async fn token(config: &Config, name: &str, key: Option<&str>) -> anyhow::Result<()> {
    let provider = config.providers.get(name).cloned().with_context(|| {
        let known: Vec<&str> = config.providers.keys().map(String::as_str).collect();
        format!(
            "{}: no provider named `{name}` (defined: {})",
            config.source.display(),
            known.join(", ")
        )
    })?;
    config::resolve_secrets(config).await?;
    // The key is personal data: no message here quotes it.
    let binding = match (&provider.keys, key) {
        (Some(keys), Some(key)) if keys.pattern.accepts(key) => {
            Some(KeyBinding::new(&provider, key))
        }
        (Some(keys), Some(_)) => anyhow::bail!(
            "provider {name}: the --key value does not match key_pattern `{}`",
            keys.pattern.as_str()
        ),
        (Some(keys), None) => anyhow::bail!(
            "provider {name} holds one token per {} value: pass --key VALUE",
            keys.header
        ),
        (None, Some(_)) => anyhow::bail!("provider {name} has no key_header: --key does not apply"),
        (None, None) => None,
    };
    let Prepared { tls, cache } = preflight(config).await?;
    let client = TokenClient::new(
        tls,
        config.server.connect_timeout,
        config.server.outbound.as_ref(),
    )?;
    // The store's rules: its cache, its freshness check, its token checks.
    let value = token::one_token(config, provider, binding, client, cache)
        .await
        .with_context(|| format!("provider {name}"))?;
    println!("{}", value.expose());
    Ok(())
}

/// The checks `run` makes before it starts (files, directories), off the runtime.
async fn preflight(config: &Config) -> anyhow::Result<Prepared> {
    let config = config.clone();
    Ok(tokio::task::spawn_blocking(move || preflight::run(&config)).await??)
}

/// What `check` prints: listeners, routes and providers, never a secret.
fn describe(config: &Config) -> String {
    use std::fmt::Write;
    let mut out = format!("{}: OK\n", config.source.display());
    for addr in config.listen_addrs() {
        match &addr {
            config::ListenAddr::Tcp(tcp) => {
                let _ = writeln!(out, "listener http://{tcp}");
            }
            config::ListenAddr::Unix(path) => {
                let _ = writeln!(
                    out,
                    "listener {addr} (curl --unix-socket {} http://localhost/...)",
                    path.display()
                );
            }
        }
        for r in config.routes.iter().filter(|r| r.listen == addr) {
            let _ = writeln!(
                out,
                "  route {:<24} -> {}  provider: {}",
                format!("{}{}", r.host.as_deref().unwrap_or(""), r.path_prefix),
                r.upstream.url,
                r.provider.as_deref().unwrap_or("(none, no token)")
            );
        }
    }
    if let Some(outbound) = &config.server.outbound {
        let _ = writeln!(out, "{}", outbound.describe());
    }
    if let config::StoreConfig::Redis(redis) = &config.store {
        let _ = writeln!(out, "store {}", redis.describe());
    }
    for p in config.providers.values() {
        let mut auth = p.client_auth.describe().to_owned();
        if let Some(key) = &p.assertion_key {
            auth.push_str(&format!(" ({:?}", key.alg));
            if let Some(kid) = &key.key_id {
                auth.push_str(&format!(", kid {kid}"));
            }
            auth.push(')');
        }
        if p.client_secret_command.is_some() {
            auth.push_str(", the secret from client_secret_command");
        }
        let _ = writeln!(
            out,
            "provider {}: {} ({}, {auth}{}{})",
            p.name,
            p.token_url,
            p.request_format.describe(),
            p.audience
                .as_ref()
                .map(|a| format!(", audience {a}"))
                .unwrap_or_default(),
            p.keys
                .as_ref()
                .map(|k| format!(", one token per {} value", k.header))
                .unwrap_or_default()
        );
    }
    out
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
