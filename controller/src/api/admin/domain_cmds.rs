//! The domain commands: add, list, deploy (start or join the job), status, remove.

use super::AdminHandler;
use super::proto::*;
use crate::domains::{Domains, IssuerKind};
use crate::error::ControllerError;
use std::sync::Arc;

impl AdminHandler {
    fn domains(&self) -> Result<&Arc<Domains>, ControllerError> {
        self.domains.as_ref().ok_or_else(|| {
            ControllerError::BadRequest("this command needs a running controller".into())
        })
    }

    /// `domain add`
    pub(super) fn domain_add(
        &self,
        name: String,
        issuer: String,
        owner: String,
        edge_zones: Vec<String>,
    ) -> Result<AdminReply, ControllerError> {
        let issuer = IssuerKind::parse(&issuer).ok_or_else(|| {
            ControllerError::BadRequest(format!(
                "issuer {} is not acme or internal",
                crate::text::Escaped(&issuer)
            ))
        })?;
        let d = self
            .domains()?
            .add(&name, issuer, &owner, &edge_zones, "cli")?;
        Ok(AdminReply::DomainAdded(d))
    }

    /// `domain list`
    pub(super) fn domain_list(&self) -> Result<AdminReply, ControllerError> {
        Ok(AdminReply::DomainList(self.domains()?.list()?))
    }

    /// `domain deploy`: start the job (or join the one running) and show where it is.
    pub(super) fn domain_deploy(&self, name: String) -> Result<AdminReply, ControllerError> {
        let d = self.domains()?;
        d.deploy(&name, "cli")?;
        Ok(AdminReply::Domain(d.detail(&name)?))
    }

    /// One poll of `domain deploy`.
    pub(super) fn domain_status(&self, name: String) -> Result<AdminReply, ControllerError> {
        Ok(AdminReply::Domain(self.domains()?.detail(&name)?))
    }

    /// `domain remove`
    pub(super) fn domain_remove(&self, name: String) -> Result<AdminReply, ControllerError> {
        let name = self.domains()?.remove(&name, "cli")?;
        Ok(AdminReply::DomainRemoved(DomainRemoved { name }))
    }
}
