//! Watch streams. Every message is encoded once into a shared gRPC frame: the snapshot
//! (rebuilt only when a watcher needs one and the cached one is too old), each change as it
//! is published, and the coalesced delta that watchers at the same place behind share.
//! A stream holds only its version and a wake-up on new versions, so a slow or stuck
//! watcher holds no backlog: when it comes back it gets what it missed as one delta (a
//! chunk of [`CHUNK`] versions per message when it is further behind), or the shared
//! snapshot once it is more than [`BACKLOG`] changes behind. The per-node registry of open
//! streams lets a revocation end them.

use super::{MAX_STREAMS_PER_NODE, Mesh, RESUME_MAX_CHANGES, store_err};
use crate::error::{ControllerError, Result};
use crate::store::{BlockRecord, Store, StoreError, node_key, unix};
use arc_swap::ArcSwap;
use bytes::Bytes;
use parking_lot::Mutex;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::SystemTime;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use zonemesh_ca::VerifiedNode;
use zonemesh_proto as pb;

/// Changes kept in memory for watchers that are behind. A watcher further behind gets the
/// snapshot (it is shared; a replay would not be). Well above what enrollment can add
/// between two messages of a stream (held back at most [`MAX_HELD_VERSIONS`], paced at
/// most [`MAX_PACE`]): a fleet that keeps enrolling gets deltas, not a snapshot per
/// message. The change log replays at most [`RESUME_MAX_CHANGES`] (read from the store,
/// and not shared).
pub const BACKLOG: u64 = 8192;
/// Kept changes are grouped in chunks of this many (see [`Kept`]); a watcher further
/// behind than this catches up this many versions per message (see
/// [`Mesh::next_frame_cached`]).
pub const CHUNK: usize = 256;
/// Most versions that enrollments hold back before they are announced anyway (so one
/// announcement under sustained enrollment is a delta of at most this many peers).
const MAX_HELD_VERSIONS: u64 = 256;
/// Coalesced deltas kept for other watchers at the same place (a burst leaves most
/// watchers at the same version, so one encoding serves them all), and the most bytes
/// they may hold together (one far behind can be megabytes).
const COALESCED_KEPT: usize = 64;
const COALESCED_BYTES: usize = 32 << 20;
/// gRPC message prefix: compression flag and big-endian length.
const GRPC_PREFIX: usize = 5;
/// The least time between two messages on one stream grows by this much per open stream
/// (see [`Mesh::watch_pace`]).
const PACE_PER_STREAM: std::time::Duration = std::time::Duration::from_micros(50);
/// The most time between two messages on one stream while changes keep coming.
const MAX_PACE: std::time::Duration = std::time::Duration::from_millis(500);
/// The longest enrollments in flight hold back the announcement of new peers.
const MAX_HOLD: std::time::Duration = std::time::Duration::from_secs(1);
/// With the announcer running, how long new peers wait after the last enrollment in
/// flight ended, for the next one of a burst (the client's own work between two).
const LINGER: std::time::Duration = std::time::Duration::from_millis(30);

/// One Watch message, encoded once as a gRPC frame (flag, length, message) and shared by
/// every stream that sends it.
#[derive(Clone, Debug)]
pub struct Frame {
    version: u64,
    snapshot: bool,
    grpc: Bytes,
}

impl Frame {
    pub(super) fn encode(update: &pb::MeshUpdate) -> Self {
        let message = prost::Message::encode_to_vec(update);
        let mut grpc = Vec::with_capacity(GRPC_PREFIX + message.len());
        grpc.push(0);
        // A message is far below 4 GiB: the mesh's address space bounds the peers.
        grpc.extend_from_slice(
            &u32::try_from(message.len())
                .unwrap_or(u32::MAX)
                .to_be_bytes(),
        );
        grpc.extend_from_slice(&message);
        Self {
            version: update.version,
            snapshot: matches!(update.kind, Some(pb::mesh_update::Kind::Snapshot(_))),
            grpc: grpc.into(),
        }
    }

    /// The version a watcher has once it applied this message.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Whether this is a snapshot (it replaces everything the watcher held).
    pub fn is_snapshot(&self) -> bool {
        self.snapshot
    }

    /// The gRPC frame as sent (a reference to the shared bytes, not a copy).
    pub fn grpc(&self) -> Bytes {
        self.grpc.clone()
    }

    /// The encoded `MeshUpdate`.
    pub fn message(&self) -> &[u8] {
        &self.grpc[GRPC_PREFIX..]
    }

    /// Whether both are the same shared encoding.
    pub fn same_bytes(&self, other: &Frame) -> bool {
        self.grpc.as_ptr() == other.grpc.as_ptr()
    }

    /// The message, decoded.
    pub fn decode(&self) -> Result<pb::MeshUpdate> {
        prost::Message::decode(self.message()).map_err(|e| {
            ControllerError::Store(StoreError::Corrupt {
                tree: "watch frame",
                err: Box::new(e),
            })
        })
    }

