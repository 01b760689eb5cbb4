//! The SSH commands: the CA, grants, user certificates and their revocation.

use super::AdminHandler;
use super::proto::*;
use crate::error::ControllerError;
use crate::ssh::{CaKeyType, Ssh};
use std::sync::Arc;
use std::time::Duration;

impl AdminHandler {
    fn ssh(&self) -> Result<&Arc<Ssh>, ControllerError> {
        self.ssh
            .as_ref()
            .ok_or_else(|| ControllerError::Unavailable("SSH CA"))
    }

    /// The user must exist and be enabled (when the user store is at hand).
    fn enabled_user(&self, email: &str) -> Result<(), ControllerError> {
        let web = self.web()?;
        if web.users().active_role(email)?.is_none() {
            return Err(ControllerError::NotFound(format!(
                "no enabled user {}",
                crate::text::Escaped(email)
            )));
        }
        Ok(())
    }

    /// `ssh init`
    pub(super) fn ssh_init(&self, key_type: String) -> Result<AdminReply, ControllerError> {
        let kind = CaKeyType::parse(&key_type).ok_or_else(|| {
            ControllerError::BadRequest(format!(
                "SSH CA key type {} is not ed25519 or rsa4096",
                crate::text::Escaped(&key_type)
            ))
        })?;
        Ok(AdminReply::SshCa(self.ssh()?.init(kind, "cli")?))
    }

    /// `ssh ca`
    pub(super) fn ssh_ca(&self) -> Result<AdminReply, ControllerError> {
        Ok(AdminReply::SshCa(self.ssh()?.ca()?))
    }

    /// `ssh known-hosts`
    pub(super) fn ssh_known_hosts(&self) -> Result<AdminReply, ControllerError> {
        let ssh = self.ssh()?;
        Ok(AdminReply::SshKnownHosts(SshLine {
            line: ssh.known_hosts_line()?,
            revoked: ssh
                .revoked_hosts()?
                .into_iter()
                .filter(|r| !r.line.is_empty())
                .map(|r| r.line)
                .collect(),
        }))
    }

    /// `ssh grant`
    pub(super) fn ssh_grant(
        &self,
        email: String,
        zone: String,
        principal: String,
        max_ttl_secs: Option<u64>,
        extensions: Vec<String>,
    ) -> Result<AdminReply, ControllerError> {
        self.enabled_user(&email)?;
        let g = self.ssh()?.grant(
            &email,
            &zone,
            &principal,
            max_ttl_secs.map(Duration::from_secs),
            &extensions,
            "cli",
        )?;
        Ok(AdminReply::SshGrantAdded(g))
    }

    /// `ssh revoke-grant`
    pub(super) fn ssh_revoke_grant(
        &self,
        email: String,
        zone: String,
        principal: String,
    ) -> Result<AdminReply, ControllerError> {
        let g = self.ssh()?.revoke_grant(&email, &zone, &principal, "cli")?;
        Ok(AdminReply::SshGrantRevoked(g))
    }

    /// `ssh grants`
    pub(super) fn ssh_grants(&self) -> Result<AdminReply, ControllerError> {
        Ok(AdminReply::SshGrants(self.ssh()?.grants()?))
    }

    /// `ssh sign-user`
    pub(super) fn ssh_sign_user(
        &self,
        email: String,
        public_key: String,
        ttl_secs: Option<u64>,
    ) -> Result<AdminReply, ControllerError> {
        self.enabled_user(&email)?;
        let c = self.ssh()?.sign_user(
            &email,
            &public_key,
            ttl_secs.map(Duration::from_secs),
            "cli",
        )?;
        Ok(AdminReply::SshUserCert(c))
    }

    /// `ssh revoke`
    pub(super) fn ssh_revoke(
        &self,
        serial: Option<u64>,
        email: Option<String>,
    ) -> Result<AdminReply, ControllerError> {
        let ssh = self.ssh()?;
        let serials = match (serial, email) {
            (Some(n), None) => vec![ssh.revoke_serial(n, "cli")?.serial],
            (None, Some(e)) => ssh.revoke_email(&e, "cli")?,
            _ => {
                return Err(ControllerError::BadRequest(
                    "give exactly one of --serial and --email".into(),
                ));
            }
        };
        Ok(AdminReply::SshRevoked(SshRevoked { serials }))
    }

    /// `ssh certs`
    pub(super) fn ssh_certs(&self, email: Option<String>) -> Result<AdminReply, ControllerError> {
        Ok(AdminReply::SshCerts(self.ssh()?.certs(email.as_deref())?))
    }

    /// `ssh krl`
    pub(super) fn ssh_krl(&self) -> Result<AdminReply, ControllerError> {
        Ok(AdminReply::SshKrl(SshKrl {
            krl: self.ssh()?.krl()?,
        }))
    }

    /// `ssh revoked-hosts`
    pub(super) fn ssh_revoked_hosts(&self) -> Result<AdminReply, ControllerError> {
        Ok(AdminReply::SshRevokedHosts(self.ssh()?.revoked_hosts()?))
    }
}
