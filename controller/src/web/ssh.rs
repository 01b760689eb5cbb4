//! The Server access page: a signed-in user with TOTP enrolled pastes or uploads an SSH
//! public key, chooses a lifetime and downloads a certificate for the principals granted
//! to them. Server-rendered, no script; the form carries the session's CSRF token.
//!
//! - `GET /ssh`: the user's grants, the form and the `@cert-authority` line
//! - `POST /ssh` (`multipart/form-data` from the page, or urlencoded): `csrf`,
//!   `public_key` (pasted) or `key_file` (uploaded, at most [`KEY_MAX`]), `ttl` (hours) →
//!   the certificate as a download (`id-cert.pub`), or the page with the refusal (`400`,
//!   `413` above the bound); `403` without TOTP or with a wrong CSRF token

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Form, FromRequest, Multipart, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;

use super::WebState;
use super::csrf_refused;
use super::form::{SignedIn, signed_in};
use super::pages::{esc, layout};
use crate::auth::session::csrf_matches;
use crate::error::ControllerError;
use crate::ssh::Ssh;

/// The routes of this page.
pub(super) fn routes() -> Router<WebState> {
    Router::new().route("/ssh", get(page).post(submit))
}

/// Lifetimes offered, in hours (the grant's maximum still applies).
const TTL_HOURS: [u64; 5] = [1, 2, 4, 8, 24];
/// Largest public key taken from the form, pasted or uploaded (an RSA-16384 public key is
/// under 3 KiB). The router's body limit (16 KiB) bounds the whole form as well.
pub(super) const KEY_MAX: usize = 16 * 1024;
/// Parts of a multipart form read before it is refused (the page sends four).
const PARTS_MAX: usize = 8;

/// The urlencoded form (scripts, curl).
#[derive(serde::Deserialize)]
pub(super) struct SignForm {
    csrf: String,
    public_key: String,
    ttl: u64,
}

/// Why a form was not read: its status and the message the page shows.
struct FormRefusal(StatusCode, String);

impl FormRefusal {
    fn bad(msg: &str) -> Self {
        Self(StatusCode::BAD_REQUEST, msg.to_string())
    }
    fn too_large() -> Self {
        Self(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "The form is larger than {} KiB: upload the public key (the .pub file), nothing else.",
                KEY_MAX / 1024
            ),
        )
    }
}

impl From<axum::extract::multipart::MultipartError> for FormRefusal {
    fn from(e: axum::extract::multipart::MultipartError) -> Self {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Self::too_large()
        } else {
            Self::bad("The form could not be read; reload the page and try again.")
        }
    }
}

/// One part's bytes, at most [`KEY_MAX`].
async fn part_bytes(
    mut field: axum::extract::multipart::Field<'_>,
) -> Result<Vec<u8>, FormRefusal> {
    let mut out = Vec::new();
    while let Some(chunk) = field.chunk().await? {
        if out.len() + chunk.len() > KEY_MAX {
            return Err(FormRefusal::too_large());
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// The form as the page (multipart, with an optional uploaded file) or a script
/// (urlencoded) sends it; a key both pasted and uploaded is refused.
async fn read_form(state: &WebState, req: Request) -> Result<SignForm, FormRefusal> {
    let multipart = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/form-data"));
    if !multipart {
        return match Form::<SignForm>::from_request(req, state).await {
            Ok(Form(f)) => Ok(f),
            Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(FormRefusal::too_large()),
            Err(_) => Err(FormRefusal::bad(
                "The form could not be read; reload the page and try again.",
            )),
        };
    }
    let mut parts = Multipart::from_request(req, state).await.map_err(|_| {
        FormRefusal::bad("The form could not be read; reload the page and try again.")
    })?;
    let (mut csrf, mut pasted, mut file, mut ttl) = (None, None, None, None);
    let mut n = 0;
    while let Some(field) = parts.next_field().await? {
        n += 1;
        if n > PARTS_MAX {
            return Err(FormRefusal::bad("The form has unexpected parts."));
        }
        let name = field.name().unwrap_or_default().to_string();
        let bytes = part_bytes(field).await?;
        match name.as_str() {
            "csrf" => csrf = Some(String::from_utf8_lossy(&bytes).into_owned()),
            "public_key" => pasted = Some(bytes),
            "key_file" => file = Some(bytes),
            "ttl" => ttl = Some(String::from_utf8_lossy(&bytes).trim().to_string()),
            _ => {}
        }
    }
    let text = |b: Option<Vec<u8>>| -> Result<String, FormRefusal> {
        let b = b.unwrap_or_default();
        String::from_utf8(b)
            .map(|s| s.trim().to_string())
            .map_err(|_| {
                FormRefusal::bad("The key is not text: choose the public key file (.pub).")
            })
    };
    let (pasted, file) = (text(pasted)?, text(file)?);
    let public_key = match (pasted.is_empty(), file.is_empty()) {
        (false, false) if pasted != file => {
            return Err(FormRefusal::bad(
                "Paste a key or upload a key file, not both.",
            ));
        }
        (true, true) => {
            return Err(FormRefusal::bad("Paste a public key or choose a key file."));
        }
        (true, false) => file,
        _ => pasted,
    };
    let ttl = ttl
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| FormRefusal::bad("Choose how long the certificate is valid."))?;
    Ok(SignForm {
        csrf: csrf.unwrap_or_default(),
        public_key,
        ttl,
    })
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
    let ssh = match ssh_of(state) {
        Ok(x) => x,
        Err(r) => return *r,
    };
    let s = &who.session;
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
            r#"<form method="post" action="/ssh" id="sign-form" enctype="multipart/form-data"><input type="hidden" name="csrf" value="{csrf}">
<label for="public_key">Your public key (the contents of <code>~/.ssh/id_ed25519.pub</code>; Ed25519, ECDSA or RSA of 3072 bits or more)</label>
<textarea id="public_key" name="public_key" rows="4" cols="80"></textarea>
<label for="key_file">or upload the file (<code>.pub</code>, at most {kib} KiB)</label>
<input type="file" id="key_file" name="key_file" accept=".pub,text/plain">
<label for="ttl">Valid for</label><select id="ttl" name="ttl">{options}</select>
<button type="submit" id="sign">Download certificate</button></form>
<p>Save it beside your key as <code>~/.ssh/id_ed25519-cert.pub</code>; <code>ssh</code> uses it from there.</p>"#,
            csrf = esc(csrf),
            kib = KEY_MAX / 1024,
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

async fn submit(State(state): State<WebState>, req: Request) -> Response {
    let who = match signed_in(&state, req.headers()).await {
        Ok(v) => v,
        Err(r) => return *r,
    };
    // The body is read first (the CSRF token is one of its parts), bounded by read_form.
    let form = match read_form(&state, req).await {
        Ok(f) => f,
        Err(FormRefusal(status, msg)) => {
            return render_page(&state, &who, status, Some(&msg)).await;
        }
    };
    if !csrf_matches(&who.token, &form.csrf) {
        return csrf_refused(&state);
    }
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