    /// This message for a watcher that expects every peer to carry its own chain (an
    /// agent that does not ask for the chain once per stream): peers without one get
    /// `chain`. Encoded for that stream alone.
    pub fn with_peer_chains(&self, chain: &[Vec<u8>]) -> Result<Frame> {
        let mut u = self.decode()?;
        let peers = match &mut u.kind {
            Some(pb::mesh_update::Kind::Snapshot(s)) => &mut s.peers,
            Some(pb::mesh_update::Kind::Delta(d)) => &mut d.upserted,
            None => return Ok(self.clone()),
        };
        for p in peers.iter_mut().filter(|p| p.chain_der.is_empty()) {
            p.chain_der = chain.to_vec();
        }
        Ok(Frame::encode(&u))
    }
}

/// A published change, kept for watchers that are behind.
pub(super) struct Published {
    pub(super) delta: pb::Delta,
    pub(super) frame: Frame,
}

/// The changes kept for watchers that are behind, in version order (at least the last
/// [`BACKLOG`] once there are that many): full chunks of [`CHUNK`] and a tail, each
/// behind an `Arc`. Keeping a change copies the tail and the list of chunks, not every
/// change kept.
#[derive(Clone, Default)]
struct Kept {
    chunks: VecDeque<Arc<[Arc<Published>]>>,
    tail: Arc<Vec<Arc<Published>>>,
}

impl Kept {
    fn len(&self) -> usize {
        self.chunks.len() * CHUNK + self.tail.len()
    }

    fn get(&self, i: usize) -> Option<&Arc<Published>> {
        match self.chunks.get(i / CHUNK) {
            Some(c) => c.get(i % CHUNK),
            None => self.tail.get(i.checked_sub(self.chunks.len() * CHUNK)?),
        }
    }

    fn front(&self) -> Option<&Arc<Published>> {
        self.get(0)
    }

    fn back(&self) -> Option<&Arc<Published>> {
        self.tail
            .last()
            .or_else(|| self.chunks.back().and_then(|c| c.last()))
    }

    fn push(&mut self, p: Arc<Published>) {
        Arc::make_mut(&mut self.tail).push(p);
        if self.tail.len() == CHUNK {
            let full = std::mem::take(Arc::make_mut(&mut self.tail));
            self.chunks.push_back(full.into());
        }
        while self.len() >= BACKLOG as usize + CHUNK {
            self.chunks.pop_front();
        }
    }
}

/// What every Watch stream shares: the published version (streams wait on it), the last
/// [`BACKLOG`] changes, the last snapshot built and recently coalesced deltas.
pub(super) struct Fanout {
    head: watch::Sender<u64>,
    /// Replaced on each change (a chunk's worth of `Arc`s copied, see [`Kept`]): readers
    /// take no lock the commit path waits for, so a low-priority stream preempted while
    /// reading cannot hold an enrollment up.
    recent: ArcSwap<Kept>,
    pub(super) snapshot: Mutex<Option<Frame>>,
    /// Held while a snapshot is built, so concurrent watchers wait for one build.
    building: Mutex<()>,
    coalesced: Mutex<VecDeque<(u64, u64, Frame)>>,
    /// Enrollments in flight and the announcement they hold back (see [`Fanout::hold`]).
    hold: Mutex<Hold>,
    /// Wakes [`Fanout::run_announcer`] when something is held back.
    held: tokio::sync::Notify,
}

#[derive(Default)]
struct Hold {
    in_flight: usize,
    /// The newest version held back, and since when the first one was.
    pending: Option<(u64, std::time::Instant)>,
    /// When the last enrollment in flight ended (`None` while one is in flight).
    idle_since: Option<std::time::Instant>,
    /// Whether the announcer runs: then the end of the last enrollment of a burst is
    /// followed by [`LINGER`]; without it, it announces at once.
    lingering: bool,
    /// Whether the enrollments in flight are a burst: one began while another was in
    /// flight or within [`LINGER`] of the last one's end. A lone enrollment is announced
    /// as it ends, without the linger.
    burst: bool,
}

impl Hold {
    /// Whether a version published now that may wait is held back.
    fn holds(&self, now: std::time::Instant) -> bool {
        let busy = self.in_flight > 0
            || (self.lingering && self.burst && self.idle_since.is_some_and(|t| now - t < LINGER));
        let since = self.pending.map_or(now, |(_, since)| since);
        busy && now - since < MAX_HOLD
    }
}

/// Held by an enrollment in flight; the last one to end announces what was held back.
pub(super) struct HoldGuard<'a>(&'a Fanout);

impl Drop for HoldGuard<'_> {
    fn drop(&mut self) {
        enum Then {
            Nothing,
            Wake(u64),
            // The announcer decides (after the linger, or at once past MAX_HOLD).
            TellAnnouncer,
        }
        let now = std::time::Instant::now();
        let then = {
            let mut h = self.0.hold.lock();
            h.in_flight -= 1;
            if h.in_flight == 0 {
                h.idle_since = Some(now);
            }
            match h.pending {
                Some((v, _)) if !h.holds(now) => {
                    h.pending = None;
                    Then::Wake(v)
                }
                Some(_) if h.lingering => Then::TellAnnouncer,
                _ => Then::Nothing,
            }
        };
        match then {
            Then::Nothing => {}
            Then::Wake(v) => self.0.wake(v),
            Then::TellAnnouncer => self.0.held.notify_one(),
        }
    }
}

