//! Portal certificates from zonemesh's own CA (issuer `internal`), end to end: a real
//! controller, two real edges (`zonemesh-agent run --edge-*`) in network namespaces, the
//! first also writing `--edge-files` for a real nginx that it reloads. One lab is shared
//! by every test of this file; each test uses a domain of its own. Root only.
//!
//! Checked with tools we did not write: `openssl s_client -status`, testssl, nginx,
//! Chromium.

use anyhow::{Context, Result, bail};
use serde_json::Value;
use std::io::{BufRead, BufReader, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::LazyLock;
use std::time::{Duration, Instant};
use zonemesh_tests::edge::{
    EDGE_ZONE, EMPTY_ZONE, EdgeLab, LabOptions, UPSTREAM_MARKER, norm_serial, s_client,
};
use zonemesh_tests::nginx::{Nginx, Site};
use zonemesh_tests::{browser, openssl, run, run_ok, tlsprobe};

const OWNER: &str = "owner@portal.test";
const PASSWORD: &str = "a portal owner's passphrase";
/// The domain nginx serves from the first edge's files.
const FILES_DOMAIN: &str = "files.portal.test";

struct Shared {
    lab: EdgeLab,
    nginx: Option<Nginx>,
    nginx_addr: SocketAddr,
}

static LAB: LazyLock<Result<Shared, String>> =
    LazyLock::new(|| setup().map_err(|e| format!("{e:#}")));

fn skip() -> Option<String> {
    zonemesh_tests::edge::skip_reason(false)
}

fn shared() -> &'static Shared {
    match &*LAB {
        Ok(s) => s,
        Err(e) => panic!("lab setup failed: {e}"),
    }
}

/// The lab: controller, nginx pre-seeded with a certificate of ours for `FILES_DOMAIN`
/// (so `nginx -s reload` has a running nginx from the start), then the edges.
fn setup() -> Result<Shared> {
    let t = Instant::now();
    let mut lab = EdgeLab::new(LabOptions {
        tag: 21,
        acme: false,
        bin_dir: None,
    })?;
    lab.add_user(OWNER, "portal-owner", PASSWORD);
    lab.add_domain(FILES_DOMAIN, "internal", OWNER, EDGE_ZONE)?;
    let files = lab.dir.join("edge-0-files");
    let site_dir = files.join(FILES_DOMAIN);
    std::fs::create_dir_all(&site_dir)?;
    let (nginx, nginx_addr) = if zonemesh_tests::nginx::installed() {
        seed_files(&lab, &site_dir)?;
        let addr = SocketAddr::from(([127, 0, 0, 1], zonemesh_tests::cluster::free_port()));
        let ng = Nginx::start(
            &lab.dir.join("nginx"),
            &[Site {
                listen: addr,
                server_name: FILES_DOMAIN.into(),
                cert: site_dir.join("fullchain.pem"),
                key: site_dir.join("privkey.pem"),
                staple: Some(site_dir.join("ocsp.der")),
                body: "nginx".into(),
            }],
            1,
            None,
            Some(&lab.janitor),
        )?;
        (Some(ng), addr)
    } else {
        (None, SocketAddr::from(([127, 0, 0, 1], 1)))
    };
    let reload = nginx.as_ref().map(Nginx::reload_command);
    lab.add_edge(true, reload.as_deref())?;
    lab.add_edge(false, None)?;
    let waited = lab.wait_edges_connected(Duration::from_secs(30))?;
    println!(
        "lab up in {:?} (edges connected {waited:?} after the last start)",
        t.elapsed()
    );
    Ok(Shared {
        lab,
        nginx,
        nginx_addr,
    })
}

