//! The commands on the web side's state: users, sign-in throttle, audit log.

use super::AdminHandler;
use super::proto::*;
use crate::auth::{ClearTarget, Role, cli as auth_cli};
use crate::error::ControllerError;

impl AdminHandler {
    /// `user add`
    pub(super) fn user_add(
        &self,
        email: String,
        role: String,
        password: Redacted,
    ) -> Result<AdminReply, ControllerError> {
        let role: Role = role.parse().map_err(ControllerError::BadRequest)?;
        let web = self.web()?;
        let added = auth_cli::add_user(
            web.users(),
            self.audit_log()?,
            &email,
            role,
            &password.0,
            "cli",
        )?;
        Ok(AdminReply::UserAdded(UserAdded {
            email: added.email.clone(),
            role: added.role,
            otpauth_uri: added.otpauth_uri.as_ref().map(|u| Redacted(u.to_string())),
            qr_terminal: added.qr_terminal.clone().map(Redacted),
        }))
    }

    /// `user list`
    pub(super) fn user_list(&self) -> Result<AdminReply, ControllerError> {
        let users = self.web()?.users().list_users()?;
        Ok(AdminReply::UserList(users))
    }

    /// `user disable`
    pub(super) fn user_disable(&self, email: String) -> Result<AdminReply, ControllerError> {
        let web = self.web()?;
        let ended = auth_cli::disable_user(
            web.users(),
            web.sessions(),
            self.audit_log()?,
            &email,
            "cli",
        )?;
        // A disabled user's SSH certificates go on the KRL of every server.
        if let Some(ssh) = &self.ssh {
            ssh.revoke_email(&email, "cli")?;
        }
        Ok(AdminReply::UserSessionsEnded(UserSessionsEnded {
            email: crate::auth::normalize_email(&email),
            sessions_ended: ended,
        }))
    }

    /// `user passwd`
    pub(super) fn user_passwd(
        &self,
        email: String,
        password: Redacted,
    ) -> Result<AdminReply, ControllerError> {
        let web = self.web()?;
        let ended = auth_cli::change_password(
            web.users(),
            web.sessions(),
            self.audit_log()?,
            &email,
            &password.0,
            "cli",
        )?;
        Ok(AdminReply::UserSessionsEnded(UserSessionsEnded {
            email: crate::auth::normalize_email(&email),
            sessions_ended: ended,
        }))
    }

    /// `user reset-totp`
    pub(super) fn user_reset_totp(&self, email: String) -> Result<AdminReply, ControllerError> {
        let web = self.web()?;
        let ended = auth_cli::reset_totp(
            web.users(),
            web.sessions(),
            self.audit_log()?,
            &email,
            "cli",
        )?;
        Ok(AdminReply::UserSessionsEnded(UserSessionsEnded {
            email: crate::auth::normalize_email(&email),
            sessions_ended: ended,
        }))
    }

    /// `throttle list`
    pub(super) fn throttle_list(&self) -> Result<AdminReply, ControllerError> {
        Ok(AdminReply::ThrottleList(self.web()?.throttle_list(1000)))
    }

    /// `throttle clear`
    pub(super) fn throttle_clear(
        &self,
        email: Option<String>,
        source: Option<String>,
    ) -> Result<AdminReply, ControllerError> {
        let target = match (email, source) {
            (Some(e), None) => ClearTarget::Account(e),
            (None, Some(s)) => ClearTarget::Source(s.parse().map_err(|e| {
                ControllerError::BadRequest(format!("{s:?} is not an IP address: {e}"))
            })?),
            _ => {
                return Err(ControllerError::BadRequest(
                    "give exactly one of --email and --source".into(),
                ));
            }
        };
        let cleared = self.web()?.clear_throttle(&target, "cli");
        Ok(AdminReply::ThrottleCleared(ThrottleCleared {
            target,
            cleared,
        }))
    }

    /// `audit`
    pub(super) fn audit(&self, limit: Option<usize>) -> Result<AdminReply, ControllerError> {
        let records = self.audit_log()?.list(limit)?;
        Ok(AdminReply::Audit(records))
    }
}
