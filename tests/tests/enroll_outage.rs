//! An unreachable store is not the client's fault: enrollments that fail because the
//! store refuses every commit answer UNAVAILABLE with a clear message and do not count
//! against the (source, token) failure budget, so an agent retrying through an outage
//! enrolls as soon as the store is back. Bad tokens still do count.

use std::time::{Duration, SystemTime};
use zonemesh_controller::error::ControllerError;
use zonemesh_proto as pb;
use zonemesh_tests::cluster::wg_key;
use zonemesh_tests::faultkv::Faulty;

/// More tries than the budget allows failures (10 per minute).
const RETRIES: usize = 14;

#[test]
fn retries_through_a_store_outage_are_not_throttled_once_the_store_is_back() {
    let (plane, faulty) = Faulty::plane().unwrap();
    let mesh = &plane.mesh;
    let now = SystemTime::now();
    mesh.add_zone("eu", "100.64.1.0/24", false, now).unwrap();
    let token = mesh
        .create_token("eu", Duration::from_secs(3600), 1, now)
        .unwrap();
    let req = pb::EnrollRequest {
        token: token.token,
        csr_der: zonemesh_agent::control::enroll::csr_for(&zonemesh_tests::rsa4096(0), "n1")
            .unwrap(),
        wg_public_key: wg_key(1).to_vec(),
        endpoints: vec![],
        node_name: "n1".into(),
        zone: String::new(),
    };
    let source = "127.0.0.1".parse().unwrap();

    faulty.set_failing(true);
    for i in 0..RETRIES {
        let e = mesh.enroll(&req, source, SystemTime::now()).unwrap_err();
        assert!(
            matches!(e, ControllerError::Store(_)),
            "try {i}: a store error, not {e}"
        );
        let status = tonic::Status::from(e);
        assert_eq!(
            status.code(),
            tonic::Code::Unavailable,
            "try {i}: {status:?}"
        );
        assert!(
            status.message().contains("store is unavailable")
                && status.message().contains("cannot be reached"),
            "{status:?}"
        );
    }
    assert!(plane.store.node("eu/n1").unwrap().is_none());
    faulty.set_failing(false);
    let resp = mesh
        .enroll(&req, source, SystemTime::now())
        .expect("the first try after the outage enrolls");
    assert_eq!(resp.node, "n1");

    // A client's own faults still count: bad tokens from one source are throttled.
    let mut bad = req.clone();
    bad.token = "not-a-token".into();
    bad.node_name = "n2".into();
    let mut limited = None;
    for i in 0..RETRIES {
        if let Err(ControllerError::RateLimited(_)) = mesh.enroll(&bad, source, SystemTime::now()) {
            limited = Some(i);
            break;
        }
    }
    assert_eq!(
        limited,
        Some(10),
        "the 11th bad token is refused as rate-limited"
    );
}
