//! Watch fan-out: N simulated agents, each with its own certificate and its own mutual-TLS
//! connection, hold Watch streams against a real controller on loopback. Measured at each
//! fleet size: one change (a node enrolls) until every watcher has it (p50/p99/max over
//! the changes), a burst of 100 enrollments until every watcher has the last one (and how
//! many messages that took per watcher: a burst is coalesced), enrollments per second with
//! no watcher and with N, and the controller's memory (RSS) per connected agent.
//!
//! Anchor measured in the same run: the previous design's controller binary under the same
//! load (`PREV_CONTROLLER_BIN`, default `/work/prefan/zonemesh-controller` when present),
//! stopped at `MEM_CAP_MIB` (default 8192) and then reported as "did not fit".
//!
//! The agents' side shares what can be shared: one tokio runtime for every watcher (its
//! threads at the controller's agents' niceness, as the machines they stand for would not
//! take the controller's CPU), a pool of 4 client keys (each agent still has its own
//! certificate), and a watcher reads each message's version and kind off the raw HTTP/2
//! frames and drops the rest as it arrives (no per-stream buffer the size of the largest
//! message, which a generated client keeps for the stream's life). The enrolling side has
//! a runtime of its own.
//!
//! `SMOKE=1` runs 10 and 50 agents in well under a minute (CI). `FLEETS=1000,3000,10000`
//! (the default), `CHANGES=20`, `BURST=100` set the full run; `ZONEMESH_CONTROLLER_BIN`
//! picks the controller binary (default: `target/release/zonemesh-controller` if built).
//!
//! `TWO_ON_ETCD=1`: the same change's p99 with two controllers on one three-member etcd
//! cluster (Debian `etcd-server`, on loopback), the watchers split over them and every
//! change made through A, next to one controller on sled at the same fleet in the same run
//! (`FLEETS`, default 1,000; 100 with `SMOKE=1`).

use anyhow::{Context, Result};
use bytes::Buf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use zonemesh_proto as pb;
use zonemesh_tests::cluster::{
    Controller, Dial, NodeCreds, enroll_rpc, enrollment_channel, mesh_channel_dial, rss_kib, wg_key,
};
use zonemesh_tests::{rsa4096, target_dir};

const KEY_POOL: usize = 4;
const ENROLL_IN_FLIGHT: usize = 8;
const CONNECT_IN_FLIGHT: usize = 32;
const AGENTS_PER_SOURCE: usize = 1000;
/// Most uses one enrollment token may have (the controller refuses more).
const TOKEN_USES: usize = 10_000;

struct Delivery {
    watcher: usize,
    version: u64,
    at: Instant,
}

/// What a simulated agent reads of a Watch message: its version and kind. The rest of
/// the message is skipped as it arrives, not decoded or kept (the agents' side must fit on
/// the same machine).
struct Head {
    version: u64,
    /// A whole snapshot (else a delta).
    snapshot: bool,
}

/// The first bytes of a message that hold its head: the version (field 1, a varint) and
/// the key of its kind (field 2 snapshot, 3 delta).
const HEAD_BYTES: usize = 16;

/// A Watch stream read as raw gRPC frames off HTTP/2. Each message's head is taken from
/// its first bytes and the rest is dropped as each DATA frame comes, so a stream holds no
/// buffer the size of its largest message (a generated client keeps one, the size of the
/// snapshot, for the stream's life: ten thousand of them would not fit here).
struct HeadStream {
    body: tonic::body::Body,
    /// The gRPC prefix of the next message (flag, big-endian length) while it comes.
    prefix: Vec<u8>,
    /// Bytes of the current message still to come, once its prefix is in.
    left: Option<usize>,
    head: Vec<u8>,
    ready: std::collections::VecDeque<Head>,
}

fn parse_head(mut b: &[u8]) -> Result<Head> {
    let (mut version, mut snapshot) = (0, false);
    while b.has_remaining() {
        let key = prost::encoding::decode_varint(&mut b)?;
        match (key >> 3, key & 7) {
            (1, 0) => version = prost::encoding::decode_varint(&mut b)?,
            (field, 2) => {
                snapshot = field == 2;
                break;
            }
            _ => anyhow::bail!("unexpected field in a Watch message"),
        }
    }
    Ok(Head { version, snapshot })
}

impl HeadStream {
    /// Take a DATA frame: complete messages go to `ready`.
    fn take(&mut self, mut data: bytes::Bytes) -> Result<()> {
        while data.has_remaining() {
            match self.left {
                None => {
                    let n = (5 - self.prefix.len()).min(data.len());
                    self.prefix.extend_from_slice(&data.split_to(n));
                    if self.prefix.len() == 5 {
                        let len = u32::from_be_bytes(self.prefix[1..5].try_into()?) as usize;
                        anyhow::ensure!(self.prefix[0] == 0, "a compressed Watch message");
                        self.prefix.clear();
                        self.head.clear();
                        self.left = Some(len);
                    }
                }
                Some(left) => {
                    let n = left.min(data.len());
                    let chunk = data.split_to(n);
                    let want = HEAD_BYTES.saturating_sub(self.head.len()).min(n);
                    self.head.extend_from_slice(&chunk[..want]);
                    self.left = Some(left - n);
                }
            }
            if self.left == Some(0) {
                self.left = None;
                let h = parse_head(&self.head)?;
                self.ready.push_back(h);
            }
        }
        Ok(())
    }

