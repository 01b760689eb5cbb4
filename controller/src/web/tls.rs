//! The HTTPS listener: rustls with TLS 1.2/1.3 and forward-secret AEAD suites only, a
//! certificate that renews itself at 2/3 of its life, and hyper serving the axum router.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::crypto::aws_lc_rs::cipher_suite as cs;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::listen::{GuardedIo, GuardedListener, HttpOptions};

/// Errors of the HTTPS listener.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("certificate: {0}")]
    Certificate(String),
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
}

/// A certificate chain and key as the CA hands them out.
#[derive(Clone)]
pub struct IssuedTls {
    /// Leaf first, then the intermediate, DER.
    pub chain_der: Vec<Vec<u8>>,
    /// The leaf's private key, PKCS#8 DER.
    pub key_pkcs8: zeroize::Zeroizing<Vec<u8>>,
    /// The leaf's expiry.
    pub not_after: SystemTime,
}

impl From<(Vec<Vec<u8>>, Vec<u8>, SystemTime)> for IssuedTls {
    /// From (chain DER leaf first, PKCS#8 key, not after).
    fn from((chain_der, key, not_after): (Vec<Vec<u8>>, Vec<u8>, SystemTime)) -> Self {
        Self {
            chain_der,
            key_pkcs8: zeroize::Zeroizing::new(key),
            not_after,
        }
    }
}

/// An issuing closure for [`CertSource::renew_loop`]: a fresh RSA-2048 key and a TLS
/// certificate from the controller's CA for `names`, chained to the intermediate.
pub fn ca_issuer(
    ca: Arc<zonemesh_ca::Ca>,
    policy: zonemesh_ca::TlsPolicy,
    names: zonemesh_ca::TlsNames,
    lifetime: Option<Duration>,
) -> impl Fn(SystemTime) -> Result<IssuedTls, zonemesh_ca::Error> + Send + Sync + 'static {
    move |now| {
        let key = zonemesh_ca::generate_rsa_2048()?;
        let cert = ca.issue_tls(&policy, &key, &names, lifetime, now)?;
        Ok(IssuedTls {
            chain_der: vec![cert.der, ca.intermediate_der().to_vec()],
            key_pkcs8: zeroize::Zeroizing::new(key.serialize_der()),
            not_after: cert.not_after,
        })
    }
}

/// The cipher suites offered: TLS 1.3's AEAD suites and, for TLS 1.2, ECDHE with AES-GCM
/// or ChaCha20-Poly1305 only. No static RSA key exchange, no CBC, nothing without
/// forward secrecy.
pub fn cipher_suites() -> Vec<rustls::SupportedCipherSuite> {
    vec![
        cs::TLS13_AES_256_GCM_SHA384,
        cs::TLS13_AES_128_GCM_SHA256,
        cs::TLS13_CHACHA20_POLY1305_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        cs::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
    ]
}

fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::aws_lc_rs::default_provider();
    p.cipher_suites = cipher_suites();
    Arc::new(p)
}

/// The rustls server configuration of the admin listener.
pub fn server_config(certs: Arc<CertSource>) -> Result<rustls::ServerConfig, TlsError> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(certs);
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    cfg.ignore_client_order = true;
    Ok(cfg)
}

#[derive(Clone, Copy, Debug)]
struct Lifetime {
    issued_at: SystemTime,
    not_after: SystemTime,
}

/// The listener's current certificate, swapped atomically when renewed.
pub struct CertSource {
    current: ArcSwap<CertifiedKey>,
    lifetime: Mutex<Lifetime>,
    provider: Arc<CryptoProvider>,
}

impl std::fmt::Debug for CertSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertSource")
            .field("lifetime", &self.lifetime())
            .finish()
    }
}

