//! Revoking a node revokes every certificate it ever had: each renewal supersedes (and
//! revokes) the previous certificate, renewal keeps the node's key, TLS certificates issued
//! to the node are revoked with it, and after a re-enrollment of the same name no earlier
//! certificate works and the old overlay address is reused.

use std::path::{Path, PathBuf};
use std::time::Duration;
use tempfile::TempDir;
use tonic::Code;
use zonemesh_proto as pb;
use zonemesh_tests::cluster::{
    Controller, NodeCreds, cert_serial, enroll_rpc, enrollment_channel, mesh_channel, next_update,
    renew_rpc, wg_key,
};
use zonemesh_tests::{rsa2048, rsa4096, write};

const WAIT: Duration = Duration::from_secs(10);

fn csr(key: &rcgen::KeyPair, node: &str) -> Vec<u8> {
    zonemesh_agent::control::enroll::csr_for(key, node).unwrap()
}

/// Write the CA root and the chain once, and each certificate as its own PEM file.
fn pem_dir(dir: &Path, creds: &NodeCreds) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    write(
        dir,
        "ca.crt",
        zonemesh_ca::to_pem("CERTIFICATE", &creds.root_der),
    );
    let chain: String = creds
        .chain_der
        .iter()
        .map(|c| zonemesh_ca::to_pem("CERTIFICATE", c))
        .collect();
    write(dir, "chain.pem", chain);
    dir.to_path_buf()
}

fn keep_pem(dir: &Path, name: &str, der: &[u8]) -> PathBuf {
    write(dir, name, zonemesh_ca::to_pem("CERTIFICATE", der))
}

async fn renew(addr: &str, creds: &NodeCreds, key: &rcgen::KeyPair, node: &str) -> NodeCreds {
    renew_rpc(addr, creds, key, node).await.unwrap()
}

async fn enroll(
    ctl: &Controller,
    token: &str,
    name: &str,
    key: &rcgen::KeyPair,
    wg: u64,
) -> (NodeCreds, pb::EnrollResponse) {
    let ch = enrollment_channel(&ctl.grpc_addr(), &ctl.fingerprint)
        .await
        .unwrap();
    enroll_rpc(ch, token, name, key, wg_key(wg)).await.unwrap()
}

