//! The edge: what serves a portal's domains on an agent.
//!
//! [`Edge::start`] binds what [`EdgeConfig`] asks for and owns every task it starts:
//! - an HTTPS listener (`https` + `upstream`): rustls with TLS 1.2 and 1.3 and
//!   forward-secret AEAD suites only, the certificate chosen by SNI from a map swapped
//!   atomically (an unknown name gets no certificate: the handshake is refused), every
//!   request reverse-proxied to the upstream over HTTP/1.1, every response with HSTS;
//! - a plain-HTTP listener (`http`): answers HTTP-01 challenges, redirects the rest to
//!   HTTPS;
//! - files for a web server that runs already (`files`, see [`crate::files`]);
//! - the stapler: fetches each certificate's OCSP response from the responder its AIA
//!   names, staples it, refreshes it halfway through its validity (at least every 12 h),
//!   retries failures with backoff and keeps the last good staple until it expires.
//!
//! The caller (the agent) drives it: [`Edge::install`] a checked bundle (the old one stays
//! in service when the new one is refused), [`Edge::remove`] a domain,
//! [`Edge::set_challenge`] / [`Edge::clear_challenge`], [`Edge::refresh_staples`] when the
//! CRL changed, [`Edge::probe`] to check by a handshake what is served, and
//! [`Edge::status`] to follow each domain's state. Cancel the shutdown token, then
//! [`Edge::join`].

mod listen;
mod proxy;
mod staple;
mod tls;

pub use listen::ListenerLimits;
pub use proxy::{ACME_CHALLENGE_PREFIX, HSTS, UpstreamTimeouts};
pub use tls::{Served, cipher_suites, provider};

use crate::CertBundle;
use crate::clock::{Clock, SystemClock};
use crate::files::{FilesConfig, FilesError, FilesWriter};
use crate::ocsp::{OcspClient, OcspTarget, Staple};
use parking_lot::Mutex;
use rustls::pki_types::CertificateDer;
use rustls::sign::{CertifiedKey, SigningKey};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Most domains one edge serves.
pub const MAX_DOMAINS: usize = 10_000;
/// Most HTTP-01 challenges held at once.
pub const MAX_CHALLENGES: usize = 1_000;
/// Deadline of one OCSP fetch.
pub const OCSP_TIMEOUT: Duration = Duration::from_secs(5);
/// Deadline of [`Edge::probe`].
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Told of every 401 or 403 answer the HTTPS listener sends, with the client's address
/// (the TCP peer, which completed a handshake): the agent reports them as security events.
/// Called on the request path, so it must not block (the agent queues and drops when full).
pub trait AuthFailureHook: Send + Sync + std::fmt::Debug + 'static {
    /// `source` was answered `status` (401 or 403).
    fn auth_failure(&self, source: std::net::IpAddr, status: u16);
}

/// What the edge serves and where.
#[derive(Clone, Debug)]
pub struct EdgeConfig {
    /// The HTTPS listener; needs `upstream`.
    pub https: Option<SocketAddr>,
    /// The plain-HTTP listener (HTTP-01 and redirects).
    pub http: Option<SocketAddr>,
    /// Where HTTPS requests go: `http://host:port[/prefix]`.
    pub upstream: Option<String>,
    /// Files for a local nginx or HAProxy.
    pub files: Option<FilesConfig>,
    /// Limits of both listeners.
    pub limits: ListenerLimits,
    /// Deadlines towards the upstream.
    pub upstream_timeouts: UpstreamTimeouts,
    /// The time (timers still run on tokio's clock).
    pub clock: Arc<dyn Clock>,
    /// Told of 401/403 answers; `None` tells no one.
    pub auth_failures: Option<Arc<dyn AuthFailureHook>>,
}

impl Default for EdgeConfig {
    fn default() -> Self {
        Self {
            https: None,
            http: None,
            upstream: None,
            files: None,
            limits: ListenerLimits::default(),
            upstream_timeouts: UpstreamTimeouts::default(),
            clock: Arc::new(SystemClock),
            auth_failures: None,
        }
    }
}

