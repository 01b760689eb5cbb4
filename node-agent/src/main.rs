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
    /// Enroll this node with a one-time token; keys are generated here and never leave.
    Enroll(cmd::enroll::EnrollArgs),
    /// Show this node's identity.
    Identity(cmd::enroll::StateArgs),
    /// Renew this node's certificate now over mutual TLS.
    Renew(cmd::enroll::StateArgs),
    /// Run the agent: WireGuard tunnels to the other zones, driven by the controller.
    Run(cmd::enroll::RunArgs),
    /// Show peers, handshakes, bytes and certificate expiry of the running agent.
    Status(cmd::enroll::StateArgs),
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
        Command::Enroll(args) => cmd::enroll::run_enroll(args),
        Command::Identity(args) => cmd::enroll::run_identity(args),
        Command::Renew(args) => cmd::enroll::run_renew(args),
        Command::Run(args) => cmd::enroll::run_agent(args),
        Command::Status(args) => cmd::enroll::run_status(args),
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
