//! Logs on stderr through `tracing-subscriber`: text for people (the default) or one JSON
//! object per line, filtered by `RUST_LOG` (`info`, `eventlog=debug,hyper=warn`, ...).

use crate::error::{CliError, Code};
use std::io::IsTerminal;
use tracing_subscriber::EnvFilter;

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, with the current span and its parents.
    Json,
}

/// Installs the global subscriber. `default_filter` applies when `RUST_LOG` is unset or
/// empty: `info` for `serve`, `off` for the other commands, whose errors are their one
/// line on stderr.
pub fn init(format: LogFormat, default_filter: &str) -> Result<(), CliError> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.trim().is_empty() => EnvFilter::builder().parse(&spec).map_err(|e| {
            CliError::new(
                Code::Usage,
                format!("RUST_LOG={spec:?} is not a valid filter ({e}); use e.g. RUST_LOG=info or RUST_LOG=eventlog=debug"),
            )
        })?,
        _ => EnvFilter::new(default_filter),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let installed = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .try_init(),
    };
    // Only fails if a subscriber is already installed, which main never does.
    let _ = installed;
    Ok(())
}
