//! `zonemesh-agent run`: keep the WireGuard data plane in line with the mesh the controller
//! streams, keep forwarding on the last verified mesh when the controller is away (also
//! across restarts), renew the node certificate at 2/3 of its life, report security events,
//! and answer `status` on a local socket.
//!
//! One task per job, each in its own module: the Watch stream and the coalescing sync of
//! the data plane and host ([`sync`]), renewal ([`renew`]), security events ([`events`]),
//! ICMP probes ([`probe`]), the status socket ([`status`]) and, with `--edge-*`, the
//! portal edge ([`edge`]). What the loop acts on is injected ([`RunDeps`]): the data plane,
//! the host's routes and firewall, and the clock.

mod edge;
mod events;
mod link;
mod probe;
mod renew;
mod rotation;
mod scrape;
mod ssh;
mod status;
mod sync;
#[cfg(test)]
mod tests;

pub use ssh::SshdConfig;
pub use status::{AgentStatus, EdgeDomainRow, PeerStatusRow, SyncCounters, query_status};
pub use zonemesh_deploy::edge::EdgeConfig;

use super::clock::{Clock, SystemClock};
use super::effects::{HostEffects, SystemEffects};
use super::meshview::{MeshView, Rejection};
use super::state::{Identity, StateDir};
use crate::dataplane::{DataPlane, DataPlaneConfig, MeshMember};
use anyhow::{Context, Result};
use link::ControllerLink;
use parking_lot::Mutex;
use std::collections::HashSet;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::{Duration, SystemTime};
use tokio::sync::{Notify, mpsc};
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
    /// Serve portal domains (`--edge-*`), validated before anything binds.
    pub edge: Option<EdgeConfig>,
    /// Serve `GET /metrics` on this address (`--metrics-listen`); off when `None`.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Replace the node key on every N-th renewal (0: never).
    pub rotate_key_every: u32,
    /// Logs to follow for authentication failures (`--watch-log`); `sources.toml` in the
    /// state directory adds to them.
    pub watch_log: Vec<super::logwatch::LogSource>,
    /// Manage the local sshd (`--manage-sshd`); without it a drop-in left by an earlier
    /// run is removed.
    pub sshd: Option<SshdConfig>,
}

impl RunOptions {
    /// The defaults of `zonemesh-agent run` for a state directory and interface name: port
    /// 51820, MTU 1420, no edge, no metrics, no key rotation, no log sources, no sshd.
    pub fn new(state: StateDir, interface: impl Into<String>) -> Self {
        Self {
            state,
            interface: interface.into(),
            listen_port: 51820,
            mtu: 1420,
            edge: None,
            metrics_listen: None,
            rotate_key_every: 0,
            watch_log: Vec::new(),
            sshd: None,
        }
    }
}

/// Starts the data plane for a configuration.
pub type StartDataPlane = Box<
    dyn FnOnce(DataPlaneConfig) -> Pin<Box<dyn Future<Output = Result<DataPlane>> + Send>> + Send,
>;

/// What the run loop acts on. [`RunDeps::system`] is the real host.
pub struct RunDeps {
    /// Creates the data plane (the real one creates the TUN device and binds the socket).
    pub start_dataplane: StartDataPlane,
    /// Routes and firewall.
    pub effects: Arc<dyn HostEffects>,
    /// Time for certificate checks and renewal.
    pub clock: Arc<dyn Clock>,
    /// Probe every peer with ICMP echo through its tunnel (needs the kernel's TUN device).
    pub icmp_probes: bool,
}

impl std::fmt::Debug for RunDeps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunDeps")
            .field("icmp_probes", &self.icmp_probes)
            .finish_non_exhaustive()
    }
}

impl RunDeps {
    /// The kernel TUN device and UDP socket, `ip` and `nft`, the system clock.
    pub fn system() -> Self {
        Self {
            start_dataplane: Box::new(|config| {
                Box::pin(async move { Ok(DataPlane::start(config).await?) })
            }),
            effects: Arc::new(SystemEffects),
            clock: Arc::new(SystemClock),
            icmp_probes: true,
        }
    }
}

/// Deadline of one unary RPC to the controller.
const RPC_DEADLINE: Duration = Duration::from_secs(15);

pub(crate) fn unix(t: SystemTime) -> u64 {
    zonemesh_ca::unix_secs(t)
}

#[derive(Debug, Default)]
struct Counters {
    updates: AtomicU64,
    syncs: AtomicU64,
    chain_checks: AtomicU64,
    saves: AtomicU64,
}

