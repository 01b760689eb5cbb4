//! Zones, enrollment tokens and nodes in the console.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::{ConnectInfo, Form, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde::Deserialize;
use zonemesh_ca::RevocationReason;

use super::super::WebState;
use super::super::form::{SignedIn, admin_page};
use super::super::pages::esc;
use super::{Done, Message, View, act, console_page, mesh_of, when};
use crate::error::ControllerError;
use crate::mesh::{CreatedToken, Mesh};
use crate::store::{NodeRecord, TokenRecord, ZoneRecord};

/// Rows a list shows at most (the newest tokens, the first nodes by zone and name).
const MAX_ROWS: usize = 1000;
/// The state directory the enroll command names (the package's).
const AGENT_STATE_DIR: &str = "/var/lib/zonemesh-agent";

/// What a section's page shows, read from the store on the blocking pool; the page
/// saying the mesh is not served here, or the generic failure page.
async fn read<T: Send + 'static>(
    state: &WebState,
    f: impl FnOnce(&Mesh, &crate::store::Store) -> Result<T, ControllerError> + Send + 'static,
) -> Result<T, Box<Response>> {
    let mesh = mesh_of(state)?;
    crate::blocking::run(move || f(&mesh, mesh.authority().store()))
        .await
        .map_err(|e| Box::new(super::super::internal(e)))
}

// ---- zones ----

pub(super) async fn zones_page(State(state): State<WebState>, headers: HeaderMap) -> Response {
    match admin_page(&state, &headers).await {
        Ok(who) => zones_view(&state, &who, StatusCode::OK, None).await,
        Err(r) => *r,
    }
}

