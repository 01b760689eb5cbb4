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
mod rotation;
mod verify;

pub use binding::{LEGACY_WG_KEY_BINDING_OID, WG_KEY_BINDING_OID, is_wg_key_binding};
pub use crl::{RevocationReason, RevokedEntry};
pub use error::{CsrError, Error, Result};
pub use identity::{SpiffeId, WireGuardKey, validate_label};
pub use keys::{Kek, generate_rsa_2048, generate_rsa_4096, open_sealed, seal};
pub use ocsp::{
    CertStatus, OCSP_RESPONSE_VALIDITY, OcspOutcome, OcspQuery, ocsp_internal_error,
    ocsp_malformed, ocsp_unauthorized,
};
pub use profiles::{
    Ca, CaMaterial, IssuedCert, NodePolicy, NodeRequest, TlsNames, TlsPolicy, serial_hex,
};
pub use rotation::{
    NewCaCert, NewRoot, generate_intermediate, generate_root, verify_cross_signed_root,
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
pub fn unix_secs(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Convert a `SystemTime` to milliseconds since the Unix epoch (0 for times before it).
pub fn unix_millis(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// When to renew a certificate valid from `not_before` to `not_after`: at 2/3 of its
/// lifetime, earlier by up to 1/20 of the lifetime as `jitter` (0.0..=1.0, clamped) goes
/// from 0 to 1, so a fleet does not renew at once. The one renewal schedule of zonemesh.
pub fn renew_at(
    not_before: std::time::SystemTime,
    not_after: std::time::SystemTime,
    jitter: f64,
) -> std::time::SystemTime {
    let life = not_after.duration_since(not_before).unwrap_or_default();
    let at = not_before + life * 2 / 3;
    at.checked_sub(life.mul_f64(jitter.clamp(0.0, 1.0) / 20.0))
        .unwrap_or(at)
}

/// Where in a renewal spread of `spread_secs` the node `spiffe_id` renews after a CA
/// rotation: a fixed point from a hash of its identity, so every node (and every restart
/// of it) picks the same moment and a fleet is spread evenly over the window.
pub fn spread_offset(spiffe_id: &str, spread_secs: u64) -> u64 {
    use sha2::Digest;
    if spread_secs == 0 {
        return 0;
    }
    let h = sha2::Sha256::digest(spiffe_id.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&h[..8]);
    u64::from_be_bytes(first) % spread_secs
}

/// Convert a `SystemTime` to the `time` crate's UTC date, truncated to whole seconds
/// (DER times carry no fractions in our profiles).
pub(crate) fn to_offset(t: std::time::SystemTime) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(unix_secs(t) as i64)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

#[cfg(test)]
mod schedule_tests {
    use super::renew_at;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn renewal_is_at_two_thirds_with_at_most_a_twentieth_of_jitter() {
        let nb = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let na = nb + Duration::from_secs(30 * 86_400);
        assert_eq!(renew_at(nb, na, 0.0), nb + Duration::from_secs(20 * 86_400));
        assert_eq!(
            renew_at(nb, na, 1.0),
            nb + Duration::from_secs(20 * 86_400) - Duration::from_secs(30 * 86_400 / 20)
        );
        assert_eq!(renew_at(nb, na, 7.0), renew_at(nb, na, 1.0));
        // A certificate that ends before it starts is renewed at once.
        assert_eq!(renew_at(na, nb, 0.5), na);
    }
}
