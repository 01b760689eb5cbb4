//! Intrusion feedback benchmark on the namespaced mesh lab (three zones of two agents):
//!
//! 1. time from the log line that crosses the threshold (the third SIP failure on b1, after
//!    three sshd failures on a1) to the block being in the nftables set of all six nodes,
//!    p50/p99 over `RUNS` attackers;
//! 2. security events per second a loopback controller absorbs: six enrolled nodes send
//!    their whole `ReportEvents` burst budget (20 calls of 256 events) at once over mTLS;
//! 3. iperf3 TCP through the tunnel a1 → b1 with the receiving node's block set empty and
//!    holding 10,000 entries, in the same run.
//!
//! Root only (prints `skipped: <reason>` otherwise). Env: RUNS (default 20; 5 with SMOKE=1),
//! SECS (iperf3 seconds, default 10; 2 with SMOKE=1), ZM_BIN_DIR (binaries under test).

use anyhow::{Context, Result, bail};
use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use zonemesh_tests::attacklab::{MeshLab, skip_reason};

const NODES: [&str; 6] = ["a1", "a2", "b1", "b2", "c1", "c2"];

fn env_or(name: &str, smoke: u64, full: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if std::env::var_os("SMOKE").is_some_and(|v| v == "1") {
            smoke
        } else {
            full
        })
}

fn append(path: &Path, text: &str) -> Result<()> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?
        .write_all(text.as_bytes())?;
    Ok(())
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn time_to_block(lab: &MeshLab, runs: u64) -> Result<Vec<Duration>> {
    let mut out = Vec::new();
    for k in 0..runs {
        let ip = format!("198.18.{}.{}", 110 + k / 200, 10 + k % 200);
        for i in 0..3 {
            append(
                &lab.dir.join("a1/auth.log"),
                &format!(
                    "Dec  1 20:00:01 a1 sshd[7]: Failed password for u{i} from {ip} port 4{i} ssh2\n"
                ),
            )?;
        }
        let sip = format!(
            "[Dec  1 20:00:01] NOTICE[9] chan_sip.c: Registration from '<sip:100@pbx>' failed for '{ip}:5060' - Wrong password\n"
        );
        append(&lab.dir.join("b1/sip.log"), &sip)?;
        append(&lab.dir.join("b1/sip.log"), &sip)?;
        let t0 = Instant::now();
        append(&lab.dir.join("b1/sip.log"), &sip)?;
        let mut pending: Vec<&str> = NODES.to_vec();
        while !pending.is_empty() {
            if t0.elapsed() > Duration::from_secs(30) {
                bail!("{ip} not blocked on {pending:?} after 30 s");
            }
            let mut still = Vec::new();
            for n in pending {
                if !lab.nft_elements(n)?.contains(&ip) {
                    still.push(n);
                }
            }
            pending = still;
            if !pending.is_empty() {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        out.push(t0.elapsed());
    }
    Ok(out)
}

/// Events/s through `ReportEvents` on a loopback controller: `nodes` enrolled nodes each
/// send their whole budget (20 calls of 256 events about distinct sources) at once.
fn events_per_second(bin_dir: &Path, nodes: usize) -> Result<(usize, Duration)> {
    use zonemesh_proto as pb;
    use zonemesh_tests::cluster::{Controller, mesh_channel};
    let tmp = tempfile::tempdir()?;
    let mut ctl = Controller::init_with(tmp.path(), bin_dir.join("zonemesh-controller"))?;
    ctl.start()?;
    ctl.zone_add("a", "100.64.1.0/24")?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let mut clients = Vec::new();
        for n in 0..nodes {
            let creds = ctl.enroll_in_zone("a", &format!("n{n}"), n).await;
            clients.push(pb::mesh_client::MeshClient::new(
                mesh_channel(&ctl.grpc_addr(), &creds).await?,
            ));
        }
        let t0 = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for (n, mut c) in clients.into_iter().enumerate() {
            tasks.spawn(async move {
                let mut ok = 0usize;
                for call in 0..20usize {
                    let events = (0..256usize)
                        .map(|i| pb::SecurityEvent {
                            kind: "ssh.auth_failure".into(),
                            source: format!("198.19.{}.{}", (n * 20 + call) % 250, i % 250 + 1),
                            detail: String::new(),
                            at_unix: 0,
                        })
                        .collect();
                    if c.report_events(pb::SecurityEvents { events }).await.is_ok() {
                        ok += 256;
                    }
                }
                ok
            });
        }
        let mut total = 0;
        while let Some(r) = tasks.join_next().await {
            total += r?;
        }
        anyhow::Ok((total, t0.elapsed()))
    })
}

