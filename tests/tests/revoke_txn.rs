//! Revocation is one store transaction: the node, its serial records, the revocation
//! records, the CRL number and the change-log entry carrying the new CRLs apply together
//! or not at all.
//!
//! - A store whose commits fail (a fault-injecting `Backend` around the real sled one)
//!   leaves the node, the CRL (stored and served), the change log and the TLS verifier's
//!   CRLs exactly as they were, for `node revoke`, a renewal and the CRL refresh; once the
//!   store works again the same revocation goes through.
//! - Two controllers (two `Authority` + `Mesh` over one store: the shared sled handle, and
//!   two etcd clients on a three-member etcd cluster) revoking at the same time both end
//!   on the CRL: a CRL signed before the other's revocation is refused by its check on
//!   the CRL number and signed again.

use std::collections::BTreeMap;
use std::sync::{Arc, Barrier, Mutex};
use std::time::SystemTime;
use zonemesh_ca::RevocationReason;
use zonemesh_controller::authority::Authority;
use zonemesh_controller::kv::{Pair, Txn};
use zonemesh_controller::mesh::{CrlListener, CrlListenerError, Mesh, RenewKey};
use zonemesh_controller::secrets::KekSource;
use zonemesh_controller::store::Store;
use zonemesh_proto as pb;
use zonemesh_tests::cluster::{cert_serial, crl_serials, wg_key};
use zonemesh_tests::etcd::{self, Etcd, copy_store, open_store};
use zonemesh_tests::faultkv::Faulty;
use zonemesh_tests::inproc::{Plane, enroll_on};

/// The CRLs the TLS verifier was last given.
#[derive(Debug, Default)]
struct LastCrls(Mutex<Vec<Vec<u8>>>);

impl CrlListener for LastCrls {
    fn crl_changed(&self, _roots: &[Vec<u8>], crls: &[Vec<u8>]) -> Result<(), CrlListenerError> {
        *self.0.lock().unwrap() = crls.to_vec();
        Ok(())
    }
}

/// Everything a revocation may write.
fn trees(store: &Store) -> BTreeMap<String, Vec<Pair>> {
    [
        "nodes",
        "node_serials",
        "revoked",
        "certs",
        "alloc",
        "wgkeys",
        "changes",
        "meta",
    ]
    .iter()
    .map(|t| {
        let tree = store.kv().open_tree(t).unwrap();
        (t.to_string(), tree.iter().map(Result::unwrap).collect())
    })
    .collect()
}

#[test]
fn a_revocation_whose_commit_fails_changes_nothing() {
    let (plane, faulty) = Faulty::plane().unwrap();
    let listener = Arc::new(LastCrls::default());
    plane.mesh.add_crl_listener(listener.clone());
    let n1 = plane.enroll("eu", "n1", 0, wg_key(1)).unwrap();
    let t0 = std::time::Instant::now();
    let _n2 = plane.enroll("eu", "n2", 1, wg_key(2)).unwrap();
    println!(
        "anchor: one enrollment (one transaction, sled) took {:?}",
        t0.elapsed()
    );
    let serial = cert_serial(&n1.creds.cert_der).unwrap();
    let (mesh, auth) = (&plane.mesh, &plane.auth);

    let before = trees(&plane.store);
    let (crls, version) = (auth.crls_der(), mesh.version());
    faulty.set_failing(true);
    let e = mesh
        .revoke_node("eu/n1", RevocationReason::KeyCompromise, SystemTime::now())
        .unwrap_err();
    assert!(e.to_string().contains("cannot be reached"), "{e}");
    let csr = zonemesh_agent::control::enroll::csr_for(&zonemesh_tests::rsa4096(0), "n1").unwrap();
    let e = mesh
        .renew(&n1.who, &csr, RenewKey::Keep, SystemTime::now())
        .unwrap_err();
    assert!(e.to_string().contains("cannot be reached"), "{e}");
    assert!(mesh.publish_crl().is_err());
    faulty.set_failing(false);

    // Nothing moved: store, served CRLs, the verifier's CRLs, the version.
    assert!(trees(&plane.store) == before, "the store changed");
    assert_eq!(auth.crls_der(), crls, "the served CRL changed");
    assert_eq!(*listener.0.lock().unwrap(), crls, "the verifier kept a CRL");
    assert!(!crl_serials(&auth.crl_der()).unwrap().contains(&serial));
    assert_eq!(mesh.version(), version);
    assert!(!auth.is_revoked(&n1.who.serial_hex));
    mesh.caller(&n1.who, SystemTime::now())
        .expect("n1 is still enrolled with its certificate");

    // The store back: the same revocation applies whole, in one change.
    let t0 = std::time::Instant::now();
    let node = mesh
        .revoke_node("eu/n1", RevocationReason::KeyCompromise, SystemTime::now())
        .unwrap();
    println!(
        "node revoke (one transaction, sled) took {:?}",
        t0.elapsed()
    );
    assert!(node.revoked);
    assert_eq!(mesh.version(), version + 1, "one change-log entry");
    assert!(auth.is_revoked(&n1.who.serial_hex));
    assert!(plane.store.node("eu/n1").unwrap().unwrap().revoked);
    assert!(plane.store.node_serials("eu/n1").unwrap().is_empty());
    let crl = auth.crl_der().to_vec();
    assert!(crl_serials(&crl).unwrap().contains(&serial));
    assert_eq!(*listener.0.lock().unwrap(), auth.crls_der());
    let logged = plane
        .store
        .changes
        .get(mesh.version().to_be_bytes())
        .unwrap()
        .unwrap();
    let u = <pb::MeshUpdate as prost::Message>::decode(logged.as_slice()).unwrap();
    let Some(pb::mesh_update::Kind::Delta(d)) = u.kind else {
        panic!("a delta")
    };
    assert_eq!(d.removed.len(), 1);
    assert_eq!(d.crl_der, crl, "the change carries the CRL it committed");
}

