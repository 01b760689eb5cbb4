//! The control plane in-process (real Mesh, real store from `init`, real gRPC listener
//! and mTLS where the point is about connections): certificate expiry on a live
//! connection against an injected clock, per-node rate limits, bounded Watch resumes,
//! the enrollment limiter, and which certificate `caller` accepts.

use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;
use zonemesh_ca::RevocationReason;
use zonemesh_controller::mesh::RenewKey;
use zonemesh_proto as pb;
use zonemesh_tests::cluster::{mesh_channel, next_update, wg_key};
use zonemesh_tests::inproc::Plane;
use zonemesh_tests::{rsa2048, rsa4096};

const DAY: Duration = Duration::from_secs(86_400);

fn csr(key: &rcgen::KeyPair, node: &str) -> Vec<u8> {
    zonemesh_agent::control::enroll::csr_for(key, node).unwrap()
}

fn code(e: zonemesh_controller::error::ControllerError) -> Code {
    tonic::Status::from(e).code()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_certificate_stops_working_on_a_live_connection() {
    let plane = Plane::new().unwrap();
    let served = plane.serve().await.unwrap();
    let n = plane.enroll("eu", "n1", 30, wg_key(1)).unwrap();
    let channel = mesh_channel(&served.addr(), &n.creds).await.unwrap();
    let mut client = pb::mesh_client::MeshClient::new(channel);
    let mut watch = client
        .watch(pb::WatchRequest::default())
        .await
        .unwrap()
        .into_inner();
    let first = next_update(&mut watch, Duration::from_secs(10))
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(
        first.kind,
        Some(pb::mesh_update::Kind::Snapshot(_))
    ));
    client
        .update_endpoints(pb::UpdateEndpointsRequest {
            endpoints: vec!["198.18.0.1:51820".into()],
        })
        .await
        .unwrap();
    // The same connection's stream sees its own change.
    next_update(&mut watch, Duration::from_secs(10))
        .await
        .unwrap()
        .unwrap();

    // The node certificate lives 30 days; move the controller's clock past it.
    plane.clock.advance(31 * DAY);
    let ended = tokio::time::timeout(Duration::from_secs(5), watch.message()).await;
    match ended {
        Ok(Ok(None)) => {}
        Ok(Err(s)) => assert_eq!(s.code(), Code::Unauthenticated, "{s:?}"),
        Ok(Ok(Some(u))) => panic!("expired certificate's watch still receives {u:?}"),
        Err(_) => panic!("expired certificate's watch stayed open"),
    }
    let e = client
        .update_endpoints(pb::UpdateEndpointsRequest {
            endpoints: vec!["198.18.0.2:51820".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("expired"), "{e:?}");
    let e = client
        .renew(pb::RenewRequest {
            csr_der: csr(&rsa4096(30), "n1"),
            rotate_key: false,
        })
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Code::Unauthenticated,
        "expired certificate renewed: {e:?}"
    );
    let e = client
        .report_health(pb::HealthReport { peers: vec![] })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let e = client
        .watch(pb::WatchRequest::default())
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    served.stop().await;
}

#[test]
fn calls_from_a_node_are_rate_limited_per_node() {
    let plane = Plane::new().unwrap();
    let a = plane.enroll("eu", "a", 31, wg_key(1)).unwrap();
    let b = plane.enroll("eu", "b", 32, wg_key(2)).unwrap();
    let now = plane.mesh.now();

    // UpdateEndpoints: a burst, then RESOURCE_EXHAUSTED; another node is unaffected.
    let mut ok = 0;
    let err = loop {
        let ep = vec![format!("198.18.0.{}:51820", ok + 1)];
        match plane.mesh.update_endpoints(&a.who, &ep, now) {
            Ok(()) => ok += 1,
            Err(e) => break e,
        }
        assert!(ok <= 100, "no limit on UpdateEndpoints");
    };
    assert_eq!(code(err), Code::ResourceExhausted);
    assert!(
        (3..=10).contains(&ok),
        "{ok} endpoint updates allowed at once"
    );
    plane
        .mesh
        .update_endpoints(&b.who, &["198.18.0.9:51820".into()], now)
        .unwrap();
    // Refilled a minute later.
    plane
        .mesh
        .update_endpoints(
            &a.who,
            &["198.18.1.1:51820".into()],
            now + Duration::from_secs(60),
        )
        .unwrap();

    // IssueTlsCertificate: some tens, then RESOURCE_EXHAUSTED.
    let req = pb::IssueTlsRequest {
        csr_der: csr(&rsa2048(31), "a"),
        dns_names: vec!["a.eu.corp.test".into()],
        ip_addresses: vec![],
        lifetime_secs: 0,
    };
    let mut ok = 0;
    let err = loop {
        match plane.mesh.issue_tls(&a.who, &req, now) {
            Ok(_) => ok += 1,
            Err(e) => break e,
        }
        assert!(ok <= 200, "no limit on IssueTlsCertificate");
    };
    assert_eq!(code(err), Code::ResourceExhausted);
    assert!((10..=60).contains(&ok), "{ok} TLS certificates at once");

    // Renew: a few, then RESOURCE_EXHAUSTED (each renewal is a new current certificate).
    let key = rsa4096(31);
    let mut who = a.who.clone();
    let mut ok = 0;
    let err = loop {
        match plane.mesh.renew(&who, &csr(&key, "a"), RenewKey::Keep, now) {
            Ok(r) => {
                who = plane.verify(&r.certificate_der).unwrap();
                ok += 1;
            }
            Err(e) => break e,
        }
        assert!(ok <= 50, "no limit on Renew");
    };
    assert_eq!(code(err), Code::ResourceExhausted);
    assert!((2..=6).contains(&ok), "{ok} renewals at once");
    plane
        .mesh
        .renew(&b.who, &csr(&rsa4096(32), "b"), RenewKey::Keep, now)
        .unwrap();
}

/// 4,000 changes in the log and 40 watchers resuming from version 1: each gets the one
/// shared snapshot, not a replay of the log.
#[test]
fn far_behind_watchers_share_the_snapshot() {
    const LOGGED: u64 = 4000;
    let until = zonemesh_controller::store::unix(SystemTime::now() + DAY);
    let plane = Plane::new_with(|store| {
        for v in 1..=LOGGED {
            let u = pb::MeshUpdate {
                version: v,
                kind: Some(pb::mesh_update::Kind::Delta(pb::Delta {
                    blocked: vec![pb::BlockedSource {
                        address: format!("198.18.{}.{}", v / 256, v % 256),
                        until_unix: until,
                        reason: "x".repeat(200),
                    }],
                    ..Default::default()
                })),
            };
            store
                .changes
                .insert(v.to_be_bytes(), prost::Message::encode_to_vec(&u))
                .unwrap();
        }
        store
            .meta
            .insert("mesh_version", LOGGED.to_be_bytes())
            .unwrap();
    })
    .unwrap();
    assert_eq!(plane.mesh.version(), LOGGED);
    let subs: Vec<_> = (0..40)
        .map(|i| plane.mesh.subscribe(&format!("eu/w{i}"), 1).unwrap())
        .collect();
    for s in &subs {
        let first = s.first.as_ref().expect("a snapshot");
        assert!(first.is_snapshot());
        assert_eq!(first.version(), LOGGED);
        assert!(
            first.same_bytes(subs[0].first.as_ref().unwrap()),
            "snapshot not shared"
        );
    }

    // A watcher a little behind (after a restart: from the log) gets what it missed as
    // one delta, and so does the next one at the same place.
    let from = LOGGED - 100;
    let s = plane.mesh.subscribe("eu/near", from).unwrap();
    let first = s.first.expect("the missed changes");
    assert!(!first.is_snapshot());
    assert_eq!((first.version(), s.last_version), (LOGGED, LOGGED));
    let Some(pb::mesh_update::Kind::Delta(d)) = first.decode().unwrap().kind else {
        panic!("not a delta")
    };
    let mut got: Vec<String> = d.blocked.iter().map(|b| b.address.clone()).collect();
    let mut want: Vec<String> = ((from + 1)..=LOGGED)
        .map(|v| format!("198.18.{}.{}", v / 256, v % 256))
        .collect();
    got.sort();
    want.sort();
    assert_eq!(got, want);
    assert!(
        plane
            .mesh
            .subscribe("eu/up", LOGGED)
            .unwrap()
            .first
            .is_none()
    );
}

/// Through the real Watch stream: a resume gets the chain, what it missed as one delta,
/// then live changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_resume_gets_the_missed_changes_as_one_delta_then_goes_live() {
    let plane = Plane::new().unwrap();
    let served = plane.serve().await.unwrap();
    let n = plane.enroll("eu", "n1", 33, wg_key(1)).unwrap();
    let now = SystemTime::now();
    for i in 0..100u32 {
        let ip = std::net::Ipv4Addr::from(0xc612_0000 + i);
        plane
            .mesh
            .block_source(ip.into(), now + DAY, "test")
            .unwrap();
    }
    let from = plane.mesh.version() - 100;
    let mut watch =
        pb::mesh_client::MeshClient::new(mesh_channel(&served.addr(), &n.creds).await.unwrap())
            .watch(pb::WatchRequest {
                resume_from_version: from,
                chain_once: true,
            })
            .await
            .unwrap()
            .into_inner();
    let chain = next_update(&mut watch, Duration::from_secs(10))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(chain.version, from, "the chain changes nothing");
    let Some(pb::mesh_update::Kind::Delta(d)) = chain.kind else {
        panic!("not a delta")
    };
    assert!(!d.ca_chain_der.is_empty() && d.blocked.is_empty());
    let u = next_update(&mut watch, Duration::from_secs(10))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(u.version, from + 100);
    let Some(pb::mesh_update::Kind::Delta(d)) = u.kind else {
        panic!("not a delta")
    };
    assert_eq!(d.blocked.len(), 100, "100 changes as one delta");
    plane
        .mesh
        .block_source("198.19.0.1".parse().unwrap(), now + DAY, "live")
        .unwrap();
    let u = next_update(&mut watch, Duration::from_secs(10))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(u.version, from + 101);
    served.stop().await;
}

