//! The packet path: three tasks around a copy-on-write peer table.
//!
//! * outbound: TUN → route by destination → encrypt → UDP (GSO super-datagrams)
//! * inbound: UDP (GRO) → find peer by receiver index or handshake key → decrypt →
//!   check the inner source against the peer's allowed IPs → TUN (coalesced writes)
//! * timers: handshake retries, keepalives, rekeying, rate-limiter reset, first handshakes
//!
//! Each direction locks a peer once per run of consecutive packets for that peer, not once
//! per packet, and the peer table itself is read without a lock (`ArcSwap`). Buffers are
//! allocated once per task; the steady-state path does not allocate.
//!
//! The tasks run on a runtime the data plane owns (its own worker threads, I/O driver and
//! timers), so whatever the caller's runtime is busy with (certificate checks, `ip` and
//! `nft` calls, fsyncs) never delays a packet.

use super::InboundCounts;
use super::io::{TUN_OFFSET, TunBatch, TunDevice, UdpBatch, UdpTransport};
use super::{DataPlaneConfig, DataPlaneError, PeerChange, PeerSpec, PeerStatus, SecurityEvent};
use arc_swap::ArcSwap;
use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519;
use ipnet::IpNet;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Packets per TUN read batch (one offloaded super-packet splits into at most ~46).
const TUN_READ_BATCH: usize = 128;
/// Packets per TUN write batch (each buffer can grow to 64 KiB when segments coalesce).
const TUN_WRITE_BATCH: usize = 128;
/// UDP receive buffers per batch; each holds up to 64 GRO-coalesced datagrams.
const UDP_RECV_BATCH: usize = 8;
/// Upper bound for the payload of one GSO send (IPv4/UDP headers must still fit in 64 KiB).
const GSO_MAX_BYTES: usize = 65_000;
/// How often boringtun's timers run (handshake retries, keepalives, rekey).
const TIMER_TICK: Duration = Duration::from_millis(100);
/// Handshake messages per second above which cookies are demanded (counted for the whole
/// device; every handshake message is checked twice, by the device and by its peer).
const HANDSHAKE_RATE_LIMIT: u64 = 200;
/// Security events buffered for the consumer before new ones are dropped.
const EVENT_QUEUE: usize = 1024;
/// Extra room in the per-peer packet space for WireGuard's header and tag.
const WG_OVERHEAD: usize = 32;
/// Worker threads of the data plane's own runtime (outbound and inbound run in parallel;
/// the timer task is light).
const WORKER_THREADS: usize = 2;

const MSG_INIT: u8 = 1;
const MSG_RESPONSE: u8 = 2;
const MSG_COOKIE: u8 = 3;
const MSG_DATA: u8 = 4;

struct PeerState {
    tunn: Tunn,
    endpoint: Option<SocketAddr>,
    spec: PeerSpec,
}

struct Peer {
    public_key: [u8; 32],
    index: u32,
    state: Mutex<PeerState>,
    /// Set when the peer was added: the timer task sends its first handshake.
    initiate: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Immutable snapshot of the peers and the lookups the packet path needs.
#[derive(Default)]
struct PeerTable {
    peers: Vec<Arc<Peer>>,
    by_key: HashMap<[u8; 32], Arc<Peer>>,
    by_index: HashMap<u32, Arc<Peer>>,
    hosts: HashMap<IpAddr, Arc<Peer>>,
    /// Non-host prefixes, longest first.
    nets: Vec<(IpNet, Arc<Peer>)>,
}

impl PeerTable {
    fn build(peers: Vec<Arc<Peer>>) -> Self {
        let mut t = PeerTable::default();
        for p in &peers {
            t.by_key.insert(p.public_key, p.clone());
            t.by_index.insert(p.index, p.clone());
            for net in &lock(&p.state).spec.allowed_ips {
                if net.prefix_len() == net.max_prefix_len() {
                    t.hosts.insert(net.addr(), p.clone());
                } else {
                    t.nets.push((*net, p.clone()));
                }
            }
        }
        t.nets
            .sort_by_key(|(n, _)| std::cmp::Reverse(n.prefix_len()));
        t.peers = peers;
        t
    }

