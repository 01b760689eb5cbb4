//! TLS and gRPC to the controller. Before enrollment the agent trusts exactly the CA whose
//! root has the pinned SHA-256 fingerprint; afterwards it uses mutual TLS with its node
//! certificate and the stored root.

use super::state::StateDir;
use anyhow::{Context, Result, bail};
use hyper_util::rt::TokioIo;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::sync::Arc;
use std::time::Duration;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Accepts the server only if its chain includes a root with the pinned fingerprint and the
/// leaf verifies to that root for the name we dialled.
#[derive(Debug)]
struct PinnedRoot {
    fingerprint: String,
}

impl PinnedRoot {
    fn root_for(
        &self,
        intermediates: &[CertificateDer<'_>],
    ) -> Result<Arc<WebPkiServerVerifier>, rustls::Error> {
        let root = intermediates
            .iter()
            .find(|c| zonemesh_ca::fingerprint_sha256(c) == self.fingerprint)
            .ok_or_else(|| {
                rustls::Error::General(
                    "the controller's CA does not match the pinned --ca-fingerprint".into(),
                )
            })?;
        let mut roots = RootCertStore::empty();
        roots
            .add(root.clone().into_owned())
            .map_err(|e| rustls::Error::General(format!("pinned root: {e}")))?;
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))
    }
}

impl ServerCertVerifier for PinnedRoot {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.root_for(intermediates)?.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp,
            now,
        )
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
            &provider().signature_verification_algorithms,
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
            &provider().signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn base_builder() -> Result<rustls::ConfigBuilder<rustls::ClientConfig, rustls::WantsVerifier>> {
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?)
}

/// TLS for enrollment: server-authenticated, root pinned by fingerprint.
pub fn pinned_config(fingerprint: &str) -> Result<rustls::ClientConfig> {
    let fp = fingerprint.trim().to_ascii_lowercase().replace(':', "");
    if fp.len() != 64 || !fp.chars().all(|c| c.is_ascii_hexdigit()) {
        bail!("--ca-fingerprint must be the 64 hex digits printed by `zonemesh-controller init`");
    }
    let mut cfg = base_builder()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedRoot { fingerprint: fp }))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// Mutual TLS with explicit material (used by the agent and by tests).
pub fn mtls_config_from(
    root_der: &[u8],
    cert_der: &[u8],
    chain: &[Vec<u8>],
    key_pkcs8: &[u8],
) -> Result<rustls::ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from(root_der.to_vec()))
        .context("CA root")?;
    let mut certs = vec![CertificateDer::from(cert_der.to_vec())];
    certs.extend(chain.iter().map(|c| CertificateDer::from(c.clone())));
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_pkcs8.to_vec()));
    let mut cfg = base_builder()?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// The node's client certificate for mutual TLS, swapped in place on renewal: every
/// handshake after the swap presents the new certificate, without rebuilding the TLS
/// configuration or reading files.
#[derive(Debug)]
pub struct NodeCertResolver {
    current: arc_swap::ArcSwap<rustls::sign::CertifiedKey>,
}

impl NodeCertResolver {
    /// A resolver presenting `cert_der` (then `chain`) signed with `key_pkcs8`.
    pub fn new(cert_der: &[u8], chain: &[Vec<u8>], key_pkcs8: &[u8]) -> Result<Self> {
        Ok(Self {
            current: arc_swap::ArcSwap::from(certified_key(cert_der, chain, key_pkcs8)?),
        })
    }

    /// Present this certificate (for the same key) from the next handshake on.
    pub fn swap_cert(&self, cert_der: &[u8], chain: &[Vec<u8>]) {
        let mut certs = vec![CertificateDer::from(cert_der.to_vec())];
        certs.extend(chain.iter().map(|c| CertificateDer::from(c.clone())));
        let key = self.current.load().key.clone();
        self.current
            .store(Arc::new(rustls::sign::CertifiedKey::new(certs, key)));
    }

    /// Present this certificate with a new key (after a key rotation) from the next
    /// handshake on.
    pub fn swap_identity(
        &self,
        cert_der: &[u8],
        chain: &[Vec<u8>],
        key_pkcs8: &[u8],
    ) -> Result<()> {
        self.current
            .store(certified_key(cert_der, chain, key_pkcs8)?);
        Ok(())
    }

    /// The certificate presented now (DER).
    pub fn current_cert(&self) -> Vec<u8> {
        self.current
            .load()
            .cert
            .first()
            .map(|c| c.to_vec())
            .unwrap_or_default()
    }
}

fn certified_key(
    cert_der: &[u8],
    chain: &[Vec<u8>],
    key_pkcs8: &[u8],
) -> Result<Arc<rustls::sign::CertifiedKey>> {
    let mut certs = vec![CertificateDer::from(cert_der.to_vec())];
    certs.extend(chain.iter().map(|c| CertificateDer::from(c.clone())));
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_pkcs8.to_vec()));
    let signer = provider()
        .key_provider
        .load_private_key(key)
        .context("loading the node key")?;
    Ok(Arc::new(rustls::sign::CertifiedKey::new(certs, signer)))
}