#[test]
fn enrollment_limiter_is_keyed_on_source_and_token_and_bounded() {
    let plane = Plane::new().unwrap();
    let now = plane.mesh.now();
    plane
        .mesh
        .add_zone("eu", "100.64.1.0/24", false, now)
        .unwrap();
    let valid = plane
        .mesh
        .create_token("eu", Duration::from_secs(3600), 1, now)
        .unwrap();
    let key = rsa4096(34);
    let req = |token: &str| pb::EnrollRequest {
        token: token.into(),
        csr_der: csr(&key, "behind-nat"),
        wg_public_key: wg_key(1).to_vec(),
        endpoints: vec![],
        node_name: "behind-nat".into(),
        zone: String::new(),
    };
    let nat: std::net::IpAddr = "198.18.7.7".parse().unwrap();
    let mut limited = 0;
    for i in 0..30 {
        let e = plane
            .mesh
            .enroll(&req(&format!("zmt_guess{i}")), nat, now)
            .unwrap_err();
        if code(e) == Code::ResourceExhausted {
            limited += 1;
        }
    }
    assert!(
        limited >= 15,
        "guessing from one source is not rate-limited"
    );
    // A real node behind the same address still enrolls with its valid token...
    plane.mesh.enroll(&req(&valid.token), nat, now).unwrap();
    // ...while guesses from that address stay limited.
    let e = plane
        .mesh
        .enroll(&req("zmt_guess-after"), nat, now)
        .unwrap_err();
    assert_eq!(code(e), Code::ResourceExhausted);

    // A flood of distinct sources does not grow the limiter without bound.
    for i in 0..10_000u32 {
        let src =
            std::net::Ipv6Addr::from(0xfd00_0000_0000_0000_0000_0000_0000_0000u128 + u128::from(i));
        let _ = plane.mesh.enroll(&req("zmt_flood"), src.into(), now);
    }
    assert!(
        plane.mesh.enroll_limiter_len() <= 4096,
        "{} limiter entries",
        plane.mesh.enroll_limiter_len()
    );
}

