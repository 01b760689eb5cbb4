//! The Domains page and its endpoints: every domain for an admin, only their own for a
//! portal owner; the Deploy Certificate button starts (or joins) the domain's job and the
//! page follows it.
//!
//! - `GET /domains`: the page (state, issuer, serial, expiry, the button)
//! - `POST /domains`: add a domain (CSRF field); an admin for any owner and issuer, a
//!   portal owner only an `acme` domain of their own (`internal` is refused with `403`)
//! - `GET /api/domains/{name}`: the domain as `domain list --json` shows it, plus its job
//! - `POST /api/domains/{name}/deploy-certificate`: CSRF token in `x-csrf-token` or the
//!   form field `csrf`; `202` with `{"job", "state"}` at once
//! - `GET /static/domains.js`: the page's script (a served file: the CSP allows no inline
//!   script)

use std::fmt::Write as _;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Form, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;

use super::form::{SignedIn, form_post, signed_in};
use super::pages::{Viewer, esc, layout};
use super::{WebState, csrf_refused};
use crate::audit::AuditEvent;
use crate::auth::session::csrf_matches;
use crate::auth::{Role, Session};
use crate::domains::{DomainView, Domains, IssuerKind};
use crate::error::ControllerError;

/// The routes of this page.
pub(super) fn routes() -> Router<WebState> {
    Router::new()
        .route("/domains", get(page).post(add_submit))
        .route("/api/domains/{name}", get(api_get))
        .route("/api/domains/{name}/deploy-certificate", post(api_deploy))
        .route("/static/domains.js", get(script))
}

fn json_error(status: StatusCode, msg: &str) -> Response {
    (status, axum::Json(json!({ "error": msg }))).into_response()
}

fn domains_of(state: &WebState) -> Result<Arc<Domains>, Box<Response>> {
    state.inner.domains.get().cloned().ok_or_else(|| {
        Box::new(json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "domains are not available on this controller",
        ))
    })
}

fn may_see(s: &Session, owner: &str) -> bool {
    s.role == Role::Admin || s.email == owner
}

