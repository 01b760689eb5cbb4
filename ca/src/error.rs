use thiserror::Error;

/// Result alias for the CA library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a CSR could not be read.
#[derive(Debug, Error)]
pub enum CsrError {
    #[error("{0}")]
    Der(#[from] x509_parser::nom::Err<x509_parser::error::X509Error>),
    #[error("trailing data after the CSR")]
    TrailingData,
    #[error("public key: {0}")]
    PublicKey(#[source] x509_parser::error::X509Error),
}

/// Everything the CA can refuse or fail at. Messages are written for the operator.
#[derive(Debug, Error)]
pub enum Error {
    #[error("invalid input: {0}")]
    BadInput(String),
    #[error("CSR is not valid DER or PEM: {0}")]
    CsrParse(#[from] CsrError),
    #[error("CSR signature does not verify")]
    CsrSignature,
    #[error("key refused: {0}")]
    KeyPolicy(String),
    #[error("invalid name: {0}")]
    Name(String),
    #[error("invalid WireGuard public key: {0}")]
    WireGuardKey(String),
    #[error("requested lifetime {requested_secs}s exceeds the maximum of {max_secs}s")]
    LifetimeTooLong { requested_secs: u64, max_secs: u64 },
    #[error("certificate has expired")]
    Expired,
    #[error("certificate is not valid yet")]
    NotYetValid,
    #[error("certificate has been revoked")]
    Revoked,
    #[error("certificate was not issued by a trusted zonemesh CA")]
    UnknownIssuer,
    #[error("certificate chain rejected: {0:?}")]
    Chain(#[source] webpki::Error),
    #[error("certificate is not a zonemesh node identity: {0}")]
    NotANodeCertificate(String),
    #[error("WireGuard key does not match the key bound in the node certificate")]
    WireGuardKeyMismatch,
    #[error("no CRL was supplied; revocation cannot be checked")]
    NoCrl,
    #[error("sealed key cannot be opened (wrong key-encryption key or corrupted data)")]
    Unseal,
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("signing the OCSP response failed: {0}")]
    OcspSign(#[source] rcgen::Error),
    #[error("cryptographic operation failed: {0}")]
    AwsLc(#[from] aws_lc_rs::error::Unspecified),
}