impl EdgeConfig {
    /// Check that the combination makes sense, before anything binds.
    ///
    /// # Errors
    /// [`EdgeError::Config`] with a one-line reason.
    pub fn validate(&self) -> Result<(), EdgeError> {
        let bad = |s: &str| Err(EdgeError::Config(s.into()));
        if self.https.is_none() && self.http.is_none() && self.files.is_none() {
            return bad("the edge needs an HTTPS listener, an HTTP listener or a files directory");
        }
        match (&self.https, &self.upstream) {
            (Some(_), None) => return bad("an HTTPS listener needs an upstream to proxy to"),
            (None, Some(_)) => return bad("an upstream is only used with an HTTPS listener"),
            (Some(_), Some(u)) => {
                proxy::Upstream::parse(u).map_err(EdgeError::Config)?;
            }
            (None, None) => {}
        }
        if let (Some(a), Some(b)) = (self.https, self.http)
            && a == b
            && a.port() != 0
        {
            return bad("the HTTPS and HTTP listeners need different addresses");
        }
        if let Some(f) = &self.files {
            if f.dir.as_os_str().is_empty() {
                return bad("the files directory is empty");
            }
            if f.reload.as_deref().is_some_and(|c| c.trim().is_empty()) {
                return bad("the reload command is empty");
            }
        }
        if self.limits.max_conns == 0 || self.limits.max_per_source == 0 {
            return bad("connection limits must be positive");
        }
        Ok(())
    }
}

/// What went wrong in the edge.
#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    /// A configuration that cannot work.
    #[error("edge configuration: {0}")]
    Config(String),
    /// A listener could not be bound.
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// A bundle refused before installation; what was served stays in service.
    #[error("certificate for {domain} refused: {reason}")]
    BadBundle { domain: String, reason: String },
    /// A bound was reached.
    #[error("too many {0}")]
    TooMany(&'static str),
    /// A challenge that cannot be served.
    #[error("challenge refused: {0}")]
    BadChallenge(&'static str),
    /// Writing the files or reloading the server failed.
    #[error("files: {0}")]
    Files(#[from] FilesError),
    /// A probe of our own listener failed.
    #[error("probe of {domain}: {reason}")]
    Probe { domain: String, reason: String },
    /// The edge has no HTTPS listener to probe.
    #[error("the edge has no HTTPS listener")]
    NoHttps,
    /// A blocking task panicked or was cancelled.
    #[error("edge task: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// The state of a domain's OCSP staple.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StapleState {
    /// Not fetched yet.
    Pending,
    /// A "good" response is stapled.
    Stapled {
        /// When the stapled response expires.
        next_update_unix: u64,
    },
    /// A "revoked" response is stapled: clients see the revocation.
    Revoked,
    /// The certificate names no OCSP responder: served unstapled.
    NoResponder,
    /// No staple can be had now; served unstapled.
    Unavailable(String),
}

impl std::fmt::Display for StapleState {
    /// The form reported to the controller: `stapled`, `revoked`, `no-responder`,
    /// `pending`, `unavailable: <reason>`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Pending => f.write_str("pending"),
            Self::Stapled { .. } => f.write_str("stapled"),
            Self::Revoked => f.write_str("revoked"),
            Self::NoResponder => f.write_str("no-responder"),
            Self::Unavailable(r) => write!(f, "unavailable: {r}"),
        }
    }
}

/// One served domain as the edge sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainStatus {
    /// The serial of the certificate in service, lower-case hex.
    pub serial_hex: String,
    /// Its notAfter, Unix seconds.
    pub not_after_unix: u64,
    /// Its staple.
    pub staple: StapleState,
    /// The last failure to write its files or reload, if the last attempt failed.
    pub files_error: Option<String>,
}

/// The result of [`Edge::install`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Installed {
    /// The serial now in service.
    pub serial_hex: String,
    /// Its staple state right after installation.
    pub staple: StapleState,
    /// True when this very certificate was in service already (nothing was changed).
    pub unchanged: bool,
}

/// A domain in service.
struct Entry {
    generation: u64,
    serial_hex: String,
    not_after_unix: u64,
    chain: Vec<CertificateDer<'static>>,
    key: Arc<dyn SigningKey>,
    /// What the resolver hands out: chain, key and the current staple.
    certified: Arc<CertifiedKey>,
    /// `Err` when the certificate names a responder we cannot ask.
    target: Result<Option<OcspTarget>, String>,
    staple: Option<Staple>,
    staple_state: StapleState,
    last_error: Option<String>,
    next_fetch: Option<SystemTime>,
    fetching: bool,
    /// A refresh was asked for while a fetch was in flight.
    again: bool,
    failures: u32,
    files_error: Option<String>,
}

