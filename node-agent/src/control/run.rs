//! `zonemesh-agent run`: keep the WireGuard data plane in line with the mesh the controller
//! streams, keep forwarding on the last verified mesh when the controller is away (also
//! across restarts), renew the node certificate at 2/3 of its life, report security events,
//! and answer `status` on a local socket.

use super::client::{self, status_message};
use super::enroll;
use super::meshview::{MeshView, Rejection};
use super::state::{Identity, StateDir, cert_info, write_file};
use crate::dataplane::{
    DataPlane, DataPlaneConfig, MeshMember, PeerStatus, SecurityEvent, reconcile, select_peers,
};
use anyhow::{Context, Result};
use parking_lot::Mutex;
use serde::Serialize;
use std::collections::{BTreeSet, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use zonemesh_ca::TrustStore;
use zonemesh_proto as pb;

/// Options of `run`.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub state: StateDir,
    pub interface: String,
    pub listen_port: u16,
    pub mtu: u16,
}

/// What `status` shows.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
pub struct AgentStatus {
    pub node: String,
    pub zone: String,
    pub spiffe_id: String,
    pub overlay_ip: String,
    pub serial: String,
    pub cert_not_after_unix: u64,
    pub controller: String,
    pub controller_connected: bool,
    pub mesh_version: u64,
    pub rejected_peers: Vec<String>,
    pub blocked_sources: Vec<String>,
    pub peers: Vec<PeerStatusRow>,
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

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
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

struct Agent {
    opts: RunOptions,
    id: Identity,
    me: MeshMember,
    trust: TrustStore,
    dp: DataPlane,
    view: Mutex<MeshView>,
    routes: Mutex<BTreeSet<String>>,
    blocklist_applied: Mutex<String>,
    health: super::health::HealthTable,
    reported: Mutex<HashSet<Rejection>>,
    connected: std::sync::atomic::AtomicBool,
    events: mpsc::Sender<pb::SecurityEvent>,
}

fn load_view(state: &StateDir) -> MeshView {
    let mut view = MeshView::default();
    if let Ok(bytes) = std::fs::read(state.mesh_file()) {
        match <pb::MeshUpdate as prost::Message>::decode(bytes.as_slice()) {
            Ok(u) => view.apply(&u),
            Err(e) => tracing::warn!(error = %e, "ignoring unreadable saved mesh state"),
        }
    }
    view
}

impl Agent {
    /// Bring the data plane and routes in line with the current view.
    fn sync(&self) {
        let view = self.view.lock().clone();
        let (members, rejected) = view.verified_members(&self.trust, SystemTime::now());
        for r in rejected {
            if self.reported.lock().insert(r.clone()) {
                tracing::warn!(peer = %r.peer, reason = %r.reason, "peer refused");
                let _ = self.events.try_send(pb::SecurityEvent {
                    kind: "peer.refused".into(),
                    source: String::new(),
                    detail: format!("{}: {}", r.peer, r.reason),
                    at_unix: unix(SystemTime::now()),
                });
            }
        }
        let desired = select_peers(&self.me, &members, &|z| view.intra_zone(z));
        let changes = reconcile(&desired, &self.dp.peers());
        for c in &changes {
            let kind = match c {
                crate::dataplane::PeerChange::Add(_) => "add",
                crate::dataplane::PeerChange::Update(_) => "update",
                crate::dataplane::PeerChange::Remove { .. } => "remove",
            };
            tracing::info!(peer = %c.name(), change = kind, "peer change");
        }
        self.dp.apply(changes);
        self.sync_routes(&view);
        self.sync_blocklist(&view);
    }

