//! The ACME issuer (RFC 8555, HTTP-01), controller side.
//!
//! One account per controller: created on first use with the operator's contact, its
//! credentials handed back to the caller to seal and store, and loaded from them after.
//! One order per domain. The HTTP-01 response is published by the caller (the controller
//! hands it to the domain's edges) through a [`ChallengeResponder`], which resolves once an
//! edge holds it; only then is the ACME server told the challenge is ready. The order is
//! polled with backoff under a deadline, finalized with a CSR for a fresh RSA-2048 key,
//! and its chain downloaded. A refusal carries the ACME server's own problem type and
//! detail, verbatim, so the operator sees why validation failed.

use crate::bundle::CertBundle;
use bytes::Bytes;
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, BodyWrapper, ChallengeType, HttpClient,
    Identifier, NewAccount, NewOrder, Order, OrderStatus, Problem, RetryPolicy,
};
use rustls_pki_types::CertificateDer;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use zeroize::Zeroizing;

/// Why an ACME certificate was not issued.
#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    /// The ACME server refused a request; its problem document, as it sent it.
    #[error("ACME server refused: {0}")]
    Server(String),
    /// Validation of the domain failed; the ACME server's reason, as it sent it.
    #[error("ACME validation of {domain} failed: {reason}")]
    Validation { domain: String, reason: String },
    /// No edge took the HTTP-01 response in time.
    #[error("HTTP-01 challenge for {domain} not published: {reason}")]
    Publish { domain: String, reason: String },
    /// The ACME server did not answer in time.
    #[error("ACME order for {domain} did not complete within {secs} s")]
    Timeout { domain: String, secs: u64 },
    /// Transport or protocol failure talking to the ACME server.
    #[error("ACME protocol: {0}")]
    Protocol(#[source] instant_acme::Error),
    /// The TLS setup for the ACME server (roots) failed.
    #[error("ACME client TLS setup: {0}")]
    Tls(#[from] rustls::Error),
    /// The stored account credentials could not be read.
    #[error("stored ACME account: {0}")]
    Credentials(#[source] serde_json::Error),
    /// What the server issued is not a usable certificate for the domain.
    #[error("certificate from the ACME server: {0}")]
    BadCertificate(String),
    /// Key or CSR generation.
    #[error("key for the ACME order: {0}")]
    Key(String),
}

impl From<instant_acme::Error> for AcmeError {
    fn from(e: instant_acme::Error) -> Self {
        match e {
            instant_acme::Error::Api(p) => AcmeError::Server(problem_text(&p)),
            other => AcmeError::Protocol(other),
        }
    }
}

/// An ACME problem as the operator sees it: `type: detail`, then any subproblems.
pub fn problem_text(p: &Problem) -> String {
    let mut s = match (&p.r#type, &p.detail) {
        (Some(t), Some(d)) => format!("{t}: {d}"),
        (Some(t), None) => t.clone(),
        (None, Some(d)) => d.clone(),
        (None, None) => "no detail given".to_string(),
    };
    for sub in &p.subproblems {
        s.push_str("; ");
        if let Some(t) = &sub.r#type {
            s.push_str(t);
            s.push_str(": ");
        }
        s.push_str(sub.detail.as_deref().unwrap_or(""));
    }
    s
}

/// Where the ACME server is and how to reach it (`serve --acme-*`).
#[derive(Clone, Debug)]
pub struct AcmeConfig {
    /// The directory URL (`--acme-directory`).
    pub directory_url: String,
    /// Roots trusted for the ACME server's HTTPS besides the system's (`--acme-root`).
    pub extra_roots: Vec<CertificateDer<'static>>,
    /// The account's contact (`--acme-email`), without `mailto:`.
    pub contact_email: Option<String>,
    /// Longest time one order may take, from creation to the downloaded chain.
    pub order_timeout: Duration,
    /// Longest time an edge may take to hold the HTTP-01 response.
    pub publish_timeout: Duration,
}

impl AcmeConfig {
    /// A configuration with the default deadlines (order 3 min, publish 10 s).
    pub fn new(directory_url: impl Into<String>) -> Self {
        Self {
            directory_url: directory_url.into(),
            extra_roots: Vec::new(),
            contact_email: None,
            order_timeout: Duration::from_secs(180),
            publish_timeout: Duration::from_secs(10),
        }
    }
}

/// One HTTP-01 response to publish: the edges answer
/// `GET /.well-known/acme-challenge/<token>` for `domain` with `key_authorization`.
#[derive(Clone, PartialEq, Eq)]
pub struct Http01 {
    pub domain: String,
    pub token: String,
    pub key_authorization: String,
}

impl std::fmt::Debug for Http01 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Http01")
            .field("domain", &self.domain)
            .finish_non_exhaustive()
    }
}