impl Entry {
    fn rebuild(&mut self) {
        let mut ck = CertifiedKey::new(self.chain.clone(), self.key.clone());
        ck.ocsp = self.staple.as_ref().map(|s| s.der.clone());
        self.certified = Arc::new(ck);
    }

    fn status(&self) -> DomainStatus {
        DomainStatus {
            serial_hex: self.serial_hex.clone(),
            not_after_unix: self.not_after_unix,
            staple: self.staple_state.clone(),
            files_error: self.files_error.clone(),
        }
    }
}

struct Challenge {
    domain: String,
    key_authorization: String,
}

/// State shared by the handle, the listeners and the stapler.
pub(crate) struct Shared {
    sni: Arc<tls::SniMap>,
    domains: Mutex<(HashMap<String, Entry>, u64)>,
    status: watch::Sender<BTreeMap<String, DomainStatus>>,
    challenges: Mutex<HashMap<String, Challenge>>,
    staple_wake: Notify,
    ocsp: OcspClient,
    clock: Arc<dyn Clock>,
    files: Option<FilesWriter>,
    /// One file write and reload at a time.
    files_lock: tokio::sync::Mutex<()>,
}

impl Shared {
    /// Publish the resolver's map and the status after a change (called with the lock held).
    fn publish(&self, domains: &HashMap<String, Entry>) {
        let map = domains
            .iter()
            .map(|(d, e)| (d.clone(), e.certified.clone()))
            .collect();
        self.sni.map.store(Arc::new(map));
        let status = domains
            .iter()
            .map(|(d, e)| (d.clone(), e.status()))
            .collect();
        self.status.send_replace(status);
    }

    fn challenge_answer(&self, token: &str) -> Option<String> {
        self.challenges
            .lock()
            .get(token)
            .map(|c| c.key_authorization.clone())
    }

    /// Write `domain`'s staple file (or remove it) and reload when it changed.
    async fn write_staple_file(&self, domain: &str, der: Option<Vec<u8>>) {
        let Some(files) = self.files.clone() else {
            return;
        };
        let _one = self.files_lock.lock().await;
        let d = domain.to_string();
        let written =
            tokio::task::spawn_blocking(move || files.write_staple(&d, der.as_deref())).await;
        let result = match written {
            Ok(Ok(false)) => return,
            Ok(Ok(true)) => match &self.files {
                Some(f) => f.reload().await.map_err(|e| e.to_string()),
                None => Ok(()),
            },
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = &result {
            tracing::warn!(domain, error = %e, "writing the OCSP staple file failed");
        }
        let mut guard = self.domains.lock();
        if let Some(entry) = guard.0.get_mut(domain) {
            entry.files_error = result.err();
            self.publish(&guard.0);
        }
    }
}

/// The running edge. Methods take `&self`; share it in an `Arc`.
pub struct Edge {
    shared: Arc<Shared>,
    https_addr: Option<SocketAddr>,
    http_addr: Option<SocketAddr>,
    tasks: tokio::sync::Mutex<JoinSet<()>>,
}

impl std::fmt::Debug for Edge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Edge")
            .field("https", &self.https_addr)
            .field("http", &self.http_addr)
            .field(
                "files",
                &self.shared.files.as_ref().map(|w| &w.config().dir),
            )
            .finish_non_exhaustive()
    }
}

async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, EdgeError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| EdgeError::Bind { addr, source })
}

