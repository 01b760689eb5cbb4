//! The edge on loopback with real TLS: a test CA (RSA-2048 throughout, made once per test
//! binary), a loopback upstream, and an OCSP responder that signs with `zonemesh_ca`.

use super::*;
use crate::ocsp::CertStatus;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::TokioIo;
use rcgen::{
    CertificateParams, CustomExtension, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_RSA_SHA256, SerialNumber,
};
use rustls::pki_types::{PrivatePkcs8KeyDer, ServerName};
use std::collections::HashSet;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;
use tokio::net::{TcpListener, TcpStream};
use zeroize::Zeroizing;
use zonemesh_ca::Ca;

struct TestCa {
    ca: Ca,
    issuer: Issuer<'static, KeyPair>,
}

struct Pki {
    main: TestCa,
    /// Another CA, whose signatures the edge must not accept for `main`'s certificates.
    other: TestCa,
    /// Leaf keys, RSA-2048.
    keys: Vec<KeyPair>,
}

fn rsa2048() -> KeyPair {
    zonemesh_ca::generate_rsa_2048().expect("RSA-2048 key")
}

fn test_ca(name: &str) -> TestCa {
    let now = SystemTime::now();
    let root_key = rsa2048();
    let mut root = CertificateParams::new(Vec::<String>::new()).unwrap();
    root.distinguished_name
        .push(DnType::CommonName, format!("{name} root"));
    root.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    root.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    root.not_before = (now - Duration::from_secs(3600)).into();
    root.not_after = (now + Duration::from_secs(30 * 86_400)).into();
    let root_cert = root.self_signed(&root_key).unwrap();
    let root_issuer = Issuer::new(root, root_key);
    let int_key = rsa2048();
    let mut int = CertificateParams::new(Vec::<String>::new()).unwrap();
    int.distinguished_name
        .push(DnType::CommonName, format!("{name} intermediate"));
    int.is_ca = IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    int.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    int.not_before = (now - Duration::from_secs(3600)).into();
    int.not_after = (now + Duration::from_secs(30 * 86_400)).into();
    let int_cert = int.signed_by(&int_key, &root_issuer).unwrap();
    let int_pkcs8 = int_key.serialize_der();
    let ca = Ca::load(name, root_cert.der(), int_cert.der(), &int_pkcs8).expect("test CA");
    let issuer = Issuer::from_ca_cert_der(
        int_cert.der(),
        KeyPair::from_pkcs8_der_and_sign_algo(
            &PrivatePkcs8KeyDer::from(int_pkcs8),
            &PKCS_RSA_SHA256,
        )
        .unwrap(),
    )
    .unwrap();
    TestCa { ca, issuer }
}

fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| Pki {
        main: test_ca("edge-test"),
        other: test_ca("other-test"),
        keys: (0..3).map(|_| rsa2048()).collect(),
    })
}

/// The Authority Information Access extension naming `ocsp_url`.
fn aia(ocsp_url: &str) -> CustomExtension {
    let der = yasna::construct_der(|w| {
        w.write_sequence(|w| {
            w.next().write_sequence(|w| {
                w.next()
                    .write_oid(&yasna::models::ObjectIdentifier::from_slice(&[
                        1, 3, 6, 1, 5, 5, 7, 48, 1,
                    ]));
                w.next().write_tagged_implicit(yasna::Tag::context(6), |w| {
                    w.write_ia5_string(ocsp_url)
                });
            })
        })
    });
    CustomExtension::from_oid_content(&[1, 3, 6, 1, 5, 5, 7, 1, 1], der)
}

/// A leaf for `names` with key `key`, issued by the main CA, optionally with an OCSP URL.
fn leaf(domain: &str, names: &[&str], key: usize, ocsp_url: Option<&str>) -> CertBundle {
    let p = pki();
    let now = SystemTime::now();
    let mut params =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name.push(DnType::CommonName, names[0]);
    let serial: [u8; 16] = {
        let mut b: [u8; 16] = rand::random();
        b[0] |= 0x10;
        b[0] &= 0x7f;
        b
    };
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    params.not_before = (now - Duration::from_secs(60)).into();
    params.not_after = (now + Duration::from_secs(86_400)).into();
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    if let Some(url) = ocsp_url {
        params.custom_extensions = vec![aia(url)];
    }
    let cert = params.signed_by(&p.keys[key], &p.main.issuer).unwrap();
    CertBundle {
        domain: domain.into(),
        chain_der: vec![cert.der().to_vec(), p.main.ca.intermediate_der().to_vec()],
        key_pkcs8_der: Zeroizing::new(p.keys[key].serialize_der()),
        serial_hex: zonemesh_ca::serial_hex(&serial),
        not_after_unix: zonemesh_ca::unix_secs(now + Duration::from_secs(86_400)),
    }
}

type Svc =
    Arc<dyn Fn(http::Request<Bytes>, SocketAddr) -> http::Response<Full<Bytes>> + Send + Sync>;

/// A plain-HTTP/1.1 server on loopback answering with `svc`; stops with the token.
async fn http_server(svc: Svc) -> (SocketAddr, CancellationToken) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let stop = CancellationToken::new();
    let halt = stop.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                _ = halt.cancelled() => return,
                c = l.accept() => c.unwrap(),
            };
            let svc = svc.clone();
            tokio::spawn(async move {
                let s = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                    let svc = svc.clone();
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body.collect().await?.to_bytes();
                        Ok::<_, hyper::Error>(svc(http::Request::from_parts(parts, body), peer))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), s)
                    .await;
            });
        }
    });
    (addr, stop)
}

