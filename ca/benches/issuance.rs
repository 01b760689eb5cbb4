//! Node-certificate issuance per second with the RSA-4096 intermediate, on 1 and 2 threads,
//! next to `openssl speed rsa4096` sign/s measured in the same run (issue 3).
//!
//! Run with `cargo bench -p zonemesh-ca --bench issuance`. `SECS` sets the length of every
//! timed phase (default 5); `SMOKE=1` makes every phase 1 s, for CI.
//!
//! One issuance is what the controller does per enrolling node: parse the CSR, check its
//! RSA-4096 key and its signature, apply the node policy, and sign with the intermediate.
//! The CSR and the CA are built once, outside the timed loops; the `Ca` is shared by
//! reference between threads.
//!
//! `openssl speed` divides by CPU user time (its `-multi` children by wall time), so the
//! comparison is made per CPU-second, read from `/proc/thread-self/schedstat`; wall-clock
//! figures are printed too, next to `-multi 2`, since the box is shared with other jobs.

use rcgen::{CertificateParams, KeyPair, PKCS_RSA_SHA256, SigningKey};
use rustls_pki_types::PrivatePkcs8KeyDer;
use std::hint::black_box;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};
use x509_parser::prelude::{FromDer, X509CertificationRequest};
use zonemesh_ca::{Ca, CaMaterial, NodePolicy, NodeRequest, WireGuardKey, generate_rsa_4096};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn main() -> Result<(), BoxError> {
    let smoke = std::env::var("SMOKE").is_ok_and(|v| !v.is_empty() && v != "0");
    let secs: u64 = if smoke {
        1
    } else {
        match std::env::var("SECS") {
            Ok(s) => s.parse().map_err(|e| format!("SECS={s:?}: {e}"))?,
            Err(_) => 5,
        }
    };
    let phase = Duration::from_secs(secs);
    // The parser must read both layouts `openssl speed` has printed (3.x table, 1.1 line).
    for (sample, want) in [
        (
            "                  sign    verify    sign/s verify/s\nrsa 4096 bits 0.006226s 0.000092s    160.6  10878.0\n",
            160.6,
        ),
        (
            "rsa 4096 bits 0.003933s 0.000061s    254.3  16512.3\n",
            254.3,
        ),
    ] {
        if parse_openssl_sign_per_sec(sample) != Some(want) {
            return Err("openssl speed output parser is broken".into());
        }
    }
    let now = SystemTime::now();

    let load_before = loadavg();
    eprintln!("issuance bench: {secs} s per phase; load average: {load_before}");
    eprintln!("setup: generating CA (2 x RSA-4096) and a node key (RSA-4096) ...");
    let material = CaMaterial::generate("bench.zonemesh.test", now, |_| {})?;
    let ca = Ca::from_material(&material)?;
    let node_key = generate_rsa_4096()?;
    let csr_der = CertificateParams::new(vec![])?
        .serialize_request(&node_key)?
        .der()
        .to_vec();
    let policy = NodePolicy::default();

    // One issuance outside the loops: the CA must accept this CSR at all.
    let first = issue(&ca, &policy, &csr_der, 0, now)?;
    eprintln!(
        "setup: one node certificate issued ({} bytes DER, serial {})",
        first.der.len(),
        first.serial_hex
    );

    // Anchors and our figures, interleaved so load drift on a shared box hits both.
    eprintln!("openssl speed -seconds {secs} rsa4096 ...");
    let ossl1 = openssl_sign_per_sec(secs, 1)?;
    eprintln!("zonemesh issuance, 1 thread ...");
    let ours1 = issuance_rate(&ca, &policy, &csr_der, 1, phase, now)?;
    eprintln!("zonemesh issuance, 2 threads ...");
    let ours2 = issuance_rate(&ca, &policy, &csr_der, 2, phase, now)?;
    eprintln!("openssl speed -multi 2 -seconds {secs} rsa4096 ...");
    let ossl2 = openssl_sign_per_sec(secs, 2)?;

    // Where the time goes, single-threaded: the raw RSA-4096 signature through the same
    // library (aws-lc-rs via rcgen) and the CSR parse + signature check.
    let part = Duration::from_millis(if smoke { 300 } else { 1000 });
    let int_key = KeyPair::from_pkcs8_der_and_sign_algo(
        &PrivatePkcs8KeyDer::from(material.intermediate_key_pkcs8.to_vec()),
        &PKCS_RSA_SHA256,
    )?;
    // About the size of a node certificate's to-be-signed part (the DER less its 512-byte
    // signature and the wrapping).
    let tbs = vec![0x5au8; first.der.len() - 600];
    let raw_sign = rate(part, || {
        black_box(int_key.sign(black_box(&tbs))?);
        Ok(())
    })?;
    let csr_check = rate(part, || {
        let (_, csr) = X509CertificationRequest::from_der(black_box(&csr_der))
            .map_err(|e| format!("CSR parse: {e}"))?;
        csr.verify_signature()
            .map_err(|e| format!("CSR signature: {e}"))?;
        Ok(())
    })?;
    let load_after = loadavg();

    let per_core = ours1.cpu / ossl1;
    let per_core2 = ours2.cpu / (2.0 * ossl1);
    let scaling = ours2.cpu / ours1.cpu;
    let row = |label: &str, a: String, b: String| println!("{label:<50} {a:>10} {b:>10}");
    let f = |x: f64| format!("{x:.1}");
    let pct = |x: f64| format!("{:.1}%", x * 100.0);
    let none = || "-".to_string();
    println!();
    println!(
        "RSA-4096 node-certificate issuance vs `openssl speed rsa4096` sign, {secs} s per phase, same run"
    );
    row("", "1 core".into(), "2 cores".into());
    println!("per CPU-second (openssl speed's own divisor; holds under outside load):");
    row(
        "  zonemesh issuance/s (Ca::sign_node_csr)",
        f(ours1.cpu),
        f(ours2.cpu),
    );
    row(
        &format!("  openssl sign/s (speed -seconds {secs}; 2 = 2 x 1)"),
        f(ossl1),
        f(2.0 * ossl1),
    );
    row("  ratio zonemesh / openssl", pct(per_core), pct(per_core2));
    row(
        "  scaling 2 threads / 1 thread (zonemesh)",
        none(),
        format!("{scaling:.2}x"),
    );
    println!("wall clock (what the shared box gave; -multi children divide by wall time):");
    row("  zonemesh issuance/s", f(ours1.wall), f(ours2.wall));
    row(
        &format!("  openssl sign/s (speed -multi 2 -seconds {secs})"),
        none(),
        f(ossl2),
    );
    row(
        "  ratio zonemesh / openssl",
        none(),
        pct(ours2.wall / ossl2),
    );
    row(
        "  zonemesh threads asleep (lock waits etc.)",
        pct(ours1.blocked),
        pct(ours2.blocked),
    );
    println!("breakdown, 1 thread, per CPU-s:");
    let ms = |r: Rate| format!("{:.3} ms", 1000.0 / r.cpu);
    row(
        "  aws-lc-rs RSA-4096 sign/s (raw, via rcgen)",
        f(raw_sign.cpu),
        ms(raw_sign),
    );
    row(
        "  CSR parse + signature check/s",
        f(csr_check.cpu),
        ms(csr_check),
    );
    row("  full issuance/s", f(ours1.cpu), ms(ours1));
    row(
        "  raw sign / openssl sign",
        pct(raw_sign.cpu / ossl1),
        String::new(),
    );
    println!(
        "goal: >= 90% of openssl per core: {}; near-linear on 2 cores (>= 1.8x, < 5% asleep): {}",
        verdict(per_core >= 0.9),
        verdict(scaling >= 1.8 && ours2.blocked < 0.05)
    );
    println!(
        "load average before: {load_before}; after: {load_after} (2 cores shared with other jobs)"
    );
    Ok(())
}