impl Edge {
    /// Validate `config`, bind its listeners and start serving (nothing is served until
    /// the first [`Edge::install`]). Everything stops when `shutdown` is cancelled.
    ///
    /// # Errors
    /// A bad configuration, a listener that cannot be bound, a files directory that is
    /// missing or unsafe.
    pub async fn start(config: EdgeConfig, shutdown: CancellationToken) -> Result<Self, EdgeError> {
        config.validate()?;
        let files = match config.files.clone() {
            Some(f) => Some(tokio::task::spawn_blocking(move || FilesWriter::new(f)).await??),
            None => None,
        };
        let shared = Arc::new(Shared {
            sni: Arc::new(tls::SniMap::default()),
            domains: Mutex::new((HashMap::new(), 0)),
            status: watch::Sender::new(BTreeMap::new()),
            challenges: Mutex::new(HashMap::new()),
            staple_wake: Notify::new(),
            ocsp: OcspClient::new(OCSP_TIMEOUT),
            clock: config.clock.clone(),
            files,
            files_lock: tokio::sync::Mutex::new(()),
        });
        let mut tasks = JoinSet::new();
        let mut https_addr = None;
        if let (Some(addr), Some(upstream)) = (config.https, &config.upstream) {
            let upstream = proxy::Upstream::parse(upstream).map_err(EdgeError::Config)?;
            let tls_cfg = tls::server_config(shared.sni.clone())?;
            let l = bind(addr).await?;
            https_addr = Some(
                l.local_addr()
                    .map_err(|source| EdgeError::Bind { addr, source })?,
            );
            let proxy = Arc::new(proxy::Proxy::new(
                upstream,
                config.upstream_timeouts,
                config.auth_failures.clone(),
            ));
            tasks.spawn(https_loop(
                listen::guarded(l, "edge-https", config.limits),
                tokio_rustls::TlsAcceptor::from(Arc::new(tls_cfg)),
                proxy,
                shutdown.clone(),
            ));
        }
        let mut http_addr = None;
        if let Some(addr) = config.http {
            let l = bind(addr).await?;
            http_addr = Some(
                l.local_addr()
                    .map_err(|source| EdgeError::Bind { addr, source })?,
            );
            tasks.spawn(http_loop(
                listen::guarded(l, "edge-http", config.limits),
                shared.clone(),
                https_addr.map(|a| a.port()),
                shutdown.clone(),
            ));
        }
        tasks.spawn(staple::staple_loop(shared.clone(), shutdown.clone()));
        tracing::info!(https = ?https_addr, http = ?http_addr, files = ?config.files.as_ref().map(|f| &f.dir), "edge started");
        Ok(Self {
            shared,
            https_addr,
            http_addr,
            tasks: tokio::sync::Mutex::new(tasks),
        })
    }

    /// The bound HTTPS address.
    pub fn https_addr(&self) -> Option<SocketAddr> {
        self.https_addr
    }

    /// The bound HTTP address.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// Whether the edge writes files.
    pub fn writes_files(&self) -> bool {
        self.shared.files.is_some()
    }

