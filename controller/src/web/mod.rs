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
//! - `GET /healthz`, `GET /static/style.css`

pub mod pages;
pub mod tls;

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Form, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{AppendHeaders, Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use zeroize::Zeroizing;

use crate::audit::{AuditEvent, AuditLog};
use crate::auth::session::{csrf_for, csrf_matches, random_token};
use crate::auth::{
    AttemptGuard, AuthError, AuthMetrics, ClearTarget, FailureOutcome, Gate, PasswordCheck, Role,
    SecondFactor, SecuritySink, Session, SessionKind, SessionStore, SharedThrottle, Throttle,
    ThrottleList, UserStore, WebConfig, normalize_email,
};

pub use tls::{CertSource, IssuedTls, TlsError, ca_issuer, serve_https, server_config};

/// Session cookie (`__Host-` prefix: Secure, Path=/, no Domain).
pub const SESSION_COOKIE: &str = "__Host-zm_session";
/// Cookie carrying the sign-in form's CSRF secret (double submit, before any session).
pub const SIGNIN_COOKIE: &str = "__Host-zm_signin";

/// The content security policy of every response: nothing but our own stylesheet.
pub const CSP: &str = "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

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
}

impl WebState {
    /// Open users and sessions with `cfg` (validated here) in the audit log's database
    /// (`_db`, kept for the callers' signature), sharing the audit log's durable writer,
    /// and wire the block sink and the dashboard's data source.
    pub fn new(
        cfg: &WebConfig,
        _db: &sled::Db,
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
            match self.inner.sessions.purge_expired(self.now()) {
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
        match self.inner.audit.record_durable(event, self.now()).await {
            Ok(_) => true,
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

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

fn set_cookie(name: &str, value: &str, max_age: Option<Duration>) -> (header::HeaderName, String) {
    let age = max_age
        .map(|d| format!("; Max-Age={}", d.as_secs()))
        .unwrap_or_default();
    (
        header::SET_COOKIE,
        format!("{name}={value}; Path=/; Secure; HttpOnly; SameSite=Strict{age}"),
    )
}

fn clear_cookie(name: &str) -> (header::HeaderName, String) {
    set_cookie(name, "", Some(Duration::ZERO))
}

/// The session from the request's cookie, if live and its user still enabled.
fn current_session(state: &WebState, headers: &HeaderMap) -> Option<(Zeroizing<String>, Session)> {
    let token = Zeroizing::new(cookie(headers, SESSION_COOKIE)?);
    let s = match state.inner.sessions.get(&token, state.now()) {
        Ok(Some(s)) => s,
        Ok(None) => return None,
        Err(e) => {
            tracing::error!(error = %e, "session lookup failed");
            return None;
        }
    };
    match state.inner.users.active_role(&s.email) {
        Ok(Some(_)) => Some((token, s)),
        _ => {
            // No flush on the request path: a session of a disabled or deleted user is
            // refused on every request anyway, durable removal or not.
            let _ = state.inner.sessions.forget(&token);
            None
        }
    }
}

async fn start_session(
    state: &WebState,
    email: &str,
    role: Role,
    kind: SessionKind,
    to: &str,
) -> Response {
    match state
        .inner
        .sessions
        .create_durable(email, role, kind, state.now())
        .await
    {
        Ok(token) => {
            let age = match kind {
                SessionKind::Full => state.inner.absolute_timeout,
                _ => crate::auth::session::PENDING_LIFETIME,
            };
            (
                AppendHeaders([
                    set_cookie(SESSION_COOKIE, &token, Some(age)),
                    clear_cookie(SIGNIN_COOKIE),
                ]),
                Redirect::to(to),
            )
                .into_response()
        }
        Err(e) => internal(e),
    }
}

/// The HTTPS side's one failure type: the cause is logged with its chain, the caller sees
/// a generic page (no internal detail).
#[derive(Debug, thiserror::Error)]
pub enum WebError {
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
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
    match current_session(&state, &headers) {
        Some((_, s)) if s.kind == SessionKind::Full => Redirect::to("/dashboard").into_response(),
        _ => Redirect::to("/signin").into_response(),
    }
}

fn signin_form(
    status: StatusCode,
    email: &str,
    error: Option<&str>,
    extra: Vec<(header::HeaderName, String)>,
) -> Response {
    let secret = random_token();
    let mut resp = (
        status,
        Html(pages::signin(&csrf_for(&secret), email, error)),
    )
        .into_response();
    let (name, value) = set_cookie(SIGNIN_COOKIE, &secret, Some(Duration::from_secs(3600)));
    if let Ok(v) = HeaderValue::from_str(&value) {
        resp.headers_mut().append(name, v);
    }
    for (name, value) in extra {
        if let Ok(v) = HeaderValue::from_str(&value) {
            resp.headers_mut().append(name, v);
        }
    }
    resp
}

async fn signin_page(State(state): State<WebState>, headers: HeaderMap) -> Response {
    if let Some((_, s)) = current_session(&state, &headers) {
        match s.kind {
            SessionKind::Full => return Redirect::to("/dashboard").into_response(),
            SessionKind::PendingSecondFactor => {
                return Redirect::to("/signin/code").into_response();
            }
            SessionKind::PendingEnrollment => return Redirect::to("/enroll").into_response(),
        }
    }
    signin_form(StatusCode::OK, "", None, vec![])
}

#[derive(Deserialize)]
struct SigninForm {
    csrf: String,
    email: String,
    password: String,
}

impl Drop for SigninForm {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.password);
    }
}

const WRONG_CREDENTIALS: &str = "Wrong e-mail address or password.";

/// The answer to an attempt refused before checking anything.
fn gate_refusal(state: &WebState, gate: Gate, now: SystemTime) -> Option<Response> {
    match gate {
        Gate::Allowed => None,
        Gate::Wait(d) => {
            AuthMetrics::inc(&state.inner.metrics.throttled);
            let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
            let text = format!("Too many failed attempts. Try again in {secs} s.");
            let mut r = (
                StatusCode::TOO_MANY_REQUESTS,
                Html(pages::notice(
                    "Please wait",
                    &text,
                    Some(("/signin", "Sign in")),
                )),
            )
                .into_response();
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            Some(r)
        }
        Gate::Blocked(until) => {
            AuthMetrics::inc(&state.inner.metrics.blocked_requests);
            let secs = until
                .duration_since(now)
                .unwrap_or_default()
                .as_secs()
                .max(1);
            let mut r = (StatusCode::FORBIDDEN, Html(pages::notice("Blocked", "Access from your network address is blocked for a while after repeated failed sign-ins.", None))).into_response();
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            Some(r)
        }
    }
}

/// Reserve an attempt of `ip` on `account`, or the response refusing it unchecked.
fn reserve(
    state: &WebState,
    account: &str,
    ip: IpAddr,
    now: SystemTime,
) -> Result<AttemptGuard, Box<Response>> {
    Throttle::begin(&state.inner.throttle, account, ip, now).map_err(|gate| {
        Box::new(
            gate_refusal(state, gate, now)
                .unwrap_or_else(|| internal("attempt refused unexplained")),
        )
    })
}

/// Settle an attempt as a failure of account and source, audit it, and block the source
/// when it keeps failing across accounts.
async fn record_failure(
    state: &WebState,
    attempt: AttemptGuard,
    kind: &str,
    account: &str,
    ip: IpAddr,
    detail: &str,
) -> FailureOutcome {
    let now = state.now();
    let outcome = attempt.failure(now);
    // Whatever was typed as an e-mail address goes to the audit log, unless it cannot be
    // one: people do type passwords into the wrong field.
    let subject = if account.contains('@') && !account.contains(char::is_whitespace) {
        account
    } else {
        "(not an e-mail address)"
    };
    state
        .audit_durable(
            AuditEvent::new(kind, "denied")
                .subject(subject)
                .source(ip)
                .detail(format!(
                    "{detail}; account failures {}, source failures {}, next attempt after {} ms",
                    outcome.account_failures,
                    outcome.source_failures,
                    outcome.delay.as_millis()
                )),
        )
        .await;
    tracing::info!(source = %ip, account_failures = outcome.account_failures, source_failures = outcome.source_failures, "{kind}");
    if let Some(until) = outcome.blocked_until {
        AuthMetrics::inc(&state.inner.metrics.sources_blocked);
        let reason = format!(
            "{} failed sign-ins across accounts",
            state.throttle().config().block_after_failures
        );
        state
            .audit_durable(
                AuditEvent::new("source.blocked", "blocked")
                    .source(ip)
                    .detail(format!(
                        "{reason}; until {}",
                        crate::audit::format_utc(unix_ms(until))
                    )),
            )
            .await;
        tracing::warn!(source = %ip, "source blocked after repeated failed sign-ins");
        state.inner.sink.source_blocked(ip, until, &reason);
    }
    outcome
}

/// The account a sign-in names, as the throttle, the audit log and the password check see
/// it. Nothing longer than an e-mail address can be is kept: all such attempts count
/// against one placeholder that no account can have.
fn signin_account(typed: &str) -> String {
    let email = normalize_email(crate::text::cap(typed, 4 * crate::text::MAX_EMAIL));
    if email.len() > crate::text::MAX_EMAIL {
        return "(over-long e-mail address)".into();
    }
    email
}

fn unix_ms(t: SystemTime) -> u64 {
    zonemesh_ca::unix_millis(t)
}

async fn signin_submit(
    State(state): State<WebState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(form): Form<SigninForm>,
) -> Response {
    let ip = peer.ip();
    let Some(secret) = cookie(&headers, SIGNIN_COOKIE) else {
        return csrf_refused(&state);
    };
    if !csrf_matches(&secret, &form.csrf) {
        return csrf_refused(&state);
    }
    let email = signin_account(&form.email);
    let now = state.now();
    let attempt = match reserve(&state, &email, ip, now) {
        Ok(a) => a,
        Err(r) => return *r,
    };
    let password = Zeroizing::new(form.password.clone());
    let checked = match state.inner.users.check_password(&email, password).await {
        Ok(c) => c,
        Err(AuthError::Busy) => {
            // Nothing was checked: the attempt does not count.
            attempt.neutral(state.now());
            AuthMetrics::inc(&state.inner.metrics.busy);
            let mut r = (
                StatusCode::SERVICE_UNAVAILABLE,
                Html(pages::notice(
                    "Busy",
                    "The server is busy. Try again in a few seconds.",
                    Some(("/signin", "Sign in")),
                )),
            )
                .into_response();
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(5u32));
            return r;
        }
        Err(e) => return internal(e),
    };
    let (role, second) = match checked {
        PasswordCheck::Ok {
            role,
            second_factor,
        } => (role, second_factor),
        other => {
            AuthMetrics::inc(&state.inner.metrics.signin_failure);
            let detail = match other {
                PasswordCheck::Unknown => "unknown account",
                PasswordCheck::Disabled => "disabled account",
                _ => "wrong password",
            };
            record_failure(&state, attempt, "signin.failure", &email, ip, detail).await;
            return signin_form(
                StatusCode::UNAUTHORIZED,
                &email,
                Some(WRONG_CREDENTIALS),
                vec![],
            );
        }
    };
    match second {
        SecondFactor::None => {
            if !state
                .audit_durable(
                    AuditEvent::new("signin.success", "ok")
                        .actor(&email)
                        .source(ip)
                        .detail("password"),
                )
                .await
            {
                return internal("audit log unavailable");
            }
            attempt.success(now);
            AuthMetrics::inc(&state.inner.metrics.signin_success);
            start_session(&state, &email, role, SessionKind::Full, "/dashboard").await
        }
        SecondFactor::Totp => {
            // The password was right; the sign-in completes (and the source becomes known
            // good) only with the second factor.
            attempt.neutral(now);
            state
                .audit_durable(
                    AuditEvent::new("signin.password", "ok")
                        .actor(&email)
                        .source(ip)
                        .detail("second factor pending"),
                )
                .await;
            start_session(
                &state,
                &email,
                role,
                SessionKind::PendingSecondFactor,
                "/signin/code",
            )
            .await
        }
        SecondFactor::EnrollRequired => {
            attempt.neutral(now);
            state
                .audit_durable(
                    AuditEvent::new("signin.password", "ok")
                        .actor(&email)
                        .source(ip)
                        .detail("TOTP enrollment required, no session before it"),
                )
                .await;
            start_session(
                &state,
                &email,
                role,
                SessionKind::PendingEnrollment,
                "/enroll",
            )
            .await
        }
    }
}

#[derive(Deserialize)]
struct CodeForm {
    csrf: String,
    code: String,
}

async fn code_page(State(state): State<WebState>, headers: HeaderMap) -> Response {
    match current_session(&state, &headers) {
        Some((token, s)) if s.kind == SessionKind::PendingSecondFactor => {
            Html(pages::second_factor(&csrf_for(&token), None)).into_response()
        }
        Some((_, s)) if s.kind == SessionKind::Full => Redirect::to("/dashboard").into_response(),
        _ => Redirect::to("/signin").into_response(),
    }
}

async fn code_submit(
    State(state): State<WebState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(form): Form<CodeForm>,
) -> Response {
    let ip = peer.ip();
    let Some((token, s)) = current_session(&state, &headers)
        .filter(|(_, s)| s.kind == SessionKind::PendingSecondFactor)
    else {
        return Redirect::to("/signin").into_response();
    };
    if !csrf_matches(&token, &form.csrf) {
        return csrf_refused(&state);
    }
    let now = state.now();
    let attempt = match reserve(&state, &s.email, ip, now) {
        Ok(a) => a,
        Err(r) => return *r,
    };
    let (users, email, code) = (
        state.inner.users.clone(),
        s.email.clone(),
        form.code.clone(),
    );
    let verified =
        crate::blocking::run(move || users.verify_second_factor(&email, &code, now)).await;
    match verified {
        Ok(true) => {
            if !state
                .audit_durable(
                    AuditEvent::new("signin.success", "ok")
                        .actor(&s.email)
                        .source(ip)
                        .detail("password + second factor"),
                )
                .await
            {
                return internal("audit log unavailable");
            }
            let _ = state.inner.sessions.remove_durable(&token).await;
            attempt.success(now);
            AuthMetrics::inc(&state.inner.metrics.signin_success);
            start_session(&state, &s.email, s.role, SessionKind::Full, "/dashboard").await
        }
        Ok(false) => {
            AuthMetrics::inc(&state.inner.metrics.second_factor_failure);
            record_failure(
                &state,
                attempt,
                "signin.second-factor-failure",
                &s.email,
                ip,
                "wrong, reused or expired code",
            )
            .await;
            (
                StatusCode::UNAUTHORIZED,
                Html(pages::second_factor(
                    &csrf_for(&token),
                    Some("That code is not valid. Codes work once; wait for the next one."),
                )),
            )
                .into_response()
        }
        Err(e) => internal(e),
    }
}

fn enroll_view(
    state: &WebState,
    token: &str,
    s: &Session,
    status: StatusCode,
    error: Option<&str>,
) -> Response {
    match state.inner.users.totp_enrollment(&s.email) {
        Ok(e) => (
            status,
            Html(pages::enroll(
                &csrf_for(token),
                &e.qr_svg,
                &e.secret_base32,
                &e.otpauth_uri,
                s.kind == SessionKind::PendingEnrollment,
                error,
            )),
        )
            .into_response(),
        Err(AuthError::Totp(_)) => Redirect::to("/dashboard").into_response(),
        Err(e) => internal(e),
    }
}

async fn enroll_page(State(state): State<WebState>, headers: HeaderMap) -> Response {
    match current_session(&state, &headers) {
        Some((token, s))
            if matches!(s.kind, SessionKind::PendingEnrollment | SessionKind::Full) =>
        {
            enroll_view(&state, &token, &s, StatusCode::OK, None)
        }
        Some((_, s)) if s.kind == SessionKind::PendingSecondFactor => {
            Redirect::to("/signin/code").into_response()
        }
        _ => Redirect::to("/signin").into_response(),
    }
}

async fn enroll_submit(
    State(state): State<WebState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(form): Form<CodeForm>,
) -> Response {
    let ip = peer.ip();
    let Some((token, s)) = current_session(&state, &headers)
        .filter(|(_, s)| matches!(s.kind, SessionKind::PendingEnrollment | SessionKind::Full))
    else {
        return Redirect::to("/signin").into_response();
    };
    if !csrf_matches(&token, &form.csrf) {
        return csrf_refused(&state);
    }
    let now = state.now();
    let attempt = match reserve(&state, &s.email, ip, now) {
        Ok(a) => a,
        Err(r) => return *r,
    };
    let (users, email, code) = (
        state.inner.users.clone(),
        s.email.clone(),
        form.code.clone(),
    );
    let confirmed = crate::blocking::run(move || users.confirm_totp(&email, &code, now)).await;
    match confirmed {
        Ok(Some(codes)) => {
            if s.kind == SessionKind::PendingEnrollment {
                attempt.success(now);
            } else {
                attempt.neutral(now);
            }
            if !state
                .audit_durable(
                    AuditEvent::new("totp.enrolled", "ok")
                        .actor(&s.email)
                        .source(ip),
                )
                .await
            {
                return internal("audit log unavailable");
            }
            let codes: Vec<String> = codes.iter().map(|c| c.to_string()).collect();
            // A pending enrollment becomes a full session under a new token.
            let (token, extra) = if s.kind == SessionKind::PendingEnrollment {
                let _ = state.inner.sessions.remove_durable(&token).await;
                AuthMetrics::inc(&state.inner.metrics.signin_success);
                state
                    .audit_durable(
                        AuditEvent::new("signin.success", "ok")
                            .actor(&s.email)
                            .source(ip)
                            .detail("password + TOTP enrollment"),
                    )
                    .await;
                match state
                    .inner
                    .sessions
                    .create(&s.email, s.role, SessionKind::Full, now)
                {
                    Ok(t) => {
                        let c = set_cookie(SESSION_COOKIE, &t, Some(state.inner.absolute_timeout));
                        (t, Some(c))
                    }
                    Err(e) => return internal(e),
                }
            } else {
                (token, None)
            };
            let viewer = pages::Viewer {
                email: &s.email,
                role: s.role.as_str(),
                csrf: &csrf_for(&token),
            };
            let mut resp = Html(pages::recovery_codes(&viewer, &codes)).into_response();
            if let Some((name, value)) = extra
                && let Ok(v) = HeaderValue::from_str(&value)
            {
                resp.headers_mut().append(name, v);
            }
            resp
        }
        Ok(None) => {
            AuthMetrics::inc(&state.inner.metrics.second_factor_failure);
            record_failure(
                &state,
                attempt,
                "totp.enroll-failure",
                &s.email,
                ip,
                "wrong code at enrollment",
            )
            .await;
            enroll_view(
                &state,
                &token,
                &s,
                StatusCode::UNAUTHORIZED,
                Some("That code is not valid. Check the time on your phone and try the next code."),
            )
        }
        Err(e) => internal(e),
    }
}

async fn dashboard(State(state): State<WebState>, headers: HeaderMap) -> Response {
    let Some((token, s)) = current_session(&state, &headers) else {
        return Redirect::to("/signin").into_response();
    };
    match s.kind {
        SessionKind::Full => {}
        SessionKind::PendingEnrollment => return Redirect::to("/enroll").into_response(),
        SessionKind::PendingSecondFactor => return Redirect::to("/signin/code").into_response(),
    }
    // Zones and nodes are the mesh operators' business; portal owners do not see them.
    let (zones, nodes) = if s.role == Role::Admin {
        (state.inner.dashboard.zones(), state.inner.dashboard.nodes())
    } else {
        (vec![], vec![])
    };
    let enrolled = state
        .inner
        .users
        .list_users()
        .ok()
        .and_then(|u| u.into_iter().find(|u| u.email == s.email))
        .is_some_and(|u| u.totp_confirmed);
    let viewer = pages::Viewer {
        email: &s.email,
        role: s.role.as_str(),
        csrf: &csrf_for(&token),
    };
    Html(pages::dashboard(
        &viewer,
        &zones,
        &nodes,
        state.now(),
        enrolled,
    ))
    .into_response()
}

#[derive(Deserialize)]
struct PasswordForm {
    csrf: String,
    current: String,
    new: String,
    confirm: String,
}

impl Drop for PasswordForm {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.current);
        zeroize::Zeroize::zeroize(&mut self.new);
        zeroize::Zeroize::zeroize(&mut self.confirm);
    }
}