fn issue(
    ca: &Ca,
    policy: &NodePolicy,
    csr_der: &[u8],
    n: u8,
    now: SystemTime,
) -> Result<zonemesh_ca::IssuedCert, BoxError> {
    Ok(ca.sign_node_csr(
        policy,
        &NodeRequest {
            csr_der,
            zone: "bench",
            node: "node-1",
            wg_public_key: WireGuardKey([n; 32]),
        },
        now,
    )?)
}

/// A rate measured both ways: per wall-clock second, and per second of CPU time the
/// measuring threads were actually given. `openssl speed` divides by CPU (user) time unless
/// told `-elapsed`, so the CPU figure is the one that compares with it, and it stays
/// meaningful when other jobs share the cores. `blocked` is the largest share of wall time
/// any measuring thread spent neither running nor waiting for a core, i.e. asleep (on a
/// lock, for instance): near zero means the threads never held each other up.
#[derive(Clone, Copy)]
struct Rate {
    wall: f64,
    cpu: f64,
    blocked: f64,
}

/// Scheduler times of the calling thread from `/proc/thread-self/schedstat`: time on a
/// core and time runnable but waiting for one.
#[derive(Clone, Copy)]
struct Sched {
    on_cpu: Duration,
    runq: Duration,
}

fn sched() -> Option<Sched> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let mut w = s.split_whitespace().map(|x| x.parse::<u64>().ok());
    Some(Sched {
        on_cpu: Duration::from_nanos(w.next()??),
        runq: Duration::from_nanos(w.next()??),
    })
}

