//! What `zonemesh-controller user add/list/disable` does, audited, and how it prints
//! (human and `--json`). The binary only parses arguments, reads the password and calls these.

use std::io::BufRead;

use zeroize::Zeroizing;

use super::{AuthError, Role, SessionStore, ThrottleList, UserAdded, UserStore, UserSummary};
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

/// Set a new password for a user (after the same checks as at creation), end every session
/// of the user, and record `user.password-changed`.
pub fn change_password(
    users: &UserStore,
    sessions: &SessionStore,
    audit: &AuditLog,
    email: &str,
    password: &str,
    actor: &str,
) -> Result<usize, AuthError> {
    let email = super::normalize_email(email);
    users.set_password(&email, password)?;
    let ended = sessions.remove_for_user(&email)?;
    if let Err(e) = audit.record(
        AuditEvent::new("user.password-changed", "ok")
            .actor(actor)
            .subject(&email)
            .detail(format!("{ended} sessions ended")),
    ) {
        tracing::error!(error = %e, "audit record failed");
    }
    Ok(ended)
}

/// An account name as typed at sign-in, safe for a terminal: control characters escaped,
/// at most 80 characters.
fn printable(s: &str) -> String {
    let mut out: String = s.chars().take(80).flat_map(char::escape_default).collect();
    if s.chars().count() > 80 {
        out.push('…');
    }
    out
}

/// What `throttle list` prints.
pub fn render_throttles(list: &ThrottleList, json: bool) -> String {
    if json {
        return format!("{}\n", serde_json::to_string(list).unwrap_or_default());
    }
    let mut s = format!(
        "{:<36} {:<40} {:>8} {:>8}  {}\n",
        "ACCOUNT", "SOURCE", "FAILURES", "WAIT", "BLOCKED UNTIL (UTC)"
    );
    for r in &list.rows {
        s.push_str(&format!(
            "{:<36} {:<40} {:>8} {:>7}s  {}\n",
            r.account.as_deref().map_or("*".into(), printable),
            r.source
                .map_or("(sources not known good)".into(), |ip| ip.to_string()),
            r.failures,
            r.wait_secs,
            r.blocked_until_unix
                .map_or(String::new(), |u| format_utc(u.saturating_mul(1000)))
        ));
    }
    if list.left_off > 0 {
        s.push_str(&format!("({} more not shown)\n", list.left_off));
    }
    s
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
    use crate::auth::{PasswordCheck, Pepper, Role, SessionKind, WebConfig};
    use std::time::{Duration, SystemTime};

    #[tokio::test]
    async fn passwd_sets_the_password_ends_sessions_and_is_audited() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let users = UserStore::open(&db, &WebConfig::new(Pepper::generate(1))).unwrap();
        let sessions =
            SessionStore::open(&db, Duration::from_secs(60), Duration::from_secs(600)).unwrap();
        let audit = AuditLog::open(&db).unwrap();
        users
            .add_user(
                "ops@example.com",
                Role::PortalOwner,
                "first passphrase here",
            )
            .unwrap();
        users
            .add_user(
                "dev@example.com",
                Role::PortalOwner,
                "first passphrase here",
            )
            .unwrap();
        let now = SystemTime::now();
        let mine: Vec<_> = (0..2)
            .map(|_| {
                sessions
                    .create("ops@example.com", Role::PortalOwner, SessionKind::Full, now)
                    .unwrap()
            })
            .collect();
        let theirs = sessions
            .create("dev@example.com", Role::PortalOwner, SessionKind::Full, now)
            .unwrap();
        assert!(matches!(
            change_password(
                &users,
                &sessions,
                &audit,
                "ops@example.com",
                "password",
                "cli"
            ),
            Err(AuthError::WeakPassword(_))
        ));
        assert!(matches!(
            change_password(
                &users,
                &sessions,
                &audit,
                "nobody@example.com",
                "second passphrase here",
                "cli"
            ),
            Err(AuthError::NoSuchUser(_))
        ));
        let ended = change_password(
            &users,
            &sessions,
            &audit,
            "Ops@Example.com",
            "second passphrase here",
            "cli",
        )
        .unwrap();
        assert_eq!(ended, 2);
        for t in &mine {
            assert!(sessions.get(t, now).unwrap().is_none());
        }
        assert!(sessions.get(&theirs, now).unwrap().is_some());
        let pw = |p: &str| zeroize::Zeroizing::new(p.to_string());
        assert_eq!(
            users
                .check_password("ops@example.com", pw("first passphrase here"))
                .await
                .unwrap(),
            PasswordCheck::Mismatch
        );
        assert!(matches!(
            users
                .check_password("ops@example.com", pw("second passphrase here"))
                .await
                .unwrap(),
            PasswordCheck::Ok { .. }
        ));
        let recs = audit.list(None).unwrap();
        assert_eq!(recs.len(), 1, "only the change is audited");
        assert_eq!(recs[0].event.kind, "user.password-changed");
        assert_eq!(recs[0].event.subject.as_deref(), Some("ops@example.com"));
        assert!(!serde_json::to_string(&recs).unwrap().contains("passphrase"));
    }

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
        let list = render_throttles(
            &ThrottleList {
                rows: vec![crate::auth::ThrottleRow {
                    account: Some("\u{1b}[2Jevil@example.com".into()),
                    source: Some("127.0.0.2".parse().unwrap()),
                    failures: 4,
                    last_failure_unix: 1_700_000_000,
                    wait_secs: 2,
                    blocked_until_unix: None,
                }],
                left_off: 0,
                in_flight: 0,
            },
            false,
        );
        assert!(
            list.contains("127.0.0.2") && !list.contains('\u{1b}'),
            "{list}"
        );
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
