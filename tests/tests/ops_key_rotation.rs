//! Node key rotation: `zonemesh-agent renew --rotate-key` and the run loop's
//! `rotate_key_every`. A new RSA-4096 key is generated on the node, the controller accepts
//! it only on a renewal authenticated by the current certificate and flagged as a rotation,
//! the old serial is superseded, `openssl verify` accepts the new chain, and the agent keeps
//! talking to the controller with the new key without a restart.

use std::path::Path;
use std::process::Command;
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
use zonemesh_proto as pb;
use zonemesh_tests::cluster::{Controller, NodeCreds, mesh_channel};
use zonemesh_tests::{bin, openssl, rsa4096, run_ok};

const WAIT: Duration = Duration::from_secs(60);

/// The SubjectPublicKeyInfo of a PEM key or certificate, as openssl prints it.
fn public_key(path: &Path, is_cert: bool) -> String {
    let mut cmd = if is_cert {
        openssl(&["x509", "-noout", "-pubkey", "-in"])
    } else {
        openssl(&["pkey", "-pubout", "-in"])
    };
    run_ok(cmd.arg(path)).unwrap()
}

fn verify(state: &StateDir) -> String {
    run_ok(
        openssl(&["verify", "-x509_strict", "-CAfile"])
            .arg(state.ca())
            .arg("-untrusted")
            .arg(state.chain())
            .arg(state.cert()),
    )
    .unwrap()
}