struct Run {
    n: u64,
    wall: f64,
    cpu: f64,
    blocked: f64,
}

/// Run `op` back to back on the calling thread until `deadline`.
fn run_until(
    deadline: Instant,
    mut op: impl FnMut() -> Result<(), BoxError>,
) -> Result<Run, BoxError> {
    let start = Instant::now();
    let s0 = sched();
    let mut n = 0u64;
    while Instant::now() < deadline {
        op()?;
        n += 1;
    }
    let wall = start.elapsed().as_secs_f64();
    let (cpu, blocked) = match (s0, sched()) {
        (Some(a), Some(b)) => {
            let cpu = (b.on_cpu - a.on_cpu).as_secs_f64();
            let runq = (b.runq - a.runq).as_secs_f64();
            (cpu, ((wall - cpu - runq) / wall).max(0.0))
        }
        _ => (wall, f64::NAN),
    };
    Ok(Run {
        n,
        wall,
        cpu,
        blocked,
    })
}

/// Operations per second of `op` run back to back for `dur` on the calling thread.
fn rate(dur: Duration, op: impl FnMut() -> Result<(), BoxError>) -> Result<Rate, BoxError> {
    let r = run_until(Instant::now() + dur, op)?;
    Ok(Rate {
        wall: r.n as f64 / r.wall,
        cpu: r.n as f64 / r.cpu,
        blocked: r.blocked,
    })
}

/// Issuances per second with `threads` threads sharing one `Ca` for `dur`. The CPU figure
/// sums each thread's own count / CPU time, as `openssl speed -multi` sums its processes.
fn issuance_rate(
    ca: &Ca,
    policy: &NodePolicy,
    csr_der: &[u8],
    threads: usize,
    dur: Duration,
    now: SystemTime,
) -> Result<Rate, BoxError> {
    let start = Instant::now();
    let deadline = start + dur;
    let results = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    run_until(deadline, || {
                        black_box(issue(ca, policy, csr_der, t as u8, now)?);
                        Ok(())
                    })
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| BoxError::from("bench thread panicked"))?
            })
            .collect::<Result<Vec<_>, BoxError>>()
    })?;
    // Every thread stops after the deadline; the last one to finish bounds the phase.
    let elapsed = start.elapsed().as_secs_f64();
    Ok(Rate {
        wall: results.iter().map(|r| r.n).sum::<u64>() as f64 / elapsed,
        cpu: results.iter().map(|r| r.n as f64 / r.cpu).sum(),
        blocked: results.iter().map(|r| r.blocked).fold(0.0, f64::max),
    })
}

/// `sign/s` of `openssl speed [-multi N] -seconds S rsa4096` (the aggregate over N procs).
fn openssl_sign_per_sec(secs: u64, procs: usize) -> Result<f64, BoxError> {
    let mut cmd = Command::new("openssl");
    cmd.arg("speed");
    if procs > 1 {
        cmd.args(["-multi", &procs.to_string()]);
    }
    cmd.args(["-seconds", &secs.to_string(), "rsa4096"]);
    let out = cmd
        .output()
        .map_err(|e| format!("running openssl speed: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "openssl speed failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    parse_openssl_sign_per_sec(&text)
        .ok_or_else(|| format!("no `rsa 4096 bits` line in openssl speed output:\n{text}").into())
}

/// Find the `rsa 4096 bits` result line and return its sign/s column. Both layouts put the
/// two times (suffixed `s`) first and then sign/s and verify/s as bare numbers:
/// `rsa 4096 bits 0.006226s 0.000092s    160.6  10878.0` (with or without a header row
/// `sign    verify    sign/s verify/s` above it).
fn parse_openssl_sign_per_sec(text: &str) -> Option<f64> {
    text.lines()
        .filter(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            w.len() >= 3 && w[0] == "rsa" && w[1] == "4096" && w[2] == "bits"
        })
        .filter_map(|l| {
            l.split_whitespace()
                .skip(3)
                .filter_map(|w| w.parse::<f64>().ok())
                .next()
        })
        .next_back()
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "NOT met" }
}
