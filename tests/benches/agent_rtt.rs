//! The agent's packet path during a large mesh update: ping RTT through a real tunnel
//! between two agents in network namespaces (a controller and `scripts/mesh-lab.sh`'s
//! underlay), first idle, then while `PEERS` nodes enroll at once so that both agents apply
//! that many new peers. Printed per agent build: RTT p50/p99 idle and during the update,
//! replies lost, how long the agent took to hold every peer, and the ratios between builds.
//!
//! Lost replies count as 1 s (ping's `-W 1`) in the percentiles: a stalled packet path shows
//! up as loss as well as latency.
//!
//! `BUILDS=label=DIR,label=DIR` names directories holding `zonemesh-controller` and
//! `zonemesh-agent` (default: this target directory's release build if built, else debug).
//! The first build listed is the anchor of the ratios. `scripts/bench-agent-rtt.sh` adds the
//! code before the agent runtime split (its own worktree, release) with `FULL_BENCH=1`.
//! `PEERS` (default 2000, `SMOKE=1`: 200), `CONCURRENCY` (enrollments in flight, 8).
//! Root only (namespaces, TUN); prints `skipped: ...` otherwise.

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use zonemesh_proto as pb;
use zonemesh_tests::cluster::{enrollment_channel, signal, wg_key};
use zonemesh_tests::{is_root, rsa4096, target_dir};

const KEY_POOL: usize = 4;
const PFX: &str = "zmr";
const PING_INTERVAL: &str = "0.01";
const LOST_AS_MS: f64 = 1000.0;
/// How long one build may take to hold every peer before the run is reported as such.
const APPLY_TIMEOUT: Duration = Duration::from_secs(600);

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn lab_dir() -> PathBuf {
    PathBuf::from(format!("/tmp/zonemesh-lab-{PFX}"))
}