    fn route(&self, dst: IpAddr) -> Option<&Arc<Peer>> {
        self.hosts.get(&dst).or_else(|| {
            self.nets
                .iter()
                .find(|(n, _)| n.contains(&dst))
                .map(|(_, p)| p)
        })
    }
}

struct Shared {
    counters: super::DataPlaneCounters,
    table: ArcSwap<PeerTable>,
    secret: x25519::StaticSecret,
    public: x25519::PublicKey,
    rate_limiter: Arc<RateLimiter>,
    events: mpsc::Sender<SecurityEvent>,
    next_index: AtomicU32,
    apply_lock: Mutex<()>,
    /// Largest IP packet the buffers hold.
    packet_space: usize,
}

impl Shared {
    fn report(&self, ev: SecurityEvent) {
        // Never block the packet path on a slow consumer.
        let _ = self.events.try_send(ev);
    }

    fn new_tunn(&self, spec: &PeerSpec, index: u32) -> Tunn {
        Tunn::new(
            self.secret.clone(),
            x25519::PublicKey::from(spec.public_key),
            None,
            spec.persistent_keepalive,
            index,
            Some(self.rate_limiter.clone()),
        )
    }

    fn alloc_index(&self, table: &PeerTable, taken: &[Arc<Peer>]) -> u32 {
        loop {
            // Session indices are `index << 8 | n`, so the peer index has 24 bits.
            let i = self.next_index.fetch_add(1, Ordering::Relaxed) & 0x00ff_ffff;
            if !table.by_index.contains_key(&i) && !taken.iter().any(|p| p.index == i) {
                return i;
            }
        }
    }
}

/// A running data plane: the tasks that move packets between the TUN device and the UDP
/// socket, and the peer set they serve.
pub struct DataPlane {
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
    /// The runtime the packet tasks run on; shut down with the data plane.
    runtime: Option<tokio::runtime::Runtime>,
    cancel: CancellationToken,
    events: Option<mpsc::Receiver<SecurityEvent>>,
    teardown: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl std::fmt::Debug for DataPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataPlane")
            .field("peers", &self.shared.table.load().peers.len())
            .finish()
    }
}

impl DataPlane {
    /// Creates the TUN device (with offload when the kernel allows it), its address and
    /// routes, binds the UDP socket and starts forwarding. Needs CAP_NET_ADMIN.
    pub async fn start(config: DataPlaneConfig) -> Result<Self, DataPlaneError> {
        validate(&config)?;
        let runtime = packet_runtime()?;
        // The socket and the device register with the I/O driver of the runtime current
        // when they are created: the data plane's own.
        let (udp, tun, routes) = {
            let _in_runtime = runtime.enter();
            let udp = super::udp::RealUdp::bind(config.listen_port)?;
            let (tun, routes) = super::tun::RealTun::create(&config)?;
            (udp, tun, routes)
        };
        let interface = config.interface.clone();
        let mut dp = Self::start_inner(&config, runtime, Arc::new(tun), Arc::new(udp))?;
        dp.teardown = Some(Box::new(move || {
            super::tun::delete_routes(&interface, &routes)
        }));
        Ok(dp)
    }

    /// Starts forwarding between the given TUN device and UDP transport (fakes in tests),
    /// on the data plane's own runtime.
    pub fn start_with<T: TunDevice, U: UdpTransport>(
        config: DataPlaneConfig,
        tun: T,
        udp: U,
    ) -> Result<Self, DataPlaneError> {
        validate(&config)?;
        Self::start_inner(&config, packet_runtime()?, Arc::new(tun), Arc::new(udp))
    }

