//! `zonemesh-controller`: the CA, the control plane and its admin commands. Everything but
//! argument parsing, logging and the runtime lives in the library (`zonemesh_controller::cli`).

use std::ffi::OsString;
use std::process::ExitCode;
use zonemesh_configfile::process;
use zonemesh_controller::cli::{Cli, Command, run};

fn main() -> ExitCode {
    let argv: Vec<OsString> = std::env::args_os().collect();
    let cli: Cli = match process::parse(&argv, "error") {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    let Ok(log_handle) = process::install_logger(&cli.log) else {
        eprintln!("error: cannot install the logger");
        return ExitCode::FAILURE;
    };
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
            _ = process::reload_log_on_sighup(&argv, &log_handle, |c: &Cli| &c.log) => Ok(()),
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

/// The error and its causes on one line.
fn one_line(e: &anyhow::Error) -> String {
    e.chain()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(": ")
        .replace('\n', " ")
}
