//! The controller's HTTPS admin side: sign-in with password and TOTP, enrollment, the
//! dashboard, sign-out; security headers on every response.
//!
//! Routes:
//! - `GET /signin`, `POST /signin`: password step (throttled per account and source)
//! - `GET /signin/code`, `POST /signin/code`: TOTP or recovery code step
//! - `GET /enroll`, `POST /enroll`: TOTP enrollment (mandatory for admins before any session)
//! - `GET /dashboard`: zones and nodes with certificate expiry
//! - `GET /account/password`, `POST /account/password`: password change (throttled like
//!   sign-in; ends the user's other sessions)
//! - `POST /signout`
//! - `GET /domains` and `/api/domains/...`: portal domains (see `domains`)
//! - `GET /healthz`, `GET /static/style.css`

mod account;
mod console;
mod domains;
mod form;
mod health;
pub mod https;
pub mod pages;
mod security;
mod session;
mod signin;
mod ssh;

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};

use crate::audit::{AuditEvent, AuditLog};
use crate::auth::{
    AuthError, AuthMetrics, ClearTarget, SecuritySink, SessionStore, SharedThrottle, Throttle,
    ThrottleList, UserStore, WebConfig, normalize_email,
};
use account::{dashboard, password_page, password_submit, signout};
use session::Need;
use signin::{code_page, code_submit, enroll_page, enroll_submit, signin_page, signin_submit};

pub use crate::tls::{CertSource, IssuedTls, TlsError, ca_issuer};
pub use https::{serve_https, server_config};

/// Session cookie (`__Host-` prefix: Secure, Path=/, no Domain).
pub const SESSION_COOKIE: &str = "__Host-zm_session";
/// Cookie carrying the sign-in form's CSRF secret (double submit, before any session).
pub const SIGNIN_COOKIE: &str = "__Host-zm_signin";

/// The content security policy of every response: nothing but our own stylesheet.
pub const CSP: &str = "default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'self'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// A zone as the dashboard lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ZoneRow {
    pub name: String,
    pub cidr: String,
    pub node_count: usize,
}

/// A node as the dashboard lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeRow {
    pub zone: String,
    pub name: String,
    pub overlay_ip: IpAddr,
    pub serial: String,
    pub cert_expiry: SystemTime,
    pub revoked: bool,
}

/// Where the dashboard's data comes from (the controller's store).
pub trait DashboardSource: Send + Sync {
    /// All zones.
    fn zones(&self) -> Vec<ZoneRow>;
    /// All nodes.
    fn nodes(&self) -> Vec<NodeRow>;
    /// The loss and latency matrix for the heat map; `None` shows no map.
    fn health(&self) -> Option<crate::mesh::HealthMatrix> {
        None
    }
}

/// The clock the handlers read; tests may inject another.
pub type Clock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// Everything the pages need.
#[derive(Clone)]
pub struct WebState {
    inner: Arc<Inner>,
}

struct Inner {
    users: Arc<UserStore>,
    sessions: Arc<SessionStore>,
    audit: Arc<AuditLog>,
    throttle: SharedThrottle,
    sink: Arc<dyn SecuritySink>,
    dashboard: Arc<dyn DashboardSource>,
    metrics: Arc<AuthMetrics>,
    clock: Clock,
    absolute_timeout: Duration,
    /// Portal domains, attached by `serve` (the Domains page answers 503 without).
    domains: std::sync::OnceLock<Arc<crate::domains::Domains>>,
    /// The mesh, attached by `serve` (the Security page answers 503 without).
    mesh: std::sync::OnceLock<Arc<crate::mesh::Mesh>>,
    /// The SSH CA, attached by `serve` (the Server access page answers 503 without).
    ssh: std::sync::OnceLock<Arc<crate::ssh::Ssh>>,
    /// The `--controller` address the console's enroll command names, attached by `serve`.
    agent_address: std::sync::OnceLock<String>,
}

impl WebState {
    /// Open users and sessions with `cfg` (validated here) in the audit log's database,
    /// sharing its durable writer, and wire the block sink and the dashboard's data source.
    pub fn new(
        cfg: &WebConfig,
        audit: Arc<AuditLog>,
        sink: Arc<dyn SecuritySink>,
        dashboard: Arc<dyn DashboardSource>,
    ) -> Result<Self, AuthError> {
        // One durable writer for the audit log, users and sessions: their flushes are shared.
        let flusher = audit.flusher().clone();
        let users = Arc::new(UserStore::open_with(&flusher, cfg)?);
        // Make the dummy hash now, so the first unknown account costs what every other does.
        users.hasher().dummy();
        let sessions = Arc::new(SessionStore::open_with(
            &flusher,
            cfg.session_idle_timeout,
            cfg.session_absolute_timeout,
        )?);
        Ok(Self {
            inner: Arc::new(Inner {
                users,
                sessions,
                audit,
                throttle: Arc::new(Mutex::new(Throttle::new(cfg.throttle.clone()))),
                sink,
                dashboard,
                metrics: Arc::new(AuthMetrics::default()),
                clock: Arc::new(SystemTime::now),
                absolute_timeout: cfg.session_absolute_timeout,
                domains: std::sync::OnceLock::new(),
                mesh: std::sync::OnceLock::new(),
                ssh: std::sync::OnceLock::new(),
                agent_address: std::sync::OnceLock::new(),
            }),
        })
    }