    /// A handle to the runtime the packet tasks run on (latency probes, tests).
    pub fn runtime_handle(&self) -> Option<tokio::runtime::Handle> {
        self.runtime.as_ref().map(|r| r.handle().clone())
    }

    fn start_inner<T: TunDevice, U: UdpTransport>(
        config: &DataPlaneConfig,
        runtime: tokio::runtime::Runtime,
        tun: Arc<T>,
        udp: Arc<U>,
    ) -> Result<Self, DataPlaneError> {
        let secret = x25519::StaticSecret::from(config.private_key);
        let public = x25519::PublicKey::from(&secret);
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        let shared = Arc::new(Shared {
            counters: super::DataPlaneCounters::default(),
            table: ArcSwap::from_pointee(PeerTable::default()),
            rate_limiter: Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT)),
            secret,
            public,
            events: tx,
            next_index: AtomicU32::new(rand::random::<u32>()),
            apply_lock: Mutex::new(()),
            packet_space: usize::from(config.mtu).max(1280),
        });
        let cancel = CancellationToken::new();
        let tasks = vec![
            runtime.spawn(outbound(
                shared.clone(),
                tun.clone(),
                udp.clone(),
                cancel.clone(),
            )),
            runtime.spawn(inbound(shared.clone(), tun, udp.clone(), cancel.clone())),
            runtime.spawn(timers(shared.clone(), udp, cancel.clone())),
        ];
        Ok(Self {
            shared,
            tasks,
            runtime: Some(runtime),
            cancel,
            events: Some(rx),
            teardown: None,
        })
    }

    /// This node's WireGuard public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.shared.public.to_bytes()
    }

    /// Security events (unknown keys, failed handshakes, spoofed sources). Can be taken once.
    pub fn take_events(&mut self) -> Option<mpsc::Receiver<SecurityEvent>> {
        self.events.take()
    }

    /// Applies peer changes. Removed peers stop forwarding immediately; updated peers keep
    /// their sessions unless their keepalive changed.
    pub fn apply(&self, changes: Vec<PeerChange>) {
        let _serialised = lock(&self.shared.apply_lock);
        let current = self.shared.table.load_full();
        let mut peers = current.peers.clone();
        let own_key = self.shared.public.to_bytes();
        for change in changes {
            match change {
                PeerChange::Remove { public_key, name } => {
                    peers.retain(|p| p.public_key != public_key);
                    tracing::info!(peer = %name, "peer removed");
                }
                PeerChange::Add(spec) | PeerChange::Update(spec) => {
                    if spec.public_key == own_key {
                        tracing::warn!(peer = %spec.name, "refusing a peer with this node's own key");
                        continue;
                    }
                    if let Some(p) = peers.iter().find(|p| p.public_key == spec.public_key) {
                        let mut st = lock(&p.state);
                        if st.spec.persistent_keepalive != spec.persistent_keepalive {
                            st.tunn = self.shared.new_tunn(&spec, p.index);
                            p.initiate.store(true, Ordering::Relaxed);
                        }
                        if spec.endpoint.is_some() && spec.endpoint != st.spec.endpoint {
                            st.endpoint = spec.endpoint;
                        }
                        tracing::info!(peer = %spec.name, zone = %spec.zone, "peer updated");
                        st.spec = spec;
                    } else {
                        let index = self.shared.alloc_index(&current, &peers);
                        tracing::info!(peer = %spec.name, zone = %spec.zone, endpoint = ?spec.endpoint, "peer added");
                        peers.push(Arc::new(Peer {
                            public_key: spec.public_key,
                            index,
                            initiate: AtomicBool::new(spec.endpoint.is_some()),
                            state: Mutex::new(PeerState {
                                tunn: self.shared.new_tunn(&spec, index),
                                endpoint: spec.endpoint,
                                spec,
                            }),
                        }));
                    }
                }
            }
        }
        self.shared.table.store(Arc::new(PeerTable::build(peers)));
    }

    /// The configured peers (as last applied), for [`super::reconcile`].
    pub fn peers(&self) -> Vec<PeerSpec> {
        let t = self.shared.table.load();
        t.peers
            .iter()
            .map(|p| lock(&p.state).spec.clone())
            .collect()
    }

    /// Packets moved and dropped since the data plane started.
    pub fn counters(&self) -> super::DataPlaneStats {
        self.shared.counters.snapshot()
    }

    /// Live state of every peer.
    pub fn status(&self) -> Vec<PeerStatus> {
        let now = SystemTime::now();
        let t = self.shared.table.load();
        t.peers
            .iter()
            .map(|p| {
                let st = lock(&p.state);
                let (since, tx, rx, _, _) = st.tunn.stats();
                PeerStatus {
                    name: st.spec.name.clone(),
                    zone: st.spec.zone.clone(),
                    public_key: super::key_b64(&p.public_key),
                    endpoint: st.endpoint,
                    last_handshake: since.and_then(|d| now.checked_sub(d)),
                    rx_bytes: rx as u64,
                    tx_bytes: tx as u64,
                }
            })
            .collect()
    }

    /// Resolves when the data plane stopped: after [`DataPlane::shutdown`] began, or when
    /// a task hit a fatal I/O error (the TUN device or the socket went away), in which case
    /// the caller should shut it down and start a new one.
    pub async fn stopped(&self) {
        self.cancel.cancelled().await
    }

    /// Stops every task, then removes the routes and the TUN device it created.
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        for task in std::mem::take(&mut self.tasks) {
            if let Err(e) = task.await {
                tracing::warn!(error = %e, "data plane task failed");
            }
        }
        if let Some(teardown) = self.teardown.take() {
            // `ip route del`: a subprocess, kept off the caller's async workers.
            if let Err(e) = tokio::task::spawn_blocking(teardown).await {
                tracing::warn!(error = %e, "data plane teardown failed");
            }
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for DataPlane {
    fn drop(&mut self) {
        // Without shutdown(): stop the tasks with their runtime; still undo the routes.
        self.cancel.cancel();
        for task in &self.tasks {
            task.abort();
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
        if let Some(teardown) = self.teardown.take() {
            teardown();
        }
    }
}

/// The data plane's own multi-thread runtime.
fn packet_runtime() -> Result<tokio::runtime::Runtime, DataPlaneError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(WORKER_THREADS)
        .thread_name("zm-dataplane")
        .enable_all()
        .build()
        .map_err(DataPlaneError::Runtime)
}

fn validate(c: &DataPlaneConfig) -> Result<(), DataPlaneError> {
    if c.interface.is_empty() || c.interface.len() > 15 {
        return Err(DataPlaneError::Config(format!(
            "interface name {:?} must be 1-15 characters",
            c.interface
        )));
    }
    if !(576..=9000).contains(&c.mtu) {
        return Err(DataPlaneError::Config(format!(
            "mtu {} out of range 576..=9000",
            c.mtu
        )));
    }
    if c.private_key == [0; 32] {
        return Err(DataPlaneError::Config("private key is all zeros".into()));
    }
    Ok(())
}

/// One UDP send: `len` bytes at `start` of the arena, `count` datagrams of `stride` bytes
/// (the last may be shorter).
#[derive(Clone, Copy)]
struct SendItem {
    dst: SocketAddr,
    start: usize,
    len: usize,
    stride: usize,
    count: usize,
    data: bool,
    closed: bool,
}

fn push_item(
    items: &mut Vec<SendItem>,
    dst: SocketAddr,
    start: usize,
    len: usize,
    data: bool,
    max_seg: usize,
) {
    if data
        && let Some(last) = items.last_mut()
        && last.data
        && !last.closed
        && last.dst == dst
        && last.start + last.len == start
        && last.count < max_seg
        && last.len + len <= GSO_MAX_BYTES
        && len <= last.stride
    {
        last.len += len;
        last.count += 1;
        // A shorter datagram must be the last of a GSO batch.
        last.closed = len < last.stride;
        return;
    }
    items.push(SendItem {
        dst,
        start,
        len,
        stride: len,
        count: 1,
        data,
        closed: false,
    });
}

async fn outbound<T: TunDevice, U: UdpTransport>(
    shared: Arc<Shared>,
    tun: Arc<T>,
    udp: Arc<U>,
    cancel: CancellationToken,
) {
    let mut batch = TunBatch::new(TUN_READ_BATCH, shared.packet_space);
    let mut arena = vec![0u8; TUN_READ_BATCH * (shared.packet_space + WG_OVERHEAD)];
    let mut items: Vec<SendItem> = Vec::with_capacity(TUN_READ_BATCH);
    let mut errors = 0u32;
    loop {
        let n = tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            r = tun.recv(&mut batch) => match r {
                Ok(n) => { errors = 0; n }
                Err(e) if fatal(&e) => { tracing::error!(error = %e, "TUN read failed; data plane stopping"); cancel.cancel(); break }
                Err(e) => {
                    errors += 1;
                    if errors.is_power_of_two() { tracing::debug!(error = %e, errors, "TUN read error"); }
                    continue;
                }
            },
        };
        items.clear();
        encrypt_batch(
            &shared,
            &batch,
            n,
            &mut arena,
            &mut items,
            udp.max_segments(),
        );
        for it in &items {
            let seg = (it.count > 1).then_some(it.stride);
            if let Err(e) = udp
                .send(it.dst, &arena[it.start..it.start + it.len], seg)
                .await
            {
                tracing::debug!(error = %e, dst = %it.dst, "UDP send failed");
            }
        }
    }
}

