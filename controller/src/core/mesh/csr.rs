//! What the controller reads from a node's CSR: only to refuse one naming another node or
//! key, never to fill in a certificate.

use crate::error::{ControllerError, Result};

/// The names a CSR asks for (subject CN and SAN strings); used only to refuse a CSR that
/// names another node, never to fill in the certificate.
fn csr_names(csr_der: &[u8]) -> Vec<String> {
    use x509_parser::prelude::{FromDer, X509CertificationRequest};
    let Ok((_, csr)) = X509CertificationRequest::from_der(csr_der) else {
        return vec![];
    };
    let mut names: Vec<String> = csr
        .certification_request_info
        .subject
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_owned))
        .collect();
    if let Some(exts) = csr.requested_extensions() {
        for ext in exts {
            if let x509_parser::extensions::ParsedExtension::SubjectAlternativeName(san) = ext {
                names.extend(san.general_names.iter().map(|n| match n {
                    x509_parser::extensions::GeneralName::URI(u) => u.to_string(),
                    x509_parser::extensions::GeneralName::DNSName(d) => d.to_string(),
                    other => format!("{other}"),
                }));
            }
        }
    }
    names
}

/// Whether a CSR carries the same public key as a certificate.
pub(super) fn same_public_key(csr_der: &[u8], cert_der: &[u8]) -> bool {
    use x509_parser::prelude::{FromDer, X509Certificate, X509CertificationRequest};
    let (Ok((_, csr)), Ok((_, cert))) = (
        X509CertificationRequest::from_der(csr_der),
        X509Certificate::from_der(cert_der),
    ) else {
        return false;
    };
    csr.certification_request_info.subject_pki.raw == cert.tbs_certificate.subject_pki.raw
}

pub(super) fn check_csr_names(
    csr_der: &[u8],
    trust_domain: &str,
    zone: &str,
    node: &str,
) -> Result<()> {
    let spiffe = zonemesh_ca::SpiffeId {
        trust_domain: trust_domain.into(),
        zone: zone.into(),
        node: node.into(),
    }
    .uri();
    for name in csr_names(csr_der) {
        if name != node && name != spiffe {
            return Err(ControllerError::PermissionDenied(format!(
                "CSR names {name:?}, but this request is for node {zone}/{node}"
            )));
        }
    }
    Ok(())
}
