//! The OID of the extension that binds a node's WireGuard key into its certificate.
//!
//! It is `2.25.<UUID>` (ITU-T X.667 / RFC 4122 §4.1): unique without registration, so it
//! cannot collide with another project's private arc. rcgen encodes OID arcs as `u64`, and
//! a UUID arc is 128 bits, so node certificates are built with a stand-in OID whose DER
//! encoding has exactly the same length. The stand-in is replaced by the real OID in the
//! to-be-signed bytes just before they are signed, and in the finished certificate: both
//! hold the same bytes, and every DER length stays valid.

use crate::error::{Error, Result};
use rcgen::{KeyPair, PublicKeyData, SignatureAlgorithm, SigningKey};
use std::sync::LazyLock;

/// The UUID behind the arc: `dd886903-a17c-4606-a0b3-854b332a7fa6`.
const BINDING_UUID: u128 = 0xdd88_6903_a17c_4606_a0b3_854b_332a_7fa6;

/// The binding OID in dotted form, as `openssl x509 -text` prints it.
pub const WG_KEY_BINDING_OID: &str = "2.25.294467669381897339508191816089449693094";

/// The OID used before the move to `2.25`; still read in certificates this CA issued earlier
/// (they chain to our own CA, so the other meaning of that arc cannot reach this code), never
/// written.
pub const LEGACY_WG_KEY_BINDING_OID: &[u64] = &[1, 3, 6, 1, 4, 1, 57264, 1, 1];

/// The stand-in handed to rcgen: `2.25.A.B` with a 9-byte and a 10-byte arc, 20 content
/// bytes like the real OID.
pub(crate) const STAND_IN_OID: &[u64] = &[2, 25, 0x7a6d_5a6f_6e65_6d73, 0xf7e9_0000_5747_4b42];

fn base128(mut v: u128, out: &mut Vec<u8>) {
    let mut septets = vec![(v & 0x7f) as u8];
    v >>= 7;
    while v > 0 {
        septets.push(((v & 0x7f) as u8) | 0x80);
        v >>= 7;
    }
    out.extend(septets.iter().rev());
}

fn oid_content(arcs: &[u128]) -> Vec<u8> {
    let mut out = Vec::new();
    base128(arcs[0] * 40 + arcs[1], &mut out);
    for &a in &arcs[2..] {
        base128(a, &mut out);
    }
    out
}

fn tlv(content: &[u8]) -> Vec<u8> {
    let mut v = vec![0x06, u8::try_from(content.len()).expect("short OID")];
    v.extend_from_slice(content);
    v
}

/// DER content octets of the binding OID (what `Oid::as_bytes` returns).
pub(crate) static BINDING_OID_CONTENT: LazyLock<Vec<u8>> =
    LazyLock::new(|| oid_content(&[2, 25, BINDING_UUID]));

static STAND_IN_TLV: LazyLock<Vec<u8>> = LazyLock::new(|| {
    let arcs: Vec<u128> = STAND_IN_OID.iter().map(|&a| u128::from(a)).collect();
    tlv(&oid_content(&arcs))
});
static BINDING_TLV: LazyLock<Vec<u8>> = LazyLock::new(|| tlv(&BINDING_OID_CONTENT));

/// Whether `oid` names the WireGuard key binding (today's arc or the legacy one).
pub fn is_wg_key_binding(oid: &x509_parser::oid_registry::Oid<'_>) -> bool {
    oid.as_bytes() == BINDING_OID_CONTENT.as_slice()
        || oid
            .iter()
            .is_some_and(|it| it.eq(LEGACY_WG_KEY_BINDING_OID.iter().copied()))
}

/// Replace the one stand-in OID in `der` by the binding OID. Anything other than exactly
/// one occurrence is refused: nothing is signed that was not built here.
pub(crate) fn put_binding_oid(der: &[u8]) -> Result<Vec<u8>> {
    let (from, to) = (STAND_IN_TLV.as_slice(), BINDING_TLV.as_slice());
    if from.len() != to.len() {
        return Err(Error::BadInput(
            "binding OID stand-in has the wrong length".into(),
        ));
    }
    let hits: Vec<usize> = der
        .windows(from.len())
        .enumerate()
        .filter(|(_, w)| *w == from)
        .map(|(i, _)| i)
        .collect();
    let [at] = hits.as_slice() else {
        return Err(Error::BadInput(format!(
            "expected one WireGuard binding in the certificate, found {}",
            hits.len()
        )));
    };
    let mut out = der.to_vec();
    out[*at..*at + to.len()].copy_from_slice(to);
    Ok(out)
}

/// The intermediate's key, signing node certificates with the binding OID in place.
pub(crate) struct BindingSigner<'a>(pub &'a KeyPair);

impl PublicKeyData for BindingSigner<'_> {
    fn der_bytes(&self) -> &[u8] {
        self.0.der_bytes()
    }
    fn algorithm(&self) -> &'static SignatureAlgorithm {
        self.0.algorithm()
    }
}

impl SigningKey for BindingSigner<'_> {
    fn sign(&self, msg: &[u8]) -> std::result::Result<Vec<u8>, rcgen::Error> {
        let tbs = put_binding_oid(msg).map_err(|_| rcgen::Error::CouldNotParseCertificate)?;
        self.0.sign(&tbs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binding_oid_is_the_uuid_arc() {
        // The UUID as one decimal arc, as X.667 spells it.
        assert_eq!(
            WG_KEY_BINDING_OID,
            format!(
                "2.25.{}",
                u128::from_str_radix("dd886903a17c4606a0b3854b332a7fa6", 16).unwrap()
            )
        );
        // Decode the content octets back to arcs, independently of the encoder.
        let mut arcs: Vec<u128> = Vec::new();
        let mut acc = 0u128;
        for b in BINDING_OID_CONTENT.iter() {
            acc = (acc << 7) | u128::from(b & 0x7f);
            if b & 0x80 == 0 {
                arcs.push(acc);
                acc = 0;
            }
        }
        assert_eq!(arcs, vec![2 * 40 + 25, BINDING_UUID]);
        let oid = x509_parser::oid_registry::Oid::new(BINDING_OID_CONTENT.as_slice().into());
        assert!(is_wg_key_binding(&oid));
        assert_eq!(STAND_IN_TLV.len(), BINDING_TLV.len());
    }

    #[test]
    fn only_one_stand_in_is_replaced() {
        let mut der = vec![0x30, 0x00];
        der.extend_from_slice(&STAND_IN_TLV);
        let out = put_binding_oid(&der).unwrap();
        assert_eq!(&out[2..], BINDING_TLV.as_slice());
        let twice = [der.clone(), der[2..].to_vec()].concat();
        assert!(put_binding_oid(&twice).is_err());
        assert!(put_binding_oid(&[0x30, 0x00]).is_err());
    }
}