fn iperf(lab: &MeshLab, secs: u64) -> Result<f64> {
    let b1 = lab.run(&["overlay", "b1"])?.trim().to_string();
    let out = lab.run(&[
        "x",
        "a1",
        "iperf3",
        "-c",
        &b1,
        "-t",
        &secs.to_string(),
        "-J",
    ])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 result")
        .map(|b| b / 1e9)
}

fn load_set(lab: &MeshLab, node: &str, entries: usize) -> Result<()> {
    let mut script = String::from("add element inet zonemesh blocked4 { ");
    for i in 0..entries {
        if i > 0 {
            script.push_str(", ");
        }
        script.push_str(&format!(
            "203.0.{}.{} timeout 1h",
            64 + i / 250 % 64,
            i % 250 + 1
        ));
    }
    script.push_str(" }\n");
    let path = lab.dir.join("set10k.nft");
    std::fs::write(&path, script)?;
    lab.run(&["x", node, "nft", "-f", path.to_str().context("path")?])?;
    Ok(())
}

fn main() -> Result<()> {
    if let Some(why) = skip_reason() {
        println!("skipped: {why}");
        return Ok(());
    }
    if !zonemesh_tests::have("iperf3") {
        println!("skipped: iperf3 not installed");
        return Ok(());
    }
    let runs = env_or("RUNS", 5, 20);
    let secs = env_or("SECS", 2, 10);
    let pfx = format!("zbi{}", std::process::id() % 1000);
    let lab = MeshLab::new(&pfx, "a b c", "1 2", "--block-first 1h");
    println!("binaries: {}", lab.bin_dir.display());
    lab.up()?;
    for (n, kind, file) in [
        ("a1", "sshd", "auth.log"),
        ("b1", "asterisk", "sip.log"),
        ("c1", "sshd", "auth.log"),
    ] {
        let path = lab.dir.join(format!("{n}/{file}"));
        append(&path, "")?;
        std::fs::write(
            lab.dir.join(format!("{n}/sources.toml")),
            format!(
                "[[source]]\nkind = \"{kind}\"\npath = \"{}\"\n",
                path.display()
            ),
        )?;
        lab.run(&["agent-stop", n])?;
        lab.run(&["agent-start", n])?;
    }
    lab.wait_connected(
        &[("a1", "b1"), ("b1", "c1"), ("a2", "c2")],
        Duration::from_secs(30),
    )?;
    std::thread::sleep(Duration::from_secs(1));

    let mut t = time_to_block(&lab, runs)?;
    t.sort();
    println!(
        "time to block on all 6 nodes: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms over {runs} attackers",
        ms(pct(&t, 0.5)),
        ms(pct(&t, 0.99)),
        ms(*t.last().unwrap_or(&Duration::ZERO))
    );

    let nodes = 6;
    let (counted, took) = events_per_second(&lab.bin_dir, nodes)?;
    println!(
        "controller absorbed {counted} of {} events from {nodes} nodes in {:.2} s: {:.0} events/s (each node's burst budget: 20 calls x 256 events; sustained 2 calls/s per node)",
        nodes * 20 * 256,
        took.as_secs_f64(),
        counted as f64 / took.as_secs_f64().max(0.001)
    );

    // Data plane: the same pair, empty set then 10,000 entries on the receiver.
    let srv = Command::new("ip")
        .args(["netns", "exec", &format!("{pfx}-b1"), "iperf3", "-s"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let mut srv = srv;
    std::thread::sleep(Duration::from_millis(500));
    // Unblock the attackers of the first part so the set starts empty.
    lab.run(&[
        "x", "b1", "nft", "flush", "set", "inet", "zonemesh", "blocked4",
    ])?;
    let empty = iperf(&lab, secs);
    load_set(&lab, "b1", 10_000)?;
    let loaded = lab.nft_elements("b1")?.matches("203.0.").count();
    let full = iperf(&lab, secs);
    let _ = srv.kill();
    let _ = srv.wait();
    let (empty, full) = (empty?, full?);
    println!(
        "iperf3 a1 -> b1 through the tunnel ({secs} s): empty set {empty:.2} Gbit/s, {loaded}-entry set {full:.2} Gbit/s (ratio {:.3})",
        full / empty
    );
    Ok(())
}
