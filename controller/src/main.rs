//! `zonemesh-controller`: the CA, the control plane and its admin commands. Everything but
//! argument parsing, logging and the runtime lives in the library (`zonemesh_controller::cli`).

use clap::{CommandFactory, Parser};
use std::ffi::OsString;
use std::process::ExitCode;
use tracing_subscriber::{EnvFilter, Registry, layer::SubscriberExt, reload};
use zonemesh_controller::cli::{Cli, Command, run};

/// Exit status for a configuration that cannot be used (EX_CONFIG-like, as usage errors).
const EXIT_BAD_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let argv: Vec<OsString> = std::env::args_os().collect();
    let cli = match parse(&argv) {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    let filter = EnvFilter::try_new(&cli.log).unwrap_or_else(|_| "info".into());
    let (filter, log_handle) = reload::Layer::<EnvFilter, Registry>::new(filter);
    let subscriber = tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr));
    if tracing::subscriber::set_global_default(subscriber).is_err() {
        eprintln!("error: cannot install the logger");
        return ExitCode::FAILURE;
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let serving = matches!(cli.command, Command::Serve { .. });
    let result = rt.block_on(async {
        if !serving {
            return run(cli).await;
        }
        // `systemctl reload` (SIGHUP) re-reads what is safe to change while serving.
        tokio::select! {
            r = run(cli) => r,
            _ = reload_on_sighup(&argv, &log_handle) => Ok(()),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The command line with the configuration file's settings; a bad file or bad arguments
/// end the process with the reason.
fn parse(argv: &[OsString]) -> Result<Cli, ExitCode> {
    let expanded = match zonemesh_configfile::expand(&Cli::command(), argv.to_vec()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return Err(ExitCode::from(EXIT_BAD_CONFIG));
        }
    };
    match Cli::try_parse_from(expanded) {
        Ok(cli) => Ok(cli),
        Err(e) => {
            let _ = e.print();
            Err(ExitCode::from(e.exit_code().clamp(0, 255) as u8))
        }
    }
}

/// On every SIGHUP: read the configuration file again and apply the log filter. Nothing
/// else is re-read (listeners, data directory and CA settings need a restart). A file that
/// no longer parses leaves everything as it was.
async fn reload_on_sighup(argv: &[OsString], log: &reload::Handle<EnvFilter, Registry>) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; reload disabled");
            return std::future::pending().await;
        }
    };
    while hup.recv().await.is_some() {
        let cli = zonemesh_configfile::expand(&Cli::command(), argv.to_vec())
            .map_err(|e| e.to_string())
            .and_then(|a| Cli::try_parse_from(a).map_err(|e| e.to_string()));
        match cli {
            Ok(cli) => match EnvFilter::try_new(&cli.log) {
                Ok(f) => match log.reload(f) {
                    Ok(()) => tracing::info!(log = %cli.log, "configuration reloaded"),
                    Err(e) => tracing::warn!(error = %e, "log filter not applied"),
                },
                Err(e) => tracing::warn!(error = %e, "reload: bad log filter; kept the old one"),
            },
            Err(e) => tracing::warn!(error = %one_line_str(&e), "reload refused; nothing changed"),
        }
    }
    std::future::pending().await
}

fn one_line_str(s: &str) -> String {
    s.replace('\n', " ")
}

/// The error and its causes on one line.
fn one_line(e: &anyhow::Error) -> String {
    e.chain()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(": ")
        .replace('\n', " ")
}
