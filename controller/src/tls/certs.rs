//! The controller's own server certificates: what the CA hands out ([`IssuedTls`]) and a
//! source that serves the current one and renews it at 2/3 of its life ([`CertSource`]).
//! Both the HTTPS and the gRPC listener serve through one.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_util::sync::CancellationToken;

use super::{TlsSetupError, provider};
use crate::core::authority::Authority;
use zonemesh_ca::TlsNames;

/// Errors of the controller's TLS listeners and certificates.
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
        self.renew_loop_with(issue, None, shutdown).await
    }

    /// [`Self::renew_loop`], also renewing at once whenever `reissue` changes (the CA
    /// rotated: the new certificate comes from the new intermediate).
    pub async fn renew_loop_with<F, E>(
        self: Arc<Self>,
        issue: F,
        mut reissue: Option<tokio::sync::watch::Receiver<u64>>,
        shutdown: CancellationToken,
    ) where
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
            let rotated = async {
                match reissue.as_mut() {
                    Some(r) => {
                        if r.changed().await.is_err() {
                            std::future::pending::<()>().await;
                        }
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
                _ = rotated => {}
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

/// Issue the controller's own TLS certificate from its CA (recorded like every other
/// serial). The chain ends with the trusted roots so an enrolling agent can match one
/// against its pinned fingerprint; while a new root is cross-signed by the old one, the
/// cross-signature comes before them, so an agent that still trusts only the old root
/// verifies the chain through it.
pub fn issue_own(
    auth: &Authority,
    names: &TlsNames,
    now: SystemTime,
) -> Result<IssuedTls, TlsSetupError> {
    let key = zonemesh_ca::generate_rsa_2048()?;
    let cert = auth
        .issue_tls_key(&key, names, None, now)
        .map_err(Box::new)?;
    let mut chain = vec![cert.der];
    chain.extend(auth.chain());
    chain.extend(auth.cross_signatures());
    chain.extend(auth.trusted_roots());
    Ok(IssuedTls {
        chain_der: chain,
        key_pkcs8: zeroize::Zeroizing::new(key.serialize_der()),
        not_after: cert.not_after,
    })
}
