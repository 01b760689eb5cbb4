//! Two controllers on one three-member etcd cluster (Debian `etcd-server`, loopback), in
//! process: each has its own etcd client, authority, mesh, follow loop and real gRPC
//! listener with mutual TLS. Agents (the real run loop on an in-memory data plane) enroll
//! through A with both addresses; A stops abruptly; the agents keep their peers, move to
//! B, and receive a revocation made through B; a token created on A enrolls on B; what A
//! acknowledged is still there; B serves the new CRL.

use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio_util::sync::CancellationToken;
use zonemesh_controller::authority::Authority;
use zonemesh_controller::mesh::{Mesh, follow_loop};
use zonemesh_controller::secrets::KekSource;
use zonemesh_tests::cluster::{cert_serial, crl_serials, enroll_rpc, enrollment_channel, wg_key};
use zonemesh_tests::etcd::{self, Etcd, copy_store, open_store};
use zonemesh_tests::fakeagent::{FakeAgent, has_peer};
use zonemesh_tests::inproc::{Plane, serve_mesh};

const WAIT: Duration = Duration::from_secs(30);

struct Ctl {
    auth: Arc<Authority>,
    mesh: Arc<Mesh>,
    stop: CancellationToken,
    follow: tokio::task::JoinHandle<()>,
}

/// Run blocking store work off the async workers (the etcd store is synchronous).
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

async fn controller(url: &str, data_dir: &std::path::Path) -> Ctl {
    let (url, dir) = (url.to_string(), data_dir.to_path_buf());
    let (auth, mesh) = tokio::task::spawn_blocking(move || {
        let store = open_store(&url, &dir);
        let kek = KekSource::new(&dir, None).load().unwrap();
        let auth = Arc::new(Authority::load(store, &kek, SystemTime::now()).unwrap());
        let mesh = Mesh::new(auth.clone()).unwrap();
        (auth, mesh)
    })
    .await
    .unwrap();
    let stop = CancellationToken::new();
    let follow = tokio::spawn(follow_loop(mesh.clone(), stop.clone()));
    Ctl {
        auth,
        mesh,
        stop,
        follow,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_move_to_b_when_a_dies_and_receive_what_b_records() {
    if !etcd::available() {
        println!("skipped: etcd not installed");
        return;
    }
    let plane = Plane::new().unwrap();
    let data_dir = plane.dir.path().join("ctl");
    let cluster = Etcd::start(plane.dir.path(), 3).unwrap();
    let url = cluster.store_url();
    {
        let (url, dir, from) = (url.clone(), data_dir.clone(), plane.store.clone());
        tokio::task::spawn_blocking(move || copy_store(&from, &open_store(&url, &dir)))
            .await
            .unwrap();
    }
    let a = controller(&url, &data_dir).await;
    let b = controller(&url, &data_dir).await;
    let now = SystemTime::now();
    blocking(|| {
        a.mesh.add_zone("eu", "100.64.1.0/24", false, now).unwrap();
        a.mesh.add_zone("us", "100.64.2.0/24", false, now).unwrap();
    });
    let served_a = serve_mesh(&a.auth, &a.mesh).await.unwrap();
    let served_b = serve_mesh(&b.auth, &b.mesh).await.unwrap();
    let list = format!("{},{}", served_a.addr(), served_b.addr());
    let fp = plane.fingerprint.clone();

    // Two agents enroll through A with both addresses.
    let mut agents = Vec::new();
    for (i, (zone, name)) in [("eu", "a1"), ("us", "u1")].into_iter().enumerate() {
        let token = blocking(|| {
            a.mesh
                .create_token(zone, Duration::from_secs(600), 1, SystemTime::now())
                .unwrap()
                .token
        });
        let dir = plane.dir.path().join(name);
        let state = zonemesh_agent::control::state::StateDir::new(&dir);
        state.create().unwrap();
        zonemesh_agent::control::state::write_file(
            &state.node_key(),
            zonemesh_ca::to_pem("PRIVATE KEY", &zonemesh_tests::rsa4096(i).serialize_der())
                .as_bytes(),
            0o600,
        )
        .unwrap();
        let params = zonemesh_agent::control::enroll::EnrollParams {
            controller: list.clone(),
            ca_fingerprint: fp.clone(),
            token,
            node: name.into(),
            zone: None,
            endpoints: vec![format!("198.18.0.{}:51820", i + 1)],
        };
        zonemesh_agent::control::enroll::enroll(&state, &params)
            .await
            .unwrap();
        agents.push(FakeAgent::start(state, &format!("198.18.0.{}:51820", i + 1)).await);
    }
    for (ag, peer) in agents.iter().zip(["us/u1", "eu/a1"]) {
        let s = ag
            .status_until("sees its peer through A", WAIT, |s| {
                s.controller_connected && has_peer(s, peer)
            })
            .await;
        assert_eq!(s.controller, served_a.addr());
    }
    // A third node enrolled through A, acknowledged before A dies.
    let victim = enroll_rpc(
        enrollment_channel(&served_a.addr(), &fp).await.unwrap(),
        &blocking(|| {
            a.mesh
                .create_token("us", Duration::from_secs(600), 1, SystemTime::now())
                .unwrap()
                .token
        }),
        "u2",
        &zonemesh_tests::rsa4096(5),
        wg_key(55),
    )
    .await
    .unwrap()
    .1;
    // A token created on A, used later on B.
    let token_from_a = blocking(|| {
        a.mesh
            .create_token("eu", Duration::from_secs(600), 1, SystemTime::now())
            .unwrap()
            .token
    });
    agents[0]
        .status_until("a1 sees u2", WAIT, |s| has_peer(s, "us/u2"))
        .await;
    let acked_version = a.mesh.version();

    // A stops abruptly: its listener, its streams and its follow loop.
    served_a.stop().await;
    a.stop.cancel();
    a.follow.await.unwrap();
    for ag in &agents {
        let s = ag
            .status_until("moves to B", WAIT, |s| {
                s.controller_connected && s.controller == served_b.addr()
            })
            .await;
        assert!(
            s.mesh_version >= acked_version,
            "resumed at {}",
            s.mesh_version
        );
        assert!(!s.peers.is_empty(), "the agent kept its tunnels");
    }

    // Nothing A acknowledged is lost; B records the next change; it reaches the agents.
    assert!(b.mesh.version() >= acked_version);
    assert!(blocking(|| b.auth.store().node("us/u2").unwrap().is_some()));
    let victim_serial = cert_serial(&victim.certificate_der).unwrap();
    blocking(|| {
        b.mesh
            .revoke_node(
                "us/u2",
                zonemesh_ca::RevocationReason::KeyCompromise,
                SystemTime::now(),
            )
            .unwrap()
    });
    agents[0]
        .status_until("the revocation made through B arrives", WAIT, |s| {
            !has_peer(s, "us/u2")
        })
        .await;
    assert!(
        crl_serials(&b.auth.crl_der())
            .unwrap()
            .contains(&victim_serial)
    );

    // The token created on A enrolls on B.
    let resp = enroll_rpc(
        enrollment_channel(&served_b.addr(), &fp).await.unwrap(),
        &token_from_a,
        "a2",
        &zonemesh_tests::rsa4096(6),
        wg_key(66),
    )
    .await
    .unwrap()
    .1;
    assert_eq!(resp.node, "a2");
    agents[1]
        .status_until("u1 sees a2 enrolled on B", WAIT, |s| has_peer(s, "eu/a2"))
        .await;

    for ag in agents {
        ag.stop().await;
    }
    served_b.stop().await;
    b.stop.cancel();
    b.follow.await.unwrap();
}
