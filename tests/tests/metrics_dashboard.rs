//! A real controller on loopback with `--metrics-listen`: what nodes and operators do
//! (enrollments, a refused token, health reports, security events, a block, a wrong
//! sign-in, a revocation) shows on `/metrics` with bounded labels, the output passes
//! `promtool check metrics`, and headless Chromium sees the health reports as the
//! dashboard's heat map (coloured by class, the figures in the cells).

use anyhow::{Context, Result};
use serde_json::json;
use std::io::Write as _;
use std::process::{Command, Stdio};
use tempfile::TempDir;
use zonemesh_proto as pb;
use zonemesh_tests::browser::{self, Browser};
use zonemesh_tests::cluster::{
    Controller, enroll_rpc, enrollment_channel, free_port, mesh_channel, wg_key,
};
use zonemesh_tests::have;

const ADMIN: &str = "ops@corp.test";
const PASSWORD: &str = "a long enough passphrase here";

fn scrape(addr: &str, accept: Option<&str>) -> (String, String) {
    let mut c = Command::new("curl");
    c.args(["-sS", "--max-time", "10", "-D", "-"]);
    if let Some(a) = accept {
        c.args(["-H", &format!("Accept: {a}")]);
    }
    let out = c.arg(format!("http://{addr}/metrics")).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    (head.to_ascii_lowercase(), body.to_string())
}

fn promtool(text: &str) -> Option<String> {
    if !have("promtool") {
        return Some("promtool not installed (apt-get install prometheus)".into());
    }
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}\n--- input\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    None
}

async fn report_health(
    ctl: &Controller,
    creds: &zonemesh_tests::cluster::NodeCreds,
    rows: &[(&str, f32, u32)],
) {
    pb::mesh_client::MeshClient::new(mesh_channel(&ctl.grpc_addr(), creds).await.unwrap())
        .report_health(pb::HealthReport {
            peers: rows
                .iter()
                .map(|(peer, loss, rtt)| pb::PeerHealth {
                    peer: peer.to_string(),
                    loss: *loss,
                    rtt_micros: *rtt,
                })
                .collect(),
        })
        .await
        .unwrap();
}

