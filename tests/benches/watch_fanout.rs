//! Watch fan-out: N simulated agents, each with its own certificate and its own mutual-TLS
//! connection, hold Watch streams against a real controller on loopback. One change (a node
//! enrolls) is timed until every watcher has the delta; repeated, at two fleet sizes, with
//! the controller's memory per connected agent.
//!
//! Anchor measured in the same run: a full-map push (every watcher re-fetches the whole
//! mesh, which is what a controller that recomputes the map per change — headscale — has
//! to send). Field anchor: NetBird reports 1.5–3 s API latency at 500 peers.
//!
//! `SMOKE=1` runs 10 and 50 agents in well under a minute (CI). `FLEETS=100,1000` and
//! `CHANGES=20` set the full run; `ZONEMESH_CONTROLLER_BIN` picks the controller binary
//! (default: `target/release/zonemesh-controller` if built, else the debug one).

use anyhow::{Context, Result};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use zonemesh_proto as pb;
use zonemesh_tests::cluster::{
    Controller, NodeCreds, enroll_rpc, enrollment_channel, mesh_channel, rss_kib, wg_key,
};
use zonemesh_tests::{rsa4096, target_dir};

const KEY_POOL: usize = 4;
const MAX_SNAPSHOT: usize = 256 << 20;

struct Delivery {
    version: u64,
    at: Instant,
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

struct Bench {
    ctl: Controller,
    token: String,
    keys: Vec<Arc<rcgen::KeyPair>>,
    enroll_chans: Vec<tonic::transport::Channel>,
    enrolled: usize,
    creds: Vec<NodeCreds>,
    channels: Vec<tonic::transport::Channel>,
    tx: mpsc::UnboundedSender<Delivery>,
    rx: mpsc::UnboundedReceiver<Delivery>,
}

impl Bench {
    /// Enroll `n` more agents over the Enrollment RPC (8 in flight).
    async fn enroll(&mut self, n: usize) -> Result<Vec<NodeCreds>> {
        let chans = self.enroll_chans.clone();
        let keys = self.keys.clone();
        let start = self.enrolled;
        self.enrolled += n;
        let token = self.token.clone();
        use futures::StreamExt;
        let out: Vec<Result<(NodeCreds, pb::EnrollResponse), tonic::Status>> =
            futures::stream::iter(start..start + n)
                .map(|i| {
                    let ch = chans[i % chans.len()].clone();
                    let key = keys[i % keys.len()].clone();
                    let token = token.clone();
                    async move {
                        tokio::spawn(async move {
                            enroll_rpc(ch, &token, &format!("a{i}"), &key, wg_key(i as u64 + 1))
                                .await
                        })
                        .await
                        .unwrap()
                    }
                })
                .buffer_unordered(8)
                .collect()
                .await;
        let mut creds = Vec::with_capacity(n);
        for r in out {
            creds.push(r.map_err(|s| anyhow::anyhow!("enroll: {s}"))?.0);
        }
        Ok(creds)
    }

    /// Connect `creds` as watchers (own TLS connection each, 16 in flight); returns once
    /// every one has its snapshot.
    async fn connect(&mut self, creds: Vec<NodeCreds>) -> Result<Duration> {
        use futures::StreamExt;
        let addr = self.ctl.grpc_addr();
        let t = Instant::now();
        let results: Vec<Result<tonic::transport::Channel>> = futures::stream::iter(creds.iter())
            .map(|c| {
                let (addr, c, tx) = (addr.clone(), c.clone(), self.tx.clone());
                async move {
                    let ch = mesh_channel(&addr, &c).await?;
                    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
                    let ch2 = ch.clone();
                    tokio::spawn(async move {
                        let mut s = match pb::mesh_client::MeshClient::new(ch2)
                            .max_decoding_message_size(MAX_SNAPSHOT)
                            .watch(pb::WatchRequest::default())
                            .await
                        {
                            Ok(s) => s.into_inner(),
                            Err(e) => {
                                let _ = ready_tx.send(Err(anyhow::anyhow!("watch: {e}")));
                                return;
                            }
                        };
                        match s.message().await {
                            Ok(Some(_snapshot)) => {
                                let _ = ready_tx.send(Ok(()));
                            }
                            other => {
                                let _ = ready_tx.send(Err(anyhow::anyhow!("snapshot: {other:?}")));
                                return;
                            }
                        }
                        while let Ok(Some(u)) = s.message().await {
                            let _ = tx.send(Delivery {
                                version: u.version,
                                at: Instant::now(),
                            });
                        }
                    });
                    ready_rx.await.context("watcher task died")??;
                    Ok(ch)
                }
            })
            .buffer_unordered(16)
            .collect()
            .await;
        for r in results {
            self.channels.push(r?);
        }
        self.creds.extend(creds);
        Ok(t.elapsed())
    }

