//! Who can get an address blocked on every agent, and what may never be blocked.
//!
//! Agent-reported events whose source can be forged (WireGuard handshakes over UDP) never
//! block; one enrolled node alone never blocks; the controller, the nodes and special
//! addresses are never blocked by any path; `block list/remove` work and a removal reaches
//! watchers at once; strings from clients are escaped on the CLI and in the log, and capped.
//! The namespace test needs root and is skipped with a reason otherwise; build the binaries
//! first (`cargo build --workspace --bins`).

use anyhow::{Context, Result, bail};
use serde_json::Value;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use zonemesh_proto as pb;
use zonemesh_tests::cluster::{Controller, NodeCreds, mesh_channel, next_update};
use zonemesh_tests::{bin, is_root};

/// An address of the controller besides its loopback listeners (one of its TLS names).
const CTL_NAME_IP: &str = "198.18.7.1";

/// A controller that also calls itself `CTL_NAME_IP`, with zones `a` and `b`.
fn controller(dir: &std::path::Path) -> Controller {
    let mut ctl = Controller::init(dir).unwrap();
    ctl.serve_args = ["localhost", "127.0.0.1", CTL_NAME_IP]
        .iter()
        .flat_map(|n| ["--tls-name".to_string(), n.to_string()])
        .collect();
    ctl.start().unwrap();
    ctl.zone_add("a", "100.64.1.0/24").unwrap();
    ctl.zone_add("b", "100.64.2.0/24").unwrap();
    ctl
}

/// Enroll `name` with a pooled key and announce `endpoint`.
async fn enroll(
    ctl: &Controller,
    token: &str,
    name: &str,
    slot: usize,
    endpoint: &str,
) -> NodeCreds {
    let creds = ctl.enroll_pooled(token, name, slot).await;
    mesh(ctl, &creds)
        .await
        .update_endpoints(pb::UpdateEndpointsRequest {
            endpoints: vec![endpoint.into()],
        })
        .await
        .unwrap();
    creds
}

async fn mesh(
    ctl: &Controller,
    creds: &NodeCreds,
) -> pb::mesh_client::MeshClient<tonic::transport::Channel> {
    pb::mesh_client::MeshClient::new(mesh_channel(&ctl.grpc_addr(), creds).await.unwrap())
}

fn event(kind: &str, source: &str) -> pb::SecurityEvent {
    pb::SecurityEvent {
        kind: kind.into(),
        source: source.into(),
        detail: String::new(),
        at_unix: 0,
    }
}

/// One `ReportEvents` call: every (kind, source) `times` times.
async fn report(ctl: &Controller, creds: &NodeCreds, pairs: &[(&str, &str)], times: usize) {
    let events = (0..times)
        .flat_map(|_| pairs.iter().map(|(k, s)| event(k, s)))
        .collect();
    mesh(ctl, creds)
        .await
        .report_events(pb::SecurityEvents { events })
        .await
        .unwrap();
}

/// `block list --json`, addresses only.
fn blocked(ctl: &Controller) -> Vec<String> {
    let v: Value =
        serde_json::from_str(&ctl.admin_ok(&["block", "list", "--json"]).unwrap()).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|b| b["address"].as_str().unwrap().to_string())
        .collect()
}

