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

mod audit;
mod ca;
mod mesh;
mod users;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};

use super::WebState;
use super::form::{SignedIn, admin_form, admin_page};
use super::pages::{esc, layout};
use crate::audit::AuditEvent;
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

/// A section's page as an action shows it again: after a refusal (with why) or after the
/// action (with what was done).
pub(super) enum View {
    Zones,
    /// The token list, with the command of a token just created above it.
    Tokens(Option<String>),
    /// The nodes of one zone (`""`: every zone).
    Nodes(String),
    Users,
}

impl View {
    async fn render(
        self,
        state: &WebState,
        who: &SignedIn,
        status: StatusCode,
        message: Option<Message>,
    ) -> Response {
        match self {
            View::Zones => mesh::zones_view(state, who, status, message).await,
            View::Tokens(created) => {
                mesh::tokens_view_with(state, who, status, message, created).await
            }
            View::Nodes(zone) => mesh::nodes_view(state, who, status, message, zone).await,
            View::Users => users::view(state, who, status, message).await,
        }
    }
}

/// `view` again, showing why `e` was refused, or the generic failure page.
async fn refuse(view: View, state: &WebState, who: &SignedIn, e: ControllerError) -> Response {
    match refusal(&e) {
        Some((status, text)) => {
            view.render(state, who, status, Some(Message::Error(text)))
                .await
        }
        None => super::internal(e),
    }
}

/// Why an action stopped before its work: a refusal (shown on the action's page) or a
/// page of its own (the mesh is not served here).
pub(super) enum Stop {
    Refused(ControllerError),
    Page(Box<Response>),
}

impl From<ControllerError> for Stop {
    fn from(e: ControllerError) -> Self {
        Stop::Refused(e)
    }
}

impl From<Box<Response>> for Stop {
    fn from(r: Box<Response>) -> Self {
        Stop::Page(r)
    }
}

/// A page built from the admin's session (its CSRF token).
type PageFn = Box<dyn FnOnce(&SignedIn) -> Response + Send>;

/// What an action's work ends with: the audit event, and what the admin sees next.
pub(super) struct Done {
    /// Kind, subject and detail of the `ok` event; `None` where the work audits itself
    /// (the user actions, through `auth::cli`, as for the CLI).
    audit: Option<(&'static str, String, String)>,
    then: Then,
}

enum Then {
    Redirect(&'static str),
    Show(View, Option<Message>),
    Page(PageFn),
}

impl Done {
    /// Go to `to` (a redirect: reloading it posts nothing again).
    pub(super) fn redirect(to: &'static str) -> Self {
        Self {
            audit: None,
            then: Then::Redirect(to),
        }
    }

    /// Show `view`, with `notice` above it.
    pub(super) fn show(view: View, notice: Option<String>) -> Self {
        Self {
            audit: None,
            then: Then::Show(view, notice.map(Message::Notice)),
        }
    }

    /// Show a page of the action's own (`200`).
    pub(super) fn page(page: impl FnOnce(&SignedIn) -> Response + Send + 'static) -> Self {
        Self {
            audit: None,
            then: Then::Page(Box::new(page)),
        }
    }

    /// Audit the action as `kind` `ok`, on `subject`, durable before the reply.
    pub(super) fn audited(mut self, kind: &'static str, subject: String, detail: String) -> Self {
        self.audit = Some((kind, subject, detail));
        self
    }
}

/// Every console form's action, done one way: the session, CSRF token and admin role
/// (`admin_form`: anyone else gets `403` and the attempt is audited as
/// `<attempt>_denied`), then `prepare` on the request's task (cheap checks of the form;
/// it returns the work), the work on the blocking pool (store writes, signatures), the
/// audit event it names, and its page. A refusal, from `prepare` or the work, shows
/// `refused_on` again with why.
pub(super) async fn act<W>(
    state: &WebState,
    headers: &HeaderMap,
    peer: SocketAddr,
    (csrf, attempt): (&str, &str),
    refused_on: View,
    prepare: impl FnOnce(&SignedIn) -> Result<W, Stop>,
) -> Response
where
    W: FnOnce() -> Result<Done, ControllerError> + Send + 'static,
{
    let who = match admin_form(state, headers, csrf, attempt).await {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let work = match prepare(&who) {
        Ok(w) => w,
        Err(Stop::Page(r)) => return *r,
        Err(Stop::Refused(e)) => return refuse(refused_on, state, &who, e).await,
    };
    let done = match crate::blocking::run(work).await {
        Ok(d) => d,
        Err(e) => return refuse(refused_on, state, &who, e).await,
    };
    if let Some((kind, subject, detail)) = done.audit {
        state
            .audit_durable(
                AuditEvent::new(kind, "ok")
                    .actor(who.email())
                    .subject(subject)
                    .source(peer.ip())
                    .detail(detail),
            )
            .await;
    }
    match done.then {
        Then::Redirect(to) => Redirect::to(to).into_response(),
        Then::Show(view, message) => view.render(state, &who, StatusCode::OK, message).await,
        Then::Page(page) => page(&who),
    }
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
