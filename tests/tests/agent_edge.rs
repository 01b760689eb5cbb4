//! The agent's edge role against a real controller, without root: the run loop on an
//! in-memory data plane with `--edge-https/--edge-http/--edge-upstream` on loopback. A
//! `domain deploy` of an internal-issuer domain ends with our edge serving the new serial
//! (checked here by a handshake verified against the controller's root), stapled "good"
//! from the controller's own OCSP responder, and the upstream's page coming through; a
//! `ca revoke` of that serial reaches the staple (and the controller's domain list)
//! within 10 seconds through the Watch stream's CRL.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use zonemesh_agent::control::clock::ManualClock;
use zonemesh_agent::control::effects::recording::RecordingEffects;
use zonemesh_agent::control::run::{
    AgentStatus, EdgeConfig, RunDeps, RunOptions, query_status, run_with,
};
use zonemesh_agent::control::state::StateDir;
use zonemesh_agent::dataplane::DataPlane;
use zonemesh_agent::dataplane::fake::{FakeNet, FakeTun};
use zonemesh_tests::cluster::{Controller, free_port};

const WAIT: Duration = Duration::from_secs(30);
const DOMAIN: &str = "portal.edge.test";

/// A loopback upstream answering every request with one page and closing.
async fn upstream() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let body = "the portal upstream";
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tcp.write_all(resp.as_bytes()).await;
            });
        }
    });
    addr
}

fn domain_json(ctl: &Controller) -> serde_json::Value {
    let out = ctl.admin_ok(&["domain", "list", "--json"]).unwrap();
    let all: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    all.into_iter()
        .find(|d| d["name"] == DOMAIN)
        .expect("the domain is listed")
}

async fn until<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(start.elapsed() < WAIT, "{what}: not within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn status_until(state: &StateDir, what: &str, ok: impl Fn(&AgentStatus) -> bool) {
    let start = Instant::now();
    loop {
        if let Ok(s) = query_status(state).await
            && ok(&s)
        {
            return;
        }
        assert!(start.elapsed() < WAIT, "{what}: not within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A handshake with `addr` for `DOMAIN`, verified against `root_der`; the served leaf's
/// serial and the page behind it.
async fn fetch(addr: SocketAddr, root_der: &[u8]) -> (String, String) {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(root_der.to_vec()))
        .unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.resumption = rustls::client::Resumption::disabled();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(DOMAIN.try_into().unwrap(), tcp)
        .await
        .expect("a handshake verified against the controller's root");
    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    // Without the sign byte DER adds when the top bit is set: the form the CLI shows.
    let der_serial = zonemesh_tests::cluster::cert_serial(&leaf).unwrap();
    let mut serial = der_serial.as_str();
    while serial.len() > 2 && serial.starts_with("00") {
        serial = &serial[2..];
    }
    let serial = serial.to_string();
    let mut tls = tls;
    tls.write_all(
        format!("GET / HTTP/1.1\r\nhost: {DOMAIN}\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut resp = Vec::new();
    let _ = tls.read_to_end(&mut resp).await;
    let resp = String::from_utf8_lossy(&resp).into_owned();
    let (head, body) = resp.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("strict-transport-security: max-age=31536000"),
        "{head}"
    );
    (serial, body.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_is_served_stapled_and_a_revocation_reaches_the_staple() {
    let tmp = TempDir::new().unwrap();
    let ctl = Controller::start_new(tmp.path()).unwrap();
    ctl.zone_add("edge", "100.64.9.0/24").unwrap();
    ctl.admin_ok(&[
        "domain",
        "add",
        DOMAIN,
        "--issuer",
        "internal",
        "--owner",
        "owner@portal.test",
        "--edge-zone",
        "edge",
    ])
    .unwrap();

    let endpoint = "198.18.0.9:51820";
    let (state, _) = ctl
        .enroll_agent(&tmp.path().join("e1"), "edge", "e1", 0, endpoint)
        .await;
    let root_der = state.read_ca().unwrap();

    let net = FakeNet::new();
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
        clock: Arc::new(ManualClock::new(SystemTime::now())),
        icmp_probes: false,
    };
    let https: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let opts = RunOptions {
        edge: Some(EdgeConfig {
            https: Some(https),
            http: Some(http),
            upstream: Some(format!("http://{}", upstream().await)),
            ..Default::default()
        }),
        ..RunOptions::new(state.clone(), "zmt9")
    };
    let stop = CancellationToken::new();
    let agent = tokio::spawn(run_with(opts, deps, stop.clone()));
    let _tun = tokio::task::spawn_blocking(move || tun_rx.recv_timeout(WAIT))
        .await
        .unwrap()
        .expect("the agent started its data plane");
    status_until(&state, "connected", |s| s.controller_connected).await;
    until("the controller counts our edge", || {
        (domain_json(&ctl)["edges_total"] == 1).then_some(())
    })
    .await;

    // One deploy: exit 0 once our edge serves it.
    let started = Instant::now();
    let out = ctl.admin(&["domain", "deploy", DOMAIN]).unwrap();
    assert!(
        out.status.success(),
        "domain deploy: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("deploy served in {:?}", started.elapsed());
    let d = domain_json(&ctl);
    assert_eq!(d["state"], "deployed", "{d}");
    let serial = d["serial_hex"].as_str().unwrap().to_string();
    assert_eq!(d["staple"], "stapled", "{d}");
    let (served, page) = fetch(https, &root_der).await;
    assert_eq!(served, serial);
    assert_eq!(page, "the portal upstream");
    status_until(&state, "status shows the domain stapled", |s| {
        s.edge
            .iter()
            .any(|e| e.domain == DOMAIN && e.serial == serial && e.staple == "stapled")
    })
    .await;

    // Revoked: the staple says so within 10 s, and the controller hears of it.
    let revoked_at = Instant::now();
    ctl.admin_ok(&["ca", "revoke", "--serial", &serial])
        .unwrap();
    status_until(&state, "staple revoked", |s| {
        s.edge
            .iter()
            .any(|e| e.domain == DOMAIN && e.staple == "revoked")
    })
    .await;
    let took = revoked_at.elapsed();
    println!("revocation stapled {took:?} after ca revoke");
    assert!(took < Duration::from_secs(10), "{took:?}");
    until("the controller shows the revoked staple", || {
        (domain_json(&ctl)["staple"] == "revoked").then_some(())
    })
    .await;

    stop.cancel();
    tokio::time::timeout(WAIT, agent)
        .await
        .expect("agent stops")
        .unwrap()
        .unwrap();
    assert!(
        tokio::net::TcpStream::connect(https).await.is_err(),
        "the edge closed its listener"
    );
}