    /// Replace the clock (tests).
    pub fn with_clock(self, clock: Clock) -> Self {
        let inner = Arc::try_unwrap(self.inner)
            .unwrap_or_else(|_| panic!("with_clock before the state is shared"));
        Self {
            inner: Arc::new(Inner { clock, ..inner }),
        }
    }

    /// Serve the Domains page and its endpoints from `domains`.
    pub fn attach_domains(&self, domains: Arc<crate::domains::Domains>) {
        let _ = self.inner.domains.set(domains);
    }

    /// Serve the Security page (blocks, events, unblock) from `mesh`.
    pub fn attach_mesh(&self, mesh: Arc<crate::mesh::Mesh>) {
        let _ = self.inner.mesh.set(mesh);
    }

    /// Serve the Server access page from `ssh`.
    pub fn attach_ssh(&self, ssh: Arc<crate::ssh::Ssh>) {
        let _ = self.inner.ssh.set(ssh);
    }

    /// Name `address` as the controller in the console's enroll commands.
    pub fn attach_agent_address(&self, address: String) {
        let _ = self.inner.agent_address.set(address);
    }

    /// The SSH CA, when attached.
    pub fn ssh(&self) -> Option<Arc<crate::ssh::Ssh>> {
        self.inner.ssh.get().cloned()
    }

    /// The user store (the CLI and admin socket use it too).
    pub fn users(&self) -> &Arc<UserStore> {
        &self.inner.users
    }

    /// The session store.
    pub fn sessions(&self) -> &Arc<SessionStore> {
        &self.inner.sessions
    }

    /// Sign-in counters.
    pub fn metrics(&self) -> &Arc<AuthMetrics> {
        &self.inner.metrics
    }

    /// Sources blocked now, with the end of their block.
    pub fn blocked_sources(&self) -> Vec<(IpAddr, SystemTime)> {
        let now = self.now();
        self.throttle().blocked_sources(now)
    }

    /// Lift a block early (operator action); audited.
    pub fn unblock(&self, ip: IpAddr, actor: &str) {
        self.throttle().unblock(ip);
        self.audit(
            AuditEvent::new("source.unblocked", "ok")
                .actor(actor)
                .source(ip),
        );
    }

    /// Live sign-in counters and blocks (`throttle list`), at most `limit` rows.
    pub fn throttle_list(&self, limit: usize) -> ThrottleList {
        let now = self.now();
        self.throttle().list(now, limit)
    }

    /// Clear the counters of an account or a source (`throttle clear`); audited.
    pub fn clear_throttle(&self, target: &ClearTarget, actor: &str) -> usize {
        let target = match target {
            ClearTarget::Account(a) => ClearTarget::Account(normalize_email(a)),
            t => t.clone(),
        };
        let n = self.throttle().clear(&target);
        let event = AuditEvent::new("throttle.cleared", "ok")
            .actor(actor)
            .detail(format!("{n} counter(s) or block(s) removed"));
        self.audit(match &target {
            ClearTarget::Account(a) => event.subject(a),
            ClearTarget::Source(ip) => event.source(*ip),
        });
        n
    }

    /// Disable a user and end their sessions; audited.
    pub fn disable_user(&self, email: &str, actor: &str) -> Result<(), AuthError> {
        let email = normalize_email(email);
        self.inner.users.disable_user(&email)?;
        self.inner.sessions.remove_for_user(&email)?;
        self.audit(
            AuditEvent::new("user.disabled", "ok")
                .actor(actor)
                .subject(email),
        );
        Ok(())
    }

    /// Purge expired sessions every `every` until `shutdown` (spawn it in the controller's
    /// task set).
    pub async fn maintenance_loop(
        self,
        every: Duration,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            let (sessions, now) = (self.inner.sessions.clone(), self.now());
            match crate::blocking::run(move || sessions.purge_expired(now)).await {
                Ok(n) if n > 0 => tracing::debug!(purged = n, "expired sessions purged"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "session purge failed"),
            }
        }
    }

    fn now(&self) -> SystemTime {
        (self.inner.clock)()
    }

    fn throttle(&self) -> std::sync::MutexGuard<'_, Throttle> {
        self.inner
            .throttle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Audit from a blocking context (the admin socket's handlers).
    fn audit(&self, event: AuditEvent) -> bool {
        match self.inner.audit.record_at(event, self.now()) {
            Ok(_) => true,
            Err(e) => {
                tracing::error!(error = %e, "audit record failed");
                false
            }
        }
    }

    /// Audit from a handler: durable before the reply, without holding an async worker.
    async fn audit_durable(&self, event: AuditEvent) -> bool {
        // The append is a store write: on the blocking pool, as is its flush.
        let (audit, now) = (self.inner.audit.clone(), self.now());
        match crate::blocking::run_infallible(move || audit.record_at(event, now)).await {
            Ok(Ok(_)) => true,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "audit record failed");
                false
            }
            Err(e) => {
                tracing::error!(error = %e, "audit record failed");
                false
            }
        }
    }
}

