//! Users in the console: add admins and portal owners, disable a user, reset a user's TOTP.
//! The work is `auth::cli`'s, as for `zonemesh-controller user ...`, audited with the admin
//! as actor.

use std::fmt::Write as _;
use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Form, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde::Deserialize;
use zeroize::Zeroizing;

use super::super::WebState;
use super::super::form::{SignedIn, admin_page};
use super::super::pages::esc;
use super::{Done, Message, View, act, console_page};
use crate::auth::{Role, cli as auth_cli, normalize_email};
use crate::error::ControllerError;

pub(super) async fn page(State(state): State<WebState>, headers: HeaderMap) -> Response {
    match admin_page(&state, &headers).await {
        Ok(who) => view(&state, &who, StatusCode::OK, None).await,
        Err(r) => *r,
    }
}

pub(super) async fn view(
    state: &WebState,
    who: &SignedIn,
    status: StatusCode,
    message: Option<Message>,
) -> Response {
    let users = state.users().clone();
    let list = match crate::blocking::run(move || users.list_users()).await {
        Ok(l) => l,
        Err(e) => return super::super::internal(e),
    };
    let mut rows = String::new();
    for u in &list {
        let email = esc(&u.email);
        let csrf = esc(&who.csrf);
        let actions = if u.email == who.email() {
            "(you)".to_string()
        } else {
            let disable = if u.disabled {
                String::new()
            } else {
                format!(
                    r#"<form method="post" action="/admin/users/disable" class="inline"><input type="hidden" name="csrf" value="{csrf}"><input type="hidden" name="email" value="{email}"><button type="submit" class="disable" data-email="{email}">Disable</button></form> "#
                )
            };
            format!(
                r#"{disable}<form method="post" action="/admin/users/reset-totp" class="inline"><input type="hidden" name="csrf" value="{csrf}"><input type="hidden" name="email" value="{email}"><button type="submit" class="reset-totp" data-email="{email}">Reset TOTP</button></form>"#
            )
        };
        let _ = write!(
            rows,
            r#"<tr data-email="{email}"><td>{email}</td><td>{role}</td><td class="state">{state}</td><td class="totp">{totp}</td><td>{codes}</td><td>{created}</td><td>{actions}</td></tr>"#,
            role = u.role.as_str(),
            state = if u.disabled { "disabled" } else { "active" },
            totp = if u.totp_confirmed {
                "enrolled"
            } else {
                "not enrolled"
            },
            codes = u.recovery_codes_left,
            created = crate::audit::format_utc(u.created_unix_ms),
        );
    }
    if list.is_empty() {
        rows.push_str(r#"<tr class="none"><td colspan="7">No users.</td></tr>"#);
    }
    let body = format!(
        r#"<table id="users"><thead><tr><th>E-mail</th><th>Role</th><th>State</th><th>TOTP</th><th>Recovery codes left</th><th>Added (UTC)</th><th></th></tr></thead><tbody>{rows}</tbody></table>
<p>Disabling a user ends their sessions and revokes their SSH certificates. Resetting TOTP forgets their authenticator and recovery codes and ends their sessions: they set up a new one at their next sign-in.</p>
<h2>Add a user</h2>
<form method="post" action="/admin/users" id="add-user">
<input type="hidden" name="csrf" value="{csrf}">
<label for="email">E-mail address</label><input type="email" id="email" name="email" required>
<label for="role">Role</label><select id="role" name="role"><option value="portal-owner">portal owner</option><option value="admin">admin</option></select>
<label for="password">First password (give it to them; at least 8 characters)</label><input type="password" id="password" name="password" autocomplete="new-password" minlength="8" required>
<p>An admin sets up TOTP at the first sign-in, before any session.</p>
<button type="submit" id="add">Add user</button></form>"#,
        csrf = esc(&who.csrf),
    );
    console_page(who, status, "Users", message.as_ref(), &body)
}

#[derive(Deserialize)]
pub(super) struct AddForm {
    #[serde(default)]
    csrf: String,
    email: String,
    role: String,
    password: String,
}

impl Drop for AddForm {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.password);
    }
}

pub(super) async fn add(
    State(state): State<WebState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(form): Form<AddForm>,
) -> Response {
    let ask = (form.csrf.as_str(), "user.add");
    act(&state, &headers, peer, ask, View::Users, |who| {
        let role: Role = form.role.parse().map_err(ControllerError::BadRequest)?;
        let (users, audit) = (state.users().clone(), state.inner.audit.clone());
        let (email, actor) = (form.email.trim().to_string(), who.email().to_string());
        let password = Zeroizing::new(form.password.clone());
        Ok(move || {
            let a = auth_cli::add_user(&users, &audit, &email, role, &password, &actor)?;
            let text = match a.role {
                Role::Admin => format!(
                    "Admin {} added; they set up TOTP at their first sign-in.",
                    a.email
                ),
                Role::PortalOwner => format!("Portal owner {} added.", a.email),
            };
            Ok(Done::show(View::Users, Some(text)))
        })
    })
    .await
}

#[derive(Deserialize)]
pub(super) struct UserForm {
    #[serde(default)]
    csrf: String,
    email: String,
}

/// Refuse an action on the admin's own account (they would lock themselves out).
fn not_yourself(who: &SignedIn, email: &str) -> Result<String, ControllerError> {
    let email = normalize_email(email);
    if email == who.email() {
        return Err(ControllerError::BadRequest(
            "not on your own account: ask another admin".into(),
        ));
    }
    Ok(email)
}

pub(super) async fn disable(
    State(state): State<WebState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(form): Form<UserForm>,
) -> Response {
    let ask = (form.csrf.as_str(), "user.disable");
    act(&state, &headers, peer, ask, View::Users, |who| {
        let email = not_yourself(who, &form.email)?;
        let (st, actor) = (state.clone(), who.email().to_string());
        Ok(move || {
            let ended =
                auth_cli::disable_user(st.users(), st.sessions(), &st.inner.audit, &email, &actor)?;
            // A disabled user's SSH certificates go on the KRL of every server, as with the CLI.
            if let Some(ssh) = st.ssh() {
                ssh.revoke_email(&email, &actor)?;
            }
            let text = format!("{email} disabled; {ended} session(s) ended.");
            Ok(Done::show(View::Users, Some(text)))
        })
    })
    .await
}

pub(super) async fn reset_totp(
    State(state): State<WebState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(form): Form<UserForm>,
) -> Response {
    let ask = (form.csrf.as_str(), "user.reset-totp");
    act(&state, &headers, peer, ask, View::Users, |who| {
        let email = not_yourself(who, &form.email)?;
        let (st, actor) = (state.clone(), who.email().to_string());
        Ok(move || {
            let ended =
                auth_cli::reset_totp(st.users(), st.sessions(), &st.inner.audit, &email, &actor)?;
            let text = format!(
                "TOTP of {email} reset; {ended} session(s) ended. They set up a new authenticator at their next sign-in."
            );
            Ok(Done::show(View::Users, Some(text)))
        })
    })
    .await
}