    /// The next message's head; `None` when the stream ended well.
    async fn message(&mut self) -> Result<Option<Head>> {
        use http_body_util::BodyExt;
        loop {
            if let Some(h) = self.ready.pop_front() {
                return Ok(Some(h));
            }
            let Some(frame) = self.body.frame().await else {
                return Ok(None);
            };
            let frame = frame.map_err(|s| anyhow::anyhow!("Watch: {s}"))?;
            match frame.into_data() {
                Ok(data) => self.take(data)?,
                Err(frame) => {
                    if let Some(t) = frame.trailers_ref() {
                        grpc_ok(t)?;
                    }
                    return Ok(None);
                }
            }
        }
    }
}

/// An error for a `grpc-status` other than 0 in `headers` (a trailers-only answer, or
/// the trailers).
fn grpc_ok(headers: &http::HeaderMap) -> Result<()> {
    match headers
        .get("grpc-status")
        .map(|v| v.to_str().unwrap_or("?"))
    {
        None | Some("0") => Ok(()),
        Some(code) => anyhow::bail!(
            "Watch ended: grpc-status {code} {}",
            headers
                .get("grpc-message")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
        ),
    }
}

/// A Watch stream from `resume_from_version` (0: from a snapshot).
async fn watch_heads(
    ch: tonic::transport::Channel,
    resume_from_version: u64,
) -> Result<HeadStream> {
    use tower::ServiceExt;
    let msg = prost::Message::encode_to_vec(&pb::WatchRequest {
        chain_once: true,
        resume_from_version,
    });
    let mut framed = Vec::with_capacity(5 + msg.len());
    framed.push(0);
    framed.extend_from_slice(&u32::try_from(msg.len())?.to_be_bytes());
    framed.extend_from_slice(&msg);
    let req = http::Request::builder()
        .method("POST")
        .uri("/zonemesh.v1.Mesh/Watch")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(tonic::body::Body::new(http_body_util::Full::new(
            bytes::Bytes::from(framed),
        )))?;
    let resp = ch.oneshot(req).await?;
    anyhow::ensure!(
        resp.status() == 200,
        "Watch answered HTTP {}",
        resp.status()
    );
    grpc_ok(resp.headers())?;
    Ok(HeadStream {
        body: resp.into_body(),
        prefix: Vec::with_capacity(5),
        left: None,
        head: Vec::with_capacity(HEAD_BYTES),
        ready: Default::default(),
    })
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn controller_bin() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("ZONEMESH_CONTROLLER_BIN") {
        return p.into();
    }
    let rel = target_dir().join("release").join("zonemesh-controller");
    if rel.exists() {
        rel
    } else {
        zonemesh_tests::bin("zonemesh-controller")
    }
}

fn prev_controller_bin() -> Option<std::path::PathBuf> {
    match std::env::var_os("PREV_CONTROLLER_BIN") {
        Some(p) if p.is_empty() => None,
        Some(p) => Some(p.into()),
        None => {
            let p = std::path::PathBuf::from("/work/prefan/zonemesh-controller");
            p.exists().then_some(p)
        }
    }
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

/// CPU time (user+system) of a process in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = s.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields after ")" start at field 3 (state); utime is field 14, stime 15.
    let get = |i: usize| {
        f.get(i - 3)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    get(14) + get(15)
}

/// Peak resident memory of a process in KiB (`VmHWM`).
fn peak_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Enough enrollment tokens for `needed` enrollments (the controller caps a token's uses).
fn tokens_for(ctl: &Controller, needed: usize) -> Result<Vec<String>> {
    (0..needed.div_ceil(TOKEN_USES))
        .map(|_| ctl.token("bench", TOKEN_USES as u32))
        .collect()
}

struct Bench {
    ctl: Controller,
    pid: u32,
    /// Enrollment tokens of `TOKEN_USES` uses each: agent `i` uses `tokens[i / TOKEN_USES]`.
    tokens: Vec<String>,
    keys: Vec<Arc<rcgen::KeyPair>>,
    enroll_chans: Vec<tonic::transport::Channel>,
    enrolled: usize,
    watchers: usize,
    /// The version every watcher has reached.
    settled: u64,
    channels: Vec<tonic::transport::Channel>,
    messages: Arc<AtomicU64>,
    /// Snapshots sent to watchers after their first (each one costs the whole fleet's
    /// size, where a delta costs what changed).
    resent: Arc<AtomicU64>,
    /// The last version each watcher received.
    latest: Arc<Vec<AtomicU64>>,
    tx: mpsc::UnboundedSender<Delivery>,
    rx: mpsc::UnboundedReceiver<Delivery>,
    watch_tasks: tokio::task::JoinSet<()>,
}

/// The enrolling side runs on a runtime of its own (one thread), as a server joining the
/// fleet runs on a machine of its own: its connections are not queued behind the
/// simulated watchers' tasks on the watchers' runtime.
fn enroll_runtime() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("bench-enroll")
            .enable_all()
            .build()
            .expect("enrollment runtime")
    })
}

