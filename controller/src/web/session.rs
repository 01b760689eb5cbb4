//! Session cookies, the session each page needs (one table of where every other session
//! is sent), and the start of a new session.

use std::time::Duration;

use axum::http::{HeaderMap, header};
use axum::response::{AppendHeaders, IntoResponse, Redirect, Response};
use zeroize::Zeroizing;

use super::{SESSION_COOKIE, SIGNIN_COOKIE, WebState, internal};
use crate::auth::{Role, Session, SessionKind};

/// Which sessions a route serves; every other visitor is redirected (see [`verdict`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Need {
    /// `/`: serves nobody; a full session goes to the dashboard, anyone else to sign-in.
    Root,
    /// The sign-in form: only visitors without a session; a session goes to its step.
    SignedOut,
    /// The code step's page: a pending second factor; a full session goes to the
    /// dashboard.
    CodePage,
    /// The code step's form: a pending second factor only.
    CodeForm,
    /// The enrollment page: a pending enrollment or a full session (enrolling later); a
    /// pending second factor goes to its code step.
    EnrollPage,
    /// The enrollment form: a pending enrollment or a full session.
    EnrollForm,
    /// A signed-in page or form: a full session; a pending one goes to its step.
    Full,
}

/// Where `need` sends a visitor with a session of `kind` (`None`: no session), or `None`
/// when the route serves it.
pub(super) fn verdict(need: Need, kind: Option<SessionKind>) -> Option<&'static str> {
    use SessionKind::{Full, PendingEnrollment as Enroll, PendingSecondFactor as Code};
    match (need, kind) {
        (Need::Root, Some(Full)) => Some("/dashboard"),
        (Need::Root, _) => Some("/signin"),

        (Need::SignedOut, None) => None,
        (Need::SignedOut, Some(Full)) => Some("/dashboard"),
        (Need::SignedOut, Some(Code)) => Some("/signin/code"),
        (Need::SignedOut, Some(Enroll)) => Some("/enroll"),

        (Need::CodePage, Some(Code)) => None,
        (Need::CodePage, Some(Full)) => Some("/dashboard"),
        (Need::CodePage, Some(Enroll) | None) => Some("/signin"),

        (Need::CodeForm, Some(Code)) => None,
        (Need::CodeForm, _) => Some("/signin"),

        (Need::EnrollPage, Some(Enroll | Full)) => None,
        (Need::EnrollPage, Some(Code)) => Some("/signin/code"),
        (Need::EnrollPage, None) => Some("/signin"),

        (Need::EnrollForm, Some(Enroll | Full)) => None,
        (Need::EnrollForm, Some(Code) | None) => Some("/signin"),

        (Need::Full, Some(Full)) => None,
        (Need::Full, Some(Code)) => Some("/signin/code"),
        (Need::Full, Some(Enroll)) => Some("/enroll"),
        (Need::Full, None) => Some("/signin"),
    }
}

/// The request's session if `need` serves it (`None`: no session, and the route serves
/// visitors without one), or the redirect [`verdict`] gives.
pub(super) fn visitor(
    state: &WebState,
    headers: &HeaderMap,
    need: Need,
) -> Result<Option<(Zeroizing<String>, Session)>, Box<Response>> {
    let current = current_session(state, headers);
    match verdict(need, current.as_ref().map(|(_, s)| s.kind)) {
        Some(to) => Err(Box::new(Redirect::to(to).into_response())),
        None => Ok(current),
    }
}

/// The request's session for a route that serves no visitor without one.
pub(super) fn session(
    state: &WebState,
    headers: &HeaderMap,
    need: Need,
) -> Result<(Zeroizing<String>, Session), Box<Response>> {
    visitor(state, headers, need)?.ok_or_else(|| Box::new(Redirect::to("/signin").into_response()))
}

pub(super) fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

pub(super) fn set_cookie(
    name: &str,
    value: &str,
    max_age: Option<Duration>,
) -> (header::HeaderName, String) {
    let age = max_age
        .map(|d| format!("; Max-Age={}", d.as_secs()))
        .unwrap_or_default();
    (
        header::SET_COOKIE,
        format!("{name}={value}; Path=/; Secure; HttpOnly; SameSite=Strict{age}"),
    )
}

pub(super) fn clear_cookie(name: &str) -> (header::HeaderName, String) {
    set_cookie(name, "", Some(Duration::ZERO))
}

/// [`visitor`] on the blocking pool: the lookup reads the session and the user from the
/// store (and refreshes the session's idle timer).
pub(super) async fn visitor_off(
    state: &WebState,
    headers: &HeaderMap,
    need: Need,
) -> Result<Option<(Zeroizing<String>, Session)>, Box<Response>> {
    let (st, h) = (state.clone(), headers.clone());
    match crate::blocking::run_infallible(move || visitor(&st, &h, need)).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "session lookup failed");
            Err(Box::new(internal("session lookup failed")))
        }
    }
}

/// [`session`] on the blocking pool.
pub(super) async fn session_off(
    state: &WebState,
    headers: &HeaderMap,
    need: Need,
) -> Result<(Zeroizing<String>, Session), Box<Response>> {
    visitor_off(state, headers, need)
        .await?
        .ok_or_else(|| Box::new(Redirect::to("/signin").into_response()))
}

/// [`current_session`] on the blocking pool.
pub(super) async fn current_session_off(
    state: &WebState,
    headers: &HeaderMap,
) -> Option<(Zeroizing<String>, Session)> {
    let (st, h) = (state.clone(), headers.clone());
    match crate::blocking::run_infallible(move || current_session(&st, &h)).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "session lookup failed");
            None
        }
    }
}

/// The session from the request's cookie, if live and its user still enabled.
pub(super) fn current_session(
    state: &WebState,
    headers: &HeaderMap,
) -> Option<(Zeroizing<String>, Session)> {
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

pub(super) async fn start_session(
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every cell of the table, as each route behaved before the table existed.
    #[test]
    fn verdict_table() {
        use SessionKind::{Full, PendingEnrollment as Enroll, PendingSecondFactor as Code};
        let pass = None;
        let to = Some;
        // (need, [no session, full, pending second factor, pending enrollment])
        let table: [(Need, [Option<&str>; 4]); 7] = [
            (
                Need::Root,
                [
                    to("/signin"),
                    to("/dashboard"),
                    to("/signin"),
                    to("/signin"),
                ],
            ),
            (
                Need::SignedOut,
                [pass, to("/dashboard"), to("/signin/code"), to("/enroll")],
            ),
            (
                Need::CodePage,
                [to("/signin"), to("/dashboard"), pass, to("/signin")],
            ),
            (
                Need::CodeForm,
                [to("/signin"), to("/signin"), pass, to("/signin")],
            ),
            (
                Need::EnrollPage,
                [to("/signin"), pass, to("/signin/code"), pass],
            ),
            (Need::EnrollForm, [to("/signin"), pass, to("/signin"), pass]),
            (
                Need::Full,
                [to("/signin"), pass, to("/signin/code"), to("/enroll")],
            ),
        ];
        for (need, want) in table {
            for (kind, want) in [None, Some(Full), Some(Code), Some(Enroll)]
                .into_iter()
                .zip(want)
            {
                assert_eq!(verdict(need, kind), want, "{need:?} with {kind:?}");
            }
        }
    }
}