fn audit_records(ctl: &Controller) -> Vec<Value> {
    ctl.admin_ok(&["audit", "--json"])
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

const SSH: &str = "ssh.auth_failure";
const HANDSHAKE: &str = "wireguard.invalid_handshake";
const UNKNOWN_KEY: &str = "wireguard.unknown_key";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_need_corroboration_and_never_name_the_controller_or_the_nodes() {
    let tmp = TempDir::new().unwrap();
    let ctl = controller(tmp.path());
    let (ta, tb) = (ctl.token("a", 2).unwrap(), ctl.token("b", 2).unwrap());
    let a1 = enroll(&ctl, &ta, "a1", 1, "198.18.5.11:51820").await;
    let a2 = enroll(&ctl, &ta, "a2", 2, "198.18.5.12:51820").await;
    let b1 = enroll(&ctl, &tb, "b1", 3, "198.18.5.21:51820").await;
    let b2 = enroll(&ctl, &tb, "b2", 4, "[2001:db8::22]:51820").await;
    let b1_overlay = ctl
        .nodes()
        .unwrap()
        .into_iter()
        .find(|n| n["node"] == "b1")
        .unwrap()["overlay_ip"]
        .as_str()
        .unwrap()
        .to_string();

    // Loopback, unspecified, multicast, the controller and other nodes, 25 times each
    // under every kind, from one node and then corroborated by a second: nothing.
    let protected = [
        "127.0.0.1:40000",
        "[::1]:40000",
        "0.0.0.0",
        "224.0.0.1",
        "169.254.9.9:1",
        "198.18.7.1:7443",
        "198.18.5.21:51820",
        "[2001:db8::22]:51820",
        b1_overlay.as_str(),
    ];
    for kind in [HANDSHAKE, UNKNOWN_KEY, SSH] {
        let pairs: Vec<(&str, &str)> = protected.iter().map(|s| (kind, *s)).collect();
        report(&ctl, &a1, &pairs, 25).await;
    }
    let pairs: Vec<(&str, &str)> = protected.iter().map(|s| (SSH, *s)).collect();
    report(&ctl, &a2, &pairs, 25).await;
    assert_eq!(blocked(&ctl), Vec::<String>::new());

    // A test address reported 50 times by one node: not blocked.
    for _ in 0..5 {
        report(&ctl, &a1, &[(SSH, "198.18.0.50:2222")], 10).await;
    }
    // Forgeable kinds from two nodes: not blocked either.
    report(&ctl, &a1, &[(HANDSHAKE, "198.18.0.60:51820")], 30).await;
    report(&ctl, &b1, &[(HANDSHAKE, "198.18.0.60:51820")], 30).await;
    assert_eq!(blocked(&ctl), Vec::<String>::new());

    // A second node corroborates with an authenticated kind: blocked, evidence audited.
    report(&ctl, &b1, &[(SSH, "198.18.0.50:2222")], 3).await;
    assert_eq!(blocked(&ctl), vec!["198.18.0.50".to_string()]);
    let audit = audit_records(&ctl);
    let rec = audit
        .iter()
        .find(|r| r["kind"] == "source.blocked" && r["source"] == "198.18.0.50")
        .unwrap_or_else(|| panic!("no audit record of the block: {audit:?}"));
    let detail = rec["detail"].as_str().unwrap();
    for part in ["a/a1", "b/b1", SSH, "2 nodes"] {
        assert!(detail.contains(part), "{part} missing in {detail}");
    }

    // Two nodes naming 20 distinct addresses: at most the per-node bound gets blocked.
    let many: Vec<String> = (1..=20).map(|i| format!("198.18.1.{i}:22")).collect();
    let pairs: Vec<(&str, &str)> = many.iter().map(|s| (SSH, s.as_str())).collect();
    report(&ctl, &a2, &pairs, 3).await;
    report(&ctl, &b2, &pairs, 3).await;
    let now = blocked(&ctl);
    assert_eq!(now.len(), 1 + 5, "{now:?}");

    // The report rate of one node is bounded.
    let mut refused = 0;
    for _ in 0..40 {
        let r = mesh(&ctl, &a1)
            .await
            .report_events(pb::SecurityEvents {
                events: vec![event(HANDSHAKE, "198.18.0.70:1")],
            })
            .await;
        if r.is_err_and(|s| s.code() == tonic::Code::ResourceExhausted) {
            refused += 1;
        }
    }
    assert!(refused > 0, "40 reports in a burst were all accepted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_add_refuses_protected_addresses_and_removal_reaches_watchers() {
    let tmp = TempDir::new().unwrap();
    let ctl = controller(tmp.path());
    let token = ctl.token("a", 1).unwrap();
    let a1 = enroll(&ctl, &token, "a1", 1, "198.18.5.11:51820").await;

    for (addr, why) in [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("224.0.0.1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("fe80::1", "link-local"),
        (CTL_NAME_IP, "controller"),
        ("198.18.5.11", "a/a1"),
        ("100.64.1.1", "a/a1"),
    ] {
        let out = ctl.admin(&["block", "add", addr, "--for", "1h"]).unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "block add {addr} was accepted");
        assert!(
            err.contains("never blocked") && err.contains(why) && err.trim().lines().count() == 1,
            "block add {addr}: {err}"
        );
    }
    assert_eq!(blocked(&ctl), Vec::<String>::new());

    ctl.admin_ok(&[
        "block",
        "add",
        "198.18.0.99",
        "--for",
        "1h",
        "--reason",
        "scanner",
    ])
    .unwrap();
    let human = ctl.admin_ok(&["block", "list"]).unwrap();
    assert!(
        human.contains("198.18.0.99") && human.contains("scanner"),
        "{human}"
    );
    let v: Value =
        serde_json::from_str(&ctl.admin_ok(&["block", "list", "--json"]).unwrap()).unwrap();
    let until = v[0]["until_unix"].as_u64().unwrap();
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(until.abs_diff(now + 3600) < 60, "until {until}, now {now}");

    // An open Watch stream sees the block go within a second.
    let mut w = mesh(&ctl, &a1)
        .await
        .watch(pb::WatchRequest::default())
        .await
        .unwrap()
        .into_inner();
    let Some(pb::mesh_update::Kind::Snapshot(snap)) = next_update(&mut w, Duration::from_secs(10))
        .await
        .unwrap()
        .unwrap()
        .kind
    else {
        panic!("no snapshot first");
    };
    assert!(snap.blocklist.iter().any(|b| b.address == "198.18.0.99"));
    let started = Instant::now();
    let out = ctl.admin_ok(&["block", "remove", "198.18.0.99"]).unwrap();
    assert!(out.contains("198.18.0.99"), "{out}");
    let u = next_update(&mut w, Duration::from_secs(1))
        .await
        .unwrap()
        .unwrap();
    let took = started.elapsed();
    let Some(pb::mesh_update::Kind::Delta(d)) = u.kind else {
        panic!("not a delta: {u:?}");
    };
    assert_eq!(d.unblocked, vec!["198.18.0.99".to_string()]);
    println!("block removal reached a watcher {took:?} after the CLI started");
    assert_eq!(blocked(&ctl), Vec::<String>::new());
    let out = ctl.admin(&["block", "remove", "198.18.0.99"]).unwrap();
    assert!(!out.status.success(), "removing an absent block succeeded");
    assert!(
        audit_records(&ctl)
            .iter()
            .any(|r| r["kind"] == "source.unblocked" && r["subject"] == "198.18.0.99")
    );
    // A new watcher's snapshot no longer lists it.
    let mut w = mesh(&ctl, &a1)
        .await
        .watch(pb::WatchRequest::default())
        .await
        .unwrap()
        .into_inner();
    let Some(pb::mesh_update::Kind::Snapshot(snap)) = next_update(&mut w, Duration::from_secs(10))
        .await
        .unwrap()
        .unwrap()
        .kind
    else {
        panic!("no snapshot first");
    };
    assert!(snap.blocklist.is_empty(), "{:?}", snap.blocklist);
}

/// A minimal HTTPS/1.1 exchange with the controller's web side (one request per
/// connection); returns status line, headers and body as text.
async fn https(ctl: &Controller, request: String) -> String {
    let pem = ctl.admin_ok(&["ca", "export", "--root"]).unwrap();
    let root = zonemesh_ca::pem_blocks("CERTIFICATE", &pem)
        .unwrap()
        .remove(0);
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls_pki_types::CertificateDer::from(root))
        .unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(ctl.https).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out).await;
    String::from_utf8_lossy(&out).into_owned()
}