/// What the caller does for an order: publish and withdraw HTTP-01 responses, and
/// remember the order's URL so a restarted controller can resume it.
pub trait ChallengeResponder: Send + Sync {
    /// Hand `challenge` to the edges; resolve once at least one holds it (or fail with
    /// the reason). Bounded by [`AcmeConfig::publish_timeout`].
    fn publish(&self, challenge: &Http01) -> impl Future<Output = Result<(), String>> + Send;
    /// The response is no longer needed (validated or failed).
    fn withdraw(&self, challenge: &Http01) -> impl Future<Output = ()> + Send;
    /// The ACME server created (or resumed) the order at `url`.
    fn order_started(&self, url: &str) -> impl Future<Output = ()> + Send;
}

/// An ACME account, ready to order certificates. Cheap to clone.
#[derive(Clone)]
pub struct AcmeIssuer {
    account: Account,
    cfg: Arc<AcmeConfig>,
}

impl std::fmt::Debug for AcmeIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcmeIssuer")
            .field("directory", &self.cfg.directory_url)
            .field("account", &self.account.id())
            .finish()
    }
}

/// The HTTP client for the ACME server: rustls with the system's roots plus the extra
/// ones, HTTPS only, connect timeout.
fn http_client(cfg: &AcmeConfig) -> Result<Box<dyn HttpClient>, AcmeError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier = rustls_platform_verifier::Verifier::new_with_extra_roots(
        cfg.extra_roots.iter().cloned(),
        provider.clone(),
    )?;
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.set_connect_timeout(Some(Duration::from_secs(10)));
    http.enforce_http(false);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build::<_, BodyWrapper<Bytes>>(https);
    Ok(Box::new(client))
}

/// The directory URL stored credentials were made for.
fn credentials_directory(stored: &[u8]) -> Option<String> {
    serde_json::from_slice::<serde_json::Value>(stored)
        .ok()?
        .get("directory")?
        .as_str()
        .map(str::to_string)
}

impl AcmeIssuer {
    /// Load the account from `stored` credentials (made for the same directory), or
    /// create one. Returns the issuer and, when an account was created, its credentials
    /// (JSON with the account key: seal before storing).
    ///
    /// # Errors
    /// The server unreachable or refusing the account.
    pub async fn connect(
        cfg: AcmeConfig,
        stored: Option<&[u8]>,
    ) -> Result<(Self, Option<Zeroizing<Vec<u8>>>), AcmeError> {
        let cfg = Arc::new(cfg);
        let call = tokio::time::timeout(cfg.order_timeout, Self::connect_inner(&cfg, stored));
        let (account, created) = call.await.map_err(|_| AcmeError::Timeout {
            domain: "the account".into(),
            secs: cfg.order_timeout.as_secs(),
        })??;
        Ok((Self { account, cfg }, created))
    }