impl Bench {
    /// The bench against `ctl` (controller process `pid`), with room for `max` watchers
    /// and four enrollment connections to `addr` on the enrollment runtime.
    async fn new(
        ctl: Controller,
        pid: u32,
        tokens: Vec<String>,
        addr: &str,
        fingerprint: &str,
        max: usize,
    ) -> Result<Self> {
        let (addr, fp) = (addr.to_string(), fingerprint.to_string());
        let enroll_chans = enroll_runtime()
            .spawn(async move {
                futures::future::try_join_all((0..4).map(|_| enrollment_channel(&addr, &fp))).await
            })
            .await??;
        let (tx, rx) = mpsc::unbounded_channel();
        Ok(Self {
            ctl,
            pid,
            tokens,
            keys: (0..KEY_POOL).map(|i| Arc::new(rsa4096(i))).collect(),
            enroll_chans,
            enrolled: 0,
            watchers: 0,
            settled: 0,
            channels: vec![],
            messages: Arc::new(AtomicU64::new(0)),
            resent: Arc::new(AtomicU64::new(0)),
            latest: Arc::new((0..=max).map(|_| AtomicU64::new(0)).collect()),
            tx,
            rx,
            watch_tasks: tokio::task::JoinSet::new(),
        })
    }

    /// Enroll `n` more agents over the Enrollment RPC (8 in flight, on the enrollment
    /// runtime); returns their credentials and the enrollments per second.
    async fn enroll(&mut self, n: usize) -> Result<(Vec<NodeCreds>, f64)> {
        use futures::StreamExt;
        let chans = self.enroll_chans.clone();
        let keys = self.keys.clone();
        let start = self.enrolled;
        self.enrolled += n;
        let tokens = self.tokens.clone();
        let t = Instant::now();
        let out: Vec<Result<(NodeCreds, pb::EnrollResponse), tonic::Status>> = enroll_runtime()
            .spawn(async move {
                futures::stream::iter(start..start + n)
                    .map(|i| {
                        let ch = chans[i % chans.len()].clone();
                        let key = keys[i % keys.len()].clone();
                        let token = tokens[i / TOKEN_USES].clone();
                        async move {
                            enroll_rpc(ch, &token, &format!("a{i}"), &key, wg_key(i as u64 + 1))
                                .await
                        }
                    })
                    .buffer_unordered(ENROLL_IN_FLIGHT)
                    .collect()
                    .await
            })
            .await?;
        let rate = n as f64 / t.elapsed().as_secs_f64().max(1e-9);
        let mut creds = Vec::with_capacity(n);
        for r in out {
            creds.push(r.map_err(|s| anyhow::anyhow!("enroll: {s}"))?.0);
        }
        Ok((creds, rate))
    }

    /// Connect `creds` as watchers (own TLS connection each); returns once every one has
    /// its snapshot.
    async fn connect(&mut self, creds: Vec<NodeCreds>) -> Result<Duration> {
        let addr = self.ctl.grpc_addr();
        self.connect_at(addr, creds).await
    }

    /// `connect` to the controller at `addr` (with two controllers: either of them).
    async fn connect_at(&mut self, addr: String, creds: Vec<NodeCreds>) -> Result<Duration> {
        use futures::StreamExt;
        let t = Instant::now();
        let first = self.watchers;
        self.watchers += creds.len();
        let results: Vec<Result<(tonic::transport::Channel, HeadStream, u64)>> =
            futures::stream::iter(creds.iter())
                .enumerate()
                .map(|(i, c)| {
                    let (addr, c) = (addr.clone(), c.clone());
                    // 1,000 agents per loopback source address, as a fleet comes from
                    // many hosts (the controller limits connections per source).
                    let n = (first + i) / AGENTS_PER_SOURCE;
                    let source =
                        std::net::Ipv4Addr::new(127, 1, (n / 250) as u8, (n % 250 + 1) as u8);
                    async move {
                        let dial = Dial {
                            source: Some(source.into()),
                            ..Default::default()
                        };
                        let ch = mesh_channel_dial(&addr, &c, dial).await?;
                        let mut s = watch_heads(ch.clone(), 0).await?;
                        let snap = s.message().await?.context("no snapshot")?;
                        anyhow::ensure!(snap.snapshot, "the first message is not a snapshot");
                        Ok((ch, s, snap.version))
                    }
                })
                .buffer_unordered(CONNECT_IN_FLIGHT)
                .collect()
                .await;
        for (i, r) in results.into_iter().enumerate() {
            let (ch, mut s, version) = r?;
            self.channels.push(ch);
            let (tx, messages, watcher) = (self.tx.clone(), self.messages.clone(), first + i);
            let resent = self.resent.clone();
            let latest = self.latest.clone();
            latest[watcher].store(version, Ordering::SeqCst);
            self.watch_tasks.spawn(async move {
                while let Ok(Some(u)) = s.message().await {
                    messages.fetch_add(1, Ordering::Relaxed);
                    if u.snapshot {
                        resent.fetch_add(1, Ordering::Relaxed);
                    }
                    latest[watcher].store(u.version, Ordering::SeqCst);
                    let _ = tx.send(Delivery {
                        watcher,
                        version: u.version,
                        at: Instant::now(),
                    });
                }
            });
        }
        let took = t.elapsed();
        self.settle().await?;
        Ok(took)
    }

