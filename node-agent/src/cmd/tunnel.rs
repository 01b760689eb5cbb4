//! `zonemesh-agent tunnel --config FILE.json`: the data plane with a static peer list,
//! until SIGINT/SIGTERM; then it removes its device and routes.

use anyhow::{Context, Result};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tokio::signal::unix::{SignalKind, signal};
use zonemesh_agent::dataplane::static_config::StaticConfig;
use zonemesh_agent::dataplane::{DataPlane, PeerChange, SecurityEvent, key_b64};

/// Exit code for an unusable configuration.
const EXIT_CONFIG: u8 = 64;

/// Arguments of `tunnel`.
#[derive(clap::Args)]
pub struct Args {
    /// Static configuration (JSON).
    #[arg(long)]
    config: PathBuf,
    /// Print peer status to stderr at this interval (seconds, 0 = never).
    #[arg(long, default_value_t = 0)]
    status_every: u64,
}

/// Runs the tunnel until a termination signal.
pub fn run(args: Args) -> Result<ExitCode> {
    let text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("reading {}", args.config.display()))?;
    let (config, peers) = match StaticConfig::parse(&text) {
        Ok(v) => v,
        Err(reason) => {
            eprintln!("zonemesh-agent: {}: {reason}", args.config.display());
            return Ok(ExitCode::from(EXIT_CONFIG));
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(async move {
        let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
        let mut dp = DataPlane::start(config).await?;
        tracing::info!(public_key = %key_b64(&dp.public_key()), peers = peers.len(), "tunnel up");
        dp.apply(peers.into_iter().map(PeerChange::Add).collect());
        let mut events = dp.take_events().context("events already taken")?;
        let mut status = tokio::time::interval(Duration::from_secs(args.status_every.max(1)));
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = dp.stopped() => {
                    tracing::error!("data plane stopped on an I/O error");
                    dp.shutdown().await;
                    return Ok(ExitCode::FAILURE);
                }
                Some(ev) = events.recv() => log_event(&ev),
                _ = status.tick(), if args.status_every > 0 => {
                    for p in dp.status() {
                        tracing::info!(peer = %p.name, endpoint = ?p.endpoint, last_handshake = ?p.last_handshake, rx = p.rx_bytes, tx = p.tx_bytes, "status");
                    }
                }
            }
        }
        tracing::info!("shutting down");
        dp.shutdown().await;
        Ok(ExitCode::SUCCESS)
    })
}

fn log_event(ev: &SecurityEvent) {
    match ev {
        SecurityEvent::UnknownPeerKey { public_key, source } => {
            tracing::warn!(key = %key_b64(public_key), %source, "handshake from an unknown key dropped")
        }
        SecurityEvent::InvalidHandshake { source } => {
            tracing::warn!(%source, "invalid handshake dropped")
        }
        SecurityEvent::SpoofedSource { peer, inner_source } => {
            tracing::warn!(%peer, %inner_source, "packet with a source outside the peer's allowed IPs dropped")
        }
    }
}
