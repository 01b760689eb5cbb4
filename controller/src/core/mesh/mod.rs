//! The control plane's state machine: zones, tokens, enrollment, renewal, revocation and
//! the versioned stream of mesh changes that every agent watches.
//!
//! Each change is computed once, written to the change log (so a reconnecting agent can
//! resume from its last version, also across controller restarts), flushed, and fanned out
//! to all watchers as one shared `Arc`: the cost of a change does not grow with the fleet.

use crate::audit::{AuditEvent, AuditLog};
use crate::authority::Authority;
use crate::blocklist::{self, EventTrust, Evidence, EvidenceConfig, NeverBlock, Noted, ReportRate};
use crate::clock::{Clock, SystemClock};
use crate::error::{ControllerError, Result};
use crate::limits::{FailureWindow, KeyedBuckets, Rate};
use crate::store::{
    BlockRecord, NodeRecord, Store, StoreError, TokenRecord, ZoneRecord, decode, encode, node_key,
    unix,
};
use crate::text::{self, Escaped};
use base64::Engine;
use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use zonemesh_ca::{NodeRequest, RevocationReason, VerifiedNode, WireGuardKey, validate_label};
use zonemesh_proto as pb;

/// How many past changes are kept for resuming watchers.
const CHANGE_LOG_LEN: u64 = 4096;
/// A watcher further behind than this gets the (shared, cached) snapshot instead of a
/// replay of the log: a replay costs memory per stream, the snapshot does not.
pub const RESUME_MAX_CHANGES: u64 = 256;
/// Changes decoded from the log at a time while a watcher replays.
pub const REPLAY_CHUNK: u64 = 32;
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
/// `ReportEvents` calls a node may make at once, and per second sustained.
const REPORT_BURST: u32 = 20;
const REPORTS_PER_SEC: f64 = 2.0;
/// Peers kept per health report, and the longest peer name kept.
const MAX_HEALTH_ROWS: usize = 1024;
const MAX_PEER_NAME: usize = 128;
/// Longest block reason kept.
const MAX_BLOCK_REASON: usize = 512;
/// How long an automatic block lasts.
pub const DEFAULT_BLOCK: Duration = Duration::from_secs(3600);
const MAX_ENDPOINTS: usize = 8;
/// Watch streams kept open per node; a newer one ends the oldest (an agent has one).
pub const MAX_STREAMS_PER_NODE: usize = 8;

/// A created token, shown to the operator once.
#[derive(Debug, serde::Serialize)]
pub struct CreatedToken {
    pub token: String,
    pub zone: String,
    pub expires_unix: u64,
    pub uses: u32,
}

/// What a Watch stream needs to start.
pub struct Subscription {
    /// What to send first: the snapshot, or the first chunk of the replayed log.
    pub initial: Vec<Arc<pb::MeshUpdate>>,
    pub last_version: u64,
    /// Log entries after `last_version` up to this version are still to be replayed
    /// (read lazily with [`Mesh::replay`]) before live changes.
    pub replay_to: u64,
    pub rx: broadcast::Receiver<Arc<pb::MeshUpdate>>,
    pub cancel: CancellationToken,
}

/// Where a watcher picks up after `after`: see [`Mesh::resume_from`].
pub struct Resume {
    pub initial: Vec<Arc<pb::MeshUpdate>>,
    pub last_version: u64,
    pub replay_to: u64,
}

/// Whether a renewal keeps the node's key (the default) or is an explicit key rotation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RenewKey {
    /// The CSR must carry the public key of the node's current certificate.
    Keep,
    /// The node asked to move to a new key.
    Rotate,
}

/// Last reported health of a node's peers.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct HealthRow {
    pub peer: String,
    pub loss: f32,
    pub rtt_micros: u32,
    pub reported_unix: u64,
}

/// The control plane.
pub struct Mesh {
    auth: Arc<Authority>,
    store: Store,
    version: AtomicU64,
    /// Serialises writes to the change log so versions are assigned in order; the flush
    /// and the broadcast happen after it is released (see `Mesh::commit`).
    change_lock: Mutex<()>,
    tx: broadcast::Sender<Arc<pb::MeshUpdate>>,
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
    report_rate: Mutex<ReportRate>,
    /// The controller's own addresses (listeners, TLS names, host addresses when a
    /// listener is unspecified); never blocked.
    own_addresses: Mutex<Vec<(IpAddr, String)>>,
    /// What may not be blocked, rebuilt after node and zone changes.
    never_block: Mutex<Option<Arc<NeverBlock>>>,
    audit: std::sync::OnceLock<Arc<AuditLog>>,
    snapshot_cache: Mutex<Option<Arc<pb::MeshUpdate>>>,
    health: Mutex<HashMap<String, Vec<HealthRow>>>,
    block_duration: Duration,
    crl_listeners: Mutex<Vec<Arc<crate::tls::CrlClientVerifier>>>,
    /// Wraps the enrollment signature (tests slow it down to show it runs outside the
    /// change lock); `None` signs directly.
    sign_hook: Option<Arc<SignHook>>,
    /// Committed changes written to the log but not yet published, by version.
    unpublished: Mutex<std::collections::BTreeMap<u64, Arc<pb::MeshUpdate>>>,
    /// The last version written to the log (under the change lock); `version` is the
    /// last one flushed and broadcast.
    appended: AtomicU64,
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

fn store_err(e: sled::Error) -> ControllerError {
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
            e.parse::<SocketAddr>()
                .map_err(|_| ControllerError::BadRequest(format!("endpoint {e:?} is not IP:PORT")))
        })
        .collect()
}