fn controller_error(e: ControllerError) -> Response {
    match e {
        ControllerError::NotFound(_) | ControllerError::BadRequest(_) => {
            json_error(StatusCode::NOT_FOUND, "no such domain")
        }
        other => {
            tracing::error!(error = %other, "domain request failed");
            json_error(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
        }
    }
}

async fn page(State(state): State<WebState>, headers: HeaderMap) -> Response {
    let who = match signed_in(&state, &headers).await {
        Ok(v) => v,
        Err(r) => return *r,
    };
    listing(&state, &who, StatusCode::OK, None).await
}

/// The page with `message` (an error from the add form) above the table.
async fn listing(
    state: &WebState,
    who: &SignedIn,
    status: StatusCode,
    message: Option<&str>,
) -> Response {
    let s = who.session.clone();
    let d = match domains_of(state) {
        Ok(d) => d,
        Err(r) => return *r,
    };
    let rows = match crate::blocking::run(move || d.list()).await {
        Ok(rows) => rows,
        Err(e) => return controller_error(e),
    };
    let rows: Vec<DomainView> = rows.into_iter().filter(|r| may_see(&s, &r.owner)).collect();
    let admin = who.is_admin();
    (status, Html(render(&who.viewer(), &rows, admin, message))).into_response()
}

#[derive(serde::Deserialize)]
pub(super) struct AddForm {
    csrf: String,
    name: String,
    issuer: String,
    #[serde(default)]
    owner: String,
    zones: String,
}

async fn add_submit(
    State(state): State<WebState>,
    headers: HeaderMap,
    Form(form): Form<AddForm>,
) -> Response {
    let who = match form_post(&state, &headers, &form.csrf).await {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let s = who.session.clone();
    let d = match domains_of(&state) {
        Ok(d) => d,
        Err(r) => return *r,
    };
    let Some(issuer) = IssuerKind::parse(&form.issuer) else {
        let msg = "Choose the acme or the internal issuer.";
        return listing(&state, &who, StatusCode::BAD_REQUEST, Some(msg)).await;
    };
    let admin = s.role == Role::Admin;
    // Only an admin may put a domain on the internal CA, or give one to someone else.
    if !admin && issuer == IssuerKind::Internal {
        state
            .audit_durable(
                AuditEvent::new("domain.add_denied", "denied")
                    .actor(s.email.as_str())
                    .subject(crate::text::capped(&form.name, 253))
                    .detail("a portal owner asked for the internal issuer"),
            )
            .await;
        let msg = "Only an administrator can add a domain for the internal issuer.";
        return listing(&state, &who, StatusCode::FORBIDDEN, Some(msg)).await;
    }
    let owner = if admin && !form.owner.trim().is_empty() {
        form.owner.trim().to_string()
    } else {
        s.email.clone()
    };
    let zones: Vec<String> = form
        .zones
        .split([',', ' '])
        .map(str::trim)
        .filter(|z| !z.is_empty())
        .map(str::to_string)
        .collect();
    let (name, actor) = (form.name.clone(), s.email.clone());
    match crate::blocking::run(move || d.add(&name, issuer, &owner, &zones, &actor)).await {
        Ok(_) => axum::response::Redirect::to("/domains").into_response(),
        Err(
            e @ (ControllerError::BadRequest(_)
            | ControllerError::NotFound(_)
            | ControllerError::AlreadyExists(_)
            | ControllerError::RateLimited(_)),
        ) => {
            let msg = e.to_string();
            listing(&state, &who, StatusCode::BAD_REQUEST, Some(&msg)).await
        }
        Err(e) => controller_error(e),
    }
}

fn add_form(viewer: &Viewer<'_>, admin: bool) -> String {
    let (issuers, owner) = if admin {
        (
            r#"<option value="acme">acme</option><option value="internal">internal</option>"#,
            r#"<label for="owner">Owner (e-mail; empty: you)</label><input type="email" id="owner" name="owner">"#,
        )
    } else {
        (r#"<option value="acme">acme</option>"#, "")
    };
    format!(
        r#"<div class="card narrow"><h2>Add a domain</h2>
<form method="post" action="/domains" id="add-domain">
<input type="hidden" name="csrf" value="{csrf}">
<label for="name">Domain</label><input type="text" id="name" name="name" required placeholder="portal.example.com">
<label for="issuer">Issuer</label><select id="issuer" name="issuer">{issuers}</select>
{owner}
<label for="zones">Edge zones (comma-separated)</label><input type="text" id="zones" name="zones" required>
<button type="submit" id="add">Add domain</button></form></div>"#,
        csrf = esc(viewer.csrf),
    )
}

fn render(viewer: &Viewer<'_>, rows: &[DomainView], admin: bool, message: Option<&str>) -> String {
    let mut t = String::new();
    for d in rows {
        let name = esc(&d.name);
        let expiry = d
            .not_after_unix
            .map(crate::cli::render::fmt_unix)
            .unwrap_or_else(|| "-".into());
        let _ = write!(
            t,
            r#"<tr data-domain="{name}"><td class="mono">{name}</td><td>{issuer}</td><td class="state">{state}</td><td class="mono serial">{serial}</td><td class="expiry">{expiry}</td><td class="staple">{staple}</td><td class="bad error">{error}</td><td><form method="post" action="/api/domains/{name}/deploy-certificate" class="inline deploy-form"><input type="hidden" name="csrf" value="{csrf}"><button type="submit" class="deploy" data-domain="{name}">Deploy Certificate</button></form></td></tr>"#,
            issuer = d.issuer.as_str(),
            state = esc(&crate::cli::render::domain_state(d)),
            serial = esc(d.serial_hex.as_deref().unwrap_or("-")),
            error = esc(d.error.as_deref().unwrap_or("")),
            staple = esc(d.staple.as_deref().unwrap_or("-")),
            csrf = esc(viewer.csrf),
        );
    }
    if rows.is_empty() {
        t.push_str(r#"<tr><td colspan="8">No domains yet.</td></tr>"#);
    }
    layout(
        "Domains",
        Some(viewer),
        &format!(
            r#"<div class="card"><h1>Domains</h1>{msg}
<p>Deploy Certificate issues a certificate for the domain and puts it on every edge of its zones.</p>
<table id="domains" data-csrf="{csrf}"><thead><tr><th>Domain</th><th>Issuer</th><th>State</th><th>Serial</th><th>Expires</th><th>OCSP staple</th><th>Error</th><th></th></tr></thead><tbody>{t}</tbody></table>
<p id="progress" class="notice" hidden></p>
<p><a href="/dashboard">Back to the dashboard</a></p></div>{add}
<script src="/static/domains.js"></script>"#,
            csrf = esc(viewer.csrf),
            msg = message
                .map(|m| format!(r#"<p class="error" id="message">{}</p>"#, esc(m)))
                .unwrap_or_default(),
            add = add_form(viewer, admin),
        ),
    )
}

/// The domain `name` for a signed-in user allowed on it.
async fn allowed(
    state: &WebState,
    headers: &HeaderMap,
    name: String,
) -> Result<(Arc<Domains>, Session, String, zeroize::Zeroizing<String>), Box<Response>> {
    let who = signed_in(state, headers).await?;
    let (token, s) = (who.token, who.session);
    let d = domains_of(state)?;
    let d2 = d.clone();
    let owner = crate::blocking::run(move || d2.owner(&name).map(|o| (o, name)))
        .await
        .map_err(|e| Box::new(controller_error(e)))?;
    if !may_see(&s, &owner.0) {
        return Err(Box::new(json_error(
            StatusCode::FORBIDDEN,
            "this domain belongs to another owner",
        )));
    }
    Ok((d, s, owner.1, token))
}

async fn api_get(
    State(state): State<WebState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Response {
    let (d, _, name, _) = match allowed(&state, &headers, name).await {
        Ok(v) => v,
        Err(r) => return *r,
    };
    match crate::blocking::run(move || d.detail(&name)).await {
        Ok(detail) => axum::Json(detail).into_response(),
        Err(e) => controller_error(e),
    }
}

/// The CSRF token of the request: the header, else the form field.
fn submitted_csrf(headers: &HeaderMap, body: &[u8]) -> String {
    if let Some(v) = headers.get("x-csrf-token").and_then(|v| v.to_str().ok()) {
        return v.to_string();
    }
    // Tokens are URL-safe base64: no percent-decoding needed.
    std::str::from_utf8(body)
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix("csrf="))
        .unwrap_or("")
        .to_string()
}

async fn api_deploy(
    State(state): State<WebState>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: Bytes,
) -> Response {
    let (token, s) = match signed_in(&state, &headers).await {
        Ok(v) => (v.token, v.session),
        Err(r) => return *r,
    };
    if !csrf_matches(&token, &submitted_csrf(&headers, &body)) {
        return csrf_refused(&state);
    }
    let (d, s, name, _) = match allowed(&state, &headers, name.clone()).await {
        Ok(v) => v,
        Err(r) => {
            if r.status() == StatusCode::FORBIDDEN {
                state
                    .audit_durable(
                        AuditEvent::new("domain.deploy_denied", "denied")
                            .actor(s.email.as_str())
                            .subject(crate::text::capped(&name, 253))
                            .detail("another owner's domain"),
                    )
                    .await;
            }
            return *r;
        }
    };
    let actor = s.email.clone();
    match crate::blocking::run(move || d.deploy(&name, &actor)).await {
        Ok(job) => (
            StatusCode::ACCEPTED,
            [(header::LOCATION, format!("/domains#{}", job.id))],
            axum::Json(json!({ "job": job.id, "state": job.state })),
        )
            .into_response(),
        Err(e) => controller_error(e),
    }
}

async fn script() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        DOMAINS_JS,
    )
        .into_response()
}

/// Presses Deploy Certificate without leaving the page and follows the job.
const DOMAINS_JS: &str = r#""use strict";
(function () {
  var table = document.getElementById("domains");
  if (!table) return;
  var csrf = table.getAttribute("data-csrf");
  var progress = document.getElementById("progress");
  function row(name) {
    return table.querySelector('tr[data-domain="' + CSS.escape(name) + '"]');
  }
  function show(name, d) {
    var r = row(name);
    if (!r) return;
    var st = d.state;
    if (st === "deploying" || st === "deployed") st += " " + d.edges_serving + "/" + d.edges_total;
    r.querySelector(".state").textContent = st;
    r.querySelector(".serial").textContent = d.serial_hex || "-";
    r.querySelector(".expiry").textContent = d.not_after_unix ? new Date(d.not_after_unix * 1000).toISOString().replace(".000", "") : "-";
    r.querySelector(".staple").textContent = d.staple || "-";
    r.querySelector(".error").textContent = d.error || "";
  }
  function follow(name, job) {
    fetch("/api/domains/" + encodeURIComponent(name), { credentials: "same-origin" })
      .then(function (resp) { return resp.json(); })
      .then(function (d) {
        show(name, d);
        var j = d.job;
        if (j && j.id === job) {
          progress.hidden = false;
          progress.textContent = name + ": " + j.state + " — " + j.detail;
          if (j.state === "deployed" || j.state === "failed") return;
        }
        setTimeout(function () { follow(name, job); }, 1000);
      })
      .catch(function () { setTimeout(function () { follow(name, job); }, 2000); });
  }
  table.addEventListener("submit", function (ev) {
    var form = ev.target;
    if (!form.classList.contains("deploy-form")) return;
    ev.preventDefault();
    var name = form.querySelector("button").getAttribute("data-domain");
    fetch(form.getAttribute("action"), {
      method: "POST",
      credentials: "same-origin",
      headers: { "x-csrf-token": csrf }
    })
      .then(function (resp) { return resp.json().then(function (b) { return [resp.status, b]; }); })
      .then(function (r) {
        if (r[0] !== 202) {
          progress.hidden = false;
          progress.textContent = name + ": " + (r[1].error || ("refused (" + r[0] + ")"));
          return;
        }
        follow(name, r[1].job);
      });
  });
})();
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_csrf_token_comes_from_the_header_or_the_form_field() {
        let mut h = HeaderMap::new();
        assert_eq!(submitted_csrf(&h, b"a=1&csrf=abc_-9&b=2"), "abc_-9");
        assert_eq!(submitted_csrf(&h, b"a=1"), "");
        h.insert("x-csrf-token", "from-header".parse().unwrap());
        assert_eq!(submitted_csrf(&h, b"csrf=from-form"), "from-header");
    }
}
