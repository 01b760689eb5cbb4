//! A CA rotation made through one controller reaches another controller of the same etcd
//! store without a restart: two real `serve --store etcd://` processes, `ca rotate-
//! intermediate` and then `ca rotate-root` through A; B, within a measured time, sends the
//! new CA bundle to a watcher connected to it, serves a CRL signed by the new intermediate
//! at its PKI endpoint, presents a TLS certificate from the new intermediate, and issues
//! new node certificates from it (the issuer checked with `openssl x509`).

use std::time::{Duration, Instant};
use tempfile::TempDir;
use zonemesh_proto as pb;
use zonemesh_tests::cluster::{
    Controller, copy_secrets, enroll_rpc, enrollment_channel, mesh_channel, next_update, wg_key,
};
use zonemesh_tests::etcd::{self, Etcd};

/// What B may take beyond the follow interval (100 ms) to take a rotation in; measured in
/// a debug build at about a quarter of this.
const BOUND: Duration = Duration::from_millis(3000);

fn der_of_pem(pem: &str) -> Vec<u8> {
    zonemesh_ca::pem_blocks("CERTIFICATE", pem)
        .expect("PEM")
        .remove(0)
}

fn subject_of(der: &[u8]) -> String {
    use x509_parser::prelude::{FromDer, X509Certificate};
    X509Certificate::from_der(der)
        .unwrap()
        .1
        .subject()
        .to_string()
}

fn crl_issuer(der: &[u8]) -> String {
    use x509_parser::prelude::{CertificateRevocationList, FromDer};
    CertificateRevocationList::from_der(der)
        .unwrap()
        .1
        .issuer()
        .to_string()
}

/// `openssl x509 -noout -issuer` of a DER certificate, and `-subject` of another, in the
/// same format.
fn openssl_names(dir: &std::path::Path, leaf: &[u8], int: &[u8]) -> (String, String) {
    let l = zonemesh_tests::write(dir, "leaf.pem", zonemesh_ca::to_pem("CERTIFICATE", leaf));
    let i = zonemesh_tests::write(dir, "int.pem", zonemesh_ca::to_pem("CERTIFICATE", int));
    let issuer = zonemesh_tests::run_ok(
        zonemesh_tests::openssl(&["x509", "-noout", "-issuer", "-in"]).arg(&l),
    )
    .unwrap();
    let subject = zonemesh_tests::run_ok(
        zonemesh_tests::openssl(&["x509", "-noout", "-subject", "-in"]).arg(&i),
    )
    .unwrap();
    (
        issuer
            .trim()
            .trim_start_matches("issuer=")
            .trim()
            .to_string(),
        subject
            .trim()
            .trim_start_matches("subject=")
            .trim()
            .to_string(),
    )
}

async fn get(url: &str) -> Option<Vec<u8>> {
    let out = tokio::process::Command::new("curl")
        .args(["-sf", "--max-time", "2", url])
        .output()
        .await
        .ok()?;
    out.status.success().then_some(out.stdout)
}