/// A second controller over `store` (its own Authority and Mesh).
fn second(store: Store, data_dir: &std::path::Path) -> (Arc<Authority>, Arc<Mesh>) {
    let kek = KekSource::new(data_dir, None).load().unwrap();
    let auth = Arc::new(Authority::load(store, &kek, SystemTime::now()).unwrap());
    let mesh = Mesh::new(auth.clone()).unwrap();
    (auth, mesh)
}

/// Rounds of two revocations at once, one through each controller; after each, both
/// controllers serve a CRL listing every serial revoked so far. Returns the CRL races
/// (signed again after a conflict) seen.
fn concurrent_rounds(a: &Arc<Mesh>, b: &Arc<Mesh>, rounds: usize) -> u64 {
    let (auth_a, auth_b) = (a.authority().clone(), b.authority().clone());
    let mut revoked = Vec::new();
    for round in 0..rounds {
        let na = format!("a{round}");
        let nb = format!("b{round}");
        let ea = enroll_on(a, "eu", &na, 0, wg_key(100 + 2 * round as u64)).unwrap();
        let eb = enroll_on(a, "eu", &nb, 1, wg_key(101 + 2 * round as u64)).unwrap();
        revoked.push(cert_serial(&ea.certificate_der).unwrap());
        revoked.push(cert_serial(&eb.certificate_der).unwrap());
        b.follow_store().unwrap();
        let go = Arc::new(Barrier::new(2));
        let run = |m: Arc<Mesh>, node: String, go: Arc<Barrier>| {
            std::thread::spawn(move || {
                go.wait();
                m.revoke_node(&node, RevocationReason::KeyCompromise, SystemTime::now())
            })
        };
        let t0 = std::time::Instant::now();
        let ta = run(a.clone(), format!("eu/{na}"), go.clone());
        let tb = run(b.clone(), format!("eu/{nb}"), go);
        ta.join().unwrap().unwrap();
        tb.join().unwrap().unwrap();
        println!(
            "round {round}: two concurrent revocations took {:?} (CRL races so far: {})",
            t0.elapsed(),
            auth_a.crl_races() + auth_b.crl_races()
        );
        a.follow_store().unwrap();
        b.follow_store().unwrap();
        assert_eq!(a.version(), b.version());
        for (name, auth) in [("A", &auth_a), ("B", &auth_b)] {
            let on = crl_serials(&auth.crl_der()).unwrap();
            for s in &revoked {
                assert!(on.contains(s), "{name}'s CRL misses {s} (round {round})");
            }
        }
        let races = auth_a.crl_races() + auth_b.crl_races();
        if races > 0 && round >= 1 {
            return races;
        }
    }
    auth_a.crl_races() + auth_b.crl_races()
}

