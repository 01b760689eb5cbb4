//! The Security page (admins only): the blocks in force with their evidence and expiry,
//! the recent security events, the operator allow-list, and a manual unblock.
//!
//! - `GET /security`: server-rendered, readable without JavaScript.
//! - `POST /security/unblock`: form fields `csrf` and `address`; audited with the admin's
//!   e-mail and what the block was; redirects back to the page.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Form, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};

use super::WebState;
use super::form::{admin_form, admin_page};
use super::pages::{Viewer, esc, layout};
use crate::audit::{AuditEvent, format_utc};
use crate::error::ControllerError;
use crate::mesh::{Mesh, RecentEvent};
use crate::store::{AllowRecord, BlockRecord};

/// Events shown.
const EVENTS_SHOWN: usize = 50;

pub(super) fn routes() -> Router<WebState> {
    Router::new()
        .route("/security", get(page))
        .route("/security/unblock", post(unblock))
}

fn mesh_of(state: &WebState) -> Result<Arc<Mesh>, Box<Response>> {
    state.inner.mesh.get().cloned().ok_or_else(|| {
        Box::new(
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "the mesh is not available on this controller",
            )
                .into_response(),
        )
    })
}

async fn page(State(state): State<WebState>, headers: HeaderMap) -> Response {
    let who = match admin_page(&state, &headers).await {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let mesh = match mesh_of(&state) {
        Ok(m) => m,
        Err(r) => return *r,
    };
    let now = state.now();
    let m = mesh.clone();
    let read =
        crate::blocking::run(move || Ok::<_, ControllerError>((m.blocks(now)?, m.allow_list()?)))
            .await;
    let (blocks, allow) = match read {
        Ok(v) => v,
        Err(e) => {
            tracing::error!(error = %e, "security page failed");
            return (StatusCode::INTERNAL_SERVER_ERROR, "internal error").into_response();
        }
    };
    let events = mesh.recent_events();
    Html(render(&who.viewer(), &blocks, &events, &allow, now)).into_response()
}

fn utc(unix: u64) -> String {
    format_utc(unix.saturating_mul(1000))
}

fn render(
    viewer: &Viewer<'_>,
    blocks: &[BlockRecord],
    events: &[RecentEvent],
    allow: &[AllowRecord],
    now: std::time::SystemTime,
) -> String {
    let now = crate::store::unix(now);
    let mut b = String::new();
    for r in blocks {
        b.push_str(&format!(
            r#"<tr data-address="{addr}"><td class="mono">{addr}</td><td>{since}</td><td class="until">{until} (in {left}s)</td><td>{offence}</td><td class="evidence">{reason}</td><td><form method="post" action="/security/unblock" class="inline unblock-form"><input type="hidden" name="csrf" value="{csrf}"><input type="hidden" name="address" value="{addr}"><button type="submit" class="unblock" data-address="{addr}">Unblock</button></form></td></tr>"#,
            addr = esc(&r.address.to_string()),
            since = if r.since_unix == 0 { "-".into() } else { utc(r.since_unix) },
            until = utc(r.until_unix),
            left = r.until_unix.saturating_sub(now),
            offence = if r.offence == 0 { "manual".into() } else { r.offence.to_string() },
            reason = esc(&r.reason),
            csrf = esc(viewer.csrf),
        ));
    }
    if blocks.is_empty() {
        b.push_str(r#"<tr class="none"><td colspan="6">No source is blocked.</td></tr>"#);
    }
    let mut e = String::new();
    for ev in events.iter().take(EVENTS_SHOWN) {
        e.push_str(&format!(
            r#"<tr><td>{at}</td><td class="mono">{node}</td><td class="mono">{kind}</td><td class="mono">{source}</td><td>{count}</td><td>{counted}</td><td>{detail}</td></tr>"#,
            at = utc(ev.at_unix),
            node = esc(&ev.node),
            kind = esc(&ev.kind),
            source = esc(&ev.source),
            count = ev.count,
            counted = if ev.counted { "yes" } else { "no (source not verified)" },
            detail = esc(&ev.detail),
        ));
    }
    if events.is_empty() {
        e.push_str(
            r#"<tr class="none"><td colspan="7">No events since the controller started.</td></tr>"#,
        );
    }
    let mut a = String::new();
    for r in allow {
        a.push_str(&format!(
            r#"<tr><td class="mono">{net}</td><td>{added}</td><td>{note}</td></tr>"#,
            net = esc(&r.net.to_string()),
            added = utc(r.added_unix),
            note = esc(&r.note),
        ));
    }
    if allow.is_empty() {
        a.push_str(r#"<tr class="none"><td colspan="3">Empty (zonemesh-controller block allow CIDR).</td></tr>"#);
    }
    layout(
        "Security",
        Some(viewer),
        &format!(
            r#"<h1>Security</h1>
<h2>Blocked sources</h2>
<table id="blocks"><thead><tr><th>Address</th><th>Since</th><th>Until</th><th>Offence</th><th>Evidence</th><th></th></tr></thead><tbody>{b}</tbody></table>
<h2>Recent events</h2>
<table id="events"><thead><tr><th>At</th><th>Reported by</th><th>Kind</th><th>Source</th><th>Events</th><th>Counted</th><th>Detail</th></tr></thead><tbody>{e}</tbody></table>
<h2>Allow-list</h2>
<table id="allow"><thead><tr><th>Range</th><th>Added</th><th>Note</th></tr></thead><tbody>{a}</tbody></table>"#
        ),
    )
}

#[derive(serde::Deserialize)]
pub(super) struct UnblockForm {
    csrf: String,
    address: String,
}

async fn unblock(
    State(state): State<WebState>,
    headers: HeaderMap,
    Form(form): Form<UnblockForm>,
) -> Response {
    let who = match admin_form(&state, &headers, &form.csrf, "source.unblock").await {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let mesh = match mesh_of(&state) {
        Ok(m) => m,
        Err(r) => return *r,
    };
    let Ok(ip) = form.address.trim().parse::<std::net::IpAddr>() else {
        return (StatusCode::BAD_REQUEST, "not an IP address").into_response();
    };
    match crate::blocking::run(move || mesh.unblock_source(ip)).await {
        Ok(rec) => {
            state
                .audit_durable(
                    AuditEvent::new("source.unblocked", "ok")
                        .actor(who.email())
                        .source(rec.address)
                        .detail(format!(
                            "unblocked on the Security page; was blocked until {}: {}",
                            rec.until_unix, rec.reason
                        )),
                )
                .await;
            Redirect::to("/security").into_response()
        }
        Err(ControllerError::NotFound(_)) => Redirect::to("/security").into_response(),
        Err(e) => {
            tracing::error!(error = %e, "unblock failed");
            (StatusCode::INTERNAL_SERVER_ERROR, "internal error").into_response()
        }
    }
}