/// The admin pages as an axum router, with security headers on every response.
pub fn router(state: WebState) -> Router {
    Router::new()
        .route("/", get(root))
        .route("/signin", get(signin_page).post(signin_submit))
        .route("/signin/code", get(code_page).post(code_submit))
        .route("/enroll", get(enroll_page).post(enroll_submit))
        .route("/dashboard", get(dashboard))
        .route(
            "/account/password",
            get(password_page).post(password_submit),
        )
        .route("/signout", post(signout))
        .route("/healthz", get(|| async { "ok" }))
        .route("/static/style.css", get(style))
        .merge(domains::routes())
        .merge(security::routes())
        .merge(ssh::routes())
        .merge(console::routes())
        .fallback(not_found)
        .layer(middleware::from_fn(same_origin_posts))
        .layer(DefaultBodyLimit::max(16 * 1024))
        .layer(middleware::map_response(security_headers))
        .with_state(state)
}

async fn security_headers(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(
        header::STRICT_TRANSPORT_SECURITY,
        HeaderValue::from_static("max-age=63072000; includeSubDomains"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(
        "cross-origin-opener-policy",
        HeaderValue::from_static("same-origin"),
    );
    h.insert(
        "permissions-policy",
        HeaderValue::from_static("camera=(), microphone=(), geolocation=()"),
    );
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    resp
}

/// Refuse state-changing requests that a browser marks as cross-site, or whose Origin is
/// not this host: a second line behind the CSRF tokens and SameSite=Strict cookies.
async fn same_origin_posts(req: Request, next: Next) -> Response {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let h = req.headers();
        let fetch_site = h.get("sec-fetch-site").and_then(|v| v.to_str().ok());
        let cross_site = fetch_site.is_some_and(|v| v != "same-origin" && v != "none");
        let host = h
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .or_else(|| req.uri().authority().map(|a| a.as_str()));
        let bad_origin = match (h.get(header::ORIGIN).and_then(|v| v.to_str().ok()), host) {
            // Browsers send "null" under some referrer policies; trust it only when the
            // browser itself says the request is same-origin.
            (Some("null"), _) => fetch_site != Some("same-origin"),
            (Some(origin), Some(host)) => origin.strip_prefix("https://") != Some(host),
            (Some(_), None) => true,
            (None, _) => false,
        };
        if cross_site || bad_origin {
            tracing::info!(origin = ?h.get(header::ORIGIN), host = ?host, sec_fetch_site = ?h.get("sec-fetch-site"), "cross-site form post refused");
            return (
                StatusCode::FORBIDDEN,
                Html(pages::notice(
                    "Request refused",
                    "This form was submitted from another site.",
                    Some(("/signin", "Sign in")),
                )),
            )
                .into_response();
        }
    }
    next.run(req).await
}

async fn style() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        pages::STYLE_CSS,
    )
        .into_response()
}

async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        Html(pages::notice(
            "Not found",
            "There is no such page.",
            Some(("/", "Home")),
        )),
    )
        .into_response()
}

/// The HTTPS side's one failure type: the cause is logged with its chain, the caller sees
/// a generic page (no internal detail).
#[derive(Debug, thiserror::Error)]
pub enum WebError {
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
    #[error(transparent)]
    Blocking(#[from] crate::blocking::BlockingError),
    #[error(transparent)]
    Controller(#[from] crate::error::ControllerError),
    #[error("{0}")]
    Unavailable(&'static str),
}

impl From<&'static str> for WebError {
    fn from(what: &'static str) -> Self {
        WebError::Unavailable(what)
    }
}

impl IntoResponse for WebError {
    fn into_response(self) -> Response {
        let mut chain = self.to_string();
        let mut cause = std::error::Error::source(&self);
        while let Some(c) = cause {
            chain.push_str(": ");
            chain.push_str(&c.to_string());
            cause = c.source();
        }
        tracing::error!(error = %chain, "admin request failed");
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            Html(pages::notice(
                "Something went wrong",
                "The request could not be completed. Try again.",
                Some(("/", "Home")),
            )),
        )
            .into_response()
    }
}

fn internal(e: impl Into<WebError>) -> Response {
    e.into().into_response()
}

fn csrf_refused(state: &WebState) -> Response {
    AuthMetrics::inc(&state.inner.metrics.csrf_rejected);
    (
        StatusCode::FORBIDDEN,
        Html(pages::notice(
            "Form expired",
            "The form was stale or not sent by this site. Reload the page and try again.",
            Some(("/signin", "Sign in")),
        )),
    )
        .into_response()
}

async fn root(State(state): State<WebState>, headers: HeaderMap) -> Response {
    match session::visitor_off(&state, &headers, Need::Root).await {
        Err(r) => *r,
        // `Need::Root` serves nobody: every visitor is redirected.
        Ok(_) => internal("root page served a visitor"),
    }
}