    async fn connect_inner(
        cfg: &AcmeConfig,
        stored: Option<&[u8]>,
    ) -> Result<(Account, Option<Zeroizing<Vec<u8>>>), AcmeError> {
        if let Some(stored) = stored
            && credentials_directory(stored).as_deref() == Some(cfg.directory_url.as_str())
        {
            let creds: AccountCredentials =
                serde_json::from_slice(stored).map_err(AcmeError::Credentials)?;
            let account = Account::builder_with_http(http_client(cfg)?)
                .from_credentials(creds)
                .await?;
            return Ok((account, None));
        }
        let contact = cfg.contact_email.as_ref().map(|e| format!("mailto:{e}"));
        let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
        let (account, creds) = Account::builder_with_http(http_client(cfg)?)
            .create(
                &NewAccount {
                    contact: &contacts,
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                },
                cfg.directory_url.clone(),
                None,
            )
            .await?;
        let json = serde_json::to_vec(&creds).map_err(AcmeError::Credentials)?;
        tracing::info!(account = %account.id(), directory = %cfg.directory_url, "ACME account created");
        Ok((account, Some(Zeroizing::new(json))))
    }

    /// The ACME account's URL.
    pub fn account_id(&self) -> &str {
        self.account.id()
    }

    /// Order a certificate for `domain` (resuming the order at `resume` if it is still
    /// pending or ready), answer its HTTP-01 challenge through `responder`, and return
    /// the chain with its fresh key. Bounded by [`AcmeConfig::order_timeout`].
    ///
    /// # Errors
    /// The server's refusal or validation failure (with its reason), a publish failure,
    /// the deadline.
    pub async fn issue<R: ChallengeResponder>(
        &self,
        domain: &str,
        resume: Option<&str>,
        responder: &R,
    ) -> Result<CertBundle, AcmeError> {
        let mut published = Vec::new();
        let run = self.issue_inner(domain, resume, responder, &mut published);
        let out = tokio::time::timeout(self.cfg.order_timeout, run).await;
        for ch in &published {
            responder.withdraw(ch).await;
        }
        out.map_err(|_| AcmeError::Timeout {
            domain: domain.to_string(),
            secs: self.cfg.order_timeout.as_secs(),
        })?
    }

    async fn open_order(&self, domain: &str, resume: Option<&str>) -> Result<Order, AcmeError> {
        if let Some(url) = resume {
            match self.account.order(url.to_string()).await {
                Ok(mut o) => {
                    if matches!(o.state().status, OrderStatus::Pending | OrderStatus::Ready) {
                        tracing::info!(%domain, order = %url, "ACME order resumed");
                        return Ok(o);
                    }
                    tracing::info!(%domain, order = %url, "ACME order ended; starting a new one");
                }
                Err(e) => {
                    tracing::info!(%domain, order = %url, error = %e, "ACME order not resumable; starting a new one")
                }
            }
        }
        let ids = [Identifier::Dns(domain.to_string())];
        Ok(self.account.new_order(&NewOrder::new(&ids)).await?)
    }

    async fn issue_inner<R: ChallengeResponder>(
        &self,
        domain: &str,
        resume: Option<&str>,
        responder: &R,
        published: &mut Vec<Http01>,
    ) -> Result<CertBundle, AcmeError> {
        let mut order = self.open_order(domain, resume).await?;
        responder.order_started(order.url()).await;
        if order.state().status == OrderStatus::Pending {
            let mut authzs = order.authorizations();
            while let Some(a) = authzs.next().await {
                let mut authz = a?;
                match authz.status {
                    AuthorizationStatus::Pending => {}
                    AuthorizationStatus::Valid => continue,
                    other => {
                        return Err(AcmeError::Validation {
                            domain: domain.to_string(),
                            reason: format!("authorization is {other:?}"),
                        });
                    }
                }
                let mut ch = authz.challenge(ChallengeType::Http01).ok_or_else(|| {
                    AcmeError::Validation {
                        domain: domain.to_string(),
                        reason: "the ACME server offers no HTTP-01 challenge".into(),
                    }
                })?;
                let http01 = Http01 {
                    domain: domain.to_string(),
                    token: ch.token.clone(),
                    key_authorization: ch.key_authorization().as_str().to_string(),
                };
                published.push(http01.clone());
                let publish =
                    tokio::time::timeout(self.cfg.publish_timeout, responder.publish(&http01));
                match publish.await {
                    Ok(Ok(())) => {}
                    Ok(Err(reason)) => {
                        return Err(AcmeError::Publish {
                            domain: domain.to_string(),
                            reason,
                        });
                    }
                    Err(_) => {
                        return Err(AcmeError::Publish {
                            domain: domain.to_string(),
                            reason: format!(
                                "no edge confirmed it within {} s",
                                self.cfg.publish_timeout.as_secs()
                            ),
                        });
                    }
                }
                ch.set_ready().await?;
            }
        }
        let poll = RetryPolicy::new()
            .initial_delay(Duration::from_millis(250))
            .backoff(1.5)
            .timeout(self.cfg.order_timeout);
        let status = match order.poll_ready(&poll).await {
            Ok(s) => s,
            Err(instant_acme::Error::Api(p)) => {
                let reason = self
                    .challenge_reason(&mut order)
                    .await
                    .unwrap_or_else(|| problem_text(&p));
                return Err(AcmeError::Validation {
                    domain: domain.to_string(),
                    reason,
                });
            }
            Err(e) => return Err(e.into()),
        };
        if status != OrderStatus::Ready {
            let reason = self
                .challenge_reason(&mut order)
                .await
                .unwrap_or_else(|| format!("order is {status:?}"));
            return Err(AcmeError::Validation {
                domain: domain.to_string(),
                reason,
            });
        }
        let (key_der, csr_der) = fresh_key_and_csr(domain.to_string()).await?;
        order.finalize_csr(&csr_der).await?;
        let pem = order.poll_certificate(&poll).await?;
        bundle_from_pem(domain, &pem, key_der)
    }