fn form_encode(v: &str) -> String {
    v.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Submit the sign-in form with `email` (and a wrong password).
async fn sign_in(ctl: &Controller, email: &str) {
    let host = format!("localhost:{}", ctl.https.port());
    let page = https(
        ctl,
        format!("GET /signin HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
    )
    .await;
    let cookie = page
        .lines()
        .find_map(|l| {
            l.strip_prefix("set-cookie: ")
                .or_else(|| l.strip_prefix("Set-Cookie: "))
        })
        .and_then(|c| c.split(';').next())
        .unwrap_or_else(|| panic!("no cookie: {page}"))
        .to_string();
    let i = page.find("name=\"csrf\" value=\"").expect("csrf field") + 19;
    let csrf = page[i..].split('"').next().unwrap();
    let body = format!(
        "csrf={}&email={}&password=wrong-password-1",
        form_encode(csrf),
        form_encode(email)
    );
    let resp = https(
        ctl,
        format!(
            "POST /signin HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nCookie: {cookie}\r\n\
             Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    )
    .await;
    assert!(
        resp.starts_with("HTTP/1.1 401"),
        "{}",
        &resp[..resp.len().min(300)]
    );
}

fn has_control(s: &str) -> bool {
    s.chars()
        .any(|c| (c.is_control() && c != '\n') || ('\u{80}'..='\u{9f}').contains(&c))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strings_from_clients_are_escaped_on_the_cli_and_in_the_log_and_capped() {
    let tmp = TempDir::new().unwrap();
    let ctl = controller(tmp.path());
    let token = ctl.token("a", 1).unwrap();
    let a1 = enroll(&ctl, &token, "a1", 1, "198.18.5.11:51820").await;

    // An e-mail that clears the screen and sets the window title, and a 15 KB one.
    sign_in(&ctl, "\x1b[2J\x1b]0;owned\x07evil@x.test").await;
    let long = format!("{}@x.test", "a".repeat(15_000));
    sign_in(&ctl, &long).await;
    let human = ctl.admin_ok(&["audit"]).unwrap();
    assert!(
        !has_control(&human),
        "raw control characters in `audit`:\n{human:?}"
    );
    assert!(human.contains("\\x1b[2j"), "{human}");
    let largest = ctl
        .admin_ok(&["audit", "--json"])
        .unwrap()
        .lines()
        .map(str::len)
        .max()
        .unwrap();
    assert!(largest < 2048, "an audit record of {largest} bytes");
    let shown = human.lines().map(str::len).max().unwrap();
    assert!(shown < 2048, "an audit line of {shown} bytes");

    // A peer name with an escape sequence and a newline in a health report: not an
    // enrolled node, so `health` leaves it out.
    mesh(&ctl, &a1)
        .await
        .report_health(pb::HealthReport {
            peers: vec![pb::PeerHealth {
                peer: format!("\x1b[31mred\nFORGED row{}", "x".repeat(10_000)),
                loss: 0.0,
                rtt_micros: 100,
            }],
        })
        .await
        .unwrap();
    let health = ctl.admin_ok(&["health"]).unwrap();
    assert!(
        !has_control(&health),
        "raw control characters in `health`:\n{health:?}"
    );
    assert_eq!(health.lines().count(), 1, "{health}");
    assert!(!health.contains("FORGED"), "{health}");

    // An event kind that tries to forge a line of the controller log.
    report(
        &ctl,
        &a1,
        &[(
            "x\nFORGED 2026-01-01T00:00:00Z INFO admin signed in\x1b[8m",
            "198.18.0.9:1",
        )],
        1,
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !ctl.log_text().contains("FORGED") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = ctl.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("FORGED"))
        .expect("event never logged");
    assert!(
        line.contains("x\\x0aFORGED"),
        "newline not escaped: {line:?}"
    );
    assert!(line.contains("\\x1b[8m"), "ESC not escaped: {line:?}");
    assert!(!line.contains("\x1b[8m"), "raw ESC in the log: {line:?}");
    for line in log.lines() {
        assert!(!line.starts_with("FORGED"), "forged log line: {line}");
    }
}

// ----- forged handshakes from a namespace without credentials (root) -----

struct Lab {
    pfx: String,
    dir: PathBuf,
}

impl Lab {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("bash");
        c.arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/mesh-lab.sh"))
            .args(args)
            .env("PFX", &self.pfx)
            .env("DIR", &self.dir)
            .env("LAB_ZONES", "a b")
            .env("LAB_NODES", "1")
            .env("BIN", bin("zonemesh-agent").parent().expect("bin dir"));
        c
    }

    fn run(&self, args: &[&str]) -> Result<String> {
        let out = self.cmd(args).stdin(Stdio::null()).output()?;
        if !out.status.success() {
            bail!(
                "mesh-lab {args:?} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn controller(&self, args: &[&str]) -> Result<String> {
        let mut c = Command::new(bin("zonemesh-controller"));
        c.arg("--data-dir").arg(self.dir.join("ctl")).args(args);
        zonemesh_tests::run_ok(&mut c)
    }

    fn ping(&self, from: &str, to: &str) -> Result<bool> {
        let ip = self.run(&["overlay", to])?.trim().to_string();
        Ok(self
            .cmd(&["x", from, "ping", "-c", "1", "-W", "1", &ip])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?
            .success())
    }

    /// Elements of the agent's nftables block sets (empty when the table is absent).
    fn nft_elements(&self, node: &str) -> Result<String> {
        let out = self
            .cmd(&["x", node, "nft", "-j", "list", "table", "inet", "zonemesh"])
            .output()?;
        if !out.status.success() {
            return Ok(String::new());
        }
        let v: Value = serde_json::from_slice(&out.stdout)?;
        let elems: Vec<String> = v["nftables"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|o| o["set"]["elem"].as_array())
            .flatten()
            .map(Value::to_string)
            .collect();
        Ok(elems.join(" "))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = self
            .cmd(&["down"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Sends `count` 148-byte datagrams that start like a WireGuard handshake initiation
/// (`01 00 00 00`, then garbage) from raw sockets, so each can carry any source address.
const FORGE: &str = r#"
import os, socket, struct, sys
dst, count, sources = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
for i in range(count):
    src = sources[i % len(sources)]
    payload = b"\x01\x00\x00\x00" + os.urandom(144)
    udp = struct.pack("!HHHH", 40000 + i % 1000, 51820, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), i & 0xffff, 0, 64, 17, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    s.sendto(ip + udp, (dst, 0))
"#;

#[test]
fn forged_handshakes_from_a_namespace_without_credentials_block_nothing() -> Result<()> {
    if !is_root() {
        println!("skipped: not root (network namespaces and TUN need it)");
        return Ok(());
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        println!("skipped: /dev/net/tun missing");
        return Ok(());
    }
    if Command::new("python3").arg("-V").output().is_err() {
        println!("skipped: python3 missing (the forger uses raw sockets from it)");
        return Ok(());
    }
    let pfx = format!("zb{}", std::process::id() % 10_000);
    let lab = Lab {
        dir: std::env::temp_dir().join(format!("zonemesh-lab-{pfx}")),
        pfx,
    };
    let _ = lab.run(&["down"]);
    lab.run(&["up"])?;
    // a1 is 198.18.100.11, b1 198.18.100.21, the controller 198.18.100.1.
    let deadline = Instant::now() + Duration::from_secs(15);
    while !lab.ping("a1", "b1")? {
        if Instant::now() > deadline {
            bail!("the two-node lab never connected");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    lab.run(&["host", "x9", "198.18.100.99"])?;
    let script = lab.dir.join("forge.py");
    std::fs::write(&script, FORGE)?;
    let script = script.to_str().context("path")?;
    // From its own address, and forging the controller's, the other node's and a bystander's.
    for (target, other) in [
        ("198.18.100.11", "198.18.100.21"),
        ("198.18.100.21", "198.18.100.11"),
    ] {
        lab.run(&[
            "x",
            "x9",
            "python3",
            script,
            target,
            "200",
            "198.18.100.99",
            "198.18.100.1",
            other,
            "198.18.100.77",
        ])?;
    }
    // The agents report within about 200 ms; give the controller time to count.
    let deadline = Instant::now() + Duration::from_secs(10);
    let log = lab.dir.join("controller.log");
    while !std::fs::read_to_string(&log)?.contains("wireguard.invalid_handshake") {
        if Instant::now() > deadline {
            bail!("the agents never reported the forged handshakes");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(2));
    let list: Value = serde_json::from_str(&lab.controller(&["block", "list", "--json"])?)?;
    assert_eq!(
        list,
        serde_json::json!([]),
        "forged packets got addresses blocked"
    );
    for node in ["a1", "b1"] {
        let elems = lab.nft_elements(node)?;
        assert!(elems.is_empty(), "{node} drops {elems}");
    }
    assert!(
        lab.ping("a1", "b1")? && lab.ping("b1", "a1")?,
        "the mesh broke"
    );
    // The controller is still reachable from both nodes' namespaces.
    for node in ["a1", "b1"] {
        lab.run(&["x", node, "ping", "-c", "1", "-W", "1", "198.18.100.1"])?;
    }
    Ok(())
}
