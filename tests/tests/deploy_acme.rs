//! Portal certificates from an ACME CA (Debian's pebble, HTTP-01 answered by our edges),
//! end to end: a real controller (`serve --acme-*`), two real edges in network namespaces,
//! pebble's mock DNS pointing each test's domain at them. One lab is shared by every test
//! of this file; each test uses a domain of its own. Root only.

use anyhow::{Context, Result, bail};
use serde_json::Value;
use std::process::Command;
use std::sync::LazyLock;
use std::time::{Duration, Instant};
use zonemesh_tests::edge::{
    EDGE_ZONE, EdgeLab, LabOptions, UPSTREAM_MARKER, WebSession, norm_serial, s_client,
    s_client_chain,
};
use zonemesh_tests::{openssl, run_ok, tlsprobe, write};

const ALICE: &str = "alice@shop.test";
const BOB: &str = "bob@blog.test";
const PASSWORD: &str = "correct horse battery staple";

static LAB: LazyLock<Result<EdgeLab, String>> =
    LazyLock::new(|| setup().map_err(|e| format!("{e:#}")));

fn setup() -> Result<EdgeLab> {
    let t = Instant::now();
    let mut lab = EdgeLab::new(LabOptions {
        tag: 22,
        acme: true,
        bin_dir: None,
    })?;
    lab.add_user(ALICE, "portal-owner", PASSWORD);
    lab.add_user(BOB, "portal-owner", PASSWORD);
    lab.add_edge(false, None)?;
    lab.add_edge(false, None)?;
    let waited = lab.wait_edges_connected(Duration::from_secs(30))?;
    println!(
        "lab up in {:?} (edges connected {waited:?} after the last start)",
        t.elapsed()
    );
    Ok(lab)
}

fn skip() -> Option<String> {
    zonemesh_tests::edge::skip_reason(true)
}

fn lab() -> &'static EdgeLab {
    match &*LAB {
        Ok(l) => l,
        Err(e) => panic!("lab setup failed: {e}"),
    }
}

/// An ACME domain of `owner` on the edge zone, its name resolving to every edge.
fn add_domain(lab: &EdgeLab, name: &str, owner: &str) -> Result<()> {
    let ips: Vec<String> = lab.edges.iter().map(|e| e.ip.to_string()).collect();
    let ips: Vec<&str> = ips.iter().map(String::as_str).collect();
    lab.pebble.as_ref().context("pebble")?.map_a(name, &ips)?;
    lab.add_domain(name, "acme", owner, EDGE_ZONE)
}