    /// The first failed challenge's problem, read fresh from the server.
    async fn challenge_reason(&self, order: &mut Order) -> Option<String> {
        let mut authzs = order.authorizations();
        while let Some(a) = authzs.next().await {
            let Ok(mut authz) = a else { continue };
            if authz.refresh().await.is_err() {
                continue;
            }
            for ch in &authz.challenges {
                if let Some(p) = &ch.error {
                    return Some(problem_text(p));
                }
            }
        }
        None
    }
}

/// A fresh RSA-2048 key and a CSR naming only `domain` (on the blocking pool).
async fn fresh_key_and_csr(domain: String) -> Result<(Zeroizing<Vec<u8>>, Vec<u8>), AcmeError> {
    let made = tokio::task::spawn_blocking(move || {
        let key = zonemesh_ca::generate_rsa_2048().map_err(|e| AcmeError::Key(e.to_string()))?;
        let mut params = rcgen::CertificateParams::new(vec![domain])
            .map_err(|e| AcmeError::Key(e.to_string()))?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        let csr = params
            .serialize_request(&key)
            .map_err(|e| AcmeError::Key(e.to_string()))?;
        Ok::<_, AcmeError>((Zeroizing::new(key.serialize_der()), csr.der().to_vec()))
    });
    made.await.map_err(|e| AcmeError::Key(e.to_string()))?
}

/// The bundle for a downloaded PEM chain: it must be a chain whose leaf names `domain`.
fn bundle_from_pem(
    domain: &str,
    pem: &str,
    key_der: Zeroizing<Vec<u8>>,
) -> Result<CertBundle, AcmeError> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let chain = zonemesh_ca::pem_blocks("CERTIFICATE", pem)
        .map_err(|e| AcmeError::BadCertificate(e.to_string()))?;
    let leaf = chain
        .first()
        .ok_or_else(|| AcmeError::BadCertificate("empty chain".into()))?;
    let (_, cert) =
        X509Certificate::from_der(leaf).map_err(|e| AcmeError::BadCertificate(e.to_string()))?;
    let names_domain = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .is_some_and(|san| {
            san.value
                .general_names
                .iter()
                .any(|n| matches!(n, GeneralName::DNSName(d) if d.eq_ignore_ascii_case(domain)))
        });
    if !names_domain {
        return Err(AcmeError::BadCertificate(format!(
            "the leaf does not name {domain}"
        )));
    }
    Ok(CertBundle {
        domain: domain.to_string(),
        serial_hex: zonemesh_ca::serial_hex(cert.raw_serial()),
        not_after_unix: cert.validity().not_after.timestamp().max(0) as u64,
        chain_der: chain,
        key_pkcs8_der: key_der,
    })
}