    /// Enforce the controller's blocklist: drop every packet from a blocked source in this
    /// host's nftables (table `inet zonemesh`, set elements expire by themselves). The sets
    /// are rewritten whole in one transaction, so a lifted block leaves them at once.
    fn sync_blocklist(&self, view: &MeshView) {
        let (v4, v6) = super::blocklist::nft_elements(
            view.blocklist.values(),
            unix(SystemTime::now()),
            &self.id.controller,
        );
        let wanted = format!("{v4:?}{v6:?}");
        let mut last = self.blocklist_applied.lock();
        if *last == wanted || (last.is_empty() && v4.is_empty() && v6.is_empty()) {
            return;
        }
        let mut script = String::from(
            "table inet zonemesh {}\nflush table inet zonemesh\ntable inet zonemesh {\n\
             set blocked4 { type ipv4_addr; flags timeout; }\n\
             set blocked6 { type ipv6_addr; flags timeout; }\n\
             chain input { type filter hook input priority -10; policy accept; ip saddr @blocked4 drop; ip6 saddr @blocked6 drop; }\n}\n",
        );
        if !v4.is_empty() {
            script.push_str(&format!(
                "add element inet zonemesh blocked4 {{ {} }}\n",
                v4.join(", ")
            ));
        }
        if !v6.is_empty() {
            script.push_str(&format!(
                "add element inet zonemesh blocked6 {{ {} }}\n",
                v6.join(", ")
            ));
        }
        if nft(&script) {
            tracing::info!(sources = v4.len() + v6.len(), "blocklist applied");
            *last = wanted;
        }
    }

    fn sync_routes(&self, view: &MeshView) {
        let wanted: BTreeSet<String> = view
            .zones
            .values()
            .filter(|z| z.name != self.id.zone || z.intra_zone_tunnels)
            .map(|z| z.cidr.clone())
            .collect();
        let mut routes = self.routes.lock();
        for cidr in wanted.difference(&routes.clone()) {
            if ip_route("replace", cidr, &self.opts.interface) {
                routes.insert(cidr.clone());
            }
        }
        for cidr in routes.clone().difference(&wanted) {
            ip_route("del", cidr, &self.opts.interface);
            routes.remove(cidr);
        }
    }

    /// A Mesh client over mutual TLS with the node's current certificate (read afresh, so a
    /// renewed certificate is used from the next call on). Snapshots of large meshes exceed
    /// tonic's default 4 MiB message limit, hence the higher one.
    async fn mesh_client(&self) -> Result<pb::mesh_client::MeshClient<tonic::transport::Channel>> {
        let channel =
            client::connect(&self.id.controller, client::mtls_config(&self.opts.state)?).await?;
        Ok(pb::mesh_client::MeshClient::new(channel).max_decoding_message_size(256 * 1024 * 1024))
    }

    fn save_view(&self) {
        let bytes = prost::Message::encode_to_vec(&self.view.lock().to_update());
        if let Err(e) = write_file(&self.opts.state.mesh_file(), &bytes, 0o600) {
            tracing::warn!(error = %e, "could not save mesh state");
        }
    }

    fn status(&self) -> AgentStatus {
        let view = self.view.lock().clone();
        let cert = self
            .opts
            .state
            .read_cert()
            .ok()
            .and_then(|c| cert_info(&c).ok());
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
            controller: self.id.controller.clone(),
            controller_connected: self.connected.load(std::sync::atomic::Ordering::Relaxed),
            mesh_version: view.version,
            rejected_peers: self
                .reported
                .lock()
                .iter()
                .map(|r| format!("{}: {}", r.peer, r.reason))
                .collect(),
            blocked_sources: view.blocklist.keys().cloned().collect(),
            peers: {
                let ips: std::collections::HashMap<String, IpAddr> = self
                    .dp
                    .peers()
                    .into_iter()
                    .filter_map(|p| Some((p.name.clone(), p.allowed_ips.first()?.addr())))
                    .collect();
                self.dp
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
                    .collect()
            },
        }
    }
}

fn nft(script: &str) -> bool {
    use std::io::Write;
    let child = std::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let Ok(mut child) = child else {
        tracing::warn!("nft not available: the blocklist cannot be enforced on this host");
        return false;
    };
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(script.as_bytes());
    }
    match child.wait_with_output() {
        Ok(o) if o.status.success() => true,
        Ok(o) => {
            tracing::warn!(error = %String::from_utf8_lossy(&o.stderr).trim(), "nft refused the blocklist");
            false
        }
        Err(e) => {
            tracing::warn!(error = %e, "nft failed");
            false
        }
    }
}

