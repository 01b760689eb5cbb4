//! `zonemesh-agent`: the zonemesh node agent CLI.

mod cmd;

use clap::{CommandFactory, Parser, Subcommand};
use std::ffi::OsString;
use std::process::ExitCode;
use tracing_subscriber::{EnvFilter, Registry, layer::SubscriberExt, reload};

/// Exit status for a configuration that cannot be used.
const EXIT_BAD_CONFIG: u8 = 64;

/// zonemesh node agent.
#[derive(Parser)]
#[command(name = "zonemesh-agent", version, about)]
struct Cli {
    /// Log filter (tracing EnvFilter syntax); `run` re-reads it from --config on SIGHUP.
    #[arg(long, env = "ZONEMESH_LOG", default_value = "info", global = true)]
    log: String,
    /// TOML file of options (e.g. /etc/zonemesh/agent.toml): top-level keys for every
    /// command that has the option (state-dir), a [run] table for `run`; the command line wins.
    #[arg(long, global = true, env = "ZONEMESH_CONFIG", value_name = "FILE")]
    config: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Enroll this node with a one-time token; keys are generated here and never leave.
    Enroll(cmd::enroll::EnrollArgs),
    /// Show this node's identity.
    Identity(cmd::enroll::StateArgs),
    /// Renew this node's certificate now over mutual TLS (--rotate-key: with a new key).
    Renew(cmd::enroll::RenewArgs),
    /// Run the agent: WireGuard tunnels to the other zones, driven by the controller.
    Run(cmd::enroll::RunArgs),
    /// Show peers, handshakes, bytes and certificate expiry of the running agent.
    Status(cmd::enroll::StateArgs),
    /// Run the WireGuard data plane from a static JSON config (benchmarks, interop).
    Tunnel(cmd::tunnel::Args),
    /// Write man pages and shell completions into DIR (used by scripts/package.sh).
    #[command(hide = true)]
    GenerateDocs {
        #[arg(long, value_name = "DIR")]
        out: std::path::PathBuf,
    },
}

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
        eprintln!("zonemesh-agent: cannot install the logger");
        return ExitCode::FAILURE;
    }
    let result = match cli.command {
        Command::Enroll(args) => cmd::enroll::run_enroll(args),
        Command::Identity(args) => cmd::enroll::run_identity(args),
        Command::Renew(args) => cmd::enroll::run_renew(args),
        Command::Run(args) => cmd::enroll::run_agent(args, reload_on_sighup(&argv, &log_handle)),
        Command::Status(args) => cmd::enroll::run_status(args),
        Command::Tunnel(args) => cmd::tunnel::run(args),
        Command::GenerateDocs { out } => zonemesh_configfile::write_docs(Cli::command(), &out)
            .map(|()| ExitCode::SUCCESS)
            .map_err(|e| anyhow::anyhow!("writing docs into {}: {e}", out.display())),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("zonemesh-agent: {e:#}");
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
            eprintln!("zonemesh-agent: {e}");
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
/// else is re-read (interface, port, edge listeners need a restart). A file that no longer
/// parses leaves everything as it was.
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
            Err(e) => {
                tracing::warn!(error = %e.replace('\n', " "), "reload refused; nothing changed")
            }
        }
    }
    std::future::pending().await
}
