//! Server-rendered HTML of the admin pages. No inline script (the Domains page loads a
//! served file); the only stylesheet is served
//! from `/static/style.css` so the content security policy can forbid inline styles.

use std::fmt::Write as _;
use std::time::SystemTime;

use super::{NodeRow, ZoneRow};
use crate::audit::format_utc;

/// The stylesheet.
pub const STYLE_CSS: &str = r#"
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;background:#f4f6f8;color:#1c2733}
header{background:#1c2733;color:#fff;padding:.8rem 1.5rem;display:flex;justify-content:space-between;align-items:center}
header a,header button{color:#fff}
form.inline{display:inline}
main{max-width:60rem;margin:2rem auto;padding:0 1rem}
.card{background:#fff;border-radius:8px;padding:1.5rem;box-shadow:0 1px 3px rgba(0,0,0,.12);margin-bottom:1.5rem}
.narrow{max-width:26rem;margin:0 auto}
label{display:block;margin:.8rem 0 .3rem;font-weight:600}
input[type=email],input[type=password],input[type=text],textarea{width:100%;box-sizing:border-box;padding:.55rem;font-size:1rem;border:1px solid #b8c2cc;border-radius:4px}
button{margin-top:1rem;padding:.55rem 1.2rem;font-size:1rem;border:0;border-radius:4px;background:#2463eb;color:#fff;cursor:pointer}
header button{background:transparent;border:1px solid #fff;margin:0;padding:.3rem .8rem}
.error{background:#fde8e8;color:#8a1c1c;padding:.7rem;border-radius:4px}
.notice{background:#e8f1fd;color:#1c3f8a;padding:.7rem;border-radius:4px}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:.45rem .6rem;border-bottom:1px solid #e1e6eb;font-size:.95rem}
code,.mono{font-family:ui-monospace,monospace;word-break:break-all}
.qr svg{width:240px;height:240px}
.bad{color:#8a1c1c;font-weight:600}
.warn{color:#8a5a00;font-weight:600}
ul.codes{columns:2;font-family:ui-monospace,monospace;font-size:1.1rem}
.scroll{overflow-x:auto}
table.heat{width:auto}
table.heat th,table.heat td{text-align:center;font-size:.85rem;padding:.3rem .45rem;border:1px solid #e1e6eb;white-space:nowrap}
.h-ok{background:#d9f2e1;color:#14532d}
.h-warn{background:#fdf0c4;color:#713f12}
.h-bad{background:#f9d0d0;color:#8a1c1c;font-weight:600}
.h-stale{background:#e7e9ec;color:#5b6675;font-style:italic}
.h-none{background:#fff;color:#9aa5b1}
.h-self{background:#f4f6f8;color:#9aa5b1}
"#;

/// Escape text for HTML element content and attribute values.
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// Who is signed in, for the page header.
pub struct Viewer<'a> {
    pub email: &'a str,
    pub role: &'a str,
    pub csrf: &'a str,
}

pub(super) fn layout(title: &str, viewer: Option<&Viewer<'_>>, body: &str) -> String {
    let nav = match viewer {
        Some(v) => format!(
            r#"<div><span>{} ({})</span> <a href="/domains" id="domains-link">Domains</a> <a href="/ssh" id="ssh-link">Server access</a>{security} <a href="/account/password" id="change-password">Change password</a> <form method="post" action="/signout" class="inline"><input type="hidden" name="csrf" value="{}"><button type="submit" id="signout">Sign out</button></form></div>"#,
            esc(v.email),
            esc(v.role),
            esc(v.csrf),
            security = if v.role == "admin" {
                r#" <a href="/security" id="security-link">Security</a> <a href="/admin" id="admin-link">Admin</a>"#
            } else {
                ""
            },
        ),
        None => String::new(),
    };
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>{title} · zonemesh</title><link rel="stylesheet" href="/static/style.css"></head>
<body><header><strong>zonemesh</strong>{nav}</header><main>{body}</main></body></html>"#,
        title = esc(title),
    )
}

fn message(kind: &str, text: Option<&str>) -> String {
    text.map(|t| format!(r#"<p class="{kind}" id="message">{}</p>"#, esc(t)))
        .unwrap_or_default()
}

/// The sign-in form.
pub fn signin(csrf: &str, email: &str, error: Option<&str>) -> String {
    layout(
        "Sign in",
        None,
        &format!(
            r#"<div class="card narrow"><h1>Sign in</h1>{msg}
<form method="post" action="/signin" id="signin-form">
<input type="hidden" name="csrf" value="{csrf}">
<label for="email">E-mail address</label><input type="email" id="email" name="email" value="{email}" autocomplete="username" required autofocus>
<label for="password">Password</label><input type="password" id="password" name="password" autocomplete="current-password" required>
<button type="submit" id="signin">Sign in</button></form></div>"#,
            msg = message("error", error),
            csrf = esc(csrf),
            email = esc(email),
        ),
    )
}

/// The password change form of a signed-in user.
pub fn change_password(viewer: &Viewer<'_>, error: Option<&str>, done: Option<&str>) -> String {
    layout(
        "Change password",
        Some(viewer),
        &format!(
            r#"<div class="card narrow"><h1>Change password</h1>{msg}{ok}
<form method="post" action="/account/password" id="password-form">
<input type="hidden" name="csrf" value="{csrf}">
<label for="current">Current password</label><input type="password" id="current" name="current" autocomplete="current-password" required autofocus>
<label for="new">New password</label><input type="password" id="new" name="new" autocomplete="new-password" minlength="8" required>
<label for="confirm">New password again</label><input type="password" id="confirm" name="confirm" autocomplete="new-password" required>
<p>At least 8 characters; long passphrases are welcome. Changing it signs you out everywhere else.</p>
<button type="submit" id="change">Change password</button></form>
<p><a href="/dashboard">Back to the dashboard</a></p></div>"#,
            msg = message("error", error),
            ok = message("notice", done),
            csrf = esc(viewer.csrf),
        ),
    )
}

/// The second-factor form.
pub fn second_factor(csrf: &str, error: Option<&str>) -> String {
    layout(
        "Verification code",
        None,
        &format!(
            r#"<div class="card narrow"><h1>Verification code</h1>{msg}
<p>Enter the 6-digit code from your authenticator app, or one of your recovery codes.</p>
<form method="post" action="/signin/code" id="code-form">
<input type="hidden" name="csrf" value="{csrf}">
<label for="code">Code</label><input type="text" id="code" name="code" inputmode="numeric" autocomplete="one-time-code" required autofocus>
<button type="submit" id="verify">Verify</button></form>
<form method="post" action="/signout"><input type="hidden" name="csrf" value="{csrf}"><button type="submit">Cancel</button></form></div>"#,
            msg = message("error", error),
            csrf = esc(csrf),
        ),
    )
}

/// The TOTP enrollment page: QR code, the secret for manual entry, and the confirm form.
pub fn enroll(
    csrf: &str,
    qr_svg: &str,
    secret_base32: &str,
    otpauth_uri: &str,
    mandatory: bool,
    error: Option<&str>,
) -> String {
    let why = if mandatory {
        "Administrators must use a second factor. Set it up now to continue."
    } else {
        "Protect your account with a second factor."
    };
    layout(
        "Set up two-factor authentication",
        None,
        &format!(
            r#"<div class="card narrow"><h1>Two-factor authentication</h1>{msg}<p>{why}</p>
<p>Scan this code with Google Authenticator, Microsoft Authenticator or any TOTP app:</p>
<div class="qr">{qr_svg}</div>
<p>Or enter this key by hand: <code id="secret">{secret}</code></p>
<p><a href="{uri}">Open in an authenticator app on this device</a></p>
<form method="post" action="/enroll" id="enroll-form">
<input type="hidden" name="csrf" value="{csrf}">
<label for="code">First 6-digit code</label><input type="text" id="code" name="code" inputmode="numeric" autocomplete="one-time-code" required autofocus>
<button type="submit" id="confirm">Confirm</button></form></div>"#,
            msg = message("error", error),
            secret = esc(secret_base32),
            uri = esc(otpauth_uri),
            csrf = esc(csrf),
        ),
    )
}

/// Shown once after enrollment: the recovery codes.
pub fn recovery_codes(viewer: &Viewer<'_>, codes: &[String]) -> String {
    let mut items = String::new();
    for c in codes {
        let _ = write!(items, "<li>{}</li>", esc(c));
    }
    layout(
        "Recovery codes",
        Some(viewer),
        &format!(
            r#"<div class="card"><h1>Two-factor authentication is on</h1>
<p class="notice">Store these recovery codes somewhere safe. Each works once, in place of a code from your app. They are not shown again.</p>
<ul class="codes" id="recovery-codes">{items}</ul><p><a href="/dashboard" id="continue">Continue to the dashboard</a></p></div>"#
        ),
    )
}

/// A page with just a message.
pub fn notice(title: &str, text: &str, link: Option<(&str, &str)>) -> String {
    notice_for(None, title, text, link)
}

/// A page with just a message, with the signed-in header of `viewer`.
pub fn notice_for(
    viewer: Option<&Viewer<'_>>,
    title: &str,
    text: &str,
    link: Option<(&str, &str)>,
) -> String {
    let link = link
        .map(|(href, label)| format!(r#"<p><a href="{}">{}</a></p>"#, esc(href), esc(label)))
        .unwrap_or_default();
    layout(
        title,
        viewer,
        &format!(
            r#"<div class="card narrow"><h1>{}</h1>{}{}</div>"#,
            esc(title),
            message("error", Some(text)),
            link
        ),
    )
}

fn remaining(until: SystemTime, now: SystemTime) -> String {
    match until.duration_since(now) {
        Ok(d) => {
            let s = d.as_secs();
            if s >= 86_400 {
                format!("in {} d {} h", s / 86_400, (s % 86_400) / 3600)
            } else if s >= 3600 {
                format!("in {} h {} min", s / 3600, (s % 3600) / 60)
            } else {
                format!("in {} min", s / 60)
            }
        }
        Err(_) => "expired".into(),
    }
}

/// The dashboard: zones, nodes with their certificate expiry, and the loss and latency
/// heat map.
pub fn dashboard(
    viewer: &Viewer<'_>,
    zones: &[ZoneRow],
    nodes: &[NodeRow],
    health: Option<&crate::mesh::HealthMatrix>,
    now: SystemTime,
    totp_enrolled: bool,
) -> String {
    let mut z = String::new();
    for r in zones {
        let _ = write!(
            z,
            "<tr><td>{}</td><td class=\"mono\">{}</td><td>{}</td></tr>",
            esc(&r.name),
            esc(&r.cidr),
            r.node_count
        );
    }
    if zones.is_empty() {
        z.push_str("<tr><td colspan=\"3\">No zones yet.</td></tr>");
    }
    let mut n = String::new();
    for r in nodes {
        let exp_ms = r
            .cert_expiry
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let left = remaining(r.cert_expiry, now);
        let (class, status) = if r.revoked {
            ("bad", "revoked")
        } else if r.cert_expiry <= now {
            ("bad", "expired")
        } else if r
            .cert_expiry
            .duration_since(now)
            .unwrap_or_default()
            .as_secs()
            < 3 * 86_400
        {
            ("warn", "expires soon")
        } else {
            ("", "valid")
        };
        let _ = write!(
            n,
            "<tr><td>{}</td><td>{}</td><td class=\"mono\">{}</td><td class=\"mono\">{}</td><td>{} ({})</td><td class=\"{}\">{}</td></tr>",
            esc(&r.zone),
            esc(&r.name),
            r.overlay_ip,
            esc(&r.serial),
            esc(&format_utc(exp_ms)),
            esc(&left),
            class,
            status
        );
    }
    if nodes.is_empty() {
        n.push_str("<tr><td colspan=\"6\">No nodes enrolled yet.</td></tr>");
    }
    let totp = if totp_enrolled {
        String::new()
    } else {
        r#"<p class="notice">Two-factor authentication is off for your account. <a href="/enroll">Turn it on</a>.</p>"#.to_string()
    };
    if viewer.role != "admin" {
        return layout(
            "Dashboard",
            Some(viewer),
            &format!(
                r#"<h1 id="dashboard-title">Dashboard</h1>{totp}
<div class="card"><h2>Your portals</h2><p>Certificate deployment for your portal domains appears here.</p></div>"#
            ),
        );
    }
    layout(
        "Dashboard",
        Some(viewer),
        &format!(
            r#"<h1 id="dashboard-title">Dashboard</h1>{totp}
<div class="card"><h2>Zones</h2><table id="zones"><thead><tr><th>Zone</th><th>Network</th><th>Nodes</th></tr></thead><tbody>{z}</tbody></table></div>
<div class="card"><h2>Nodes</h2><table id="nodes"><thead><tr><th>Zone</th><th>Node</th><th>Overlay IP</th><th>Certificate serial</th><th>Certificate expiry (UTC)</th><th>Status</th></tr></thead><tbody>{n}</tbody></table></div>{heat}"#,
            heat = health.map(super::health::card).unwrap_or_default(),
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes() {
        assert_eq!(
            esc(r#"<a href="x">'&'</a>"#),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
        let page = signin("tok", "\"><script>", Some("<b>"));
        assert!(!page.contains("<script>"));
        assert!(!page.contains("<b>"));
    }
}
