//! The zonemesh internal certificate authority as a library.
//!
//! Everything here is free of I/O: keys, certificates, CSRs, CRLs and OCSP messages go in
//! and out as bytes, and the current time is always a parameter. The controller owns the
//! files, the clock and the network; this crate owns the rules.

mod binding;
mod crl;
mod error;
mod identity;
mod keys;
mod ocsp;
mod profiles;
mod verify;

pub use binding::{LEGACY_WG_KEY_BINDING_OID, WG_KEY_BINDING_OID, is_wg_key_binding};
pub use crl::{RevocationReason, RevokedEntry};
pub use error::{Error, Result};
pub use identity::{SpiffeId, WireGuardKey, validate_label};
pub use keys::{Kek, generate_rsa_2048, generate_rsa_4096, open_sealed, seal};
pub use ocsp::{
    CertStatus, OCSP_RESPONSE_VALIDITY, OcspOutcome, OcspQuery, ocsp_internal_error,
    ocsp_malformed, ocsp_unauthorized,
};
pub use profiles::{
    Ca, CaMaterial, IssuedCert, NodePolicy, NodeRequest, TlsNames, TlsPolicy, serial_hex,
};
pub use verify::{TrustStore, VerifiedNode};

/// Re-exported so callers can name key types without depending on rcgen directly.
pub use rcgen::KeyPair;

/// SHA-256 fingerprint of a DER certificate as lowercase hex: how operators pin the root.
pub fn fingerprint_sha256(der: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(der))
}

/// Encode DER bytes as PEM with the given label.
pub fn to_pem(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Decode every PEM block with the given label (for example `CERTIFICATE`) into DER.
pub fn pem_blocks(label: &str, pem: &str) -> Result<Vec<Vec<u8>>> {
    use base64::Engine;
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let mut out = Vec::new();
    let mut rest = pem;
    while let Some(start) = rest.find(&begin) {
        let body_start = start + begin.len();
        let stop = rest[body_start..]
            .find(&end)
            .ok_or_else(|| Error::BadInput(format!("unterminated PEM block {label}")))?;
        let body: String = rest[body_start..body_start + stop]
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect();
        let der = base64::engine::general_purpose::STANDARD
            .decode(body)
            .map_err(|e| Error::BadInput(format!("PEM block {label} is not valid base64: {e}")))?;
        out.push(der);
        rest = &rest[body_start + stop + end.len()..];
    }
    Ok(out)
}

/// Convert a `SystemTime` to seconds since the Unix epoch (0 for times before it).
pub(crate) fn unix_secs(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Convert a `SystemTime` to the `time` crate's UTC date, truncated to whole seconds
/// (DER times carry no fractions in our profiles).
pub(crate) fn to_offset(t: std::time::SystemTime) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(unix_secs(t) as i64)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}