#[test]
fn caller_accepts_only_the_current_certificate_and_key() {
    let plane = Plane::new().unwrap();
    let n = plane.enroll("eu", "n1", 35, wg_key(1)).unwrap();
    let now = plane.mesh.now();
    plane.mesh.caller(&n.who, now).unwrap();

    // Another valid, unrevoked certificate for the same name (the CRL does not list it).
    let key = rsa4096(35);
    let issue = |wg: [u8; 32]| {
        let cert = plane
            .auth
            .issue_node(
                &zonemesh_ca::NodeRequest {
                    csr_der: &csr(&key, "n1"),
                    zone: "eu",
                    node: "n1",
                    wg_public_key: zonemesh_ca::WireGuardKey(wg),
                },
                now,
            )
            .unwrap();
        plane.verify(&cert.der).unwrap()
    };
    let other = issue(wg_key(1));
    let e = plane.mesh.caller(&other, now).unwrap_err();
    assert_eq!(code(e), Code::Unauthenticated);
    let other_key = issue(wg_key(9));
    let e = plane.mesh.caller(&other_key, now).unwrap_err();
    assert_eq!(code(e), Code::Unauthenticated);
    assert!(
        plane.mesh.watch(&other, 0, now).is_err(),
        "a non-current certificate opened a Watch"
    );
    // Expiry is checked against the time passed in.
    let e = plane.mesh.caller(&n.who, n.who.not_after).unwrap_err();
    assert_eq!(code(e), Code::Unauthenticated);

    // Revoking the node revokes those certificates too; the re-enrolled node starts fresh.
    plane
        .mesh
        .revoke_node("eu/n1", RevocationReason::KeyCompromise, now)
        .unwrap();
    for who in [&n.who, &other, &other_key] {
        assert!(
            matches!(
                plane.auth.status(&who.serial_hex),
                zonemesh_ca::CertStatus::Revoked { .. }
            ),
            "{} not revoked",
            who.serial_hex
        );
    }
    let again = plane.enroll("eu", "n1", 36, wg_key(2)).unwrap();
    assert_eq!(again.resp.overlay_ip, n.resp.overlay_ip);
    plane.mesh.caller(&again.who, now).unwrap();
    assert!(plane.mesh.caller(&n.who, now).is_err());
    assert!(plane.mesh.caller(&other, now).is_err());
}