    /// Wait until every watcher has the same version, twice in a row, with no change
    /// made meanwhile (a new watcher may get a shared snapshot a few versions old and
    /// the rest as a delta): that version is the head.
    async fn settle(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(300);
        let mut last = None;
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let versions: Vec<u64> = self.latest[..self.watchers]
                .iter()
                .map(|v| v.load(Ordering::SeqCst))
                .collect();
            let max = versions.iter().copied().max().unwrap_or(0);
            let same = versions.iter().all(|v| *v == max);
            if same && last == Some(max) {
                self.settled = max;
                while self.rx.try_recv().is_ok() {}
                return Ok(());
            }
            last = same.then_some(max);
            anyhow::ensure!(Instant::now() < deadline, "watchers did not settle");
        }
    }

    /// Wait until every watcher has `target` or later; returns each watcher's delivery
    /// time after `t0`, sorted.
    async fn wait_all(&mut self, target: u64, t0: Instant) -> Result<Vec<Duration>> {
        let mut lat: Vec<Duration> = self
            .deliveries(target, t0)
            .await?
            .into_iter()
            .map(|(_, d)| d)
            .collect();
        lat.sort();
        Ok(lat)
    }

    /// Wait until every watcher has `target` or later; returns each watcher's index and
    /// delivery time after `t0`, in delivery order.
    async fn deliveries(&mut self, target: u64, t0: Instant) -> Result<Vec<(usize, Duration)>> {
        let mut reached = vec![false; self.watchers];
        let mut lat = Vec::with_capacity(self.watchers);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
        while lat.len() < self.watchers {
            let d = tokio::time::timeout_at(deadline, self.rx.recv())
                .await
                .with_context(|| {
                    format!(
                        "{} of {} watchers did not get version {target} within 300 s",
                        self.watchers - lat.len(),
                        self.watchers
                    )
                })?
                .context("delivery channel closed")?;
            if d.version >= target && !reached[d.watcher] {
                reached[d.watcher] = true;
                lat.push((d.watcher, d.at.saturating_duration_since(t0)));
            }
        }
        self.settled = target;
        Ok(lat)
    }

    /// One change (a new node enrolls): time until every watcher has it, and each
    /// watcher's delivery latency.
    async fn change(&mut self) -> Result<(Duration, Vec<Duration>)> {
        while self.rx.try_recv().is_ok() {}
        let t0 = Instant::now();
        self.enroll(1).await?;
        let lat = self.wait_all(self.settled + 1, t0).await?;
        Ok((*lat.last().unwrap_or(&Duration::ZERO), lat))
    }

    /// `n` enrollments at once (8 in flight): time until every watcher has the last one,
    /// the enrollment rate, and the messages each watcher took for it.
    async fn burst(&mut self, n: usize) -> Result<(Duration, f64, f64)> {
        while self.rx.try_recv().is_ok() {}
        let before = self.messages.load(Ordering::Relaxed);
        let t0 = Instant::now();
        let (_, rate) = self.enroll(n).await?;
        let lat = self.wait_all(self.settled + n as u64, t0).await?;
        let per_watcher =
            (self.messages.load(Ordering::Relaxed) - before) as f64 / self.watchers.max(1) as f64;
        Ok((*lat.last().unwrap_or(&Duration::ZERO), rate, per_watcher))
    }
}

#[derive(Default, Clone)]
struct Row {
    agents: usize,
    all_p50: Duration,
    all_p99: Duration,
    all_max: Duration,
    each_p99: Duration,
    cpu_ms_per_change: f64,
    connect: Duration,
    rss_mib: f64,
    rss_per_agent_kib: f64,
    burst_all: Duration,
    burst_rate: f64,
    burst_msgs: f64,
    /// Enrollments per second while the fleet grew to `agents` with the previous watchers
    /// connected (0 for the first fleet).
    grow_rate: f64,
    /// Snapshots the connected watchers were sent again, from the growth to the burst.
    resent: u64,
}

struct Run {
    label: &'static str,
    enroll_rate_idle: f64,
    rows: Vec<Row>,
    /// Why the run stopped before the largest fleet.
    stopped: Option<String>,
    peak_mib: f64,
    /// The simulating side's own peak memory (this process), so far.
    client_peak_mib: f64,
}

