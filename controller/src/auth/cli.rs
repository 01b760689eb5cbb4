//! What `zonemesh-controller user add/disable/passwd` does, audited, and how the CLI reads
//! a password. How replies print is `crate::cli::render`.

use std::io::BufRead;

use zeroize::Zeroizing;

use super::{AuthError, Role, SessionStore, UserAdded, UserStore};
use crate::audit::{AuditEvent, AuditLog};

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
    end_sessions_audited(sessions, audit, &email, actor, "user.disabled")
}

/// End every session of `email` and record `kind` with how many ended.
fn end_sessions_audited(
    sessions: &SessionStore,
    audit: &AuditLog,
    email: &str,
    actor: &str,
    kind: &str,
) -> Result<usize, AuthError> {
    let ended = sessions.remove_for_user(email)?;
    if let Err(e) = audit.record(
        AuditEvent::new(kind, "ok")
            .actor(actor)
            .subject(email)
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
    end_sessions_audited(sessions, audit, &email, actor, "user.password-changed")
}

/// Read a password from `input` (stdin when it is not a terminal): the first line, without
/// its line ending. Nothing else is trimmed: spaces are part of a password.
pub fn read_password_line(mut input: impl BufRead) -> std::io::Result<Zeroizing<String>> {
    let mut line = Zeroizing::new(String::new());
    input.read_line(&mut line)?;
    let trimmed = line.trim_end_matches(['\n', '\r']).to_string();
    Ok(Zeroizing::new(trimmed))
}

/// The password, never from argv: a no-echo prompt (asked twice) on a terminal, else the
/// first line of stdin.
pub fn read_password() -> std::io::Result<Zeroizing<String>> {
    use std::io::IsTerminal;
    if !std::io::stdin().is_terminal() {
        return read_password_line(std::io::stdin().lock());
    }
    let first = Zeroizing::new(rpassword::prompt_password("password: ")?);
    let again = Zeroizing::new(rpassword::prompt_password("again:    ")?);
    if *first != *again {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the two passwords differ",
        ));
    }
    Ok(first)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{PasswordCheck, Pepper, Role, SessionKind, WebConfig};
    use std::time::{Duration, SystemTime};

    #[tokio::test]
    async fn passwd_sets_the_password_ends_sessions_and_is_audited() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::core::kv::Kv::sled(dir.path()).unwrap();
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
        let db = crate::core::kv::Kv::sled(dir.path()).unwrap();
        let users = UserStore::open(&db, &WebConfig::new(Pepper::generate(1))).unwrap();
        let sessions =
            SessionStore::open(&db, Duration::from_secs(60), Duration::from_secs(600)).unwrap();
        let audit = AuditLog::open(&db).unwrap();
        let pw = read_password_line(&b"  spaces count too  \r\nignored"[..]).unwrap();
        assert_eq!(&*pw, "  spaces count too  ");
        let added = add_user(&users, &audit, "Ops@Example.com", Role::Admin, &pw, "cli").unwrap();
        assert!(added.otpauth_uri.is_some() && added.qr_terminal.is_some());
        disable_user(&users, &sessions, &audit, "ops@example.com", "cli").unwrap();
        let list = users.list_users().unwrap();
        assert!(list[0].disabled);
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
