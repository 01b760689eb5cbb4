//! The controller across restarts: Watch resumes from a client's version, `kill -9` loses
//! nothing that was acknowledged, and SIGTERM shuts down cleanly.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};
use tempfile::TempDir;
use zonemesh_proto as pb;
use zonemesh_tests::cluster::{
    Controller, NodeCreds, cert_serial, crl_serials, mesh_channel, next_update,
};

const WAIT: Duration = Duration::from_secs(10);

async fn watch(ctl: &Controller, creds: &NodeCreds, from: u64) -> tonic::Streaming<pb::MeshUpdate> {
    pb::mesh_client::MeshClient::new(mesh_channel(&ctl.grpc_addr(), creds).await.unwrap())
        .watch(pb::WatchRequest {
            resume_from_version: from,
            chain_once: true,
        })
        .await
        .unwrap()
        .into_inner()
}

fn kind(u: &pb::MeshUpdate) -> &'static str {
    match u.kind {
        Some(pb::mesh_update::Kind::Snapshot(_)) => "snapshot",
        Some(pb::mesh_update::Kind::Delta(_)) => "delta",
        None => "empty",
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_resumes_from_its_version_after_a_restart() {
    let tmp = TempDir::new().unwrap();
    let mut ctl = Controller::start_new(tmp.path()).unwrap();
    ctl.zone_add("eu", "100.64.1.0/24").unwrap();
    let token = ctl.token("eu", 2).unwrap();
    let me = ctl.enroll_pooled(&token, "watcher", 1).await;

    let mut w = watch(&ctl, &me, 0).await;
    let snap = next_update(&mut w, WAIT).await.unwrap().unwrap();
    assert_eq!(kind(&snap), "snapshot");
    ctl.zone_add("seen", "100.64.2.0/24").unwrap();
    let d = next_update(&mut w, WAIT).await.unwrap().unwrap();
    assert_eq!(kind(&d), "delta");
    assert_eq!(d.version, snap.version + 1);
    let last_seen = d.version;

    ctl.restart().unwrap();
    // The old stream ends with the old process.
    assert!(
        !matches!(next_update(&mut w, WAIT).await, Ok(Some(_))),
        "stream outlived the controller"
    );

    // Changes while the watcher was away.
    ctl.zone_add("missed", "100.64.3.0/24").unwrap();
    let other = ctl.enroll_pooled(&token, "other", 2).await;

    // Resuming gets the CA chain (at the version it has, changing nothing), then exactly
    // the changes after `last_seen`, coalesced into one delta at the head.
    let mut w = watch(&ctl, &me, last_seen).await;
    let chain = next_update(&mut w, WAIT).await.unwrap().unwrap();
    assert_eq!(chain.version, last_seen);
    let Some(pb::mesh_update::Kind::Delta(c)) = chain.kind else {
        panic!("resume began with a {}", kind(&chain));
    };
    assert!(!c.ca_chain_der.is_empty() && c.upserted.is_empty() && c.zones.is_empty());
    let mut zones = BTreeSet::new();
    let mut peers = BTreeSet::new();
    let mut version = last_seen;
    let mut messages = 0;
    while !peers.contains("other") {
        let u = next_update(&mut w, WAIT).await.unwrap().unwrap();
        assert!(u.version > version, "versions only move forward");
        version = u.version;
        messages += 1;
        let Some(pb::mesh_update::Kind::Delta(d)) = u.kind else {
            panic!("resume sent a {} instead of deltas", kind(&u));
        };
        zones.extend(d.zones.into_iter().map(|z| z.name));
        peers.extend(d.upserted.into_iter().map(|p| p.node));
    }
    assert_eq!(messages, 1, "what was missed comes as one delta");
    assert_eq!(zones, BTreeSet::from(["missed".to_string()]));
    assert_eq!(peers, BTreeSet::from(["other".to_string()]));
    let current = version;
    // Live changes keep flowing on the resumed stream.
    ctl.zone_add("live", "100.64.4.0/24").unwrap();
    let u = next_update(&mut w, WAIT).await.unwrap().unwrap();
    assert_eq!((kind(&u), u.version), ("delta", current + 1));

    // A version the controller never had gets a fresh snapshot, not an error.
    let mut w = watch(&ctl, &other, current + 1000).await;
    let u = next_update(&mut w, WAIT).await.unwrap().unwrap();
    let Some(pb::mesh_update::Kind::Snapshot(s)) = &u.kind else {
        panic!("unknown version got a {}", kind(&u));
    };
    assert_eq!(u.version, current + 1);
    assert_eq!(s.peers.len(), 2);
    assert_eq!(s.zones.len(), 4);
    // So does version 0 (a new agent).
    let mut w = watch(&ctl, &other, 0).await;
    assert_eq!(
        kind(&next_update(&mut w, WAIT).await.unwrap().unwrap()),
        "snapshot"
    );
}

/// A version older than memory and the change log reach gets a snapshot (library level:
/// it takes more than `BACKLOG` changes to fall out of memory). After a restart memory
/// holds nothing: the change log replays up to `RESUME_MAX_CHANGES` as one delta, and a
/// watcher further behind gets the snapshot.
#[test]
fn too_old_version_gets_a_snapshot() {
    use std::sync::Arc;
    use zonemesh_controller::authority::Authority;
    use zonemesh_controller::mesh::{BACKLOG, Mesh, RESUME_MAX_CHANGES};
    use zonemesh_controller::secrets::KekSource;
    use zonemesh_controller::store::Store;

    let tmp = TempDir::new().unwrap();
    let ctl = Controller::init(tmp.path()).unwrap();
    let now = SystemTime::now();
    let store = Store::open(&ctl.data_dir.join("db")).unwrap();
    let kek = KekSource::new(&ctl.data_dir, None).load().unwrap();
    let mesh = Mesh::new(Arc::new(Authority::load(store.clone(), &kek, now).unwrap())).unwrap();
    for i in 0..u32::try_from(BACKLOG).unwrap() + 200 {
        let ip = std::net::Ipv4Addr::from(0x0a00_0000 + i);
        mesh.block_source(ip.into(), now + Duration::from_secs(60), "test")
            .unwrap();
    }
    let recent = mesh.subscribe("eu/x", mesh.version() - 10).unwrap();
    let first = recent.first.unwrap().decode().unwrap();
    assert_eq!(kind(&first), "delta");
    assert_eq!(first.version, mesh.version(), "10 changes as one delta");
    let old = mesh.subscribe("eu/x", 5).unwrap();
    let first = old.first.unwrap().decode().unwrap();
    assert_eq!(kind(&first), "snapshot");
    assert_eq!(first.version, mesh.version());

    // A restart: memory holds no change, the log does.
    drop(mesh);
    let mesh = Mesh::new(Arc::new(Authority::load(store, &kek, now).unwrap())).unwrap();
    let head = mesh.version();
    let recent = mesh.subscribe("eu/x", head - 10).unwrap();
    let first = recent.first.unwrap().decode().unwrap();
    assert_eq!(kind(&first), "delta", "replayed from the change log");
    assert_eq!(first.version, head);
    let far = mesh
        .subscribe("eu/x", head - RESUME_MAX_CHANGES - 1)
        .unwrap();
    let first = far.first.unwrap().decode().unwrap();
    assert_eq!(kind(&first), "snapshot", "beyond what the log replays");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_nothing_acknowledged() {
    let tmp = TempDir::new().unwrap();
    let mut ctl = Controller::start_new(tmp.path()).unwrap();
    ctl.zone_add("eu", "100.64.1.0/24").unwrap();
    let token = ctl.token("eu", 3).unwrap();
    let once = ctl.token("eu", 1).unwrap();
    let dirs: Vec<_> = ["a", "b", "c"].iter().map(|n| tmp.path().join(n)).collect();
    for (d, n) in dirs.iter().zip(["a", "b", "c"]) {
        ctl.enroll_ok(&token, d, n).unwrap();
    }
    // The zone and a node enrolled right before the crash, then a revocation, then kill -9
    // the moment the CLI returns.
    ctl.admin_ok(&["zone", "add", "us", "--cidr", "100.64.2.0/24"])
        .unwrap();
    let d_dir = tmp.path().join("d");
    ctl.enroll_ok(&once, &d_dir, "d").unwrap();
    ctl.admin_ok(&["node", "revoke", "eu/b"]).unwrap();
    ctl.kill9();

    ctl.start().unwrap();
    let serial = |d: &Path| cert_serial(&NodeCreds::from_state_dir(d).unwrap().cert_der).unwrap();
    let nodes = ctl.nodes().unwrap();
    let mut listed: Vec<(String, bool, String)> = nodes
        .iter()
        .map(|n| {
            (
                n["node"].as_str().unwrap().to_string(),
                n["revoked"].as_bool().unwrap(),
                n["serial"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    listed.sort();
    let expected: Vec<(String, bool, String)> = ["a", "b", "c", "d"]
        .iter()
        .map(|n| (n.to_string(), *n == "b", serial(&tmp.path().join(n))))
        .collect();
    // Serials are stored without leading zero bytes of the DER integer.
    let norm = |s: &str| s.trim_start_matches('0').to_string();
    assert_eq!(
        listed
            .iter()
            .map(|(n, r, s)| (n.clone(), *r, norm(s)))
            .collect::<Vec<_>>(),
        expected
            .iter()
            .map(|(n, r, s)| (n.clone(), *r, norm(s)))
            .collect::<Vec<_>>()
    );
    let zones = ctl.admin_ok(&["zone", "list", "--json"]).unwrap();
    assert!(zones.contains("\"us\""), "{zones}");

    // The revocation survived: CRL, OCSP and the mTLS listener all know it.
    let crl = std::process::Command::new("curl")
        .args(["-sf", &format!("http://{}/crl", ctl.pki)])
        .output()
        .unwrap()
        .stdout;
    let b_serial = serial(&dirs[1]);
    assert!(
        crl_serials(&crl)
            .unwrap()
            .iter()
            .any(|s| norm(s) == norm(&b_serial)),
        "CRL after kill -9 lacks the revoked serial"
    );
    assert!(ctl.ocsp_status(&dirs[1]).contains(": revoked"));
    assert!(ctl.ocsp_status(&dirs[0]).contains(": good"));
    let b = NodeCreds::from_state_dir(&dirs[1]).unwrap();
    let refused = async {
        let mut s = pb::mesh_client::MeshClient::new(mesh_channel(&ctl.grpc_addr(), &b).await?)
            .watch(pb::WatchRequest::default())
            .await?
            .into_inner();
        Ok::<_, anyhow::Error>(s.message().await?)
    };
    assert!(tokio::time::timeout(WAIT, refused).await.unwrap().is_err());

    // The used-up token stays used up.
    let out = ctl
        .enroll_cli(&once, &tmp.path().join("e"), "e", &[])
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already been used"));
    // And the others still work, seeing the same mesh.
    let a = NodeCreds::from_state_dir(&dirs[0]).unwrap();
    let mut w = watch(&ctl, &a, 0).await;
    let Some(pb::mesh_update::Kind::Snapshot(s)) =
        next_update(&mut w, WAIT).await.unwrap().unwrap().kind
    else {
        panic!("expected snapshot");
    };
    let mut names: Vec<_> = s.peers.iter().map(|p| p.node.clone()).collect();
    names.sort();
    assert_eq!(names, ["a", "c", "d"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_zero_promptly_and_removes_the_admin_socket() {
    let tmp = TempDir::new().unwrap();
    let mut ctl = Controller::start_new(tmp.path()).unwrap();
    ctl.zone_add("eu", "100.64.1.0/24").unwrap();
    let token = ctl.token("eu", 1).unwrap();
    let me = ctl.enroll_pooled(&token, "held", 3).await;
    // An open Watch stream must not hold the shutdown up.
    let mut w = watch(&ctl, &me, 0).await;
    next_update(&mut w, WAIT).await.unwrap().unwrap();
    let sock = ctl.data_dir.join("admin.sock");
    assert!(sock.exists());

    let t = Instant::now();
    let status = ctl.sigterm(Duration::from_secs(5)).unwrap();
    assert!(status.success(), "exit status {status}");
    assert!(t.elapsed() < Duration::from_secs(5));
    assert!(!sock.exists(), "admin.sock left behind");
    assert!(!matches!(next_update(&mut w, WAIT).await, Ok(Some(_))));
    let out = ctl.admin(&["node", "list"]).unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no controller is running"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The store was flushed and unlocked: it starts again with the node.
    ctl.start().unwrap();
    assert_eq!(ctl.nodes().unwrap().len(), 1);
}