async fn run_design(
    label: &'static str,
    binary: std::path::PathBuf,
    fleets: &[usize],
    changes: usize,
    burst: usize,
    cap_kib: u64,
) -> Result<Run> {
    eprintln!("== {label}: {}", binary.display());
    let tmp = tempfile::TempDir::new()?;
    let mut ctl = Controller::init_with(tmp.path(), binary)?;
    ctl.start()?;
    ctl.zone_add("bench", "100.64.0.0/10")?;
    let max = *fleets.iter().max().unwrap_or(&0);
    let tokens = tokens_for(&ctl, max + (changes + burst) * fleets.len() + 10)?;
    let pid = ctl.pid().context("controller pid")?;
    let (addr, fingerprint) = (ctl.grpc_addr(), ctl.fingerprint.clone());
    // Stops the controller once it passes the memory cap (the previous design did not
    // fit at a few thousand agents).
    let over_cap = Arc::new(AtomicBool::new(false));
    let watchdog = {
        let over_cap = over_cap.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                match rss_kib(pid) {
                    Some(r) if r > cap_kib => {
                        over_cap.store(true, Ordering::SeqCst);
                        let _ = std::process::Command::new("kill")
                            .args(["-9", &pid.to_string()])
                            .status();
                        return;
                    }
                    Some(_) => {}
                    None => return,
                }
            }
        })
    };
    let mut b = Bench::new(ctl, pid, tokens, &addr, &fingerprint, max).await?;
    let mut run = Run {
        label,
        enroll_rate_idle: 0.0,
        rows: vec![],
        stopped: None,
        peak_mib: 0.0,
        client_peak_mib: 0.0,
    };
    let result = fleets_loop(&mut b, &mut run, fleets, changes, burst).await;
    run.peak_mib = peak_kib(b.pid).unwrap_or(0) as f64 / 1024.0;
    run.client_peak_mib = peak_kib(std::process::id()).unwrap_or(0) as f64 / 1024.0;
    if let Err(e) = result {
        run.stopped = Some(if over_cap.load(Ordering::SeqCst) {
            format!("did not fit: controller passed {} MiB", cap_kib / 1024)
        } else {
            format!("failed: {e:#}")
        });
        eprintln!("{label}: {}", run.stopped.as_deref().unwrap_or(""));
    }
    watchdog.abort();
    let _ = watchdog.await;
    b.watch_tasks.abort_all();
    while b.watch_tasks.join_next().await.is_some() {}
    drop(b);
    Ok(run)
}