/// A Watch snapshot over mutual TLS with `creds` (proves the controller takes them).
async fn watch_ok(ctl: &Controller, creds: &NodeCreds) -> anyhow::Result<()> {
    let ch = mesh_channel(&ctl.grpc_addr(), creds).await?;
    let mut w = pb::mesh_client::MeshClient::new(ch)
        .watch(pb::WatchRequest {
            resume_from_version: 0,
            chain_once: true,
        })
        .await?
        .into_inner();
    tokio::time::timeout(Duration::from_secs(10), w.message())
        .await??
        .ok_or_else(|| anyhow::anyhow!("stream ended"))?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renew_rotate_key_replaces_the_key_and_supersedes_the_old_certificate() {
    let tmp = TempDir::new().unwrap();
    let ctl = Controller::start_new(tmp.path()).unwrap();
    ctl.zone_add("eu", "100.64.1.0/24").unwrap();
    let dir = tmp.path().join("a");
    let (state, _) = ctl
        .enroll_agent(&dir, "eu", "a", 0, "198.18.0.1:51820")
        .await;
    let old = NodeCreds::from_state_dir(&dir).unwrap();
    let old_key = public_key(&state.node_key(), false);
    std::fs::copy(state.cert(), dir.join("old.crt")).unwrap();

    // Without the rotate flag a CSR for another key is refused.
    let other_csr = zonemesh_agent::control::enroll::csr_for(&rsa4096(1), "a").unwrap();
    let e = pb::mesh_client::MeshClient::new(mesh_channel(&ctl.grpc_addr(), &old).await.unwrap())
        .renew(pb::RenewRequest {
            csr_der: other_csr,
            rotate_key: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");

    let out = run_ok(
        Command::new(bin("zonemesh-agent"))
            .args(["renew", "--rotate-key", "--state-dir"])
            .arg(&dir),
    )
    .unwrap();
    assert!(out.contains("with a new key"), "{out}");
    let new_key = public_key(&state.node_key(), false);
    assert_ne!(new_key, old_key, "the key was replaced");
    assert_eq!(
        public_key(&state.cert(), true),
        new_key,
        "the stored certificate is for the stored key"
    );
    assert!(verify(&state).contains("node.crt: OK"));
    let key_mode = std::fs::metadata(state.node_key()).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&key_mode.permissions()) & 0o777,
        0o600
    );
    assert!(!state.node_key_next().exists());
    let text = ctl.ocsp_cert_status(&dir, &dir.join("old.crt"));
    assert!(text.contains("Reason: superseded"), "{text}");

    // The new identity works; the old one is cut off.
    let new = NodeCreds::from_state_dir(&dir).unwrap();
    watch_ok(&ctl, &new).await.unwrap();
    assert!(
        watch_ok(&ctl, &old).await.is_err(),
        "the superseded certificate still works"
    );

    // A rotation interrupted after the certificate was written (old key still in place,
    // the new one beside it) is finished on the next read of the key.
    let rotated_pem = std::fs::read(state.node_key()).unwrap();
    std::fs::write(state.node_key_next(), &rotated_pem).unwrap();
    std::fs::write(
        state.node_key(),
        zonemesh_ca::to_pem("PRIVATE KEY", &old.key_pkcs8),
    )
    .unwrap();
    let out = run_ok(
        Command::new(bin("zonemesh-agent"))
            .args(["renew", "--state-dir"])
            .arg(&dir),
    )
    .unwrap();
    assert!(!out.contains("new key"), "{out}");
    assert!(!state.node_key_next().exists());
    assert_eq!(public_key(&state.node_key(), false), new_key);
    assert!(verify(&state).contains("node.crt: OK"));
}

async fn status_until(
    state: &StateDir,
    what: &str,
    mut ok: impl FnMut(&AgentStatus) -> bool,
) -> AgentStatus {
    let start = Instant::now();
    loop {
        if let Ok(s) = query_status(state).await
            && ok(&s)
        {
            return s;
        }
        assert!(start.elapsed() < WAIT, "{what}: not within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_run_loop_rotates_the_key_on_every_nth_renewal_and_keeps_watching() {
    let tmp = TempDir::new().unwrap();
    let ctl = Controller::start_new(tmp.path()).unwrap();
    ctl.zone_add("eu", "100.64.1.0/24").unwrap();
    ctl.zone_add("us", "100.64.2.0/24").unwrap();
    let endpoint = "198.18.0.1:51820";
    let dir = tmp.path().join("a");
    let (state, _) = ctl.enroll_agent(&dir, "eu", "a", 0, endpoint).await;
    let first_key = public_key(&state.node_key(), false);

    let net = FakeNet::new();
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
        effects: Arc::new(RecordingEffects::default()),
        clock: clock.clone(),
        icmp_probes: false,
    };
    let opts = RunOptions {
        rotate_key_every: 3,
        ..RunOptions::new(state.clone(), "zmr0")
    };
    let stop = CancellationToken::new();
    let agent = tokio::spawn(run_with(opts, deps, stop.clone()));
    let _tun = tokio::task::spawn_blocking(move || tun_rx.recv_timeout(WAIT))
        .await
        .unwrap()
        .expect("the agent started its data plane");
    status_until(&state, "connected", |s| s.controller_connected).await;

    // Past 2/3 of the life: the agent renews, and since the controller issues on its own
    // (real) clock every renewed certificate is due at once too, until the controller's
    // limit of 4 renewals an hour stops the chain. With every 3rd renewal rotating the
    // key, renewal 3 replaces it and renewal 4 keeps the new one.
    let info = cert_info(&state.read_cert().unwrap()).unwrap();
    let life = info.not_after.duration_since(info.not_before).unwrap();
    clock.advance(life.mul_f64(0.7));
    let start = Instant::now();
    let current = loop {
        let crl = ctl.admin_ok(&["ca", "crl"]).unwrap();
        let der = zonemesh_ca::pem_blocks("X509 CRL", &crl).unwrap().remove(0);
        let superseded = zonemesh_tests::cluster::crl_serials(&der).unwrap().len();
        let node = ctl.nodes().unwrap().remove(0);
        let serial = node["serial"].as_str().unwrap().to_string();
        if superseded >= 4
            && query_status(&state).await.is_ok_and(|s| s.serial == serial)
            && cert_info(&state.read_cert().unwrap()).unwrap().serial_hex == serial
        {
            break serial;
        }
        assert!(start.elapsed() < WAIT, "4 renewals not within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let second_key = public_key(&state.node_key(), false);
    assert_ne!(second_key, first_key, "the key was rotated");
    assert_eq!(public_key(&state.cert(), true), second_key);
    assert_eq!(
        state.renewals_since_key(),
        1,
        "renewal 4 kept the rotated key"
    );
    assert!(verify(&state).contains("node.crt: OK"));

    // Still watching, now presenting the new key: a node enrolling elsewhere shows up.
    status_until(&state, "connected with the new key", |s| {
        s.controller_connected
    })
    .await;
    ctl.enroll_in_zone("us", "b", 1).await;
    status_until(&state, "b becomes a peer", |s| {
        s.peers.iter().any(|p| p.name == "us/b")
    })
    .await;
    assert_eq!(query_status(&state).await.unwrap().serial, current);

    stop.cancel();
    tokio::time::timeout(WAIT, agent)
        .await
        .expect("agent stops")
        .unwrap()
        .unwrap();
}