/// An upstream that describes the request it got.
async fn upstream() -> (SocketAddr, CancellationToken) {
    http_server(Arc::new(|req, _peer| {
        let h = |n: &str| {
            req.headers()
                .get(n)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_string()
        };
        let body = format!(
            "upstream: {} {} host={} xff={} proto={} fhost={} body={}",
            req.method(),
            req.uri(),
            h("host"),
            h("x-forwarded-for"),
            h("x-forwarded-proto"),
            h("x-forwarded-host"),
            String::from_utf8_lossy(req.body())
        );
        let mut r = http::Response::new(Full::new(Bytes::from(body)));
        r.headers_mut()
            .insert("x-upstream", http::HeaderValue::from_static("yes"));
        r
    }))
    .await
}

/// An OCSP responder for the main CA: serials in `revoked` are revoked; `failing` makes
/// it answer 500.
struct Responder {
    url: String,
    revoked: Arc<Mutex<HashSet<String>>>,
    failing: Arc<AtomicBool>,
    hits: Arc<AtomicUsize>,
    _stop: CancellationToken,
}

async fn responder(signer: &'static Ca) -> Responder {
    let revoked = Arc::new(Mutex::new(HashSet::<String>::new()));
    let failing = Arc::new(AtomicBool::new(false));
    let hits = Arc::new(AtomicUsize::new(0));
    let (r, f, n) = (revoked.clone(), failing.clone(), hits.clone());
    let (addr, stop) = http_server(Arc::new(move |req, _| {
        n.fetch_add(1, Ordering::SeqCst);
        if f.load(Ordering::SeqCst) {
            let mut resp = http::Response::new(Full::new(Bytes::from_static(b"down")));
            *resp.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
            return resp;
        }
        let now = SystemTime::now();
        let revoked = r.lock().clone();
        let out = signer.ocsp_respond(
            req.body(),
            |serial| {
                if revoked.contains(serial) {
                    zonemesh_ca::CertStatus::Revoked {
                        at: now - Duration::from_secs(1),
                        reason: zonemesh_ca::RevocationReason::KeyCompromise,
                    }
                } else {
                    zonemesh_ca::CertStatus::Good
                }
            },
            now,
        );
        let mut resp = http::Response::new(Full::new(Bytes::from(out.response_der)));
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/ocsp-response"),
        );
        resp
    }))
    .await;
    Responder {
        url: format!("http://{addr}/ocsp"),
        revoked,
        failing,
        hits,
        _stop: stop,
    }
}

struct Running {
    edge: Edge,
    stop: CancellationToken,
}

impl Running {
    async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(15), self.edge.join())
            .await
            .expect("the edge stops within the drain time");
    }
}

async fn start(upstream: SocketAddr, files: Option<FilesConfig>) -> Running {
    let stop = CancellationToken::new();
    let edge = Edge::start(
        EdgeConfig {
            https: Some("127.0.0.1:0".parse().unwrap()),
            http: Some("127.0.0.1:0".parse().unwrap()),
            upstream: Some(format!("http://{upstream}")),
            files,
            ..Default::default()
        },
        stop.clone(),
    )
    .await
    .expect("edge starts");
    Running { edge, stop }
}

