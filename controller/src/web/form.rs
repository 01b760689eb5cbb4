//! The session and CSRF glue every signed-in page and form shares: the session looked up
//! on the blocking pool, the CSRF check of a form, the admin-only gate, and the header
//! data of the page.

use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use zeroize::Zeroizing;

use super::pages::{Viewer, notice_for};
use super::session::{Need, session};
use super::{WebState, csrf_refused};
use crate::audit::AuditEvent;
use crate::auth::session::{csrf_for, csrf_matches};
use crate::auth::{Role, Session};

/// A visitor with a full session, and the CSRF value its forms carry.
pub(super) struct SignedIn {
    pub token: Zeroizing<String>,
    pub session: Session,
    pub csrf: String,
}

impl SignedIn {
    fn new(token: Zeroizing<String>, session: Session) -> Self {
        let csrf = csrf_for(&token);
        Self {
            token,
            session,
            csrf,
        }
    }

    /// Who is signed in, for the page header.
    pub fn viewer(&self) -> Viewer<'_> {
        Viewer {
            email: &self.session.email,
            role: self.session.role.as_str(),
            csrf: &self.csrf,
        }
    }

    pub fn is_admin(&self) -> bool {
        self.session.role == Role::Admin
    }

    pub fn email(&self) -> &str {
        &self.session.email
    }
}

/// The full session of a page, looked up on the blocking pool (a store read); anyone else
/// is redirected where their session belongs.
pub(super) async fn signed_in(
    state: &WebState,
    headers: &HeaderMap,
) -> Result<SignedIn, Box<Response>> {
    let (st, h) = (state.clone(), headers.clone());
    let looked_up = crate::blocking::run_infallible(move || session(&st, &h, Need::Full)).await;
    match looked_up {
        Ok(r) => r.map(|(token, s)| SignedIn::new(token, s)),
        Err(e) => {
            tracing::error!(error = %e, "session lookup failed");
            Err(Box::new(super::internal("session lookup failed")))
        }
    }
}

/// A form post: the full session and its CSRF token (`403` page otherwise).
pub(super) async fn form_post(
    state: &WebState,
    headers: &HeaderMap,
    submitted_csrf: &str,
) -> Result<SignedIn, Box<Response>> {
    let who = signed_in(state, headers).await?;
    if !csrf_matches(&who.token, submitted_csrf) {
        return Err(Box::new(csrf_refused(state)));
    }
    Ok(who)
}

/// The `403` an admin-only page answers anyone else.
pub(super) fn admins_only(who: &SignedIn) -> Response {
    (
        StatusCode::FORBIDDEN,
        Html(notice_for(
            Some(&who.viewer()),
            "Administrators only",
            "This page is for administrators.",
            Some(("/dashboard", "Dashboard")),
        )),
    )
        .into_response()
}

/// An admin-only page: the session of an admin (`403` page for anyone else).
pub(super) async fn admin_page(
    state: &WebState,
    headers: &HeaderMap,
) -> Result<SignedIn, Box<Response>> {
    let who = signed_in(state, headers).await?;
    if !who.is_admin() {
        return Err(Box::new(admins_only(&who)));
    }
    Ok(who)
}

/// An admin-only form post: session, CSRF token, then the admin role. A signed-in
/// non-admin's attempt is audited as `<action>_denied` and answered `403`; nothing else
/// happens.
pub(super) async fn admin_form(
    state: &WebState,
    headers: &HeaderMap,
    submitted_csrf: &str,
    action: &str,
) -> Result<SignedIn, Box<Response>> {
    let who = form_post(state, headers, submitted_csrf).await?;
    if !who.is_admin() {
        state
            .audit_durable(
                AuditEvent::new(format!("{action}_denied"), "denied")
                    .actor(who.email())
                    .detail("not an administrator"),
            )
            .await;
        return Err(Box::new(admins_only(&who)));
    }
    Ok(who)
}
