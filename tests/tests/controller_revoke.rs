//! `node revoke` cuts a node off everywhere at once: the next handshake, its open Watch
//! stream, every other node's view of the mesh, and the OCSP responder.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;
use tempfile::TempDir;
use zonemesh_proto as pb;
use zonemesh_tests::cluster::{
    Controller, NodeCreds, cert_serial, crl_serials, mesh_channel, next_update,
};
use zonemesh_tests::openssl;

const WAIT: Duration = Duration::from_secs(10);

/// `openssl s_client` with the node's certificate; returns (exit ok, everything printed).
fn s_client(ctl: &Controller, state: &Path) -> (bool, String) {
    let child = openssl(&["s_client", "-connect", &ctl.grpc_addr(), "-alpn", "h2"])
        .arg("-cert")
        .arg(state.join("node.crt"))
        .arg("-key")
        .arg(state.join("node.key"))
        .arg("-cert_chain")
        .arg(state.join("chain.pem"))
        .arg("-CAfile")
        .arg(state.join("ca.crt"))
        .arg("-verify_return_error")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Send an HTTP/2 preface so the server has to read past the handshake (TLS 1.3 sends
    // the client-certificate verdict after the client thinks it is done).
    let mut child = child;
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        let _ = stdin.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        std::thread::sleep(Duration::from_millis(500));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_node_is_cut_off_everywhere() {
    let tmp = TempDir::new().unwrap();
    let ctl = Controller::start_new(tmp.path()).unwrap();
    ctl.zone_add("eu", "100.64.1.0/24").unwrap();
    ctl.zone_add("us", "100.64.2.0/24").unwrap();
    let (bad_dir, good_dir) = (tmp.path().join("bad"), tmp.path().join("good"));
    ctl.enroll_ok(&ctl.token("eu", 1).unwrap(), &bad_dir, "bad")
        .unwrap();
    ctl.enroll_ok(&ctl.token("us", 1).unwrap(), &good_dir, "good")
        .unwrap();
    let bad = NodeCreds::from_state_dir(&bad_dir).unwrap();
    let good = NodeCreds::from_state_dir(&good_dir).unwrap();
    let bad_serial = cert_serial(&bad.cert_der).unwrap();

    // Before: both connect, both watch, OCSP says good, s_client completes.
    let addr = ctl.grpc_addr();
    let mut bad_watch = pb::mesh_client::MeshClient::new(mesh_channel(&addr, &bad).await.unwrap())
        .watch(pb::WatchRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut good_watch =
        pb::mesh_client::MeshClient::new(mesh_channel(&addr, &good).await.unwrap())
            .watch(pb::WatchRequest::default())
            .await
            .unwrap()
            .into_inner();
    for w in [&mut bad_watch, &mut good_watch] {
        let first = next_update(w, WAIT).await.unwrap().unwrap();
        let Some(pb::mesh_update::Kind::Snapshot(s)) = first.kind else {
            panic!("first update is not a snapshot: {first:?}");
        };
        assert_eq!(s.peers.len(), 2);
    }
    assert!(ctl.ocsp_status(&bad_dir).contains("node.crt: good"));
    let (ok, text) = s_client(&ctl, &bad_dir);
    assert!(ok, "s_client before revocation: {text}");
    assert!(!text.contains("alert"), "{text}");

    ctl.admin_ok(&["node", "revoke", "eu/bad"]).unwrap();

    // The revoked node's open stream ends. It may first see its own removal (the change
    // is broadcast before its streams are cancelled), but nothing after that.
    let mut saw_own_removal = false;
    loop {
        match next_update(&mut bad_watch, WAIT).await {
            Ok(None) => break,
            Err(e) => {
                assert!(
                    !e.to_string().contains("no watch update within"),
                    "revoked node's stream stayed open"
                );
                break;
            }
            Ok(Some(u)) => {
                let own_removal = matches!(&u.kind, Some(pb::mesh_update::Kind::Delta(d))
                    if d.removed.iter().any(|r| r.zone == "eu" && r.node == "bad"));
                assert!(
                    own_removal && !saw_own_removal,
                    "revoked node still receives updates: {u:?}"
                );
                saw_own_removal = true;
            }
        }
    }
    // The other node sees the removal and a CRL that lists the serial.
    let u = next_update(&mut good_watch, WAIT).await.unwrap().unwrap();
    let Some(pb::mesh_update::Kind::Delta(d)) = u.kind else {
        panic!("expected a delta, got {u:?}");
    };
    assert_eq!(
        d.removed,
        vec![pb::PeerRef {
            zone: "eu".into(),
            node: "bad".into()
        }]
    );
    assert!(d.upserted.is_empty());
    assert!(
        crl_serials(&d.crl_der).unwrap().contains(&bad_serial),
        "pushed CRL does not list {bad_serial}"
    );

    // A fresh mTLS connection with the revoked certificate gets nothing.
    let fresh = async {
        let ch = mesh_channel(&addr, &bad).await?;
        let mut s = pb::mesh_client::MeshClient::new(ch)
            .watch(pb::WatchRequest::default())
            .await?
            .into_inner();
        Ok::<_, anyhow::Error>(s.message().await?)
    };
    match tokio::time::timeout(WAIT, fresh).await {
        Ok(Err(_)) => {}
        Ok(Ok(m)) => panic!("revoked certificate was served: {m:?}"),
        Err(_) => panic!("revoked certificate's connection hung instead of failing"),
    }
    // openssl agrees: the server refuses the certificate during the handshake.
    let (ok, text) = s_client(&ctl, &bad_dir);
    assert!(
        !ok || text.to_lowercase().contains("alert"),
        "s_client with a revoked certificate: {text}"
    );
    assert!(
        text.to_lowercase().contains("certificate revoked"),
        "s_client does not report the revocation: {text}"
    );
    // The unrevoked node is unaffected: a fresh connection works, and OCSP says good.
    let mut again = pb::mesh_client::MeshClient::new(mesh_channel(&addr, &good).await.unwrap())
        .watch(pb::WatchRequest::default())
        .await
        .unwrap()
        .into_inner();
    let snap = next_update(&mut again, WAIT).await.unwrap().unwrap();
    let Some(pb::mesh_update::Kind::Snapshot(s)) = snap.kind else {
        panic!("expected snapshot");
    };
    assert_eq!(s.peers.len(), 1);
    assert_eq!(s.peers[0].node, "good");

    let text = ctl.ocsp_status(&bad_dir);
    assert!(text.contains("node.crt: revoked"), "{text}");
    assert!(ctl.ocsp_status(&good_dir).contains("node.crt: good"));
    // The published CRL lists it too.
    let crl = fetch(&format!("http://{}/crl", ctl.pki));
    assert!(crl_serials(&crl).unwrap().contains(&bad_serial));
}

fn fetch(url: &str) -> Vec<u8> {
    let out = Command::new("curl").args(["-sf", url]).output().unwrap();
    assert!(out.status.success(), "curl {url} failed");
    out.stdout
}
