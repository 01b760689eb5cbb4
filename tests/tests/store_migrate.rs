//! `store migrate` from a populated sled directory into a real etcd: a second data
//! directory holding only the secrets serves from etcd, every existing node still renews
//! over mutual TLS, the CA is the same (agents pinning its fingerprint enroll), the
//! revoked node stays refused, and users, domains and SSH grants came along.

use std::time::Duration;
use tempfile::TempDir;
use zonemesh_proto as pb;
use zonemesh_tests::cluster::{Controller, NodeCreds, copy_secrets, mesh_channel};
use zonemesh_tests::etcd::{self, Etcd};
use zonemesh_tests::rsa4096;

const EMAIL: &str = "owner@corp.test";

async fn renew(addr: &str, creds: &NodeCreds, slot: usize, node: &str) -> Result<(), String> {
    let ch = mesh_channel(addr, creds).await.map_err(|e| e.to_string())?;
    let csr = zonemesh_agent::control::enroll::csr_for(&rsa4096(slot), node).unwrap();
    let r = tokio::time::timeout(
        Duration::from_secs(20),
        pb::mesh_client::MeshClient::new(ch).renew(pb::RenewRequest {
            csr_der: csr,
            rotate_key: false,
        }),
    )
    .await
    .map_err(|_| "renew timed out".to_string())?;
    r.map(|_| ()).map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrated_store_serves_renews_and_keeps_the_ca_and_revocations() {
    if !etcd::available() {
        println!("skipped: etcd not installed");
        return;
    }
    let tmp = TempDir::new().unwrap();
    let mut ctl = Controller::start_new(tmp.path()).unwrap();
    ctl.zone_add("eu", "100.64.1.0/24").unwrap();
    ctl.zone_add("us", "100.64.2.0/24").unwrap();
    let spare_token = ctl.token("us", 3).unwrap();
    let nodes = [("eu", "n1", 0usize), ("eu", "n2", 1), ("us", "n3", 2)];
    let mut creds = Vec::new();
    for (zone, name, slot) in nodes {
        creds.push(ctl.enroll_in_zone(zone, name, slot).await);
    }
    ctl.admin_ok(&["node", "revoke", "us/n3"]).unwrap();
    ctl.admin_with_stdin(
        &["user", "add", "--email", EMAIL, "--role", "portal-owner"],
        "a long enough passphrase here\n",
    );
    ctl.admin_ok(&[
        "domain",
        "add",
        "app.corp.test",
        "--issuer",
        "internal",
        "--owner",
        EMAIL,
        "--edge-zone",
        "eu",
    ])
    .unwrap();
    ctl.admin_ok(&[
        "ssh",
        "grant",
        "--email",
        EMAIL,
        "--zone",
        "eu",
        "--principal",
        "deploy",
    ])
    .unwrap();
    let before_nodes = ctl.admin_ok(&["node", "list", "--json"]).unwrap();

    let e = Etcd::start_temp(1).unwrap();
    let url = e.url("migrated");
    let from = format!("sled:{}", ctl.data_dir.display());
    let bin = zonemesh_tests::bin("zonemesh-controller");
    // Refused while the controller runs on the directory.
    let out = std::process::Command::new(&bin)
        .args(["store", "migrate", "--from", &from, "--to", &url])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("stop the controller"), "{err}");

    ctl.sigterm(Duration::from_secs(20)).unwrap();
    let out = std::process::Command::new(&bin)
        .args(["store", "migrate", "--from", &from, "--to", &url])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("the copy matches the source"), "{text}");
    for tree in [
        "nodes",
        "revoked",
        "ca",
        "tokens",
        "auth_users",
        "domains",
        "ssh_grants",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(tree)),
            "{tree} missing:\n{text}"
        );
    }
    // A second run refuses the now non-empty target.
    let again = std::process::Command::new(&bin)
        .args(["store", "migrate", "--from", &from, "--to", &url])
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already holds data"));

    // A new data directory with only the secrets, serving from etcd.
    let dir2 = tmp.path().join("ctl2");
    copy_secrets(&ctl.data_dir, &dir2).unwrap();
    let mut ctl2 = Controller::existing(&tmp.path().join("two"), dir2, ctl.fingerprint.clone());
    std::fs::create_dir_all(tmp.path().join("two")).unwrap();
    ctl2.serve_args = vec!["--store".into(), url.clone()];
    ctl2.start().unwrap();
    assert_eq!(
        ctl2.admin_ok(&["node", "list", "--json"]).unwrap(),
        before_nodes
    );

    let addr = ctl2.grpc_addr();
    for ((_, name, slot), c) in nodes.iter().zip(&creds).take(2) {
        renew(&addr, c, *slot, name)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    let refused = renew(&addr, &creds[2], 2, "n3").await;
    assert!(refused.is_err(), "the revoked node renewed");

    // Same CA: enrollment pinned to the original fingerprint works, with a token made
    // before the migration.
    let c4 = ctl2.enroll_pooled(&spare_token, "n4", 3).await;
    renew(&addr, &c4, 3, "n4").await.unwrap();

    let users = ctl2.admin_ok(&["user", "list"]).unwrap();
    assert!(users.contains(EMAIL), "{users}");
    let domains = ctl2.admin_ok(&["domain", "list"]).unwrap();
    assert!(domains.contains("app.corp.test"), "{domains}");
    let grants = ctl2.admin_ok(&["ssh", "grants"]).unwrap();
    assert!(grants.contains("deploy"), "{grants}");
    // The store URL was saved: admin commands with this --data-dir reach the same store
    // when the controller is stopped too.
    ctl2.sigterm(Duration::from_secs(20)).unwrap();
    let audit = ctl2.admin_ok(&["audit", "--limit", "5"]).unwrap();
    assert!(!audit.is_empty());
}