fn ip_route(op: &str, cidr: &str, dev: &str) -> bool {
    match std::process::Command::new("ip")
        .args(["route", op, cidr, "dev", dev])
        .status()
    {
        Ok(s) if s.success() => true,
        Ok(_) | Err(_) => {
            tracing::warn!(cidr, dev, op, "ip route failed");
            false
        }
    }
}

/// Run until SIGTERM/SIGINT or `shutdown`.
pub async fn run(opts: RunOptions, shutdown: CancellationToken) -> Result<()> {
    let id = opts.state.identity()?;
    let trust = TrustStore::new(
        &id.trust_domain,
        vec![opts.state.read_ca()?],
        opts.state.read_chain()?,
    );
    let wg_private = opts.state.read_wg_key()?;
    let overlay: IpAddr = id
        .overlay_ip
        .parse()
        .context("identity has a bad overlay address")?;
    let me = MeshMember {
        name: format!("{}/{}", id.zone, id.node),
        zone: id.zone.clone(),
        public_key: crate::dataplane::public_key(&wg_private),
        endpoints: id.endpoints.iter().filter_map(|e| e.parse().ok()).collect(),
        overlay_ip: overlay,
    };
    let mut dp = DataPlane::start(DataPlaneConfig {
        private_key: *wg_private,
        listen_port: opts.listen_port,
        interface: opts.interface.clone(),
        address: ipnet::IpNet::from(overlay),
        routes: vec![],
        mtu: opts.mtu,
    })
    .await?;
    let dp_events = dp.take_events();
    let (ev_tx, ev_rx) = mpsc::channel(1024);
    let agent = Arc::new(Agent {
        view: Mutex::new(load_view(&opts.state)),
        opts,
        id,
        me,
        trust,
        dp,
        routes: Mutex::new(BTreeSet::new()),
        blocklist_applied: Mutex::new(String::new()),
        health: super::health::HealthTable::default(),
        reported: Mutex::new(HashSet::new()),
        connected: false.into(),
        events: ev_tx,
    });
    if agent.view.lock().version > 0 {
        tracing::info!(
            version = agent.view.lock().version,
            "forwarding on the saved mesh until the controller answers"
        );
    }
    agent.sync();

    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(watch_loop(agent.clone(), shutdown.clone()));
    tasks.spawn(report_loop(
        agent.clone(),
        ev_rx,
        dp_events,
        shutdown.clone(),
    ));
    tasks.spawn(renew_loop(agent.clone(), shutdown.clone()));
    tasks.spawn(status_server(agent.clone(), shutdown.clone()));
    tasks.spawn(health_loop(agent.clone(), shutdown.clone()));
    {
        let stop = shutdown.clone();
        let a = agent.clone();
        tasks.spawn(async move {
            tokio::select! {
                _ = wait_for_signal() => {}
                _ = a.dp.stopped() => tracing::error!("data plane stopped"),
                _ = stop.cancelled() => {}
            }
            stop.cancel();
        });
    }
    while let Some(r) = tasks.join_next().await {
        if let Err(e) = r {
            tracing::error!(error = %e, "agent task failed");
            shutdown.cancel();
        }
    }
    agent.save_view();
    let routes: Vec<String> = agent.routes.lock().iter().cloned().collect();
    for r in routes {
        ip_route("del", &r, &agent.opts.interface);
    }
    if !agent.blocklist_applied.lock().is_empty() {
        nft("delete table inet zonemesh\n");
    }
    let _ = std::fs::remove_file(agent.opts.state.status_socket());
    match Arc::try_unwrap(agent) {
        Ok(a) => a.dp.shutdown().await,
        Err(_) => tracing::error!("data plane still referenced at shutdown"),
    }
    tracing::info!("agent stopped");
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! { _ = t.recv() => {}, _ = i.recv() => {} }
        }
        _ => std::future::pending().await,
    }
}