/// Poll `GET /api/domains/{name}` until `done` holds; returns the object.
fn wait_api(
    lab: &EdgeLab,
    s: &WebSession,
    name: &str,
    within: Duration,
    done: impl Fn(&Value) -> bool,
) -> Result<Value> {
    let deadline = Instant::now() + within;
    loop {
        let a = s.domain(name)?;
        let v = a.json()?;
        if a.status == 200 && done(&v) {
            return Ok(v);
        }
        if Instant::now() > deadline {
            // The logs first, the answer last: CI shows the tail of a failure.
            bail!(
                "{}\n{name}: still not done after {within:?}; GET /api/domains answered {} {v}",
                lab.logs(),
                a.status
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The edge's chain for `name` must verify against pebble's root (openssl verify) and
/// name `name`; returns the leaf's serial.
fn check_pebble_chain(
    lab: &EdgeLab,
    edge_https: std::net::SocketAddr,
    name: &str,
) -> Result<String> {
    let pebble = lab.pebble.as_ref().context("pebble")?;
    let text = s_client(edge_https, name, false)?;
    let certs = s_client_chain(&text);
    if certs.len() < 2 {
        bail!(
            "{edge_https} sent {} certificates for {name}:\n{text}",
            certs.len()
        );
    }
    let dir = tempfile::tempdir()?;
    let root = write(dir.path(), "root.pem", pebble.root_pem()?);
    let leaf = write(dir.path(), "leaf.pem", &certs[0]);
    let chain = write(dir.path(), "chain.pem", certs[1..].concat());
    let p = |x: &std::path::Path| x.to_string_lossy().into_owned();
    let v = run_ok(&mut openssl(&[
        "verify",
        "-CAfile",
        &p(&root),
        "-untrusted",
        &p(&chain),
        "-verify_hostname",
        name,
        &p(&leaf),
    ]))?;
    assert!(v.contains(": OK"), "openssl verify: {v}");
    let issuer = run_ok(&mut openssl(&[
        "x509",
        "-noout",
        "-issuer",
        "-in",
        &p(&leaf),
    ]))?;
    assert!(
        issuer.contains("Pebble Intermediate CA"),
        "issued by pebble: {issuer}"
    );
    let serial = run_ok(&mut openssl(&[
        "x509",
        "-noout",
        "-serial",
        "-in",
        &p(&leaf),
    ]))?;
    Ok(norm_serial(serial.trim().trim_start_matches("serial=")))
}

/// Entries of `audit --json` (one object per line) that mention `needle`.
fn audit_mentions(lab: &EdgeLab, needle: &str) -> Result<Vec<Value>> {
    let out = lab.ctl.admin_ok(&["audit", "--json"])?;
    let mut v = Vec::new();
    for line in out.lines().filter(|l| l.contains(needle)) {
        v.push(serde_json::from_str(line).with_context(|| format!("audit line {line}"))?);
    }
    Ok(v)
}

#[test]
fn one_press_gets_a_pebble_certificate_served_by_every_edge_and_the_upstream_page_through_it()
-> Result<()> {
    if let Some(why) = skip() {
        println!("skipped: {why}");
        return Ok(());
    }
    let lab = lab();
    let name = "shop.example.test";
    add_domain(lab, name, ALICE)?;
    let alice = lab.sign_in(ALICE, PASSWORD)?;
    let page = alice.get("/domains")?;
    assert_eq!(page.status, 200);
    assert!(
        page.body.contains(name) && page.body.contains("Deploy Certificate"),
        "{}",
        page.body
    );

    let pressed = Instant::now();
    let first = alice.deploy(name)?;
    assert_eq!(first.status, 202, "{}", first.body);
    let job = first.json()?["job"].clone();
    assert!(!job.is_null(), "{}", first.body);
    // A second press while the job runs joins it.
    let second = alice.deploy(name)?;
    assert_eq!(second.status, 202, "{}", second.body);
    assert_eq!(
        second.json()?["job"],
        job,
        "second press joins the running job"
    );

    let d = wait_api(lab, &alice, name, Duration::from_secs(90), |d| {
        assert_ne!(d["state"], "failed", "{d}");
        d["state"] == "deployed"
    })?;
    println!(
        "pebble certificate served on every edge {:?} after the press",
        pressed.elapsed()
    );
    assert_eq!(d["issuer"], "acme");
    assert_eq!(d["edges_total"], lab.edges.len(), "{d}");
    assert_eq!(d["edges_serving"], lab.edges.len(), "{d}");
    assert!(d["job"].is_object(), "{d}");
    let serial = norm_serial(d["serial_hex"].as_str().context("serial_hex")?);
    // pebble names no OCSP responder: served unstapled, and the domain says so.
    assert!(
        d["staple"].as_str().is_some_and(|s| s != "stapled"),
        "staple state of a certificate without an OCSP URL: {d}"
    );
    let status = s_client(lab.edges[0].https(), name, true)?;
    assert!(
        status.contains("OCSP response: no response sent"),
        "{status}"
    );

    let pebble_root = write(
        &lab.dir,
        "pebble-root.pem",
        lab.pebble.as_ref().unwrap().root_pem()?,
    );
    for e in &lab.edges {
        assert_eq!(
            check_pebble_chain(lab, e.https(), name)?,
            serial,
            "{}",
            e.name
        );
        // The portal's page comes back through the edge, over a chain curl checks.
        let page = run_ok(
            Command::new("curl")
                .args(["-sS", "--max-time", "10", "--cacert"])
                .arg(&pebble_root)
                .args(["--resolve", &format!("{name}:443:{}", e.ip)])
                .args(["-D", "-", &format!("https://{name}/hello?x=1")]),
        )?;
        assert!(page.contains(UPSTREAM_MARKER), "{}: {page}", e.name);
        assert!(
            page.contains("/hello?x=1") && page.contains(&format!("forwarded-host={name}")),
            "{page}"
        );
        let lower = page.to_ascii_lowercase();
        assert!(
            lower.contains("strict-transport-security: max-age="),
            "HSTS: {page}"
        );
        // Plain HTTP is redirected to HTTPS.
        let redirect = run_ok(Command::new("curl").args([
            "-sS",
            "--max-time",
            "10",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{redirect_url}",
            "-H",
            &format!("Host: {name}"),
            &format!("http://{}/hello", e.ip),
        ]))?;
        assert!(
            redirect.starts_with('3') && redirect.contains(&format!("https://{name}/hello")),
            "{redirect}"
        );
    }
    let listed = lab.domain(name)?;
    assert_eq!(listed["state"], "deployed");
    assert_eq!(
        norm_serial(listed["serial_hex"].as_str().unwrap_or_default()),
        serial
    );
    assert!(
        !audit_mentions(lab, name)?.is_empty(),
        "the deploy is audited"
    );
    Ok(())
}

#[test]
fn failed_challenge_shows_pebbles_reason_on_the_page_and_in_domain_list_and_the_old_certificate_stays()
-> Result<()> {
    if let Some(why) = skip() {
        println!("skipped: {why}");
        return Ok(());
    }
    let lab = lab();
    let name = "broken.example.test";
    add_domain(lab, name, ALICE)?;
    // A first certificate, with the CLI (exit 0 once every edge serves it).
    let t = Instant::now();
    let out = lab.ctl.admin(&["domain", "deploy", name])?;
    assert!(
        out.status.success(),
        "{}\ndomain deploy: {}{}",
        lab.logs(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("domain deploy (acme) exited 0 after {:?}", t.elapsed());
    let old = norm_serial(lab.domain(name)?["serial_hex"].as_str().context("serial")?);
    for e in &lab.edges {
        assert_eq!(
            norm_serial(&tlsprobe::fetch(e.https(), name)?.serial()?),
            old,
            "{}",
            e.name
        );
    }

    // Now the name points where nothing answers on port 80: pebble's validation fails.
    let nowhere = lab.edges[0].host_ip.to_string();
    lab.pebble.as_ref().unwrap().map_a(name, &[&nowhere])?;
    let alice = lab.sign_in(ALICE, PASSWORD)?;
    let a = alice.deploy(name)?;
    assert_eq!(a.status, 202, "{}", a.body);

    // pebble's own words: its ACME problem type and what its validation saw.
    let reason_ok = |e: &str| {
        let e = e.to_ascii_lowercase();
        e.contains("urn:ietf:params:acme:error:connection")
            && e.contains(&format!("{nowhere}:80"))
            && e.contains("connection refused")
    };
    let d = wait_api(lab, &alice, name, Duration::from_secs(60), |d| {
        d["state"] == "failed" && d["error"].as_str().is_some_and(reason_ok)
    })?;
    println!("failed with: {}", d["error"]);
    // The same on the Domains page and in `domain list --json`.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let page = alice.get("/domains")?.body;
        let listed = lab.domain(name)?;
        let page_ok = page.contains("failed") && reason_ok(&page.replace("&#x27;", "'"));
        let list_ok =
            listed["state"] == "failed" && listed["error"].as_str().is_some_and(reason_ok);
        if page_ok && list_ok {
            break;
        }
        if Instant::now() > deadline {
            bail!("{page}\npage shows failure: {page_ok}, list: {listed}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let list_text = lab.ctl.admin_ok(&["domain", "list"])?;
    assert!(
        list_text.contains(name) && list_text.contains("failed"),
        "{list_text}"
    );
    // The previous certificate is still what every edge serves.
    for e in &lab.edges {
        assert_eq!(
            norm_serial(&tlsprobe::fetch(e.https(), name)?.serial()?),
            old,
            "{}",
            e.name
        );
    }
    assert_eq!(
        norm_serial(lab.domain(name)?["serial_hex"].as_str().unwrap_or_default()),
        old
    );
    Ok(())
}

#[test]
fn an_owner_pressing_deploy_on_another_owners_domain_gets_403_and_nothing_happens() -> Result<()> {
    if let Some(why) = skip() {
        println!("skipped: {why}");
        return Ok(());
    }
    let lab = lab();
    let name = "blog.example.test";
    add_domain(lab, name, BOB)?;
    let out = lab.ctl.admin(&["domain", "deploy", name])?;
    assert!(
        out.status.success(),
        "{}\n{}",
        lab.logs(),
        String::from_utf8_lossy(&out.stderr)
    );
    let bob = lab.sign_in(BOB, PASSWORD)?;
    let before = bob.domain(name)?.json()?;
    let audit_before: Vec<String> = audit_mentions(lab, name)?
        .iter()
        .map(Value::to_string)
        .collect();

    let alice = lab.sign_in(ALICE, PASSWORD)?;
    let a = alice.deploy(name)?;
    assert_eq!(a.status, 403, "{}", a.body);
    assert_eq!(alice.domain(name)?.status, 403);
    assert!(
        !alice.get("/domains")?.body.contains(name),
        "alice does not see bob's domain"
    );
    assert_eq!(alice.deploy("nonexistent.example.test")?.status, 404);

    // Nothing happened: no job, no new certificate, no deploy in the audit log.
    std::thread::sleep(Duration::from_secs(2));
    let after = bob.domain(name)?.json()?;
    assert_eq!(after["job"], before["job"], "no new job");
    assert_eq!(after["serial_hex"], before["serial_hex"]);
    assert_eq!(after["state"], "deployed");
    let new_entries: Vec<Value> = audit_mentions(lab, name)?
        .into_iter()
        .filter(|e| !audit_before.contains(&e.to_string()))
        .collect();
    for e in &new_entries {
        let s = e.to_string().to_ascii_lowercase();
        assert!(
            s.contains("denied") || s.contains("refused") || s.contains("forbidden"),
            "only a refusal may be audited: {e}"
        );
    }
    Ok(())
}
