//! The Server access page: a signed-in user with TOTP enrolled pastes an SSH public key,
//! chooses a lifetime and downloads a certificate for the principals granted to them.
//! Server-rendered, no script; the form carries the session's CSRF token.
//!
//! - `GET /ssh`: the user's grants, the form and the `@cert-authority` line
//! - `POST /ssh`: `csrf`, `public_key`, `ttl` (hours) → the certificate as a download
//!   (`id-cert.pub`), or the page with the refusal (`400`); `403` without TOTP

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Form, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;

use super::WebState;
use super::form::{SignedIn, form_post, signed_in};
use super::pages::{esc, layout};
use crate::error::ControllerError;
use crate::ssh::Ssh;

/// The routes of this page.
pub(super) fn routes() -> Router<WebState> {
    Router::new().route("/ssh", get(page).post(submit))
}

/// Lifetimes offered, in hours (the grant's maximum still applies).
const TTL_HOURS: [u64; 5] = [1, 2, 4, 8, 24];
/// Largest form accepted is set by the router's body limit; a key above this is refused
/// by the CA with its reason.
#[derive(serde::Deserialize)]
pub(super) struct SignForm {
    csrf: String,
    public_key: String,
    ttl: u64,
}

fn ssh_of(state: &WebState) -> Result<Arc<Ssh>, Box<Response>> {
    state.ssh().ok_or_else(|| {
        Box::new(
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "server access is not served here",
            )
                .into_response(),
        )
    })
}

fn totp_enrolled(state: &WebState, email: &str) -> bool {
    state
        .users()
        .list_users()
        .ok()
        .and_then(|l| l.into_iter().find(|u| u.email == email))
        .is_some_and(|u| u.totp_confirmed && !u.disabled)
}

async fn page(State(state): State<WebState>, headers: HeaderMap) -> Response {
    let who = match signed_in(&state, &headers).await {
        Ok(v) => v,
        Err(r) => return *r,
    };
    render_page(&state, &who, StatusCode::OK, None).await
}

async fn render_page(
    state: &WebState,
    who: &SignedIn,
    status: StatusCode,
    message: Option<&str>,
) -> Response {
    let s = &who.session;
    let ssh = match ssh_of(state) {
        Ok(x) => x,
        Err(r) => return *r,
    };
    let (email, st) = (s.email.clone(), state.clone());
    let info = crate::blocking::run(move || -> Result<_, ControllerError> {
        let grants: Vec<_> = ssh
            .grants()?
            .into_iter()
            .filter(|g| g.email == email)
            .collect();
        let totp = totp_enrolled(&st, &email);
        Ok((grants, ssh.known_hosts_line().ok(), totp))
    })
    .await;
    let (grants, known_hosts, totp) = match info {
        Ok(v) => v,
        Err(e) => {
            tracing::error!(error = %e, "server access page");
            return (StatusCode::INTERNAL_SERVER_ERROR, "internal error").into_response();
        }
    };
    let csrf = &who.csrf;
    let viewer = who.viewer();
    let mut body = String::from(r#"<div class="card"><h1>Server access</h1>"#);
    if let Some(m) = message {
        let _ = write!(body, r#"<p class="error" id="message">{}</p>"#, esc(m));
    }
    if grants.is_empty() {
        body.push_str(r#"<p class="notice" id="no-grants">You have no SSH grants; ask an administrator for one.</p>"#);
    } else {
        body.push_str(r#"<table id="grants"><thead><tr><th>Zone</th><th>Log in as</th><th>Longest certificate</th><th>Also allowed</th></tr></thead><tbody>"#);
        for g in &grants {
            let _ = write!(
                body,
                r#"<tr><td>{}</td><td class="mono">{}</td><td>{}</td><td>{}</td></tr>"#,
                esc(&g.zone),
                esc(&g.principal),
                humantime::format_duration(Duration::from_secs(g.max_ttl_secs)),
                esc(&g.extensions.join(", "))
            );
        }
        body.push_str("</tbody></table>");
    }
    if !totp {
        body.push_str(r#"<p class="error" id="need-totp">Certificates are only issued to accounts with a confirmed authenticator (TOTP). Enroll one on the <a href="/enroll">enrollment page</a> first.</p>"#);
    } else if !grants.is_empty() {
        let max = grants.iter().map(|g| g.max_ttl_secs).min().unwrap_or(0) / 3600;
        let mut options = String::new();
        for h in TTL_HOURS.iter().filter(|h| **h <= max.max(1)) {
            let sel = if *h == max.clamp(1, 8) {
                " selected"
            } else {
                ""
            };
            let _ = write!(options, r#"<option value="{h}"{sel}>{h} h</option>"#);
        }
        let _ = write!(
            body,
            r#"<form method="post" action="/ssh" id="sign-form"><input type="hidden" name="csrf" value="{csrf}">
<label for="public_key">Your public key (the contents of <code>~/.ssh/id_ed25519.pub</code>; Ed25519, ECDSA or RSA of 3072 bits or more)</label>
<textarea id="public_key" name="public_key" rows="4" cols="80" required></textarea>
<label for="ttl">Valid for</label><select id="ttl" name="ttl">{options}</select>
<button type="submit" id="sign">Download certificate</button></form>
<p>Save it beside your key as <code>~/.ssh/id_ed25519-cert.pub</code>; <code>ssh</code> uses it from there.</p>"#,
            csrf = esc(csrf),
        );
    }
    if let Some(line) = known_hosts {
        let _ = write!(
            body,
            r#"<p>To trust every zonemesh server, add this line to <code>~/.ssh/known_hosts</code>:</p><pre class="mono" id="known-hosts">{}</pre>"#,
            esc(&line)
        );
    }
    body.push_str("</div>");
    (status, Html(layout("Server access", Some(&viewer), &body))).into_response()
}

async fn submit(
    State(state): State<WebState>,
    headers: HeaderMap,
    Form(form): Form<SignForm>,
) -> Response {
    let who = match form_post(&state, &headers, &form.csrf).await {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let (st, email) = (state.clone(), who.email().to_string());
    let totp = crate::blocking::run_infallible(move || totp_enrolled(&st, &email)).await;
    if !totp.unwrap_or(false) {
        let msg = "Enroll an authenticator (TOTP) before asking for a certificate.";
        return render_page(&state, &who, StatusCode::FORBIDDEN, Some(msg)).await;
    }
    let s = &who.session;
    let ssh = match ssh_of(&state) {
        Ok(x) => x,
        Err(r) => return *r,
    };
    let (email, key) = (s.email.clone(), form.public_key.clone());
    let ttl = Duration::from_secs(form.ttl.saturating_mul(3600));
    let signed = crate::blocking::run(move || ssh.sign_user(&email, &key, Some(ttl), &email)).await;
    match signed {
        Ok(c) => (
            StatusCode::OK,
            [
                (header::CONTENT_TYPE, "application/octet-stream"),
                (
                    header::CONTENT_DISPOSITION,
                    "attachment; filename=\"id-cert.pub\"",
                ),
            ],
            format!("{}\n", c.certificate),
        )
            .into_response(),
        Err(
            e @ (ControllerError::BadRequest(_)
            | ControllerError::PermissionDenied(_)
            | ControllerError::NotFound(_)),
        ) => {
            let msg = e.to_string();
            render_page(&state, &who, StatusCode::BAD_REQUEST, Some(&msg)).await
        }
        Err(e) => {
            tracing::error!(error = %e, "SSH certificate signing failed");
            (StatusCode::INTERNAL_SERVER_ERROR, "internal error").into_response()
        }
    }
}
