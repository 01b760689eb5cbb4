//! TLS for the gRPC listener: a client verifier that checks the current CRL on every
//! handshake, and the server configuration serving the controller's own certificate
//! through the same renewing [`CertSource`] as the HTTPS side.

use super::{CertSource, provider};
use arc_swap::ArcSwap;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use std::sync::Arc;

/// Why the controller's TLS plumbing could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error(transparent)]
    Ca(#[from] zonemesh_ca::Error),
    #[error(transparent)]
    Issue(#[from] Box<crate::error::ControllerError>),
    #[error("adding CA root: {0}")]
    Root(#[source] rustls::Error),
    #[error(transparent)]
    Rustls(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

type Result<T, E = TlsSetupError> = std::result::Result<T, E>;

/// Verifies client certificates against the trusted CA roots and the current CRLs (one per
/// trusted intermediate). Both are replaced in place after every revocation and every CA
/// rotation or retirement, so the next handshake already sees them.
#[derive(Debug)]
pub struct CrlClientVerifier {
    inner: ArcSwap<Arc<dyn ClientCertVerifier>>,
}

impl CrlClientVerifier {
    /// A verifier for `roots_der` and the given CRLs. Clients without a certificate may
    /// connect (enrollment), but the Mesh service refuses them.
    pub fn new(roots_der: &[Vec<u8>], crls_der: &[Vec<u8>]) -> Result<Arc<Self>> {
        let inner = Self::build(roots_der, crls_der)?;
        Ok(Arc::new(Self {
            inner: ArcSwap::from_pointee(inner),
        }))
    }

    fn build(roots_der: &[Vec<u8>], crls_der: &[Vec<u8>]) -> Result<Arc<dyn ClientCertVerifier>> {
        let mut roots = RootCertStore::empty();
        for r in roots_der {
            roots
                .add(CertificateDer::from(r.clone()))
                .map_err(TlsSetupError::Root)?;
        }
        Ok(
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .with_crls(
                    crls_der
                        .iter()
                        .map(|c| rustls::pki_types::CertificateRevocationListDer::from(c.clone())),
                )
                .only_check_end_entity_revocation()
                .allow_unauthenticated()
                .build()?,
        )
    }

    /// Swap in new roots and CRLs.
    pub fn update(&self, roots_der: &[Vec<u8>], crls_der: &[Vec<u8>]) -> Result<()> {
        self.inner
            .store(Arc::new(Self::build(roots_der, crls_der)?));
        Ok(())
    }
}

impl crate::core::mesh::CrlListener for CrlClientVerifier {
    fn crl_changed(
        &self,
        roots: &[Vec<u8>],
        crls: &[Vec<u8>],
    ) -> std::result::Result<(), crate::core::mesh::CrlListenerError> {
        Ok(self.update(roots, crls)?)
    }
}

impl ClientCertVerifier for CrlClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }
    fn client_auth_mandatory(&self) -> bool {
        false
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .load()
            .verify_client_cert(end_entity, intermediates, now)
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.load().verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.load().verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.load().supported_verify_schemes()
    }
}

/// The gRPC server config: TLS 1.3 and 1.2 only, forward-secret AEAD suites only, client
/// certificates checked against the CA and the current CRL, ALPN h2.
pub fn grpc_server_config(
    certs: Arc<CertSource>,
    client_verifier: Arc<CrlClientVerifier>,
) -> Result<rustls::ServerConfig> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_client_cert_verifier(client_verifier)
        .with_cert_resolver(certs);
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    // No resumption: a resumed session carries the client certificate of the session it
    // resumes, so a node that renewed (its old serial revoked as superseded) or was revoked
    // would be identified by a stale certificate. Every connection gets a full handshake
    // with the CRL check.
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    Ok(cfg)
}
