//! `zonemesh-agent`: the zonemesh node agent CLI.

mod cmd;

use clap::{CommandFactory, Parser, Subcommand};
use std::ffi::OsString;
use std::process::ExitCode;
use zonemesh_configfile::process;

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
    let cli: Cli = match process::parse(&argv, "zonemesh-agent") {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    let Ok(log_handle) = process::install_logger(&cli.log) else {
        eprintln!("zonemesh-agent: cannot install the logger");
        return ExitCode::FAILURE;
    };
    let result = match cli.command {
        Command::Enroll(args) => cmd::enroll::run_enroll(args),
        Command::Identity(args) => cmd::enroll::run_identity(args),
        Command::Renew(args) => cmd::enroll::run_renew(args),
        Command::Run(args) => cmd::enroll::run_agent(
            args,
            process::reload_log_on_sighup(&argv, &log_handle, |c: &Cli| &c.log),
        ),
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