fn fatal(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::NotConnected
    ) || e.raw_os_error() == Some(libc::EBADFD)
        || e.raw_os_error() == Some(libc::EBADF)
}

/// Encrypts the first `n` packets of `batch` into `arena` and describes the sends.
fn encrypt_batch(
    shared: &Shared,
    batch: &TunBatch,
    n: usize,
    arena: &mut [u8],
    items: &mut Vec<SendItem>,
    max_seg: usize,
) {
    let table = shared.table.load();
    let mut cursor = 0usize;
    let mut i = 0usize;
    let mut unroutable = 0u64;
    while i < n {
        let Some(dst) = Tunn::dst_address(batch.packet(i)) else {
            unroutable += 1;
            i += 1;
            continue;
        };
        let Some(peer) = table.route(dst) else {
            // No peer for this destination: dropped (the kernel only routes our
            // overlay ranges here).
            unroutable += 1;
            i += 1;
            continue;
        };
        let mut st = lock(&peer.state);
        let endpoint = st.endpoint;
        let mut last_dst = dst;
        loop {
            let pkt = batch.packet(i);
            let room = arena.len() - cursor;
            if room >= (pkt.len() + WG_OVERHEAD).max(148)
                && let TunnResult::WriteToNetwork(out) =
                    st.tunn.encapsulate(pkt, &mut arena[cursor..])
                && let Some(ep) = endpoint
            {
                let len = out.len();
                push_item(items, ep, cursor, len, out[0] == MSG_DATA, max_seg);
                cursor += len;
            }
            i += 1;
            if i >= n {
                break;
            }
            // Keep the lock while the next packets go to the same peer.
            match Tunn::dst_address(batch.packet(i)) {
                Some(d) if d == last_dst => {}
                Some(d) => match table.route(d) {
                    Some(p) if Arc::ptr_eq(p, peer) => last_dst = d,
                    _ => break,
                },
                None => break,
            }
        }
    }
    // Once per batch: the packet path takes no lock and shares no counter per packet.
    shared.counters.add_outbound(n as u64, unroutable);
}

