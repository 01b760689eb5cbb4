//! The sign-in steps: password, second factor (TOTP or recovery code), TOTP enrollment;
//! the throttle's answers to refused attempts.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime};

use axum::extract::{ConnectInfo, Form, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use serde::Deserialize;
use zeroize::Zeroizing;

use super::session::{Need, cookie, session_off, set_cookie, start_session, visitor_off};
use super::{SESSION_COOKIE, SIGNIN_COOKIE, WebState, csrf_refused, internal, pages};
use crate::audit::AuditEvent;
use crate::auth::session::{csrf_for, csrf_matches, random_token};
use crate::auth::{
    AttemptGuard, AuthError, AuthMetrics, FailureOutcome, Gate, PasswordCheck, SecondFactor,
    Session, SessionKind, Throttle, UserStore, normalize_email,
};

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

pub(super) async fn signin_page(State(state): State<WebState>, headers: HeaderMap) -> Response {
    if let Err(r) = visitor_off(&state, &headers, Need::SignedOut).await {
        return *r;
    }
    signin_form(StatusCode::OK, "", None, vec![])
}

#[derive(Deserialize)]
pub(super) struct SigninForm {
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
pub(super) fn reserve(
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
pub(super) async fn record_failure(
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
    state.inner.sink.sign_in_failed(ip);
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

pub(super) fn unix_ms(t: SystemTime) -> u64 {
    zonemesh_ca::unix_millis(t)
}

pub(super) async fn signin_submit(
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
pub(super) struct CodeForm {
    csrf: String,
    code: String,
}

/// What a second-factor form (code or TOTP enrollment) has once its opening checks pass.
struct CodeStep {
    token: Zeroizing<String>,
    session: Session,
    attempt: AttemptGuard,
    now: SystemTime,
}

/// The opening both second-factor forms share: the session the form needs, its CSRF
/// token, then an attempt reserved before any code is checked; then `check` of the typed
/// code on the blocking pool (a failure to check is the generic failure page).
async fn code_step<T: Send + 'static>(
    state: &WebState,
    ip: IpAddr,
    headers: &HeaderMap,
    need: Need,
    form: &CodeForm,
    check: fn(&UserStore, &str, &str, SystemTime) -> Result<T, AuthError>,
) -> Result<(CodeStep, T), Box<Response>> {
    let (token, session) = session_off(state, headers, need).await?;
    if !csrf_matches(&token, &form.csrf) {
        return Err(Box::new(csrf_refused(state)));
    }
    let now = state.now();
    let attempt = reserve(state, &session.email, ip, now)?;
    let (users, email, code) = (
        state.inner.users.clone(),
        session.email.clone(),
        form.code.clone(),
    );
    match crate::blocking::run(move || check(&users, &email, &code, now)).await {
        Ok(checked) => Ok((
            CodeStep {
                token,
                session,
                attempt,
                now,
            },
            checked,
        )),
        Err(e) => Err(Box::new(internal(e))),
    }
}

/// A wrong second-factor code: counted, audited as `kind` and the attempt spent.
async fn wrong_code(
    state: &WebState,
    attempt: AttemptGuard,
    kind: &str,
    email: &str,
    ip: IpAddr,
    detail: &str,
) {
    AuthMetrics::inc(&state.inner.metrics.second_factor_failure);
    record_failure(state, attempt, kind, email, ip, detail).await;
}

pub(super) async fn code_page(State(state): State<WebState>, headers: HeaderMap) -> Response {
    match session_off(&state, &headers, Need::CodePage).await {
        Ok((token, _)) => Html(pages::second_factor(&csrf_for(&token), None)).into_response(),
        Err(r) => *r,
    }
}

pub(super) async fn code_submit(
    State(state): State<WebState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(form): Form<CodeForm>,
) -> Response {
    let ip = peer.ip();
    let check = UserStore::verify_second_factor;
    let (
        CodeStep {
            token,
            session: s,
            attempt,
            now,
        },
        verified,
    ) = match code_step(&state, ip, &headers, Need::CodeForm, &form, check).await {
        Ok(step) => step,
        Err(r) => return *r,
    };
    match verified {
        true => {
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
        false => {
            wrong_code(
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
    }
}

async fn enroll_view(
    state: &WebState,
    token: &str,
    s: &Session,
    status: StatusCode,
    error: Option<&str>,
) -> Response {
    // Read (and, the first time, written) on the blocking pool.
    let (users, email) = (state.inner.users.clone(), s.email.clone());
    match crate::blocking::run(move || users.totp_enrollment(&email)).await {
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
        Err(AuthError::TotpAlreadyEnrolled) => Redirect::to("/dashboard").into_response(),
        Err(e) => internal(e),
    }
}

pub(super) async fn enroll_page(State(state): State<WebState>, headers: HeaderMap) -> Response {
    match session_off(&state, &headers, Need::EnrollPage).await {
        Ok((token, s)) => enroll_view(&state, &token, &s, StatusCode::OK, None).await,
        Err(r) => *r,
    }
}

pub(super) async fn enroll_submit(
    State(state): State<WebState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(form): Form<CodeForm>,
) -> Response {
    let ip = peer.ip();
    let check = UserStore::confirm_totp;
    let (
        CodeStep {
            token,
            session: s,
            attempt,
            now,
        },
        confirmed,
    ) = match code_step(&state, ip, &headers, Need::EnrollForm, &form, check).await {
        Ok(step) => step,
        Err(r) => return *r,
    };
    match confirmed {
        Some(codes) => {
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
                    .create_durable(&s.email, s.role, SessionKind::Full, now)
                    .await
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
        None => {
            wrong_code(
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
            .await
        }
    }
}
