//! What `zonemesh-controller user add/list/disable` does, audited, and how it prints
//! (human and `--json`). The binary only parses arguments, reads the password and calls these.

use std::io::BufRead;

use zeroize::Zeroizing;

use super::{AuthError, Role, SessionStore, UserAdded, UserStore, UserSummary};
use crate::audit::{AuditEvent, AuditLog, format_utc};

/// Add a user and record `user.added` in the audit log.
pub fn add_user(
    users: &UserStore,
    audit: &AuditLog,
    email: &str,
    role: Role,
    password: &str,
    actor: &str,
) -> Result<UserAdded, AuthError> {
    let added = users.add_user(email, role, password)?;
    let detail = if role == Role::Admin {
        "TOTP enrollment pending"
    } else {
        "no second factor yet"
    };
    if let Err(e) = audit.record(
        AuditEvent::new("user.added", "ok")
            .actor(actor)
            .subject(&added.email)
            .detail(format!("role {role}; {detail}")),
    ) {
        tracing::error!(error = %e, "audit record failed");
    }
    Ok(added)
}

/// Disable a user, end their sessions, and record `user.disabled`.
pub fn disable_user(
    users: &UserStore,
    sessions: &SessionStore,
    audit: &AuditLog,
    email: &str,
    actor: &str,
) -> Result<usize, AuthError> {
    let email = super::normalize_email(email);
    users.disable_user(&email)?;
    let ended = sessions.remove_for_user(&email)?;
    if let Err(e) = audit.record(
        AuditEvent::new("user.disabled", "ok")
            .actor(actor)
            .subject(&email)
            .detail(format!("{ended} sessions ended")),
    ) {
        tracing::error!(error = %e, "audit record failed");
    }
    Ok(ended)
}

/// Read a password from `input` (stdin when it is not a terminal): the first line, without
/// its line ending. Nothing else is trimmed: spaces are part of a password.
pub fn read_password_line(mut input: impl BufRead) -> std::io::Result<Zeroizing<String>> {
    let mut line = Zeroizing::new(String::new());
    input.read_line(&mut line)?;
    let trimmed = line.trim_end_matches(['\n', '\r']).to_string();
    Ok(Zeroizing::new(trimmed))
}

/// What `user add` prints: for admins the otpauth URI and the QR code to scan, and the
/// reminder that the first code must be entered on the enrollment page.
pub fn render_user_added(added: &UserAdded, json: bool) -> String {
    if json {
        let v = serde_json::json!({
            "email": added.email,
            "role": added.role,
            "otpauth_uri": added.otpauth_uri.as_ref().map(|u| u.as_str()),
            "totp_confirmation": if added.otpauth_uri.is_some() { "pending: sign in and enter the first code on the enrollment page" } else { "not enrolled" },
        });
        return format!("{v}\n");
    }
    let mut s = format!("added {} ({})\n", added.email, added.role);
    if let (Some(uri), Some(qr)) = (&added.otpauth_uri, &added.qr_terminal) {
        s.push_str(
            "\nScan this with Google Authenticator, Microsoft Authenticator or any TOTP app:\n\n",
        );
        s.push_str(qr);
        s.push_str("\n\nor add it by URI:\n  ");
        s.push_str(uri);
        s.push_str("\n\nThen sign in: the first code confirms the enrollment. Until then this admin gets no session.\n");
    }
    s
}

/// What `user list` prints.
pub fn render_users(users: &[UserSummary], json: bool) -> String {
    if json {
        return format!("{}\n", serde_json::to_string(users).unwrap_or_default());
    }
    let mut s = format!(
        "{:<36} {:<13} {:<9} {:<6} {:<9} {}\n",
        "EMAIL", "ROLE", "STATUS", "TOTP", "RECOVERY", "CREATED (UTC)"
    );
    for u in users {
        s.push_str(&format!(
            "{:<36} {:<13} {:<9} {:<6} {:<9} {}\n",
            crate::text::Escaped(&u.email),
            u.role.as_str(),
            if u.disabled { "disabled" } else { "active" },
            if u.totp_confirmed { "yes" } else { "no" },
            u.recovery_codes_left,
            format_utc(u.created_unix_ms)
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{Pepper, WebConfig};
    use std::time::Duration;

    #[test]
    fn add_list_disable_audited() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let users = UserStore::open(&db, &WebConfig::new(Pepper::generate(1))).unwrap();
        let sessions =
            SessionStore::open(&db, Duration::from_secs(60), Duration::from_secs(600)).unwrap();
        let audit = AuditLog::open(&db).unwrap();
        let pw = read_password_line(&b"  spaces count too  \r\nignored"[..]).unwrap();
        assert_eq!(&*pw, "  spaces count too  ");
        let added = add_user(&users, &audit, "Ops@Example.com", Role::Admin, &pw, "cli").unwrap();
        let human = render_user_added(&added, false);
        assert!(human.contains("otpauth://totp/") && human.contains("enrollment"));
        let json: serde_json::Value =
            serde_json::from_str(&render_user_added(&added, true)).unwrap();
        assert_eq!(json["role"], "admin");
        disable_user(&users, &sessions, &audit, "ops@example.com", "cli").unwrap();
        let list = users.list_users().unwrap();
        assert!(render_users(&list, false).contains("disabled"));
        let parsed: Vec<UserSummary> = serde_json::from_str(&render_users(&list, true)).unwrap();
        assert_eq!(parsed, list);
        let kinds: Vec<String> = audit
            .list(None)
            .unwrap()
            .into_iter()
            .map(|r| r.event.kind)
            .collect();
        assert_eq!(kinds, vec!["user.added", "user.disabled"]);
        // The audit log never holds the password.
        assert!(
            !audit
                .list(None)
                .unwrap()
                .iter()
                .any(|r| serde_json::to_string(r).unwrap().contains("spaces count"))
        );
    }
}