/// The names a CSR asks for (subject CN and SAN strings); used only to refuse a CSR that
/// names another node, never to fill in the certificate.
fn csr_names(csr_der: &[u8]) -> Vec<String> {
    use x509_parser::prelude::{FromDer, X509CertificationRequest};
    let Ok((_, csr)) = X509CertificationRequest::from_der(csr_der) else {
        return vec![];
    };
    let mut names: Vec<String> = csr
        .certification_request_info
        .subject
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_owned))
        .collect();
    if let Some(exts) = csr.requested_extensions() {
        for ext in exts {
            if let x509_parser::extensions::ParsedExtension::SubjectAlternativeName(san) = ext {
                names.extend(san.general_names.iter().map(|n| match n {
                    x509_parser::extensions::GeneralName::URI(u) => u.to_string(),
                    x509_parser::extensions::GeneralName::DNSName(d) => d.to_string(),
                    other => format!("{other}"),
                }));
            }
        }
    }
    names
}

/// Whether a CSR carries the same public key as a certificate.
fn same_public_key(csr_der: &[u8], cert_der: &[u8]) -> bool {
    use x509_parser::prelude::{FromDer, X509Certificate, X509CertificationRequest};
    let (Ok((_, csr)), Ok((_, cert))) = (
        X509CertificationRequest::from_der(csr_der),
        X509Certificate::from_der(cert_der),
    ) else {
        return false;
    };
    csr.certification_request_info.subject_pki.raw == cert.tbs_certificate.subject_pki.raw
}

