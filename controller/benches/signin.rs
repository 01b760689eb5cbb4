//! Sign-in cost over real HTTPS, next to the raw Argon2id time of the `argon2` CLI (Debian
//! package `argon2`) with the same parameters, measured in the same run; and the health
//! endpoint's latency during a flood of wrong sign-ins.
//!
//! Run: `cargo bench -p zonemesh-controller --bench signin` (or, without a release build,
//! `cargo test -p zonemesh-controller --bench signin`: dependencies, Argon2 included, are
//! built with opt-level 3 in the dev profile too).

#[path = "../tests/web_common/mod.rs"]
mod web_common;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use web_common::Server;
use zonemesh_controller::auth::{Role, WebConfig};

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// Raw Argon2id hash time as the `argon2` CLI reports it (its own timer, no process start).
fn argon2_cli(m_kib: u32, t: u32, p: u32, runs: usize) -> Option<(f64, f64)> {
    let mut own = vec![];
    let mut wall = vec![];
    for i in 0..runs {
        let start = Instant::now();
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("printf '%s' 'bench password {i}' | argon2 zonemeshbenchsalt{i} -id -t {t} -k {m_kib} -p {p} -l 32"))
            .output()
            .ok()?;
        wall.push(start.elapsed().as_secs_f64());
        if !out.status.success() {
            return None;
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let secs: f64 = text
            .lines()
            .find_map(|l| l.trim().strip_suffix(" seconds"))
            .and_then(|s| s.trim().parse().ok())?;
        own.push(secs);
    }
    Some((percentile(&mut own, 0.5), percentile(&mut wall, 0.5)))
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    // The controller's default hashing concurrency (cores - 1), not the tests' 2.
    let server = Server::start(|c| {
        c.max_concurrent_hashes = WebConfig::new(c.pepper.clone()).max_concurrent_hashes
    })
    .await;
    let cost = server.state.users().hasher().cost();
    let permits = server.state.users().hasher().free_permits();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    println!(
        "signin benchmark: Argon2id m={} KiB t={} p={}, {} concurrent hashes, {} cores",
        cost.m_kib, cost.t, cost.p, permits, cores
    );
    let pw = "benchmark passphrase of reasonable length";
    server
        .state
        .users()
        .add_user("bench@example.com", Role::PortalOwner, pw)
        .unwrap();

    // Anchor, same run: the argon2 CLI and our own in-process hash.
    let cli = argon2_cli(cost.m_kib, cost.t, cost.p, 15);
    let mut raw = vec![];
    for _ in 0..15 {
        let t = Instant::now();
        server
            .state
            .users()
            .hasher()
            .hash("bench@example.com", pw)
            .unwrap();
        raw.push(t.elapsed().as_secs_f64());
    }
    let raw_med = percentile(&mut raw, 0.5);

    // One sign-in's latency (POST /signin: TLS handshake, form, Argon2id, session, audit flush).
    let mut lat = vec![];
    for _ in 0..50 {
        let mut c = server.client("127.0.0.1");
        let page = c.get("/signin").await;
        let csrf = page.csrf();
        let t = Instant::now();
        let r = c
            .post(
                "/signin",
                &[
                    ("csrf", &csrf),
                    ("email", "bench@example.com"),
                    ("password", pw),
                ],
            )
            .await;
        lat.push(t.elapsed().as_secs_f64());
        assert_eq!(r.status, 303);
    }
    let lat_med = percentile(&mut lat, 0.5);
    let lat_p99 = percentile(&mut lat, 0.99);

    // Throughput: 4 clients signing in for 5 s.
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = vec![];
    for k in 0..4u8 {
        let mut c = server.client(&format!("127.0.1.{}", k + 1));
        let (done, stop) = (done.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if c.sign_in(
                    "bench@example.com",
                    "benchmark passphrase of reasonable length",
                )
                .await
                .status
                    == 303
                {
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let window = Duration::from_secs(5);
    let t0 = Instant::now();
    tokio::time::sleep(window).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let rate = done.load(Ordering::Relaxed) as f64 / t0.elapsed().as_secs_f64();
    server.stop().await;

    println!();
    println!("{:<52} {:>10}", "measure", "value");
    match cli {
        Some((own, wall)) => {
            println!(
                "{:<52} {:>8.1} ms",
                "argon2 CLI, same parameters (its own timer, median)",
                own * 1e3
            );
            println!(
                "{:<52} {:>8.1} ms",
                "argon2 CLI incl. process start (median)",
                wall * 1e3
            );
            println!(
                "{:<52} {:>8.1} ms  ({:.2}x CLI)",
                "in-process Argon2id hash (median)",
                raw_med * 1e3,
                raw_med / own
            );
            println!(
                "{:<52} {:>8.1} ms  ({:.2}x CLI)",
                "one sign-in over HTTPS, median",
                lat_med * 1e3,
                lat_med / own
            );
            println!(
                "{:<52} {:>8.1} ms  ({:.2}x CLI)",
                "one sign-in over HTTPS, p99",
                lat_p99 * 1e3,
                lat_p99 / own
            );
            println!(
                "{:<52} {:>8.1} /s  ({:.2}x of 1/CLI = {:.1}/s)",
                "sign-ins per second, 4 clients",
                rate,
                rate * own,
                1.0 / own
            );
        }
        None => {
            println!("argon2 CLI not found (apt-get install argon2): no anchor");
            println!(
                "{:<52} {:>8.1} ms",
                "in-process Argon2id hash (median)",
                raw_med * 1e3
            );
            println!(
                "{:<52} {:>8.1} ms",
                "one sign-in over HTTPS, median",
                lat_med * 1e3
            );
            println!("{:<52} {:>8.1} /s", "sign-ins per second, 4 clients", rate);
        }
    }

    // Flood: 16 sources sending wrong passwords as fast as they can, throttling relaxed so
    // every attempt costs a hash; a health request every 50 ms must answer within 100 ms.
    let server = Server::start(|c| {
        c.max_concurrent_hashes = WebConfig::new(c.pepper.clone()).max_concurrent_hashes;
        c.throttle.free_failures = 1_000_000;
        c.throttle.block_after_failures = 1_000_000;
    })
    .await;
    // One account per flooding source: an account takes one attempt at a time from
    // sources it does not know, so sixteen sources on one account would mostly get an
    // instant 429 and measure a flood of cheap refusals instead of a flood of hashes.
    for k in 0..16u8 {
        server
            .state
            .users()
            .add_user(&format!("bench{k}@example.com"), Role::PortalOwner, pw)
            .unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let attempts = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let mut flood = vec![];
    for k in 0..16u8 {
        let mut c = server.client(&format!("127.0.2.{}", k + 1));
        let (stop, attempts, refused) = (stop.clone(), attempts.clone(), refused.clone());
        flood.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let r = c
                    .sign_in(
                        &format!("bench{k}@example.com"),
                        &format!("wrong guess {k}"),
                    )
                    .await;
                match r.status {
                    401 => attempts.fetch_add(1, Ordering::Relaxed),
                    _ => refused.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut health = vec![];
    let t0 = Instant::now();
    let mut probe = server.client("127.0.3.1");
    while t0.elapsed() < Duration::from_secs(6) {
        let t = Instant::now();
        let r = probe.get("/healthz").await;
        health.push(t.elapsed().as_secs_f64());
        assert_eq!(r.body, "ok");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let flood_secs = t0.elapsed().as_secs_f64() + 0.5;
    let flood_rate = attempts.load(Ordering::Relaxed) as f64 / flood_secs;
    let refused_rate = refused.load(Ordering::Relaxed) as f64 / flood_secs;
    stop.store(true, Ordering::Relaxed);
    for t in flood {
        t.await.unwrap();
    }
    let n = health.len();
    let h50 = percentile(&mut health, 0.5);
    let h99 = percentile(&mut health, 0.99);
    let hmax = percentile(&mut health, 1.0);
    println!(
        "{:<52} {:>8.1} /s",
        "wrong sign-ins answered during the flood", flood_rate
    );
    println!(
        "{:<52} {:>8.1} /s",
        "other answers during the flood (429, ...)", refused_rate
    );
    println!(
        "{:<52} {:>8.1} ms",
        "health during flood, median (new TLS conn each)",
        h50 * 1e3
    );
    println!("{:<52} {:>8.1} ms", "health during flood, p99", h99 * 1e3);
    println!(
        "{:<52} {:>8.1} ms  ({n} probes) {}",
        "health during flood, max",
        hmax * 1e3,
        if hmax < 0.1 {
            "PASS (< 100 ms)"
        } else {
            "FAIL (>= 100 ms)"
        }
    );
    server.stop().await;
    if hmax >= 0.1 {
        std::process::exit(1);
    }
}