impl Fanout {
    pub(super) fn new(version: u64) -> Self {
        Self {
            head: watch::Sender::new(version),
            recent: ArcSwap::from_pointee(Kept::default()),
            snapshot: Mutex::new(None),
            building: Mutex::new(()),
            coalesced: Mutex::new(VecDeque::new()),
            hold: Mutex::new(Hold::default()),
            held: tokio::sync::Notify::new(),
        }
    }

    /// While the guard lives (an enrollment in flight), new versions that only add or
    /// update peers are not announced: with the announcer running, [`LINGER`] after the
    /// last enrollment of a burst ended (after a lone one, or without the announcer, as
    /// it ends), and at the latest [`MAX_HOLD`] after the first was held back. A hold
    /// ends early once [`MAX_HELD_VERSIONS`] are held. Waking every stream (and every
    /// stream's send) would otherwise take the CPU from the enrollments themselves: a
    /// burst of them reaches the watchers as one coalesced delta, once it is over.
    /// Revocations, blocks, CRLs and CA or SSH changes are never held (see
    /// [`Fanout::announce`]).
    pub(super) fn hold(&self) -> HoldGuard<'_> {
        let now = std::time::Instant::now();
        let mut h = self.hold.lock();
        h.burst = h.in_flight > 0 || h.idle_since.is_some_and(|t| now - t < LINGER);
        h.in_flight += 1;
        h.idle_since = None;
        drop(h);
        HoldGuard(self)
    }

    /// Keep a change for watchers (called in version order, before the version is
    /// published).
    pub(super) fn keep(&self, p: Arc<Published>) {
        self.recent.rcu(|old| {
            let mut recent = match old.back() {
                Some(last) if last.frame.version + 1 != p.frame.version => Kept::default(),
                _ => Kept::clone(old),
            };
            recent.push(p.clone());
            recent
        });
    }

    /// Drop the kept changes (the next one kept need not follow the last): used when the
    /// version jumps past what the change log can replay.
    pub(super) fn forget_recent(&self) {
        self.recent.store(Arc::new(Kept::default()));
        self.coalesced.lock().clear();
    }

    /// Announce what is held back when its time comes, until `stop`: [`LINGER`] after the
    /// last enrollment in flight ended (so the enrollments of a burst, with the client's
    /// own work between them, go out as one delta), at the latest [`MAX_HOLD`] after the
    /// first was held (enrollments that keep coming, or one stuck on a slow store). Run
    /// by `serve`; without it the last enrollment to end announces at once.
    pub(super) async fn run_announcer(&self, stop: &CancellationToken) {
        self.hold.lock().lingering = true;
        loop {
            let next = self.release_due();
            let wait = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = self.held.notified() => {}
                _ = wait => {}
            }
        }
        let release = {
            let mut h = self.hold.lock();
            h.lingering = false;
            h.pending.take()
        };
        if let Some((v, _)) = release {
            self.wake(v);
        }
    }

    /// Announce what is held back if its time has come; else when to look again (`None`:
    /// when told).
    fn release_due(&self) -> Option<std::time::Instant> {
        let now = std::time::Instant::now();
        let release = {
            let mut h = self.hold.lock();
            let (v, since) = h.pending?;
            if h.holds(now) {
                let hold_end = since + MAX_HOLD;
                return Some(match (h.in_flight, h.idle_since) {
                    (0, Some(t)) => (t + LINGER).min(hold_end),
                    _ => hold_end,
                });
            }
            h.pending = None;
            v
        };
        self.wake(release);
        None
    }

    /// Versions up to `v` are published: wake every stream, unless `v` may wait and an
    /// enrollment holds announcements back (see [`Fanout::hold`]).
    pub(super) fn announce(&self, v: u64, may_wait: bool) {
        {
            let mut h = self.hold.lock();
            let now = std::time::Instant::now();
            if may_wait && h.holds(now) && v < self.head.borrow().saturating_add(MAX_HELD_VERSIONS)
            {
                let since = h.pending.map_or(now, |(_, since)| since);
                h.pending = Some((v, since));
                let lingering = h.lingering;
                drop(h);
                if lingering {
                    self.held.notify_one();
                }
                return;
            }
            h.pending = None;
        }
        self.wake(v);
    }

    /// Wake every stream: versions up to `v` are published.
    fn wake(&self, v: u64) {
        self.head.send_if_modified(|h| {
            let newer = v > *h;
            if newer {
                *h = v;
            }
            newer
        });
    }

    pub(super) fn streams(&self) -> usize {
        self.head.receiver_count()
    }
}

/// The least time between two messages on one stream when `streams` are open.
fn pace_for(streams: usize) -> std::time::Duration {
    PACE_PER_STREAM
        .saturating_mul(u32::try_from(streams).unwrap_or(u32::MAX))
        .min(MAX_PACE)
}