/// A Watch registered while its node is being revoked never outlives the revocation.
#[test]
fn watch_racing_a_revocation_ends() {
    let plane = Plane::new().unwrap();
    for round in 0..12u64 {
        let name = format!("r{round}");
        let n = plane.enroll("eu", &name, 37, wg_key(100 + round)).unwrap();
        let now = plane.mesh.now();
        let (subs, _) = std::thread::scope(|s| {
            let watcher = s.spawn(|| {
                (0..50)
                    .filter_map(|_| plane.mesh.watch(&n.who, 0, now).ok())
                    .collect::<Vec<_>>()
            });
            let revoker = s.spawn(|| {
                plane
                    .mesh
                    .revoke_node(&format!("eu/{name}"), RevocationReason::Unspecified, now)
                    .unwrap()
            });
            (watcher.join().unwrap(), revoker.join().unwrap())
        });
        for sub in subs {
            assert!(
                sub.cancel.is_cancelled(),
                "round {round}: a Watch survived revocation"
            );
        }
    }
}

/// The gRPC listener announces and enforces a per-connection stream limit: 200 Enroll
/// calls left half-sent on one connection without a client certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_streams_are_bounded_per_connection() {
    let plane = Plane::new().unwrap();
    let served = plane.serve().await.unwrap();
    let cfg = zonemesh_agent::control::client::pinned_config(&plane.fingerprint).unwrap();
    let tcp = tokio::net::TcpStream::connect(served.addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(
            rustls_pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    tls.write_all(&frame(0x4, 0, 0, &[])).await.unwrap();
    let (kind, flags, _, payload) = read_frame(&mut tls).await.unwrap();
    assert_eq!(
        (kind, flags),
        (0x4, 0),
        "server did not start with SETTINGS"
    );
    let announced = payload
        .chunks(6)
        .find(|s| s[..2] == [0, 3])
        .map(|s| u32::from_be_bytes([s[2], s[3], s[4], s[5]]));
    tls.write_all(&frame(0x4, 0x1, 0, &[])).await.unwrap();

    const STREAMS: u32 = 200;
    let headers = hpack_literal(&[
        (":method", "POST"),
        (":scheme", "https"),
        (":path", "/zonemesh.v1.Enrollment/Enroll"),
        (":authority", "localhost"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]);
    for i in 0..STREAMS {
        // END_HEADERS without END_STREAM: the request body never comes.
        tls.write_all(&frame(0x1, 0x4, 2 * i + 1, &headers))
            .await
            .unwrap();
    }
    tls.flush().await.unwrap();
    let mut refused = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while let Ok(Some((kind, _, _, payload))) =
        tokio::time::timeout_at(deadline, read_frame(&mut tls))
            .await
            .map(Result::ok)
    {
        if kind == 0x3 && payload[..4] == [0, 0, 0, 7] {
            refused += 1;
        }
        if kind == 0x7 {
            break;
        }
    }
    println!("announced max concurrent streams {announced:?}, refused {refused} of {STREAMS}");
    let limit = announced.expect("no SETTINGS_MAX_CONCURRENT_STREAMS announced");
    assert!(limit <= 128, "{limit} concurrent streams per connection");
    assert!(
        refused >= STREAMS - limit,
        "only {refused} of {STREAMS} streams refused"
    );
    served.stop().await;
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = len.to_be_bytes()[1..].to_vec();
    f.push(kind);
    f.push(flags);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

async fn read_frame(
    r: &mut (impl tokio::io::AsyncRead + Unpin),
) -> std::io::Result<(u8, u8, u32, Vec<u8>)> {
    let mut head = [0u8; 9];
    r.read_exact(&mut head).await?;
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    Ok((head[3], head[4], stream, payload))
}

/// HPACK "literal header field without indexing, new name", no Huffman coding.
fn hpack_literal(headers: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in headers {
        out.push(0);
        out.push(k.len() as u8);
        out.extend_from_slice(k.as_bytes());
        out.push(v.len() as u8);
        out.extend_from_slice(v.as_bytes());
    }
    out
}

/// The RSA-4096 enrollment signature is taken outside the change lock: a block (which
/// commits a change and flushes) completes while an enrollment is still signing.
#[test]
fn block_commits_while_an_enrollment_is_signing() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let signing = Arc::new(AtomicBool::new(false));
    let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
    let started_tx = std::sync::Mutex::new(Some(started_tx));
    let hook_flag = signing.clone();
    let plane = Arc::new(
        Plane::with_sign_hook(Arc::new(move || {
            hook_flag.store(true, Ordering::SeqCst);
            if let Some(tx) = started_tx.lock().unwrap().take() {
                let _ = tx.send(());
            }
            std::thread::sleep(Duration::from_millis(1500));
            hook_flag.store(false, Ordering::SeqCst);
        }))
        .unwrap(),
    );
    let p = plane.clone();
    let enrolling = std::thread::spawn(move || p.enroll("eu", "slow", 3, wg_key(40)).unwrap());
    started_rx.recv_timeout(Duration::from_secs(60)).unwrap();
    assert!(signing.load(Ordering::SeqCst));
    let v0 = plane.mesh.version();
    let t = std::time::Instant::now();
    plane
        .mesh
        .block_source(
            "203.0.113.7".parse().unwrap(),
            SystemTime::now() + Duration::from_secs(600),
            "test",
        )
        .unwrap();
    assert!(
        signing.load(Ordering::SeqCst),
        "block_source waited for the enrollment signature ({:?})",
        t.elapsed()
    );
    assert_eq!(plane.mesh.version(), v0 + 1);
    let n = enrolling.join().unwrap();
    assert!(plane.store.node("eu/slow").unwrap().is_some());
    drop(n);
    // Both changes are in the log, in order.
    assert_eq!(plane.mesh.version(), v0 + 2);
}

/// A node opening Watch streams without end keeps at most `MAX_STREAMS_PER_NODE`
/// registered: the oldest are ended, so the per-node token list stays bounded.
#[test]
fn watch_stream_registrations_stay_bounded_under_a_flood() {
    use zonemesh_controller::mesh::MAX_STREAMS_PER_NODE;
    let plane = Plane::new().unwrap();
    let n = plane.enroll("eu", "flood", 4, wg_key(44)).unwrap();
    let mut subs = vec![];
    for _ in 0..1000 {
        subs.push(plane.mesh.watch(&n.who, 0, plane.mesh.now()).unwrap());
    }
    assert!(plane.mesh.registered_streams() <= MAX_STREAMS_PER_NODE);
    // The newest streams stay open; the superseded ones were ended.
    assert!(!subs.last().unwrap().cancel.is_cancelled());
    assert!(subs[0].cancel.is_cancelled());
    let open = subs.iter().filter(|s| !s.cancel.is_cancelled()).count();
    assert_eq!(open, MAX_STREAMS_PER_NODE);
}
