//! The control plane's state machine: zones, tokens, enrollment, renewal, revocation and
//! the versioned stream of mesh changes that every agent watches.
//!
//! Each change is computed once, written to the change log (so a reconnecting agent can
//! resume from its last version, also across controller restarts), flushed, and fanned out
//! to all watchers as one shared encoded frame: the cost of a change does not grow with
//! the fleet beyond one wake-up and one write per watcher.
//!
//! This file holds the state and its limits; each job is one file: recording a change
//! (`commit`), watch streams (`watch`), zones and tokens (`zones`), enrollment (`enroll`,
//! with the CSR checks in `csr`), calls from enrolled nodes (`node_calls`), source blocks
//! (`blocks`) and revocation (`revoke`).

mod blocks;
mod commit;
mod csr;
mod enroll;
mod follow;
mod health;
mod node_calls;
mod revoke;
mod ssh;
mod watch;
mod zones;

pub use blocks::{EventCounts, RecentEvent};
pub use follow::{FOLLOW_EVERY, follow_loop};
pub use health::{HealthMatrix, PairHealth, STALE_AFTER, ZoneHealth, matrix as health_view};
pub use node_calls::{HealthRow, RenewKey};
pub use revoke::SERIALS_PER_TXN;
pub use watch::{BACKLOG, CHUNK, Frame, Subscription, coalesce};
pub use zones::{CreatedToken, TOKEN_PURGE_GRACE};

use crate::audit::AuditLog;
use crate::authority::Authority;
use crate::blocklist::{Evidence, EvidenceConfig, NeverBlock};
use crate::clock::{Clock, SystemClock};
use crate::error::{ControllerError, Result};
use crate::limits::{FailureWindow, KeyedBuckets, Rate, WhenFull};
use crate::store::{Store, StoreError};
use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};
use tokio_util::sync::CancellationToken;

/// Key in `meta` of the last recorded change's version.
const MESH_VERSION: &str = "mesh_version";
/// How many past changes are kept for resuming watchers.
const CHANGE_LOG_LEN: u64 = 4096;
/// Most changes replayed from the change log for a watcher that memory no longer covers
/// (`watch::BACKLOG`; after a restart memory holds none): further behind, it gets the
/// (shared, cached) snapshot. A replay is read from the store and encoded for its place
/// behind, the snapshot is shared.
pub const RESUME_MAX_CHANGES: u64 = 256;
/// Enrollment failures allowed per (source, token) per window before it is rate-limited;
/// unknown tokens from one source share one key.
const ENROLL_FAILURES_PER_WINDOW: u32 = 10;
const ENROLL_FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Most (source, token) keys the enrollment limiter tracks.
const ENROLL_LIMITER_KEYS: usize = 4096;
/// Calls an enrolled node may make (per node), and how many nodes are tracked.
pub const RENEW_RATE: Rate = Rate::new(4, Duration::from_secs(3600));
pub const ISSUE_TLS_RATE: Rate = Rate::new(30, Duration::from_secs(3600));
pub const UPDATE_ENDPOINTS_RATE: Rate = Rate::new(6, Duration::from_secs(60));
const RATE_LIMITED_NODES: usize = 65_536;
/// `ReportEvents` calls a node may make: 20 at once, 2 per second sustained; at most
/// [`RATE_LIMITED_NODES`] nodes hold a budget, and a new one is refused while all of them
/// are still refilling (flooding the map cannot reset a node's budget).
pub const REPORT_RATE: Rate = Rate::new(20, Duration::from_secs(10));
/// Peers kept per health report, and the longest peer name kept.
const MAX_HEALTH_ROWS: usize = 1024;
const MAX_PEER_NAME: usize = 128;
/// Longest block reason kept.
const MAX_BLOCK_REASON: usize = 512;
const MAX_ENDPOINTS: usize = 8;
/// Watch streams kept open per node; a newer one ends the oldest (an agent has one).
pub const MAX_STREAMS_PER_NODE: usize = 8;

