//! What a TLS server presents for a name: one full handshake with rustls (SNI set, OCSP
//! requested, no resumption), recording the chain and the stapled OCSP response without
//! judging them. Tests judge them with openssl; this is for polling ("does the edge serve
//! the new serial yet?") and for benchmarks.

use anyhow::{Context, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the server sent.
#[derive(Debug, Clone)]
pub struct Served {
    /// Leaf first.
    pub chain: Vec<Vec<u8>>,
    /// The stapled OCSP response (empty when none).
    pub ocsp: Vec<u8>,
    pub version: String,
}

impl Served {
    /// Serial of the leaf (lowercase hex of the DER integer).
    pub fn serial(&self) -> Result<String> {
        crate::cluster::cert_serial(self.chain.first().context("no certificate")?)
    }
}

#[derive(Debug)]
struct Recorder {
    ocsp: Mutex<Vec<u8>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for Recorder {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Ok(mut o) = self.ocsp.lock() {
            *o = ocsp_response.to_vec();
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A client configuration that records instead of verifying, without session resumption
/// (every handshake is a full one). Returns the recorder's OCSP slot too.
pub fn recording_config() -> (Arc<rustls::ClientConfig>, OcspSlot) {
    recording_config_with(rustls::crypto::aws_lc_rs::default_provider())
}

/// Reads the OCSP response the last handshake of a recording configuration received.
pub type OcspSlot = Arc<dyn Fn() -> Vec<u8> + Send + Sync>;

/// The same with X25519 as the only key exchange, so a server that also offers a
/// post-quantum hybrid does the same work as one that does not (handshake benchmarks).
pub fn x25519_config() -> Arc<rustls::ClientConfig> {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.kx_groups = vec![rustls::crypto::aws_lc_rs::kx_group::X25519];
    recording_config_with(provider).0
}

fn recording_config_with(
    provider: rustls::crypto::CryptoProvider,
) -> (Arc<rustls::ClientConfig>, OcspSlot) {
    let provider = Arc::new(provider);
    let rec = Arc::new(Recorder {
        ocsp: Mutex::new(Vec::new()),
        provider: provider.clone(),
    });
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(rec.clone())
        .with_no_client_auth();
    cfg.resumption = rustls::client::Resumption::disabled();
    cfg.enable_sni = true;
    let read = rec.clone();
    let ocsp = Arc::new(move || read.ocsp.lock().map(|o| o.clone()).unwrap_or_default());
    (Arc::new(cfg), ocsp)
}

/// One handshake with `addr` for `sni`.
pub fn fetch(addr: SocketAddr, sni: &str) -> Result<Served> {
    let (cfg, ocsp) = recording_config();
    let name = ServerName::try_from(sni.to_string())?;
    let mut conn = rustls::ClientConnection::new(cfg, name)?;
    let mut tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .with_context(|| format!("connect {addr}"))?;
    tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
    tcp.set_write_timeout(Some(Duration::from_secs(5)))?;
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp)
            .with_context(|| format!("TLS handshake with {addr} for {sni}"))?;
    }
    let chain = conn
        .peer_certificates()
        .context("no peer certificates")?
        .iter()
        .map(|c| c.to_vec())
        .collect();
    let version = format!("{:?}", conn.protocol_version());
    conn.send_close_notify();
    let _ = conn.complete_io(&mut tcp);
    Ok(Served {
        chain,
        ocsp: ocsp(),
        version,
    })
}

/// One HTTP/1.1 GET over TLS (certificate not checked: use curl where that matters);
/// returns the whole response, head and body.
pub fn get(addr: SocketAddr, sni: &str, path: &str) -> Result<String> {
    let (cfg, _) = recording_config();
    let name = ServerName::try_from(sni.to_string())?;
    let conn = rustls::ClientConnection::new(cfg, name)?;
    let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut s = rustls::StreamOwned::new(conn, tcp);
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Full handshakes per second against `addr` from `conc` concurrent clients for `dur`
/// (X25519, no resumption); returns the rate and the number of failed attempts.
pub async fn handshake_rate(
    addr: SocketAddr,
    sni: &'static str,
    conc: usize,
    dur: Duration,
) -> Result<(f64, u64)> {
    let connector = tokio_rustls::TlsConnector::from(x25519_config());
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let deadline = tokio::time::Instant::now() + dur;
    let mut tasks = tokio::task::JoinSet::new();
    let start = Instant::now();
    for _ in 0..conc {
        let (connector, ok, failed) = (connector.clone(), ok.clone(), failed.clone());
        tasks.spawn(async move {
            while tokio::time::Instant::now() < deadline {
                let name = rustls::pki_types::ServerName::try_from(sni).expect("name");
                let r = tokio::time::timeout(Duration::from_secs(5), async {
                    let tcp = tokio::net::TcpStream::connect(addr).await?;
                    tcp.set_nodelay(true)?;
                    connector.connect(name, tcp).await
                })
                .await;
                match r {
                    Ok(Ok(_)) => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let n = ok.load(Ordering::Relaxed);
    Ok((
        n as f64 / start.elapsed().as_secs_f64(),
        failed.load(Ordering::Relaxed),
    ))
}
