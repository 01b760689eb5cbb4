//! CA rotation without an outage, in the namespaced mesh lab (root only): pings every 10 ms
//! across zones while `ca rotate-intermediate` and then `ca rotate-root` run lose nothing;
//! every agent ends on a certificate from the new intermediate under the new root, pins the
//! new root (through the cross-signature) and drops the old one once it is retired;
//! `openssl verify` accepts every agent's chain, directly and through the cross-signature;
//! a node of the old intermediate that is revoked stays refused (OCSP says revoked, the
//! controller refuses its connection).

use anyhow::{Context, Result, bail};
use serde_json::Value;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use zonemesh_tests::meshlab::{MeshLab, skip_reason};
use zonemesh_tests::{have, run_ok};

const RUNNING: [&str; 5] = ["a1", "a2", "b1", "b2", "c1"];
/// Pings per pair, one every 10 ms: long enough to cover both rotations and the old
/// root's retirement.
const PINGS: u32 = 5500;

fn ca_show(lab: &MeshLab) -> Result<Vec<Value>> {
    let v: Value = serde_json::from_str(&lab.controller(&["ca", "show", "--json"])?)?;
    Ok(v["certificates"]
        .as_array()
        .context("certificates")?
        .clone())
}

fn cert_of<'a>(certs: &'a [Value], id: &str) -> &'a Value {
    certs
        .iter()
        .find(|c| c["id"] == id)
        .unwrap_or_else(|| panic!("no {id} in {certs:?}"))
}

fn export(lab: &MeshLab, id: &str, to: &Path) -> Result<()> {
    std::fs::write(to, lab.controller(&["ca", "export", "--id", id])?)?;
    Ok(())
}

/// The issuer of a PEM certificate file, as openssl prints it.
fn issuer(pem: &Path) -> Result<String> {
    run_ok(
        Command::new("openssl")
            .args(["x509", "-noout", "-issuer", "-in"])
            .arg(pem),
    )
    .map(|s| s.trim().to_string())
}

fn subject(pem: &Path) -> Result<String> {
    run_ok(
        Command::new("openssl")
            .args(["x509", "-noout", "-subject", "-in"])
            .arg(pem),
    )
    .map(|s| s.trim().trim_start_matches("subject=").to_string())
}