/// Position in a received UDP batch.
#[derive(Default)]
struct Cursor {
    buf: usize,
    off: usize,
}

async fn inbound<T: TunDevice, U: UdpTransport>(
    shared: Arc<Shared>,
    tun: Arc<T>,
    udp: Arc<U>,
    cancel: CancellationToken,
) {
    let mut ubatch = UdpBatch::new(UDP_RECV_BATCH);
    let mut tbatch = TunBatch::for_writes(TUN_WRITE_BATCH, shared.packet_space + WG_OVERHEAD);
    let mut ctrl: Vec<(SocketAddr, Vec<u8>)> = Vec::new();
    let mut scratch = vec![0u8; (shared.packet_space + WG_OVERHEAD).max(2048)];
    let mut errors = 0u32;
    loop {
        let m = tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            r = udp.recv(&mut ubatch) => match r {
                Ok(m) => { errors = 0; m }
                Err(e) if fatal(&e) => { tracing::error!(error = %e, "UDP receive failed; data plane stopping"); cancel.cancel(); break }
                Err(e) => {
                    errors += 1;
                    if errors.is_power_of_two() { tracing::debug!(error = %e, errors, "UDP receive error"); }
                    continue;
                }
            },
        };
        let mut cursor = Cursor::default();
        loop {
            let (n, done) = decrypt_batch(
                &shared,
                &ubatch,
                m,
                &mut cursor,
                &mut tbatch,
                &mut ctrl,
                &mut scratch,
            );
            for (dst, d) in ctrl.drain(..) {
                if let Err(e) = udp.send(dst, &d, None).await {
                    tracing::debug!(error = %e, %dst, "UDP send failed");
                }
            }
            if n > 0
                && let Err(e) = tun.send(&mut tbatch, n).await
            {
                if fatal(&e) {
                    tracing::error!(error = %e, "TUN write failed; data plane stopping");
                    cancel.cancel();
                    return;
                }
                tracing::debug!(error = %e, "TUN write error");
            }
            if done {
                break;
            }
        }
    }
}

