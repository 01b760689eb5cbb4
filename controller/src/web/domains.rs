//! The Domains page and its endpoints: every domain for an admin, only their own for a
//! portal owner; the Deploy Certificate button starts (or joins) the domain's job and the
//! page follows it.
//!
//! - `GET /domains`: the page (state, issuer, serial, expiry, the button)
//! - `GET /api/domains/{name}`: the domain as `domain list --json` shows it, plus its job
//! - `POST /api/domains/{name}/deploy-certificate`: CSRF token in `x-csrf-token` or the
//!   form field `csrf`; `202` with `{"job", "state"}` at once
//! - `GET /static/domains.js`: the page's script (a served file: the CSP allows no inline
//!   script)

use std::fmt::Write as _;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;

use super::pages::{Viewer, esc, layout};
use super::session::{Need, session};
use super::{WebState, csrf_refused};
use crate::audit::AuditEvent;
use crate::auth::session::{csrf_for, csrf_matches};
use crate::auth::{Role, Session};
use crate::domains::{DomainView, Domains};
use crate::error::ControllerError;

/// The routes of this page.
pub(super) fn routes() -> Router<WebState> {
    Router::new()
        .route("/domains", get(page))
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
    let (token, s) = match session(&state, &headers, Need::Full) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let d = match domains_of(&state) {
        Ok(d) => d,
        Err(r) => return *r,
    };
    let rows = match crate::blocking::run(move || d.list()).await {
        Ok(rows) => rows,
        Err(e) => return controller_error(e),
    };
    let rows: Vec<DomainView> = rows.into_iter().filter(|r| may_see(&s, &r.owner)).collect();
    let csrf = csrf_for(&token);
    let viewer = Viewer {
        email: &s.email,
        role: s.role.as_str(),
        csrf: &csrf,
    };
    Html(render(&viewer, &rows)).into_response()
}

fn render(viewer: &Viewer<'_>, rows: &[DomainView]) -> String {
    let mut t = String::new();
    for d in rows {
        let name = esc(&d.name);
        let expiry = d
            .not_after_unix
            .map(crate::cli::render::fmt_unix)
            .unwrap_or_else(|| "-".into());
        let _ = write!(
            t,
            r#"<tr data-domain="{name}"><td class="mono">{name}</td><td>{issuer}</td><td class="state">{state}</td><td class="mono serial">{serial}</td><td class="expiry">{expiry}</td><td class="bad error">{error}</td><td><form method="post" action="/api/domains/{name}/deploy-certificate" class="inline deploy-form"><input type="hidden" name="csrf" value="{csrf}"><button type="submit" class="deploy" data-domain="{name}">Deploy Certificate</button></form></td></tr>"#,
            issuer = d.issuer.as_str(),
            state = esc(&crate::cli::render::domain_state(d)),
            serial = esc(d.serial_hex.as_deref().unwrap_or("-")),
            error = esc(d.error.as_deref().unwrap_or("")),
            csrf = esc(viewer.csrf),
        );
    }
    if rows.is_empty() {
        t.push_str(r#"<tr><td colspan="7">No domains yet.</td></tr>"#);
    }
    layout(
        "Domains",
        Some(viewer),
        &format!(
            r#"<div class="card"><h1>Domains</h1>
<p>Deploy Certificate issues a certificate for the domain and puts it on every edge of its zones.</p>
<table id="domains" data-csrf="{csrf}"><thead><tr><th>Domain</th><th>Issuer</th><th>State</th><th>Serial</th><th>Expires</th><th>Error</th><th></th></tr></thead><tbody>{t}</tbody></table>
<p id="progress" class="notice" hidden></p>
<p><a href="/dashboard">Back to the dashboard</a></p></div>
<script src="/static/domains.js"></script>"#,
            csrf = esc(viewer.csrf),
        ),
    )
}

/// The domain `name` for a signed-in user allowed on it.
async fn allowed(
    state: &WebState,
    headers: &HeaderMap,
    name: String,
) -> Result<(Arc<Domains>, Session, String, zeroize::Zeroizing<String>), Box<Response>> {
    let (token, s) = session(state, headers, Need::Full)?;
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
    let (token, s) = match session(&state, &headers, Need::Full) {
        Ok(v) => v,
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
