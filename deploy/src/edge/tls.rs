//! TLS of the edge: the protocol policy (TLS 1.2 and 1.3, forward-secret AEAD suites
//! only), the SNI resolver over an atomically swapped map, the checks a bundle passes
//! before it is served, and the probe that asks our own listener what it serves.

use super::EdgeError;
use crate::CertBundle;
use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::crypto::aws_lc_rs::cipher_suite as cs;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use x509_parser::prelude::{FromDer, X509Certificate};

/// Clock skew allowed on a certificate's notBefore.
const SKEW: Duration = Duration::from_secs(300);

/// The cipher suites the edge offers: ECDHE key exchange (TLS 1.3 always is) with an AEAD.
pub fn cipher_suites() -> Vec<rustls::SupportedCipherSuite> {
    vec![
        cs::TLS13_AES_128_GCM_SHA256,
        cs::TLS13_AES_256_GCM_SHA384,
        cs::TLS13_CHACHA20_POLY1305_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        cs::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
    ]
}

/// The edge's crypto provider: aws-lc-rs restricted to [`cipher_suites`].
pub fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::aws_lc_rs::default_provider();
    p.cipher_suites = cipher_suites();
    Arc::new(p)
}

/// The certificate served for each name; swapped whole, so a handshake sees one state
/// and connections already open are never touched.
#[derive(Debug, Default)]
pub(crate) struct SniMap {
    pub(crate) map: ArcSwap<HashMap<String, Arc<CertifiedKey>>>,
}

impl ResolvesServerCert for SniMap {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // No SNI, or a name we hold no certificate for: the handshake is refused.
        let name = hello.server_name()?;
        let map = self.map.load();
        match map.get(name) {
            Some(k) => Some(k.clone()),
            None if name.bytes().any(|b| b.is_ascii_uppercase()) => {
                map.get(&name.to_ascii_lowercase()).cloned()
            }
            None => None,
        }
    }
}

/// The HTTPS listener's server configuration.
pub(crate) fn server_config(sni: Arc<SniMap>) -> Result<rustls::ServerConfig, EdgeError> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| EdgeError::Config(format!("TLS: {e}")))?
        .with_no_client_auth()
        .with_cert_resolver(sni);
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    cfg.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()
        .map_err(|e| EdgeError::Config(format!("TLS session tickets: {e}")))?;
    cfg.session_storage = rustls::server::ServerSessionMemoryCache::new(4096);
    Ok(cfg)
}

/// A bundle that passed every check, ready to serve.
pub(crate) struct Checked {
    pub(crate) chain: Vec<CertificateDer<'static>>,
    pub(crate) key: Arc<dyn rustls::sign::SigningKey>,
    pub(crate) serial_hex: String,
    pub(crate) not_after_unix: u64,
}

fn refuse(domain: &str, reason: impl Into<String>) -> EdgeError {
    EdgeError::BadBundle {
        domain: domain.into(),
        reason: reason.into(),
    }
}

