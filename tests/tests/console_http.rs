//! The admin console over HTTPS with curl, against a real controller: a portal owner gets
//! `403` on every admin page and action and nothing changes; a missing or wrong CSRF token
//! is refused; each action leaves its audit entry with the admin as actor; bad input (bad
//! CIDR, duplicate zone, unknown zone or node, bad e-mail) gives an error page with the
//! CLI's own message and changes nothing.

use anyhow::{Context, Result};
use serde_json::Value;
use zonemesh_tests::cluster::{Controller, watch_served};
use zonemesh_tests::webcurl::{CurlSession, csrf_of, text_of_id};

const ADMIN: &str = "console-admin@example.com";
const OWNER: &str = "console-owner@example.com";
const PASSWORD: &str = "a long enough passphrase here";

/// Every audit record, oldest first.
fn audit(ctl: &Controller) -> Result<Vec<Value>> {
    Ok(ctl
        .admin_ok(&["audit", "--json"])?
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

fn audited(ctl: &Controller, kind: &str, subject: &str) -> Result<Value> {
    audit(ctl)?
        .into_iter()
        .rev()
        .find(|r| r["kind"] == kind && r["subject"] == subject)
        .with_context(|| format!("no {kind} of {subject} in the audit log"))
}

/// The page's `#message` text, entities undone.
fn message(page: &str) -> String {
    text_of_id(page, "message")
        .unwrap_or_default()
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

/// What the CLI prints on stderr for a refused command.
fn cli_error(ctl: &Controller, args: &[&str]) -> Result<String> {
    let out = ctl.admin(args)?;
    assert!(!out.status.success(), "{args:?} succeeded");
    Ok(String::from_utf8_lossy(&out.stderr).into_owned())
}

fn csrf(web: &CurlSession<'_>) -> Result<String> {
    csrf_of(&web.get("/dashboard")?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_is_admin_only_csrf_protected_audited_and_refuses_bad_input() -> Result<()> {
    if !zonemesh_tests::have("oathtool") {
        println!("skipped: oathtool not installed");
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let ctl = Controller::start_new(tmp.path())?;
    for (email, role) in [(ADMIN, "admin"), (OWNER, "portal-owner")] {
        ctl.admin_with_stdin(
            &["user", "add", "--email", email, "--role", role],
            &format!("{PASSWORD}\n"),
        );
    }
    let admin = ctl.web_session(tmp.path(), "admin")?;
    admin.sign_in(ADMIN, PASSWORD)?;
    let owner = ctl.web_session(tmp.path(), "owner")?;
    owner.sign_in(OWNER, PASSWORD)?;
    assert!(admin.get("/dashboard")?.contains("id=\"admin-link\""));
    assert!(!owner.get("/dashboard")?.contains("id=\"admin-link\""));

    // The admin adds a zone; it is there for the CLI, audited with the admin as actor.
    let tok = csrf(&admin)?;
    let (code, loc) = admin.post(
        "/admin/zones",
        &[
            ("csrf", &tok),
            ("name", "web"),
            ("cidr", "100.64.10.0/24"),
            ("intra_zone_tunnels", "on"),
        ],
    )?;
    assert_eq!((code, loc.ends_with("/admin/zones")), (303, true), "{loc}");
    let zones: Value = serde_json::from_str(&ctl.admin_ok(&["zone", "list", "--json"])?)?;
    assert_eq!(zones[0]["name"], "web", "{zones}");
    assert_eq!(zones[0]["intra_zone_tunnels"], true, "{zones}");
    let rec = audited(&ctl, "zone.added", "web")?;
    assert_eq!(rec["actor"], ADMIN, "{rec}");
    assert_eq!(rec["source"], "127.0.0.1", "{rec}");
    assert!(admin.get("/admin/zones")?.contains("data-zone=\"web\""));

    // A token, shown once inside the enroll command; the list shows its id only.
    let (code, page) = admin.post_page(
        "/admin/tokens",
        &[
            ("csrf", &tok),
            ("zone", "web"),
            ("uses", "2"),
            ("ttl", "2h"),
        ],
    )?;
    assert_eq!(code, 200, "{page}");
    let command = text_of_id(&page, "enroll-command").context("no enroll command")?;
    let token = text_of_id(&page, "token").context("no token")?;
    assert!(token.starts_with("zmt_"), "{token}");
    assert!(
        command.contains(&format!(
            "ZONEMESH_TOKEN=&#39;{token}&#39; zonemesh-agent enroll"
        )) && command.contains(&format!("--controller {}", ctl.grpc_addr()))
            && command.contains(&format!("--ca-fingerprint {}", ctl.fingerprint))
            && command.contains("--zone web"),
        "{command}"
    );
    let list = admin.get("/admin/tokens")?;
    assert!(list.contains("<td>web</td><td>2</td>"), "{list}");
    assert!(!list.contains(&token), "the token is shown only once");
    let rec = audited(&ctl, "token.created", "web")?;
    assert_eq!(rec["actor"], ADMIN);
    assert!(
        !rec.to_string().contains(&token),
        "the audit log holds no token"
    );
    let creds = ctl.enroll_pooled(&token, "n1", 0).await;
    let within = std::time::Duration::from_secs(10);
    assert!(watch_served(&ctl.grpc_addr(), &creds, within).await?);

    // A portal owner: 403 on every page and every action, and nothing changes.
    for path in [
        "/admin",
        "/admin/zones",
        "/admin/tokens",
        "/admin/nodes",
        "/admin/users",
        "/admin/audit",
        "/admin/ca",
        "/security",
    ] {
        let (code, _) = owner.get_page(path)?;
        assert_eq!(code, 403, "{path}");
    }
    let otok = csrf(&owner)?;
    let before = (
        ctl.admin_ok(&["zone", "list", "--json"])?,
        ctl.admin_ok(&["node", "list", "--json"])?,
        ctl.admin_ok(&["user", "list", "--json"])?,
        admin.get("/admin/tokens")?.matches("<tr>").count(),
    );
    let owner_posts: [(&str, Vec<(&str, &str)>); 6] = [
        (
            "/admin/zones",
            vec![("name", "evil"), ("cidr", "100.64.66.0/24")],
        ),
        (
            "/admin/tokens",
            vec![("zone", "web"), ("uses", "1"), ("ttl", "1h")],
        ),
        (
            "/admin/nodes/revoke",
            vec![("node", "web/n1"), ("confirm", "yes")],
        ),
        (
            "/admin/users",
            vec![
                ("email", "evil@example.com"),
                ("role", "admin"),
                ("password", PASSWORD),
            ],
        ),
        ("/admin/users/disable", vec![("email", ADMIN)]),
        ("/admin/users/reset-totp", vec![("email", ADMIN)]),
    ];
    for (path, fields) in &owner_posts {
        let mut f = vec![("csrf", otok.as_str())];
        f.extend(fields.iter().copied());
        let (code, body) = owner.post_page(path, &f)?;
        assert_eq!(code, 403, "{path}: {body}");
        assert!(!body.contains("enroll-command"), "{path}");
    }
    let after = (
        ctl.admin_ok(&["zone", "list", "--json"])?,
        ctl.admin_ok(&["node", "list", "--json"])?,
        ctl.admin_ok(&["user", "list", "--json"])?,
        admin.get("/admin/tokens")?.matches("<tr>").count(),
    );
    assert_eq!(before, after, "a portal owner changed something");
    let denied = audit(&ctl)?
        .into_iter()
        .filter(|r| r["actor"] == OWNER && r["outcome"] == "denied")
        .count();
    assert_eq!(denied, owner_posts.len(), "every denied attempt is audited");

    // Missing and wrong CSRF tokens are refused, and change nothing.
    for bad in [None, Some("not-the-token")] {
        let mut f = vec![("name", "nocsrf"), ("cidr", "100.64.77.0/24")];
        if let Some(b) = bad {
            f.push(("csrf", b));
        }
        let (code, body) = admin.post_page("/admin/zones", &f)?;
        assert_eq!(code, 403, "{bad:?}: {body}");
        assert!(body.contains("Form expired"), "{body}");
    }
    let (code, _) = owner.post_page(
        "/admin/zones",
        &[
            ("csrf", "forged"),
            ("name", "x"),
            ("cidr", "100.64.78.0/24"),
        ],
    )?;
    assert_eq!(code, 403);
    assert!(!ctl.admin_ok(&["zone", "list"])?.contains("nocsrf"));

    // Bad input: the CLI's own error, on an error page, and nothing changes.
    let zones_before = ctl.admin_ok(&["zone", "list", "--json"])?;
    for (name, cidr, status) in [
        ("bad", "100.64.10.0/33", 400),
        ("bad", "not-a-cidr", 400),
        ("web", "100.64.20.0/24", 409),
        ("Bad Name!", "100.64.21.0/24", 400),
    ] {
        let (code, page) = admin.post_page(
            "/admin/zones",
            &[("csrf", &tok), ("name", name), ("cidr", cidr)],
        )?;
        assert_eq!(code, status, "{name} {cidr}: {page}");
        let msg = message(&page);
        assert!(!msg.is_empty(), "no error shown: {page}");
        let cli = cli_error(&ctl, &["zone", "add", name, "--cidr", cidr])?;
        assert!(cli.contains(&msg), "web: {msg}\ncli: {cli}");
    }
    assert_eq!(ctl.admin_ok(&["zone", "list", "--json"])?, zones_before);
    let (code, page) = admin.post_page(
        "/admin/tokens",
        &[
            ("csrf", &tok),
            ("zone", "nowhere"),
            ("uses", "1"),
            ("ttl", "1h"),
        ],
    )?;
    assert_eq!(code, 404, "{page}");
    assert!(
        message(&page).contains("zone nowhere does not exist"),
        "{page}"
    );
    for (uses, ttl) in [("0", "1h"), ("1", "10s"), ("1", "soon")] {
        let (code, page) = admin.post_page(
            "/admin/tokens",
            &[
                ("csrf", &tok),
                ("zone", "web"),
                ("uses", uses),
                ("ttl", ttl),
            ],
        )?;
        assert_eq!(code, 400, "{uses} {ttl}: {page}");
        assert!(!page.contains("enroll-command"));
    }

    // Revoking asks first; an unknown node is refused; the confirmed revocation is done,
    // audited, and the node's certificate is refused over mTLS.
    for confirm in ["", "yes"] {
        let (code, page) = admin.post_page(
            "/admin/nodes/revoke",
            &[("csrf", &tok), ("node", "web/nope"), ("confirm", confirm)],
        )?;
        assert_eq!(code, 404, "{page}");
        assert!(message(&page).contains("no node web/nope"), "{page}");
    }
    let (code, page) =
        admin.post_page("/admin/nodes/revoke", &[("csrf", &tok), ("node", "web/n1")])?;
    assert_eq!(code, 200, "{page}");
    assert!(page.contains("id=\"confirm-revoke\""), "{page}");
    let nodes = ctl.nodes()?;
    let serial = nodes[0]["serial"].as_str().context("serial")?.to_string();
    assert!(
        page.contains(&serial),
        "the serial to revoke is listed: {page}"
    );
    assert_eq!(nodes[0]["revoked"], false, "asking revokes nothing");
    let (code, page) = admin.post_page(
        "/admin/nodes/revoke",
        &[
            ("csrf", &tok),
            ("node", "web/n1"),
            ("confirm", "yes"),
            ("reason", "key-compromise"),
        ],
    )?;
    assert_eq!(code, 200, "{page}");
    assert!(message(&page).contains("web/n1 revoked"), "{page}");
    assert_eq!(ctl.nodes()?[0]["revoked"], true);
    assert!(
        !watch_served(&ctl.grpc_addr(), &creds, within).await?,
        "the revoked certificate is still served over mTLS"
    );
    let rec = audited(&ctl, "node.revoked", "web/n1")?;
    assert_eq!(rec["actor"], ADMIN);
    assert!(
        rec["detail"]
            .as_str()
            .unwrap_or("")
            .contains("key-compromise")
    );
    let (code, page) = admin.post_page(
        "/admin/nodes/revoke",
        &[("csrf", &tok), ("node", "web/n1"), ("confirm", "yes")],
    )?;
    assert_eq!(code, 409, "{page}");

    // Users: add, refuse bad and duplicate input, reset TOTP, disable; each audited.
    let (code, page) = admin.post_page(
        "/admin/users",
        &[
            ("csrf", &tok),
            ("email", "second-admin@example.com"),
            ("role", "admin"),
            ("password", PASSWORD),
        ],
    )?;
    assert_eq!(code, 200, "{page}");
    assert!(
        !page.contains("otpauth://"),
        "the new admin's secret is not shown"
    );
    assert_eq!(
        audited(&ctl, "user.added", "second-admin@example.com")?["actor"],
        ADMIN
    );
    for (email, password, status) in [
        ("second-admin@example.com", PASSWORD, 409),
        ("not an e-mail", PASSWORD, 400),
        ("third@example.com", "short", 400),
    ] {
        let (code, page) = admin.post_page(
            "/admin/users",
            &[
                ("csrf", &tok),
                ("email", email),
                ("role", "portal-owner"),
                ("password", password),
            ],
        )?;
        assert_eq!(code, status, "{email}: {page}");
        assert!(!message(&page).is_empty());
    }
    let users: Value = serde_json::from_str(&ctl.admin_ok(&["user", "list", "--json"])?)?;
    assert_eq!(users.as_array().map(Vec::len), Some(3), "{users}");
    let (code, _) = admin.post_page(
        "/admin/users/reset-totp",
        &[("csrf", &tok), ("email", ADMIN)],
    )?;
    assert_eq!(code, 400, "not on one's own account");
    let (code, page) = admin.post_page(
        "/admin/users/reset-totp",
        &[("csrf", &tok), ("email", OWNER)],
    )?;
    assert_eq!(code, 200, "{page}");
    assert_eq!(audited(&ctl, "user.totp-reset", OWNER)?["actor"], ADMIN);
    // The reset ended the owner's session, and the next sign-in enrolls TOTP first.
    assert_eq!(owner.get_page("/dashboard")?.0, 303);
    let (code, page) = admin.post_page(
        "/admin/users/disable",
        &[("csrf", &tok), ("email", "second-admin@example.com")],
    )?;
    assert_eq!(code, 200, "{page}");
    assert_eq!(
        audited(&ctl, "user.disabled", "second-admin@example.com")?["actor"],
        ADMIN
    );
    let users: Value = serde_json::from_str(&ctl.admin_ok(&["user", "list", "--json"])?)?;
    let second = users
        .as_array()
        .and_then(|u| u.iter().find(|u| u["email"] == "second-admin@example.com"))
        .context("second admin listed")?;
    assert_eq!(second["disabled"], true);
    let (code, page) = admin.post_page(
        "/admin/users/disable",
        &[("csrf", &tok), ("email", "nobody@example.com")],
    )?;
    assert_eq!(code, 404, "{page}");

    // The audit log, filtered and paged.
    let page = admin.get("/admin/audit?kind=zone")?;
    assert!(
        page.contains("zone.added") && !page.contains("token.created"),
        "{page}"
    );
    let page = admin.get(&format!("/admin/audit?actor={OWNER}&kind=zone.add_denied"))?;
    assert_eq!(page.matches("<tr data-seq=").count(), 1, "{page}");
    let page = admin.get("/admin/audit?text=web%2Fn1")?;
    assert!(page.contains("node.revoked"), "{page}");
    let page = admin.get("/admin/audit?from=2999-01-01")?;
    assert_eq!(page.matches("<tr data-seq=").count(), 0, "{page}");
    let (code, page) = admin.get_page("/admin/audit?from=yesterday")?;
    assert_eq!(code, 400, "{page}");

    // CA status: the pinned fingerprint and the CRL's next update.
    let page = admin.get("/admin/ca")?;
    assert!(page.contains(&ctl.fingerprint), "{page}");
    assert!(
        text_of_id(&page, "crl-next-update").is_some_and(|t| t.contains("20")),
        "{page}"
    );
    assert!(page.contains("data-state=\"active\""), "{page}");

    // The CLI's reset does the same: audited as the CLI's, the admin's session ends.
    let out = ctl.admin_ok(&["user", "reset-totp", "--email", ADMIN])?;
    assert!(out.contains("1 session(s) ended"), "{out}");
    assert_eq!(audited(&ctl, "user.totp-reset", ADMIN)?["actor"], "cli");
    assert_eq!(
        admin.get_page("/admin")?.0,
        303,
        "the reset ended the session"
    );
    Ok(())
}