pub(super) async fn zones_view(
    state: &WebState,
    who: &SignedIn,
    status: StatusCode,
    message: Option<Message>,
) -> Response {
    let (zones, nodes) = match read(state, |_, store| Ok((store.zones()?, store.nodes()?))).await {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let mut rows = String::new();
    for z in &zones {
        let active = nodes
            .iter()
            .filter(|n| n.zone == z.name && !n.revoked)
            .count();
        let _ = write!(
            rows,
            r#"<tr data-zone="{name}"><td><a href="/admin/nodes?zone={name}">{name}</a></td><td class="mono">{cidr}</td><td>{tunnels}</td><td>{active}</td><td>{created}</td></tr>"#,
            name = esc(&z.name),
            cidr = esc(&z.cidr.to_string()),
            tunnels = if z.intra_zone_tunnels { "yes" } else { "no" },
            created = when(z.created_unix),
        );
    }
    if zones.is_empty() {
        rows.push_str(r#"<tr class="none"><td colspan="5">No zones yet.</td></tr>"#);
    }
    let body = format!(
        r#"<table id="zones"><thead><tr><th>Zone</th><th>Overlay range</th><th>Tunnels inside the zone</th><th>Active nodes</th><th>Added</th></tr></thead><tbody>{rows}</tbody></table>
<h2>Add a zone</h2>
<form method="post" action="/admin/zones" id="add-zone">
<input type="hidden" name="csrf" value="{csrf}">
<label for="name">Name</label><input type="text" id="name" name="name" required placeholder="eu-1">
<label for="cidr">Overlay range (CIDR)</label><input type="text" id="cidr" name="cidr" required placeholder="100.64.1.0/24">
<label><input type="checkbox" id="intra_zone_tunnels" name="intra_zone_tunnels" value="on"> Tunnels between the nodes of this zone too</label>
<button type="submit" id="add">Add zone</button></form>"#,
        csrf = esc(&who.csrf),
    );
    console_page(who, status, "Zones", message.as_ref(), &body)
}

#[derive(Deserialize)]
pub(super) struct ZoneForm {
    #[serde(default)]
    csrf: String,
    name: String,
    cidr: String,
    #[serde(default)]
    intra_zone_tunnels: Option<String>,
}

pub(super) async fn zone_add(
    State(state): State<WebState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(form): Form<ZoneForm>,
) -> Response {
    let tunnels = form.intra_zone_tunnels.is_some();
    let (name, cidr) = (form.name.trim().to_string(), form.cidr.trim().to_string());
    let ask = (form.csrf.as_str(), "zone.add");
    act(&state, &headers, peer, ask, View::Zones, |_| {
        let mesh = mesh_of(&state)?;
        Ok(move || {
            let now = mesh.now();
            let z = mesh.add_zone(&name, &cidr, tunnels, now)?;
            let detail = format!("cidr {}", z.cidr);
            Ok(Done::redirect("/admin/zones").audited("zone.added", z.name, detail))
        })
    })
    .await
}

// ---- tokens ----

pub(super) async fn tokens_page(State(state): State<WebState>, headers: HeaderMap) -> Response {
    match admin_page(&state, &headers).await {
        Ok(who) => tokens_view_with(&state, &who, StatusCode::OK, None, None).await,
        Err(r) => *r,
    }
}

/// The token list, the create form, and `created` (the command with the token, shown
/// once) above them.
pub(super) async fn tokens_view_with(
    state: &WebState,
    who: &SignedIn,
    status: StatusCode,
    message: Option<Message>,
    created: Option<String>,
) -> Response {
    let (zones, mut tokens, now) = match read(state, |mesh, store| {
        Ok((store.zones()?, store.tokens()?, mesh.now()))
    })
    .await
    {
        Ok(v) => v,
        Err(r) => return *r,
    };
    tokens.sort_by_key(|t| std::cmp::Reverse(t.1.created_unix));
    let now = crate::store::unix(now);
    let mut rows = String::new();
    for (id, t) in tokens.iter().take(MAX_ROWS) {
        let _ = write!(
            rows,
            r#"<tr><td class="mono">{id}</td><td>{zone}</td><td>{left}</td><td>{created}</td><td>{expires}</td><td>{state}</td></tr>"#,
            id = esc(id),
            zone = esc(&t.zone),
            left = t.uses_left,
            created = when(t.created_unix),
            expires = when(t.expires_unix),
            state = token_state(t, now),
        );
    }
    if tokens.is_empty() {
        rows.push_str(r#"<tr class="none"><td colspan="6">No tokens yet.</td></tr>"#);
    }
    let mut options = String::new();
    for z in &zones {
        let _ = write!(
            options,
            r#"<option value="{n}">{n}</option>"#,
            n = esc(&z.name)
        );
    }
    let form = if zones.is_empty() {
        r#"<p class="notice">Add a <a href="/admin/zones">zone</a> first.</p>"#.to_string()
    } else {
        format!(
            r#"<form method="post" action="/admin/tokens" id="create-token">
<input type="hidden" name="csrf" value="{csrf}">
<label for="zone">Zone</label><select id="zone" name="zone">{options}</select>
<label for="uses">Uses (how many servers may enroll with it)</label><input type="text" id="uses" name="uses" value="1" inputmode="numeric" required>
<label for="ttl">Valid for (1m to 30d)</label><input type="text" id="ttl" name="ttl" value="1h" required>
<button type="submit" id="create">Create token</button></form>"#,
            csrf = esc(&who.csrf),
        )
    };
    let body = format!(
        r#"{created}<h2>Create a token</h2>{form}
<h2>Tokens</h2><p>Only a token's id is kept here; the token itself is shown once, when it is created.</p>
<table id="tokens"><thead><tr><th>Id</th><th>Zone</th><th>Uses left</th><th>Created</th><th>Expires</th><th>State</th></tr></thead><tbody>{rows}</tbody></table>"#,
        created = created.unwrap_or_default(),
    );
    console_page(who, status, "Enrollment tokens", message.as_ref(), &body)
}

fn token_state(t: &TokenRecord, now: u64) -> &'static str {
    if t.uses_left == 0 {
        "used up"
    } else if t.expires_unix <= now {
        "expired"
    } else {
        "usable"
    }
}

#[derive(Deserialize)]
pub(super) struct TokenForm {
    #[serde(default)]
    csrf: String,
    zone: String,
    uses: String,
    ttl: String,
}

/// The command an operator pastes on the new server: the token in the environment (kept
/// out of `ps`), the controller and the root fingerprint filled in.
pub(super) fn enroll_command(
    controller: &str,
    fingerprint: &str,
    zone: &str,
    token: &str,
) -> String {
    format!(
        "ZONEMESH_TOKEN='{token}' zonemesh-agent enroll --controller {controller} --ca-fingerprint {fingerprint} --zone {zone} --state-dir {AGENT_STATE_DIR}"
    )
}

pub(super) async fn token_create(
    State(state): State<WebState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(form): Form<TokenForm>,
) -> Response {
    let ask = (form.csrf.as_str(), "token.create");
    act(&state, &headers, peer, ask, View::Tokens(None), |_| {
        let mesh = mesh_of(&state)?;
        let bad = ControllerError::BadRequest;
        let Ok(uses) = form.uses.trim().parse::<u32>() else {
            return Err(bad("uses must be between 1 and 10000".into()).into());
        };
        let ttl: Duration = humantime::parse_duration(form.ttl.trim()).map_err(|e| {
            bad(format!(
                "{} is not a lifetime (e.g. 1h, 30m, 7d): {e}",
                crate::text::Escaped(crate::text::cap(&form.ttl, 32))
            ))
        })?;
        let zone = form.zone.trim().to_string();
        let controller = state
            .inner
            .agent_address
            .get()
            .cloned()
            .unwrap_or_else(|| "CONTROLLER:PORT".into());
        Ok(move || {
            let now = mesh.now();
            let t = mesh.create_token(&zone, ttl, uses, now)?;
            let fingerprint = zonemesh_ca::fingerprint_sha256(mesh.authority().ca().root_der());
            let shown = token_shown(&controller, &fingerprint, &t);
            let detail = format!("{} use(s), expires {}", t.uses, t.expires_unix);
            let view = View::Tokens(Some(shown));
            Ok(Done::show(view, None).audited("token.created", t.zone, detail))
        })
    })
    .await
}

/// The notice above the token list showing a token just created, once: the enroll
/// command with the token in it.
fn token_shown(controller: &str, fingerprint: &str, t: &CreatedToken) -> String {
    let command = enroll_command(controller, fingerprint, &t.zone, &t.token);
    format!(
        r#"<div class="notice" id="token-created"><h2>Token for zone {zone}</h2>
<p>{uses} use(s), valid until {expires}. This is the only time the token is shown: copy the command now.</p>
<p>On the new server, as root:</p>
<pre class="mono" id="enroll-command">{command}</pre>
<p>Add <code>--name NAME</code> (default: the host name) and <code>--endpoint IP:PORT</code> (where peers reach it) as needed, then start <code>zonemesh-agent run --state-dir {dir}</code>.</p>
<p>The token alone: <code id="token">{token}</code></p></div>"#,
        zone = esc(&t.zone),
        uses = t.uses,
        expires = when(t.expires_unix),
        command = esc(&command),
        dir = AGENT_STATE_DIR,
        token = esc(&t.token),
    )
}

// ---- nodes ----

#[derive(Deserialize)]
pub(super) struct NodesQuery {
    #[serde(default)]
    zone: String,
}

pub(super) async fn nodes_page(
    State(state): State<WebState>,
    headers: HeaderMap,
    Query(q): Query<NodesQuery>,
) -> Response {
    match admin_page(&state, &headers).await {
        Ok(who) => nodes_view(&state, &who, StatusCode::OK, None, q.zone).await,
        Err(r) => *r,
    }
}

pub(super) async fn nodes_view(
    state: &WebState,
    who: &SignedIn,
    status: StatusCode,
    message: Option<Message>,
    zone: String,
) -> Response {
    let (zones, nodes, now) = match read(state, |mesh, store| {
        Ok((store.zones()?, store.nodes()?, mesh.now()))
    })
    .await
    {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let now = crate::store::unix(now);
    let zone = zone.trim();
    let mut by_zone: BTreeMap<&str, Vec<&NodeRecord>> = BTreeMap::new();
    for n in nodes.iter().filter(|n| zone.is_empty() || n.zone == zone) {
        by_zone.entry(n.zone.as_str()).or_default().push(n);
    }
    let mut tables = String::new();
    let mut shown = 0;
    for (z, mut list) in by_zone {
        list.sort_by(|a, b| a.node.cmp(&b.node));
        let _ = write!(
            tables,
            r#"<h2>Zone {z}</h2><table class="nodes" data-zone="{z}"><thead><tr><th>Node</th><th>Overlay IP</th><th>Endpoints</th><th>Serial</th><th>Certificate expiry</th><th>State</th><th></th></tr></thead><tbody>"#,
            z = esc(z)
        );
        for n in list {
            if shown >= MAX_ROWS {
                break;
            }
            shown += 1;
            tables.push_str(&node_row(n, now, &who.csrf));
        }
        tables.push_str("</tbody></table>");
    }
    if shown == 0 {
        tables.push_str(r#"<p class="notice" id="no-nodes">No nodes enrolled here yet.</p>"#);
    }
    let mut options = String::from(r#"<option value="">every zone</option>"#);
    for z in &zones {
        let sel = if z.name == zone { " selected" } else { "" };
        let _ = write!(
            options,
            r#"<option value="{n}"{sel}>{n}</option>"#,
            n = esc(&z.name)
        );
    }
    let body = format!(
        r#"<form method="get" action="/admin/nodes" id="zone-filter"><label for="zone">Zone</label><select id="zone" name="zone">{options}</select> <button type="submit" id="show">Show</button></form>
<div id="nodes">{tables}</div>"#
    );
    console_page(who, status, "Nodes", message.as_ref(), &body)
}

fn node_state(n: &NodeRecord, now: u64) -> &'static str {
    if n.revoked {
        "revoked"
    } else if n.not_after_unix <= now {
        "expired"
    } else {
        "active"
    }
}

fn node_row(n: &NodeRecord, now: u64, csrf: &str) -> String {
    let key = n.key();
    let action = if n.revoked {
        String::new()
    } else {
        format!(
            r#"<form method="post" action="/admin/nodes/revoke" class="inline"><input type="hidden" name="csrf" value="{csrf}"><input type="hidden" name="node" value="{key}"><button type="submit" class="revoke" data-node="{key}">Revoke…</button></form>"#,
            csrf = esc(csrf),
            key = esc(&key),
        )
    };
    let state = node_state(n, now);
    format!(
        r#"<tr data-node="{key}" data-state="{state}"><td>{name}</td><td class="mono">{ip}</td><td class="mono">{eps}</td><td class="mono">{serial}</td><td>{expiry}</td><td class="state{bad}">{state}</td><td>{action}</td></tr>"#,
        key = esc(&key),
        name = esc(&n.node),
        ip = n.overlay_ip,
        eps = esc(&n
            .endpoints
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")),
        serial = esc(&n.serial_hex),
        expiry = when(n.not_after_unix),
        bad = if state == "active" { "" } else { " bad" },
    )
}

#[derive(Deserialize)]
pub(super) struct RevokeForm {
    #[serde(default)]
    csrf: String,
    node: String,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    confirm: String,
}

const REASONS: [RevocationReason; 5] = [
    RevocationReason::Unspecified,
    RevocationReason::KeyCompromise,
    RevocationReason::AffiliationChanged,
    RevocationReason::Superseded,
    RevocationReason::CessationOfOperation,
];

pub(super) async fn node_revoke(
    State(state): State<WebState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(form): Form<RevokeForm>,
) -> Response {
    let ask = (form.csrf.as_str(), "node.revoke");
    let every_zone = View::Nodes(String::new());
    act(&state, &headers, peer, ask, every_zone, |who| {
        let mesh = mesh_of(&state)?;
        let (ssh, actor) = (state.ssh(), who.email().to_string());
        let key = form.node.trim().to_string();
        if form.confirm != "yes" {
            return Ok(Box::new(move || revoke_confirmation(&mesh, key)) as Work);
        }
        let reason: RevocationReason = match form.reason.trim() {
            "" => RevocationReason::Unspecified,
            r => r.parse().map_err(ControllerError::from)?,
        };
        Ok(Box::new(move || {
            let now = mesh.now();
            let serials = mesh.authority().store().node_serials(&key)?.len();
            // Its SSH host certificates go on every server's KRL, as `node revoke` does.
            let n = crate::ssh::revoke_node(&mesh, ssh.as_deref(), &key, reason, now, &actor)?;
            let text = format!(
                "Node {} revoked: {serials} certificate(s) on the CRL, overlay address {} freed.",
                n.key(),
                n.overlay_ip
            );
            let detail = format!("serial {} reason {}", n.serial_hex, reason.as_str());
            let done = Done::show(View::Nodes(n.zone.clone()), Some(text));
            Ok(done.audited("node.revoked", n.key(), detail))
        }))
    })
    .await
}

/// The work of a revocation's step (the question or the revocation).
type Work = Box<dyn FnOnce() -> Result<Done, ControllerError> + Send>;

/// The first step of a revocation: what will be revoked, and the form that does it.
fn revoke_confirmation(mesh: &Mesh, key: String) -> Result<Done, ControllerError> {
    let store = mesh.authority().store();
    let node = match store.node(&key)? {
        Some(n) if !n.revoked => n,
        Some(n) => {
            return Err(ControllerError::AlreadyExists(format!(
                "node {} is already revoked",
                n.key()
            )));
        }
        None => {
            return Err(ControllerError::NotFound(format!(
                "no node {} (use zone/node, see `node list`)",
                crate::text::Escaped(crate::text::cap(&key, 128))
            )));
        }
    };
    let serials = store.node_serials(&key)?;
    let zone: Option<ZoneRecord> = store.zone(&node.zone)?;
    Ok(Done::page(move |who| {
        confirmation_page(who, &node, &serials, zone)
    }))
}

fn confirmation_page(
    who: &SignedIn,
    node: &NodeRecord,
    serials: &[crate::store::NodeSerial],
    zone: Option<ZoneRecord>,
) -> Response {
    let mut certs = String::new();
    for s in serials {
        let _ = write!(
            certs,
            r#"<li class="mono">{} ({:?}, expires {})</li>"#,
            esc(&s.serial_hex),
            s.kind,
            when(s.not_after_unix)
        );
    }
    let mut reasons = String::new();
    for r in REASONS {
        let _ = write!(
            reasons,
            r#"<option value="{v}">{v}</option>"#,
            v = r.as_str()
        );
    }
    let body = format!(
        r#"<div id="revoke-confirmation"><p class="error">Revoke node <strong id="revoke-node">{key}</strong>? This cannot be undone: the node must enroll again with a new token.</p>
<ul><li>Zone: {zone} ({cidr})</li><li>Overlay address {ip} is freed.</li><li>Every peer drops its tunnel to it at the next update.</li>
<li>{count} certificate(s) go on the revocation list:<ul id="revoke-serials">{certs}</ul></li></ul>
<form method="post" action="/admin/nodes/revoke" id="revoke-form">
<input type="hidden" name="csrf" value="{csrf}"><input type="hidden" name="node" value="{key}"><input type="hidden" name="confirm" value="yes">
<label for="reason">Reason</label><select id="reason" name="reason">{reasons}</select>
<button type="submit" id="confirm-revoke">Revoke {key}</button></form>
<p><a href="/admin/nodes" id="cancel">Cancel</a></p></div>"#,
        key = esc(&node.key()),
        zone = esc(&node.zone),
        cidr = esc(&zone.map(|z| z.cidr.to_string()).unwrap_or_default()),
        ip = node.overlay_ip,
        count = serials.len(),
        csrf = esc(&who.csrf),
    );
    console_page(who, StatusCode::OK, "Revoke a node", None, &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_enroll_command_names_everything_the_agent_needs() {
        let c = enroll_command("10.0.0.1:7443", "ab12", "eu-1", "zmt_x-Y");
        assert_eq!(
            c,
            "ZONEMESH_TOKEN='zmt_x-Y' zonemesh-agent enroll --controller 10.0.0.1:7443 --ca-fingerprint ab12 --zone eu-1 --state-dir /var/lib/zonemesh-agent"
        );
    }
}