async fn fleets_loop(
    b: &mut Bench,
    run: &mut Run,
    fleets: &[usize],
    changes: usize,
    burst: usize,
) -> Result<()> {
    let tck = 100.0; // clock ticks per second on Linux
    for &n in fleets {
        let add = n.saturating_sub(b.watchers);
        let resent0 = b.resent.load(Ordering::Relaxed);
        let watching = b.watchers;
        let t = Instant::now();
        let (creds, rate) = b.enroll(add).await?;
        if b.watchers == 0 {
            run.enroll_rate_idle = rate;
        }
        eprintln!(
            "{}: enrolled {add} agents in {:.1} s ({rate:.0}/s, {} watchers)",
            run.label,
            t.elapsed().as_secs_f64(),
            b.watchers
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        let connect = b.connect(creds).await?;
        eprintln!(
            "{}: {n} watchers connected (own mTLS each) in {:.1} s",
            run.label,
            connect.as_secs_f64()
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        let rss_after = rss_kib(b.pid).context("controller gone")?;
        let mut row = Row {
            agents: n,
            grow_rate: if watching > 0 { rate } else { 0.0 },
            connect,
            rss_mib: rss_after as f64 / 1024.0,
            rss_per_agent_kib: rss_after as f64 / n.max(1) as f64,
            ..Default::default()
        };
        let mut all = Vec::new();
        let mut each = Vec::new();
        let cpu0 = cpu_ticks(b.pid);
        for _ in 0..changes {
            let (a, lat) = b.change().await?;
            all.push(a);
            each.extend(lat);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        row.cpu_ms_per_change =
            (cpu_ticks(b.pid) - cpu0) as f64 / tck * 1000.0 / changes.max(1) as f64;
        all.sort();
        each.sort();
        row.all_p50 = pct(&all, 0.5);
        row.all_p99 = pct(&all, 0.99);
        row.all_max = all.last().copied().unwrap_or_default();
        row.each_p99 = pct(&each, 0.99);
        let (burst_all, burst_rate, burst_msgs) = b.burst(burst).await?;
        row.burst_all = burst_all;
        row.burst_rate = burst_rate;
        row.burst_msgs = burst_msgs;
        row.resent = b.resent.load(Ordering::Relaxed) - resent0;
        eprintln!(
            "{}: {n} agents: change p99 {} ms, burst of {burst} to every watcher {} ms ({burst_rate:.0} enrollments/s, {burst_msgs:.1} messages per watcher), RSS {:.0} MiB",
            run.label,
            ms(row.all_p99),
            ms(burst_all),
            row.rss_mib
        );
        run.rows.push(row);
    }
    Ok(())
}

fn ratio(new: f64, old: Option<f64>) -> String {
    match old {
        Some(o) if o > 0.0 => format!("{:.3}x", new / o),
        _ => "-".into(),
    }
}

fn print(runs: &[Run], burst: usize) {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    println!();
    println!(
        "Watch fan-out on {cpus} CPU(s): one change (a node enrolls) until every watcher has it; a burst of {burst} enrollments; controller memory"
    );
    println!(
        "{:>8} {:>7} | {:>9} {:>9} {:>9} {:>9} | {:>8} | {:>9} {:>9} | {:>9} {:>8} {:>8} | {:>9} | {:>8} {:>7}",
        "design",
        "agents",
        "all p50",
        "all p99",
        "all max",
        "each p99",
        "ctl CPU",
        "RSS",
        "RSS/agent",
        "burst all",
        "burst",
        "msgs per",
        "connect",
        "grow",
        "snaps"
    );
    println!(
        "{:>8} {:>7} | {:>9} {:>9} {:>9} {:>9} | {:>8} | {:>9} {:>9} | {:>9} {:>8} {:>8} | {:>9} | {:>8} {:>7}",
        "",
        "",
        "ms",
        "ms",
        "ms",
        "ms",
        "ms/chg",
        "MiB",
        "KiB",
        "ms",
        "enroll/s",
        "watcher",
        "s",
        "enroll/s",
        "resent"
    );
    for run in runs {
        for r in &run.rows {
            println!(
                "{:>8} {:>7} | {:>9} {:>9} {:>9} {:>9} | {:>8.1} | {:>9.0} {:>9.0} | {:>9} {:>8.0} {:>8.1} | {:>9.1} | {:>8.0} {:>7}",
                run.label,
                r.agents,
                ms(r.all_p50),
                ms(r.all_p99),
                ms(r.all_max),
                ms(r.each_p99),
                r.cpu_ms_per_change,
                r.rss_mib,
                r.rss_per_agent_kib,
                ms(r.burst_all),
                r.burst_rate,
                r.burst_msgs,
                r.connect.as_secs_f64(),
                r.grow_rate,
                r.resent,
            );
        }
        if let Some(why) = &run.stopped {
            println!("{:>8} stopped: {why}", run.label);
        }
        println!(
            "{:>8} enrollments/s with no watcher: {:.0}; peak RSS {:.0} MiB; the simulating side's peak RSS so far {:.0} MiB",
            run.label, run.enroll_rate_idle, run.peak_mib, run.client_peak_mib
        );
    }
    println!(
        "grow: enrollments/s while the fleet grew to its size with the previous watchers connected; snaps resent: snapshots sent again to connected watchers (what they missed should come as deltas)"
    );
    let (new, prev) = (&runs[0], runs.get(1));
    println!();
    for r in &new.rows {
        let old = prev.and_then(|p| p.rows.iter().find(|o| o.agents == r.agents));
        let fit = if old.is_none() && prev.is_some() {
            " (previous design: did not fit)"
        } else {
            ""
        };
        println!(
            "{} agents{fit}: change p99 {} ms ({} of previous), RSS/agent {:.0} KiB ({} of previous), burst of {burst} {} ms ({} of previous), enrollments/s with {} watchers {:.0} = {:.2}x with none ({} of previous)",
            r.agents,
            ms(r.all_p99),
            ratio(
                r.all_p99.as_secs_f64(),
                old.map(|o| o.all_p99.as_secs_f64())
            ),
            r.rss_per_agent_kib,
            ratio(r.rss_per_agent_kib, old.map(|o| o.rss_per_agent_kib)),
            ms(r.burst_all),
            ratio(
                r.burst_all.as_secs_f64(),
                old.map(|o| o.burst_all.as_secs_f64())
            ),
            r.agents,
            r.burst_rate,
            r.burst_rate / new.enroll_rate_idle.max(1e-9),
            ratio(r.burst_rate, old.map(|o| o.burst_rate)),
        );
        if r.grow_rate > 0.0 {
            println!(
                "  growing to {} agents with the watchers connected: {:.0} enrollments/s ({} of previous), {} snapshots resent (previous: {})",
                r.agents,
                r.grow_rate,
                ratio(r.grow_rate, old.map(|o| o.grow_rate)),
                r.resent,
                old.map_or("-".to_string(), |o| o.resent.to_string()),
            );
        }
    }
    println!(
        "goals: change p99 < 1000 ms at 1,000 and < 2000 ms at 10,000; controller RSS < 2 GiB at 10,000 (< 200 KiB per agent)"
    );
}

async fn run() -> Result<()> {
    let smoke = std::env::var("SMOKE").is_ok_and(|v| v == "1");
    if std::env::var("TWO_ON_ETCD").is_ok_and(|v| v == "1") {
        return two_on_etcd(smoke).await;
    }
    let fleets: Vec<usize> = std::env::var("FLEETS")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| {
            if smoke {
                vec![10, 50]
            } else {
                vec![1000, 3000, 10_000]
            }
        });
    let changes = env_usize("CHANGES", if smoke { 5 } else { 20 });
    let burst = env_usize("BURST", if smoke { 10 } else { 100 });
    let cap_kib = env_usize("MEM_CAP_MIB", 8192) as u64 * 1024;
    let mut runs =
        vec![run_design("new", controller_bin(), &fleets, changes, burst, cap_kib).await?];
    if let Some(prev) = prev_controller_bin().filter(|_| !smoke) {
        runs.push(run_design("previous", prev, &fleets, changes, burst, cap_kib).await?);
    }
    print(&runs, burst);
    if let Some(why) = &runs[0].stopped {
        anyhow::bail!("the new design's run stopped: {why}");
    }
    Ok(())
}

// Two controllers on etcd (`TWO_ON_ETCD=1`).

/// What one run of the two-controller mode measured at one fleet size.
struct TwoRow {
    agents: usize,
    enroll_rate_idle: f64,
    all_p50: Duration,
    all_p99: Duration,
    all_max: Duration,
    each_p99: Duration,
    /// p99 of the watchers of A and of B alone (B learns each change from etcd).
    each_p99_a: Duration,
    each_p99_b: Duration,
    connect: Duration,
}

impl Bench {
    /// One change (a node enrolls): the time until every watcher has it, and each
    /// watcher's delivery latency with its index.
    async fn change_by_watcher(&mut self) -> Result<(Duration, Vec<(usize, Duration)>)> {
        while self.rx.try_recv().is_ok() {}
        let t0 = Instant::now();
        self.enroll(1).await?;
        let target = self.settled + 1;
        let lat = self.deliveries(target, t0).await?;
        let all = lat.iter().map(|l| l.1).max().unwrap_or_default();
        Ok((all, lat))
    }
}

/// `TWO_ON_ETCD=1`: the same change's p99 with two controllers (A and B, `serve --store
/// etcd://...` on one three-member etcd cluster on loopback) and the watchers split over
/// them, every change made through A; next to one controller on sled at the same fleet in
/// the same run. `FLEETS` (default 1,000; 100 with `SMOKE=1`) and `CHANGES` as above.
async fn two_on_etcd(smoke: bool) -> Result<()> {
    if !zonemesh_tests::etcd::available() {
        anyhow::bail!("TWO_ON_ETCD=1 needs etcd and etcdctl (Debian etcd-server, etcd-client)");
    }
    let fleets: Vec<usize> = std::env::var("FLEETS")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![if smoke { 100 } else { 1000 }]);
    let changes = env_usize("CHANGES", if smoke { 5 } else { 20 });
    let burst = env_usize("BURST", if smoke { 10 } else { 100 });
    let cap_kib = env_usize("MEM_CAP_MIB", 8192) as u64 * 1024;
    let mut rows = Vec::new();
    for &n in &fleets {
        let sled = run_design("sled", controller_bin(), &[n], changes, burst, cap_kib).await?;
        if let Some(why) = &sled.stopped {
            anyhow::bail!("one controller on sled at {n}: {why}");
        }
        let two = run_two_on_etcd(controller_bin(), n, changes).await?;
        rows.push((sled, two));
    }
    print_two(&rows, changes);
    Ok(())
}

/// Controllers A and B on one three-member etcd cluster, `n` agents enrolled through A,
/// half watching A and half B; `changes` enrollments through A, each timed until every
/// watcher (on both) has it.
async fn run_two_on_etcd(binary: std::path::PathBuf, n: usize, changes: usize) -> Result<TwoRow> {
    eprintln!("== two on etcd: {}", binary.display());
    let tmp = tempfile::TempDir::new()?;
    let etcd = zonemesh_tests::etcd::Etcd::start(tmp.path(), 3)?;
    let url = etcd.store_url();
    let (dir_a, dir_b) = (tmp.path().join("a"), tmp.path().join("b"));
    std::fs::create_dir_all(&dir_a)?;
    std::fs::create_dir_all(&dir_b)?;
    let mut a = Controller::init_args(&dir_a, binary.clone(), &["--store", &url])?;
    let fingerprint = a.fingerprint.clone();
    a.start()?;
    zonemesh_tests::cluster::copy_secrets(&dir_a.join("ctl"), &dir_b.join("ctl2"))?;
    let mut b = Controller::existing(&dir_b, dir_b.join("ctl2"), fingerprint.clone());
    b.binary = binary;
    b.serve_args = vec!["--store".into(), url];
    b.start()?;
    a.zone_add("bench", "100.64.0.0/10")?;
    let tokens = tokens_for(&a, n + changes + 10)?;
    let (addr_a, addr_b) = (a.grpc_addr(), b.grpc_addr());
    let pid = a.pid().context("controller pid")?;
    let mut bench = Bench::new(a, pid, tokens, &addr_a, &fingerprint, n).await?;
    let result = two_on_etcd_loop(&mut bench, &addr_a, &addr_b, n, changes).await;
    bench.watch_tasks.abort_all();
    while bench.watch_tasks.join_next().await.is_some() {}
    drop(bench);
    drop(b);
    drop(etcd);
    result
}

async fn two_on_etcd_loop(
    b: &mut Bench,
    addr_a: &str,
    addr_b: &str,
    n: usize,
    changes: usize,
) -> Result<TwoRow> {
    let t = Instant::now();
    let (mut creds, rate) = b.enroll(n).await?;
    eprintln!(
        "two on etcd: enrolled {n} agents through A in {:.1} s ({rate:.0}/s)",
        t.elapsed().as_secs_f64()
    );
    let on_b = creds.split_off(n / 2);
    let connect = b.connect_at(addr_a.to_string(), creds).await?
        + b.connect_at(addr_b.to_string(), on_b).await?;
    eprintln!(
        "two on etcd: {} watchers on A and {} on B connected in {:.1} s",
        n / 2,
        n - n / 2,
        connect.as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (mut all, mut each, mut each_a, mut each_b) = (vec![], vec![], vec![], vec![]);
    for _ in 0..changes {
        let (a, lat) = b.change_by_watcher().await?;
        all.push(a);
        for (w, d) in lat {
            each.push(d);
            // Watchers 0..n/2 watch A, the rest B (in the order they connected).
            if w < n / 2 {
                each_a.push(d)
            } else {
                each_b.push(d)
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for v in [&mut all, &mut each, &mut each_a, &mut each_b] {
        v.sort();
    }
    let row = TwoRow {
        agents: n,
        enroll_rate_idle: rate,
        all_p50: pct(&all, 0.5),
        all_p99: pct(&all, 0.99),
        all_max: all.last().copied().unwrap_or_default(),
        each_p99: pct(&each, 0.99),
        each_p99_a: pct(&each_a, 0.99),
        each_p99_b: pct(&each_b, 0.99),
        connect,
    };
    eprintln!("two on etcd: {n} agents: change p99 {} ms", ms(row.all_p99));
    Ok(row)
}

fn print_two(rows: &[(Run, TwoRow)], changes: usize) {
    println!();
    println!(
        "One change (a node enrolls) until every watcher has it, {changes} changes: one controller on sled vs two controllers on a three-member etcd (watchers split over A and B, changes through A)"
    );
    println!(
        "{:>12} {:>7} | {:>9} {:>9} {:>9} {:>9} | {:>9} | {:>9}",
        "design", "agents", "all p50", "all p99", "all max", "each p99", "enroll/s", "connect"
    );
    println!(
        "{:>12} {:>7} | {:>9} {:>9} {:>9} {:>9} | {:>9} | {:>9}",
        "", "", "ms", "ms", "ms", "ms", "no watch", "s"
    );
    for (sled, two) in rows {
        for r in &sled.rows {
            println!(
                "{:>12} {:>7} | {:>9} {:>9} {:>9} {:>9} | {:>9.0} | {:>9.1}",
                "1 on sled",
                r.agents,
                ms(r.all_p50),
                ms(r.all_p99),
                ms(r.all_max),
                ms(r.each_p99),
                sled.enroll_rate_idle,
                r.connect.as_secs_f64()
            );
        }
        println!(
            "{:>12} {:>7} | {:>9} {:>9} {:>9} {:>9} | {:>9.0} | {:>9.1}",
            "2 on etcd",
            two.agents,
            ms(two.all_p50),
            ms(two.all_p99),
            ms(two.all_max),
            ms(two.each_p99),
            two.enroll_rate_idle,
            two.connect.as_secs_f64()
        );
        println!(
            "{:>12} {:>7} | each p99 of A's watchers {} ms, of B's watchers {} ms (B follows etcd's change log)",
            "",
            "",
            ms(two.each_p99_a),
            ms(two.each_p99_b)
        );
        let old = sled.rows.first().map(|r| r.all_p99.as_secs_f64());
        println!(
            "{} agents: change p99 with two controllers on etcd {} ms ({} of one on sled); enrollments/s on etcd {:.0} ({} of sled)",
            two.agents,
            ms(two.all_p99),
            ratio(two.all_p99.as_secs_f64(), old),
            two.enroll_rate_idle,
            ratio(two.enroll_rate_idle, Some(sled.enroll_rate_idle)),
        );
    }
    println!("goal: change p99 < 1000 ms at 1,000 agents");
}

fn main() -> Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        // The simulated watchers stand for machines of their own: their receiving runs
        // at the agents' niceness, so it does not take the CPU from the controller's
        // main runtime or from the enrolling side (the figures are the controller's).
        .on_thread_start(|| {
            if let Err(e) = zonemesh_controller::agent_rt::lower_priority() {
                eprintln!("watchers keep the bench's priority: {e:?}");
            }
        })
        .enable_all()
        .build()?
        .block_on(run())
}
