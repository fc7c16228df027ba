//! Tracing setup: text or JSON lines on stderr, `RUST_LOG` over `--log-level`.
//!
//! Lines are formatted where the event happens but written to stderr by a thread of
//! their own: at `info` every request logs an access line, and a `write(2)` to a pipe or
//! terminal on a worker thread is a blocking call that stalls every connection on it.

use std::io::IsTerminal;

use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::EnvFilter;

use crate::cli::LogFormat;

/// Lines waiting for the writer thread before a logging call waits for it: about 0.15 s
/// of access lines at 50,000 requests a second, and bounded so a stuck stderr cannot
/// grow memory without end. The queue is allocated and touched whole at start-up (32
/// bytes a line): 65,536 lines made 2 MiB of every process's resident memory.
const BUFFERED_LINES: usize = 8 * 1024;

/// Installs the global subscriber. Logs go to stderr so stdout stays clean for
/// `token` and `demo` output. Keep the guard until the process ends: dropping it
/// writes out the lines still queued.
pub fn init(format: LogFormat, level: &str) -> anyhow::Result<WorkerGuard> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.is_empty() => EnvFilter::try_new(spec)?,
        _ => EnvFilter::try_new(level)
            .map_err(|e| anyhow::anyhow!("--log-level {level:?} is not a log level: {e}"))?,
    };
    // Not lossy: when the queue is full the logging call waits, as a direct write would,
    // rather than dropping access lines.
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .buffered_lines_limit(BUFFERED_LINES)
        .lossy(false)
        .thread_name("log-writer")
        .finish(std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colour codes only on a terminal: in a file or journald they are noise.
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(writer);
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    result.map_err(|e| anyhow::anyhow!("cannot set up logging: {e}"))?;
    Ok(guard)
}