pub(crate) struct Agent {
    opts: RunOptions,
    id: Identity,
    me: MeshMember,
    /// The pinned roots and the trust store built from them (changed by CA bundles).
    trust: Mutex<TrustState>,
    /// Bumped whenever the pinned roots or the CA bundle acted on change.
    ca_changes: tokio::sync::watch::Sender<u64>,
    dp: DataPlane,
    effects: Arc<dyn HostEffects>,
    clock: Arc<dyn Clock>,
    link: ControllerLink,
    /// The mesh as last received; the sync task works from a copy.
    view: Mutex<MeshView>,
    /// Set when the view changed since it was last saved.
    unsaved: AtomicBool,
    sync_wanted: Notify,
    save_wanted: Notify,
    /// Peers refused in the last sync (reported once each).
    reported: Mutex<HashSet<Rejection>>,
    health: super::health::HealthTable,
    connected: AtomicBool,
    events: mpsc::Sender<pb::SecurityEvent>,
    counters: Counters,
    /// Bumped whenever an update brings a CRL other than the one held.
    crl_changes: tokio::sync::watch::Sender<u64>,
    /// Bumped whenever an update brings an SSH state.
    ssh_changes: tokio::sync::watch::Sender<u64>,
    /// The edge's per-domain status, for `status` (with `--edge-*`).
    edge_status: Option<tokio::sync::watch::Receiver<EdgeStatusMap>>,
    /// What the log followers read, matched and dropped.
    pub(crate) logwatch_stats: Arc<super::logwatch::LogwatchStats>,
}

/// What the agent trusts now.
pub(crate) struct TrustState {
    /// The pinned roots (`ca.crt`), the first one named in `identity.json`.
    pinned: Vec<Vec<u8>>,
    /// The node's own chain (`chain.pem`): intermediates known without any bundle.
    own_chain: Vec<Vec<u8>>,
    /// The bundle last acted on.
    bundle: Option<pb::CaBundle>,
    store: TrustStore,
}

impl TrustState {
    fn new(trust_domain: &str, pinned: Vec<Vec<u8>>, own_chain: Vec<Vec<u8>>) -> Self {
        let store = TrustStore::new(trust_domain, pinned.clone(), own_chain.clone());
        Self {
            pinned,
            own_chain,
            bundle: None,
            store,
        }
    }
}

type EdgeStatusMap = std::collections::BTreeMap<String, zonemesh_deploy::edge::DomainStatus>;

/// A started agent, with the receivers of the data plane's and its own security events.
type Started = (
    Agent,
    Option<mpsc::Receiver<crate::dataplane::SecurityEvent>>,
    mpsc::Receiver<pb::SecurityEvent>,
);

/// What `Agent::start` reads from the state directory.
struct Loaded {
    id: Identity,
    ca: Vec<Vec<u8>>,
    chain: Vec<Vec<u8>>,
    cert: Vec<u8>,
    node_key: zeroize::Zeroizing<Vec<u8>>,
    wg_private: zeroize::Zeroizing<[u8; 32]>,
    view: MeshView,
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
    /// Read the state directory, start the data plane and prepare the controller link.
    async fn start(opts: RunOptions, deps: RunDeps) -> Result<Started> {
        let st = opts.state.clone();
        let l = super::blocking(move || {
            Ok(Loaded {
                id: st.identity()?,
                ca: st.read_pinned_roots()?,
                chain: st.read_chain()?,
                cert: st.read_cert()?,
                node_key: st.read_node_key()?,
                wg_private: st.read_wg_key()?,
                view: load_view(&st),
            })
        })
        .await?;
        let trust = TrustState::new(&l.id.trust_domain, l.ca.clone(), l.chain.clone());
        let overlay: IpAddr =
            l.id.overlay_ip
                .parse()
                .context("identity has a bad overlay address")?;
        let me = MeshMember {
            name: format!("{}/{}", l.id.zone, l.id.node),
            zone: l.id.zone.clone(),
            public_key: crate::dataplane::public_key(&l.wg_private),
            endpoints: l
                .id
                .endpoints
                .iter()
                .filter_map(|e| e.parse().ok())
                .collect(),
            overlay_ip: overlay,
        };
        let link = ControllerLink::new(
            l.id.controller_addrs(),
            &l.ca,
            &l.cert,
            &l.chain,
            &l.node_key,
        )?;
        let mut dp = (deps.start_dataplane)(DataPlaneConfig {
            private_key: *l.wg_private,
            listen_port: opts.listen_port,
            interface: opts.interface.clone(),
            address: ipnet::IpNet::from(overlay),
            routes: vec![],
            mtu: opts.mtu,
        })
        .await?;
        let dp_events = dp.take_events();
        let (ev_tx, ev_rx) = mpsc::channel(1024);
        let agent = Agent {
            opts,
            id: l.id,
            me,
            trust: Mutex::new(trust),
            ca_changes: tokio::sync::watch::Sender::new(0),
            dp,
            effects: deps.effects,
            clock: deps.clock,
            link,
            view: Mutex::new(l.view),
            unsaved: AtomicBool::new(false),
            sync_wanted: Notify::new(),
            save_wanted: Notify::new(),
            reported: Mutex::new(HashSet::new()),
            health: super::health::HealthTable::default(),
            connected: false.into(),
            events: ev_tx,
            counters: Counters::default(),
            crl_changes: tokio::sync::watch::Sender::new(0),
            ssh_changes: tokio::sync::watch::Sender::new(0),
            edge_status: None,
            logwatch_stats: Arc::default(),
        };
        Ok((agent, dp_events, ev_rx))
    }