impl rustls::client::ResolvesClientCert for NodeCertResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.current.load_full())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

/// Mutual TLS whose client certificate comes from `resolver`, trusting `roots_der`.
pub fn mtls_config_with(
    roots_der: &[Vec<u8>],
    resolver: Arc<NodeCertResolver>,
) -> Result<rustls::ClientConfig> {
    let mut roots = RootCertStore::empty();
    for r in roots_der {
        roots
            .add(CertificateDer::from(r.clone()))
            .context("CA root")?;
    }
    let mut cfg = base_builder()?
        .with_root_certificates(roots)
        .with_client_cert_resolver(resolver);
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    // The certificate changes on renewal; a resumed session would present the old one.
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(cfg)
}

/// Mutual TLS with the node's stored certificate and key.
pub fn mtls_config(state: &StateDir) -> Result<rustls::ClientConfig> {
    mtls_config_from(
        &state.read_ca()?,
        &state.read_cert()?,
        &state.read_chain()?,
        &state.read_node_key()?,
    )
}

/// Open a gRPC channel to `host:port` over the given TLS config.
pub async fn connect(controller: &str, tls: rustls::ClientConfig) -> Result<Channel> {
    let (endpoint, connector) = endpoint(controller, tls)?;
    let channel = endpoint
        .connect_with_connector(connector)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot connect to the controller at {controller}: {}",
                error_chain(&e)
            )
        })?;
    Ok(channel)
}

/// Open a gRPC channel to the first of `controllers` that answers, in order; the address
/// connected to comes with it. The error names every address tried.
pub async fn connect_first(
    controllers: &[String],
    tls: rustls::ClientConfig,
) -> Result<(Channel, String)> {
    let mut errors = Vec::new();
    for c in controllers {
        match connect(c, tls.clone()).await {
            Ok(ch) => return Ok((ch, c.clone())),
            Err(e) => {
                tracing::warn!(controller = %c, error = %e, "trying the next controller");
                errors.push(e.to_string());
            }
        }
    }
    bail!("no controller answered: {}", errors.join("; "))
}

/// A gRPC channel to `host:port` that connects on first use and reconnects by itself
/// after the connection is lost; meant to be kept for the life of the agent.
pub fn connect_lazy(controller: &str, tls: rustls::ClientConfig) -> Result<Channel> {
    let (endpoint, connector) = endpoint(controller, tls)?;
    Ok(endpoint.connect_with_connector_lazy(connector))
}

/// Check that `controller` is an address [`connect_lazy`] accepts (HOST:PORT with a valid
/// server name), without connecting.
pub fn check_address(controller: &str, tls: rustls::ClientConfig) -> Result<()> {
    endpoint(controller, tls).map(drop)
}

/// Dials the controller: TCP, then TLS for the name it was given.
#[derive(Clone)]
struct Dial {
    tls: TlsConnector,
    server_name: ServerName<'static>,
    addr: String,
}

type DialFuture = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = std::io::Result<
                    TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
                >,
            > + Send,
    >,
>;

impl tower::Service<http::Uri> for Dial {
    type Response = TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;
    type Error = std::io::Error;
    type Future = DialFuture;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: http::Uri) -> Self::Future {
        let d = self.clone();
        Box::pin(async move {
            let tcp = tokio::net::TcpStream::connect(&d.addr).await?;
            tcp.set_nodelay(true)?;
            let tls = d.tls.connect(d.server_name, tcp).await?;
            Ok(TokioIo::new(tls))
        })
    }
}

fn endpoint(controller: &str, tls: rustls::ClientConfig) -> Result<(Endpoint, Dial)> {
    let (host, _) = controller
        .rsplit_once(':')
        .with_context(|| format!("--controller {controller:?} must be HOST:PORT"))?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let server_name = ServerName::try_from(host.clone())
        .with_context(|| format!("{host:?} is not a valid server name"))?;
    let connector = TlsConnector::from(Arc::new(tls));
    let addr = controller.to_string();
    let endpoint = Endpoint::from_shared(format!("http://{controller}"))?
        .connect_timeout(Duration::from_secs(10))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20));
    Ok((
        endpoint,
        Dial {
            tls: connector,
            server_name,
            addr,
        },
    ))
}

/// All causes of an error on one line (TLS failures hide in the sources).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        let t = s.to_string();
        if !parts.contains(&t) {
            parts.push(t);
        }
        cur = s.source();
    }
    parts.join(": ")
}

/// A tonic status as the operator should read it.
pub fn status_message(s: &tonic::Status) -> String {
    use std::error::Error;
    match s.source() {
        Some(src)
            if s.message().is_empty()
                || s.code() == tonic::Code::Unknown
                || s.code() == tonic::Code::Unavailable =>
        {
            format!("{}: {}", s.message(), error_chain(src))
        }
        _ => s.message().to_string(),
    }
}