/// A certificate for `FILES_DOMAIN` from `ca issue-tls` and its OCSP response from the
/// controller's responder, where the edge will write its own.
fn seed_files(lab: &EdgeLab, site_dir: &Path) -> Result<()> {
    let out = lab.dir.join("seed");
    lab.ctl.admin_ok(&[
        "ca",
        "issue-tls",
        "--dns",
        FILES_DOMAIN,
        "--out-dir",
        out.to_str().context("path")?,
    ])?;
    let chain = std::fs::read_to_string(out.join("chain.pem"))?;
    let certs = zonemesh_tests::edge::pem_certs(&chain);
    std::fs::write(site_dir.join("fullchain.pem"), &chain)?;
    std::fs::copy(out.join("key.pem"), site_dir.join("privkey.pem"))?;
    std::fs::write(out.join("leaf.pem"), &certs[0])?;
    std::fs::write(out.join("issuer.pem"), &certs[1])?;
    std::fs::write(
        out.join("root.pem"),
        lab.ctl.admin_ok(&["ca", "export", "--root"])?,
    )?;
    run_ok(
        openssl(&[
            "ocsp",
            "-issuer",
            "issuer.pem",
            "-cert",
            "leaf.pem",
            "-CAfile",
            "root.pem",
        ])
        .args(["-url", &format!("http://{}/ocsp", lab.ctl.pki)])
        .arg("-respout")
        .arg(site_dir.join("ocsp.der"))
        .current_dir(&out),
    )?;
    Ok(())
}

/// Add an internal domain owned by `OWNER` on the edge zone and deploy it with the CLI;
/// returns its serial once every edge serves it.
fn deploy_new(lab: &EdgeLab, name: &str) -> Result<String> {
    lab.add_domain(name, "internal", OWNER, EDGE_ZONE)?;
    deploy_cli(lab, name)
}

/// `domain deploy NAME` must exit 0; returns the serial, checked on every edge.
fn deploy_cli(lab: &EdgeLab, name: &str) -> Result<String> {
    let out = lab.ctl.admin(&["domain", "deploy", name])?;
    if !out.status.success() {
        bail!(
            "domain deploy {name} failed ({}): {}{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            lab.logs()
        );
    }
    let d = lab.domain(name)?;
    let serial = d["serial_hex"]
        .as_str()
        .with_context(|| format!("no serial after deploy: {d}"))?
        .to_string();
    assert_eq!(d["state"], "deployed", "{d}");
    assert_eq!(d["edges_total"], lab.edges.len(), "{d}");
    assert_eq!(d["edges_serving"], lab.edges.len(), "{d}");
    // Exit 0 means served on every edge already: no waiting here.
    lab.wait_served(name, &norm_serial(&serial), Duration::from_secs(1))?;
    Ok(norm_serial(&serial))
}

fn served_serial(addr: SocketAddr, sni: &str) -> Result<String> {
    Ok(norm_serial(&tlsprobe::fetch(addr, sni)?.serial()?))
}

/// The serial `openssl s_client` sees (leaf), through `openssl x509`.
fn openssl_serial(s_client_out: &str) -> Result<String> {
    let leaf = zonemesh_tests::edge::s_client_chain(s_client_out)
        .into_iter()
        .next()
        .with_context(|| format!("no certificate from s_client:\n{s_client_out}"))?;
    let dir = tempfile::tempdir()?;
    let p = zonemesh_tests::write(dir.path(), "leaf.pem", leaf);
    let out = run_ok(&mut openssl(&[
        "x509",
        "-noout",
        "-serial",
        "-in",
        p.to_str().context("path")?,
    ]))?;
    Ok(norm_serial(out.trim().trim_start_matches("serial=")))
}

fn cert_status(s_client_out: &str) -> Option<&str> {
    s_client_out
        .lines()
        .find_map(|l| l.trim().strip_prefix("Cert Status: "))
}