/// Told of every new CRL before the change that carries it is recorded: the TLS layer's
/// client verifier implements it, so the next handshake already refuses a revoked node
/// (the core never names the TLS layer).
pub trait CrlListener: Send + Sync + std::fmt::Debug {
    /// Start checking against the trusted `roots` and the `crls` of every trusted
    /// intermediate (after a revocation, a CRL refresh or a CA rotation); an error stops
    /// the change from being recorded.
    fn crl_changed(
        &self,
        roots: &[Vec<u8>],
        crls: &[Vec<u8>],
    ) -> std::result::Result<(), CrlListenerError>;
}

/// Why a [`CrlListener`] could not take a new CRL.
pub type CrlListenerError = Box<dyn std::error::Error + Send + Sync>;

/// The control plane.
pub struct Mesh {
    auth: Arc<Authority>,
    store: Store,
    version: AtomicU64,
    /// Serialises writes to the change log so versions are assigned in order; the flush
    /// and the broadcast happen after it is released (see `Mesh::commit`).
    change_lock: Mutex<()>,
    /// Watch fan-out: the published version, recent changes and the shared snapshot.
    fanout: watch::Fanout,
    streams: Mutex<HashMap<String, Vec<CancellationToken>>>,
    /// Keys of `streams` after its last sweep of ended streams.
    live_stream_nodes: std::sync::atomic::AtomicUsize,
    /// Failed enrollments by (source, token hash); `None` stands for every unknown token.
    enroll_failures: FailureWindow<(IpAddr, Option<String>)>,
    renew_limit: KeyedBuckets<String>,
    issue_tls_limit: KeyedBuckets<String>,
    update_endpoints_limit: KeyedBuckets<String>,
    clock: Arc<dyn Clock>,
    evidence: Mutex<Evidence>,
    report_rate: KeyedBuckets<String>,
    /// The controller's own addresses (listeners, TLS names, host addresses when a
    /// listener is unspecified); never blocked.
    own_addresses: Mutex<Vec<(IpAddr, String)>>,
    /// What may not be blocked, rebuilt after node and zone changes.
    never_block: Mutex<Option<Arc<NeverBlock>>>,
    audit: std::sync::OnceLock<Arc<AuditLog>>,
    health: Mutex<HashMap<String, Vec<HealthRow>>>,
    /// First and longest automatic block (`serve --block-*`).
    block_timing: Mutex<crate::blocklist::BlockTiming>,
    /// The last security events reported (and the controller's own), newest last.
    recent_events: Mutex<std::collections::VecDeque<blocks::RecentEvent>>,
    /// Events reported, by kind (unknown kinds under "other"), and automatic blocks placed.
    event_counts: blocks::EventCounts,
    crl_listeners: Mutex<Vec<Arc<dyn CrlListener>>>,
    /// Wraps the enrollment signature (tests slow it down to show it runs outside the
    /// change lock); `None` signs directly.
    sign_hook: Option<Arc<SignHook>>,
    /// Committed changes written to the log but not yet published, by version.
    unpublished: Mutex<std::collections::BTreeMap<u64, Arc<watch::Published>>>,
    /// The last version written to the log (under the change lock); `version` is the
    /// last one flushed and broadcast.
    appended: AtomicU64,
    /// Per zone (named by the operator), the last overlay address allocated: the next
    /// search starts there.
    alloc_hint: Mutex<HashMap<String, IpAddr>>,
    /// The SSH state every snapshot carries (see `ssh`).
    ssh_state: Mutex<Option<zonemesh_proto::SshState>>,
}

/// Runs just before the enrollment signature; see [`Mesh::with_sign_hook`].
pub type SignHook = dyn Fn() + Send + Sync;

impl std::fmt::Debug for Mesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mesh")
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

fn store_err(e: crate::core::kv::KvError) -> ControllerError {
    ControllerError::Store(StoreError::Db(e))
}

fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.trim().as_bytes()))
}