/// A client that trusts the main test root, with the given ALPN and versions.
fn client_config(
    alpn: &[&[u8]],
    versions: &[&'static rustls::SupportedProtocolVersion],
    suites: Option<Vec<rustls::SupportedCipherSuite>>,
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(pki().main.ca.root_der().to_vec()))
        .unwrap();
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    if let Some(s) = suites {
        provider.cipher_suites = s;
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    // Every connection a full handshake: a resumed session shows no certificate.
    cfg.resumption = rustls::client::Resumption::disabled();
    Arc::new(cfg)
}

async fn tls_connect(
    addr: SocketAddr,
    name: &str,
    cfg: Arc<rustls::ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(cfg)
        .connect(ServerName::try_from(name.to_string()).unwrap(), tcp)
        .await
}

fn serial_of(tls: &tokio_rustls::client::TlsStream<TcpStream>) -> String {
    let der = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    let (_, c) = x509_parser::parse_x509_certificate(&der).unwrap();
    zonemesh_ca::serial_hex(c.raw_serial())
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// An HTTP/1.1 connection over `io`, its driver on a task.
async fn h1<I>(io: I) -> Sender
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

async fn send(
    s: &mut Sender,
    method: &str,
    host: &str,
    path: &str,
    body: &'static str,
) -> (http::StatusCode, http::HeaderMap, String) {
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", host)
        .header("x-forwarded-for", "203.0.113.9")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap();
    s.ready().await.unwrap();
    let resp = s.send_request(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

async fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn staple_status(der: &[u8], b: &CertBundle) -> CertStatus {
    let t = OcspTarget::new(&b.chain_der[0], &b.chain_der[1])
        .unwrap()
        .unwrap();
    t.check_response(der, SystemTime::now()).unwrap().status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_picks_the_right_certificate_and_an_unknown_name_is_refused() {
    let (up, _up_stop) = upstream().await;
    let run = start(up, None).await;
    let a = leaf("a.edge.test", &["a.edge.test"], 0, None);
    let b = leaf("b.edge.test", &["b.edge.test"], 1, None);
    let ia = run.edge.install(a.clone()).await.unwrap();
    assert_eq!(ia.staple, StapleState::NoResponder);
    run.edge.install(b.clone()).await.unwrap();
    let addr = run.edge.https_addr().unwrap();
    let cfg = client_config(&[b"http/1.1"], rustls::DEFAULT_VERSIONS, None);
    // Both verify against the root for their own name: the right chain and key.
    let ta = tls_connect(addr, "a.edge.test", cfg.clone()).await.unwrap();
    assert_eq!(serial_of(&ta), a.serial_hex);
    let tb = tls_connect(addr, "b.edge.test", cfg.clone()).await.unwrap();
    assert_eq!(serial_of(&tb), b.serial_hex);
    let e = tls_connect(addr, "c.edge.test", cfg.clone())
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("HandshakeFailure") || e.to_string().contains("alert"),
        "{e}"
    );
    let status = run.edge.status().borrow().clone();
    assert_eq!(status["a.edge.test"].serial_hex, a.serial_hex);
    assert_eq!(status["b.edge.test"].staple.to_string(), "no-responder");
    // Removed: refused like any unknown name.
    run.edge.remove("a.edge.test");
    assert!(tls_connect(addr, "a.edge.test", cfg).await.is_err());
    assert_eq!(run.edge.domains(), vec!["b.edge.test".to_string()]);
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swap_keeps_open_connections_and_new_ones_get_the_new_certificate() {
    let (up, _up_stop) = upstream().await;
    let run = start(up, None).await;
    let old = leaf("swap.edge.test", &["swap.edge.test"], 0, None);
    run.edge.install(old.clone()).await.unwrap();
    let addr = run.edge.https_addr().unwrap();
    let cfg = client_config(&[b"http/1.1"], rustls::DEFAULT_VERSIONS, None);
    let held = tls_connect(addr, "swap.edge.test", cfg.clone())
        .await
        .unwrap();
    assert_eq!(serial_of(&held), old.serial_hex);
    let mut conn = h1(held).await;
    let (st, _, body) = send(&mut conn, "GET", "swap.edge.test", "/one", "").await;
    assert_eq!(st, 200, "{body}");

    let new = leaf("swap.edge.test", &["swap.edge.test"], 1, None);
    let installed = run.edge.install(new.clone()).await.unwrap();
    assert_eq!(installed.serial_hex, new.serial_hex);
    assert!(!installed.unchanged);
    // The held connection still works, on its old session.
    let (st, _, body) = send(&mut conn, "GET", "swap.edge.test", "/two", "").await;
    assert_eq!(st, 200);
    assert!(body.contains("GET /two"), "{body}");
    // New connections see the new certificate, and the probe says so.
    let fresh = tls_connect(addr, "swap.edge.test", cfg).await.unwrap();
    assert_eq!(serial_of(&fresh), new.serial_hex);
    assert_eq!(
        run.edge.probe("swap.edge.test").await.unwrap().serial_hex,
        new.serial_hex
    );
    // The same certificate again changes nothing.
    assert!(run.edge.install(new).await.unwrap().unchanged);
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_bundle_is_refused_and_the_old_certificate_stays() {
    let (up, _up_stop) = upstream().await;
    let run = start(up, None).await;
    let good = leaf("keep.edge.test", &["keep.edge.test"], 0, None);
    run.edge.install(good.clone()).await.unwrap();
    let mut wrong_key = leaf("keep.edge.test", &["keep.edge.test"], 1, None);
    wrong_key.key_pkcs8_der = Zeroizing::new(pki().keys[2].serialize_der());
    let wrong_name = leaf("keep.edge.test", &["other.edge.test"], 1, None);
    let mut garbage = leaf("keep.edge.test", &["keep.edge.test"], 1, None);
    garbage.chain_der[0].truncate(100);
    let mut bad_domain = leaf("keep.edge.test", &["keep.edge.test"], 1, None);
    bad_domain.domain = "../keep.edge.test".into();
    let mut foreign_chain = leaf("keep.edge.test", &["keep.edge.test"], 1, None);
    foreign_chain.chain_der[1] = pki().other.ca.intermediate_der().to_vec();
    for (what, b, expect) in [
        ("wrong key", wrong_key, "private key"),
        ("wrong name", wrong_name, "not valid for this name"),
        ("garbage", garbage, "certificate 0"),
        ("bad domain", bad_domain, "not a valid DNS name"),
        (
            "foreign chain",
            foreign_chain,
            "not signed by the next certificate",
        ),
    ] {
        match run.edge.install(b).await {
            Err(EdgeError::BadBundle { reason, .. }) => {
                assert!(reason.contains(expect), "{what}: {reason}")
            }
            other => panic!("{what}: {other:?}"),
        }
    }
    assert_eq!(
        run.edge.probe("keep.edge.test").await.unwrap().serial_hex,
        good.serial_hex
    );
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http01_is_answered_and_everything_else_redirected_to_https() {
    let (up, _up_stop) = upstream().await;
    let run = start(up, None).await;
    let https_port = run.edge.https_addr().unwrap().port();
    let token = "tok_EN-123abc";
    let key_auth = format!("{token}.thumbPRINT_-9");
    run.edge
        .set_challenge("acme.edge.test", token, &key_auth)
        .unwrap();
    assert!(
        run.edge
            .set_challenge("acme.edge.test", "../x", "x")
            .is_err()
    );
    assert!(
        run.edge
            .set_challenge("acme.edge.test", "t", "other.thumb")
            .is_err()
    );
    let tcp = TcpStream::connect(run.edge.http_addr().unwrap())
        .await
        .unwrap();
    let mut c = h1(tcp).await;
    let path = format!("{ACME_CHALLENGE_PREFIX}{token}");
    let (st, h, body) = send(&mut c, "GET", "acme.edge.test", &path, "").await;
    assert_eq!((st.as_u16(), body.as_str()), (200, key_auth.as_str()));
    assert_eq!(h["content-type"], "text/plain");
    let (st, _, _) = send(
        &mut c,
        "GET",
        "acme.edge.test",
        &format!("{ACME_CHALLENGE_PREFIX}nope"),
        "",
    )
    .await;
    assert_eq!(st, 404);
    let (st, h, _) = send(&mut c, "GET", "acme.edge.test:80", "/a/b?c=d", "").await;
    assert_eq!(st, 301);
    assert_eq!(
        h["location"],
        format!("https://acme.edge.test:{https_port}/a/b?c=d").as_str()
    );
    let (st, _, _) = send(&mut c, "POST", "acme.edge.test", "/form", "x").await;
    assert_eq!(st, 308);
    // A request body left unread ends the connection.
    let mut c = h1(TcpStream::connect(run.edge.http_addr().unwrap())
        .await
        .unwrap())
    .await;
    run.edge.clear_challenge(token);
    let (st, _, _) = send(&mut c, "GET", "acme.edge.test", &path, "").await;
    assert_eq!(st, 404);
    // The challenge map is bounded.
    for i in 0..MAX_CHALLENGES {
        run.edge
            .set_challenge("acme.edge.test", &format!("t{i}"), &format!("t{i}.x"))
            .unwrap();
    }
    assert!(matches!(
        run.edge
            .set_challenge("acme.edge.test", "one-more", "one-more.x"),
        Err(EdgeError::TooMany(_))
    ));
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_proxied_with_forwarding_headers_and_hsts_over_h1_and_h2() {
    let (up, up_stop) = upstream().await;
    let run = start(up, None).await;
    let b = leaf("proxy.edge.test", &["proxy.edge.test"], 0, None);
    run.edge.install(b).await.unwrap();
    let addr = run.edge.https_addr().unwrap();

    let tls = tls_connect(
        addr,
        "proxy.edge.test",
        client_config(&[b"http/1.1"], rustls::DEFAULT_VERSIONS, None),
    )
    .await
    .unwrap();
    let mut c = h1(tls).await;
    let (st, h, body) = send(&mut c, "POST", "proxy.edge.test", "/p?q=1", "hello").await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(h["strict-transport-security"], HSTS);
    assert_eq!(h["x-upstream"], "yes");
    assert!(
        body.contains(&format!(
            "upstream: POST /p?q=1 host={up} xff=127.0.0.1 proto=https fhost=proxy.edge.test body=hello"
        )),
        "{body}"
    );

    // HTTP/2 by ALPN.
    let tls = tls_connect(
        addr,
        "proxy.edge.test",
        client_config(&[b"h2"], rustls::DEFAULT_VERSIONS, None),
    )
    .await
    .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut s2, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = http::Request::builder()
        .uri("https://proxy.edge.test/over-h2")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = s2.send_request(req).await.unwrap();
    assert_eq!(resp.headers()["strict-transport-security"], HSTS);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let body = String::from_utf8_lossy(&body);
    assert!(
        body.contains("GET /over-h2") && body.contains("fhost=proxy.edge.test"),
        "{body}"
    );

    run.stop().await;
    up_stop.cancel();

    // An upstream that is not there: 502 with a short body, HSTS still there.
    let dead = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let run = start(dead, None).await;
    run.edge
        .install(leaf("proxy.edge.test", &["proxy.edge.test"], 0, None))
        .await
        .unwrap();
    let tls = tls_connect(
        run.edge.https_addr().unwrap(),
        "proxy.edge.test",
        client_config(&[b"http/1.1"], rustls::DEFAULT_VERSIONS, None),
    )
    .await
    .unwrap();
    let mut c = h1(tls).await;
    let (st, h, body) = send(&mut c, "GET", "proxy.edge.test", "/gone", "").await;
    assert_eq!(st, 502, "{body}");
    assert_eq!(h["strict-transport-security"], HSTS);
    assert!(body.len() < 100);
    run.stop().await;
}

/// Whether `openssl s_client` with `args` completes a handshake with the edge.
fn openssl_connects(addr: SocketAddr, name: &str, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &addr.to_string(),
            "-servername",
            name,
        ])
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("openssl runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let ok = text.contains("Verify return code") && !text.contains("Cipher is (NONE)");
    (ok, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_tls12_and_tls13_with_forward_secret_aead_suites() {
    let (up, _up_stop) = upstream().await;
    let run = start(up, None).await;
    run.edge
        .install(leaf("tls.edge.test", &["tls.edge.test"], 0, None))
        .await
        .unwrap();
    let addr = run.edge.https_addr().unwrap();
    // Every suite a TLS 1.2-only client can get is ECDHE with an AEAD.
    let allowed: Vec<_> = cipher_suites().iter().map(|s| s.suite()).collect();
    for suite in rustls::crypto::aws_lc_rs::ALL_CIPHER_SUITES {
        if suite.version() != &rustls::version::TLS12
            || format!("{:?}", suite.suite()).contains("ECDSA")
        {
            continue;
        }
        let cfg = client_config(&[], &[&rustls::version::TLS12], Some(vec![*suite]));
        let tls = tls_connect(addr, "tls.edge.test", cfg).await.unwrap();
        let got = tls.get_ref().1.negotiated_cipher_suite().unwrap().suite();
        assert!(allowed.contains(&got), "{got:?}");
        assert!(format!("{got:?}").contains("ECDHE"), "{got:?}");
    }
    let tls13 = tls_connect(
        addr,
        "tls.edge.test",
        client_config(&[], &[&rustls::version::TLS13], None),
    )
    .await
    .unwrap();
    assert_eq!(
        tls13.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );

    if std::process::Command::new("openssl")
        .arg("version")
        .output()
        .is_err()
    {
        println!("skipped: openssl not installed");
        run.stop().await;
        return;
    }
    let (r, s) = (addr, "tls.edge.test");
    tokio::task::spawn_blocking(move || {
        // The control: a forward-secret TLS 1.2 handshake works with this client.
        let (ok, out) =
            openssl_connects(r, s, &["-tls1_2", "-cipher", "ECDHE-RSA-AES128-GCM-SHA256"]);
        assert!(ok, "{out}");
        // SECLEVEL=0 so the client itself is willing to try the old protocols.
        for args in [
            &["-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"][..],
            &["-tls1", "-cipher", "DEFAULT@SECLEVEL=0"][..],
            &["-tls1_2", "-cipher", "AES128-GCM-SHA256"][..],
            &["-tls1_2", "-cipher", "AES256-SHA256"][..],
            &["-tls1_2", "-cipher", "ECDHE-RSA-AES128-SHA"][..],
            &["-tls1_2", "-cipher", "ECDHE-RSA-AES128-SHA256"][..],
        ] {
            let (ok, out) = openssl_connects(r, s, args);
            assert!(!ok, "{args:?} connected:\n{out}");
        }
    })
    .await
    .unwrap();
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_staple_is_served_refreshed_and_says_revoked_after_refresh_staples() {
    let (up, _up_stop) = upstream().await;
    let r = responder(&pki().main.ca).await;
    let run = start(up, None).await;
    let b = leaf("ocsp.edge.test", &["ocsp.edge.test"], 0, Some(&r.url));
    let installed = run.edge.install(b.clone()).await.unwrap();
    assert!(
        matches!(installed.staple, StapleState::Stapled { .. }),
        "{:?}",
        installed.staple
    );
    let served = run.edge.probe("ocsp.edge.test").await.unwrap();
    let first = served.staple.expect("a staple in the handshake");
    assert_eq!(staple_status(&first, &b), CertStatus::Good);
    assert_eq!(r.hits.load(Ordering::SeqCst), 1);

    // A refresh fetches a newer response (one second later, so other bytes).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    run.edge.refresh_staples();
    wait_for("refreshed staple", Duration::from_secs(10), || {
        r.hits.load(Ordering::SeqCst) >= 2
    })
    .await;
    let start = Instant::now();
    loop {
        let now = run
            .edge
            .probe("ocsp.edge.test")
            .await
            .unwrap()
            .staple
            .unwrap();
        if now != first {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the staple never changed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Revoked: after refresh_staples the edge staples "revoked" as it is.
    r.revoked.lock().insert(b.serial_hex.clone());
    let revoked_at = Instant::now();
    run.edge.refresh_staples();
    let mut status = run.edge.status();
    tokio::time::timeout(
        Duration::from_secs(10),
        status.wait_for(|s| s["ocsp.edge.test"].staple == StapleState::Revoked),
    )
    .await
    .expect("revoked within 10 s")
    .unwrap();
    let served = run.edge.probe("ocsp.edge.test").await.unwrap();
    assert!(matches!(
        staple_status(&served.staple.unwrap(), &b),
        CertStatus::Revoked { .. }
    ));
    println!(
        "revocation stapled {:?} after refresh_staples",
        revoked_at.elapsed()
    );

    if std::process::Command::new("openssl")
        .arg("version")
        .output()
        .is_ok()
    {
        let addr = run.edge.https_addr().unwrap();
        let out = tokio::task::spawn_blocking(move || {
            openssl_connects(addr, "ocsp.edge.test", &["-status"]).1
        })
        .await
        .unwrap();
        assert!(out.contains("Cert Status: revoked"), "{out}");
    } else {
        println!("skipped: openssl not installed (openssl s_client -status)");
    }
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fetch_is_retried_and_a_foreign_signature_is_never_stapled() {
    let (up, _up_stop) = upstream().await;
    let r = responder(&pki().main.ca).await;
    r.failing.store(true, Ordering::SeqCst);
    let run = start(up, None).await;
    let b = leaf("retry.edge.test", &["retry.edge.test"], 1, Some(&r.url));
    let installed = run.edge.install(b.clone()).await.unwrap();
    match &installed.staple {
        StapleState::Unavailable(why) => assert!(why.contains("HTTP 500"), "{why}"),
        other => panic!("{other:?}"),
    }
    // Served unstapled meanwhile.
    assert_eq!(
        run.edge.probe("retry.edge.test").await.unwrap().staple,
        None
    );
    r.failing.store(false, Ordering::SeqCst);
    let mut status = run.edge.status();
    tokio::time::timeout(
        Duration::from_secs(15),
        status.wait_for(|s| matches!(s["retry.edge.test"].staple, StapleState::Stapled { .. })),
    )
    .await
    .expect("stapled after the retry")
    .unwrap();
    assert!(
        run.edge
            .probe("retry.edge.test")
            .await
            .unwrap()
            .staple
            .is_some()
    );
    run.stop().await;

    // A response for this very certificate, signed by another CA, is refused.
    let other = &pki().other.ca;
    let t = OcspTarget::new(&b.chain_der[0], &b.chain_der[1])
        .unwrap()
        .unwrap();
    let q = other.ocsp_query(&t.request_der()).unwrap();
    assert!(!q.our_issuer);
    assert_eq!(q.serial_hex, b.serial_hex);
    let forged = other
        .ocsp_sign(&q, zonemesh_ca::CertStatus::Good, SystemTime::now())
        .unwrap();
    assert!(matches!(
        t.check_response(&forged, SystemTime::now()),
        Err(crate::ocsp::OcspError::Signature(_))
    ));
    // And the genuine one for another certificate is refused too.
    let other_leaf = leaf("x.edge.test", &["x.edge.test"], 2, Some(&r.url));
    let t2 = OcspTarget::new(&other_leaf.chain_der[0], &other_leaf.chain_der[1])
        .unwrap()
        .unwrap();
    let genuine = pki().main.ca.ocsp_respond(
        &t2.request_der(),
        |_| zonemesh_ca::CertStatus::Good,
        SystemTime::now(),
    );
    assert!(matches!(
        t.check_response(&genuine.response_der, SystemTime::now()),
        Err(crate::ocsp::OcspError::WrongCertificate)
    ));
    // Expired: not stapled.
    let ok = pki().main.ca.ocsp_respond(
        &t.request_der(),
        |_| zonemesh_ca::CertStatus::Good,
        SystemTime::now(),
    );
    assert!(
        t.check_response(&ok.response_der, SystemTime::now())
            .is_ok()
    );
    assert!(matches!(
        t.check_response(
            &ok.response_der,
            SystemTime::now() + Duration::from_secs(7200)
        ),
        Err(crate::ocsp::OcspError::Stale(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_are_written_privately_reloaded_and_never_through_a_symlink() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let reloads = dir.path().join("reloads");
    let files = FilesConfig {
        dir: dir.path().join("certs"),
        reload: Some(format!("echo reload >> '{}'", reloads.display())),
    };
    std::fs::create_dir(&files.dir).unwrap();
    let r = responder(&pki().main.ca).await;
    let (up, _up_stop) = upstream().await;
    let run = start(up, Some(files.clone())).await;
    let b = leaf("files.edge.test", &["files.edge.test"], 0, Some(&r.url));
    run.edge.install(b.clone()).await.unwrap();
    let d = files.dir.join("files.edge.test");
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&d), 0o700);
    assert_eq!(mode(&d.join("privkey.pem")), 0o600);
    assert_eq!(
        std::fs::read_to_string(&reloads).unwrap().lines().count(),
        1
    );
    let fullchain = std::fs::read_to_string(d.join("fullchain.pem")).unwrap();
    assert_eq!(fullchain.matches("BEGIN CERTIFICATE").count(), 2);
    let key = std::fs::read_to_string(d.join("privkey.pem")).unwrap();
    assert_eq!(
        zonemesh_ca::pem_blocks("PRIVATE KEY", &key).unwrap(),
        vec![b.key_pkcs8_der.to_vec()]
    );
    let staple = std::fs::read(d.join("ocsp.der")).unwrap();
    assert_eq!(staple_status(&staple, &b), CertStatus::Good);
    if std::process::Command::new("openssl")
        .arg("version")
        .output()
        .is_ok()
    {
        let out = std::process::Command::new("openssl")
            .args(["x509", "-noout", "-serial", "-ext", "subjectAltName", "-in"])
            .arg(d.join("fullchain.pem"))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
        assert!(out.status.success(), "{text}");
        assert!(text.contains(&format!("serial={}", b.serial_hex)), "{text}");
        assert!(text.contains("dns:files.edge.test"), "{text}");
        let out = std::process::Command::new("openssl")
            .args(["pkey", "-noout", "-in"])
            .arg(d.join("privkey.pem"))
            .output()
            .unwrap();
        assert!(out.status.success());
    } else {
        println!("skipped: openssl not installed (openssl x509 check)");
    }

    // A revocation rewrites ocsp.der and reloads again.
    r.revoked.lock().insert(b.serial_hex.clone());
    run.edge.refresh_staples();
    wait_for("second reload", Duration::from_secs(10), || {
        std::fs::read_to_string(&reloads).unwrap().lines().count() == 2
    })
    .await;
    let staple = std::fs::read(d.join("ocsp.der")).unwrap();
    assert!(matches!(
        staple_status(&staple, &b),
        CertStatus::Revoked { .. }
    ));

    // A symlink planted in place of the key is replaced, never followed.
    let victim = dir.path().join("victim");
    std::fs::write(&victim, "precious").unwrap();
    std::fs::remove_file(d.join("privkey.pem")).unwrap();
    std::os::unix::fs::symlink(&victim, d.join("privkey.pem")).unwrap();
    let b2 = leaf("files.edge.test", &["files.edge.test"], 1, None);
    run.edge.install(b2.clone()).await.unwrap();
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    assert!(
        std::fs::symlink_metadata(d.join("privkey.pem"))
            .unwrap()
            .is_file()
    );
    // No responder now: the old staple file is gone.
    assert!(!d.join("ocsp.der").exists());

    // A domain directory that is a symlink is refused, and so reported.
    let elsewhere = dir.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, files.dir.join("link.edge.test")).unwrap();
    let e = run
        .edge
        .install(leaf("link.edge.test", &["link.edge.test"], 2, None))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("symlink"), "{e}");
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
    assert!(
        run.edge.status().borrow()["link.edge.test"]
            .files_error
            .is_some()
    );

    // A failing reload command is reported.
    run.stop().await;
    let failing = FilesConfig {
        dir: files.dir.clone(),
        reload: Some("echo 'nginx: configuration test failed' >&2; exit 1".into()),
    };
    let run = start(up, Some(failing)).await;
    let e = run
        .edge
        .install(leaf("fail.edge.test", &["fail.edge.test"], 0, None))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("configuration test failed"), "{e}");
    run.stop().await;
}

#[tokio::test]
async fn a_configuration_that_cannot_work_is_refused_before_binding() {
    let cases = [
        (EdgeConfig::default(), "needs an HTTPS listener"),
        (
            EdgeConfig {
                https: Some("127.0.0.1:0".parse().unwrap()),
                ..Default::default()
            },
            "needs an upstream",
        ),
        (
            EdgeConfig {
                http: Some("127.0.0.1:0".parse().unwrap()),
                upstream: Some("http://127.0.0.1:1".into()),
                ..Default::default()
            },
            "only used with an HTTPS listener",
        ),
        (
            EdgeConfig {
                https: Some("127.0.0.1:0".parse().unwrap()),
                upstream: Some("https://127.0.0.1:1".into()),
                ..Default::default()
            },
            "only http://",
        ),
    ];
    for (cfg, expect) in cases {
        let e = Edge::start(cfg, CancellationToken::new())
            .await
            .unwrap_err();
        assert!(e.to_string().contains(expect), "{e}");
    }
}

/// Re-sign the `tbsResponseData` of `response` with `key`, carrying `cert`: a response
/// from a delegated responder.
fn resign(response: &[u8], key: &KeyPair, cert: &[u8]) -> Vec<u8> {
    use rcgen::SigningKey;
    use yasna::Tag;
    let basic = yasna::parse_der(response, |r| {
        r.read_sequence(|r| {
            r.next().read_enum()?;
            r.next().read_tagged(Tag::context(0), |r| {
                r.read_sequence(|r| {
                    r.next().read_oid()?;
                    r.next().read_bytes()
                })
            })
        })
    })
    .unwrap();
    let tbs = yasna::parse_der(&basic, |r| {
        r.read_sequence(|r| {
            let tbs = r.next().read_der()?;
            r.next().read_der()?;
            r.next().read_bitvec_bytes()?;
            r.read_optional(|r| r.read_der())?;
            Ok(tbs)
        })
    })
    .unwrap();
    let sig = key.sign(&tbs).unwrap();
    let oid = |c: &[u64]| yasna::models::ObjectIdentifier::from_slice(c);
    let basic = yasna::construct_der(|w| {
        w.write_sequence(|w| {
            w.next().write_der(&tbs);
            w.next().write_sequence(|w| {
                w.next().write_oid(&oid(&[1, 2, 840, 113549, 1, 1, 11]));
                w.next().write_null();
            });
            w.next().write_bitvec_bytes(&sig, sig.len() * 8);
            w.next().write_tagged(Tag::context(0), |w| {
                w.write_sequence(|w| w.next().write_der(cert))
            });
        })
    });
    yasna::construct_der(|w| {
        w.write_sequence(|w| {
            w.next().write_enum(0);
            w.next().write_tagged(Tag::context(0), |w| {
                w.write_sequence(|w| {
                    w.next().write_oid(&oid(&[1, 3, 6, 1, 5, 5, 7, 48, 1, 1]));
                    w.next().write_bytes(&basic);
                })
            });
        })
    })
}

#[test]
fn a_delegated_responder_is_accepted_only_with_the_ocsp_signing_usage() {
    let p = pki();
    let b = leaf(
        "dele.edge.test",
        &["dele.edge.test"],
        0,
        Some("http://127.0.0.1:1/ocsp"),
    );
    let t = OcspTarget::new(&b.chain_der[0], &b.chain_der[1])
        .unwrap()
        .unwrap();
    let now = SystemTime::now();
    let genuine = p
        .main
        .ca
        .ocsp_respond(&t.request_der(), |_| zonemesh_ca::CertStatus::Good, now)
        .response_der;
    let responder = |eku: Vec<ExtendedKeyUsagePurpose>, issuer: &Issuer<'static, KeyPair>| {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "delegated OCSP responder");
        params.not_before = (now - Duration::from_secs(60)).into();
        params.not_after = (now + Duration::from_secs(3600)).into();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = eku;
        params.signed_by(&p.keys[1], issuer).unwrap().der().to_vec()
    };
    let delegated = responder(vec![ExtendedKeyUsagePurpose::OcspSigning], &p.main.issuer);
    let ok = resign(&genuine, &p.keys[1], &delegated);
    assert_eq!(t.check_response(&ok, now).unwrap().status, CertStatus::Good);
    let no_eku = responder(vec![ExtendedKeyUsagePurpose::ServerAuth], &p.main.issuer);
    let e = t
        .check_response(&resign(&genuine, &p.keys[1], &no_eku), now)
        .unwrap_err();
    assert!(e.to_string().contains("not for OCSP signing"), "{e}");
    let foreign = responder(vec![ExtendedKeyUsagePurpose::OcspSigning], &p.other.issuer);
    let e = t
        .check_response(&resign(&genuine, &p.keys[1], &foreign), now)
        .unwrap_err();
    assert!(e.to_string().contains("not issued by the issuer"), "{e}");
}

/// Whether the edge closes `tcp` within `within` (EOF or reset on read).
async fn closed_within(tcp: &mut TcpStream, within: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut b = [0u8; 16];
    matches!(
        tokio::time::timeout(within, tcp.read(&mut b)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_closed_and_each_source_is_capped() {
    let stop = CancellationToken::new();
    let edge = Edge::start(
        EdgeConfig {
            https: Some("127.0.0.1:0".parse().unwrap()),
            upstream: Some("http://127.0.0.1:9".into()),
            limits: ListenerLimits {
                max_conns: 8,
                max_per_source: 2,
                first_request: Duration::from_millis(500),
                idle: Duration::from_millis(500),
            },
            ..Default::default()
        },
        stop.clone(),
    )
    .await
    .unwrap();
    let addr = edge.https_addr().unwrap();
    let mut a = TcpStream::connect(addr).await.unwrap();
    let mut b = TcpStream::connect(addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    // A third from the same source is closed at once.
    let mut c = TcpStream::connect(addr).await.unwrap();
    assert!(closed_within(&mut c, Duration::from_millis(300)).await);
    // The two silent ones (no TLS handshake ever) go at the first-request deadline.
    let started = Instant::now();
    assert!(closed_within(&mut a, Duration::from_secs(3)).await);
    assert!(closed_within(&mut b, Duration::from_secs(3)).await);
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "{:?}",
        started.elapsed()
    );
    // Their places are free again.
    let mut d = TcpStream::connect(addr).await.unwrap();
    assert!(!closed_within(&mut d, Duration::from_millis(200)).await);
    stop.cancel();
    edge.join().await;
}

#[derive(Debug)]
struct TestClock(Mutex<SystemTime>);

impl Clock for TestClock {
    fn now(&self) -> SystemTime {
        *self.0.lock()
    }
    fn alarm(&self, _at: SystemTime) -> crate::clock::Alarm {
        Box::pin(std::future::pending())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_good_staple_is_served_until_it_expires_then_dropped() {
    let r = responder(&pki().main.ca).await;
    let clock = Arc::new(TestClock(Mutex::new(SystemTime::now())));
    let stop = CancellationToken::new();
    let edge = Edge::start(
        EdgeConfig {
            https: Some("127.0.0.1:0".parse().unwrap()),
            upstream: Some("http://127.0.0.1:9".into()),
            clock: clock.clone(),
            ..Default::default()
        },
        stop.clone(),
    )
    .await
    .unwrap();
    let b = leaf("expiry.edge.test", &["expiry.edge.test"], 2, Some(&r.url));
    let installed = edge.install(b.clone()).await.unwrap();
    assert!(matches!(installed.staple, StapleState::Stapled { .. }));

    // The responder fails: the staple in hand is still served, and still "stapled".
    r.failing.store(true, Ordering::SeqCst);
    edge.refresh_staples();
    wait_for("a failed refresh", Duration::from_secs(10), || {
        r.hits.load(Ordering::SeqCst) >= 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        edge.probe("expiry.edge.test")
            .await
            .unwrap()
            .staple
            .is_some()
    );
    assert!(matches!(
        edge.status().borrow()["expiry.edge.test"].staple,
        StapleState::Stapled { .. }
    ));

    // Past its nextUpdate (one hour): dropped, served unstapled, and said so.
    *clock.0.lock() += Duration::from_secs(2 * 3600);
    edge.refresh_staples();
    let mut status = edge.status();
    tokio::time::timeout(
        Duration::from_secs(10),
        status.wait_for(|s| matches!(s["expiry.edge.test"].staple, StapleState::Unavailable(_))),
    )
    .await
    .expect("the expired staple is dropped")
    .unwrap();
    assert_eq!(edge.probe("expiry.edge.test").await.unwrap().staple, None);
    stop.cancel();
    edge.join().await;
}

/// Records what the edge reports as authentication failures.
#[derive(Debug, Default)]
struct Failures(Mutex<Vec<(std::net::IpAddr, u16)>>);

impl super::AuthFailureHook for Failures {
    fn auth_failure(&self, source: std::net::IpAddr, status: u16) {
        self.0.lock().push((source, status));
    }
}

#[tokio::test]
async fn the_edge_tells_the_hook_of_401_and_403_answers_with_the_client_address() {
    let (up, up_stop) = http_server(Arc::new(|req, _peer| {
        let code = match req.uri().path() {
            "/401" => 401,
            "/403" => 403,
            "/404" => 404,
            _ => 200,
        };
        let mut r = http::Response::new(Full::new(Bytes::from_static(b"x")));
        *r.status_mut() = http::StatusCode::from_u16(code).unwrap();
        r
    }))
    .await;
    let hook = Arc::new(Failures::default());
    let stop = CancellationToken::new();
    let edge = Edge::start(
        EdgeConfig {
            https: Some("127.0.0.1:0".parse().unwrap()),
            upstream: Some(format!("http://{up}")),
            auth_failures: Some(hook.clone()),
            ..Default::default()
        },
        stop.clone(),
    )
    .await
    .expect("edge starts");
    let run = Running { edge, stop };
    run.edge
        .install(leaf("auth.edge.test", &["auth.edge.test"], 0, None))
        .await
        .unwrap();
    let tls = tls_connect(
        run.edge.https_addr().unwrap(),
        "auth.edge.test",
        client_config(&[b"http/1.1"], rustls::DEFAULT_VERSIONS, None),
    )
    .await
    .unwrap();
    let mut c = h1(tls).await;
    for (path, want) in [("/ok", 200), ("/401", 401), ("/404", 404), ("/403", 403)] {
        let (st, _, _) = send(&mut c, "GET", "auth.edge.test", path, "").await;
        assert_eq!(st, want);
    }
    let lo: std::net::IpAddr = "127.0.0.1".parse().unwrap();
    assert_eq!(*hook.0.lock(), vec![(lo, 401), (lo, 403)]);
    run.stop().await;
    up_stop.cancel();
}
