//! Enrollment as an operator sees it: `zonemesh-agent enroll` against a running controller,
//! checked with openssl; and every way a bad enrollment must be refused without issuing
//! anything.

use std::time::{Duration, SystemTime};
use tempfile::TempDir;
use zonemesh_tests::cluster::Controller;
use zonemesh_tests::{bin, openssl, run_ok};

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn enrolled_identity_has_spiffe_id_and_verifies_with_openssl() {
    let tmp = TempDir::new().unwrap();
    let ctl = Controller::start_new(tmp.path()).unwrap();
    ctl.zone_add("eu-west", "100.64.1.0/24").unwrap();
    let token = ctl.token("eu-west", 1).unwrap();
    let state = tmp.path().join("agent");
    ctl.enroll_ok(&token, &state, "web-1").unwrap();

    let id: serde_json::Value = serde_json::from_str(
        &run_ok(
            std::process::Command::new(bin("zonemesh-agent"))
                .args(["identity", "--json", "--state-dir"])
                .arg(&state),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(
        id["spiffe_id"],
        "spiffe://corp.test/zone/eu-west/node/web-1"
    );
    assert_eq!(id["zone"], "eu-west");
    assert_eq!(id["node"], "web-1");
    assert_eq!(id["overlay_ip"], "100.64.1.1");

    // A verifier we did not write accepts the stored chain up to the stored root...
    let verify = run_ok(
        openssl(&["verify", "-CAfile"])
            .arg(state.join("ca.crt"))
            .args([
                "-untrusted",
                state.join("chain.pem").to_str().unwrap(),
                "-purpose",
                "sslclient",
                state.join("node.crt").to_str().unwrap(),
            ]),
    )
    .unwrap();
    assert!(verify.trim_end().ends_with(": OK"), "{verify}");
    // ...and the root is the one pinned at enrollment.
    let fp = run_ok(
        openssl(&["x509", "-noout", "-fingerprint", "-sha256", "-in"]).arg(state.join("ca.crt")),
    )
    .unwrap();
    let fp = fp
        .split('=')
        .nth(1)
        .unwrap()
        .trim()
        .replace(':', "")
        .to_ascii_lowercase();
    assert_eq!(fp, ctl.fingerprint);
    // The certificate carries the SPIFFE ID as its URI SAN, and the serial the agent shows.
    let text =
        run_ok(openssl(&["x509", "-noout", "-text", "-in"]).arg(state.join("node.crt"))).unwrap();
    assert!(
        text.contains("URI:spiffe://corp.test/zone/eu-west/node/web-1"),
        "{text}"
    );
    let nodes = ctl.nodes().unwrap();
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0]["serial"], id["serial"]);
}

#[test]
fn bad_enrollments_are_refused_clearly_and_issue_nothing() {
    let tmp = TempDir::new().unwrap();
    let mut ctl = Controller::start_new(tmp.path()).unwrap();
    ctl.zone_add("eu", "100.64.1.0/24").unwrap();
    ctl.zone_add("us", "100.64.2.0/24").unwrap();
    let token = ctl.token("eu", 1).unwrap();
    ctl.enroll_ok(&token, &tmp.path().join("first"), "first")
        .unwrap();
    let nodes_before = ctl.nodes().unwrap();
    assert_eq!(nodes_before.len(), 1);

    let refused = |what: &str, out: std::process::Output, expect: &str| {
        assert!(!out.status.success(), "{what}: enrollment succeeded");
        let err = stderr(&out);
        assert!(
            err.to_lowercase().contains(&expect.to_lowercase()),
            "{what}: message {err:?} does not say {expect:?}"
        );
    };

    // The same one-use token again.
    refused(
        "token reuse",
        ctl.enroll_cli(&token, &tmp.path().join("reuse"), "reuse", &[])
            .unwrap(),
        "already been used",
    );
    // A token for zone eu used by an operator who expects zone us.
    let eu_token = ctl.token("eu", 1).unwrap();
    refused(
        "token for another zone",
        ctl.enroll_cli(
            &eu_token,
            &tmp.path().join("zone"),
            "zone",
            &["--zone", "us"],
        )
        .unwrap(),
        "token is for zone eu, not us",
    );
    // A CA fingerprint that is not this controller's: the agent must not even send the token.
    let wrong_fp = "ab".repeat(32);
    let out = run_ok_or_output(
        std::process::Command::new(bin("zonemesh-agent"))
            .arg("enroll")
            .args(["--controller", &ctl.grpc_addr()])
            .args(["--ca-fingerprint", &wrong_fp])
            .args(["--token", &eu_token])
            .arg("--state-dir")
            .arg(tmp.path().join("fp"))
            .args(["--name", "fp"]),
    );
    refused(
        "wrong CA fingerprint",
        out,
        "does not match the pinned --ca-fingerprint",
    );
    // A token that never existed.
    refused(
        "unknown token",
        ctl.enroll_cli(
            "zmt_not_a_real_token",
            &tmp.path().join("fake"),
            "fake",
            &[],
        )
        .unwrap(),
        "token is not valid",
    );

    // Nothing was issued: the node list is unchanged, and the eu token (refused above for
    // the wrong zone and never sent with the wrong fingerprint) still works exactly once.
    assert_eq!(ctl.nodes().unwrap(), nodes_before);
    ctl.enroll_ok(&eu_token, &tmp.path().join("second"), "second")
        .unwrap();
    assert_eq!(ctl.nodes().unwrap().len(), 2);

    // The CA recorded exactly two node serials: one per successful enrollment.
    ctl.sigterm(Duration::from_secs(10)).unwrap();
    let serials = ctl.issued_node_serials().unwrap();
    assert_eq!(serials.len(), 2, "{serials:?}");
}

