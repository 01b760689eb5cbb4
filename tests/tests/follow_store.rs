//! Two controllers on one store, in process: two `Mesh`es (each with its own `Authority`)
//! over the same store. Changes recorded through A reach B's watchers once B follows the
//! store, under the same versions and as the same bytes; a change recorded through B
//! afterwards takes the next shared version; A's revocation ends B's streams of that node
//! and B serves A's new CRL.

use std::sync::Arc;
use std::time::SystemTime;
use zonemesh_ca::RevocationReason;
use zonemesh_controller::authority::Authority;
use zonemesh_controller::mesh::Mesh;
use zonemesh_controller::secrets::KekSource;
use zonemesh_proto as pb;
use zonemesh_tests::cluster::{cert_serial, crl_serials, wg_key};
use zonemesh_tests::inproc::Plane;

fn decode(frame: &zonemesh_controller::mesh::Frame) -> pb::MeshUpdate {
    frame.decode().unwrap()
}

#[test]
fn changes_through_one_controller_reach_the_watchers_of_another_under_the_same_versions() {
    let plane = Plane::new().unwrap();
    let a = plane.mesh.clone();
    let kek = KekSource::new(&plane.dir.path().join("ctl"), None)
        .load()
        .unwrap();
    let auth_b = Arc::new(Authority::load(plane.store.clone(), &kek, SystemTime::now()).unwrap());
    let b = Mesh::new(auth_b.clone()).unwrap();
    assert_eq!(b.follow_store().unwrap(), 0, "nothing to follow yet");
    a.add_zone("eu", "100.64.1.0/24", false, SystemTime::now())
        .unwrap();
    assert_eq!(b.follow_store().unwrap(), 1, "the zone added through A");

    // A watcher of B, up to date with B.
    let start = b.version();
    let sub = b.subscribe("eu/watcher", start).unwrap();
    assert!(sub.first.is_none());

    // Enroll two nodes through A.
    let n1 = plane.enroll("eu", "n1", 0, wg_key(1)).unwrap();
    let _n2 = plane.enroll("eu", "n2", 1, wg_key(2)).unwrap();
    let head = a.version();
    assert!(head > start);
    assert_eq!(b.version(), start, "B has not followed yet");
    assert!(!sub.head.has_changed().unwrap());

    let taken = b.follow_store().unwrap();
    assert_eq!(taken, head - start);
    assert_eq!(b.version(), head);
    assert!(sub.head.has_changed().unwrap(), "B's watcher is woken");
    // B tells its watcher what it missed, and has the same frames as A for each version.
    let missed = decode(&b.next_frame(start).unwrap().unwrap());
    assert_eq!(missed.version, head);
    let Some(pb::mesh_update::Kind::Delta(d)) = missed.kind else {
        panic!("a delta, not a snapshot")
    };
    let names: Vec<_> = d.upserted.iter().map(|p| p.node.as_str()).collect();
    assert!(names.contains(&"n1") && names.contains(&"n2"), "{names:?}");
    for v in start..head {
        let fa = a.next_frame(v).unwrap().unwrap();
        let fb = b.next_frame(v).unwrap().unwrap();
        assert_eq!(fa.version(), fb.version());
        assert!(fa.message() == fb.message(), "what follows {v} differs");
    }

    // A stream of n1 on B ends when A revokes n1, and B serves A's CRL.
    let n1_stream = b.subscribe("eu/n1", head).unwrap();
    let serial = cert_serial(&n1.creds.cert_der).unwrap();
    a.revoke_node("eu/n1", RevocationReason::KeyCompromise, SystemTime::now())
        .unwrap();
    assert!(!n1_stream.cancel.is_cancelled());
    assert!(!crl_serials(&auth_b.crl_der()).unwrap().contains(&serial));
    b.follow_store().unwrap();
    assert!(
        n1_stream.cancel.is_cancelled(),
        "B ended the revoked node's stream"
    );
    assert!(crl_serials(&auth_b.crl_der()).unwrap().contains(&serial));
    assert_eq!(auth_b.crl_der(), plane.auth.crl_der());

    // A change through B after A's takes the next shared version, and A follows it.
    let before = a.version();
    b.add_zone("us", "100.64.9.0/24", false, SystemTime::now())
        .unwrap();
    assert_eq!(b.version(), before + 1);
    assert_eq!(a.version(), before);
    a.follow_store().unwrap();
    assert_eq!(a.version(), before + 1);
    let z = decode(&a.next_frame(before).unwrap().unwrap());
    let Some(pb::mesh_update::Kind::Delta(d)) = z.kind else {
        panic!("a delta")
    };
    assert_eq!(d.zones.first().map(|z| z.name.as_str()), Some("us"));
}
