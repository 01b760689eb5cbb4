//! The signed-in pages: the dashboard, password change, sign-out.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Form, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use serde::Deserialize;
use zeroize::Zeroizing;

use super::session::{Need, clear_cookie, current_session_off, session_off};
use super::signin::{record_failure, reserve};
use super::{SESSION_COOKIE, WebState, csrf_refused, internal, pages};
use crate::audit::AuditEvent;
use crate::auth::session::{csrf_for, csrf_matches};
use crate::auth::{AuthError, AuthMetrics, PasswordCheck, Session};

pub(super) async fn dashboard(State(state): State<WebState>, headers: HeaderMap) -> Response {
    let who = match super::form::signed_in(&state, &headers).await {
        Ok(v) => v,
        Err(r) => return *r,
    };
    // Zones and nodes are the mesh operators' business; portal owners do not see them.
    let (st, admin, email) = (state.clone(), who.is_admin(), who.email().to_string());
    let read = crate::blocking::run_infallible(move || {
        let d = &st.inner.dashboard;
        let mesh = if admin {
            (d.zones(), d.nodes(), d.health())
        } else {
            (vec![], vec![], None)
        };
        let enrolled = st
            .inner
            .users
            .list_users()
            .ok()
            .and_then(|u| u.into_iter().find(|u| u.email == email))
            .is_some_and(|u| u.totp_confirmed);
        (mesh, enrolled)
    })
    .await;
    let ((zones, nodes, health), enrolled) = match read {
        Ok(v) => v,
        Err(e) => return internal(e),
    };
    Html(pages::dashboard(
        &who.viewer(),
        &zones,
        &nodes,
        health.as_ref(),
        state.now(),
        enrolled,
    ))
    .into_response()
}

#[derive(Deserialize)]
pub(super) struct PasswordForm {
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

pub(super) async fn password_page(State(state): State<WebState>, headers: HeaderMap) -> Response {
    match session_off(&state, &headers, Need::Full).await {
        Ok((token, s)) => password_view(&token, &s, StatusCode::OK, None, None),
        Err(r) => *r,
    }
}

pub(super) async fn password_submit(
    State(state): State<WebState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(form): Form<PasswordForm>,
) -> Response {
    let ip = peer.ip();
    let (token, s) = match session_off(&state, &headers, Need::Full).await {
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
pub(super) struct SignoutForm {
    csrf: String,
}

pub(super) async fn signout(
    State(state): State<WebState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(form): Form<SignoutForm>,
) -> Response {
    let Some((token, s)) = current_session_off(&state, &headers).await else {
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