/// Wait until every running agent's certificate is issued by `int_pem`.
fn wait_all_on(lab: &MeshLab, int_pem: &Path, limit: Duration) -> Result<Duration> {
    let want = format!("issuer={}", subject(int_pem)?);
    let start = Instant::now();
    loop {
        let mut behind = Vec::new();
        for n in RUNNING {
            if issuer(&lab.dir.join(n).join("node.crt"))? != want {
                behind.push(n);
            }
        }
        if behind.is_empty() {
            return Ok(start.elapsed());
        }
        if start.elapsed() > limit {
            bail!(
                "{behind:?} not on {want} after {limit:?}\n{}",
                lab.logs(behind[0])
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn start_ping(lab: &MeshLab, from: &str, to: &str) -> Result<Child> {
    let ip = lab.overlay(to)?;
    Ok(lab
        .cmd(&[
            "x",
            from,
            "ping",
            "-q",
            "-i",
            "0.01",
            "-W",
            "1",
            "-c",
            &PINGS.to_string(),
            &ip,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?)
}

/// (transmitted, received) from ping's summary.
fn ping_summary(child: Child) -> Result<(u32, u32, String)> {
    let out = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = text
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .with_context(|| format!("no ping summary: {text}"))?;
    let num = |word: &str| -> Result<u32> {
        let before = line.split(word).next().context("summary")?;
        Ok(before
            .trim()
            .rsplit([' ', ','])
            .next()
            .context("count")?
            .parse()?)
    };
    Ok((num(" packets transmitted")?, num(" received")?, text))
}

#[test]
fn rotating_the_intermediate_then_the_root_loses_no_ping() -> Result<()> {
    if let Some(r) = skip_reason() {
        println!("skipped: {r}");
        return Ok(());
    }
    for tool in ["openssl", "ping"] {
        if !have(tool) {
            println!("skipped: {tool} not installed");
            return Ok(());
        }
    }
    let lab = MeshLab::up("zrot")?;
    let tmp = tempfile::tempdir()?;
    let pem = |n: &str| tmp.path().join(n);
    for (a, b) in [("a1", "b1"), ("b2", "c1")] {
        lab.wait_ping(a, b, true, Duration::from_secs(30))?;
    }
    export(&lab, "root-1", &pem("root1.pem"))?;
    export(&lab, "int-1", &pem("int1.pem"))?;
    // c2 stays on the first intermediate: stopped before any rotation, revoked after.
    lab.run(&["agent-stop", "c2"])?;

    let pings = [start_ping(&lab, "a1", "b1")?, start_ping(&lab, "b2", "c1")?];
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(1));

    // 1. A new intermediate under the same root, nodes moving within 8 s.
    lab.controller(&["ca", "rotate-intermediate", "--spread", "8s"])?;
    let certs = ca_show(&lab)?;
    assert_eq!(cert_of(&certs, "int-1")["state"], "retiring");
    assert_eq!(cert_of(&certs, "int-2")["state"], "active");
    export(&lab, "int-2", &pem("int2.pem"))?;
    let moved = wait_all_on(&lab, &pem("int2.pem"), Duration::from_secs(40))?;
    println!("every running agent on int-2 {moved:?} after the rotation");

    // The revoked node of the old intermediate is refused: OCSP (answered by the old
    // intermediate) says revoked, and the controller turns its agent away.
    lab.controller(&["node", "revoke", "zone-c/c2", "--reason", "key-compromise"])?;
    let c2_cert = lab.dir.join("c2").join("node.crt");
    assert!(issuer(&c2_cert)?.contains("g1"), "c2 is on int-1");
    let ocsp = lab.run(&[
        "x",
        "a1",
        "openssl",
        "ocsp",
        "-no_nonce",
        "-issuer",
        pem("int1.pem").to_str().context("path")?,
        "-cert",
        c2_cert.to_str().context("path")?,
        "-url",
        "http://198.18.100.1:8089/ocsp",
        "-noverify",
    ])?;
    assert!(ocsp.contains(": revoked"), "{ocsp}");
    lab.run(&["agent-start", "c2"])?;

    // 2. A new root, cross-signed by the old one, with a 25 s grace.
    lab.controller(&["ca", "rotate-root", "--grace", "25s", "--spread", "8s"])?;
    let certs = ca_show(&lab)?;
    for (id, state) in [
        ("root-1", "retiring"),
        ("int-1", "retiring"),
        ("int-2", "retiring"),
        ("cross-2", "retiring"),
        ("root-2", "active"),
        ("int-3", "active"),
    ] {
        assert_eq!(cert_of(&certs, id)["state"], state, "{id}: {certs:?}");
    }
    export(&lab, "root-2", &pem("root2.pem"))?;
    export(&lab, "int-3", &pem("int3.pem"))?;
    export(&lab, "cross-2", &pem("cross2.pem"))?;
    let moved = wait_all_on(&lab, &pem("int3.pem"), Duration::from_secs(40))?;
    println!("every running agent on int-3 {moved:?} after the root rotation");

    // Every chain verifies under the new root, and through the cross-signature under the
    // old one (for relying parties that only know the old root).
    let through_cross = pem("int3+cross.pem");
    std::fs::write(
        &through_cross,
        std::fs::read_to_string(pem("int3.pem"))? + &std::fs::read_to_string(pem("cross2.pem"))?,
    )?;
    for n in RUNNING {
        let leaf = lab.dir.join(n).join("node.crt");
        let chain = lab.dir.join(n).join("chain.pem");
        let direct = run_ok(
            Command::new("openssl")
                .arg("verify")
                .arg("-CAfile")
                .arg(pem("root2.pem"))
                .arg("-untrusted")
                .arg(&chain)
                .arg(&leaf),
        )?;
        assert!(direct.contains(": OK"), "{n}: {direct}");
        let crossed = run_ok(
            Command::new("openssl")
                .arg("verify")
                .arg("-CAfile")
                .arg(pem("root1.pem"))
                .arg("-untrusted")
                .arg(&through_cross)
                .arg(&leaf),
        )?;
        assert!(
            crossed.contains(": OK"),
            "{n} through the cross-signature: {crossed}"
        );
        // Not under the new root alone without the new intermediate.
        let bare = Command::new("openssl")
            .arg("verify")
            .arg("-CAfile")
            .arg(pem("root2.pem"))
            .arg(&leaf)
            .output()?;
        assert!(
            !bare.status.success(),
            "{n} verified without its intermediate"
        );
    }

    // 3. After the grace the old root (and everything under it) is retired, and every agent
    // pins the new root alone.
    let deadline = Instant::now() + Duration::from_secs(60);
    let fp2 = cert_of(&ca_show(&lab)?, "root-2")["sha256"]
        .as_str()
        .context("sha256")?
        .to_string();
    loop {
        let certs = ca_show(&lab)?;
        let retired = ["root-1", "int-1", "int-2", "cross-2"]
            .iter()
            .all(|id| cert_of(&certs, id)["state"] == "retired");
        let pinned = RUNNING.iter().all(|n| {
            let id: Value = serde_json::from_str(
                &std::fs::read_to_string(lab.dir.join(n).join("identity.json")).unwrap_or_default(),
            )
            .unwrap_or_default();
            let roots = std::fs::read_to_string(lab.dir.join(n).join("ca.crt"))
                .unwrap_or_default()
                .matches("BEGIN CERTIFICATE")
                .count();
            id["ca_fingerprint"] == fp2.as_str() && roots == 1
        });
        if retired && pinned {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "old root not retired / pins not moved: {certs:?}\n{}",
                lab.logs("a1")
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    println!(
        "old root retired and unpinned {:?} after the pings began",
        started.elapsed()
    );

    // The revoked node was never let back in.
    let st = lab.status("c2")?;
    assert_eq!(st["controller_connected"], false, "{st}");
    for n in ["a1", "b1", "c1"] {
        assert!(
            !lab.peers(n)?.iter().any(|p| p.ends_with("/c2")),
            "{n} still has c2"
        );
    }
    // The mesh still works on the new CA alone.
    for (a, b) in [("a1", "c1"), ("c1", "b2")] {
        lab.wait_ping(a, b, true, Duration::from_secs(10))?;
    }

    let [p1, p2] = pings;
    for (pair, p) in [("a1->b1", p1), ("b2->c1", p2)] {
        let (sent, received, text) = ping_summary(p)?;
        println!("{pair}: {sent} sent, {received} received");
        assert_eq!(sent, PINGS, "{pair}: {text}");
        assert_eq!(received, sent, "{pair} lost pings: {text}");
    }
    Ok(())
}
