//! TLS for the controller's listeners: its own short-lived certificate from its CA, renewed
//! at 2/3 of its life, and a client verifier that checks the current CRL on every handshake.

use crate::authority::Authority;
use anyhow::{Context, Result};
use arc_swap::ArcSwap;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio_util::sync::CancellationToken;
use zonemesh_ca::TlsNames;

/// The process-wide crypto provider: aws-lc-rs.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The controller's own server certificate, swapped in place when renewed.
#[derive(Debug)]
pub struct ServerIdentity {
    current: ArcSwap<CertifiedKey>,
    not_after: ArcSwap<(SystemTime, SystemTime)>,
    names: TlsNames,
}

fn certified(chain: Vec<Vec<u8>>, key_pkcs8: Vec<u8>) -> Result<CertifiedKey> {
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_pkcs8));
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .context("loading TLS key")?;
    Ok(CertifiedKey::new(
        chain.into_iter().map(CertificateDer::from).collect(),
        signing,
    ))
}

impl ServerIdentity {
    /// Issue a first certificate for `names`.
    pub fn issue(auth: &Authority, names: TlsNames, now: SystemTime) -> Result<Arc<Self>> {
        let (ck, validity) = Self::fresh(auth, &names, now)?;
        Ok(Arc::new(Self {
            current: ArcSwap::from_pointee(ck),
            not_after: ArcSwap::from_pointee(validity),
            names,
        }))
    }

    fn fresh(
        auth: &Authority,
        names: &TlsNames,
        now: SystemTime,
    ) -> Result<(CertifiedKey, (SystemTime, SystemTime))> {
        let key = zonemesh_ca::generate_rsa_2048()?;
        let cert = auth.issue_tls_key(&key, names, None, now)?;
        let mut chain = vec![cert.der];
        chain.extend(auth.chain());
        // The root goes last so an enrolling agent can match it against its pinned fingerprint.
        chain.push(auth.ca().root_der().to_vec());
        Ok((
            certified(chain, key.serialize_der())?,
            (cert.not_before, cert.not_after),
        ))
    }

    /// When the current certificate should be replaced: 2/3 of its lifetime.
    pub fn renew_at(&self) -> SystemTime {
        let (nb, na) = **self.not_after.load();
        nb + na.duration_since(nb).unwrap_or_default() * 2 / 3
    }

    /// Renew at 2/3 of the lifetime until shutdown; a failed renewal is retried every minute.
    pub async fn renew_loop(self: Arc<Self>, auth: Arc<Authority>, shutdown: CancellationToken) {
        loop {
            let wait = self
                .renew_at()
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            let a = auth.clone();
            let names = self.names.clone();
            match tokio::task::spawn_blocking(move || Self::fresh(&a, &names, SystemTime::now()))
                .await
            {
                Ok(Ok((ck, validity))) => {
                    self.current.store(Arc::new(ck));
                    self.not_after.store(Arc::new(validity));
                    tracing::info!("controller TLS certificate renewed");
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "TLS certificate renewal failed; retrying in 60 s");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(60)) => {}
                    }
                }
                Err(e) => tracing::error!(error = %e, "TLS renewal task failed"),
            }
        }
    }

    /// The current chain (leaf first), for tests and status.
    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        self.current.load().cert.clone()
    }
}

impl ResolvesServerCert for ServerIdentity {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// Verifies client certificates against the CA roots and the current CRL. The CRL is
/// replaced in place after every revocation, so the next handshake already sees it.
#[derive(Debug)]
pub struct CrlClientVerifier {
    roots: Arc<RootCertStore>,
    inner: ArcSwap<Arc<dyn ClientCertVerifier>>,
}

impl CrlClientVerifier {
    /// A verifier for `roots_der` and the given CRL. Clients without a certificate may
    /// connect (enrollment), but the Mesh service refuses them.
    pub fn new(roots_der: &[Vec<u8>], crl_der: &[u8]) -> Result<Arc<Self>> {
        let mut roots = RootCertStore::empty();
        for r in roots_der {
            roots
                .add(CertificateDer::from(r.clone()))
                .context("adding CA root")?;
        }
        let roots = Arc::new(roots);
        let inner = Self::build(&roots, crl_der)?;
        Ok(Arc::new(Self {
            roots,
            inner: ArcSwap::from_pointee(inner),
        }))
    }

    fn build(roots: &Arc<RootCertStore>, crl_der: &[u8]) -> Result<Arc<dyn ClientCertVerifier>> {
        Ok(
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
                .with_crls([rustls::pki_types::CertificateRevocationListDer::from(
                    crl_der.to_vec(),
                )])
                .only_check_end_entity_revocation()
                .allow_unauthenticated()
                .build()?,
        )
    }

    /// Swap in a new CRL.
    pub fn update_crl(&self, crl_der: &[u8]) -> Result<()> {
        self.inner
            .store(Arc::new(Self::build(&self.roots, crl_der)?));
        Ok(())
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

/// A server config: TLS 1.3 and 1.2 only, and only rustls's forward-secret AEAD suites.
pub fn server_config(
    identity: Arc<ServerIdentity>,
    client_verifier: Option<Arc<CrlClientVerifier>>,
    alpn: &[&[u8]],
) -> Result<rustls::ServerConfig> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;
    let mut cfg = match client_verifier {
        Some(v) => builder
            .with_client_cert_verifier(v)
            .with_cert_resolver(identity),
        None => builder.with_no_client_auth().with_cert_resolver(identity),
    };
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(cfg)
}
