//! The ACME issuer against a real local ACME CA (Debian `pebble`, with
//! `pebble-challtestsrv` as its DNS so every name resolves to 127.0.0.1), answering
//! HTTP-01 from a small loopback server the test runs itself.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use zonemesh_deploy::acme::{AcmeConfig, AcmeError, AcmeIssuer, ChallengeResponder, Http01};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn installed(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A running pebble and its mock DNS, stopped on drop.
struct Pebble {
    children: Vec<Child>,
    directory: String,
    tls_root: rustls_pki_types::CertificateDer<'static>,
    _dir: tempfile::TempDir,
}

impl Drop for Pebble {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Pebble {
    /// Start pebble validating HTTP-01 on `http01_port` of 127.0.0.1.
    fn start(http01_port: u16) -> Pebble {
        let dir = tempfile::tempdir().unwrap();
        // pebble's own HTTPS listener: a throwaway CA and a localhost certificate.
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let srv_key = rcgen::KeyPair::generate().unwrap();
        let mut srv_params =
            rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .unwrap();
        srv_params.is_ca = rcgen::IsCa::ExplicitNoCa;
        let srv_cert = srv_params.signed_by(&srv_key, &issuer).unwrap();
        let cert_path = dir.path().join("cert.pem");
        let key_path = dir.path().join("key.pem");
        std::fs::write(&cert_path, srv_cert.pem()).unwrap();
        std::fs::write(&key_path, srv_key.serialize_pem()).unwrap();

        let (acme, mgmt, dns, dns_mgmt) = (free_port(), free_port(), free_udp_port(), free_port());
        let config = serde_json::json!({"pebble": {
            "listenAddress": format!("127.0.0.1:{acme}"),
            "managementListenAddress": format!("127.0.0.1:{mgmt}"),
            "certificate": cert_path, "privateKey": key_path,
            "httpPort": http01_port, "tlsPort": free_port(),
            "ocspResponderURL": "", "externalAccountBindingRequired": false,
        }});
        let config_path = dir.path().join("pebble-config.json");
        std::fs::write(&config_path, config.to_string()).unwrap();
        let log = |name: &str| std::fs::File::create(dir.path().join(name)).unwrap();
        let dns_srv = Command::new("pebble-challtestsrv")
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .args(["-dns01", &format!("127.0.0.1:{dns}")])
            .args(["-management", &format!("127.0.0.1:{dns_mgmt}")])
            .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
            .stdout(log("challtestsrv.log"))
            .stderr(log("challtestsrv.err"))
            .spawn()
            .unwrap();
        let pebble = Command::new("pebble")
            .arg("-config")
            .arg(&config_path)
            .args(["-dnsserver", &format!("127.0.0.1:{dns}")])
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .env("PEBBLE_AUTHZREUSE", "0")
            .stdout(log("pebble.log"))
            .stderr(log("pebble.err"))
            .spawn()
            .unwrap();
        let p = Pebble {
            children: vec![dns_srv, pebble],
            directory: format!("https://127.0.0.1:{acme}/dir"),
            tls_root: ca_cert.der().clone(),
            _dir: dir,
        };
        let until = Instant::now() + Duration::from_secs(15);
        while std::net::TcpStream::connect(("127.0.0.1", acme)).is_err() {
            assert!(Instant::now() < until, "pebble did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        p
    }
}

/// HTTP-01 responses published by the test, served on a loopback port.
#[derive(Clone, Default)]
struct Responses {
    map: Arc<Mutex<HashMap<String, String>>>,
    orders: Arc<Mutex<Vec<String>>>,
}

impl ChallengeResponder for Responses {
    async fn publish(&self, ch: &Http01) -> Result<(), String> {
        self.map
            .lock()
            .unwrap()
            .insert(ch.token.clone(), ch.key_authorization.clone());
        Ok(())
    }
    async fn withdraw(&self, ch: &Http01) {
        self.map.lock().unwrap().remove(&ch.token);
    }
    async fn order_started(&self, url: &str) {
        self.orders.lock().unwrap().push(url.to_string());
    }
}

async fn serve_http01(listener: tokio::net::TcpListener, responses: Responses) {
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            return;
        };
        let responses = responses.clone();
        let mut buf = vec![0u8; 4096];
        let n = s.read(&mut buf).await.unwrap_or(0);
        let req = String::from_utf8_lossy(&buf[..n]).to_string();
        let path = req.split_whitespace().nth(1).unwrap_or("").to_string();
        let token = path
            .strip_prefix("/.well-known/acme-challenge/")
            .unwrap_or("");
        let body = responses.map.lock().unwrap().get(token).cloned();
        let resp = match body {
            Some(b) => format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{b}",
                b.len()
            ),
            None => {
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".into()
            }
        };
        let _ = s.write_all(resp.as_bytes()).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pebble_issues_for_a_published_challenge_and_a_refused_one_carries_pebbles_reason() {
    if !installed("pebble") || !installed("pebble-challtestsrv") {
        println!("skipped: pebble not installed");
        return;
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http01: SocketAddr = listener.local_addr().unwrap();
    let pebble = Pebble::start(http01.port());
    let responses = Responses::default();
    let server = tokio::spawn(serve_http01(listener, responses.clone()));

    let mut cfg = AcmeConfig::new(pebble.directory.clone());
    cfg.extra_roots = vec![pebble.tls_root.clone()];
    cfg.contact_email = Some("ops@example.test".into());
    cfg.order_timeout = Duration::from_secs(60);
    let (issuer, creds) = AcmeIssuer::connect(cfg.clone(), None).await.unwrap();
    let creds = creds.expect("a new account hands back its credentials");
    // The stored credentials load the same account without creating another.
    let (again, none) = AcmeIssuer::connect(cfg.clone(), Some(&creds))
        .await
        .unwrap();
    assert!(none.is_none());
    assert_eq!(again.account_id(), issuer.account_id());

    let t0 = Instant::now();
    let bundle = issuer
        .issue("portal.zonemesh.test", None, &responses)
        .await
        .unwrap();
    println!("pebble issued in {:?}", t0.elapsed());
    assert_eq!(bundle.domain, "portal.zonemesh.test");
    assert!(bundle.chain_der.len() >= 2, "leaf and intermediate");
    assert!(!bundle.serial_hex.is_empty());
    assert!(
        responses.map.lock().unwrap().is_empty(),
        "withdrawn after the order"
    );
    assert_eq!(
        responses.orders.lock().unwrap().len(),
        1,
        "order URL reported"
    );
    // An RSA-2048 key that matches the leaf.
    let (_, leaf) = x509_parser::parse_x509_certificate(&bundle.chain_der[0]).unwrap();
    let key = rcgen::KeyPair::try_from(bundle.key_pkcs8_der.as_slice()).unwrap();
    assert_eq!(
        leaf.public_key().raw,
        rcgen::PublicKeyData::subject_public_key_info(&key).as_slice()
    );
    assert_eq!(leaf.public_key().parsed().unwrap().key_size(), 2048);

    // Nothing listens on the HTTP-01 port any more: pebble cannot connect, and says so.
    server.abort();
    let _ = server.await;
    let err = issuer
        .issue("refused.zonemesh.test", None, &responses)
        .await
        .unwrap_err();
    let text = err.to_string();
    println!("{text}");
    match &err {
        AcmeError::Validation { domain, reason } => {
            assert_eq!(domain, "refused.zonemesh.test");
            assert!(
                reason.contains("urn:ietf:params:acme:error:connection"),
                "{reason}"
            );
            assert!(
                reason.to_lowercase().contains("connection refused"),
                "{reason}"
            );
        }
        other => panic!("expected a validation failure, got {other:?}"),
    }
}
