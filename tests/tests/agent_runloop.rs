//! The agent's run loop against a real controller, without root: an in-memory data plane,
//! recording host effects and a clock the test moves. Enroll, watch the mesh change,
//! see a revoked peer go, renew when the clock says so, and keep watching on the renewed
//! certificate.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tempfile::TempDir;
use tokio_util::sync::CancellationToken;
use zonemesh_agent::control::clock::ManualClock;
use zonemesh_agent::control::effects::recording::RecordingEffects;
use zonemesh_agent::control::run::{AgentStatus, RunDeps, RunOptions, query_status, run_with};
use zonemesh_agent::control::state::{StateDir, cert_info};
use zonemesh_agent::dataplane::DataPlane;
use zonemesh_agent::dataplane::fake::{FakeNet, FakeTun};
use zonemesh_tests::cluster::{Controller, enroll_rpc, enrollment_channel, wg_key};
use zonemesh_tests::rsa4096;

const WAIT: Duration = Duration::from_secs(20);

async fn status_until(
    state: &StateDir,
    what: &str,
    mut ok: impl FnMut(&AgentStatus) -> bool,
) -> AgentStatus {
    let start = Instant::now();
    let mut last = None;
    loop {
        if let Ok(s) = query_status(state).await {
            if ok(&s) {
                return s;
            }
            last = Some(s);
        }
        assert!(
            start.elapsed() < WAIT,
            "{what}: not within {WAIT:?}; last status {last:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn has_peer(s: &AgentStatus, name: &str) -> bool {
    s.peers.iter().any(|p| p.name == name)
}

async fn enroll_other(ctl: &Controller, zone: &str, name: &str, slot: usize) {
    let ch = enrollment_channel(&ctl.grpc_addr(), &ctl.fingerprint)
        .await
        .unwrap();
    enroll_rpc(
        ch,
        &ctl.token(zone, 1).unwrap(),
        name,
        &rsa4096(slot),
        wg_key(slot as u64),
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enroll_watch_revoke_renew_without_root() {
    let tmp = TempDir::new().unwrap();
    let ctl = Controller::start_new(tmp.path()).unwrap();
    ctl.zone_add("eu", "100.64.1.0/24").unwrap();
    ctl.zone_add("us", "100.64.2.0/24").unwrap();

    // Enroll with the agent library.
    let endpoint = "198.18.0.1:51820";
    let (state, id) = ctl
        .enroll_agent(&tmp.path().join("a"), "eu", "a", 0, endpoint)
        .await;
    assert_eq!(id.zone, "eu");

    // Run on fakes.
    let net = FakeNet::new();
    let effects = Arc::new(RecordingEffects::default());
    let clock = Arc::new(ManualClock::new(SystemTime::now()));
    let (tun_tx, tun_rx) = std::sync::mpsc::channel();
    let udp = net.bind(endpoint.parse().unwrap());
    let deps = RunDeps {
        start_dataplane: Box::new(move |config| {
            Box::pin(async move {
                let (tun, handle) = FakeTun::new();
                tun_tx.send(handle).unwrap();
                Ok(DataPlane::start_with(config, tun, udp)?)
            })
        }),
        effects: effects.clone(),
        clock: clock.clone(),
        icmp_probes: false,
    };
    let opts = RunOptions::new(state.clone(), "zmt0");
    let stop = CancellationToken::new();
    let agent = tokio::spawn(run_with(opts, deps, stop.clone()));
    // The TUN device stays open while the test holds its other end.
    let _tun = tokio::task::spawn_blocking(move || tun_rx.recv_timeout(WAIT))
        .await
        .unwrap()
        .expect("the agent started its data plane");

    // Watch: a node enrolling in another zone becomes a peer, its zone a route.
    let first = status_until(&state, "connected", |s| s.controller_connected).await;
    enroll_other(&ctl, "us", "b", 1).await;
    status_until(&state, "b becomes a peer", |s| has_peer(s, "us/b")).await;
    assert!(
        effects.routes().contains("100.64.2.0/24"),
        "{:?}",
        effects.calls()
    );

    // Revoke: the peer goes.
    ctl.admin_ok(&["node", "revoke", "us/b"]).unwrap();
    status_until(&state, "revoked b is dropped", |s| !has_peer(s, "us/b")).await;

    // Renew: nothing happens until the clock reaches 2/3 of the certificate's life.
    let info = cert_info(&state.read_cert().unwrap()).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(query_status(&state).await.unwrap().serial, first.serial);
    let life = info.not_after.duration_since(info.not_before).unwrap();
    clock.advance(life.mul_f64(0.7));
    let renewed = status_until(&state, "renewed", |s| s.serial != first.serial).await;
    assert!(renewed.cert_not_after_unix >= first.cert_not_after_unix);
    assert_eq!(
        cert_info(&state.read_cert().unwrap()).unwrap().serial_hex,
        renewed.serial,
        "the renewed certificate is stored"
    );

    // The agent keeps watching with the renewed certificate.
    status_until(&state, "connected again", |s| s.controller_connected).await;
    enroll_other(&ctl, "us", "c", 2).await;
    status_until(&state, "c becomes a peer after renewal", |s| {
        has_peer(s, "us/c")
    })
    .await;

    stop.cancel();
    tokio::time::timeout(WAIT, agent)
        .await
        .expect("agent stops")
        .unwrap()
        .unwrap();
    assert!(effects.routes().is_empty(), "routes removed at shutdown");
    assert!(!state.status_socket().exists());
}