impl CertSource {
    fn certified_key(
        provider: &CryptoProvider,
        issued: &IssuedTls,
    ) -> Result<CertifiedKey, TlsError> {
        if issued.chain_der.is_empty() {
            return Err(TlsError::Certificate("empty certificate chain".into()));
        }
        let chain: Vec<CertificateDer<'static>> = issued
            .chain_der
            .iter()
            .map(|d| CertificateDer::from(d.clone()))
            .collect();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(issued.key_pkcs8.to_vec()));
        let signing = provider.key_provider.load_private_key(key)?;
        let ck = CertifiedKey::new(chain, signing);
        // Never serve a certificate whose key we do not hold.
        ck.keys_match()?;
        Ok(ck)
    }

    /// A source serving `issued`, issued at `now`.
    pub fn new(issued: &IssuedTls, now: SystemTime) -> Result<Self, TlsError> {
        let provider = provider();
        let ck = Self::certified_key(&provider, issued)?;
        Ok(Self {
            current: ArcSwap::from_pointee(ck),
            lifetime: Mutex::new(Lifetime {
                issued_at: now,
                not_after: issued.not_after,
            }),
            provider,
        })
    }

    /// Swap in a renewed certificate after checking it: key matches, not expired.
    pub fn replace(&self, issued: &IssuedTls, now: SystemTime) -> Result<(), TlsError> {
        if issued.not_after <= now {
            return Err(TlsError::Certificate(
                "renewed certificate is already expired".into(),
            ));
        }
        let ck = Self::certified_key(&self.provider, issued)?;
        self.current.store(Arc::new(ck));
        *self.lifetime.lock().unwrap_or_else(|p| p.into_inner()) = Lifetime {
            issued_at: now,
            not_after: issued.not_after,
        };
        Ok(())
    }

    /// (issued at, not after) of the certificate being served.
    pub fn lifetime(&self) -> (SystemTime, SystemTime) {
        let l = *self.lifetime.lock().unwrap_or_else(|p| p.into_inner());
        (l.issued_at, l.not_after)
    }

    /// The leaf being served, DER.
    pub fn leaf_der(&self) -> Vec<u8> {
        self.current
            .load()
            .cert
            .first()
            .map(|c| c.to_vec())
            .unwrap_or_default()
    }

    /// When to renew: zonemesh's one schedule ([`zonemesh_ca::renew_at`]: 2/3 of the way
    /// through the lifetime, minus up to 1/20 of it as jitter).
    pub fn renew_at(&self, jitter_fraction: f64) -> SystemTime {
        let (start, end) = self.lifetime();
        zonemesh_ca::renew_at(start, end, jitter_fraction)
    }

    /// Renew the certificate at 2/3 of its life until `shutdown`. `issue(now)` makes a new
    /// chain and key (the controller passes a closure calling `Ca::issue_tls` with a fresh
    /// RSA-2048 key); it runs on the blocking pool. Failures are retried, never fatal while
    /// the current certificate is still valid.
    pub async fn renew_loop<F, E>(self: Arc<Self>, issue: F, shutdown: CancellationToken)
    where
        F: Fn(SystemTime) -> Result<IssuedTls, E> + Send + Sync + 'static,
        E: std::fmt::Display + Send + 'static,
    {
        let issue = Arc::new(issue);
        loop {
            let now = SystemTime::now();
            let wait = self
                .renew_at(rand::random::<f64>())
                .duration_since(now)
                .unwrap_or_default();
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            let f = Arc::clone(&issue);
            let now = SystemTime::now();
            let result =
                tokio::task::spawn_blocking(move || f(now).map_err(|e| e.to_string())).await;
            let outcome = match result {
                Ok(Ok(issued)) => self.replace(&issued, now).map_err(|e| e.to_string()),
                Ok(Err(e)) => Err(e),
                Err(e) => Err(format!("renewal task: {e}")),
            };
            match outcome {
                Ok(()) => {
                    let (_, not_after) = self.lifetime();
                    tracing::info!(expires = %crate::audit::format_utc(ms(not_after)), "HTTPS certificate renewed");
                }
                Err(e) => {
                    let (_, not_after) = self.lifetime();
                    let left = not_after
                        .duration_since(SystemTime::now())
                        .unwrap_or_default();
                    let retry = (left / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
                    tracing::warn!(error = %e, retry_in_s = retry.as_secs(), "HTTPS certificate renewal failed");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(retry) => {}
                    }
                }
            }
        }
    }
}

fn ms(t: SystemTime) -> u64 {
    zonemesh_ca::unix_millis(t)
}

impl ResolvesServerCert for CertSource {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serve `app` over TLS on `listener` until `shutdown`: stop accepting, let open
/// connections finish (up to 10 s), then return. Handlers see the peer address as
/// `ConnectInfo<SocketAddr>`. A plain `TcpListener` gets default limits; `serve` passes a
/// [`GuardedListener`] sized from the file-descriptor limit.
pub async fn serve_https(
    listener: impl Into<GuardedListener>,
    app: axum::Router,
    certs: Arc<CertSource>,
    shutdown: CancellationToken,
) -> Result<(), TlsError> {
    let mut listener = listener.into();
    let acceptor = TlsAcceptor::from(Arc::new(server_config(certs)?));
    let mut conns = JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        let (io, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            c = listener.accept() => c,
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        let stop = shutdown.clone();
        conns.spawn(serve_connection(acceptor, io, peer, app, stop));
    }
    drop(listener);
    crate::listen::drain(conns).await;
    Ok(())
}

async fn serve_connection(
    acceptor: TlsAcceptor,
    tcp: GuardedIo<tokio::net::TcpStream>,
    peer: SocketAddr,
    app: axum::Router,
    stop: CancellationToken,
) {
    let activity = tcp.activity();
    let tls = tokio::select! {
        _ = stop.cancelled() => return,
        r = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)) => match r {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                tracing::debug!(peer = %peer, error = %e, "TLS handshake refused");
                return;
            }
            Err(_) => return,
        },
    };
    let opts = HttpOptions {
        h2_only: false,
        max_concurrent_streams: 64,
        keep_alive: Duration::from_secs(30),
    };
    let ext = axum::extract::ConnectInfo(peer);
    if let Err(e) = crate::listen::serve_connection(tls, app, ext, activity, opts, stop).await {
        tracing::debug!(peer = %peer, error = %e, "HTTPS connection ended with an error");
    }
}
