//! `backup --out` while enrollments run, `restore --from` into a new data directory, and a
//! controller started there: every node and revocation acknowledged before the backup is
//! in it, and nodes reconnect over mutual TLS with the certificates they already hold.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tempfile::TempDir;
use zonemesh_proto as pb;
use zonemesh_tests::cluster::{
    Controller, NodeCreds, cert_serial, crl_serials, enroll_rpc, enrollment_channel, mesh_channel,
    next_update, wg_key,
};
use zonemesh_tests::{bin, rsa4096, run, run_ok};

const WAIT: Duration = Duration::from_secs(20);

/// Enroll node `i` (pooled key `i % 6`, its own WireGuard key) with a fresh token.
async fn enroll(ctl: &Controller, zone: &str, i: u64) -> NodeCreds {
    let ch = enrollment_channel(&ctl.grpc_addr(), &ctl.fingerprint)
        .await
        .unwrap();
    let token = ctl.token(zone, 1).unwrap();
    enroll_rpc(
        ch,
        &token,
        &format!("n{i}"),
        &rsa4096((i % 6) as usize),
        wg_key(1000 + i),
    )
    .await
    .unwrap()
    .0
}

/// The Watch snapshot `creds` gets from `ctl`.
async fn snapshot(ctl: &Controller, creds: &NodeCreds) -> anyhow::Result<pb::Snapshot> {
    let ch = mesh_channel(&ctl.grpc_addr(), creds).await?;
    let mut w = pb::mesh_client::MeshClient::new(ch)
        .watch(pb::WatchRequest {
            resume_from_version: 0,
            chain_once: true,
        })
        .await?
        .into_inner();
    match next_update(&mut w, WAIT).await?.and_then(|u| u.kind) {
        Some(pb::mesh_update::Kind::Snapshot(s)) => Ok(s),
        other => anyhow::bail!("first update is not a snapshot: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_during_enrollments_restores_every_acknowledged_node_and_revocation() {
    let tmp = TempDir::new().unwrap();
    let ctl = Arc::new(Controller::start_new(tmp.path()).unwrap());
    ctl.zone_add("eu", "100.64.1.0/24").unwrap();
    ctl.zone_add("us", "100.64.2.0/24").unwrap();

    // Acknowledged before the backup: 8 nodes, two of them revoked.
    let mut acked: BTreeMap<String, NodeCreds> = BTreeMap::new();
    for i in 0..8u64 {
        let zone = if i % 2 == 0 { "eu" } else { "us" };
        acked.insert(format!("{zone}/n{i}"), enroll(&ctl, zone, i).await);
    }
    let mut revoked_serials = Vec::new();
    for key in ["eu/n2", "us/n5"] {
        ctl.admin_ok(&["node", "revoke", key]).unwrap();
        revoked_serials.push(cert_serial(&acked[key].cert_der).unwrap());
    }

    // Enrollments keep running while the backup is taken.
    let stop = Arc::new(AtomicBool::new(false));
    let during = {
        let (ctl, stop) = (ctl.clone(), stop.clone());
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                enroll(&ctl, "eu", 100 + n).await;
                n += 1;
            }
            n
        })
    };
    // Let at least one enrollment start before the backup.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let out = tmp.path().join("ctl.zmbackup");
    let ctl2 = ctl.clone();
    let out2 = out.clone();
    let reply = tokio::task::spawn_blocking(move || {
        ctl2.admin_ok(&["backup", "--out", out2.to_str().unwrap(), "--json"])
    })
    .await
    .unwrap()
    .unwrap();
    stop.store(true, Ordering::SeqCst);
    let enrolled_during = during.await.unwrap();
    let reply: serde_json::Value = serde_json::from_str(&reply).unwrap();
    assert_eq!(reply["ca_fingerprint"], ctl.fingerprint.as_str());
    assert_eq!(reply["format"], 1);
    let trees: Vec<&str> = reply["trees"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    for t in ["nodes", "certs", "revoked", "zones", "audit"] {
        assert!(
            trees.iter().any(|n| n.starts_with(t)),
            "tree {t} missing: {trees:?}"
        );
    }
    let bytes = std::fs::read(&out).unwrap();
    assert!(!bytes.is_empty());
    // No secret file content is in it: not the KEK, not the pepper.
    for secret in ["kek", "pepper"] {
        let s = std::fs::read(ctl.data_dir.join("secrets").join(secret)).unwrap();
        let s = String::from_utf8_lossy(&s).trim().to_string();
        assert!(
            !bytes.windows(s.len()).any(|w| w == s.as_bytes()),
            "the backup holds the {secret}"
        );
    }
    assert!(
        !ctl.data_dir
            .join("backups")
            .read_dir()
            .unwrap()
            .any(|_| true),
        "the staged copy was moved out of the data directory"
    );
    println!(
        "backup of {} bytes while {enrolled_during} enrollments ran",
        bytes.len()
    );

    // Restore: refused into a non-empty directory, and a damaged file is refused.
    let restored_dir = tmp.path().join("restored");
    let restore = |from: &std::path::Path, to: &std::path::Path| {
        run(std::process::Command::new(bin("zonemesh-controller"))
            .arg("restore")
            .arg("--from")
            .arg(from)
            .arg("--data-dir")
            .arg(to))
        .unwrap()
    };
    let not_empty = restore(&out, &ctl.data_dir);
    assert!(!not_empty.status.success());
    assert!(String::from_utf8_lossy(&not_empty.stderr).contains("not empty"));
    let mut damaged = bytes.clone();
    let at = damaged.len() / 2;
    damaged[at] ^= 0x55;
    let damaged_path = tmp.path().join("damaged.zmbackup");
    std::fs::write(&damaged_path, damaged).unwrap();
    let bad = restore(&damaged_path, &tmp.path().join("never"));
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("checksum"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    let ok = restore(&out, &restored_dir);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );

    // The same secrets, supplied beside the restored store (they are never in the backup).
    let secrets = restored_dir.join("secrets");
    std::fs::create_dir(&secrets).unwrap();
    for f in ["kek", "pepper"] {
        std::fs::copy(ctl.data_dir.join("secrets").join(f), secrets.join(f)).unwrap();
    }
    run_ok(std::process::Command::new("chmod").arg("700").arg(&secrets)).unwrap();

    // The old controller goes away; the restored one serves.
    let mut old = Arc::into_inner(ctl).expect("no other holder of the controller");
    old.sigterm(Duration::from_secs(10)).unwrap();
    let mut back = Controller::existing(
        &tmp.path().join("back"),
        restored_dir.clone(),
        old.fingerprint.clone(),
    );
    std::fs::create_dir_all(tmp.path().join("back")).unwrap();
    back.start().unwrap();

    let listed: BTreeMap<String, serde_json::Value> = back
        .nodes()
        .unwrap()
        .into_iter()
        .map(|n| {
            let key = format!(
                "{}/{}",
                n["zone"].as_str().unwrap(),
                n["node"].as_str().unwrap()
            );
            (key, n)
        })
        .collect();
    for (key, creds) in &acked {
        let n = listed
            .get(key)
            .unwrap_or_else(|| panic!("{key} lost: {listed:?}"));
        let revoked = key == "eu/n2" || key == "us/n5";
        assert_eq!(n["revoked"], revoked, "{key}: {n}");
        let norm = |s: &str| s.to_lowercase().trim_start_matches('0').to_string();
        assert_eq!(
            norm(n["serial"].as_str().unwrap()),
            norm(&cert_serial(&creds.cert_der).unwrap()),
            "{key} keeps its certificate"
        );
    }
    let crl = back.admin_ok(&["ca", "crl"]).unwrap();
    let crl_der = zonemesh_ca::pem_blocks("X509 CRL", &crl).unwrap().remove(0);
    let on_crl = crl_serials(&crl_der).unwrap();
    for s in &revoked_serials {
        assert!(
            on_crl.contains(s),
            "revoked serial {s} not on the restored CRL"
        );
    }

    // Nodes reconnect without re-enrolling: mTLS with the certificates they hold, and the
    // restored mesh in their snapshot; a revoked node stays out.
    let snap = snapshot(&back, &acked["eu/n0"]).await.unwrap();
    let peers: Vec<String> = snap
        .peers
        .iter()
        .map(|p| format!("{}/{}", p.zone, p.node))
        .collect();
    for key in ["us/n1", "us/n3", "eu/n4", "us/n7"] {
        assert!(peers.contains(&key.to_string()), "{key} not in {peers:?}");
    }
    assert!(!peers.contains(&"us/n5".to_string()), "revoked peer listed");
    snapshot(&back, &acked["us/n7"]).await.unwrap();
    assert!(
        snapshot(&back, &acked["eu/n2"]).await.is_err(),
        "a node revoked before the backup is refused by the restored controller"
    );
    back.sigterm(Duration::from_secs(10)).unwrap();
}