/// One delta with the effect of applying `deltas` in order: the last word on each peer
/// (upsert or removal), zone and blocked address, the last CRL and CA chain.
pub fn coalesce<'a>(deltas: impl IntoIterator<Item = &'a pb::Delta>) -> pb::Delta {
    let mut peers: BTreeMap<(&str, &str), Option<&pb::Peer>> = BTreeMap::new();
    let mut zones: BTreeMap<&str, &pb::Zone> = BTreeMap::new();
    let mut blocks: BTreeMap<&str, Option<&pb::BlockedSource>> = BTreeMap::new();
    let mut crl: &[u8] = &[];
    let mut chain: &[Vec<u8>] = &[];
    let mut ssh_last: Option<&pb::SshState> = None;
    let mut ca_last: Option<&pb::CaBundle> = None;
    let mut issuer_crls: &[Vec<u8>] = &[];
    for d in deltas {
        // Every field, named: a field added to Delta must be merged here too.
        let pb::Delta {
            upserted,
            removed,
            zones: zone_list,
            crl_der,
            blocked,
            unblocked,
            ca_chain_der,
            ssh,
            ca,
            issuer_crls_der,
        } = d;
        // The order an agent applies one delta in: upserts, removals, zones, CRL, blocks,
        // unblocks.
        for p in upserted {
            peers.insert((&p.zone, &p.node), Some(p));
        }
        for r in removed {
            peers.insert((&r.zone, &r.node), None);
        }
        for z in zone_list {
            zones.insert(&z.name, z);
        }
        if !crl_der.is_empty() {
            crl = crl_der;
            // Sent with every CRL, replacing the ones held (even by none).
            issuer_crls = issuer_crls_der;
        }
        for b in blocked {
            blocks.insert(&b.address, Some(b));
        }
        for a in unblocked {
            blocks.insert(a, None);
        }
        if !ca_chain_der.is_empty() {
            chain = ca_chain_der;
        }
        // The SSH state travels whole: the last one sent is the state.
        if ssh.is_some() {
            ssh_last = ssh.as_ref();
        }
        // So does the CA bundle.
        if ca.is_some() {
            ca_last = ca.as_ref();
        }
    }
    let mut out = pb::Delta {
        zones: zones.into_values().cloned().collect(),
        crl_der: crl.to_vec(),
        ca_chain_der: chain.to_vec(),
        ssh: ssh_last.cloned(),
        ca: ca_last.cloned(),
        issuer_crls_der: issuer_crls.to_vec(),
        ..Default::default()
    };
    for ((zone, node), p) in peers {
        match p {
            Some(p) => out.upserted.push(p.clone()),
            None => out.removed.push(pb::PeerRef {
                zone: zone.to_string(),
                node: node.to_string(),
            }),
        }
    }
    for (address, b) in blocks {
        match b {
            Some(b) => out.blocked.push(b.clone()),
            None => out.unblocked.push(address.to_string()),
        }
    }
    out
}

/// What a Watch stream needs to start.
pub struct Subscription {
    /// What to send first: the snapshot, or what changed since the watcher's version as
    /// one delta; `None` when the watcher is up to date.
    pub first: Option<Frame>,
    /// The version the watcher has once `first` is sent.
    pub last_version: u64,
    /// Changes when a newer version is published.
    pub head: watch::Receiver<u64>,
    pub cancel: CancellationToken,
}