    /// Check `bundle`, fetch its first staple (bounded by [`OCSP_TIMEOUT`]; without one it
    /// is served unstapled until the stapler gets one), put it in service for new
    /// handshakes (open connections keep theirs), then write its files and reload.
    ///
    /// # Errors
    /// [`EdgeError::BadBundle`] (nothing changed), [`EdgeError::TooMany`], or
    /// [`EdgeError::Files`] (the HTTPS side serves the new certificate already).
    pub async fn install(&self, bundle: CertBundle) -> Result<Installed, EdgeError> {
        let now = self.shared.clock.now();
        let b = bundle.clone();
        let checked = tokio::task::spawn_blocking(move || tls::check_bundle(&b, now)).await??;
        let domain = bundle.domain.clone();
        {
            let guard = self.shared.domains.lock();
            if let Some(e) = guard.0.get(&domain) {
                if e.serial_hex == checked.serial_hex && e.files_error.is_none() {
                    return Ok(Installed {
                        serial_hex: e.serial_hex.clone(),
                        staple: e.staple_state.clone(),
                        unchanged: true,
                    });
                }
            } else if guard.0.len() >= MAX_DOMAINS {
                return Err(EdgeError::TooMany("domains"));
            }
        }
        let target = match bundle.chain_der.get(1) {
            Some(issuer) => {
                OcspTarget::new(&bundle.chain_der[0], issuer).map_err(|e| e.to_string())
            }
            None => match crate::ocsp::responder_url(&bundle.chain_der[0]) {
                Ok(None) => Ok(None),
                Ok(Some(_)) => Err("the chain holds no issuer certificate to ask for".into()),
                Err(e) => Err(e.to_string()),
            },
        };
        let (staple, staple_state, last_error) = match &target {
            Ok(None) => (None, StapleState::NoResponder, None),
            Err(e) => (None, StapleState::Unavailable(e.clone()), Some(e.clone())),
            Ok(Some(t)) => match staple::fetch_checked(&self.shared, t).await {
                Ok(s) => {
                    let state = staple::state_of(&s);
                    (Some(s), state, None)
                }
                Err(e) => (None, StapleState::Unavailable(e.clone()), Some(e)),
            },
        };
        let staple_der = staple.as_ref().map(|s| s.der.clone());
        let now = self.shared.clock.now();
        let next_fetch = match (&target, &staple) {
            (Ok(Some(_)), Some(s)) => Some(now + s.refresh_in(now)),
            (Ok(Some(_)), None) => Some(now + staple::backoff(1)),
            _ => None,
        };
        let installed = {
            let mut guard = self.shared.domains.lock();
            let (domains, generation) = &mut *guard;
            *generation += 1;
            let mut entry = Entry {
                generation: *generation,
                serial_hex: checked.serial_hex.clone(),
                not_after_unix: checked.not_after_unix,
                certified: Arc::new(CertifiedKey::new(
                    checked.chain.clone(),
                    checked.key.clone(),
                )),
                chain: checked.chain,
                key: checked.key,
                target,
                failures: u32::from(staple.is_none() && next_fetch.is_some()),
                staple,
                staple_state: staple_state.clone(),
                last_error,
                next_fetch,
                fetching: false,
                again: false,
                files_error: None,
            };
            entry.rebuild();
            domains.insert(domain.clone(), entry);
            self.shared.publish(domains);
            Installed {
                serial_hex: checked.serial_hex,
                staple: staple_state,
                unchanged: false,
            }
        };
        self.shared.staple_wake.notify_one();
        tracing::info!(domain = %domain, serial = %installed.serial_hex, staple = %installed.staple, "certificate in service");
        if let Some(files) = self.shared.files.clone() {
            let _one = self.shared.files_lock.lock().await;
            let written = tokio::task::spawn_blocking(move || {
                files.write_certificate(
                    &bundle.domain,
                    &bundle.chain_der,
                    &bundle.key_pkcs8_der,
                    staple_der.as_deref(),
                )
            })
            .await?;
            let result = match written {
                Ok(()) => match &self.shared.files {
                    Some(f) => f.reload().await,
                    None => Ok(()),
                },
                Err(e) => Err(e),
            };
            let mut guard = self.shared.domains.lock();
            if let Some(e) = guard.0.get_mut(&domain) {
                e.files_error = result.as_ref().err().map(|e| e.to_string());
                self.shared.publish(&guard.0);
            }
            result?;
        }
        Ok(installed)
    }

    /// Stop serving `domain` (its challenges go too). Files already written stay, so a
    /// server configured for them keeps starting until its configuration is changed.
    pub fn remove(&self, domain: &str) {
        let mut guard = self.shared.domains.lock();
        if guard.0.remove(domain).is_some() {
            self.shared.publish(&guard.0);
            tracing::info!(domain, "domain no longer served");
        }
        drop(guard);
        self.shared
            .challenges
            .lock()
            .retain(|_, c| c.domain != domain);
    }

    /// The domains in service.
    pub fn domains(&self) -> Vec<String> {
        self.shared.domains.lock().0.keys().cloned().collect()
    }

