//! `enroll`, `identity` and `renew`: the node's identity from the command line.

use anyhow::Result;
use clap::Args as ClapArgs;
use std::path::PathBuf;
use std::process::ExitCode;
use zonemesh_agent::control::enroll::{self, EnrollParams};
use zonemesh_agent::control::state::{StateDir, cert_info};

#[derive(ClapArgs, Debug)]
pub struct EnrollArgs {
    /// Controller gRPC address, HOST:PORT.
    #[arg(long)]
    pub controller: String,
    /// SHA-256 fingerprint of the controller's CA root (printed by `zonemesh-controller init`).
    #[arg(long)]
    pub ca_fingerprint: String,
    /// One-time enrollment token (`zonemesh-controller token create`).
    #[arg(long, env = "ZONEMESH_TOKEN", hide_env_values = true)]
    pub token: String,
    #[arg(long)]
    pub state_dir: PathBuf,
    /// Node name (default: the host name).
    #[arg(long)]
    pub name: Option<String>,
    /// Expected zone; refused if the token is for another one.
    #[arg(long)]
    pub zone: Option<String>,
    /// Underlay endpoint(s) peers should use to reach this node, IP:PORT.
    #[arg(long = "endpoint")]
    pub endpoints: Vec<String>,
}

#[derive(ClapArgs, Debug)]
pub struct StateArgs {
    #[arg(long)]
    pub state_dir: PathBuf,
    #[arg(long)]
    pub json: bool,
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

pub fn run_enroll(a: EnrollArgs) -> Result<ExitCode> {
    for e in &a.endpoints {
        e.parse::<std::net::SocketAddr>()
            .map_err(|_| anyhow::anyhow!("--endpoint {e:?} is not IP:PORT"))?;
    }
    let state = StateDir::new(&a.state_dir);
    let params = EnrollParams {
        controller: a.controller,
        ca_fingerprint: a.ca_fingerprint,
        token: a.token,
        node: a.name.unwrap_or_else(enroll::default_node_name),
        zone: a.zone,
        endpoints: a.endpoints,
    };
    let id = runtime()?.block_on(enroll::enroll(&state, &params))?;
    println!("enrolled as {} (overlay {})", id.spiffe_id, id.overlay_ip);
    Ok(ExitCode::SUCCESS)
}

pub fn run_identity(a: StateArgs) -> Result<ExitCode> {
    let state = StateDir::new(&a.state_dir);
    let id = state.identity()?;
    let info = cert_info(&state.read_cert()?)?;
    let expiry = humantime::format_rfc3339_seconds(info.not_after).to_string();
    if a.json {
        let mut v = serde_json::to_value(&id)?;
        v["serial"] = info.serial_hex.clone().into();
        v["not_after"] = expiry.into();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("node:        {}", id.node);
        println!("zone:        {}", id.zone);
        println!("spiffe id:   {}", id.spiffe_id);
        println!("overlay ip:  {}", id.overlay_ip);
        println!("serial:      {}", info.serial_hex);
        println!("expires:     {expiry}");
        println!("controller:  {}", id.controller);
    }
    Ok(ExitCode::SUCCESS)
}

pub fn run_renew(a: StateArgs) -> Result<ExitCode> {
    let state = StateDir::new(&a.state_dir);
    let info = runtime()?.block_on(enroll::renew(&state))?;
    println!(
        "renewed: serial {} valid until {}",
        info.serial_hex,
        humantime::format_rfc3339_seconds(info.not_after)
    );
    Ok(ExitCode::SUCCESS)
}
