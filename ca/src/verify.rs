//! Verification of a presented node chain: the one function every part of zonemesh uses
//! to decide whether a node is who it says it is.

use crate::binding::is_wg_key_binding;
use crate::error::{Error, Result};
use crate::identity::{SpiffeId, WireGuardKey};
use crate::profiles::serial_hex;
use rustls_pki_types::{CertificateDer, UnixTime};
use std::time::SystemTime;
use webpki::{
    CertRevocationList, EndEntityCert, KeyUsage, OwnedCertRevocationList, RevocationCheckDepth,
    RevocationOptionsBuilder, UnknownStatusPolicy,
};
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate};

/// The roots and intermediates a verifier trusts for one trust domain. Several of each may
/// be present while an intermediate is being rotated.
#[derive(Clone, Debug)]
pub struct TrustStore {
    trust_domain: String,
    roots: Vec<CertificateDer<'static>>,
    intermediates: Vec<CertificateDer<'static>>,
}

/// A node whose chain verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedNode {
    pub id: SpiffeId,
    pub wg_public_key: WireGuardKey,
    pub serial_hex: String,
    pub not_after: SystemTime,
}

impl VerifiedNode {
    /// Accept `announced` only if it is the key bound in the certificate.
    pub fn check_wireguard_key(&self, announced: &WireGuardKey) -> Result<()> {
        if &self.wg_public_key == announced {
            Ok(())
        } else {
            Err(Error::WireGuardKeyMismatch)
        }
    }
}

fn map_webpki(e: webpki::Error) -> Error {
    match e {
        webpki::Error::CertExpired { .. } => Error::Expired,
        webpki::Error::CertNotValidYet { .. } => Error::NotYetValid,
        webpki::Error::CertRevoked => Error::Revoked,
        // A foreign CA with the same names as ours fails on the signature, not the name.
        webpki::Error::UnknownIssuer | webpki::Error::InvalidSignatureForPublicKey => {
            Error::UnknownIssuer
        }
        other => Error::Chain(other),
    }
}

impl TrustStore {
    /// A trust store from DER certificates.
    pub fn new(trust_domain: &str, roots: Vec<Vec<u8>>, intermediates: Vec<Vec<u8>>) -> Self {
        Self {
            trust_domain: trust_domain.into(),
            roots: roots.into_iter().map(CertificateDer::from).collect(),
            intermediates: intermediates
                .into_iter()
                .map(CertificateDer::from)
                .collect(),
        }
    }

    /// The trust domain node identities must belong to.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The trusted roots (DER).
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// Verify `chain` (leaf first, then any intermediates) at time `now` against the trusted
    /// roots and the given CRLs (DER; at least one, issued by the leaf's issuer). Returns the
    /// node's identity and its bound WireGuard key.
    pub fn verify_node_chain(
        &self,
        chain: &[Vec<u8>],
        crls: &[Vec<u8>],
        now: SystemTime,
    ) -> Result<VerifiedNode> {
        let leaf_der = chain
            .first()
            .ok_or_else(|| Error::BadInput("empty certificate chain".into()))?;
        if crls.is_empty() {
            return Err(Error::NoCrl);
        }
        let leaf = CertificateDer::from(leaf_der.as_slice());
        let ee = EndEntityCert::try_from(&leaf).map_err(map_webpki)?;
        let anchors = self
            .roots
            .iter()
            .map(|r| webpki::anchor_from_trusted_cert(r).map_err(map_webpki))
            .collect::<Result<Vec<_>>>()?;
        let mut intermediates: Vec<CertificateDer<'_>> = chain[1..]
            .iter()
            .map(|c| CertificateDer::from(c.as_slice()))
            .collect();
        intermediates.extend(self.intermediates.iter().cloned());
        let owned = crls
            .iter()
            .map(|c| {
                OwnedCertRevocationList::from_der(c)
                    .map(CertRevocationList::from)
                    .map_err(map_webpki)
            })
            .collect::<Result<Vec<_>>>()?;
        let refs: Vec<&CertRevocationList<'_>> = owned.iter().collect();
        let revocation = RevocationOptionsBuilder::new(&refs)
            .map_err(|_| Error::NoCrl)?
            .with_depth(RevocationCheckDepth::EndEntity)
            .with_status_policy(UnknownStatusPolicy::Deny)
            .build();
        let secs = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &intermediates,
            UnixTime::since_unix_epoch(secs),
            KeyUsage::client_auth(),
            Some(revocation),
            None,
        )
        .map_err(map_webpki)?;
        self.read_node_identity(leaf_der)
    }

    /// Read identity fields from a leaf that has already been verified.
    fn read_node_identity(&self, leaf_der: &[u8]) -> Result<VerifiedNode> {
        let bad = |m: &str| Error::NotANodeCertificate(m.into());
        let (_, cert) = X509Certificate::from_der(leaf_der)
            .map_err(|e| Error::NotANodeCertificate(e.to_string()))?;
        if cert.is_ca() {
            return Err(bad("leaf is a CA certificate"));
        }
        let mut uris = Vec::new();
        let mut wg = None;
        for ext in cert.extensions() {
            match ext.parsed_extension() {
                ParsedExtension::SubjectAlternativeName(san) => {
                    for n in &san.general_names {
                        match n {
                            GeneralName::URI(u) => uris.push(u.to_string()),
                            _ => return Err(bad("node certificates carry only a SPIFFE URI SAN")),
                        }
                    }
                }
                _ if is_wg_key_binding(&ext.oid) => {
                    let key = yasna::parse_der(ext.value, |r| r.read_bytes())
                        .map_err(|_| bad("malformed WireGuard key binding"))?;
                    if wg.replace(WireGuardKey::from_slice(&key)?).is_some() {
                        return Err(bad("more than one WireGuard key binding"));
                    }
                }
                _ => {}
            }
        }
        let [uri] = uris.as_slice() else {
            return Err(bad("exactly one SPIFFE URI SAN is required"));
        };
        let id = SpiffeId::parse(uri)?;
        if id.trust_domain != self.trust_domain {
            return Err(Error::NotANodeCertificate(format!(
                "trust domain {:?} is not {:?}",
                id.trust_domain, self.trust_domain
            )));
        }
        let wg_public_key = wg.ok_or_else(|| bad("no WireGuard key binding"))?;
        let not_after = SystemTime::UNIX_EPOCH
            + std::time::Duration::from_secs(
                u64::try_from(cert.validity().not_after.timestamp()).unwrap_or(0),
            );
        Ok(VerifiedNode {
            id,
            wg_public_key,
            serial_hex: serial_hex(cert.raw_serial()),
            not_after,
        })
    }
}