async fn watch_once(agent: &Agent, shutdown: &CancellationToken) -> Result<()> {
    let mut rpc = agent.mesh_client().await?;
    let resume = agent.view.lock().version;
    let mut stream = rpc
        .watch(pb::WatchRequest {
            resume_from_version: resume,
        })
        .await
        .map_err(|s| anyhow::anyhow!("watch refused: {}", status_message(&s)))?
        .into_inner();
    agent
        .connected
        .store(true, std::sync::atomic::Ordering::Relaxed);
    tracing::info!(from = resume, "watching the mesh");
    loop {
        let msg = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            m = stream.message() => m,
        };
        match msg {
            Ok(Some(update)) => {
                agent.view.lock().apply(&update);
                agent.sync();
                agent.save_view();
                tracing::debug!(version = update.version, "mesh update applied");
            }
            Ok(None) => anyhow::bail!("controller ended the watch stream"),
            Err(s) => anyhow::bail!("watch stream: {}", status_message(&s)),
        }
    }
}

async fn watch_loop(agent: Arc<Agent>, shutdown: CancellationToken) {
    let mut backoff = Duration::from_millis(500);
    while !shutdown.is_cancelled() {
        let started = std::time::Instant::now();
        if let Err(e) = watch_once(&agent, &shutdown).await {
            tracing::warn!(error = %e, retry_in = ?backoff, "controller unreachable; forwarding on the last known mesh");
        }
        agent
            .connected
            .store(false, std::sync::atomic::Ordering::Relaxed);
        if started.elapsed() > Duration::from_secs(30) {
            backoff = Duration::from_millis(500);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

async fn report_loop(
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
        tokio::time::sleep(Duration::from_millis(200)).await;
        while let Ok(e) = dp.try_recv() {
            batch.push(to_pb(e));
        }
        while let Ok(e) = own.try_recv() {
            batch.push(e);
        }
        let send = async {
            agent
                .mesh_client()
                .await?
                .report_events(pb::SecurityEvents { events: batch })
                .await?;
            anyhow::Ok(())
        };
        if let Err(e) = send.await {
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

/// Probe every peer through its tunnel every 2 s; report the matrix row every 10 s.
async fn health_loop(agent: Arc<Agent>, shutdown: CancellationToken) {
    let pinger = match super::health::Pinger::new() {
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
                if rows.is_empty() || !agent.connected.load(std::sync::atomic::Ordering::Relaxed) {
                    continue;
                }
                let a = agent.clone();
                let send = async move {
                    a.mesh_client().await?.report_health(pb::HealthReport { peers: rows }).await?;
                    anyhow::Ok(())
                };
                if let Err(e) = tokio::time::timeout(Duration::from_secs(5), send).await.unwrap_or_else(|_| Err(anyhow::anyhow!("timeout"))) {
                    tracing::debug!(error = %e, "health report not delivered");
                }
            }
        }
    }
}

/// When to renew: 2/3 of the lifetime, minus up to 5% jitter so a fleet does not renew at once.
fn renew_at(not_before: SystemTime, not_after: SystemTime) -> SystemTime {
    let life = not_after.duration_since(not_before).unwrap_or_default();
    let jitter = life.mul_f64(rand::random::<f64>() * 0.05);
    not_before + life * 2 / 3 - jitter
}

async fn renew_loop(agent: Arc<Agent>, shutdown: CancellationToken) {
    loop {
        let wait = match agent.opts.state.read_cert().and_then(|c| cert_info(&c)) {
            Ok(info) => renew_at(info.not_before, info.not_after)
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO),
            Err(_) => Duration::from_secs(60),
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        match enroll::renew(&agent.opts.state).await {
            Ok(info) => tracing::info!(serial = %info.serial_hex, "node certificate renewed"),
            Err(e) => {
                tracing::warn!(error = %e, "renewal failed; retrying in 60 s");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(60)) => {}
                }
            }
        }
    }
}

async fn status_server(agent: Arc<Agent>, shutdown: CancellationToken) {
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