    /// Answer `GET /.well-known/acme-challenge/<token>` with `key_authorization`.
    ///
    /// # Errors
    /// A token that is not base64url, a key authorization that is not `<token>.<thumbprint>`,
    /// or [`MAX_CHALLENGES`] held already.
    pub fn set_challenge(
        &self,
        domain: &str,
        token: &str,
        key_authorization: &str,
    ) -> Result<(), EdgeError> {
        let b64url = |s: &str| {
            s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if token.is_empty() || token.len() > 256 || !b64url(token) {
            return Err(EdgeError::BadChallenge("the token is not base64url"));
        }
        let thumbprint = key_authorization
            .strip_prefix(token)
            .and_then(|r| r.strip_prefix('.'));
        match thumbprint {
            Some(t) if !t.is_empty() && t.len() <= 128 && b64url(t) => {}
            _ => {
                return Err(EdgeError::BadChallenge(
                    "the key authorization is not <token>.<thumbprint>",
                ));
            }
        }
        let mut map = self.shared.challenges.lock();
        if !map.contains_key(token) && map.len() >= MAX_CHALLENGES {
            return Err(EdgeError::TooMany("challenges"));
        }
        map.insert(
            token.to_string(),
            Challenge {
                domain: domain.to_string(),
                key_authorization: key_authorization.to_string(),
            },
        );
        Ok(())
    }

    /// Stop answering `token`.
    pub fn clear_challenge(&self, token: &str) {
        self.shared.challenges.lock().remove(token);
    }

    /// Stop answering every challenge.
    pub fn clear_challenges(&self) {
        self.shared.challenges.lock().clear();
    }

    /// Fetch every staple again now (a certificate may just have been revoked).
    pub fn refresh_staples(&self) {
        let now = self.shared.clock.now();
        let mut guard = self.shared.domains.lock();
        for e in guard.0.values_mut() {
            if !matches!(e.target, Ok(Some(_))) {
                continue;
            }
            if e.fetching {
                e.again = true;
            } else {
                e.next_fetch = Some(now);
            }
        }
        drop(guard);
        self.shared.staple_wake.notify_one();
    }

    /// Each domain's status, updated on every change.
    pub fn status(&self) -> watch::Receiver<BTreeMap<String, DomainStatus>> {
        self.shared.status.subscribe()
    }

    /// Hold a TLS handshake with our own HTTPS listener for `domain` and report the
    /// certificate (and staple) it served.
    ///
    /// # Errors
    /// No HTTPS listener, or a handshake that failed.
    pub async fn probe(&self, domain: &str) -> Result<Served, EdgeError> {
        let mut addr = self.https_addr.ok_or(EdgeError::NoHttps)?;
        if addr.ip().is_unspecified() {
            addr.set_ip(match addr {
                SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        tls::probe(addr, domain, PROBE_TIMEOUT).await
    }

    /// Wait for every task to end (after the shutdown token was cancelled): listeners
    /// stop accepting and drain their connections, the stapler stops.
    pub async fn join(&self) {
        let mut tasks = self.tasks.lock().await;
        while let Some(r) = tasks.join_next().await {
            if let Err(e) = r {
                tracing::error!(error = %e, "edge task failed");
            }
        }
    }
}

async fn https_loop(
    mut listener: listen::GuardedListener,
    acceptor: tokio_rustls::TlsAcceptor,
    proxy: Arc<proxy::Proxy>,
    stop: CancellationToken,
) {
    let mut conns = JoinSet::new();
    loop {
        let (io, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            c = listener.accept() => c,
        };
        let activity = io.activity();
        while conns.try_join_next().is_some() {}
        let acceptor = acceptor.clone();
        let proxy = proxy.clone();
        let stop = stop.clone();
        conns.spawn(async move {
            // The first-request deadline of the socket bounds the handshake.
            let tls = tokio::select! {
                _ = stop.cancelled() => return,
                r = acceptor.accept(io) => match r {
                    Ok(t) => t,
                    Err(e) => {
                        tracing::debug!(peer = %peer, error = %e, "edge TLS handshake failed");
                        return;
                    }
                },
            };
            let svc = hyper::service::service_fn(move |req| {
                let guard = activity.begin();
                let proxy = proxy.clone();
                async move { Ok::<_, std::convert::Infallible>(proxy.handle(req, peer, guard).await) }
            });
            let opts = crate::listen::HttpOptions::default();
            if let Err(e) = crate::listen::serve_connection(tls, svc, opts, stop).await {
                tracing::debug!(peer = %peer, error = %e, "edge HTTPS connection ended with an error");
            }
        });
    }
    listen::drain(conns).await;
}

async fn http_loop(
    mut listener: listen::GuardedListener,
    shared: Arc<Shared>,
    https_port: Option<u16>,
    stop: CancellationToken,
) {
    let mut conns = JoinSet::new();
    loop {
        let (io, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            c = listener.accept() => c,
        };
        let activity = io.activity();
        while conns.try_join_next().is_some() {}
        let shared = shared.clone();
        let stop = stop.clone();
        conns.spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let guard = activity.begin();
                let resp = proxy::plain(&shared, &req, https_port, guard);
                async move { Ok::<_, std::convert::Infallible>(resp) }
            });
            let opts = crate::listen::HttpOptions::default();
            if let Err(e) = crate::listen::serve_connection(io, svc, opts, stop).await {
                tracing::debug!(peer = %peer, error = %e, "edge HTTP connection ended with an error");
            }
        });
    }
    listen::drain(conns).await;
}

#[cfg(test)]
mod tests;