/// Sends what the peer queued while it had no session, now that it may have one.
fn flush_queue(st: &mut PeerState, scratch: &mut [u8], ctrl: &mut Vec<(SocketAddr, Vec<u8>)>) {
    while let TunnResult::WriteToNetwork(p) = st.tunn.decapsulate(None, &[], scratch) {
        if let Some(ep) = st.endpoint {
            ctrl.push((ep, p.to_vec()));
        }
    }
}

fn roam(st: &mut PeerState, src: SocketAddr) {
    if st.endpoint != Some(src) {
        tracing::debug!(peer = %st.spec.name, endpoint = %src, "peer endpoint changed");
        st.endpoint = Some(src);
    }
}

type Held<'a> = Option<(u32, MutexGuard<'a, PeerState>)>;

fn release(held: &mut Held<'_>, scratch: &mut [u8], ctrl: &mut Vec<(SocketAddr, Vec<u8>)>) {
    if let Some((_, mut st)) = held.take() {
        flush_queue(&mut st, scratch, ctrl);
    }
}

/// Decrypts datagrams from `cursor` on into `tbatch` until the batch is full (returns
/// `(n, false)`) or the datagrams are used up (`(n, true)`). Handshake replies and other
/// datagrams to send go to `ctrl`.
fn decrypt_batch(
    shared: &Shared,
    ubatch: &UdpBatch,
    m: usize,
    cursor: &mut Cursor,
    tbatch: &mut TunBatch,
    ctrl: &mut Vec<(SocketAddr, Vec<u8>)>,
    scratch: &mut [u8],
) -> (usize, bool) {
    let table = shared.table.load();
    let space = tbatch.packet_space;
    let mut n = 0usize;
    let mut held: Held<'_> = None;
    let mut seen = InboundCounts::default();
    while cursor.buf < m {
        let info = ubatch.info[cursor.buf];
        if cursor.off >= info.len {
            cursor.buf += 1;
            cursor.off = 0;
            continue;
        }
        if n == tbatch.capacity() {
            release(&mut held, scratch, ctrl);
            seen.delivered = n as u64;
            shared.counters.add_inbound(&seen);
            return (n, false);
        }
        let stride = if info.stride == 0 {
            info.len
        } else {
            info.stride
        };
        let end = (cursor.off + stride).min(info.len);
        let d = &ubatch.bufs[cursor.buf][cursor.off..end];
        cursor.off = end;
        let src = info.addr;
        seen.datagrams += 1;
        if d.len() < 16 || d[1..4] != [0, 0, 0] {
            seen.malformed += 1;
            continue;
        }
        let idx_at = match d[0] {
            MSG_INIT => {
                release(&mut held, scratch, ctrl);
                handle_init(shared, &table, d, src, ctrl, scratch);
                continue;
            }
            MSG_RESPONSE => 8,
            MSG_COOKIE | MSG_DATA => 4,
            _ => {
                seen.malformed += 1;
                continue;
            }
        };
        let receiver = u32::from_le_bytes([d[idx_at], d[idx_at + 1], d[idx_at + 2], d[idx_at + 3]]);
        let peer_index = receiver >> 8;
        if held.as_ref().map(|(i, _)| *i) != Some(peer_index) {
            release(&mut held, scratch, ctrl);
            let Some(peer) = table.by_index.get(&peer_index) else {
                seen.unknown_session += 1;
                continue;
            };
            held = Some((peer_index, lock(&peer.state)));
        }
        let Some((_, st)) = held.as_mut() else {
            continue;
        };
        if d[0] == MSG_DATA {
            if d.len() - 16 > space {
                seen.malformed += 1;
                continue;
            }
            let buf = &mut tbatch.bufs[n];
            buf.resize(TUN_OFFSET + space, 0);
            match st
                .tunn
                .decapsulate(Some(src.ip()), d, &mut buf[TUN_OFFSET..])
            {
                TunnResult::WriteToTunnelV4(p, _) | TunnResult::WriteToTunnelV6(p, _) => {
                    let len = p.len();
                    let inner_src = inner_source(&buf[TUN_OFFSET..TUN_OFFSET + len]);
                    roam(st, src);
                    if inner_src
                        .is_some_and(|ip| st.spec.allowed_ips.iter().any(|net| net.contains(&ip)))
                    {
                        buf.truncate(TUN_OFFSET + len);
                        tbatch.sizes[n] = len;
                        n += 1;
                    } else if let Some(ip) = inner_src {
                        seen.spoofed += 1;
                        shared.report(SecurityEvent::SpoofedSource {
                            peer: st.spec.name.clone(),
                            inner_source: ip,
                        });
                    }
                }
                TunnResult::Done => roam(st, src),
                TunnResult::WriteToNetwork(p) => {
                    ctrl.push((src, p.to_vec()));
                    roam(st, src);
                }
                TunnResult::Err(e) => {
                    seen.rejected += 1;
                    tracing::trace!(error = ?e, "data packet rejected")
                }
            }
        } else {
            match st.tunn.decapsulate(Some(src.ip()), d, scratch) {
                TunnResult::WriteToNetwork(p) => {
                    ctrl.push((src, p.to_vec()));
                    roam(st, src);
                }
                TunnResult::Done => roam(st, src),
                TunnResult::Err(WireGuardError::InvalidMac) => {
                    shared.report(SecurityEvent::InvalidHandshake { source: src });
                }
                TunnResult::Err(e) => {
                    tracing::debug!(error = ?e, peer = %st.spec.name, "handshake message rejected")
                }
                _ => {}
            }
        }
    }
    release(&mut held, scratch, ctrl);
    seen.delivered = n as u64;
    shared.counters.add_inbound(&seen);
    (n, true)
}