#[test]
fn internal_certificate_staples_good_then_revoked_within_10s_of_ca_revoke() -> Result<()> {
    if let Some(why) = skip() {
        println!("skipped: {why}");
        return Ok(());
    }
    let s = shared();
    let lab = &s.lab;
    let name = "staple.portal.test";
    let serial = deploy_new(lab, name)?;
    let d = lab.domain(name)?;
    assert_eq!(d["issuer"], "internal");
    // 24 hours by default.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let left = d["not_after_unix"]
        .as_u64()
        .context("not_after_unix")?
        .saturating_sub(now);
    assert!(
        (23 * 3600..=24 * 3600 + 600).contains(&left),
        "lifetime left {left} s: {d}"
    );
    let serial_hex = d["serial_hex"].as_str().context("serial")?.to_string();
    for e in &lab.edges {
        // The staple is fetched after the certificate is installed: wait for it briefly.
        let deadline = Instant::now() + Duration::from_secs(10);
        let text = loop {
            let text = s_client(e.https(), name, true)?;
            if cert_status(&text).is_some() || Instant::now() > deadline {
                break text;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        assert!(
            text.contains("OCSP Response Status: successful"),
            "{}: no stapled OCSP response:\n{text}",
            e.name
        );
        assert_eq!(cert_status(&text), Some("good"), "{}:\n{text}", e.name);
        assert_eq!(openssl_serial(&text)?, serial);
        // RSA-2048 / SHA-256 from our CA, with our responder in the AIA.
        let leaf = &zonemesh_tests::edge::s_client_chain(&text)[0];
        let dir = tempfile::tempdir()?;
        let p = zonemesh_tests::write(dir.path(), "leaf.pem", leaf);
        let x = run_ok(&mut openssl(&[
            "x509",
            "-noout",
            "-text",
            "-in",
            p.to_str().unwrap(),
        ]))?;
        assert!(x.contains("Public-Key: (2048 bit)"), "{x}");
        assert!(x.contains("sha256WithRSAEncryption"), "{x}");
        assert!(
            x.contains(&format!("OCSP - URI:http://{}/ocsp", lab.ctl.pki)),
            "AIA names our responder: {x}"
        );
    }

    let revoked_at = Instant::now();
    lab.ctl.admin_ok(&[
        "ca",
        "revoke",
        "--serial",
        &serial_hex,
        "--reason",
        "key-compromise",
    ])?;
    for e in &lab.edges {
        loop {
            let text = s_client(e.https(), name, true)?;
            if cert_status(&text) == Some("revoked") {
                break;
            }
            if revoked_at.elapsed() > Duration::from_secs(10) {
                bail!(
                    "{}: staple still {:?} 10 s after ca revoke:\n{text}\n{}",
                    e.name,
                    cert_status(&text),
                    lab.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    println!(
        "every edge staples 'revoked' {:?} after ca revoke",
        revoked_at.elapsed()
    );
    Ok(())
}

/// Read one HTTP/1.1 response (Content-Length or chunked) from a kept-alive connection.
fn read_response(r: &mut impl BufRead) -> Result<(String, String)> {
    let mut head = String::new();
    loop {
        let mut l = String::new();
        if r.read_line(&mut l)? == 0 {
            bail!("connection closed in the response head: {head:?}");
        }
        if l == "\r\n" {
            break;
        }
        head.push_str(&l);
    }
    let lower = head.to_ascii_lowercase();
    let mut body = Vec::new();
    if let Some(len) = lower
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
    {
        body.resize(len, 0);
        r.read_exact(&mut body)?;
    } else if lower.contains("transfer-encoding: chunked") {
        loop {
            let mut size = String::new();
            r.read_line(&mut size)?;
            let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or("0"), 16)?;
            let mut chunk = vec![0u8; n + 2];
            r.read_exact(&mut chunk)?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    } else {
        bail!("response without a length on a kept-alive connection:\n{head}");
    }
    Ok((head, String::from_utf8_lossy(&body).into_owned()))
}

#[test]
fn hot_swap_keeps_an_open_connection_and_new_connections_get_the_new_certificate() -> Result<()> {
    if let Some(why) = skip() {
        println!("skipped: {why}");
        return Ok(());
    }
    let lab = &shared().lab;
    let name = "swap.portal.test";
    let old = deploy_new(lab, name)?;
    let edge = &lab.edges[1];

    // A client holds a connection open across the swap.
    let (cfg, _) = tlsprobe::recording_config();
    let conn = rustls::ClientConnection::new(cfg, name.to_string().try_into()?)?;
    let tcp = TcpStream::connect(edge.https())?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let ask = |tls: &mut rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
               path: &str|
     -> Result<(String, String)> {
        write!(tls, "GET {path} HTTP/1.1\r\nHost: {name}\r\n\r\n")?;
        tls.flush()?;
        read_response(&mut BufReader::new(tls))
    };
    let (head, body) = ask(&mut tls, "/before-swap")?;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        body.contains(UPSTREAM_MARKER) && body.contains("/before-swap"),
        "{body}"
    );
    let held_serial = norm_serial(&zonemesh_tests::cluster::cert_serial(
        tls.conn.peer_certificates().context("peer certificates")?[0].as_ref(),
    )?);
    assert_eq!(held_serial, old);

    let new = deploy_cli(lab, name)?;
    assert_ne!(new, old, "a deploy issues a new certificate");
    assert_eq!(
        served_serial(edge.https(), name)?,
        new,
        "new connections get the new one"
    );

    // The held connection still works, on the certificate it was opened with.
    let (head, body) = ask(&mut tls, "/after-swap")?;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        body.contains(UPSTREAM_MARKER) && body.contains("/after-swap"),
        "{body}"
    );
    Ok(())
}

#[test]
fn testssl_finds_only_tls12_13_forward_secrecy_hsts_and_ocsp_stapling() -> Result<()> {
    if let Some(why) = skip() {
        println!("skipped: {why}");
        return Ok(());
    }
    if !zonemesh_tests::have("testssl") {
        println!("skipped: testssl not installed");
        return Ok(());
    }
    let lab = &shared().lab;
    let name = "testssl.portal.test";
    deploy_new(lab, name)?;
    let edge = &lab.edges[0];
    // The staple is there before testssl looks.
    let deadline = Instant::now() + Duration::from_secs(10);
    while tlsprobe::fetch(edge.https(), name)?.ocsp.is_empty() {
        if Instant::now() > deadline {
            bail!("no staple on {}\n{}", edge.name, lab.logs());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let dir = tempfile::tempdir()?;
    let json = dir.path().join("testssl.json");
    let started = Instant::now();
    let out = run(Command::new("testssl")
        .args([
            "--quiet",
            "--color",
            "0",
            "--warnings",
            "off",
            "--nodns",
            "none",
        ])
        .args(["--openssl-timeout", "5", "--jsonfile"])
        .arg(&json)
        .args(["-p", "-f", "-h", "-S", "--ip", &edge.ip.to_string()])
        .arg(format!("https://{name}:443")))?;
    println!("testssl ran {:?}", started.elapsed());
    let findings: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(&json).with_context(|| {
            format!(
                "testssl wrote no JSON ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })?)?;
    let finding = |id: &str| -> String {
        findings
            .iter()
            .find(|f| f["id"] == id)
            .and_then(|f| f["finding"].as_str())
            .unwrap_or("<missing>")
            .to_string()
    };
    for old in ["SSLv2", "SSLv3", "TLS1", "TLS1_1"] {
        assert!(
            finding(old).starts_with("not offered"),
            "{old}: {}",
            finding(old)
        );
    }
    assert!(
        finding("TLS1_2").starts_with("offered"),
        "TLS1_2: {}",
        finding("TLS1_2")
    );
    assert!(
        finding("TLS1_3").starts_with("offered"),
        "TLS1_3: {}",
        finding("TLS1_3")
    );
    // testssl 3.0 says PFS, later versions FS.
    let either = |a: &str, b: &str| {
        let f = finding(a);
        if f == "<missing>" { finding(b) } else { f }
    };
    let fs = either("PFS", "FS");
    assert!(fs.starts_with("offered"), "forward secrecy: {fs}");
    let fs_ciphers = either("PFS_ciphers", "FS_ciphers");
    assert!(
        fs_ciphers.contains("TLS_AES") || fs_ciphers.contains("ECDHE"),
        "{fs_ciphers}"
    );
    let hsts = either("HSTS_time", "HSTS");
    let secs = hsts
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse::<u64>().ok())
        .max()
        .unwrap_or(0);
    assert!(secs >= 31_536_000, "HSTS max-age below a year: {hsts}");
    assert!(
        finding("OCSP_stapling").starts_with("offered"),
        "OCSP_stapling: {}",
        finding("OCSP_stapling")
    );
    Ok(())
}

#[test]
fn nginx_serves_the_edge_files_and_their_staple_after_a_deploy() -> Result<()> {
    if let Some(why) = skip() {
        println!("skipped: {why}");
        return Ok(());
    }
    let s = shared();
    let Some(nginx) = &s.nginx else {
        println!("skipped: nginx not installed");
        return Ok(());
    };
    let lab = &s.lab;
    let before = served_serial(s.nginx_addr, FILES_DOMAIN)?;
    let serial = deploy_cli(lab, FILES_DOMAIN)?;
    assert_ne!(before, serial);
    let site = lab.edges[0]
        .files_dir
        .as_ref()
        .context("edge 0 writes files")?
        .join(FILES_DOMAIN);
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(site.join("privkey.pem"))?
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    // nginx reloads when the edge has written the certificate and its staple.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let text = s_client(s.nginx_addr, FILES_DOMAIN, true)?;
        let got = openssl_serial(&text).unwrap_or_default();
        if got == serial && cert_status(&text) == Some("good") {
            assert!(text.contains("OCSP Response Status: successful"), "{text}");
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "nginx serves {got} (want {serial}), staple {:?}\n{text}\nnginx:\n{}\n{}",
                cert_status(&text),
                nginx.log(),
                lab.logs()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

#[test]
fn domain_deploy_exits_0_when_every_edge_serves_and_fails_with_the_reason_without_edges()
-> Result<()> {
    if let Some(why) = skip() {
        println!("skipped: {why}");
        return Ok(());
    }
    let lab = &shared().lab;
    let name = "cli.portal.test";
    let t = Instant::now();
    let serial = deploy_new(lab, name)?;
    println!(
        "domain deploy: served on {} edges in {:?}",
        lab.edges.len(),
        t.elapsed()
    );
    for e in &lab.edges {
        assert_eq!(served_serial(e.https(), name)?, serial, "{}", e.name);
    }

    let lonely = "nowhere.portal.test";
    lab.add_domain(lonely, "internal", OWNER, EMPTY_ZONE)?;
    let t = Instant::now();
    let out = lab.ctl.admin(&["domain", "deploy", lonely])?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!(
        "domain deploy without edges: {} after {:?}: {text}",
        out.status,
        t.elapsed()
    );
    assert!(
        !out.status.success(),
        "deploy with no edge must fail: {text}"
    );
    assert!(
        text.to_ascii_lowercase().contains("edge"),
        "the reason names the missing edges: {text}"
    );
    let d = lab.domain(lonely)?;
    assert_ne!(d["state"], "deployed", "{d}");
    assert_eq!(d["edges_total"], 0, "{d}");

    let out = lab
        .ctl
        .admin(&["domain", "deploy", "unknown.portal.test"])?;
    assert!(
        !out.status.success(),
        "an unknown domain cannot be deployed"
    );
    Ok(())
}

#[test]
fn chromium_portal_owner_presses_deploy_certificate_and_sees_it_deployed() -> Result<()> {
    if let Some(why) = skip().or_else(browser::skip_reason) {
        println!("skipped: {why}");
        return Ok(());
    }
    let lab = &shared().lab;
    let name = "browser.portal.test";
    lab.add_domain(name, "internal", OWNER, EDGE_ZONE)?;
    let base = format!("https://localhost:{}", lab.ctl.https.port());
    let b = browser::Browser::start()?;
    b.sign_in(&base, OWNER, PASSWORD, "/dashboard")?;
    b.goto(&format!("{base}/domains"))?;
    b.wait_url("/domains", Duration::from_secs(10))?;
    let page = b.source()?;
    assert!(page.contains(name), "the owner's domain is listed: {page}");
    // The row of our domain, its Deploy Certificate button.
    b.click_xpath(&format!(
        "//tr[contains(., '{name}')]//button[contains(., 'Deploy Certificate')] | \
         //*[@data-domain='{name}']//button[contains(., 'Deploy Certificate')]"
    ))?;
    let pressed = Instant::now();
    // The page follows the job; reload it when it does not update by itself.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let row = b
            .script(&format!(
                "for (const r of document.querySelectorAll('tr, [data-domain]')) \
                 {{ if (r.textContent.includes('{name}') && !r.querySelector('tr')) return r.textContent; }} return '';"
            ))?
            .as_str()
            .unwrap_or_default()
            .to_string();
        if row.contains("deployed") {
            println!(
                "page shows '{}' {:?} after the press",
                row.split_whitespace().collect::<Vec<_>>().join(" "),
                pressed.elapsed()
            );
            break;
        }
        if row.contains("failed") || Instant::now() > deadline {
            bail!("domain row: {row}\n{}", lab.logs());
        }
        std::thread::sleep(Duration::from_millis(500));
        // Give the page's own updates a few seconds, then reload it.
        if !b.url()?.ends_with("/domains") || pressed.elapsed() > Duration::from_secs(5) {
            b.goto(&format!("{base}/domains"))?;
        }
    }
    let d = lab.domain(name)?;
    assert_eq!(d["state"], "deployed", "{d}");
    let serial = norm_serial(d["serial_hex"].as_str().context("serial")?);
    lab.wait_served(name, &serial, Duration::from_secs(5))?;
    Ok(())
}
