//! Headless Chromium on the Security page: an admin (TOTP enrolled through the page) sees a
//! block placed on two nodes' reports with its evidence and expiry, and the recent events,
//! presses Unblock, and the block is gone from the page, from `block list` and is audited
//! with the admin's e-mail.

use anyhow::{Context, Result, bail};
use serde_json::Value;
use std::time::Duration;
use zonemesh_proto as pb;
use zonemesh_tests::browser::{self, Browser};
use zonemesh_tests::cluster::{Controller, NodeCreds, mesh_channel};

const ADMIN: &str = "security-admin@example.com";
const PASSWORD: &str = "a long enough passphrase here";
const ATTACKER: &str = "198.18.44.9";

async fn report(ctl: &Controller, creds: &NodeCreds, kind: &str, times: usize) {
    let events = (0..times)
        .map(|_| pb::SecurityEvent {
            kind: kind.into(),
            source: ATTACKER.into(),
            detail: "test".into(),
            at_unix: 0,
        })
        .collect();
    pb::mesh_client::MeshClient::new(mesh_channel(&ctl.grpc_addr(), creds).await.unwrap())
        .report_events(pb::SecurityEvents { events })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_admin_sees_a_block_with_its_evidence_and_unblocks_it() -> Result<()> {
    if let Some(why) = browser::sign_in_skip_reason() {
        println!("skipped: {why}");
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let ctl = Controller::start_new(tmp.path())?;
    ctl.zone_add("a", "100.64.1.0/24")?;
    ctl.zone_add("b", "100.64.2.0/24")?;
    let a = ctl.enroll_in_zone("a", "a1", 0).await;
    let b = ctl.enroll_in_zone("b", "b1", 1).await;
    report(&ctl, &a, "ssh.auth_failure", 3).await;
    report(&ctl, &b, "sip.auth_failure", 3).await;
    let list: Value = serde_json::from_str(&ctl.admin_ok(&["block", "list", "--json"])?)?;
    assert_eq!(list[0]["address"], ATTACKER, "{list}");
    ctl.admin_with_stdin(
        &["user", "add", "--email", ADMIN, "--role", "admin"],
        &format!("{PASSWORD}\n"),
    );

    let base = format!("https://localhost:{}", ctl.https.port());
    let br = Browser::start()?;
    br.sign_in_new_admin(&base, ADMIN, PASSWORD)?;
    assert!(br.source()?.contains("security-link"), "no Security link");
    br.click("#security-link")?;
    br.wait_url("/security", Duration::from_secs(10))?;

    let row = br.text(&format!("tr[data-address=\"{ATTACKER}\"]"))?;
    assert!(
        row.contains("a/a1") && row.contains("b/b1") && row.contains("ssh.auth_failure"),
        "evidence missing: {row}"
    );
    assert!(
        row.contains("UTC") || row.contains(':'),
        "expiry missing: {row}"
    );
    let events = br.text("#events")?;
    assert!(
        events.contains("sip.auth_failure") && events.contains(ATTACKER),
        "{events}"
    );

    br.click(&format!("button.unblock[data-address=\"{ATTACKER}\"]"))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while br
        .source()?
        .contains(&format!("data-address=\"{ATTACKER}\""))
    {
        if std::time::Instant::now() > deadline {
            bail!("the block is still shown: {}", br.source()?);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(br.url()?.ends_with("/security"), "{}", br.url()?);
    let list: Value = serde_json::from_str(&ctl.admin_ok(&["block", "list", "--json"])?)?;
    assert_eq!(list, serde_json::json!([]));
    let audit = ctl.admin_ok(&["audit", "--json"])?;
    let rec: Value = audit
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|r| r["kind"] == "source.unblocked" && r.to_string().contains(ATTACKER))
        .context("unblock not audited")?;
    assert!(rec.to_string().contains(ADMIN), "{rec}");
    Ok(())
}