fn tls_request(node: &str) -> pb::IssueTlsRequest {
    pb::IssueTlsRequest {
        csr_der: csr(&rsa2048(20), node),
        dns_names: vec![format!("{node}.eu.corp.test")],
        ip_addresses: vec![],
        lifetime_secs: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_revoke_revokes_every_serial_the_node_ever_had() {
    let tmp = TempDir::new().unwrap();
    let ctl = Controller::start_new(tmp.path()).unwrap();
    ctl.zone_add("eu", "100.64.1.0/24").unwrap();
    let addr = ctl.grpc_addr();
    let key = rsa4096(20);
    let (c0, _) = enroll(&ctl, &ctl.token("eu", 1).unwrap(), "n1", &key, 1).await;
    let pems = pem_dir(&tmp.path().join("pems"), &c0);
    let p0 = keep_pem(&pems, "c0.crt", &c0.cert_der);

    // The first renewal supersedes the enrollment certificate at once.
    let c1 = renew(&addr, &c0, &key, "n1").await;
    let p1 = keep_pem(&pems, "c1.crt", &c1.cert_der);
    let text = ctl.ocsp_cert_status(&pems, &p0);
    assert!(text.contains("c0.crt: revoked"), "{text}");
    assert!(text.contains("Reason: superseded"), "{text}");
    assert!(ctl.ocsp_cert_status(&pems, &p1).contains("c1.crt: good"));

    let c2 = renew(&addr, &c1, &key, "n1").await;
    let p2 = keep_pem(&pems, "c2.crt", &c2.cert_der);
    assert!(
        ctl.ocsp_cert_status(&pems, &p1)
            .contains("Reason: superseded")
    );

    // Renewal keeps the key: a CSR for another key is refused and issues nothing.
    let e = pb::mesh_client::MeshClient::new(mesh_channel(&addr, &c2).await.unwrap())
        .renew(pb::RenewRequest {
            csr_der: csr(&rsa4096(21), "n1"),
            rotate_key: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("different key"), "{e:?}");

    // A TLS certificate for the node's services is the node's too.
    let tls = pb::mesh_client::MeshClient::new(mesh_channel(&addr, &c2).await.unwrap())
        .issue_tls_certificate(tls_request("n1"))
        .await
        .unwrap()
        .into_inner();
    let pt = keep_pem(&pems, "tls.crt", &tls.certificate_der);
    assert!(ctl.ocsp_cert_status(&pems, &p2).contains("c2.crt: good"));
    assert!(ctl.ocsp_cert_status(&pems, &pt).contains("tls.crt: good"));

    ctl.admin_ok(&["node", "revoke", "eu/n1"]).unwrap();
    for (name, p) in [
        ("c0.crt", &p0),
        ("c1.crt", &p1),
        ("c2.crt", &p2),
        ("tls.crt", &pt),
    ] {
        let text = ctl.ocsp_cert_status(&pems, p);
        assert!(
            text.contains(&format!("{name}: revoked")),
            "{name} not revoked after node revoke: {text}"
        );
    }
    // The current certificate carries the operator's reason, not "superseded".
    assert!(
        !ctl.ocsp_cert_status(&pems, &p2)
            .contains("Reason: superseded")
    );
    assert_ne!(
        cert_serial(&c0.cert_der).unwrap(),
        cert_serial(&c2.cert_der).unwrap()
    );
}

/// What an old certificate can still do: the calls that succeeded, as names.
async fn still_works(addr: &str, creds: &NodeCreds) -> Vec<&'static str> {
    let mut worked = Vec::new();
    let client = || async {
        Ok::<_, anyhow::Error>(pb::mesh_client::MeshClient::new(
            mesh_channel(addr, creds).await?,
        ))
    };
    let watch = async {
        let mut s = client()
            .await?
            .watch(pb::WatchRequest::default())
            .await?
            .into_inner();
        Ok::<_, anyhow::Error>(s.message().await?.is_some())
    };
    if matches!(tokio::time::timeout(WAIT, watch).await, Ok(Ok(true))) {
        worked.push("watch");
    }
    let endpoints = async {
        client()
            .await?
            .update_endpoints(pb::UpdateEndpointsRequest {
                endpoints: vec!["198.18.0.66:51820".into()],
            })
            .await?;
        Ok::<_, anyhow::Error>(())
    };
    if matches!(tokio::time::timeout(WAIT, endpoints).await, Ok(Ok(()))) {
        worked.push("update_endpoints");
    }
    let tls = async {
        client()
            .await?
            .issue_tls_certificate(tls_request("n1"))
            .await?;
        Ok::<_, anyhow::Error>(())
    };
    if matches!(tokio::time::timeout(WAIT, tls).await, Ok(Ok(()))) {
        worked.push("issue_tls_certificate");
    }
    let renewal = async {
        client()
            .await?
            .renew(pb::RenewRequest {
                csr_der: csr(&rsa4096(20), "n1"),
                rotate_key: false,
            })
            .await?;
        Ok::<_, anyhow::Error>(())
    };
    if matches!(tokio::time::timeout(WAIT, renewal).await, Ok(Ok(()))) {
        worked.push("renew");
    }
    worked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn re_enrolled_name_trusts_no_earlier_certificate_and_reuses_the_address() {
    let tmp = TempDir::new().unwrap();
    let ctl = Controller::start_new(tmp.path()).unwrap();
    ctl.zone_add("eu", "100.64.1.0/24").unwrap();
    let addr = ctl.grpc_addr();
    let key = rsa4096(20);
    let (a0, first) = enroll(&ctl, &ctl.token("eu", 1).unwrap(), "n1", &key, 1).await;
    let a1 = renew(&addr, &a0, &key, "n1").await;
    ctl.admin_ok(&["node", "revoke", "eu/n1"]).unwrap();

    // The same name enrolls again, with a new token, key and WireGuard key.
    let (b, again) = enroll(&ctl, &ctl.token("eu", 1).unwrap(), "n1", &rsa4096(22), 2).await;
    assert_eq!(
        again.overlay_ip, first.overlay_ip,
        "the revoked node's overlay address was not freed"
    );
    // A third node in the zone gets the next address, not the re-used one.
    let (_, third) = enroll(&ctl, &ctl.token("eu", 1).unwrap(), "n3", &rsa4096(23), 3).await;
    assert_ne!(third.overlay_ip, first.overlay_ip);

    for (name, old) in [("enrollment", &a0), ("renewed", &a1)] {
        let worked = still_works(&addr, old).await;
        assert!(
            worked.is_empty(),
            "the {name} certificate from before re-enrollment still works for {worked:?}"
        );
    }
    // The new node is unaffected.
    let mut w = pb::mesh_client::MeshClient::new(mesh_channel(&addr, &b).await.unwrap())
        .watch(pb::WatchRequest::default())
        .await
        .unwrap()
        .into_inner();
    let snap = next_update(&mut w, WAIT).await.unwrap().unwrap();
    assert!(matches!(
        snap.kind,
        Some(pb::mesh_update::Kind::Snapshot(_))
    ));
}