    /// Run `rpc` with a deadline, giving up at shutdown.
    async fn rpc<T>(
        &self,
        shutdown: &CancellationToken,
        deadline: Duration,
        rpc: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        tokio::select! {
            _ = shutdown.cancelled() => anyhow::bail!("shutting down"),
            r = tokio::time::timeout(deadline, rpc) => {
                r.map_err(|_| anyhow::anyhow!("the controller did not answer within {deadline:?}"))?
            }
        }
    }
}

/// Run until SIGTERM/SIGINT or `shutdown`.
pub async fn run(opts: RunOptions, shutdown: CancellationToken) -> Result<()> {
    run_with(opts, RunDeps::system(), shutdown).await
}

/// Run on the given data plane, host effects and clock until SIGTERM/SIGINT or `shutdown`.
pub async fn run_with(opts: RunOptions, deps: RunDeps, shutdown: CancellationToken) -> Result<()> {
    let icmp_probes = deps.icmp_probes;
    let log_sources = super::logwatch::configured(&opts.watch_log, &opts.state.sources_file())?;
    // Set once the event queue exists; the edge's 401/403 answers before that are not told.
    let edge_failures = Arc::new(edge::AuthFailures::default());
    // The edge binds first: a port in use fails the start before the data plane exists.
    let edge = match opts.edge.clone() {
        Some(mut cfg) => {
            cfg.clock = deps.clock.clone();
            cfg.auth_failures = Some(edge_failures.clone());
            Some(Arc::new(
                zonemesh_deploy::edge::Edge::start(cfg, shutdown.clone()).await?,
            ))
        }
        None => None,
    };
    let metrics_listener = match opts.metrics_listen {
        Some(a) => Some(super::metrics::bind(a).await?),
        None => None,
    };
    let (mut agent, dp_events, ev_rx) = Agent::start(opts, deps).await?;
    agent.edge_status = edge.as_ref().map(|e| e.status());
    let agent = Arc::new(agent);
    let log_queue =
        super::logwatch::EventQueue::new(agent.events.clone(), agent.logwatch_stats.clone());
    edge_failures.attach(log_queue.clone());
    let saved = agent.view.lock().version;
    if saved > 0 {
        tracing::info!(
            version = saved,
            "forwarding on the saved mesh until the controller answers"
        );
    }
    agent.sync_wanted.notify_one();

    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(sync::sync_loop(agent.clone(), shutdown.clone()));
    tasks.spawn(sync::save_loop(agent.clone(), shutdown.clone()));
    tasks.spawn(sync::watch_loop(agent.clone(), shutdown.clone()));
    tasks.spawn(events::report_loop(
        agent.clone(),
        ev_rx,
        dp_events,
        shutdown.clone(),
    ));
    tasks.spawn(renew::renew_loop(agent.clone(), shutdown.clone()));
    if !log_sources.is_empty() {
        tasks.spawn(super::logwatch::run(
            log_sources,
            log_queue,
            shutdown.clone(),
        ));
    }
    tasks.spawn(status::status_server(agent.clone(), shutdown.clone()));
    if icmp_probes {
        tasks.spawn(probe::health_loop(agent.clone(), shutdown.clone()));
    }
    if let Some(l) = metrics_listener {
        tracing::info!(metrics = ?l.local_addr().ok(), "serving /metrics");
        let a = agent.clone();
        let metrics = Arc::new(super::metrics::AgentMetrics::new(Arc::new(move || {
            a.metrics_sample()
        })));
        tasks.spawn(super::metrics::serve(l, metrics, shutdown.clone()));
    }
    match agent.opts.sshd.clone() {
        Some(cfg) => {
            tasks.spawn(ssh::sshd_loop(agent.clone(), cfg, shutdown.clone()));
        }
        None => {
            let st = agent.opts.state.clone();
            if let Err(e) = super::blocking(move || ssh::unmanage(&st)).await {
                tracing::warn!(error = %e, "removing the sshd drop-in failed");
            }
        }
    }
    if let Some(e) = &edge {
        tasks.spawn(edge::edge_loop(agent.clone(), e.clone(), shutdown.clone()));
        tasks.spawn(edge::staple_refresh_loop(
            agent.clone(),
            e.clone(),
            shutdown.clone(),
        ));
    }
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
    if let Some(e) = &edge {
        e.join().await;
    }
    let _ = std::fs::remove_file(agent.opts.state.status_socket());
    // Blocking work started by a task that has ended may still hold the agent briefly.
    let mut agent = agent;
    let mut waited = 0;
    let agent = loop {
        match Arc::try_unwrap(agent) {
            Ok(a) => break Some(a),
            Err(a) if waited < 200 => {
                agent = a;
                waited += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(_) => break None,
        }
    };
    match agent {
        Some(a) => a.dp.shutdown().await,
        None => tracing::error!("data plane still referenced at shutdown"),
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