impl Mesh {
    /// The least time between two messages on one Watch stream: 50 µs per open stream, at
    /// most 500 ms (10 at 100 streams, 50 ms at 1,000, 500 ms at 10,000). A change after a
    /// quiet spell goes out at once (new peers once the enrollments in flight end, see
    /// `Fanout::hold`); changes that follow within the pace are coalesced
    /// into the stream's next message. So the controller sends at most about 20,000
    /// messages a second whatever the fleet's size and the rate of changes, and a burst of
    /// enrollments does not cost every watcher one message each.
    pub fn watch_pace(&self) -> std::time::Duration {
        pace_for(self.watchers())
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

    /// The shared snapshot at the current version.
    pub fn snapshot(&self) -> Result<Frame> {
        self.snapshot_since(self.version())
    }

    /// A shared snapshot at `min` or later from which the kept changes reach the current
    /// version: the cached one when it still qualifies, else one built now (one build at a
    /// time; watchers arriving meanwhile take it).
    fn snapshot_since(&self, min: u64) -> Result<Frame> {
        if let Some(s) = self.usable_snapshot(min) {
            return Ok(s);
        }
        let _building = self.fanout.building.lock();
        if let Some(s) = self.usable_snapshot(min) {
            return Ok(s);
        }
        let frame = {
            let _guard = self.change_lock.lock();
            let peers = self
                .store
                .nodes()?
                .iter()
                .filter(|n| !n.revoked)
                .map(|n| self.peer_of(n))
                .collect();
            let zones = self.store.zones()?.iter().map(Self::zone_msg).collect();
            Frame::encode(&pb::MeshUpdate {
                version: self.version(),
                kind: Some(pb::mesh_update::Kind::Snapshot(pb::Snapshot {
                    peers,
                    zones,
                    crl_der: self.auth.crl_der().to_vec(),
                    blocklist: self.active_blocks(SystemTime::now())?,
                    ca_chain_der: self.auth.chain_pool(),
                    ssh: self.ssh_state.lock().clone(),
                    ca: Some(self.auth.ca_bundle()),
                    issuer_crls_der: self.auth.issuer_crls_der(),
                })),
            })
        };
        *self.fanout.snapshot.lock() = Some(frame.clone());
        Ok(frame)
    }

    fn usable_snapshot(&self, min: u64) -> Option<Frame> {
        let s = self.fanout.snapshot.lock().clone()?;
        let head = self.version();
        let reaches = s.version == head
            || self
                .fanout
                .recent
                .load()
                .front()
                .is_some_and(|f| f.frame.version <= s.version + 1);
        (s.version >= min && s.version <= head && reaches).then_some(s)
    }

    /// What a watcher that has version `after` is sent next, from memory alone: `Some(None)`
    /// when it is up to date, `Some(Some(frame))` when memory holds the answer, `None` when
    /// it needs [`Mesh::next_frame`] (the store).
    pub fn next_frame_cached(&self, after: u64) -> Option<Option<Frame>> {
        let head = self.version();
        if after == head {
            return Some(None);
        }
        if after > head || head - after > BACKLOG {
            return self
                .usable_snapshot(after.saturating_add(1).min(head))
                .map(Some);
        }
        // Further behind than a chunk, a watcher catches up a chunk at a time, to the next
        // version that is a multiple of CHUNK: every watcher passing that stretch takes
        // the same frame. (One delta to the head would be encoded, and held while it is
        // sent, for each place behind: megabytes each, thousands of them while a large
        // fleet grows faster than the fan-out.)
        let step = CHUNK as u64;
        let to = if head - after > step {
            (after / step + 1) * step
        } else {
            head
        };
        // Only the kept changes' `Arc`s are taken while the kept list is loaded; merging
        // and encoding come after.
        let recent = self.fanout.recent.load();
        let front = recent.front()?.frame.version;
        if front > after + 1 {
            return None;
        }
        let from = usize::try_from(after + 1 - front).ok()?;
        let upto = usize::try_from(to + 1 - front).ok()?.min(recent.len());
        if upto.checked_sub(from)? == 1 {
            return recent.get(from).map(|p| Some(p.frame.clone()));
        }
        let last = recent.get(upto.checked_sub(1)?)?.frame.version;
        if let Some((_, _, f)) = self
            .fanout
            .coalesced
            .lock()
            .iter()
            .find(|(a, b, _)| *a == after && *b == last)
        {
            return Some(Some(f.clone()));
        }
        let parts: Vec<Arc<Published>> = (from..upto)
            .filter_map(|i| recent.get(i).cloned())
            .collect();
        drop(recent);
        let frame = Frame::encode(&pb::MeshUpdate {
            version: last,
            kind: Some(pb::mesh_update::Kind::Delta(coalesce(
                parts.iter().map(|p| &p.delta),
            ))),
        });
        let mut kept = self.fanout.coalesced.lock();
        kept.push_back((after, last, frame.clone()));
        let bytes = |k: &VecDeque<(u64, u64, Frame)>| -> usize {
            k.iter().map(|(_, _, f)| f.message().len()).sum()
        };
        while kept.len() > COALESCED_KEPT || (kept.len() > 1 && bytes(&kept) > COALESCED_BYTES) {
            kept.pop_front();
        }
        Some(Some(frame))
    }

    /// What a watcher that has version `after` is sent next (blocking: it may read the
    /// change log or build the snapshot): nothing when it is up to date, what it missed as
    /// one delta when memory holds it (at most [`BACKLOG`] behind) or the change log does
    /// (at most [`RESUME_MAX_CHANGES`] behind), else the shared snapshot.
    pub fn next_frame(&self, after: u64) -> Result<Option<Frame>> {
        if let Some(next) = self.next_frame_cached(after) {
            return Ok(next);
        }
        let head = self.version();
        if after != 0
            && after < head
            && head - after <= RESUME_MAX_CHANGES
            && let Some(updates) = self.logged(after, head)?
        {
            let deltas = updates.iter().filter_map(|u| match &u.kind {
                Some(pb::mesh_update::Kind::Delta(d)) => Some(d),
                _ => None,
            });
            return Ok(Some(Frame::encode(&pb::MeshUpdate {
                version: head,
                kind: Some(pb::mesh_update::Kind::Delta(coalesce(deltas))),
            })));
        }
        self.snapshot_since(after.saturating_add(1).min(head))
            .map(Some)
    }

    /// The changes after `after` up to `upto` from the change log, or `None` when the log
    /// no longer holds them all.
    pub(super) fn logged(&self, after: u64, upto: u64) -> Result<Option<Vec<pb::MeshUpdate>>> {
        let mut out = Vec::new();
        let mut expected = after + 1;
        for item in self
            .store
            .changes
            .range(expected.to_be_bytes()..=upto.to_be_bytes())
        {
            let (k, v) = item.map_err(store_err)?;
            let kv = u64::from_be_bytes(k.as_slice().try_into().unwrap_or([0; 8]));
            if kv != expected {
                return Ok(None);
            }
            let update: pb::MeshUpdate = prost::Message::decode(v.as_ref()).map_err(|e| {
                ControllerError::Store(StoreError::Corrupt {
                    tree: "changes",
                    err: Box::new(e),
                })
            })?;
            out.push(update);
            expected += 1;
        }
        Ok((expected == upto + 1).then_some(out))
    }

    /// A message that changes nothing but gives a resumed watcher the CA chain for peers
    /// without their own (its version is the one the watcher already has).
    pub fn chain_frame(&self, version: u64) -> Frame {
        Frame::encode(&pb::MeshUpdate {
            version,
            kind: Some(pb::mesh_update::Kind::Delta(pb::Delta {
                ca_chain_der: self.auth.chain_pool(),
                ..Default::default()
            })),
        })
    }

    /// The CA chain given to peers without their own: every trusted intermediate and
    /// cross-signature.
    pub fn ca_chain(&self) -> Vec<Vec<u8>> {
        self.auth.chain_pool()
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
        let mut head = self.fanout.head.subscribe();
        head.borrow_and_update();
        let current = self.version();
        let first = if resume_from == 0 || resume_from > current {
            Some(self.snapshot_since(current)?)
        } else {
            self.next_frame(resume_from)?
        };
        Ok(Subscription {
            last_version: first.as_ref().map_or(resume_from, Frame::version),
            first,
            head,
            cancel,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_pace_grows_with_the_streams_and_is_capped() {
        assert_eq!(pace_for(0), Duration::ZERO);
        assert_eq!(pace_for(100), Duration::from_millis(5));
        assert_eq!(pace_for(1_000), Duration::from_millis(50));
        assert_eq!(pace_for(10_000), Duration::from_millis(500));
        assert_eq!(pace_for(1_000_000), MAX_PACE);
        assert_eq!(pace_for(usize::MAX), MAX_PACE);
    }

    #[test]
    fn enrollments_in_flight_hold_new_peers_back_but_not_revocations() {
        let f = Fanout::new(0);
        let mut rx = f.head.subscribe();
        rx.borrow_and_update();
        // Nothing in flight: announced at once.
        f.announce(1, true);
        assert!(rx.has_changed().unwrap());
        assert_eq!(*rx.borrow_and_update(), 1);
        // Two enrollments in flight: new peers wait for the last one to end.
        let a = f.hold();
        let b = f.hold();
        f.announce(2, true);
        f.announce(3, true);
        assert!(!rx.has_changed().unwrap());
        drop(a);
        assert!(!rx.has_changed().unwrap());
        drop(b);
        assert!(rx.has_changed().unwrap());
        assert_eq!(*rx.borrow_and_update(), 3);
        // A change that may not wait goes out at once, with what was held before it.
        let c = f.hold();
        f.announce(4, true);
        f.announce(5, false);
        assert_eq!(*rx.borrow_and_update(), 5);
        drop(c);
        assert!(!rx.has_changed().unwrap(), "nothing left to announce");
    }

    #[test]
    fn a_hold_lasts_at_most_max_hold() {
        let f = Fanout::new(0);
        let mut rx = f.head.subscribe();
        rx.borrow_and_update();
        let _busy = f.hold();
        f.announce(1, true);
        assert!(!rx.has_changed().unwrap());
        // Enrollments keep coming: the one that ends past MAX_HOLD announces.
        f.hold.lock().pending = Some((1, std::time::Instant::now() - MAX_HOLD));
        drop(f.hold());
        assert_eq!(*rx.borrow_and_update(), 1);
        // As does the next change published past it.
        f.announce(2, true);
        assert!(!rx.has_changed().unwrap());
        f.hold.lock().pending = Some((2, std::time::Instant::now() - MAX_HOLD));
        f.announce(3, true);
        assert_eq!(*rx.borrow_and_update(), 3);
        // And the announcer, when the enrollment in flight never ends.
        f.announce(4, true);
        let next = f.release_due().expect("held");
        assert!(!rx.has_changed().unwrap(), "not overdue yet");
        assert!(
            next > std::time::Instant::now() + MAX_HOLD / 2,
            "looks again at MAX_HOLD"
        );
        f.hold.lock().pending = Some((4, std::time::Instant::now() - MAX_HOLD));
        assert_eq!(f.release_due(), None);
        assert_eq!(*rx.borrow_and_update(), 4);
    }

    #[test]
    fn kept_changes_are_the_last_backlog_in_order_and_share_their_chunks() {
        let published = |v: u64| {
            Arc::new(Published {
                delta: pb::Delta::default(),
                frame: Frame::encode(&pb::MeshUpdate {
                    version: v,
                    kind: None,
                }),
            })
        };
        let mut k = Kept::default();
        assert!(k.front().is_none() && k.back().is_none() && k.get(0).is_none());
        let total = BACKLOG + 3 * CHUNK as u64 + 7;
        for v in 1..=total {
            let before = k.clone();
            k.push(published(v));
            // What a reader loaded before is unchanged by the push.
            assert_eq!(before.len() as u64, (v - 1).min(before.len() as u64));
            if let Some(b) = before.back() {
                assert_eq!(b.frame.version, v - 1);
            }
            assert_eq!(k.back().unwrap().frame.version, v);
            assert!(
                k.len() as u64 >= v.min(BACKLOG),
                "at least the last BACKLOG kept"
            );
            assert!(
                k.len() < BACKLOG as usize + CHUNK,
                "trimmed by whole chunks"
            );
        }
        let front = k.front().unwrap().frame.version;
        assert_eq!(
            front + k.len() as u64 - 1,
            total,
            "contiguous up to the last"
        );
        for i in 0..k.len() {
            assert_eq!(k.get(i).unwrap().frame.version, front + i as u64);
        }
        assert!(k.get(k.len()).is_none());
        // A clone shares the full chunks.
        let c = k.clone();
        assert!(Arc::ptr_eq(&c.chunks[0], &k.chunks[0]));
    }

    #[test]
    fn a_hold_takes_at_most_max_held_versions_so_watchers_stay_within_the_backlog() {
        let f = Fanout::new(0);
        let mut rx = f.head.subscribe();
        rx.borrow_and_update();
        let _busy = f.hold();
        // Enrollments fast enough to publish MAX_HELD_VERSIONS within MAX_HOLD: the
        // version that reaches the limit goes out (so a watcher is never further behind
        // than memory holds, and gets a delta rather than the snapshot).
        for v in 1..MAX_HELD_VERSIONS {
            f.announce(v, true);
        }
        assert!(!rx.has_changed().unwrap(), "below the limit: held");
        f.announce(MAX_HELD_VERSIONS, true);
        assert_eq!(*rx.borrow_and_update(), MAX_HELD_VERSIONS);
        // The count starts again from what was announced.
        f.announce(MAX_HELD_VERSIONS + 1, true);
        assert!(!rx.has_changed().unwrap());
        const { assert!(MAX_HELD_VERSIONS * 2 <= BACKLOG) };
    }

    #[tokio::test]
    async fn the_announcer_lingers_after_the_last_enrollment_and_gathers_a_burst() {
        let f = Arc::new(Fanout::new(0));
        let mut rx = f.head.subscribe();
        rx.borrow_and_update();
        let stop = CancellationToken::new();
        let announcer = {
            let (f, stop) = (f.clone(), stop.clone());
            tokio::spawn(async move { f.run_announcer(&stop).await })
        };
        while !f.hold.lock().lingering {
            tokio::task::yield_now().await;
        }
        // A lone enrollment goes out as it ends, without the linger.
        let g = f.hold();
        f.announce(1, true);
        assert!(!rx.has_changed().unwrap(), "held while in flight");
        drop(g);
        assert_eq!(*rx.borrow_and_update(), 1, "announced as it ended");
        tokio::time::sleep(LINGER * 2).await;
        // Enrollments one after the other, each starting within the linger of the last:
        // the first is lone and goes out as it ends; the rest of the burst is one
        // announcement, of the newest version, after the last one.
        let t0 = std::time::Instant::now();
        for v in 2..=6 {
            let g = f.hold();
            f.announce(v, true);
            drop(g);
            if v == 2 {
                assert_eq!(*rx.borrow_and_update(), 2, "the first, lone so far");
            }
            tokio::time::sleep(LINGER / 6).await;
        }
        let ended = std::time::Instant::now();
        tokio::time::timeout(MAX_HOLD * 2, rx.changed())
            .await
            .expect("announced")
            .unwrap();
        let at = std::time::Instant::now();
        if ended - t0 < LINGER {
            // Not descheduled for a whole linger in between: nothing went out before.
            assert_eq!(*rx.borrow_and_update(), 6);
        }
        assert!(at >= ended, "after the last enrollment");
        rx.borrow_and_update();
        // An enrollment that never ends holds new peers back for MAX_HOLD at most.
        let stuck = f.hold();
        let t1 = std::time::Instant::now();
        f.announce(7, true);
        tokio::time::timeout(MAX_HOLD * 3, rx.changed())
            .await
            .expect("announced past MAX_HOLD")
            .unwrap();
        assert_eq!(*rx.borrow_and_update(), 7);
        assert!(t1.elapsed() >= MAX_HOLD);
        drop(stuck);
        // A revocation goes out at once, announcer or not.
        let g = f.hold();
        f.announce(8, false);
        assert_eq!(*rx.borrow_and_update(), 8);
        drop(g);
        // Stopping announces what is still held.
        let g = f.hold();
        f.announce(9, true);
        stop.cancel();
        announcer.await.unwrap();
        assert_eq!(*rx.borrow_and_update(), 9);
        drop(g);
    }

    fn peer(node: &str, endpoint: &str) -> pb::Peer {
        pb::Peer {
            zone: "eu".into(),
            node: node.into(),
            endpoints: vec![endpoint.into()],
            ..Default::default()
        }
    }

    fn peer_ref(node: &str) -> pb::PeerRef {
        pb::PeerRef {
            zone: "eu".into(),
            node: node.into(),
        }
    }

    fn blocked(address: &str, until: u64) -> pb::BlockedSource {
        pb::BlockedSource {
            address: address.into(),
            until_unix: until,
            reason: String::new(),
        }
    }

    /// Applies deltas the way an agent does, on a map of what it holds.
    #[derive(Default, Debug, PartialEq)]
    struct Held {
        peers: BTreeMap<String, pb::Peer>,
        zones: BTreeMap<String, pb::Zone>,
        crl: Vec<u8>,
        blocks: BTreeMap<String, pb::BlockedSource>,
        chain: Vec<Vec<u8>>,
    }

    impl Held {
        fn apply(&mut self, d: &pb::Delta) {
            for p in &d.upserted {
                self.peers.insert(p.node.clone(), p.clone());
            }
            for r in &d.removed {
                self.peers.remove(&r.node);
            }
            for z in &d.zones {
                self.zones.insert(z.name.clone(), z.clone());
            }
            if !d.crl_der.is_empty() {
                self.crl = d.crl_der.clone();
            }
            for b in &d.blocked {
                self.blocks.insert(b.address.clone(), b.clone());
            }
            for a in &d.unblocked {
                self.blocks.remove(a);
            }
            if !d.ca_chain_der.is_empty() {
                self.chain = d.ca_chain_der.clone();
            }
        }
    }

    #[test]
    fn a_coalesced_delta_has_the_effect_of_the_sequence() {
        let d = |f: &dyn Fn(&mut pb::Delta)| {
            let mut d = pb::Delta::default();
            f(&mut d);
            d
        };
        let cases: Vec<(&str, Vec<pb::Delta>)> = vec![
            (
                "upsert then move: the last endpoints",
                vec![
                    d(&|d| d.upserted = vec![peer("a", "198.18.0.1:1")]),
                    d(&|d| d.upserted = vec![peer("a", "198.18.0.1:2")]),
                ],
            ),
            (
                "upsert then revoke: removed",
                vec![
                    d(&|d| d.upserted = vec![peer("a", "198.18.0.1:1"), peer("b", "x:1")]),
                    d(&|d| d.removed = vec![peer_ref("a")]),
                ],
            ),
            (
                "revoke then enroll again: upserted",
                vec![
                    d(&|d| d.removed = vec![peer_ref("a")]),
                    d(&|d| d.upserted = vec![peer("a", "198.18.0.1:3")]),
                ],
            ),
            (
                "the last CRL, an empty CRL changes nothing",
                vec![
                    d(&|d| d.crl_der = vec![1]),
                    d(&|d| d.crl_der = vec![2]),
                    d(&|d| d.upserted = vec![peer("c", "198.18.0.1:1")]),
                ],
            ),
            (
                "block, unblock, block again; unblock after block",
                vec![
                    d(&|d| d.blocked = vec![blocked("192.0.2.1", 5), blocked("192.0.2.2", 5)]),
                    d(&|d| d.unblocked = vec!["192.0.2.1".into(), "192.0.2.2".into()]),
                    d(&|d| d.blocked = vec![blocked("192.0.2.1", 9)]),
                ],
            ),
            (
                "zones: the last word per name; the chain",
                vec![
                    d(&|d| {
                        d.zones = vec![pb::Zone {
                            name: "eu".into(),
                            cidr: "100.64.1.0/24".into(),
                            intra_zone_tunnels: false,
                        }];
                        d.ca_chain_der = vec![vec![7]];
                    }),
                    d(&|d| {
                        d.zones = vec![pb::Zone {
                            name: "eu".into(),
                            cidr: "100.64.1.0/24".into(),
                            intra_zone_tunnels: true,
                        }]
                    }),
                ],
            ),
        ];
        for (name, seq) in cases {
            // From an agent that already holds a peer "a" and a block, as from an empty one.
            for start in [false, true] {
                let mut one_by_one = Held::default();
                if start {
                    one_by_one.apply(&d(&|d| {
                        d.upserted = vec![peer("a", "198.18.0.9:9")];
                        d.blocked = vec![blocked("192.0.2.2", 1)];
                    }));
                }
                let mut merged = Held {
                    peers: one_by_one.peers.clone(),
                    blocks: one_by_one.blocks.clone(),
                    ..Default::default()
                };
                for x in &seq {
                    one_by_one.apply(x);
                }
                let c = coalesce(&seq);
                merged.apply(&c);
                assert_eq!(merged, one_by_one, "{name}");
                let mentioned = c.upserted.len() + c.removed.len();
                let names: std::collections::BTreeSet<_> = c
                    .upserted
                    .iter()
                    .map(|p| p.node.clone())
                    .chain(c.removed.iter().map(|r| r.node.clone()))
                    .collect();
                assert_eq!(mentioned, names.len(), "{name}: one entry per peer");
            }
        }
    }

    #[test]
    fn a_frame_is_the_grpc_prefix_and_the_message() {
        let u = pb::MeshUpdate {
            version: 7,
            kind: Some(pb::mesh_update::Kind::Delta(pb::Delta {
                upserted: vec![peer("a", "198.18.0.1:1")],
                ..Default::default()
            })),
        };
        let f = Frame::encode(&u);
        let g = f.grpc();
        assert_eq!(g[0], 0);
        assert_eq!(
            u32::from_be_bytes(g[1..5].try_into().unwrap()) as usize,
            g.len() - 5
        );
        assert_eq!(f.decode().unwrap(), u);
        assert!(f.same_bytes(&f.clone()), "a clone shares the bytes");
        let legacy = f
            .with_peer_chains(&[vec![1, 2, 3]])
            .unwrap()
            .decode()
            .unwrap();
        let Some(pb::mesh_update::Kind::Delta(d)) = legacy.kind else {
            panic!("not a delta")
        };
        assert_eq!(d.upserted[0].chain_der, vec![vec![1, 2, 3]]);
    }
}
