//! Hostile input on the gRPC port: garbage bytes, garbage protobuf, oversized messages,
//! CSRs naming another node, a client certificate from a foreign CA, plaintext. Each is
//! refused, nothing is issued, and the controller keeps serving (no panic).

use bytes::{Buf, BufMut};
use std::time::{Duration, SystemTime};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Code, Status};
use zonemesh_proto as pb;
use zonemesh_tests::cluster::{
    Controller, NodeCreds, enroll_rpc, enrollment_channel, mesh_channel, next_update, wg_key,
};
use zonemesh_tests::rsa4096;

const WAIT: Duration = Duration::from_secs(10);

/// Sends and receives raw bytes as the gRPC message body.
#[derive(Clone, Copy, Default)]
struct RawCodec;
struct Raw;

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}
impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}
impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

async fn raw_call(
    ch: tonic::transport::Channel,
    path: &'static str,
    body: Vec<u8>,
) -> Result<Vec<u8>, Status> {
    let mut g = tonic::client::Grpc::new(ch);
    g.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    g.unary(
        tonic::Request::new(body),
        tonic::codegen::http::uri::PathAndQuery::from_static(path),
        RawCodec,
    )
    .await
    .map(tonic::Response::into_inner)
}

/// The controller still serves: process alive, a good node can watch, admin answers.
async fn still_serving(ctl: &mut Controller, good: &NodeCreds, what: &str) {
    assert!(
        ctl.is_running(),
        "controller died after {what}:\n{}",
        ctl.log_text()
    );
    let mut w =
        pb::mesh_client::MeshClient::new(mesh_channel(&ctl.grpc_addr(), good).await.unwrap())
            .watch(pb::WatchRequest::default())
            .await
            .unwrap_or_else(|e| panic!("watch refused after {what}: {e}"))
            .into_inner();
    next_update(&mut w, WAIT).await.unwrap().unwrap();
    ctl.admin_ok(&["zone", "list"]).unwrap();
}

