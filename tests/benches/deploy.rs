//! Portal certificate benchmarks on a real lab (controller, three edges in network
//! namespaces, pebble), root only:
//!
//! 1. Press to served: from `POST /api/domains/{name}/deploy-certificate` until every one
//!    of the three edges hands out the new certificate in a TLS handshake, for the
//!    internal issuer and for ACME (pebble, HTTP-01 answered by the edges). Anchors
//!    measured in the same run: the issuance alone (`ca issue-tls`, the same CA and
//!    profile, no distribution) and a plain ACME client (`lego`, Debian) getting a
//!    certificate from the same pebble with its own HTTP-01 server.
//! 2. Full TLS handshakes per second (TLS 1.3, X25519, no resumption, the same client for
//!    both) on our edge with its RSA-2048 certificate, next to nginx (Debian) serving the
//!    same certificate and key (from the edge's `--edge-files`) in the same namespace.
//!
//! `SMOKE=1`: one deploy per issuer and 2-second handshake runs (CI). Otherwise 5 deploys
//! and 10-second runs; `scripts/bench-deploy.sh` builds release binaries for that.

use anyhow::{Context, Result, bail};
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};
use zonemesh_tests::edge::{EDGE_ZONE, EdgeLab, LabOptions, WebSession, norm_serial};
use zonemesh_tests::nginx::{Nginx, Site};
use zonemesh_tests::{run_ok, tlsprobe};

const OWNER: &str = "bench@portal.test";
const PASSWORD: &str = "a benchmark's passphrase";
const EDGES: usize = 3;

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

fn serial_at(addr: SocketAddr, sni: &str) -> Option<String> {
    tlsprobe::fetch(addr, sni)
        .and_then(|s| s.serial())
        .ok()
        .map(|s| norm_serial(&s))
}

