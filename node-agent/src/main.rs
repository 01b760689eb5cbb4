//! `zonemesh-agent`: the zonemesh node agent CLI.

mod cmd;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// zonemesh node agent.
#[derive(Parser)]
#[command(name = "zonemesh-agent", version, about)]
struct Cli {
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "ZONEMESH_LOG", default_value = "info", global = true)]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the WireGuard data plane from a static JSON config (benchmarks, interop).
    Tunnel(cmd::tunnel::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&cli.log).unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Tunnel(args) => cmd::tunnel::run(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("zonemesh-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}