/// Check `b` at `now`: a valid domain name, a chain that parses, a leaf valid now and for
/// the domain, signed by the next certificate of the chain, and a key that is the leaf's.
/// Blocking (parses a private key, verifies a signature).
pub(crate) fn check_bundle(b: &CertBundle, now: SystemTime) -> Result<Checked, EdgeError> {
    let d = b.domain.as_str();
    if !crate::files::is_valid_domain(d) {
        return Err(refuse(d, "not a valid DNS name"));
    }
    if b.chain_der.is_empty() {
        return Err(refuse(d, "empty certificate chain"));
    }
    let mut parsed = Vec::with_capacity(b.chain_der.len());
    for (i, der) in b.chain_der.iter().enumerate() {
        match X509Certificate::from_der(der) {
            Ok(([], c)) => parsed.push(c),
            Ok(_) => return Err(refuse(d, format!("certificate {i}: trailing data"))),
            Err(e) => return Err(refuse(d, format!("certificate {i}: {e}"))),
        }
    }
    let leaf = &parsed[0];
    let t = zonemesh_ca::unix_secs(now) as i64;
    let v = leaf.validity();
    if v.not_after.timestamp() <= t {
        return Err(refuse(d, "the certificate has expired"));
    }
    if v.not_before.timestamp() > t + SKEW.as_secs() as i64 {
        return Err(refuse(d, "the certificate is not valid yet"));
    }
    let serial_hex = zonemesh_ca::serial_hex(leaf.raw_serial());
    if !b.serial_hex.is_empty() && b.serial_hex != serial_hex {
        return Err(refuse(
            d,
            format!(
                "serial {} announced, the certificate has {serial_hex}",
                b.serial_hex
            ),
        ));
    }
    let leaf_der = CertificateDer::from(b.chain_der[0].as_slice());
    let ee = webpki::EndEntityCert::try_from(&leaf_der)
        .map_err(|e| refuse(d, format!("certificate: {e}")))?;
    let name = ServerName::try_from(d).map_err(|e| refuse(d, e.to_string()))?;
    ee.verify_is_valid_for_subject_name(&name)
        .map_err(|_| refuse(d, "the certificate is not valid for this name"))?;
    if let Some(issuer) = parsed.get(1) {
        leaf.verify_signature(Some(issuer.public_key()))
            .map_err(|_| {
                refuse(
                    d,
                    "the leaf is not signed by the next certificate of the chain",
                )
            })?;
    }
    let chain: Vec<CertificateDer<'static>> = b
        .chain_der
        .iter()
        .map(|c| CertificateDer::from(c.clone()))
        .collect();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(b.key_pkcs8_der.to_vec()));
    let provider = provider();
    let ck = CertifiedKey::from_der(chain.clone(), key, &provider)
        .map_err(|e| refuse(d, format!("private key: {e}")))?;
    Ok(Checked {
        chain,
        key: ck.key,
        serial_hex,
        not_after_unix: v.not_after.timestamp().max(0) as u64,
    })
}

/// What a handshake with our own listener showed for a name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Served {
    /// The leaf's serial, lower-case hex.
    pub serial_hex: String,
    /// The OCSP response stapled in the handshake, if any.
    pub staple: Option<Vec<u8>>,
    /// The negotiated protocol version, e.g. `TLSv1_3`.
    pub protocol: String,
}

/// Accepts whatever our own listener presents (the probe asks what is served, not whether
/// it is trusted) but still checks the handshake signature, so the key must match.
#[derive(Debug)]
struct AnyServer {
    provider: Arc<CryptoProvider>,
    staple: parking_lot::Mutex<Option<Vec<u8>>>,
}

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        *self.staple.lock() = (!ocsp.is_empty()).then(|| ocsp.to_vec());
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
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
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Hold a handshake with `addr` for `domain` and report what it served.
pub(crate) async fn probe(
    addr: std::net::SocketAddr,
    domain: &str,
    timeout: Duration,
) -> Result<Served, EdgeError> {
    let fail = |reason: String| EdgeError::Probe {
        domain: domain.into(),
        reason,
    };
    let provider = provider();
    let verifier = Arc::new(AnyServer {
        provider: provider.clone(),
        staple: parking_lot::Mutex::new(None),
    });
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| fail(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_no_client_auth();
    let name = ServerName::try_from(domain.to_string()).map_err(|e| fail(e.to_string()))?;
    let work = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| fail(format!("connecting to {addr}: {e}")))?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await
            .map_err(|e| fail(format!("handshake: {e}")))?;
        let (_, conn) = tls.get_ref();
        let leaf = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .ok_or_else(|| fail("no certificate presented".into()))?;
        let (_, cert) = X509Certificate::from_der(leaf)
            .map_err(|e| fail(format!("served certificate: {e}")))?;
        Ok(Served {
            serial_hex: zonemesh_ca::serial_hex(cert.raw_serial()),
            staple: verifier.staple.lock().take(),
            protocol: conn
                .protocol_version()
                .map(|v| format!("{v:?}"))
                .unwrap_or_default(),
        })
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| fail(format!("no handshake within {timeout:?}")))?
}
