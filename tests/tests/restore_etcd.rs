//! `restore --store etcd://...`: a backup of an embedded installation goes into a real etcd
//! (refused when the store holds data, unless `--overwrite`); a new data directory holding
//! only the secrets and the remembered store URL serves from etcd with the same CA
//! fingerprint, and a node enrolled before the backup renews over mutual TLS while a node
//! revoked before it stays refused.

use std::process::Command;
use std::time::Duration;
use tempfile::TempDir;
use zonemesh_proto as pb;
use zonemesh_tests::cluster::{Controller, NodeCreds, copy_secrets, mesh_channel};
use zonemesh_tests::etcd::{self, Etcd};
use zonemesh_tests::rsa4096;

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

fn restore(
    dir: &std::path::Path,
    from: &std::path::Path,
    url: &str,
    extra: &[&str],
) -> std::process::Output {
    Command::new(zonemesh_tests::bin("zonemesh-controller"))
        .arg("restore")
        .arg("--data-dir")
        .arg(dir)
        .arg("--from")
        .arg(from)
        .args(["--store", url])
        .args(extra)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_restored_into_etcd_serves_with_the_same_ca() {
    if !etcd::available() {
        println!("skipped: etcd not installed");
        return;
    }
    let tmp = TempDir::new().unwrap();
    let mut ctl = Controller::start_new(tmp.path()).unwrap();
    ctl.zone_add("eu", "100.64.1.0/24").unwrap();
    let n1 = ctl.enroll_in_zone("eu", "n1", 0).await;
    let n2 = ctl.enroll_in_zone("eu", "n2", 1).await;
    ctl.admin_ok(&["node", "revoke", "eu/n2"]).unwrap();
    let before = ctl.admin_ok(&["node", "list", "--json"]).unwrap();
    let file = tmp.path().join("b.zmbackup");
    ctl.admin_ok(&["backup", "--out", file.to_str().unwrap()])
        .unwrap();
    ctl.sigterm(Duration::from_secs(20)).unwrap();

    let e = Etcd::start_temp(1).unwrap();
    let url = e.url("restored");
    let dir2 = tmp.path().join("ctl2");
    let out = restore(&dir2, &file, &url, &[]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains(&url), "{text}");
    assert_eq!(
        std::fs::read_to_string(dir2.join("store.url"))
            .unwrap()
            .trim(),
        url
    );

    // The store now holds data: another restore into it is refused, unless --overwrite.
    let again = restore(&tmp.path().join("ctl3"), &file, &url, &[]);
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(err.contains("already holds data"), "{err}");
    let forced = restore(&tmp.path().join("ctl4"), &file, &url, &["--overwrite"]);
    assert!(
        forced.status.success(),
        "{}",
        String::from_utf8_lossy(&forced.stderr)
    );

    // The restored directory with the same secrets serves from etcd.
    copy_secrets(&ctl.data_dir, &dir2).unwrap();
    let two = tmp.path().join("two");
    std::fs::create_dir_all(&two).unwrap();
    let mut ctl2 = Controller::existing(&two, dir2, ctl.fingerprint.clone());
    ctl2.start().unwrap();
    assert_eq!(ctl2.admin_ok(&["node", "list", "--json"]).unwrap(), before);
    let show: serde_json::Value =
        serde_json::from_str(&ctl2.admin_ok(&["ca", "show", "--json"]).unwrap()).unwrap();
    let root = show["certificates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["kind"] == "root" && c["state"] == "active")
        .expect("an active root")
        .clone();
    let norm = |s: &str| s.to_lowercase().replace(':', "");
    assert_eq!(
        norm(root["sha256"].as_str().unwrap()),
        norm(&ctl.fingerprint)
    );
    let addr = ctl2.grpc_addr();
    renew(&addr, &n1, 0, "n1").await.unwrap();
    assert!(
        renew(&addr, &n2, 1, "n2").await.is_err(),
        "the node revoked before the backup renewed"
    );
    ctl2.sigterm(Duration::from_secs(20)).unwrap();
}
