//! Security events (from the data plane and the agent's own checks) to the controller, in
//! batches.

use super::{Agent, RPC_DEADLINE, unix};
use crate::dataplane::SecurityEvent;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use zonemesh_proto as pb;

/// Events gathered into one report after the first of a batch.
const BATCH_WINDOW: Duration = Duration::from_millis(200);

pub(super) async fn report_loop(
    agent: Arc<Agent>,
    mut own: mpsc::Receiver<pb::SecurityEvent>,
    dp: Option<mpsc::Receiver<SecurityEvent>>,
    shutdown: CancellationToken,
) {
    let (_keep, mut dp) = match dp {
        Some(rx) => (None, rx),
        None => {
            let (tx, rx) = mpsc::channel(1);
            (Some(tx), rx)
        }
    };
    loop {
        let first = tokio::select! {
            _ = shutdown.cancelled() => return,
            e = own.recv() => match e { Some(e) => e, None => return },
            e = dp.recv() => match e { Some(e) => to_pb(e), None => return },
        };
        let mut batch = vec![first];
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(BATCH_WINDOW) => {}
        }
        while let Ok(e) = dp.try_recv() {
            batch.push(to_pb(e));
        }
        while let Ok(e) = own.try_recv() {
            batch.push(e);
        }
        let mut rpc = agent.link.mesh();
        let send = async move {
            rpc.report_events(pb::SecurityEvents { events: batch })
                .await?;
            anyhow::Ok(())
        };
        if let Err(e) = agent.rpc(&shutdown, RPC_DEADLINE, send).await {
            tracing::debug!(error = %e, "security events not delivered");
        }
    }
}

fn to_pb(e: SecurityEvent) -> pb::SecurityEvent {
    let (kind, source, detail) = match e {
        SecurityEvent::UnknownPeerKey { public_key, source } => (
            "wireguard.unknown_key",
            source.to_string(),
            crate::dataplane::key_b64(&public_key),
        ),
        SecurityEvent::InvalidHandshake { source } => (
            "wireguard.invalid_handshake",
            source.to_string(),
            String::new(),
        ),
        SecurityEvent::SpoofedSource { peer, inner_source } => (
            "wireguard.spoofed_source",
            String::new(),
            format!("{peer} sent {inner_source}"),
        ),
    };
    pb::SecurityEvent {
        kind: kind.into(),
        source,
        detail,
        at_unix: unix(SystemTime::now()),
    }
}