#[test]
fn a_crl_signed_before_another_controllers_revocation_is_refused_and_signed_again() {
    let plane = Plane::new().unwrap();
    let (auth_b, b) = second(plane.store.clone(), &plane.dir.path().join("ctl"));
    let n1 = plane.enroll("eu", "n1", 0, wg_key(1)).unwrap();
    let n2 = plane.enroll("eu", "n2", 1, wg_key(2)).unwrap();
    let (s1, s2) = (
        cert_serial(&n1.creds.cert_der).unwrap(),
        cert_serial(&n2.creds.cert_der).unwrap(),
    );
    b.follow_store().unwrap();

    // B signs a CRL for n2; A revokes n1 before B commits: B's CRL (without n1) is refused.
    {
        let lock = auth_b.crl_lock();
        let pending = auth_b
            .sign_pending(
                &lock,
                std::slice::from_ref(&n2.who.serial_hex),
                RevocationReason::KeyCompromise,
                SystemTime::now(),
            )
            .unwrap();
        plane
            .mesh
            .revoke_node("eu/n1", RevocationReason::KeyCompromise, SystemTime::now())
            .unwrap();
        let mut txn = Txn::new();
        pending.add_to(&mut txn);
        assert!(
            !plane.store.kv().commit(&txn).unwrap(),
            "a CRL that misses A's revocation must not apply"
        );
        assert!(!plane.auth.is_revoked(&n2.who.serial_hex));
    }
    // Through B's Mesh: signed again, so its CRL lists both.
    b.revoke_node("eu/n2", RevocationReason::KeyCompromise, SystemTime::now())
        .unwrap();
    let on = crl_serials(&auth_b.crl_der()).unwrap();
    assert!(on.contains(&s1) && on.contains(&s2), "{on:?}");
    plane.mesh.follow_store().unwrap();
    assert_eq!(plane.auth.crl_der(), auth_b.crl_der());

    let races = concurrent_rounds(&plane.mesh, &b, 10);
    println!("sled: CRL races signed again: {races}");
    assert!(races > 0, "the two controllers never raced for the CRL");
}

#[test]
fn two_controllers_on_etcd_revoking_at_once_both_end_on_the_crl() {
    if !etcd::available() {
        println!("skipped: etcd not installed");
        return;
    }
    let plane = Plane::new().unwrap();
    let data_dir = plane.dir.path().join("ctl");
    let cluster = Etcd::start(plane.dir.path(), 3).unwrap();
    let url = cluster.store_url();
    copy_store(&plane.store, &open_store(&url, &data_dir));
    let (_, a) = second(open_store(&url, &data_dir), &data_dir);
    let (_, b) = second(open_store(&url, &data_dir), &data_dir);
    let races = concurrent_rounds(&a, &b, 10);
    println!("etcd: CRL races signed again: {races}");
    assert!(races > 0, "the two controllers never raced for the CRL");
}

#[test]
fn a_node_with_more_certificates_than_one_transaction_holds_is_revoked_whole() {
    use zonemesh_controller::mesh::SERIALS_PER_TXN;
    let plane = Plane::new().unwrap();
    let n1 = plane.enroll("eu", "n1", 0, wg_key(1)).unwrap();
    let dns = format!("n1.eu.{}", plane.auth.trust_domain());
    let key = zonemesh_tests::rsa2048(0);
    let csr = rcgen::CertificateParams::new(vec![dns.clone()])
        .unwrap()
        .serialize_request(&key)
        .unwrap()
        .der()
        .to_vec();
    let names = zonemesh_ca::TlsNames {
        dns: vec![dns],
        ips: vec![],
    };
    let now = SystemTime::now();
    let mut serials = vec![n1.who.serial_hex.clone()];
    for _ in 0..SERIALS_PER_TXN + 12 {
        let c = plane
            .auth
            .issue_tls_csr(&csr, &names, None, Some("eu/n1"), now)
            .unwrap();
        serials.push(c.serial_hex);
    }
    let before = plane.mesh.version();
    plane
        .mesh
        .revoke_node("eu/n1", RevocationReason::KeyCompromise, SystemTime::now())
        .unwrap();
    assert_eq!(
        plane.mesh.version(),
        before + 2,
        "one transaction of the node's other certificates, then the node"
    );
    for s in &serials {
        assert!(plane.auth.is_revoked(s), "{s} not revoked");
    }
    assert!(crl_serials(&plane.auth.crl_der()).unwrap().len() >= serials.len());
    assert!(plane.store.node_serials("eu/n1").unwrap().is_empty());
    assert!(plane.store.node("eu/n1").unwrap().unwrap().revoked);
}
