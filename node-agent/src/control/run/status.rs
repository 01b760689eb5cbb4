//! `zonemesh-agent status`: what the running agent shows on its local socket.

use super::super::state::{StateDir, cert_info};
use super::{Agent, unix};
use crate::dataplane::PeerStatus;
use anyhow::{Context, Result};
use serde::Serialize;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

/// What `status` shows.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
pub struct AgentStatus {
    pub node: String,
    pub zone: String,
    pub spiffe_id: String,
    pub overlay_ip: String,
    pub serial: String,
    pub cert_not_after_unix: u64,
    /// The controller in use now.
    pub controller: String,
    /// Every controller address, in the order they are tried.
    #[serde(default)]
    pub controllers: Vec<String>,
    pub controller_connected: bool,
    pub mesh_version: u64,
    pub rejected_peers: Vec<String>,
    pub blocked_sources: Vec<String>,
    pub peers: Vec<PeerStatusRow>,
    /// How much work mesh updates caused.
    #[serde(default)]
    pub sync: SyncCounters,
    /// The portal domains this edge serves (empty without `--edge-*`).
    #[serde(default)]
    pub edge: Vec<EdgeDomainRow>,
}

/// One portal domain served by this edge.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct EdgeDomainRow {
    pub domain: String,
    pub serial: String,
    pub not_after_unix: u64,
    /// `stapled`, `revoked`, `no-responder`, `pending` or `unavailable: <reason>`.
    pub staple: String,
    /// The last failure writing its files or reloading, if the last attempt failed.
    pub files_error: Option<String>,
}

/// Mesh updates received and the work they caused, since the agent started.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct SyncCounters {
    /// Updates received on the Watch stream.
    pub updates: u64,
    /// Passes that brought the data plane and host in line (several updates fold into one).
    pub syncs: u64,
    /// Peer certificate chains checked (unchanged ones are not checked again).
    pub chain_checks: u64,
    /// Writes of the saved mesh.
    pub mesh_saves: u64,
}

/// One peer in `status`.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
pub struct PeerStatusRow {
    pub name: String,
    pub zone: String,
    pub endpoint: Option<SocketAddr>,
    pub last_handshake_unix: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// Share of recent ICMP probes through the tunnel that got no reply.
    #[serde(default)]
    pub loss: Option<f32>,
    /// Round trip of the last probe, microseconds.
    #[serde(default)]
    pub rtt_micros: Option<u32>,
}

impl From<PeerStatus> for PeerStatusRow {
    fn from(p: PeerStatus) -> Self {
        Self {
            name: p.name,
            zone: p.zone,
            endpoint: p.endpoint,
            last_handshake_unix: p.last_handshake.map(unix),
            rx_bytes: p.rx_bytes,
            tx_bytes: p.tx_bytes,
            loss: None,
            rtt_micros: None,
        }
    }
}

impl Agent {
    pub(super) fn sync_counters(&self) -> SyncCounters {
        let c = &self.counters;
        SyncCounters {
            updates: c.updates.load(Ordering::Relaxed),
            syncs: c.syncs.load(Ordering::Relaxed),
            chain_checks: c.chain_checks.load(Ordering::Relaxed),
            mesh_saves: c.saves.load(Ordering::Relaxed),
        }
    }

    pub(super) fn status(&self) -> AgentStatus {
        let (version, blocked) = {
            let view = self.view.lock();
            (view.version, view.blocklist.keys().cloned().collect())
        };
        let cert = cert_info(&self.link.current_cert()).ok();
        let ips: std::collections::HashMap<String, IpAddr> = self
            .dp
            .peers()
            .into_iter()
            .filter_map(|p| Some((p.name.clone(), p.allowed_ips.first()?.addr())))
            .collect();
        AgentStatus {
            node: self.id.node.clone(),
            zone: self.id.zone.clone(),
            spiffe_id: self.id.spiffe_id.clone(),
            overlay_ip: self.id.overlay_ip.clone(),
            serial: cert
                .as_ref()
                .map(|c| c.serial_hex.clone())
                .unwrap_or_default(),
            cert_not_after_unix: cert.map(|c| unix(c.not_after)).unwrap_or(0),
            controller: self.link.controller(),
            controllers: self.link.controllers().to_vec(),
            controller_connected: self.connected.load(Ordering::Relaxed),
            mesh_version: version,
            rejected_peers: self
                .reported
                .lock()
                .iter()
                .map(|r| format!("{}: {}", r.peer, r.reason))
                .collect(),
            blocked_sources: blocked,
            peers: self
                .dp
                .status()
                .into_iter()
                .map(|p| {
                    let h = ips.get(&p.name).and_then(|ip| self.health.get(ip));
                    let mut row = PeerStatusRow::from(p);
                    if let Some(h) = h.filter(|h| h.probes > 0) {
                        row.loss = Some(h.loss);
                        row.rtt_micros = h.rtt_micros;
                    }
                    row
                })
                .collect(),
            sync: self.sync_counters(),
            edge: self
                .edge_status
                .as_ref()
                .map(|w| {
                    w.borrow()
                        .iter()
                        .map(|(d, st)| EdgeDomainRow {
                            domain: d.clone(),
                            serial: st.serial_hex.clone(),
                            not_after_unix: st.not_after_unix,
                            staple: st.staple.to_string(),
                            files_error: st.files_error.clone(),
                        })
                        .collect()
                })
                .unwrap_or_default(),
        }
    }
}

pub(super) async fn status_server(agent: Arc<Agent>, shutdown: CancellationToken) {
    let path = agent.opts.state.status_socket();
    let _ = std::fs::remove_file(&path);
    let listener = match tokio::net::UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "status socket");
            return;
        }
    };
    let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
    loop {
        let (mut conn, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
            c = listener.accept() => match c { Ok(c) => c, Err(_) => continue },
        };
        let body = serde_json::to_vec(&agent.status()).unwrap_or_default();
        let _ = tokio::time::timeout(Duration::from_secs(2), conn.write_all(&body)).await;
    }
}

/// Ask a running agent for its status.
pub async fn query_status(state: &StateDir) -> Result<AgentStatus> {
    use tokio::io::AsyncReadExt;
    let path = state.status_socket();
    let mut conn = tokio::net::UnixStream::connect(&path)
        .await
        .with_context(|| {
            format!(
                "no agent is running on {} (start it with `zonemesh-agent run`)",
                state.dir.display()
            )
        })?;
    let mut buf = Vec::new();
    conn.read_to_end(&mut buf).await?;
    let v: serde_json::Value = serde_json::from_slice(&buf).context("bad status reply")?;
    serde_json::from_value(v).context("bad status reply")
}