fn lab(bin: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(repo().join("scripts/mesh-lab.sh"))
        .args(args)
        .env("PFX", PFX)
        .env("DIR", lab_dir())
        .env("LAB_ZONES", "a b")
        .env("LAB_NODES", "1")
        .env("BIN", bin)
        .output()
        .context("mesh-lab.sh")?;
    if !out.status.success() {
        bail!(
            "mesh-lab.sh {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn ctl(bin: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(bin.join("zonemesh-controller"))
        .arg("--data-dir")
        .arg(lab_dir().join("ctl"))
        .args(args)
        .output()?;
    if !out.status.success() {
        bail!(
            "controller {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Peers the agent of `node` holds, by its status socket.
fn agent_peers(bin: &Path, node: &str) -> Option<usize> {
    let out = Command::new("ip")
        .args(["netns", "exec", &format!("{PFX}-{node}")])
        .arg(bin.join("zonemesh-agent"))
        .arg("status")
        .arg("--state-dir")
        .arg(lab_dir().join(node))
        .arg("--json")
        .output()
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v["peers"].as_array().map(Vec::len)
}

/// Ping replies as read: (sequence number, RTT in ms, when read).
#[derive(Default)]
struct Pings {
    replies: Vec<(u64, f64, Instant)>,
}

struct Pinger {
    child: Killed,
    pings: Arc<Mutex<Pings>>,
    reader: std::thread::JoinHandle<()>,
    started: Instant,
}

/// A child process killed when dropped (an early return leaves nothing running).
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_ping(from: &str, to: &str) -> Result<Pinger> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", &format!("{PFX}-{from}"), "ping", "-n"])
        .args(["-i", PING_INTERVAL, "-W", "1", to])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("ping")?;
    let out = child.stdout.take().context("ping stdout")?;
    let pings = Arc::new(Mutex::new(Pings::default()));
    let sink = pings.clone();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let field = |name: &str| {
                line.split_whitespace()
                    .find_map(|w| w.strip_prefix(name).map(str::to_owned))
            };
            if let (Some(seq), Some(ms)) = (field("icmp_seq="), field("time="))
                && let (Ok(seq), Ok(ms)) = (seq.parse::<u64>(), ms.parse::<f64>())
            {
                sink.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .replies
                    .push((seq, ms, Instant::now()));
            }
        }
    });
    Ok(Pinger {
        child: Killed(child),
        pings,
        reader,
        started: Instant::now(),
    })
}

/// RTTs in ms of the pings sent within `[from, to)`, lost ones as [`LOST_AS_MS`]; and
/// how many were lost. A reply was sent its RTT before it was read; a lost ping is placed
/// after the last reply before it, one interval per sequence number.
fn window(pings: &Pings, from: Instant, to: Instant) -> (Vec<f64>, usize) {
    let interval = Duration::from_secs_f64(PING_INTERVAL.parse::<f64>().unwrap_or(0.01));
    let mut by_seq = std::collections::BTreeMap::new();
    for (seq, ms, read) in &pings.replies {
        by_seq.insert(*seq, (*ms, *read - Duration::from_secs_f64(ms / 1000.0)));
    }
    let (Some(&first), Some(&last)) = (by_seq.keys().next(), by_seq.keys().next_back()) else {
        return (vec![], 0);
    };
    let mut rtts = Vec::new();
    let mut lost = 0;
    let mut prev: Option<(u64, Instant)> = None;
    for seq in first..=last {
        let (ms, sent, was_lost) = match by_seq.get(&seq) {
            Some(&(ms, sent)) => {
                prev = Some((seq, sent));
                (ms, sent, false)
            }
            None => {
                let (p, at) = prev.unwrap_or((seq, from));
                (LOST_AS_MS, at + interval * (seq - p) as u32, true)
            }
        };
        if sent < from || sent >= to {
            continue;
        }
        lost += usize::from(was_lost);
        rtts.push(ms);
    }
    (rtts, lost)
}

fn pct(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s[((s.len() - 1) as f64 * q).round() as usize]
}

struct Figures {
    label: String,
    idle_p50: f64,
    idle_p99: f64,
    idle_lost: usize,
    idle_n: usize,
    upd_p50: f64,
    upd_p99: f64,
    upd_max: f64,
    upd_lost: usize,
    upd_n: usize,
    enrolled_in: Duration,
    applied_in: Option<Duration>,
    /// New peers the agent held when the wait ended.
    held: usize,
}

fn measure(label: &str, bin: &Path, peers: usize, concurrency: usize) -> Result<Figures> {
    let _ = lab(bin, &["down"]);
    lab(bin, &["up"])?;
    let result = measure_up(label, bin, peers, concurrency);
    let _ = lab(bin, &["down"]);
    result
}

fn measure_up(label: &str, bin: &Path, peers: usize, concurrency: usize) -> Result<Figures> {
    let dir = lab_dir();
    let fingerprint = std::fs::read_to_string(dir.join("fingerprint"))?
        .trim()
        .to_string();
    let b1 = lab(bin, &["overlay", "b1"])?;
    // The tunnel is up when a1 reaches b1 through it.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ok = Command::new("ip")
            .args([
                "netns",
                "exec",
                &format!("{PFX}-a1"),
                "ping",
                "-c1",
                "-W1",
                &b1,
            ])
            .stdout(Stdio::null())
            .status()?
            .success();
        if ok {
            break;
        }
        if Instant::now() > deadline {
            bail!("{label}: no ping a1 -> b1 ({b1}) within 60 s");
        }
    }
    ctl(bin, &["zone", "add", "zone-x", "--cidr", "100.64.32.0/19"])?;
    let token = ctl(
        bin,
        &[
            "token",
            "create",
            "--zone",
            "zone-x",
            "--ttl",
            "30m",
            "--uses",
            &peers.to_string(),
        ],
    )?
    .lines()
    .last()
    .context("no token")?
    .trim()
    .to_string();

    // The enrolling client runs on the controller's underlay (its own process in the hub
    // namespace) and signs every CSR before the clock starts.
    let flood = Command::new("ip")
        .args(["netns", "exec", &format!("{PFX}-hub")])
        .arg(std::env::current_exe()?)
        .args([
            "flood",
            "198.18.100.1:7443",
            &fingerprint,
            &token,
            &peers.to_string(),
            &concurrency.to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut flood = Killed(flood);
    let mut flood_out = BufReader::new(flood.0.stdout.take().context("flood stdout")?);
    let mut line = String::new();
    flood_out.read_line(&mut line)?;
    if line.trim() != "ready" {
        bail!("{label}: enrollment client: {line:?}");
    }

    let pinger = start_ping("a1", &b1)?;
    let idle_secs = if std::env::var("SMOKE").as_deref() == Ok("1") {
        3
    } else {
        10
    };
    std::thread::sleep(Duration::from_secs(idle_secs));
    let idle_from = pinger.started + Duration::from_millis(500);
    let t0 = Instant::now();
    flood
        .0
        .stdin
        .take()
        .context("flood stdin")?
        .write_all(b"go\n")?;
    line.clear();
    flood_out.read_line(&mut line)?;
    let enrolled_in = t0.elapsed();
    let status = flood.0.wait()?;
    if !status.success() || line.trim() != "done" {
        bail!("{label}: enrollment flood failed: {line:?}");
    }
    let mut applied_in = None;
    let mut held = 0;
    while t0.elapsed() < APPLY_TIMEOUT {
        // b1 and every enrolled node.
        held = agent_peers(bin, "a1").unwrap_or(held);
        if held > peers {
            applied_in = Some(t0.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let t1 = Instant::now();
    // A second after the last peer, with its replies back.
    std::thread::sleep(Duration::from_millis(1500));
    let mut ping = pinger.child;
    signal(ping.0.id(), "INT");
    let _ = ping.0.wait();
    let _ = pinger.reader.join();
    let pings = pinger.pings.lock().unwrap_or_else(|e| e.into_inner());
    let (idle, idle_lost) = window(&pings, idle_from, t0);
    let (upd, upd_lost) = window(&pings, t0, t1 + Duration::from_millis(500));
    Ok(Figures {
        label: label.to_string(),
        idle_p50: pct(&idle, 0.5),
        idle_p99: pct(&idle, 0.99),
        idle_lost,
        idle_n: idle.len(),
        upd_p50: pct(&upd, 0.5),
        upd_p99: pct(&upd, 0.99),
        upd_max: upd.iter().copied().fold(0.0, f64::max),
        upd_lost,
        upd_n: upd.len(),
        enrolled_in,
        applied_in,
        held: held.saturating_sub(1),
    })
}

/// The enrolling client: `flood ADDR FINGERPRINT TOKEN COUNT CONCURRENCY`. Prints `ready`
/// once every CSR is signed, enrolls all on `go`, then prints `done`.
fn flood(args: &[String]) -> Result<()> {
    let [addr, fingerprint, token, count, concurrency] = args else {
        bail!("flood ADDR FINGERPRINT TOKEN COUNT CONCURRENCY");
    };
    let count: usize = count.parse()?;
    let concurrency: usize = concurrency.parse()?;
    let keys: Vec<_> = (0..KEY_POOL).map(rsa4096).collect();
    let requests: Vec<pb::EnrollRequest> = (0..count)
        .map(|i| {
            let name = format!("x{i}");
            Ok(pb::EnrollRequest {
                token: token.clone(),
                csr_der: zonemesh_agent::control::enroll::csr_for(&keys[i % KEY_POOL], &name)?,
                wg_public_key: wg_key(1_000_000 + i as u64).to_vec(),
                endpoints: vec![],
                node_name: name,
                zone: String::new(),
            })
        })
        .collect::<Result<_>>()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    println!("ready");
    std::io::stdout().flush()?;
    let mut go = String::new();
    std::io::stdin().read_line(&mut go)?;
    rt.block_on(async {
        let channel = enrollment_channel(addr, fingerprint).await?;
        let mut results = futures::stream::iter(requests)
            .map(|req| {
                let mut client = pb::enrollment_client::EnrollmentClient::new(channel.clone());
                async move { client.enroll(req).await }
            })
            .buffer_unordered(concurrency);
        while let Some(r) = results.next().await {
            r.context("enroll")?;
        }
        anyhow::Ok(())
    })?;
    println!("done");
    Ok(())
}

fn builds() -> Vec<(String, PathBuf)> {
    if let Ok(list) = std::env::var("BUILDS") {
        return list
            .split(',')
            .filter_map(|b| b.split_once('='))
            .map(|(l, d)| (l.to_string(), PathBuf::from(d)))
            .collect();
    }
    let release = target_dir().join("release");
    let dir = if release.join("zonemesh-agent").exists() {
        release
    } else {
        target_dir().join("debug")
    };
    vec![("current".into(), dir)]
}

fn secs(d: Option<Duration>) -> String {
    d.map_or("not within 600 s".into(), |d| {
        format!("{:.1} s", d.as_secs_f64())
    })
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("flood") {
        return flood(&args[1..]);
    }
    if !is_root() {
        println!("skipped: agent RTT benchmark needs root (network namespaces, TUN)");
        return Ok(());
    }
    for tool in ["ip", "ping"] {
        if Command::new("which")
            .arg(tool)
            .stdout(Stdio::null())
            .status()
            .map_or(true, |s| !s.success())
        {
            println!("skipped: {tool} not installed");
            return Ok(());
        }
    }
    let smoke = std::env::var("SMOKE").as_deref() == Ok("1");
    let peers = env_usize("PEERS", if smoke { 200 } else { 2000 });
    let concurrency = env_usize("CONCURRENCY", 8);
    println!(
        "== agent RTT during a {peers}-peer update ({} cores, ping every {PING_INTERVAL} s a1 -> b1 through the tunnel)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let mut all = Vec::new();
    for (label, dir) in builds() {
        println!("-- {label}: {}", dir.display());
        let f = measure(&label, &dir, peers, concurrency)?;
        println!(
            "   idle p50 {:.3} ms p99 {:.3} ms ({} lost of {}); during update p50 {:.3} ms p99 {:.3} ms max {:.1} ms ({} lost of {}); enrolled in {:.1} s, agent held every peer after {} ({} of {peers} new peers at the end)",
            f.idle_p50,
            f.idle_p99,
            f.idle_lost,
            f.idle_n,
            f.upd_p50,
            f.upd_p99,
            f.upd_max,
            f.upd_lost,
            f.upd_n,
            f.enrolled_in.as_secs_f64(),
            secs(f.applied_in),
            f.held
        );
        all.push(f);
    }
    println!(
        "\n{:<10} {:>6} {:>10} {:>10} {:>12} {:>12} {:>10} {:>11} {:>14}",
        "build",
        "peers",
        "idle p50",
        "idle p99",
        "update p50",
        "update p99",
        "lost",
        "p99 upd/idle",
        "all peers in"
    );
    for f in &all {
        println!(
            "{:<10} {:>6} {:>8.3}ms {:>8.3}ms {:>10.3}ms {:>10.3}ms {:>10} {:>11.1}x {:>14}",
            f.label,
            peers,
            f.idle_p50,
            f.idle_p99,
            f.upd_p50,
            f.upd_p99,
            format!("{}/{}", f.upd_lost, f.upd_n),
            f.upd_p99 / f.idle_p99,
            secs(f.applied_in)
        );
    }
    if let [anchor, rest @ ..] = all.as_slice() {
        for f in rest {
            println!(
                "ratio {}/{} (anchor measured in this run): update p50 {:.3}, update p99 {:.3}, idle p99 {:.3}",
                f.label,
                anchor.label,
                f.upd_p50 / anchor.upd_p50,
                f.upd_p99 / anchor.upd_p99,
                f.idle_p99 / anchor.idle_p99
            );
        }
    }
    Ok(())
}