/// One press; returns the time until every edge serves a certificate other than the one
/// it served before, checked to be the one the controller reports.
fn press_to_served(lab: &EdgeLab, s: &WebSession, name: &str) -> Result<Duration> {
    let before: Vec<Option<String>> = lab
        .edges
        .iter()
        .map(|e| serial_at(e.https(), name))
        .collect();
    let pressed = Instant::now();
    let a = s.deploy(name)?;
    if a.status != 202 {
        bail!("press answered {}: {}", a.status, a.body);
    }
    let mut done: Vec<Option<(Duration, String)>> = vec![None; lab.edges.len()];
    while done.iter().any(Option::is_none) {
        for (i, e) in lab.edges.iter().enumerate() {
            if done[i].is_some() {
                continue;
            }
            if let Some(sn) = serial_at(e.https(), name)
                && Some(&sn) != before[i].as_ref()
            {
                done[i] = Some((pressed.elapsed(), sn));
            }
        }
        if pressed.elapsed() > Duration::from_secs(120) {
            bail!(
                "not served everywhere within 120 s: {done:?}\n{}",
                lab.logs()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let took = done.iter().flatten().map(|d| d.0).max().unwrap_or_default();
    let d = s.domain(name)?.json()?;
    let want = norm_serial(d["serial_hex"].as_str().unwrap_or_default());
    for (i, x) in done.iter().flatten().enumerate() {
        if x.1 != want {
            bail!(
                "edge {i} serves {} but the controller says {want}: {d}",
                x.1
            );
        }
    }
    Ok(took)
}

fn time_it(f: impl FnOnce() -> Result<()>) -> Result<Duration> {
    let t = Instant::now();
    f()?;
    Ok(t.elapsed())
}

fn deploy_bench(lab: &EdgeLab, s: &WebSession, rounds: usize) -> Result<Option<Duration>> {
    // Internal issuer.
    let name = "bench-internal.portal.test";
    lab.add_domain(name, "internal", OWNER, EDGE_ZONE)?;
    let (mut ours, mut anchor) = (Vec::new(), Vec::new());
    let out = lab.dir.join("issue-tls");
    for _ in 0..rounds {
        ours.push(press_to_served(lab, s, name)?);
        anchor.push(time_it(|| {
            lab.ctl
                .admin_ok(&[
                    "ca",
                    "issue-tls",
                    "--dns",
                    name,
                    "--out-dir",
                    out.to_str().unwrap_or_default(),
                ])
                .map(drop)
        })?);
    }
    let (o, a) = (median(&mut ours), median(&mut anchor));
    println!(
        "press -> served on {EDGES} edges, internal issuer: median {} over {rounds} (anchor: `ca issue-tls` alone {}, ratio {:.1}x)",
        ms(o),
        ms(a),
        o.as_secs_f64() / a.as_secs_f64().max(1e-9)
    );

    // ACME through pebble.
    let Some(pebble) = &lab.pebble else {
        println!("skipped: ACME press -> served (pebble not installed)");
        return Ok(Some(o));
    };
    let name = "bench-acme.example.test";
    let ips: Vec<String> = lab.edges.iter().map(|e| e.ip.to_string()).collect();
    pebble.map_a(name, &ips.iter().map(String::as_str).collect::<Vec<_>>())?;
    lab.add_domain(name, "acme", OWNER, EDGE_ZONE)?;
    let lego_name = "bench-lego.example.test";
    let host = lab.edges[0].host_ip.to_string();
    pebble.map_a(lego_name, &[&host])?;
    let have_lego = zonemesh_tests::have("lego");
    let (mut ours, mut anchor) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        ours.push(press_to_served(lab, s, name)?);
        if have_lego {
            let path = lab.dir.join(format!("lego-{r}"));
            anchor.push(time_it(|| {
                run_ok(
                    Command::new("lego")
                        .env("LEGO_CA_CERTIFICATES", &pebble.https_ca)
                        .args([
                            "--server",
                            &pebble.directory_url(),
                            "--accept-tos",
                            "--email",
                            OWNER,
                        ])
                        .args([
                            "--key-type",
                            "rsa2048",
                            "--http",
                            "--http.port",
                            &format!("{host}:80"),
                        ])
                        .args(["--domains", lego_name, "--path"])
                        .arg(&path)
                        .arg("run"),
                )
                .map(drop)
            })?);
        }
    }
    let o = median(&mut ours);
    if have_lego {
        let a = median(&mut anchor);
        println!(
            "press -> served on {EDGES} edges, ACME (pebble): median {} over {rounds} (anchor: lego issuing from the same pebble {}, ratio {:.1}x)",
            ms(o),
            ms(a),
            o.as_secs_f64() / a.as_secs_f64().max(1e-9)
        );
    } else {
        println!(
            "press -> served on {EDGES} edges, ACME (pebble): median {} over {rounds} (anchor skipped: lego not installed)",
            ms(o)
        );
    }
    Ok(Some(o))
}

fn handshake_bench(lab: &EdgeLab, secs: u64) -> Result<()> {
    if !zonemesh_tests::nginx::installed() {
        println!("skipped: handshake benchmark (nginx not installed)");
        return Ok(());
    }
    const NAME: &str = "bench-internal.portal.test";
    let edge = &lab.edges[0];
    let site = edge
        .files_dir
        .as_ref()
        .context("edge 0 writes files")?
        .join(NAME);
    let served = serial_at(edge.https(), NAME).context("edge serves the internal domain")?;
    // The files carry the same certificate the edge serves (written before it reports).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pem = std::fs::read_to_string(site.join("fullchain.pem")).unwrap_or_default();
        let leaf = zonemesh_tests::edge::pem_certs(&pem)
            .into_iter()
            .next()
            .unwrap_or_default();
        let der = <rustls::pki_types::CertificateDer as rustls::pki_types::pem::PemObject>::from_pem_slice(
            leaf.as_bytes(),
        );
        if let Ok(der) = der
            && zonemesh_tests::cluster::cert_serial(&der)
                .map(|s| norm_serial(&s))
                .ok()
                == Some(served.clone())
        {
            break;
        }
        if Instant::now() > deadline {
            bail!("edge files do not hold the served certificate {served}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let workers = std::thread::available_parallelism()
        .map(usize::from)
        .unwrap_or(2);
    let nginx_addr = SocketAddr::from((edge.ip, 8443));
    let _nginx = Nginx::start(
        &lab.dir.join("nginx-bench"),
        &[Site {
            listen: nginx_addr,
            server_name: NAME.into(),
            cert: site.join("fullchain.pem"),
            key: site.join("privkey.pem"),
            staple: None,
            body: "nginx".into(),
        }],
        workers,
        Some(&edge.ns),
        Some(&lab.janitor),
    )?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let dur = Duration::from_secs(secs);
    let conc = 32;
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    // Alternate so that neither side gets the quieter moments of a shared machine.
    for _ in 0..2 {
        ours.push(rt.block_on(tlsprobe::handshake_rate(edge.https(), NAME, conc, dur / 2))?);
        theirs.push(rt.block_on(tlsprobe::handshake_rate(nginx_addr, NAME, conc, dur / 2))?);
    }
    let rate = |v: &[(f64, u64)]| v.iter().map(|x| x.0).sum::<f64>() / v.len() as f64;
    let fails = |v: &[(f64, u64)]| v.iter().map(|x| x.1).sum::<u64>();
    let (o, n) = (rate(&ours), rate(&theirs));
    println!(
        "full TLS 1.3 handshakes/s, RSA-2048, {conc} concurrent clients, {secs} s: zonemesh edge {o:.0}/s ({} failed), nginx ({workers} workers) {n:.0}/s ({} failed), ratio {:.2}",
        fails(&ours),
        fails(&theirs),
        o / n.max(1e-9)
    );
    Ok(())
}

fn main() -> Result<()> {
    if let Some(why) = zonemesh_tests::edge::skip_reason(false) {
        println!("skipped: deploy benchmark: {why}");
        return Ok(());
    }
    let smoke = std::env::var("SMOKE").is_ok_and(|v| v == "1");
    let (rounds, secs) = if smoke { (1, 2) } else { (5, 10) };
    let t = Instant::now();
    let mut lab = EdgeLab::new(LabOptions {
        tag: 23,
        acme: zonemesh_tests::pebble::installed(),
        bin_dir: std::env::var_os("ZM_BIN_DIR").map(Into::into),
    })?;
    lab.add_user(OWNER, "portal-owner", PASSWORD);
    lab.add_edge(true, None)?;
    for _ in 1..EDGES {
        lab.add_edge(false, None)?;
    }
    lab.wait_edges_connected(Duration::from_secs(30))?;
    println!(
        "deploy benchmark lab ({EDGES} edges) up in {:?}",
        t.elapsed()
    );
    let s = lab.sign_in(OWNER, PASSWORD)?;
    deploy_bench(&lab, &s, rounds)?;
    handshake_bench(&lab, secs)?;
    Ok(())
}