fn check_csr_names(csr_der: &[u8], trust_domain: &str, zone: &str, node: &str) -> Result<()> {
    let spiffe = zonemesh_ca::SpiffeId {
        trust_domain: trust_domain.into(),
        zone: zone.into(),
        node: node.into(),
    }
    .uri();
    for name in csr_names(csr_der) {
        if name != node && name != spiffe {
            return Err(ControllerError::PermissionDenied(format!(
                "CSR names {name:?}, but this request is for node {zone}/{node}"
            )));
        }
    }
    Ok(())
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
        let (tx, _) = broadcast::channel(1024);
        Ok(Arc::new(Self {
            auth,
            store,
            version: AtomicU64::new(version),
            appended: AtomicU64::new(version),
            unpublished: Mutex::new(std::collections::BTreeMap::new()),
            sign_hook,
            change_lock: Mutex::new(()),
            tx,
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
            report_rate: Mutex::new(ReportRate::new(REPORT_BURST, REPORTS_PER_SEC, 65_536)),
            own_addresses: Mutex::new(Vec::new()),
            never_block: Mutex::new(None),
            audit: std::sync::OnceLock::new(),
            snapshot_cache: Mutex::new(None),
            health: Mutex::new(HashMap::new()),
            block_duration: DEFAULT_BLOCK,
            crl_listeners: Mutex::new(Vec::new()),
        }))
    }

    pub fn authority(&self) -> &Arc<Authority> {
        &self.auth
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
        self.tx.receiver_count()
    }

    /// Have `v` verify client certificates against every new CRL from now on.
    pub fn add_crl_listener(&self, v: Arc<crate::tls::CrlClientVerifier>) {
        self.crl_listeners.lock().push(v);
    }

    /// Record one change durably, then fan it out. Returns its version. The change lock
    /// covers only the log write; the flush (shared with concurrent writers) runs after it,
    /// and changes are broadcast in version order once durable.
    fn commit(&self, delta: pb::Delta) -> Result<u64> {
        if !delta.crl_der.is_empty() {
            for l in self.crl_listeners.lock().iter() {
                l.update_crl(&delta.crl_der)
                    .map_err(ControllerError::CrlUpdate)?;
            }
        }
        let guard = self.change_lock.lock();
        let v = self.appended.load(Ordering::SeqCst) + 1;
        let update = Arc::new(pb::MeshUpdate {
            version: v,
            kind: Some(pb::mesh_update::Kind::Delta(delta)),
        });
        self.store
            .changes
            .insert(
                v.to_be_bytes(),
                prost::Message::encode_to_vec(update.as_ref()),
            )
            .map_err(store_err)?;
        self.store
            .meta
            .insert("mesh_version", &v.to_be_bytes())
            .map_err(store_err)?;
        if v > CHANGE_LOG_LEN {
            let cutoff = (v - CHANGE_LOG_LEN).to_be_bytes();
            for k in self.store.changes.range(..cutoff).keys() {
                self.store
                    .changes
                    .remove(k.map_err(store_err)?)
                    .map_err(store_err)?;
            }
        }
        self.appended.store(v, Ordering::SeqCst);
        self.unpublished.lock().insert(v, update);
        drop(guard);
        // The flush runs outside the change lock (and is shared with every writer waiting
        // at the same time); it covers this version and every earlier one.
        self.store.flush()?;
        self.publish_upto(v);
        Ok(v)
    }

    /// Broadcast, in version order, every durable change up to `v` not yet published.
    fn publish_upto(&self, v: u64) {
        let mut pending = self.unpublished.lock();
        while let Some(entry) = pending.first_entry() {
            if *entry.key() > v {
                break;
            }
            let (version, update) = entry.remove_entry();
            self.version.store(version, Ordering::SeqCst);
            *self.snapshot_cache.lock() = None;
            if let Some(pb::mesh_update::Kind::Delta(d)) = &update.kind
                && !(d.upserted.is_empty() && d.removed.is_empty() && d.zones.is_empty())
            {
                *self.never_block.lock() = None;
            }
            // No receivers is fine: nobody is watching yet.
            let _ = self.tx.send(update);
        }
    }

    fn peer_of(&self, n: &NodeRecord) -> pb::Peer {
        pb::Peer {
            zone: n.zone.clone(),
            node: n.node.clone(),
            certificate_der: n.cert_der.clone(),
            chain_der: self.auth.chain(),
            wg_public_key: n.wg_public_key.to_vec(),
            endpoints: n.endpoints.iter().map(ToString::to_string).collect(),
            overlay_ip: n.overlay_ip.to_string(),
        }
    }

    fn zone_msg(z: &ZoneRecord) -> pb::Zone {
        pb::Zone {
            name: z.name.clone(),
            cidr: z.cidr.to_string(),
            intra_zone_tunnels: z.intra_zone_tunnels,
        }
    }

    fn active_blocks(&self, now: SystemTime) -> Result<Vec<pb::BlockedSource>> {
        let all: Vec<BlockRecord> = Store::all(&self.store.blocks, "blocks")?;
        Ok(all
            .into_iter()
            .filter(|b| b.until_unix > unix(now))
            .map(|b| pb::BlockedSource {
                address: b.address.to_string(),
                until_unix: b.until_unix,
                reason: b.reason,
            })
            .collect())
    }

    /// The full mesh at the current version (cached until the next change).
    pub fn snapshot(&self) -> Result<Arc<pb::MeshUpdate>> {
        let _guard = self.change_lock.lock();
        if let Some(s) = self.snapshot_cache.lock().clone() {
            return Ok(s);
        }
        let peers = self
            .store
            .nodes()?
            .iter()
            .filter(|n| !n.revoked)
            .map(|n| self.peer_of(n))
            .collect();
        let zones = self.store.zones()?.iter().map(Self::zone_msg).collect();
        let snap = Arc::new(pb::MeshUpdate {
            version: self.version(),
            kind: Some(pb::mesh_update::Kind::Snapshot(pb::Snapshot {
                peers,
                zones,
                crl_der: self.auth.crl_der().to_vec(),
                blocklist: self.active_blocks(SystemTime::now())?,
            })),
        });
        *self.snapshot_cache.lock() = Some(snap.clone());
        Ok(snap)
    }

    /// Up to [`REPLAY_CHUNK`] changes after `after`, at most up to `upto`, or `None` when
    /// the log no longer holds them all (the watcher then needs a snapshot).
    pub fn replay(&self, after: u64, upto: u64) -> Result<Option<Vec<Arc<pb::MeshUpdate>>>> {
        let end = upto.min(after.saturating_add(REPLAY_CHUNK));
        let mut out = Vec::new();
        let mut expected = after + 1;
        if expected > end {
            return Ok(Some(out));
        }
        for item in self
            .store
            .changes
            .range(expected.to_be_bytes()..=end.to_be_bytes())
        {
            let (k, v) = item.map_err(store_err)?;
            let kv = u64::from_be_bytes(k.as_ref().try_into().unwrap_or([0; 8]));
            if kv != expected {
                return Ok(None);
            }
            let update: pb::MeshUpdate = prost::Message::decode(v.as_ref()).map_err(|e| {
                ControllerError::Store(StoreError::Corrupt {
                    tree: "changes",
                    err: Box::new(e),
                })
            })?;
            out.push(Arc::new(update));
            expected += 1;
        }
        Ok((expected == end + 1).then_some(out))
    }

    /// Where a watcher that has seen `after` picks up: the first chunk of the log when it
    /// is at most [`RESUME_MAX_CHANGES`] behind and the log reaches, else the snapshot.
    pub fn resume_from(&self, after: u64) -> Result<Resume> {
        let current = self.version();
        if after != 0
            && after <= current
            && current - after <= RESUME_MAX_CHANGES
            && let Some(chunk) = self.replay(after, current)?
        {
            let last_version = chunk.last().map(|c| c.version).unwrap_or(after);
            return Ok(Resume {
                initial: chunk,
                last_version,
                replay_to: current,
            });
        }
        let snap = self.snapshot()?;
        Ok(Resume {
            last_version: snap.version,
            replay_to: snap.version,
            initial: vec![snap],
        })
    }

    /// Track a Watch stream of `node`, so revoking the node ends it.
    fn register_stream(&self, node: &str) -> CancellationToken {
        let cancel = CancellationToken::new();
        let mut streams = self.streams.lock();
        // Nodes whose streams have all ended are forgotten, so the map holds only nodes
        // with a live stream (each one a node with a certificate from this CA).
        if streams.len() >= 2 * self.live_stream_nodes.load(Ordering::Relaxed).max(64) {
            streams.retain(|_, list| {
                list.retain(|t| !t.is_cancelled());
                !list.is_empty()
            });
            self.live_stream_nodes
                .store(streams.len(), Ordering::Relaxed);
        }
        let list = streams.entry(node.to_string()).or_default();
        list.retain(|t| !t.is_cancelled());
        while list.len() >= MAX_STREAMS_PER_NODE {
            list.remove(0).cancel();
        }
        list.push(cancel.clone());
        cancel
    }

    /// Watch streams registered and not ended, over all nodes (bounded: at most
    /// [`MAX_STREAMS_PER_NODE`] per node).
    pub fn registered_streams(&self) -> usize {
        self.streams
            .lock()
            .values()
            .map(|l| l.iter().filter(|t| !t.is_cancelled()).count())
            .sum()
    }

    /// Register a Watch stream for `node`: what to send first, then live changes.
    pub fn subscribe(&self, node: &str, resume_from: u64) -> Result<Subscription> {
        let cancel = self.register_stream(node);
        self.subscribe_with(cancel, resume_from)
    }

    /// Open a Watch stream for the node presenting `who`. The stream is registered before
    /// the caller is checked, so a revocation racing with this call still ends it.
    pub fn watch(
        &self,
        who: &VerifiedNode,
        resume_from: u64,
        now: SystemTime,
    ) -> Result<Subscription> {
        let cancel = self.register_stream(&node_key(&who.id.zone, &who.id.node));
        if let Err(e) = self.caller(who, now) {
            cancel.cancel();
            return Err(e);
        }
        self.subscribe_with(cancel, resume_from)
    }

    fn subscribe_with(&self, cancel: CancellationToken, resume_from: u64) -> Result<Subscription> {
        // Subscribe before reading state so no change falls between the two.
        let rx = self.tx.subscribe();
        let r = self.resume_from(resume_from)?;
        Ok(Subscription {
            initial: r.initial,
            last_version: r.last_version,
            replay_to: r.replay_to,
            rx,
            cancel,
        })
    }

    // ----- zones and tokens (admin) -----

    pub fn add_zone(
        &self,
        name: &str,
        cidr: &str,
        intra_zone_tunnels: bool,
        now: SystemTime,
    ) -> Result<ZoneRecord> {
        validate_label("zone", name, false)?;
        let cidr: ipnet::IpNet = cidr.parse().map_err(|_| {
            ControllerError::BadRequest(format!("{cidr:?} is not a CIDR (e.g. 100.64.1.0/24)"))
        })?;
        if cidr.trunc() != cidr {
            return Err(ControllerError::BadRequest(format!(
                "{cidr} has host bits set; did you mean {}?",
                cidr.trunc()
            )));
        }
        if cidr.hosts().take(2).count() < 2 {
            return Err(ControllerError::BadRequest(format!(
                "{cidr} is too small for a zone"
            )));
        }
        if self.store.zone(name)?.is_some() {
            return Err(ControllerError::AlreadyExists(format!(
                "zone {name} already exists"
            )));
        }
        if let Some(other) = self
            .store
            .zones()?
            .into_iter()
            .find(|z| z.cidr.contains(&cidr.network()) || cidr.contains(&z.cidr.network()))
        {
            return Err(ControllerError::BadRequest(format!(
                "{cidr} overlaps zone {} ({})",
                other.name, other.cidr
            )));
        }
        let rec = ZoneRecord {
            name: name.into(),
            cidr,
            intra_zone_tunnels,
            created_unix: unix(now),
        };
        self.store
            .zones
            .insert(name, encode(&rec))
            .map_err(store_err)?;
        self.commit(pb::Delta {
            zones: vec![Self::zone_msg(&rec)],
            ..Default::default()
        })?;
        Ok(rec)
    }

    pub fn create_token(
        &self,
        zone: &str,
        ttl: Duration,
        uses: u32,
        now: SystemTime,
    ) -> Result<CreatedToken> {
        if self.store.zone(zone)?.is_none() {
            return Err(ControllerError::NotFound(format!(
                "zone {zone} does not exist (zone add {zone} --cidr ...)"
            )));
        }
        if uses == 0 || uses > 10_000 {
            return Err(ControllerError::BadRequest(
                "uses must be between 1 and 10000".into(),
            ));
        }
        if ttl < Duration::from_secs(60) || ttl > Duration::from_secs(30 * 86_400) {
            return Err(ControllerError::BadRequest(
                "ttl must be between 1m and 30d".into(),
            ));
        }
        let mut raw = [0u8; 32];
        rand::fill(&mut raw);
        let token = format!(
            "zmt_{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
        );
        let rec = TokenRecord {
            zone: zone.into(),
            expires_unix: unix(now + ttl),
            uses_left: uses,
            created_unix: unix(now),
        };
        self.store
            .tokens
            .insert(hash_token(&token), encode(&rec))
            .map_err(store_err)?;
        self.store.flush()?;
        Ok(CreatedToken {
            token,
            zone: zone.into(),
            expires_unix: rec.expires_unix,
            uses,
        })
    }

    // ----- enrollment -----

    /// Enroll a node with a one-time token. Nothing is issued unless every check passes;
    /// the token use, the serial and the node are durable before this returns.
    pub fn enroll(
        &self,
        req: &pb::EnrollRequest,
        source: IpAddr,
        now: SystemTime,
    ) -> Result<pb::EnrollResponse> {
        // Keyed by source and token, so one source guessing tokens (say, behind a NAT
        // shared with real nodes) does not lock out a valid token from the same address.
        let token_hash = hash_token(&req.token);
        let known = self
            .store
            .tokens
            .contains_key(&token_hash)
            .map_err(store_err)?;
        let limit_key = (source, known.then_some(token_hash));
        if self.enroll_failures.is_limited(&limit_key, now) {
            return Err(ControllerError::RateLimited(
                "too many failed enrollments from this address; try again later".into(),
            ));
        }
        let result = self.enroll_inner(req, now);
        if let Err(e) = &result {
            self.enroll_failures.note_failure(&limit_key, now);
            // The error may quote what the client sent (a zone name, say).
            tracing::warn!(%source, error = %Escaped(&e.to_string()), "enrollment refused");
        }
        result
    }

    fn enroll_inner(&self, req: &pb::EnrollRequest, now: SystemTime) -> Result<pb::EnrollResponse> {
        let key = hash_token(&req.token);
        let token: TokenRecord =
            Store::get(&self.store.tokens, "tokens", &key)?.ok_or_else(|| {
                ControllerError::Unauthenticated("enrollment token is not valid".into())
            })?;
        if token.expires_unix <= unix(now) {
            return Err(ControllerError::Unauthenticated(
                "enrollment token has expired".into(),
            ));
        }
        if token.uses_left == 0 {
            return Err(ControllerError::Unauthenticated(
                "enrollment token has already been used".into(),
            ));
        }
        if !req.zone.is_empty() && req.zone != token.zone {
            return Err(ControllerError::PermissionDenied(format!(
                "enrollment token is for zone {}, not {}",
                token.zone, req.zone
            )));
        }
        let zone = self
            .store
            .zone(&token.zone)?
            .ok_or_else(|| ControllerError::NotFound("the token's zone no longer exists".into()))?;
        validate_label("node name", &req.node_name, false)?;
        let wg = WireGuardKey::from_slice(&req.wg_public_key)?;
        let endpoints = parse_endpoints(&req.endpoints)?;
        check_csr_names(
            &req.csr_der,
            self.auth.trust_domain(),
            &zone.name,
            &req.node_name,
        )?;
        let nkey = node_key(&zone.name, &req.node_name);

        // The RSA signature is the slow part: take it before the change lock, then check
        // again under the lock everything that must hold atomically with the writes.
        let node_req = NodeRequest {
            csr_der: &req.csr_der,
            zone: &zone.name,
            node: &req.node_name,
            wg_public_key: wg,
        };
        if let Some(hook) = &self.sign_hook {
            hook();
        }
        let cert = self.auth.sign_node(&node_req, now)?;

        let _guard = self.change_lock.lock();
        if self.store.node(&nkey)?.is_some_and(|n| !n.revoked) {
            return Err(ControllerError::AlreadyExists(format!(
                "node {nkey} is already enrolled"
            )));
        }
        if let Some(owner) = self.store.wgkeys.get(wg.0).map_err(store_err)?
            && self
                .store
                .node(&String::from_utf8_lossy(&owner))?
                .is_some_and(|n| !n.revoked)
        {
            return Err(ControllerError::AlreadyExists(
                "this WireGuard key belongs to another node".into(),
            ));
        }
        if self.store.zone(&zone.name)?.is_none() {
            return Err(ControllerError::NotFound(
                "the token's zone no longer exists".into(),
            ));
        }
        let overlay_ip = self.allocate_ip(&zone, &nkey)?;
        // Consume one use atomically; a concurrent enrollment with the last use loses here.
        let consumed = self
            .store
            .tokens
            .fetch_and_update(&key, |old| {
                let mut rec: TokenRecord = decode("tokens", old?).ok()?;
                if rec.uses_left == 0 || rec.expires_unix <= unix(now) {
                    return None;
                }
                rec.uses_left -= 1;
                Some(encode(&rec))
            })
            .map_err(store_err)?
            .and_then(|old| decode::<TokenRecord>("tokens", &old).ok())
            .is_some_and(|old| old.uses_left > 0 && old.expires_unix > unix(now));
        if !consumed {
            self.store
                .alloc
                .remove(overlay_ip.to_string())
                .map_err(store_err)?;
            return Err(ControllerError::Unauthenticated(
                "enrollment token has already been used".into(),
            ));
        }
        self.auth
            .record_node(&zone.name, &req.node_name, &cert, now)?;
        let node = NodeRecord {
            zone: zone.name.clone(),
            node: req.node_name.clone(),
            serial_hex: cert.serial_hex.clone(),
            cert_der: cert.der.clone(),
            wg_public_key: wg.0,
            endpoints,
            overlay_ip,
            enrolled_unix: unix(now),
            not_after_unix: unix(cert.not_after),
            revoked: false,
        };
        self.store.put_node(&node)?;
        self.store
            .wgkeys
            .insert(node.wg_public_key, node.key().as_bytes())
            .map_err(store_err)?;
        let peer = self.peer_of(&node);
        drop(_guard);
        // commit() flushes the token use, serial, allocation and node together.
        self.commit(pb::Delta {
            upserted: vec![peer],
            ..Default::default()
        })?;
        tracing::info!(node = %nkey, serial = %cert.serial_hex, "node enrolled");
        Ok(pb::EnrollResponse {
            certificate_der: cert.der,
            chain_der: self.auth.chain(),
            root_der: self.auth.ca().root_der().to_vec(),
            trust_domain: self.auth.trust_domain().to_string(),
            zone: zone.name.clone(),
            node: req.node_name.clone(),
            spiffe_id: zonemesh_ca::SpiffeId::new(
                self.auth.trust_domain(),
                &zone.name,
                &req.node_name,
            )?
            .uri(),
            overlay_ip: overlay_ip.to_string(),
            zone_cidr: zone.cidr.to_string(),
        })
    }

    fn allocate_ip(&self, zone: &ZoneRecord, nkey: &str) -> Result<IpAddr> {
        for ip in zone.cidr.hosts() {
            let k = ip.to_string();
            let won = self
                .store
                .alloc
                .compare_and_swap(&k, None as Option<&[u8]>, Some(nkey.as_bytes()))
                .map_err(store_err)?
                .is_ok();
            if won {
                return Ok(ip);
            }
        }
        Err(ControllerError::BadRequest(format!(
            "zone {} has no free overlay addresses",
            zone.name
        )))
    }

    // ----- calls from enrolled nodes -----

    /// The caller's current, unrevoked node record. Only the node's current certificate
    /// is accepted (renewal supersedes the previous one, re-enrollment every earlier one),
    /// only while it is valid at `now`, and only with the WireGuard key the node holds.
    pub fn caller(&self, who: &VerifiedNode, now: SystemTime) -> Result<NodeRecord> {
        if who.not_after <= now {
            return Err(ControllerError::Unauthenticated(
                "certificate has expired".into(),
            ));
        }
        if self.auth.is_revoked(&who.serial_hex) {
            return Err(ControllerError::Unauthenticated(
                "certificate has been revoked".into(),
            ));
        }
        let node = self
            .store
            .node(&node_key(&who.id.zone, &who.id.node))?
            .filter(|n| !n.revoked)
            .ok_or_else(|| ControllerError::Unauthenticated("node is not enrolled".into()))?;
        if node.serial_hex != who.serial_hex {
            return Err(ControllerError::Unauthenticated(
                "certificate is not the node's current certificate".into(),
            ));
        }
        if node.wg_public_key != who.wg_public_key.0 {
            return Err(ControllerError::Unauthenticated(
                "certificate binds a WireGuard key the node no longer has".into(),
            ));
        }
        Ok(node)
    }

    fn rate_limited(what: &str) -> ControllerError {
        ControllerError::RateLimited(format!(
            "too many {what} requests from this node; try later"
        ))
    }

    /// Forget serials of the node that expired a day ago or more (their revocation no
    /// longer matters), so the per-node set stays as small as the node's live certificates.
    fn prune_node_serials(&self, nkey: &str, now: SystemTime) -> Result<()> {
        let cutoff = unix(now).saturating_sub(86_400);
        for s in self.store.node_serials(nkey)? {
            if s.not_after_unix < cutoff {
                self.store.remove_node_serial(nkey, &s.serial_hex)?;
            }
        }
        Ok(())
    }

    /// A new certificate for the node, for the same key unless `key` is
    /// [`RenewKey::Rotate`]. The previous certificate is revoked (superseded) once the new
    /// one is durable.
    pub fn renew(
        &self,
        who: &VerifiedNode,
        csr_der: &[u8],
        key: RenewKey,
        now: SystemTime,
    ) -> Result<pb::RenewResponse> {
        let current = self.caller(who, now)?;
        let nkey = current.key();
        if !self.renew_limit.allow(&nkey, now) {
            return Err(Self::rate_limited("renewal"));
        }
        check_csr_names(
            csr_der,
            self.auth.trust_domain(),
            &current.zone,
            &current.node,
        )?;
        if key == RenewKey::Keep && !same_public_key(csr_der, &current.cert_der) {
            return Err(ControllerError::PermissionDenied(
                "renewal keeps the node's key: this CSR is for a different key".into(),
            ));
        }
        let cert = self.auth.issue_node(
            &NodeRequest {
                csr_der,
                zone: &current.zone,
                node: &current.node,
                wg_public_key: WireGuardKey(current.wg_public_key),
            },
            now,
        )?;
        // A revocation or another renewal may have happened meanwhile: only replace the
        // certificate this call was authorised with.
        let guard = self.change_lock.lock();
        let mut node = match self.store.node(&nkey)? {
            Some(n) if !n.revoked && n.serial_hex == current.serial_hex => n,
            _ => {
                drop(guard);
                self.auth.revoke_all(
                    std::slice::from_ref(&cert.serial_hex),
                    RevocationReason::Superseded,
                    now,
                )?;
                return Err(ControllerError::Unauthenticated(
                    "the node's certificate changed during renewal".into(),
                ));
            }
        };
        node.serial_hex = cert.serial_hex.clone();
        node.cert_der = cert.der.clone();
        node.not_after_unix = unix(cert.not_after);
        self.store.put_node(&node)?;
        drop(guard);
        self.prune_node_serials(&nkey, now)?;
        self.store.flush()?;
        // The new certificate is durable; the old one stops working now.
        self.auth.revoke_all(
            std::slice::from_ref(&current.serial_hex),
            RevocationReason::Superseded,
            now,
        )?;
        self.commit(pb::Delta {
            upserted: vec![self.peer_of(&node)],
            crl_der: self.auth.crl_der().to_vec(),
            ..Default::default()
        })?;
        tracing::info!(node = %nkey, serial = %cert.serial_hex, superseded = %current.serial_hex, "node certificate renewed");
        Ok(pb::RenewResponse {
            certificate_der: cert.der,
            chain_der: self.auth.chain(),
        })
    }

    /// A TLS certificate for the node's own services: only `<node>.<zone>.<trust-domain>`
    /// and the node's overlay address.
    pub fn issue_tls(
        &self,
        who: &VerifiedNode,
        req: &pb::IssueTlsRequest,
        now: SystemTime,
    ) -> Result<pb::IssueTlsResponse> {
        let node = self.caller(who, now)?;
        if !self.issue_tls_limit.allow(&node.key(), now) {
            return Err(Self::rate_limited("TLS certificate"));
        }
        let allowed_dns = format!("{}.{}.{}", node.node, node.zone, self.auth.trust_domain());
        for d in &req.dns_names {
            if d != &allowed_dns {
                return Err(ControllerError::PermissionDenied(format!(
                    "{d:?} is not a name of this node (allowed: {allowed_dns})"
                )));
            }
        }
        let mut ips = Vec::new();
        for ip in &req.ip_addresses {
            let parsed: IpAddr = ip
                .parse()
                .map_err(|_| ControllerError::BadRequest(format!("{ip:?} is not an IP address")))?;
            if parsed != node.overlay_ip {
                return Err(ControllerError::PermissionDenied(format!(
                    "{ip} is not this node's overlay address"
                )));
            }
            ips.push(parsed);
        }
        let names = zonemesh_ca::TlsNames {
            dns: req.dns_names.clone(),
            ips,
        };
        let lifetime = (req.lifetime_secs > 0).then(|| Duration::from_secs(req.lifetime_secs));
        let cert =
            self.auth
                .issue_tls_csr(&req.csr_der, &names, lifetime, Some(&node.key()), now)?;
        Ok(pb::IssueTlsResponse {
            certificate_der: cert.der,
            chain_der: self.auth.chain(),
        })
    }

    pub fn update_endpoints(
        &self,
        who: &VerifiedNode,
        endpoints: &[String],
        now: SystemTime,
    ) -> Result<()> {
        let mut node = self.caller(who, now)?;
        if !self.update_endpoints_limit.allow(&node.key(), now) {
            return Err(Self::rate_limited("endpoint update"));
        }
        let parsed = parse_endpoints(endpoints)?;
        if parsed == node.endpoints {
            return Ok(());
        }
        node.endpoints = parsed;
        self.store.put_node(&node)?;
        self.commit(pb::Delta {
            upserted: vec![self.peer_of(&node)],
            ..Default::default()
        })?;
        Ok(())
    }

    pub fn report_health(
        &self,
        who: &VerifiedNode,
        report: &pb::HealthReport,
        now: SystemTime,
    ) -> Result<()> {
        let node = self.caller(who, now)?;
        let rows = report
            .peers
            .iter()
            .take(MAX_HEALTH_ROWS)
            .map(|p| HealthRow {
                peer: text::capped(&p.peer, MAX_PEER_NAME),
                loss: p.loss,
                rtt_micros: p.rtt_micros,
                reported_unix: unix(now),
            })
            .collect();
        self.health.lock().insert(node.key(), rows);
        Ok(())
    }

    /// Health matrix: node → its peers' loss and latency.
    pub fn health(&self) -> HashMap<String, Vec<HealthRow>> {
        self.health.lock().clone()
    }

    /// Security events from an agent. Each is logged; only source-verified kinds about an
    /// address that may be blocked are counted, and a block needs corroboration from
    /// several nodes (see [`crate::blocklist`]). Returns the addresses blocked.
    pub fn report_events(
        &self,
        who: &VerifiedNode,
        events: &pb::SecurityEvents,
        now: SystemTime,
    ) -> Result<Vec<IpAddr>> {
        let node = self.caller(who, now)?;
        let reporter = node.key();
        self.report_rate.lock().take(&reporter, Instant::now())?;
        let protected = self.never_block()?;
        // One log line per kind and call, however many events a flood produces.
        let mut seen: BTreeMap<&str, (u32, &str, &str)> = BTreeMap::new();
        let mut decisions = Vec::new();
        for ev in events.events.iter().take(blocklist::MAX_EVENTS_PER_REPORT) {
            let kind = text::cap(&ev.kind, blocklist::MAX_KIND);
            let source = text::cap(&ev.source, blocklist::MAX_SOURCE);
            let e = seen.entry(kind).or_insert((
                0,
                source,
                text::cap(&ev.detail, blocklist::MAX_DETAIL),
            ));
            e.0 += 1;
            if blocklist::classify(kind) != EventTrust::SourceVerified {
                continue;
            }
            let Some(ip) = blocklist::parse_source(source) else {
                continue;
            };
            if protected.reason(ip).is_some() || self.is_blocked(ip, now)? {
                continue;
            }
            if let Noted::Block(c) = self.evidence.lock().note(&reporter, ip, kind, now) {
                decisions.push(c);
            }
        }
        for (kind, (count, source, detail)) in &seen {
            let counted = blocklist::classify(kind) == EventTrust::SourceVerified;
            tracing::info!(
                node = %reporter,
                kind = %Escaped(kind),
                count,
                source = %Escaped(source),
                detail = %Escaped(detail),
                counted,
                "security events reported by agent"
            );
        }
        let mut blocked = Vec::new();
        for c in decisions {
            let evidence = c.describe();
            let until = now + self.block_duration;
            match self.block_source(c.address, until, &format!("security events {evidence}")) {
                Ok(()) => {
                    self.audit_decision(
                        AuditEvent::new("source.blocked", "blocked")
                            .actor("mesh")
                            .source(c.address)
                            .detail(format!("{evidence}; until {}", unix(until))),
                    );
                    blocked.push(c.address);
                }
                Err(e) => tracing::warn!(source = %c.address, error = %e, "block not placed"),
            }
        }
        Ok(blocked)
    }

    /// Record a decision in the audit log, when one is attached.
    pub fn audit_decision(&self, event: AuditEvent) {
        if let Some(a) = self.audit.get()
            && let Err(e) = a.record(event)
        {
            tracing::error!(error = %e, "audit record failed");
        }
    }

    /// Write automatic block decisions to `audit` from now on.
    pub fn attach_audit(&self, audit: Arc<AuditLog>) {
        let _ = self.audit.set(audit);
    }

    /// The controller's own addresses, never blocked; `what` names each (e.g. "the
    /// controller's gRPC address").
    pub fn set_own_addresses(&self, addresses: Vec<(IpAddr, String)>) {
        *self.own_addresses.lock() = addresses;
        *self.never_block.lock() = None;
    }

    /// Every address that may not be blocked, as of now.
    pub fn never_block(&self) -> Result<Arc<NeverBlock>> {
        // Built under the lock, so a commit that invalidates it waits for a build that
        // read the store before the change.
        let mut cache = self.never_block.lock();
        if let Some(nb) = cache.as_ref() {
            return Ok(nb.clone());
        }
        let mut nb = NeverBlock::default();
        for (ip, what) in self.own_addresses.lock().iter() {
            nb.add(*ip, what.clone());
        }
        for n in self.store.nodes()?.iter().filter(|n| !n.revoked) {
            nb.add(
                n.overlay_ip,
                format!("the overlay address of node {}", n.key()),
            );
            for e in &n.endpoints {
                nb.add(e.ip(), format!("an endpoint of node {}", n.key()));
            }
        }
        for z in self.store.zones()? {
            nb.add_range(z.cidr, format!("in the overlay range of zone {}", z.name));
        }
        let nb = Arc::new(nb);
        *cache = Some(nb.clone());
        Ok(nb)
    }

    fn is_blocked(&self, ip: IpAddr, now: SystemTime) -> Result<bool> {
        Ok(
            Store::get::<BlockRecord>(&self.store.blocks, "blocks", ip.to_string())?
                .is_some_and(|b| b.until_unix > unix(now)),
        )
    }

    /// Put a source on the blocklist carried to every agent, unless the never-block policy
    /// forbids it (then a one-line reason).
    pub fn block_source(&self, ip: IpAddr, until: SystemTime, reason: &str) -> Result<()> {
        let ip = ip.to_canonical();
        self.never_block()?.check(ip)?;
        let rec = BlockRecord {
            address: ip,
            until_unix: unix(until),
            reason: text::capped(reason, MAX_BLOCK_REASON),
        };
        self.store
            .blocks
            .insert(ip.to_string(), encode(&rec))
            .map_err(store_err)?;
        self.commit(pb::Delta {
            blocked: vec![pb::BlockedSource {
                address: ip.to_string(),
                until_unix: rec.until_unix,
                reason: rec.reason.clone(),
            }],
            ..Default::default()
        })?;
        tracing::warn!(source = %ip, until = rec.until_unix, reason = %Escaped(&rec.reason), "source blocked");
        Ok(())
    }

    /// Take a source off the blocklist; every agent drops it at once.
    pub fn unblock_source(&self, ip: IpAddr) -> Result<BlockRecord> {
        let ip = ip.to_canonical();
        let rec: BlockRecord = Store::get(&self.store.blocks, "blocks", ip.to_string())?
            .ok_or_else(|| ControllerError::NotFound(format!("{ip} is not blocked")))?;
        self.store
            .blocks
            .remove(ip.to_string())
            .map_err(store_err)?;
        self.commit(pb::Delta {
            unblocked: vec![ip.to_string()],
            ..Default::default()
        })?;
        self.evidence.lock().forget(ip);
        tracing::info!(source = %ip, "source unblocked");
        Ok(rec)
    }

    /// Blocks in force at `now`, soonest to end first. Expired ones are dropped from the
    /// store on the way.
    pub fn blocks(&self, now: SystemTime) -> Result<Vec<BlockRecord>> {
        let mut out = Vec::new();
        for rec in Store::all::<BlockRecord>(&self.store.blocks, "blocks")? {
            if rec.until_unix > unix(now) {
                out.push(rec);
            } else {
                self.store
                    .blocks
                    .remove(rec.address.to_string())
                    .map_err(store_err)?;
            }
        }
        out.sort_by_key(|b| (b.until_unix, b.address));
        Ok(out)
    }

    /// Lift blocks that the never-block policy forbids (placed before it existed, or
    /// naming a node enrolled since); returns the addresses lifted.
    pub fn lift_forbidden_blocks(&self) -> Result<Vec<IpAddr>> {
        let nb = self.never_block()?;
        let mut lifted = Vec::new();
        for rec in Store::all::<BlockRecord>(&self.store.blocks, "blocks")? {
            if let Some(why) = nb.reason(rec.address) {
                self.unblock_source(rec.address)?;
                self.audit_decision(
                    AuditEvent::new("source.unblocked", "ok")
                        .actor("controller")
                        .source(rec.address)
                        .detail(format!("never blocked: it is {why}")),
                );
                lifted.push(rec.address);
            }
        }
        Ok(lifted)
    }

    // ----- revocation -----

    /// Revoke a node: every certificate it was issued since it enrolled goes on the CRL
    /// (one signature, one flush), its overlay address is freed, its open streams end now,
    /// and every other watcher receives its removal and the new CRL.
    pub fn revoke_node(
        &self,
        nkey: &str,
        reason: RevocationReason,
        now: SystemTime,
    ) -> Result<NodeRecord> {
        let guard = self.change_lock.lock();
        let mut node = self.store.node(nkey)?.ok_or_else(|| {
            ControllerError::NotFound(format!("no node {nkey} (use zone/node, see `node list`)"))
        })?;
        if node.revoked {
            return Err(ControllerError::AlreadyExists(format!(
                "node {nkey} is already revoked"
            )));
        }
        node.revoked = true;
        self.store.put_node(&node)?;
        drop(guard);
        // Renewals that finish after this point see the node revoked and revoke their own
        // certificate; those that finished before are in the node's serial set.
        let issued = self.store.node_serials(nkey)?;
        let mut serials: Vec<String> = issued.iter().map(|s| s.serial_hex.clone()).collect();
        if !serials.contains(&node.serial_hex) {
            serials.push(node.serial_hex.clone());
        }
        let newly = self.auth.revoke_all(&serials, reason, now)?;
        for s in &issued {
            self.store.remove_node_serial(nkey, &s.serial_hex)?;
        }
        self.store
            .wgkeys
            .remove(node.wg_public_key)
            .map_err(store_err)?;
        let _ = self
            .store
            .alloc
            .compare_and_swap(
                node.overlay_ip.to_string(),
                Some(nkey.as_bytes()),
                None as Option<&[u8]>,
            )
            .map_err(store_err)?;
        self.commit(pb::Delta {
            removed: vec![pb::PeerRef {
                zone: node.zone.clone(),
                node: node.node.clone(),
            }],
            crl_der: self.auth.crl_der().to_vec(),
            ..Default::default()
        })?;
        if let Some(streams) = self.streams.lock().remove(nkey) {
            for s in streams {
                s.cancel();
            }
        }
        self.health.lock().remove(nkey);
        tracing::info!(node = %nkey, serial = %node.serial_hex, revoked_serials = newly, "node revoked");
        Ok(node)
    }

    /// Push a freshly signed CRL to every watcher (after `ca revoke` of a non-node serial,
    /// or the periodic refresh).
    pub fn publish_crl(&self) -> Result<u64> {
        self.commit(pb::Delta {
            crl_der: self.auth.crl_der().to_vec(),
            ..Default::default()
        })
    }
}