fn full_session(
    state: &WebState,
    headers: &HeaderMap,
) -> Result<(Zeroizing<String>, Session), Box<Response>> {
    match current_session(state, headers) {
        Some((token, s)) if s.kind == SessionKind::Full => Ok((token, s)),
        Some((_, s)) if s.kind == SessionKind::PendingEnrollment => {
            Err(Box::new(Redirect::to("/enroll").into_response()))
        }
        Some(_) => Err(Box::new(Redirect::to("/signin/code").into_response())),
        None => Err(Box::new(Redirect::to("/signin").into_response())),
    }
}

fn password_view(
    token: &str,
    s: &Session,
    status: StatusCode,
    error: Option<&str>,
    done: Option<&str>,
) -> Response {
    let csrf = csrf_for(token);
    let viewer = pages::Viewer {
        email: &s.email,
        role: s.role.as_str(),
        csrf: &csrf,
    };
    (status, Html(pages::change_password(&viewer, error, done))).into_response()
}

async fn password_page(State(state): State<WebState>, headers: HeaderMap) -> Response {
    match full_session(&state, &headers) {
        Ok((token, s)) => password_view(&token, &s, StatusCode::OK, None, None),
        Err(r) => *r,
    }
}

async fn password_submit(
    State(state): State<WebState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(form): Form<PasswordForm>,
) -> Response {
    let ip = peer.ip();
    let (token, s) = match full_session(&state, &headers) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    if !csrf_matches(&token, &form.csrf) {
        return csrf_refused(&state);
    }
    if form.new != form.confirm {
        return password_view(
            &token,
            &s,
            StatusCode::BAD_REQUEST,
            Some("The two new passwords differ."),
            None,
        );
    }
    if let Err(e) = crate::auth::check_new_password(&s.email, &form.new) {
        return password_view(
            &token,
            &s,
            StatusCode::BAD_REQUEST,
            Some(&e.to_string()),
            None,
        );
    }
    // The current password is checked like a sign-in: a stolen session must not become a
    // way to guess it.
    let now = state.now();
    let attempt = match reserve(&state, &s.email, ip, now) {
        Ok(a) => a,
        Err(r) => return *r,
    };
    let current = Zeroizing::new(form.current.clone());
    match state.inner.users.check_password(&s.email, current).await {
        Ok(PasswordCheck::Ok { .. }) => attempt.neutral(state.now()),
        Ok(_) => {
            AuthMetrics::inc(&state.inner.metrics.signin_failure);
            record_failure(
                &state,
                attempt,
                "user.password-change-failure",
                &s.email,
                ip,
                "wrong current password",
            )
            .await;
            return password_view(
                &token,
                &s,
                StatusCode::UNAUTHORIZED,
                Some("The current password is wrong."),
                None,
            );
        }
        Err(AuthError::Busy) => {
            attempt.neutral(state.now());
            return password_view(
                &token,
                &s,
                StatusCode::SERVICE_UNAVAILABLE,
                Some("The server is busy. Try again in a few seconds."),
                None,
            );
        }
        Err(e) => return internal(e),
    }
    let new = Zeroizing::new(form.new.clone());
    if let Err(e) = state.inner.users.set_password_bounded(&s.email, new).await {
        return internal(e);
    }
    let (sessions, email, keep) = (state.inner.sessions.clone(), s.email.clone(), token.clone());
    let ended =
        match crate::blocking::run(move || sessions.remove_for_user_except(&email, &keep)).await {
            Ok(n) => n,
            Err(e) => return internal(e),
        };
    state
        .audit_durable(
            AuditEvent::new("user.password-changed", "ok")
                .actor(&s.email)
                .subject(&s.email)
                .source(ip)
                .detail(format!("{ended} other sessions ended")),
        )
        .await;
    password_view(
        &token,
        &s,
        StatusCode::OK,
        None,
        Some("Your password was changed. Every other session of yours has ended."),
    )
}

#[derive(Deserialize)]
struct SignoutForm {
    csrf: String,
}

async fn signout(
    State(state): State<WebState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(form): Form<SignoutForm>,
) -> Response {
    let Some((token, s)) = current_session(&state, &headers) else {
        return ([clear_cookie(SESSION_COOKIE)], Redirect::to("/signin")).into_response();
    };
    if !csrf_matches(&token, &form.csrf) {
        return csrf_refused(&state);
    }
    if let Err(e) = state.inner.sessions.remove_durable(&token).await {
        return internal(e);
    }
    state
        .audit_durable(
            AuditEvent::new("signout", "ok")
                .actor(&s.email)
                .source(peer.ip()),
        )
        .await;
    ([clear_cookie(SESSION_COOKIE)], Redirect::to("/signin")).into_response()
}
