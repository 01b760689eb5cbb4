//! The admin console: what admins do every day, in the browser. Server-rendered and
//! usable without JavaScript; every page and form is admin-only (a portal owner gets `403`
//! and nothing is done, the attempt audited), every form carries the session's CSRF token,
//! every action is audited with the admin's e-mail and source address. The actions call
//! the same code as the CLI (`Mesh`, `auth::cli`), so validation and errors are the same.
//!
//! - `GET /admin`: the sections
//! - `GET /admin/zones`, `POST /admin/zones`: zones; add one (`name`, `cidr`,
//!   `intra_zone_tunnels`)
//! - `GET /admin/tokens`, `POST /admin/tokens`: enrollment tokens without their secret;
//!   create one (`zone`, `uses`, `ttl`): the token is shown once, inside the
//!   `zonemesh-agent enroll` command to paste
//! - `GET /admin/nodes?zone=`, `POST /admin/nodes/revoke`: nodes by zone; revoking asks
//!   first (a second form listing what will be revoked, sent with `confirm=yes`)
//! - `GET /admin/users`, `POST /admin/users`, `POST /admin/users/disable`,
//!   `POST /admin/users/reset-totp`: users; add, disable, reset TOTP
//! - `GET /admin/audit?kind=&actor=&text=&from=&to=&before=`: the audit log, filtered,
//!   newest first, paged
//! - `GET /admin/ca`: CA certificates, fingerprints, validity, the CRL

/// In a section's module: re-render with `$view` showing why `$e` was refused, or the generic failure page
/// (the module imports `refusal` and `Message`).
macro_rules! refused {
    ($view:ident($state:expr, $who:expr), $e:expr) => {
        match refusal(&$e) {
            Some((status, text)) => $view($state, $who, status, Some(Message::Error(text))).await,
            None => super::super::internal($e),
        }
    };
}

mod audit;
mod ca;
mod mesh;
mod users;

use std::fmt::Write as _;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};

use super::WebState;
use super::form::{SignedIn, admin_page};
use super::pages::{esc, layout};
use crate::error::ControllerError;
use crate::mesh::Mesh;

/// The routes of the console.
pub(super) fn routes() -> Router<WebState> {
    Router::new()
        .route("/admin", get(index))
        .route("/admin/zones", get(mesh::zones_page).post(mesh::zone_add))
        .route(
            "/admin/tokens",
            get(mesh::tokens_page).post(mesh::token_create),
        )
        .route("/admin/nodes", get(mesh::nodes_page))
        .route("/admin/nodes/revoke", post(mesh::node_revoke))
        .route("/admin/users", get(users::page).post(users::add))
        .route("/admin/users/disable", post(users::disable))
        .route("/admin/users/reset-totp", post(users::reset_totp))
        .route("/admin/audit", get(audit::page))
        .route("/admin/ca", get(ca::page))
}

/// The console's sections, in the order of its menu.
const SECTIONS: [(&str, &str, &str); 6] = [
    ("/admin/zones", "Zones", "admin-zones"),
    ("/admin/tokens", "Enrollment tokens", "admin-tokens"),
    ("/admin/nodes", "Nodes", "admin-nodes"),
    ("/admin/users", "Users", "admin-users"),
    ("/admin/audit", "Audit log", "admin-audit"),
    ("/admin/ca", "CA", "admin-ca"),
];

/// A console page: the section menu, the message (an error or a notice) and `body`.
fn console_page(
    who: &SignedIn,
    status: StatusCode,
    title: &str,
    message: Option<&Message>,
    body: &str,
) -> Response {
    let mut menu = String::from(r#"<nav class="card" id="admin-menu">"#);
    for (href, label, id) in SECTIONS {
        let current = if label == title {
            r#" aria-current="page""#
        } else {
            ""
        };
        let _ = write!(menu, r#"<a href="{href}" id="{id}"{current}>{label}</a> "#);
    }
    menu.push_str("</nav>");
    let msg = message.map(Message::html).unwrap_or_default();
    let html = layout(
        title,
        Some(&who.viewer()),
        &format!(
            r#"{menu}<div class="card"><h1>{}</h1>{msg}{body}</div>"#,
            esc(title)
        ),
    );
    (status, Html(html)).into_response()
}

/// A line above a page's content.
enum Message {
    Error(String),
    Notice(String),
}

impl Message {
    fn html(&self) -> String {
        let (class, text) = match self {
            Message::Error(t) => ("error", t),
            Message::Notice(t) => ("notice", t),
        };
        format!(r#"<p class="{class}" id="message">{}</p>"#, esc(text))
    }
}

/// What the caller may see of a refused action (the same text the CLI prints), with its
/// status; `None` for an internal failure, which is logged and shown generically.
fn refusal(e: &ControllerError) -> Option<(StatusCode, String)> {
    use ControllerError as E;
    let status = match e {
        E::BadRequest(_) | E::RateLimited(_) => StatusCode::BAD_REQUEST,
        E::Ca(zonemesh_ca::Error::BadInput(_) | zonemesh_ca::Error::Name(_)) => {
            StatusCode::BAD_REQUEST
        }
        E::NotFound(_) => StatusCode::NOT_FOUND,
        E::AlreadyExists(_) => StatusCode::CONFLICT,
        E::PermissionDenied(_) => StatusCode::FORBIDDEN,
        E::Auth(a) => return auth_refusal(a),
        _ => return None,
    };
    Some((status, e.to_string()))
}

fn auth_refusal(e: &crate::auth::AuthError) -> Option<(StatusCode, String)> {
    use crate::auth::AuthError as A;
    let status = match e {
        A::InvalidEmail(_) | A::WeakPassword(_) => StatusCode::BAD_REQUEST,
        A::UserExists(_) => StatusCode::CONFLICT,
        A::NoSuchUser(_) => StatusCode::NOT_FOUND,
        _ => return None,
    };
    Some((status, e.to_string()))
}

/// The mesh, or the page saying this controller serves none.
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

/// Unix seconds as the CLI prints them.
fn when(unix: u64) -> String {
    crate::cli::render::fmt_unix(unix)
}

async fn index(State(state): State<WebState>, headers: HeaderMap) -> Response {
    let who = match admin_page(&state, &headers).await {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let body = r#"<ul id="admin-sections">
<li><a href="/admin/zones">Zones</a>: the overlay ranges, add one.</li>
<li><a href="/admin/tokens">Enrollment tokens</a>: create one and paste the enroll command on the new server.</li>
<li><a href="/admin/nodes">Nodes</a>: every enrolled node by zone; revoke one.</li>
<li><a href="/admin/users">Users</a>: add admins and portal owners, disable a user, reset a lost authenticator.</li>
<li><a href="/admin/audit">Audit log</a>: every security decision, filtered.</li>
<li><a href="/admin/ca">CA</a>: the CA certificates and the revocation list.</li>
</ul>"#;
    console_page(&who, StatusCode::OK, "Admin", None, body)
}