/// Time from now until B shows the intermediate `int` everywhere: in a Watch message to its
/// watcher, in its `/crl`, in its gRPC TLS chain. Returns the three times.
async fn until_b_moves(
    b: &Controller,
    watch: &mut tonic::Streaming<pb::MeshUpdate>,
    int: &[u8],
    start: Instant,
) -> (Duration, Duration, Duration) {
    let want = subject_of(int);
    let mut watch_at = None;
    let mut crl_at = None;
    let mut tls_at = None;
    let deadline = start + Duration::from_secs(30);
    while watch_at.is_none() || crl_at.is_none() || tls_at.is_none() {
        assert!(
            Instant::now() < deadline,
            "B did not move to {want} (watch {watch_at:?}, crl {crl_at:?}, tls {tls_at:?}):\n{}",
            b.log_text()
        );
        if watch_at.is_none()
            && let Ok(Some(u)) = next_update(watch, Duration::from_millis(10)).await
        {
            let bundle = match u.kind {
                Some(pb::mesh_update::Kind::Delta(d)) => d.ca,
                Some(pb::mesh_update::Kind::Snapshot(s)) => s.ca,
                None => None,
            };
            if bundle.is_some_and(|c| c.intermediates.first().map(Vec::as_slice) == Some(int)) {
                watch_at = Some(start.elapsed());
            }
        }
        if crl_at.is_none()
            && let Some(crl) = get(&format!("http://{}/crl", b.pki)).await
            && crl_issuer(&crl) == want
        {
            crl_at = Some(start.elapsed());
        }
        if tls_at.is_none() {
            let addr = b.grpc;
            let served = tokio::task::spawn_blocking(move || {
                zonemesh_tests::tlsprobe::fetch(addr, "localhost")
            })
            .await
            .unwrap();
            if served.is_ok_and(|s| s.chain.get(1).map(Vec::as_slice) == Some(int)) {
                tls_at = Some(start.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (watch_at.unwrap(), crl_at.unwrap(), tls_at.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_through_a_reaches_b_without_a_restart() {
    if !etcd::available() {
        println!("skipped: etcd not installed");
        return;
    }
    if !zonemesh_tests::have("curl") {
        println!("skipped: curl not installed");
        return;
    }
    let tmp = TempDir::new().unwrap();
    let e = Etcd::start_temp(1).unwrap();
    let url = e.url("rotfollow");
    let mut a = Controller::init_on_store(&tmp.path().join("a"), &url).unwrap();
    a.start().unwrap();
    let bdir = tmp.path().join("b");
    copy_secrets(&a.data_dir, &bdir.join("ctl")).unwrap();
    let mut b = Controller::existing(&bdir, bdir.join("ctl"), a.fingerprint.clone());
    b.serve_args = vec!["--store".into(), url.clone()];
    b.start().unwrap();
    a.zone_add("eu", "100.64.1.0/24").unwrap();

    // A node enrolled through A watches B; another renews on B after each rotation.
    let n1 = a.enroll_in_zone("eu", "n1", 0).await;
    let mut r = a.enroll_in_zone("eu", "r", 1).await;
    let old_int = der_of_pem(&a.admin_ok(&["ca", "export", "--intermediate"]).unwrap());
    let mut watch =
        pb::mesh_client::MeshClient::new(mesh_channel(&b.grpc_addr(), &n1).await.unwrap())
            .watch(pb::WatchRequest::default())
            .await
            .unwrap()
            .into_inner();
    let first = next_update(&mut watch, Duration::from_secs(20))
        .await
        .unwrap()
        .unwrap();
    let Some(pb::mesh_update::Kind::Snapshot(s)) = first.kind else {
        panic!("a snapshot first")
    };
    assert_eq!(s.ca.unwrap().intermediates[0], old_int);

    for (i, (what, args)) in [
        (
            "intermediate",
            vec!["ca", "rotate-intermediate", "--spread", "0s"],
        ),
        (
            "root",
            vec!["ca", "rotate-root", "--grace", "1h", "--spread", "0s"],
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let slot = i + 2;
        a.admin_ok(&args).unwrap();
        let start = Instant::now();
        let new_int = der_of_pem(&a.admin_ok(&["ca", "export", "--intermediate"]).unwrap());
        let new_root = der_of_pem(&a.admin_ok(&["ca", "export", "--root"]).unwrap());
        assert_ne!(new_int, old_int);
        let (w, c, t) = until_b_moves(&b, &mut watch, &new_int, start).await;
        println!(
            "rotate-{what}: B's watcher got the new bundle after {} ms, B's /crl after {} ms, B's TLS chain after {} ms (debug build)",
            w.as_millis(),
            c.as_millis(),
            t.as_millis()
        );
        let limit = zonemesh_controller::mesh::FOLLOW_EVERY + BOUND;
        assert!(
            w.max(c) < limit,
            "{what}: watch {w:?}, crl {c:?} over {limit:?}"
        );

        // B issues from the new intermediate: an enrollment through B, pinned to the root
        // now in force.
        let token = b.token("eu", 1).unwrap();
        let fp = zonemesh_ca::fingerprint_sha256(&new_root);
        let name = format!("n{}", slot + 1);
        let (creds, resp) = enroll_rpc(
            enrollment_channel(&b.grpc_addr(), &fp).await.unwrap(),
            &token,
            &name,
            &zonemesh_tests::rsa4096(slot),
            wg_key(slot as u64),
        )
        .await
        .unwrap();
        let (issuer, subject) = openssl_names(tmp.path(), &creds.cert_der, &new_int);
        assert_eq!(
            issuer, subject,
            "{what}: B issued {name} from another intermediate"
        );
        assert_eq!(resp.root_der, new_root);
        // And a node of A renews on B onto the new intermediate.
        r.root_der = new_root.clone();
        let csr =
            zonemesh_agent::control::enroll::csr_for(&zonemesh_tests::rsa4096(1), "r").unwrap();
        let renewed =
            pb::mesh_client::MeshClient::new(mesh_channel(&b.grpc_addr(), &r).await.unwrap())
                .renew(pb::RenewRequest {
                    csr_der: csr,
                    rotate_key: false,
                })
                .await
                .unwrap()
                .into_inner();
        let (issuer, subject) = openssl_names(tmp.path(), &renewed.certificate_der, &new_int);
        assert_eq!(
            issuer, subject,
            "{what}: r renewed on B from another intermediate"
        );
        assert_eq!(
            renewed.ca.map(|c| c.roots[0].clone()),
            Some(new_root.clone())
        );
        r.cert_der = renewed.certificate_der;
        r.chain_der = renewed.chain_der;
    }
    b.sigterm(Duration::from_secs(20)).unwrap();
    a.sigterm(Duration::from_secs(20)).unwrap();
}

/// In process, the same path without listeners: B holds the old CA set until it follows
/// A's rotation, then issues from the new intermediate, serves its CRL, and tells its
/// certificate renewer.
#[test]
fn following_a_rotation_reloads_the_ca_set() {
    use std::sync::Arc;
    use std::time::SystemTime;
    use zonemesh_controller::authority::Authority;
    use zonemesh_controller::mesh::Mesh;
    let plane = zonemesh_tests::inproc::Plane::new().unwrap();
    let kek = zonemesh_controller::secrets::KekSource::new(&plane.dir.path().join("ctl"), None)
        .load()
        .unwrap();
    let auth_b = Arc::new(Authority::load(plane.store.clone(), &kek, SystemTime::now()).unwrap());
    let b = Mesh::new(auth_b.clone()).unwrap();
    let renewer = auth_b.ca_changes();
    let old = auth_b.ca().intermediate_der().to_vec();
    plane
        .auth
        .rotate_intermediate(Duration::from_secs(0), SystemTime::now())
        .unwrap();
    plane.mesh.publish_ca().unwrap();
    let new = plane.auth.ca().intermediate_der().to_vec();
    assert_ne!(new, old);
    assert_eq!(
        auth_b.ca().intermediate_der(),
        old,
        "B has not followed yet"
    );
    assert!(auth_b.crl_of("int-2").is_none());
    b.follow_store().unwrap();
    assert_eq!(auth_b.ca().intermediate_der(), new);
    assert_eq!(auth_b.ca_bundle().intermediates[0], new);
    assert_eq!(auth_b.crl_of("int-2"), plane.auth.crl_of("int-2"));
    assert!(
        auth_b.crl_of("int-1").is_some(),
        "the retiring one is still served"
    );
    assert!(renewer.has_changed().unwrap());
    // Nothing new in the store: following again reloads nothing.
    assert!(!auth_b.reload_ca(SystemTime::now()).unwrap());
}