fn csr_named(key: &rcgen::KeyPair, cn: &str) -> Vec<u8> {
    zonemesh_agent::control::enroll::csr_for(key, cn).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_is_refused_and_the_controller_keeps_serving() {
    let tmp = TempDir::new().unwrap();
    let mut ctl = Controller::start_new(tmp.path()).unwrap();
    ctl.zone_add("eu", "100.64.1.0/24").unwrap();
    let token = ctl.token("eu", 5).unwrap();
    let addr = ctl.grpc_addr();
    let fp = ctl.fingerprint.clone();
    let enroll_ch = || enrollment_channel(&addr, &fp);
    let (good, _) = enroll_rpc(
        enroll_ch().await.unwrap(),
        &token,
        "good",
        &rsa4096(1),
        wg_key(1),
    )
    .await
    .unwrap();
    let nodes_before = ctl.nodes().unwrap();

    // 1. Garbage bytes instead of HTTP/2 after a valid TLS handshake, and before any TLS.
    {
        let tls = zonemesh_agent::control::client::pinned_config(&ctl.fingerprint).unwrap();
        let tcp = tokio::net::TcpStream::connect(ctl.grpc).await.unwrap();
        let mut s = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls))
            .connect("127.0.0.1".try_into().unwrap(), tcp)
            .await
            .unwrap();
        let junk: Vec<u8> = (0..64 * 1024).map(|i| (i * 7 + 3) as u8).collect();
        let _ = s.write_all(&junk).await;
        let mut buf = [0u8; 1024];
        // The server closes the connection (possibly after a GOAWAY).
        let closed = tokio::time::timeout(WAIT, async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "server kept a garbage connection open");

        let mut tcp = tokio::net::TcpStream::connect(ctl.grpc).await.unwrap();
        let _ = tcp.write_all(&junk).await;
        let closed = tokio::time::timeout(WAIT, async {
            loop {
                match tcp.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "server kept a garbage TCP connection open");
    }
    still_serving(&mut ctl, &good, "garbage bytes").await;

    // 2. Plaintext gRPC (h2c) on the TLS port.
    let plain = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(WAIT)
        .connect()
        .await;
    if let Ok(ch) = plain {
        let r = pb::enrollment_client::EnrollmentClient::new(ch)
            .enroll(pb::EnrollRequest::default())
            .await;
        assert!(r.is_err(), "plaintext request answered");
    }
    still_serving(&mut ctl, &good, "plaintext h2c").await;

    // 3. Garbage protobuf in well-formed gRPC frames, to both services.
    let junk: Vec<u8> = vec![0xff; 300];
    let e = raw_call(
        enroll_ch().await.unwrap(),
        "/zonemesh.v1.Enrollment/Enroll",
        junk.clone(),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::Internal, "{e:?}"); // tonic's code for undecodable messages
    let e = raw_call(
        mesh_channel(&addr, &good).await.unwrap(),
        "/zonemesh.v1.Mesh/Renew",
        junk,
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::Internal, "{e:?}");
    // Valid protobuf of the wrong shape (a WatchRequest where an EnrollRequest is expected).
    let wrong = prost::Message::encode_to_vec(&pb::IssueTlsRequest {
        csr_der: vec![1, 2, 3],
        dns_names: vec!["x".into()],
        ip_addresses: vec![],
        lifetime_secs: 1,
    });
    let e = raw_call(
        enroll_ch().await.unwrap(),
        "/zonemesh.v1.Enrollment/Enroll",
        wrong,
    )
    .await
    .unwrap_err();
    assert_ne!(e.code(), Code::Ok);
    still_serving(&mut ctl, &good, "garbage protobuf").await;

    // 4. Oversized: a 1 MiB "CSR" with a valid token.
    let big = pb::EnrollRequest {
        token: token.clone(),
        csr_der: vec![0x30; 1 << 20],
        wg_public_key: wg_key(9).to_vec(),
        endpoints: vec![],
        node_name: "big".into(),
        zone: String::new(),
    };
    let e = pb::enrollment_client::EnrollmentClient::new(enroll_ch().await.unwrap())
        .enroll(big)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    // A 1 MiB Renew from an enrolled node.
    let e = pb::mesh_client::MeshClient::new(mesh_channel(&addr, &good).await.unwrap())
        .renew(pb::RenewRequest {
            csr_der: vec![0x30; 1 << 20],
            rotate_key: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    still_serving(&mut ctl, &good, "oversized messages").await;

    // 5. A CSR for another node's name: at enrollment and at renewal.
    let e = pb::enrollment_client::EnrollmentClient::new(enroll_ch().await.unwrap())
        .enroll(pb::EnrollRequest {
            token: token.clone(),
            csr_der: csr_named(&rsa4096(2), "good"),
            wg_public_key: wg_key(2).to_vec(),
            endpoints: vec![],
            node_name: "sneaky".into(),
            zone: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("\"good\""), "{e:?}");
    let e = pb::mesh_client::MeshClient::new(mesh_channel(&addr, &good).await.unwrap())
        .renew(pb::RenewRequest {
            csr_der: csr_named(&rsa4096(1), "other"),
            rotate_key: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = pb::mesh_client::MeshClient::new(mesh_channel(&addr, &good).await.unwrap())
        .renew(pb::RenewRequest {
            csr_der: csr_named(&rsa4096(1), "spiffe://corp.test/zone/eu/node/other"),
            rotate_key: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    still_serving(&mut ctl, &good, "CSRs for other names").await;

    // 6. A client certificate from a foreign CA claiming the very same identity.
    let foreign = {
        use zonemesh_ca::{Ca, CaMaterial, NodePolicy, NodeRequest, WireGuardKey};
        let now = SystemTime::now();
        let m = CaMaterial::generate("corp.test", now, |_| {}).unwrap();
        let ca = Ca::from_material(&m).unwrap();
        let key = rsa4096(3);
        let csr = csr_named(&key, "good");
        let cert = ca
            .sign_node_csr(
                &NodePolicy::default(),
                &NodeRequest {
                    csr_der: &csr,
                    zone: "eu",
                    node: "good",
                    wg_public_key: WireGuardKey(wg_key(1)),
                },
                now,
            )
            .unwrap();
        NodeCreds {
            key_pkcs8: key.serialize_der(),
            cert_der: cert.der,
            chain_der: vec![ca.intermediate_der().to_vec()],
            // Trust the real controller's root for the server side.
            root_der: good.root_der.clone(),
        }
    };
    let attempt = async {
        let ch = mesh_channel(&addr, &foreign).await?;
        let mut c = pb::mesh_client::MeshClient::new(ch);
        let renew = c
            .renew(pb::RenewRequest {
                csr_der: csr_named(&rsa4096(3), "good"),
                rotate_key: false,
            })
            .await;
        anyhow::ensure!(renew.is_err(), "foreign CA certificate got a renewal");
        let mut s = c.watch(pb::WatchRequest::default()).await?.into_inner();
        Ok::<_, anyhow::Error>(s.message().await?)
    };
    match tokio::time::timeout(WAIT, attempt).await {
        Ok(Err(e)) => assert!(!e.to_string().contains("got a renewal"), "{e}"),
        Ok(Ok(m)) => panic!("foreign CA certificate was served: {m:?}"),
        Err(_) => panic!("foreign CA connection hung"),
    }
    still_serving(&mut ctl, &good, "foreign CA client certificate").await;

    // Nothing was issued to anyone, and nothing panicked.
    assert_eq!(ctl.nodes().unwrap(), nodes_before);
    let log = ctl.log_text();
    assert!(!log.contains("panicked"), "{log}");
    ctl.sigterm(WAIT).unwrap();
    assert_eq!(ctl.issued_node_serials().unwrap().len(), 1);
}