fn parse_endpoints(list: &[String]) -> Result<Vec<SocketAddr>> {
    if list.len() > MAX_ENDPOINTS {
        return Err(ControllerError::BadRequest(format!(
            "at most {MAX_ENDPOINTS} endpoints"
        )));
    }
    list.iter()
        .map(|e| {
            e.parse::<SocketAddr>().map_err(|err| {
                ControllerError::BadRequest(format!("endpoint {e:?} is not IP:PORT: {err}"))
            })
        })
        .collect()
}

impl Mesh {
    /// Start the control plane over an authority and its store.
    pub fn new(auth: Arc<Authority>) -> Result<Arc<Self>> {
        Self::with_clock(auth, Arc::new(SystemClock))
    }

    /// The control plane with an explicit clock (Mesh calls check certificate expiry
    /// against it).
    pub fn with_clock(auth: Arc<Authority>, clock: Arc<dyn Clock>) -> Result<Arc<Self>> {
        Self::build(auth, clock, None)
    }

    /// The control plane with `hook` run before every enrollment signature (a test slows
    /// the signature down with it, to show what else may run meanwhile).
    pub fn with_sign_hook(
        auth: Arc<Authority>,
        clock: Arc<dyn Clock>,
        hook: Arc<SignHook>,
    ) -> Result<Arc<Self>> {
        Self::build(auth, clock, Some(hook))
    }

    fn build(
        auth: Arc<Authority>,
        clock: Arc<dyn Clock>,
        sign_hook: Option<Arc<SignHook>>,
    ) -> Result<Arc<Self>> {
        let store = auth.store().clone();
        let version = store.meta_u64("mesh_version")?;
        Ok(Arc::new(Self {
            auth,
            store,
            version: AtomicU64::new(version),
            appended: AtomicU64::new(version),
            alloc_hint: Mutex::new(HashMap::new()),
            unpublished: Mutex::new(std::collections::BTreeMap::new()),
            sign_hook,
            change_lock: Mutex::new(()),
            fanout: watch::Fanout::new(version),
            streams: Mutex::new(HashMap::new()),
            live_stream_nodes: std::sync::atomic::AtomicUsize::new(0),
            enroll_failures: FailureWindow::new(
                ENROLL_FAILURES_PER_WINDOW,
                ENROLL_FAILURE_WINDOW,
                ENROLL_LIMITER_KEYS,
            ),
            renew_limit: KeyedBuckets::new(RENEW_RATE, RATE_LIMITED_NODES),
            issue_tls_limit: KeyedBuckets::new(ISSUE_TLS_RATE, RATE_LIMITED_NODES),
            update_endpoints_limit: KeyedBuckets::new(UPDATE_ENDPOINTS_RATE, RATE_LIMITED_NODES),
            clock,
            evidence: Mutex::new(Evidence::new(EvidenceConfig::default())),
            report_rate: KeyedBuckets::with_policy(
                REPORT_RATE,
                RATE_LIMITED_NODES,
                WhenFull::RefuseNew,
            ),
            own_addresses: Mutex::new(Vec::new()),
            never_block: Mutex::new(None),
            audit: std::sync::OnceLock::new(),
            health: Mutex::new(HashMap::new()),
            block_timing: Mutex::new(crate::blocklist::BlockTiming::default()),
            recent_events: Mutex::new(std::collections::VecDeque::new()),
            event_counts: blocks::EventCounts::default(),
            crl_listeners: Mutex::new(Vec::new()),
            ssh_state: Mutex::new(None),
        }))
    }

    pub fn authority(&self) -> &Arc<Authority> {
        &self.auth
    }

    /// The controller's metrics (shared with the authority).
    pub fn metrics(&self) -> &crate::metrics::Metrics {
        self.auth.metrics()
    }

    /// The clock Mesh calls are checked against.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// The current time by [`Mesh::clock`].
    pub fn now(&self) -> SystemTime {
        self.clock.now()
    }

    /// Number of (source, token) keys the enrollment limiter holds.
    pub fn enroll_limiter_len(&self) -> usize {
        self.enroll_failures.len()
    }

    pub fn version(&self) -> u64 {
        self.version.load(Ordering::SeqCst)
    }

    /// Number of open Watch streams.
    pub fn watchers(&self) -> usize {
        self.fanout.streams()
    }
}
