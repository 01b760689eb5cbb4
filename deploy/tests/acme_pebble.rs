//! The ACME issuer against a real local ACME CA (Debian `pebble`, with
//! `pebble-challtestsrv` as its DNS so every name resolves to 127.0.0.1), answering
//! HTTP-01 from a small loopback server the test runs itself.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use zonemesh_deploy::acme::{AcmeConfig, AcmeError, AcmeIssuer, ChallengeResponder, Http01};
use zonemesh_deploy::testing::{Pebble, installed};

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
