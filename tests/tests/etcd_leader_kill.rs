//! Killing the etcd leader during a run of enrollments (three members of Debian's `etcd` on
//! loopback; the controller's store on them, in process): every enrollment that was
//! acknowledged is in the store afterwards with the certificate it returned, and no token
//! yields two certificates, even though clients retry every failed enrollment with the
//! same token as an agent would.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use zonemesh_controller::authority::Authority;
use zonemesh_controller::mesh::Mesh;
use zonemesh_controller::secrets::KekSource;
use zonemesh_controller::store::{CertKind, CertRecord, decode};
use zonemesh_proto as pb;
use zonemesh_tests::cluster::{cert_serial, wg_key};
use zonemesh_tests::etcd_cluster::{self, EtcdCluster};
use zonemesh_tests::inproc::Plane;

const ENROLLMENTS: usize = 24;

#[test]
#[ignore = "the etcd backend keeps dialling the killed member: after the kill every store call \
            fails with `tcp connect error` until the member returns (store's kv/etcd.rs client)"]
fn killing_the_etcd_leader_loses_no_acknowledged_enrollment_and_issues_no_token_twice() {
    if !etcd_cluster::available() {
        println!("skipped: etcd not installed");
        return;
    }
    let plane = Plane::new().unwrap();
    plane
        .mesh
        .add_zone("eu", "100.64.1.0/24", false, SystemTime::now())
        .unwrap();
    let data_dir = plane.dir.path().join("ctl");
    let mut cluster = EtcdCluster::start(plane.dir.path(), 3).unwrap();
    let url = cluster.store_url();
    let store = zonemesh_tests::etcd_cluster::open_store(&url, &data_dir);
    zonemesh_tests::etcd_cluster::copy_store(&plane.store, &store);

    let kek = KekSource::new(&data_dir, None).load().unwrap();
    let auth = Arc::new(Authority::load(store.clone(), &kek, SystemTime::now()).unwrap());
    let mesh = Mesh::new(auth).unwrap();
    let now = SystemTime::now();
    let tokens: Vec<String> = (0..ENROLLMENTS)
        .map(|_| {
            mesh.create_token("eu", Duration::from_secs(3600), 1, now)
                .unwrap()
                .token
        })
        .collect();
    let csrs: Vec<Vec<u8>> = (0..ENROLLMENTS)
        .map(|i| {
            zonemesh_agent::control::enroll::csr_for(&zonemesh_tests::rsa4096(i), &format!("n{i}"))
                .unwrap()
        })
        .collect();

    // Enroll one after another; kill the etcd leader a third of the way through.
    let mut acked: BTreeMap<String, String> = BTreeMap::new();
    let mut failures = 0;
    let mut killed = None;
    let t0 = Instant::now();
    for i in 0..ENROLLMENTS {
        if i == ENROLLMENTS / 3 {
            let leader = cluster.leader().unwrap();
            cluster.kill9(leader);
            killed = Some(leader);
        }
        let req = pb::EnrollRequest {
            token: tokens[i].clone(),
            csr_der: csrs[i].clone(),
            wg_public_key: wg_key(1000 + i as u64).to_vec(),
            endpoints: vec![],
            node_name: format!("n{i}"),
            zone: String::new(),
        };
        // Retried with the same token, as an agent retries a failed enrollment.
        for attempt in 0..40 {
            match mesh.enroll(&req, "127.0.0.1".parse().unwrap(), SystemTime::now()) {
                Ok(resp) => {
                    acked.insert(
                        format!("eu/n{i}"),
                        cert_serial(&resp.certificate_der).unwrap(),
                    );
                    break;
                }
                Err(e) => {
                    failures += 1;
                    let msg = e.to_string();
                    if attempt < 2 || attempt % 10 == 0 {
                        println!("n{i} attempt {attempt}: {msg}");
                    }
                    if msg.contains("already been used") {
                        // An earlier attempt applied but its answer was lost.
                        println!("n{i}: token used by an unanswered attempt ({attempt})");
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(250));
                }
            }
        }
    }
    println!(
        "{} of {ENROLLMENTS} enrollments acknowledged, {failures} failed attempts, {:?}",
        acked.len(),
        t0.elapsed()
    );
    let killed = killed.unwrap();
    cluster.restart(killed).unwrap();
    cluster.wait_healthy(Duration::from_secs(20)).unwrap();

    // Read back through a fresh client, as another controller would.
    let fresh = zonemesh_tests::etcd_cluster::open_store(&url, &data_dir);
    let mut certs_per_node: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for item in fresh.certs.iter() {
        let (serial, v) = item.unwrap();
        let rec: CertRecord = decode("certs", &v).unwrap();
        if rec.kind == CertKind::Node {
            certs_per_node
                .entry(rec.subject)
                .or_default()
                .insert(String::from_utf8_lossy(&serial).into_owned());
        }
    }
    for (node, serial) in &acked {
        let rec = fresh
            .node(node)
            .unwrap()
            .unwrap_or_else(|| panic!("{node} lost"));
        assert_eq!(
            rec.serial_hex.trim_start_matches('0'),
            serial.trim_start_matches('0'),
            "{node} holds the acknowledged certificate"
        );
    }
    for (node, serials) in &certs_per_node {
        assert_eq!(serials.len(), 1, "{node} was issued {serials:?}");
    }
    // Each token enrolled at most one node, and every used token belongs to a node.
    let nodes: Vec<_> = fresh.nodes().unwrap();
    assert_eq!(nodes.len(), certs_per_node.len());
    assert!(
        acked.len() >= ENROLLMENTS * 2 / 3,
        "the cluster kept working: {acked:?}"
    );
}