fn run_ok_or_output(cmd: &mut std::process::Command) -> std::process::Output {
    cmd.output().expect("run command")
}

/// Token expiry is checked against the time passed in; the library is driven with a clock
/// two hours ahead (the CLI's shortest TTL is a minute, too long for a test to wait).
#[test]
fn expired_token_is_refused_and_issues_nothing() {
    use std::sync::Arc;
    use zonemesh_controller::authority::Authority;
    use zonemesh_controller::mesh::Mesh;
    use zonemesh_controller::secrets::KekSource;
    use zonemesh_controller::store::Store;

    let tmp = TempDir::new().unwrap();
    let ctl = Controller::init(tmp.path()).unwrap();
    let now = SystemTime::now();
    let store = Store::open(&ctl.data_dir.join("db")).unwrap();
    let kek = KekSource::new(&ctl.data_dir, None).load().unwrap();
    let auth = Arc::new(Authority::load(store.clone(), &kek, now).unwrap());
    let mesh = Mesh::new(auth).unwrap();
    mesh.add_zone("eu", "100.64.1.0/24", false, now).unwrap();
    let token = mesh
        .create_token("eu", Duration::from_secs(3600), 1, now)
        .unwrap();
    let key = zonemesh_tests::rsa4096(0);
    let req = zonemesh_proto::EnrollRequest {
        token: token.token.clone(),
        csr_der: zonemesh_agent::control::enroll::csr_for(&key, "late").unwrap(),
        wg_public_key: vec![7; 32],
        endpoints: vec![],
        node_name: "late".into(),
        zone: String::new(),
    };
    let src = "127.0.0.1".parse().unwrap();
    let certs_before = store.certs.len().unwrap();
    let err = mesh
        .enroll(&req, src, now + Duration::from_secs(2 * 3600))
        .unwrap_err();
    assert!(err.to_string().contains("expired"), "{err}");
    let status = tonic::Status::from(err);
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    assert!(store.nodes().unwrap().is_empty());
    assert_eq!(store.certs.len().unwrap(), certs_before);
    // The same token within its lifetime works: the refusal above was about time only.
    mesh.enroll(&req, src, now + Duration::from_secs(60))
        .unwrap();
    assert_eq!(store.nodes().unwrap().len(), 1);

    // A second node may not claim the first node's WireGuard key while it is active, and may
    // once the first node is revoked.
    let token2 = mesh
        .create_token("eu", Duration::from_secs(3600), 2, now)
        .unwrap();
    let copycat = zonemesh_proto::EnrollRequest {
        token: token2.token.clone(),
        csr_der: zonemesh_agent::control::enroll::csr_for(&key, "copycat").unwrap(),
        node_name: "copycat".into(),
        ..req.clone()
    };
    let err = mesh.enroll(&copycat, src, now).unwrap_err();
    assert!(
        err.to_string()
            .contains("WireGuard key belongs to another node"),
        "{err}"
    );
    mesh.revoke_node("eu/late", zonemesh_ca::RevocationReason::Superseded, now)
        .unwrap();
    mesh.enroll(&copycat, src, now).unwrap();
}
