//! What both binaries do before and around their command: the command line expanded with
//! the configuration file, the logger whose filter `systemctl reload` (SIGHUP) may change,
//! and the reload loop itself.

use clap::Parser;
use std::ffi::OsString;
use std::process::ExitCode;
use tracing_subscriber::{EnvFilter, Registry, layer::SubscriberExt, reload};

/// Exit status for a configuration that cannot be used (EX_CONFIG-like, as usage errors).
pub const EXIT_BAD_CONFIG: u8 = 64;

/// Changes the log filter of a running process.
pub type LogHandle = reload::Handle<EnvFilter, Registry>;

/// The command line with the configuration file's settings. A bad file or bad arguments are
/// printed (the file's error after `prefix`) and give the exit status to end with.
pub fn parse<C: Parser>(argv: &[OsString], prefix: &str) -> Result<C, ExitCode> {
    let expanded = match crate::expand(&C::command(), argv.to_vec()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{prefix}: {e}");
            return Err(ExitCode::from(EXIT_BAD_CONFIG));
        }
    };
    C::try_parse_from(expanded).map_err(|e| {
        let _ = e.print();
        ExitCode::from(e.exit_code().clamp(0, 255) as u8)
    })
}

/// Installs the stderr logger with `filter` (`info` if it does not parse) and returns the
/// handle that changes it later.
pub fn install_logger(
    filter: &str,
) -> Result<LogHandle, tracing::subscriber::SetGlobalDefaultError> {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| "info".into());
    let (filter, handle) = reload::Layer::<EnvFilter, Registry>::new(filter);
    let subscriber = tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr));
    tracing::subscriber::set_global_default(subscriber)?;
    Ok(handle)
}

/// On every SIGHUP: read the configuration file again and apply its log filter (`log_of`
/// picks it from the parsed command line). Nothing else is re-read: what a process can
/// safely change while running is its logging. A file that no longer parses leaves
/// everything as it was. Never returns; the caller drops it when the command ends.
pub async fn reload_log_on_sighup<C: Parser>(
    argv: &[OsString],
    log: &LogHandle,
    log_of: impl Fn(&C) -> &str,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; reload disabled");
            return std::future::pending().await;
        }
    };
    while hup.recv().await.is_some() {
        let cli = crate::expand(&C::command(), argv.to_vec())
            .map_err(|e| e.to_string())
            .and_then(|a| C::try_parse_from(a).map_err(|e| e.to_string()));
        match cli {
            Ok(cli) => {
                let wanted = log_of(&cli);
                match EnvFilter::try_new(wanted) {
                    Ok(f) => match log.reload(f) {
                        Ok(()) => tracing::info!(log = %wanted, "configuration reloaded"),
                        Err(e) => tracing::warn!(error = %e, "log filter not applied"),
                    },
                    Err(e) => {
                        tracing::warn!(error = %e, "reload: bad log filter; kept the old one")
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e.replace('\n', " "), "reload refused; nothing changed")
            }
        }
    }
    std::future::pending().await
}
