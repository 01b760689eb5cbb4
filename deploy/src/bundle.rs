//! A domain's certificate: the chain as issued and the key it was issued for.

use zeroize::Zeroizing;
use zonemesh_proto as pb;

/// One domain's certificate chain and private key.
///
/// `Debug` never prints the key.
#[derive(Clone)]
pub struct CertBundle {
    /// The DNS name the certificate is for (lower case, no trailing dot).
    pub domain: String,
    /// Leaf first, then the intermediates (DER).
    pub chain_der: Vec<Vec<u8>>,
    /// The private key, PKCS#8 DER.
    pub key_pkcs8_der: Zeroizing<Vec<u8>>,
    /// The leaf's serial, lower-case hex.
    pub serial_hex: String,
    /// The leaf's notAfter, Unix seconds.
    pub not_after_unix: u64,
}

impl std::fmt::Debug for CertBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertBundle")
            .field("domain", &self.domain)
            .field("serial_hex", &self.serial_hex)
            .field("not_after_unix", &self.not_after_unix)
            .field("chain_len", &self.chain_der.len())
            .finish_non_exhaustive()
    }
}

impl From<pb::DomainCertificate> for CertBundle {
    fn from(m: pb::DomainCertificate) -> Self {
        Self {
            domain: m.domain,
            chain_der: m.chain_der,
            key_pkcs8_der: Zeroizing::new(m.key_pkcs8_der),
            serial_hex: m.serial_hex,
            not_after_unix: m.not_after_unix,
        }
    }
}

impl From<&CertBundle> for pb::DomainCertificate {
    fn from(b: &CertBundle) -> Self {
        Self {
            domain: b.domain.clone(),
            chain_der: b.chain_der.clone(),
            key_pkcs8_der: b.key_pkcs8_der.to_vec(),
            serial_hex: b.serial_hex.clone(),
            not_after_unix: b.not_after_unix,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_key() {
        let b = CertBundle {
            domain: "portal.example.test".into(),
            chain_der: vec![vec![1, 2, 3]],
            key_pkcs8_der: Zeroizing::new(b"SECRETKEYBYTES".to_vec()),
            serial_hex: "0a".into(),
            not_after_unix: 1,
        };
        let s = format!("{b:?} {:?}", pb::DomainCertificate::from(&b));
        assert!(
            !s.contains("SECRETKEYBYTES") && !s.contains("83, 69, 67"),
            "{s}"
        );
        let back = CertBundle::from(pb::DomainCertificate::from(&b));
        assert_eq!(back.key_pkcs8_der.as_slice(), b"SECRETKEYBYTES");
    }
}