fn inner_source(p: &[u8]) -> Option<IpAddr> {
    match p.first()? >> 4 {
        4 if p.len() >= 20 => Some(IpAddr::from(<[u8; 4]>::try_from(&p[12..16]).ok()?)),
        6 if p.len() >= 40 => Some(IpAddr::from(<[u8; 16]>::try_from(&p[8..24]).ok()?)),
        _ => None,
    }
}

/// A handshake initiation: find the peer by the static key inside it, then let that
/// peer's `Tunn` answer.
fn handle_init(
    shared: &Shared,
    table: &PeerTable,
    d: &[u8],
    src: SocketAddr,
    ctrl: &mut Vec<(SocketAddr, Vec<u8>)>,
    scratch: &mut [u8],
) {
    let key = match shared
        .rate_limiter
        .verify_packet(Some(src.ip()), d, scratch)
    {
        Ok(Packet::HandshakeInit(h)) => {
            match parse_handshake_anon(&shared.secret, &shared.public, &h) {
                Ok(half) => half.peer_static_public,
                Err(_) => {
                    shared.report(SecurityEvent::InvalidHandshake { source: src });
                    return;
                }
            }
        }
        Ok(_) => return,
        Err(TunnResult::WriteToNetwork(cookie)) => {
            // Under load: answer with a cookie instead of doing the handshake.
            ctrl.push((src, cookie.to_vec()));
            return;
        }
        Err(_) => {
            shared.report(SecurityEvent::InvalidHandshake { source: src });
            return;
        }
    };
    let Some(peer) = table.by_key.get(&key) else {
        tracing::debug!(source = %src, key = %super::key_b64(&key), "handshake from unknown key");
        shared.report(SecurityEvent::UnknownPeerKey {
            public_key: key,
            source: src,
        });
        return;
    };
    let mut st = lock(&peer.state);
    match st.tunn.decapsulate(Some(src.ip()), d, scratch) {
        TunnResult::WriteToNetwork(p) => {
            ctrl.push((src, p.to_vec()));
            roam(&mut st, src);
            flush_queue(&mut st, scratch, ctrl);
        }
        TunnResult::Err(e) => {
            tracing::debug!(error = ?e, peer = %st.spec.name, "handshake initiation rejected")
        }
        _ => {}
    }
}

