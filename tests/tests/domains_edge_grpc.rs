//! Portal domains over the real control plane: an edge on mutual TLS opens WatchEdge, gets
//! the certificate and key of its zone's domain (and nothing of another zone's), reports
//! serving, and `domain deploy` then succeeds; the stream ends when the node is revoked.

use std::process::Command;
use std::time::Duration;
use tempfile::TempDir;
use zonemesh_proto as pb;
use zonemesh_tests::cluster::{Controller, mesh_channel};

const DOMAIN: &str = "portal.grpc.test";

async fn next(
    s: &mut tonic::Streaming<pb::EdgeUpdate>,
    within: Duration,
) -> Option<pb::EdgeUpdate> {
    match tokio::time::timeout(within, s.message()).await {
        Ok(Ok(m)) => m,
        Ok(Err(_)) => None,
        Err(_) => panic!("no edge update within {within:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_gets_its_zones_certificate_reports_serving_and_is_cut_off_when_revoked() {
    let tmp = TempDir::new().unwrap();
    let ctl = Controller::start_new(tmp.path()).unwrap();
    ctl.zone_add("eu", "100.64.1.0/24").unwrap();
    ctl.zone_add("us", "100.64.2.0/24").unwrap();
    let eu = ctl.enroll_in_zone("eu", "edge1", 0).await;
    let us = ctl.enroll_in_zone("us", "edge2", 1).await;
    ctl.admin_ok(&[
        "domain",
        "add",
        DOMAIN,
        "--issuer",
        "internal",
        "--owner",
        "owner@corp.test",
        "--edge-zone",
        "eu",
    ])
    .unwrap();

    let mut eu_client =
        pb::mesh_client::MeshClient::new(mesh_channel(&ctl.grpc_addr(), &eu).await.unwrap());
    let mut us_client =
        pb::mesh_client::MeshClient::new(mesh_channel(&ctl.grpc_addr(), &us).await.unwrap());
    let report = |state: pb::deployment_report::State, serial: &str| pb::DeploymentReport {
        domain: DOMAIN.into(),
        serial_hex: serial.into(),
        state: state as i32,
        detail: String::new(),
        staple: "stapled".into(),
        token: String::new(),
    };
    // Reporting before being an edge is refused.
    let early = eu_client
        .report_deployment(report(pb::deployment_report::State::Serving, "00"))
        .await
        .unwrap_err();
    assert_eq!(early.code(), tonic::Code::PermissionDenied, "{early:?}");

    let hello = pb::EdgeHello {
        https: true,
        files: false,
    };
    let mut eu_stream = eu_client.watch_edge(hello).await.unwrap().into_inner();
    let mut us_stream = us_client.watch_edge(hello).await.unwrap().into_inner();
    let snap = next(&mut eu_stream, Duration::from_secs(10)).await.unwrap();
    assert!(snap.snapshot && snap.certificates.is_empty(), "{snap:?}");
    assert!(
        next(&mut us_stream, Duration::from_secs(10))
            .await
            .unwrap()
            .snapshot
    );

    let (bin, dir) = (ctl.binary.clone(), ctl.data_dir.clone());
    let deploy = tokio::task::spawn_blocking(move || {
        Command::new(bin)
            .arg("--data-dir")
            .arg(dir)
            .args(["domain", "deploy", DOMAIN])
            .output()
            .unwrap()
    });
    let u = next(&mut eu_stream, Duration::from_secs(30)).await.unwrap();
    let cert = u.certificates.first().expect("the certificate").clone();
    assert_eq!(cert.domain, DOMAIN);
    assert!(cert.key_pkcs8_der.len() > 1000, "with its key");
    assert_eq!(cert.chain_der.len(), 2);
    let (_, leaf) = x509_parser::parse_x509_certificate(&cert.chain_der[0]).unwrap();
    assert_eq!(zonemesh_ca::serial_hex(leaf.raw_serial()), cert.serial_hex);
    let aia = format!("{:?}", leaf.extensions());
    assert!(
        aia.contains(&format!("http://{}/ocsp", ctl.pki)),
        "the AIA names our responder"
    );

    // Another zone's edge gets nothing and may not report on the domain.
    let quiet = tokio::time::timeout(Duration::from_secs(1), us_stream.message()).await;
    assert!(quiet.is_err(), "the us edge received {quiet:?}");
    let refused = us_client
        .report_deployment(report(
            pb::deployment_report::State::Serving,
            &cert.serial_hex,
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);

    eu_client
        .report_deployment(report(
            pb::deployment_report::State::Serving,
            &cert.serial_hex,
        ))
        .await
        .unwrap();
    let out = deploy.await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.lines()
            .last()
            .unwrap()
            .starts_with("deployed: 1/1 edges serve serial"),
        "{text}"
    );

    // The list, as table and JSON, from the same data.
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&ctl.admin_ok(&["domain", "list", "--json"]).unwrap()).unwrap();
    assert_eq!(rows.len(), 1);
    let d = &rows[0];
    assert_eq!(d["name"], DOMAIN);
    assert_eq!(d["issuer"], "internal");
    assert_eq!(d["owner"], "owner@corp.test");
    assert_eq!(d["edge_zones"], serde_json::json!(["eu"]));
    assert_eq!(d["state"], "deployed");
    assert_eq!(
        (d["edges_serving"].as_u64(), d["edges_total"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(d["serial_hex"], cert.serial_hex.as_str());
    assert_eq!(d["not_after_unix"], cert.not_after_unix);
    assert!(d["error"].is_null());
    assert_eq!(d["staple"], "stapled");
    let table = ctl.admin_ok(&["domain", "list"]).unwrap();
    let line = table.lines().nth(1).unwrap();
    let expiry = zonemesh_controller::cli::render::fmt_unix(cert.not_after_unix);
    let mut rest = line;
    for v in [
        DOMAIN,
        "internal",
        "owner@corp.test",
        "deployed 1/1",
        &cert.serial_hex,
        &expiry,
        "stapled",
    ] {
        let at = rest
            .find(v)
            .unwrap_or_else(|| panic!("{v:?} not in order in {line:?}"));
        rest = &rest[at + v.len()..];
    }

    // Revoking the edge ends its stream (and with it, its keys).
    ctl.admin_ok(&["node", "revoke", "eu/edge1"]).unwrap();
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match eu_stream.message().await {
                Ok(Some(_)) => continue,
                _ => return,
            }
        }
    })
    .await;
    assert!(end.is_ok(), "the revoked edge's stream ended");
    let audit = ctl.admin_ok(&["audit"]).unwrap();
    for kind in [
        "domain.added",
        "domain.deploy_requested",
        "domain.certificate_issued",
        "domain.deployed",
    ] {
        assert!(audit.contains(kind), "{kind} in\n{audit}");
    }
}
