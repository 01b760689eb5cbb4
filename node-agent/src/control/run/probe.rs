//! ICMP probes of every peer through its tunnel, and the health report to the controller.

use super::Agent;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use zonemesh_proto as pb;

/// A health report is small; a late one is dropped rather than delaying the probes.
const REPORT_DEADLINE: Duration = Duration::from_secs(5);

/// Probe every peer through its tunnel every 2 s; report the matrix row every 10 s.
pub(super) async fn health_loop(agent: Arc<Agent>, shutdown: CancellationToken) {
    let pinger = match super::super::health::Pinger::new() {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %e, "ICMP probes unavailable; no loss/latency figures");
            return;
        }
    };
    let mut probe = tokio::time::interval(Duration::from_secs(2));
    let mut report = tokio::time::interval(Duration::from_secs(10));
    let mut seq: u16 = 0;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = pinger.recv() => {
                if let Ok((ip, s)) = r {
                    agent.health.received(ip, s, std::time::Instant::now());
                }
            }
            _ = probe.tick() => {
                seq = seq.wrapping_add(1);
                let peers = agent.dp.peers();
                let ips: Vec<IpAddr> = peers.iter().filter_map(|p| p.allowed_ips.first().map(|n| n.addr())).collect();
                agent.health.retain(&ips);
                for ip in ips {
                    if let IpAddr::V4(v4) = ip {
                        agent.health.sent(ip, seq, std::time::Instant::now());
                        let _ = pinger.send(v4, seq).await;
                    }
                }
            }
            _ = report.tick() => {
                let rows: Vec<pb::PeerHealth> = agent
                    .status()
                    .peers
                    .into_iter()
                    .filter_map(|p| Some(pb::PeerHealth { peer: p.name, loss: p.loss?, rtt_micros: p.rtt_micros.unwrap_or(0) }))
                    .collect();
                if rows.is_empty() || !agent.connected.load(Ordering::Relaxed) {
                    continue;
                }
                let mut rpc = agent.link.mesh();
                let send = async move {
                    rpc.report_health(pb::HealthReport { peers: rows }).await?;
                    anyhow::Ok(())
                };
                if let Err(e) = agent.rpc(&shutdown, REPORT_DEADLINE, send).await {
                    tracing::debug!(error = %e, "health report not delivered");
                }
            }
        }
    }
}