async fn timers<U: UdpTransport>(shared: Arc<Shared>, udp: Arc<U>, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(TIMER_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut buf = vec![0u8; (shared.packet_space + WG_OVERHEAD).max(2048)];
    let mut out: Vec<(SocketAddr, Vec<u8>)> = Vec::new();
    let mut ticks = 0u64;
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            _ = tick.tick() => {}
        }
        ticks += 1;
        if ticks.is_multiple_of(1000 / TIMER_TICK.as_millis() as u64) {
            shared.rate_limiter.reset_count();
        }
        let table = shared.table.load_full();
        for peer in &table.peers {
            let mut st = lock(&peer.state);
            let Some(ep) = st.endpoint else { continue };
            if peer.initiate.swap(false, Ordering::Relaxed)
                && let TunnResult::WriteToNetwork(p) =
                    st.tunn.format_handshake_initiation(&mut buf, false)
            {
                out.push((ep, p.to_vec()));
            }
            match st.tunn.update_timers(&mut buf) {
                TunnResult::WriteToNetwork(p) => out.push((ep, p.to_vec())),
                TunnResult::Err(WireGuardError::ConnectionExpired) => {}
                TunnResult::Err(e) => tracing::trace!(error = ?e, peer = %st.spec.name, "timer"),
                _ => {}
            }
        }
        drop(table);
        for (dst, p) in out.drain(..) {
            if let Err(e) = udp.send(dst, &p, None).await {
                tracing::debug!(error = %e, %dst, "UDP send failed");
            }
        }
    }
}