    /// One change (a new node enrolls); returns (time until every watcher has it, each
    /// watcher's delivery latency).
    async fn change(&mut self, watchers: usize) -> Result<(Duration, Vec<Duration>)> {
        while self.rx.try_recv().is_ok() {}
        let t0 = Instant::now();
        let _new = self.enroll(1).await?;
        let mut lat = Vec::with_capacity(watchers);
        let mut version = None;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while lat.len() < watchers {
            let d = tokio::time::timeout_at(deadline, self.rx.recv())
                .await
                .context("watchers did not all get the change within 60 s")?
                .context("delivery channel closed")?;
            let v = *version.get_or_insert(d.version);
            if d.version == v {
                lat.push(d.at - t0);
            }
        }
        lat.sort();
        Ok((*lat.last().unwrap(), lat))
    }

    /// The in-run anchor: every watcher fetches the whole map again (a fresh snapshot over
    /// its existing connection), as a recompute-the-map-per-change design must send.
    async fn full_map_push(&self) -> Result<(Duration, usize)> {
        let t = Instant::now();
        let sizes: Vec<usize> = futures::future::try_join_all(self.channels.iter().map(|ch| {
            let ch = ch.clone();
            async move {
                let mut s = pb::mesh_client::MeshClient::new(ch)
                    .max_decoding_message_size(MAX_SNAPSHOT)
                    .watch(pb::WatchRequest::default())
                    .await?
                    .into_inner();
                let snap = s.message().await?.context("no snapshot")?;
                Ok::<_, anyhow::Error>(prost::Message::encoded_len(&snap))
            }
        }))
        .await?;
        Ok((t.elapsed(), sizes.first().copied().unwrap_or(0)))
    }
}

struct Row {
    agents: usize,
    changes: usize,
    all_p50: Duration,
    all_p99: Duration,
    all_max: Duration,
    each_p50: Duration,
    each_p99: Duration,
    cpu_ms_per_change: f64,
    rss_per_agent_kib: f64,
    full_map: Duration,
    snapshot_bytes: usize,
}

async fn run() -> Result<()> {
    let smoke = std::env::var("SMOKE").is_ok_and(|v| v == "1");
    let fleets: Vec<usize> = std::env::var("FLEETS")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| if smoke { vec![10, 50] } else { vec![100, 1000] });
    let changes = env_usize("CHANGES", if smoke { 5 } else { 20 });
    let tmp = tempfile::TempDir::new()?;
    let binary = controller_bin();
    eprintln!("controller: {}", binary.display());
    let mut ctl = Controller::init_with(tmp.path(), binary)?;
    ctl.start()?;
    ctl.zone_add("bench", "100.64.0.0/10")?;
    let max = *fleets.iter().max().unwrap_or(&0);
    let token = ctl.token("bench", (max + changes * fleets.len() + 10) as u32)?;
    let pid = ctl.pid().context("controller pid")?;
    let (addr, fingerprint) = (ctl.grpc_addr(), ctl.fingerprint.clone());
    let (tx, rx) = mpsc::unbounded_channel();
    let mut b = Bench {
        ctl,
        token,
        keys: (0..KEY_POOL).map(|i| Arc::new(rsa4096(i))).collect(),
        enroll_chans: futures::future::try_join_all(
            (0..4).map(|_| enrollment_channel(&addr, &fingerprint)),
        )
        .await?,
        enrolled: 0,
        creds: vec![],
        channels: vec![],
        tx,
        rx,
    };
    let tck = 100.0; // clock ticks per second on Linux
    let mut rows = Vec::new();
    let rss_base = rss_kib(pid).unwrap_or(0);
    let mut prev_rss = rss_base;
    let mut prev_agents = 0usize;
    for &n in &fleets {
        let add = n.saturating_sub(b.creds.len());
        let t = Instant::now();
        let creds = b.enroll(add).await?;
        eprintln!(
            "enrolled {add} agents in {:.1} s ({:.0}/s)",
            t.elapsed().as_secs_f64(),
            add as f64 / t.elapsed().as_secs_f64()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rss_before = rss_kib(pid).unwrap_or(0);
        let took = b.connect(creds).await?;
        eprintln!(
            "{n} watchers connected (own mTLS each) in {:.1} s",
            took.as_secs_f64()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        let rss_after = rss_kib(pid).unwrap_or(0);
        let rss_per_agent_kib =
            (rss_after.saturating_sub(rss_before)) as f64 / (n - prev_agents).max(1) as f64;
        prev_rss = prev_rss.max(rss_after);
        prev_agents = n;

        let mut all = Vec::new();
        let mut each = Vec::new();
        let cpu0 = cpu_ticks(pid);
        for _ in 0..changes {
            let (a, lat) = b.change(n).await?;
            all.push(a);
            each.extend(lat);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let cpu_ms_per_change = (cpu_ticks(pid) - cpu0) as f64 / tck * 1000.0 / changes as f64;
        all.sort();
        each.sort();
        let (full_map, snapshot_bytes) = b.full_map_push().await?;
        rows.push(Row {
            agents: n,
            changes,
            all_p50: pct(&all, 0.5),
            all_p99: pct(&all, 0.99),
            all_max: *all.last().unwrap(),
            each_p50: pct(&each, 0.5),
            each_p99: pct(&each, 0.99),
            cpu_ms_per_change,
            rss_per_agent_kib,
            full_map,
            snapshot_bytes,
        });
    }
    let rss_total = rss_kib(pid).unwrap_or(0);

    println!();
    println!(
        "Watch fan-out: one change (a node enrolls) until every watcher has the delta; {} CPU(s), controller {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        if b.ctl.binary.to_string_lossy().contains("/release/") {
            "release"
        } else {
            "debug"
        }
    );
    println!(
        "{:>7} {:>7} | {:>9} {:>9} {:>9} | {:>9} {:>9} | {:>9} | {:>9} | {:>11} {:>9} | {:>9}",
        "agents",
        "changes",
        "all p50",
        "all p99",
        "all max",
        "each p50",
        "each p99",
        "ctl CPU",
        "RSS/agent",
        "full-map",
        "snapshot",
        "p99 vs"
    );
    println!(
        "{:>7} {:>7} | {:>9} {:>9} {:>9} | {:>9} {:>9} | {:>9} | {:>9} | {:>11} {:>9} | {:>9}",
        "", "", "ms", "ms", "ms", "ms", "ms", "ms/chg", "KiB", "push ms", "KiB", "full-map"
    );
    for r in &rows {
        println!(
            "{:>7} {:>7} | {:>9} {:>9} {:>9} | {:>9} {:>9} | {:>9.1} | {:>9.0} | {:>11} {:>9} | {:>8.3}x",
            r.agents,
            r.changes,
            ms(r.all_p50),
            ms(r.all_p99),
            ms(r.all_max),
            ms(r.each_p50),
            ms(r.each_p99),
            r.cpu_ms_per_change,
            r.rss_per_agent_kib,
            ms(r.full_map),
            r.snapshot_bytes / 1024,
            r.all_p99.as_secs_f64() / r.full_map.as_secs_f64().max(1e-9),
        );
    }
    println!();
    for r in &rows {
        println!(
            "{} agents: p99 {} ms = {:.3}x NetBird's reported 1.5 s API latency at 500 peers (goal: p99 < 1000 ms at 1,000)",
            r.agents,
            ms(r.all_p99),
            r.all_p99.as_secs_f64() / 1.5
        );
    }
    if rows.len() >= 2 {
        let (a, z) = (&rows[0], &rows[rows.len() - 1]);
        println!(
            "fleet x{:.0}: p50 x{:.2}, controller CPU per change x{:.2}, CPU per delivered delta x{:.2}",
            z.agents as f64 / a.agents as f64,
            z.all_p50.as_secs_f64() / a.all_p50.as_secs_f64().max(1e-9),
            z.cpu_ms_per_change / a.cpu_ms_per_change.max(1e-9),
            (z.cpu_ms_per_change / z.agents as f64)
                / (a.cpu_ms_per_change / a.agents as f64).max(1e-12),
        );
    }
    println!(
        "controller RSS: {} MiB idle before agents, {} MiB with {} agents",
        rss_base / 1024,
        rss_total / 1024,
        b.creds.len()
    );
    drop(b);
    Ok(())
}

fn main() -> Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(run())
}
