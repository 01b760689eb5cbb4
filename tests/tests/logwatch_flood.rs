//! The agent's memory under a log flood: an agent (in a server namespace of the
//! [`SshLab`]) follows an sshd auth log while the test appends 100,000 hostile lines to it
//! as fast as it can (failures from 90,000 distinct addresses, 64 KiB lines, binary junk,
//! spoofed addresses in the user name). The agent's RSS is sampled every 20 ms until it
//! has read the whole file; its growth over the idle baseline must stay under
//! [`BOUND_MIB`], and the agent must still be running; its `/metrics` then counts exactly
//! the lines read and those dropped as overlong. Prints the figures. Root only.

use anyhow::{Context, Result, bail};
use std::io::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use zonemesh_tests::cluster::rss_kib;
use zonemesh_tests::sshlab::{SshLab, skip_reason};

/// Largest RSS growth accepted (the file is over 70 MiB; a follower that kept lines,
/// or state per address, would grow by far more).
const BOUND_MIB: u64 = 16;
const LINES: usize = 100_000;
/// The agent's `/metrics`, inside the server's namespace.
const METRICS: &str = "127.0.0.1:9100";

/// Where the agent's descriptor for `path` stands (`pos` in `/proc/PID/fdinfo`).
fn read_pos(pid: u32, path: &std::path::Path) -> Option<u64> {
    for e in std::fs::read_dir(format!("/proc/{pid}/fd")).ok()? {
        let e = e.ok()?;
        if std::fs::read_link(e.path()).ok().as_deref() == Some(path) {
            let info =
                std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", e.file_name().to_str()?))
                    .ok()?;
            return info
                .lines()
                .find_map(|l| l.strip_prefix("pos:"))
                .and_then(|p| p.trim().parse().ok());
        }
    }
    None
}

/// Line `i` of the flood.
fn line(i: usize, out: &mut Vec<u8>) {
    let ip = format!("10.{}.{}.{}", (i >> 16) & 0xff, (i >> 8) & 0xff, i & 0xff);
    match i % 100 {
        // 64 KiB without a newline inside: over the line cap.
        0 => {
            out.extend_from_slice(b"Dec  1 20:00:01 s1 sshd[1]: Failed password for ");
            out.extend(std::iter::repeat_n(b'x', 64 * 1024));
            out.extend_from_slice(format!(" from {ip} port 1 ssh2").as_bytes());
        }
        // Binary junk, invalid UTF-8 and NULs.
        1..=5 => {
            out.extend((0..512).map(|k| ((i * 31 + k * 7) % 256) as u8).filter(|b| *b != b'\n'));
        }
        // A spoofed address in the user name field.
        6..=9 => out.extend_from_slice(
            format!(
                "Dec  1 20:00:01 s1 sshd[1]: Failed password for invalid user x from 192.0.2.1 port 22 ssh2 from {ip} port 50000 ssh2"
            )
            .as_bytes(),
        ),
        // A failure from a new address every line.
        _ => out.extend_from_slice(
            format!(
                "Dec  1 20:00:01 s1 sshd[{i}]: Failed password for invalid user u{i} from {ip} port {} ssh2",
                1024 + i % 60000
            )
            .as_bytes(),
        ),
    }
    out.push(b'\n');
}

#[test]
fn agent_memory_stays_bounded_under_a_log_flood() -> Result<()> {
    if let Some(why) = skip_reason() {
        println!("skipped: {why}");
        return Ok(());
    }
    let lab = SshLab::new(52, &[("eu", 1)])?;
    let s = &lab.servers[0];
    let log = lab.dir.join("flood-auth.log");
    std::fs::write(&log, b"")?;
    lab.stop_agent(s);
    let watch = format!("sshd:{}", log.display());
    let pid = lab.start_agent_with(
        s,
        true,
        &[],
        &["--watch-log", &watch, "--metrics-listen", METRICS],
    )?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while read_pos(pid, &log).is_none() {
        if Instant::now() > deadline {
            bail!(
                "the agent does not follow {}:\n{}",
                log.display(),
                s.agent_log()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Idle baseline: the agent connected and settled.
    std::thread::sleep(Duration::from_secs(2));
    let base = rss_kib(pid).context("agent RSS")?;

    let peak = Arc::new(AtomicU64::new(base));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (peak.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                if let Some(r) = rss_kib(pid) {
                    peak.fetch_max(r, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let t0 = Instant::now();
    let mut f = std::fs::OpenOptions::new().append(true).open(&log)?;
    let mut buf = Vec::with_capacity(1 << 20);
    for i in 0..LINES {
        line(i, &mut buf);
        if buf.len() > 512 * 1024 {
            f.write_all(&buf)?;
            buf.clear();
        }
    }
    f.write_all(&buf)?;
    f.sync_data()?;
    let size = std::fs::metadata(&log)?.len();
    let written = t0.elapsed();
    let deadline = Instant::now() + Duration::from_secs(120);
    while read_pos(pid, &log) != Some(size) {
        if Instant::now() > deadline {
            done.store(true, Ordering::Relaxed);
            bail!(
                "the agent read {:?} of {size} bytes in 120 s:\n{}",
                read_pos(pid, &log),
                s.agent_log()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let read = t0.elapsed();
    std::thread::sleep(Duration::from_secs(1));
    done.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    let after = rss_kib(pid).context("the agent is gone after the flood")?;
    let peak = peak.load(Ordering::Relaxed).max(after);
    let growth = peak.saturating_sub(base);
    println!(
        "flood: {LINES} lines, {:.1} MiB written in {written:?}, read by the agent in {read:?}; \
         agent RSS idle {:.1} MiB, peak {:.1} MiB (+{:.1} MiB), after {:.1} MiB; bound +{BOUND_MIB} MiB",
        size as f64 / 1048576.0,
        base as f64 / 1024.0,
        peak as f64 / 1024.0,
        growth as f64 / 1024.0,
        after as f64 / 1024.0,
    );
    assert!(
        growth < BOUND_MIB * 1024,
        "agent RSS grew by {growth} KiB under the flood"
    );
    assert!(
        std::fs::metadata(format!("/proc/{pid}")).is_ok(),
        "the agent died"
    );
    assert!(!s.agent_log().contains("panicked"), "{}", s.agent_log());

    // The log followers' counters on /metrics: every line but the overlong ones read,
    // one line in a hundred overlong, and the failures offered (sent or dropped).
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &s.ns, "curl", "-sS", "--max-time", "10"])
        .arg(format!("http://{METRICS}/metrics"))
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let counter = |name: &str| -> Result<u64> {
        let prefix = format!("zonemesh_agent_{name}_total ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("no {prefix} in /metrics:\n{text}"))
    };
    let (read, overlong) = (
        counter("logwatch_lines")?,
        counter("logwatch_overlong_lines")?,
    );
    let (matched, dropped) = (
        counter("logwatch_matches")?,
        counter("logwatch_events_dropped")?,
    );
    println!(
        "agent /metrics: {read} lines read, {overlong} overlong, {matched} failures, {dropped} events dropped (queue full)"
    );
    assert_eq!(overlong, (LINES / 100) as u64, "overlong lines");
    assert_eq!(read, (LINES - LINES / 100) as u64, "lines read");
    // At least the failures from a new address (90 in 100); the spoofed lines may count.
    assert!(matched >= (LINES / 100 * 90) as u64, "{matched} failures");
    assert!(dropped <= matched, "{dropped} dropped of {matched}");
    Ok(())
}
