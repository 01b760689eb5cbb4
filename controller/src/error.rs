//! The controller's error type and the one place where errors become gRPC statuses.

use crate::store::StoreError;
use thiserror::Error;

/// Everything the controller can refuse or fail at.
#[derive(Debug, Error)]
pub enum ControllerError {
    #[error(transparent)]
    Ca(#[from] zonemesh_ca::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    RateLimited(String),
    /// A certificate an issuer handed back does not parse.
    #[error("issued certificate: {0}")]
    IssuedCertificate(#[source] x509_parser::nom::Err<x509_parser::error::X509Error>),
    /// A command needs a part this controller was started without.
    #[error("{0} unavailable")]
    Unavailable(&'static str),
    #[error(transparent)]
    Auth(#[from] crate::auth::AuthError),
    #[error(transparent)]
    Blocking(#[from] crate::blocking::BlockingError),
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
    #[error("backup: {0}")]
    Backup(#[from] crate::core::backup::BackupError),
    #[error("SSH key: {0}")]
    SshKey(#[from] ssh_key::Error),
    /// The stored CA certificates do not form a working CA (no active intermediate...).
    #[error("CA records: {0}")]
    CaRecords(String),
    #[error("CRL update: {0}")]
    CrlUpdate(#[source] crate::core::mesh::CrlListenerError),
}

pub type Result<T, E = ControllerError> = std::result::Result<T, E>;

impl From<ControllerError> for tonic::Status {
    /// What a gRPC caller may see: policy refusals are explained, internal failures are not.
    fn from(e: ControllerError) -> Self {
        use ControllerError as E;
        use zonemesh_ca::Error as CaE;
        match &e {
            E::BadRequest(m) => tonic::Status::invalid_argument(m.clone()),
            E::NotFound(m) => tonic::Status::not_found(m.clone()),
            E::AlreadyExists(m) => tonic::Status::already_exists(m.clone()),
            E::Unauthenticated(m) => tonic::Status::unauthenticated(m.clone()),
            E::PermissionDenied(m) => tonic::Status::permission_denied(m.clone()),
            E::RateLimited(m) => tonic::Status::resource_exhausted(m.clone()),
            E::Ca(
                CaE::BadInput(_)
                | CaE::CsrParse(_)
                | CaE::CsrSignature
                | CaE::KeyPolicy(_)
                | CaE::Name(_)
                | CaE::WireGuardKey(_)
                | CaE::LifetimeTooLong { .. },
            ) => tonic::Status::invalid_argument(e.to_string()),
            E::Ca(
                CaE::Revoked
                | CaE::Expired
                | CaE::NotYetValid
                | CaE::UnknownIssuer
                | CaE::NotANodeCertificate(_),
            ) => tonic::Status::unauthenticated(e.to_string()),
            // The store not answering (or a write that lost a race) is worth a retry.
            E::Store(StoreError::Db(_) | StoreError::Flush(_) | StoreError::Conflict) => {
                tonic::Status::unavailable(format!(
                    "the controller's store is unavailable, try again later: {e}"
                ))
            }
            _ => {
                tracing::error!(error = %e, "internal error");
                tonic::Status::internal("internal error")
            }
        }
    }
}