/// A controller serving /metrics, with three nodes in two zones.
async fn controller(
    tmp: &TempDir,
) -> (Controller, String, Vec<zonemesh_tests::cluster::NodeCreds>) {
    let mut ctl = Controller::init(tmp.path()).unwrap();
    let metrics = format!("127.0.0.1:{}", free_port());
    ctl.serve_args = vec!["--metrics-listen".into(), metrics.clone()];
    ctl.start().unwrap();
    ctl.zone_add("eu", "100.64.1.0/24").unwrap();
    ctl.zone_add("us", "100.64.2.0/24").unwrap();
    let nodes = vec![
        ctl.enroll_in_zone("eu", "a", 0).await,
        ctl.enroll_in_zone("eu", "b", 1).await,
        ctl.enroll_in_zone("us", "c", 2).await,
    ];
    (ctl, metrics, nodes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_metrics_count_what_happened_and_pass_promtool() -> Result<()> {
    if !have("curl") {
        println!("skipped: curl not installed");
        return Ok(());
    }
    let tmp = TempDir::new()?;
    let (ctl, metrics, nodes) = controller(&tmp).await;

    // A refused enrollment.
    let ch = enrollment_channel(&ctl.grpc_addr(), &ctl.fingerprint).await?;
    let refused = enroll_rpc(
        ch,
        "not-a-token",
        "x",
        &zonemesh_tests::rsa4096(3),
        wg_key(3),
    )
    .await;
    assert!(refused.is_err());
    // Health with an unenrolled peer name, which must not become a label.
    report_health(
        &ctl,
        &nodes[0],
        &[
            ("us/c", 0.25, 1500),
            ("eu/b", 0.0, 300),
            ("ghost/zz", 1.0, 1),
        ],
    )
    .await;
    // Events: a known kind and an unknown one.
    let ev = |kind: &str| pb::SecurityEvent {
        kind: kind.into(),
        source: "198.51.100.7:2222".into(),
        detail: String::new(),
        at_unix: 0,
    };
    pb::mesh_client::MeshClient::new(mesh_channel(&ctl.grpc_addr(), &nodes[1]).await?)
        .report_events(pb::SecurityEvents {
            events: vec![
                ev("ssh.auth_failure"),
                ev("ssh.auth_failure"),
                ev("made-up\"kind\n"),
            ],
        })
        .await?;
    ctl.admin_ok(&["block", "add", "192.0.2.9", "--reason", "scanning"])?;
    ctl.admin_with_stdin(
        &["user", "add", "--email", ADMIN, "--role", "portal-owner"],
        &format!("{PASSWORD}\n"),
    );
    assert_eq!(
        ctl.curl_sign_in(tmp.path(), "127.0.0.1", ADMIN, "wrong password"),
        401
    );
    ctl.admin_ok(&["node", "revoke", "eu/b"])?;

    let (head, text) = scrape(&metrics, None);
    assert!(
        head.contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    for line in [
        "zonemesh_enrollments_total{result=\"ok\"} 3",
        "zonemesh_enrollments_total{result=\"refused\"} 1",
        "zonemesh_certificates_issued_total{kind=\"node\"} 3",
        "zonemesh_certificates_revoked_total 1",
        "zonemesh_security_events_total{kind=\"ssh.auth_failure\"} 2",
        "zonemesh_security_events_total{kind=\"other\"} 1",
        "zonemesh_blocks_added_total 1",
        "zonemesh_blocks_active 1",
        "zonemesh_signin_failure_total 1",
        "zonemesh_nodes_enrolled 2",
        "zonemesh_peer_loss_ratio{zone=\"eu\",node=\"a\",peer_zone=\"us\",peer=\"c\"} 0.25",
        "zonemesh_peer_rtt_seconds{zone=\"eu\",node=\"a\",peer_zone=\"us\",peer=\"c\"} 0.0015",
    ] {
        assert!(
            text.contains(&format!("{line}\n")),
            "missing {line:?} in\n{text}"
        );
    }
    // Only enrolled, unrevoked pairs have series; unknown kinds are not labels.
    assert!(
        !text.contains("ghost") && !text.contains("made-up"),
        "{text}"
    );
    assert!(
        !text.contains("peer=\"b\""),
        "revoked eu/b still has series:\n{text}"
    );
    let version: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("zonemesh_mesh_version "))
        .context("mesh version")?
        .parse()?;
    assert!(version >= 4, "{version}");
    match promtool(&text) {
        None => println!("promtool check metrics accepts the controller's /metrics"),
        Some(why) => println!("skipped promtool check: {why}"),
    }

    let (head, om) = scrape(
        &metrics,
        Some("application/openmetrics-text;version=1.0.0,text/plain;q=0.5"),
    );
    assert!(
        head.contains("content-type: application/openmetrics-text"),
        "{head}"
    );
    assert!(
        om.ends_with("# EOF\n") && om.contains("# TYPE zonemesh_blocks_added counter"),
        "{om}"
    );

    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_dashboard_shows_the_heat_map() -> Result<()> {
    if let Some(why) = browser::skip_reason()
        .or_else(|| (!have("oathtool")).then(|| "oathtool not installed".to_string()))
    {
        println!("skipped: {why}");
        return Ok(());
    }
    let tmp = TempDir::new()?;
    let (ctl, _metrics, nodes) = controller(&tmp).await;
    // eu/a loses 30% towards us/c; everything else is clean.
    report_health(&ctl, &nodes[0], &[("us/c", 0.3, 2500), ("eu/b", 0.0, 400)]).await;
    report_health(&ctl, &nodes[1], &[("us/c", 0.0, 2100), ("eu/a", 0.0, 380)]).await;
    report_health(&ctl, &nodes[2], &[("eu/a", 0.0, 2600), ("eu/b", 0.0, 2000)]).await;
    ctl.admin_with_stdin(
        &["user", "add", "--email", ADMIN, "--role", "admin"],
        &format!("{PASSWORD}\n"),
    );

    let base = format!("https://localhost:{}", ctl.https.port());
    let b = tokio::task::spawn_blocking(move || -> Result<Browser> {
        let b = Browser::start()?;
        // Waits for each page before the next step (the recovery codes before Continue).
        b.sign_in_new_admin(&base, ADMIN, PASSWORD)?;
        Ok(b)
    })
    .await??;

    let cell = |table: &str, from: &str, to: &str| -> Result<serde_json::Value> {
        b.script(&format!(
            "const c = document.querySelector('#{table} td[data-from=\"{from}\"][data-to=\"{to}\"]'); \
             return c ? [c.className, c.textContent, getComputedStyle(c).backgroundColor] : null"
        ))
    };
    assert_eq!(
        cell("node-heat", "eu/a", "us/c")?,
        json!(["h-bad", "30% · 2.50 ms", "rgb(249, 208, 208)"])
    );
    assert_eq!(
        cell("node-heat", "eu/b", "us/c")?,
        json!(["h-ok", "0% · 2.10 ms", "rgb(217, 242, 225)"])
    );
    let zone = cell("zone-heat", "eu", "us")?;
    assert_eq!(zone[0], "h-bad", "mean loss 15% from eu to us: {zone}");
    assert_eq!(zone[1], "15% · 2.30 ms", "{zone}");
    assert_eq!(cell("zone-heat", "us", "eu")?[0], "h-ok");
    let worst = b.script("return document.querySelector('#worst-pairs tbody tr').textContent")?;
    assert!(
        worst
            .as_str()
            .unwrap_or_default()
            .starts_with("eu/aus/c30%"),
        "{worst}"
    );
    // Readable without colours: every measured cell says its figures.
    let cells = b.script(
        "return [...document.querySelectorAll('#node-heat td[data-loss]')].map(c => c.textContent)",
    )?;
    assert_eq!(cells.as_array().map(Vec::len), Some(6), "{cells}");
    tokio::task::spawn_blocking(move || drop(b)).await?;
    Ok(())
}
