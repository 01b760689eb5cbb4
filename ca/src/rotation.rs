//! CA rotation: a new intermediate under a root, a new root, and the cross-signature that
//! lets a relying party that trusts only the old root move its trust to the new one.
//!
//! A cross-signature is a CA certificate with the new root's subject and public key, issued
//! by the old root. A chain `leaf → intermediate → cross → old root` therefore verifies for
//! a party that still trusts only the old root, and [`verify_cross_signed_root`] is the one
//! check an agent runs before it pins the new root.

use crate::error::{Error, Result};
use crate::identity::validate_label;
use crate::keys;
use crate::profiles::{BACKDATE, intermediate_profile, load_rsa_key, random_serial, root_profile};
use crate::to_offset;
use rcgen::{Issuer, KeyPair};
use rustls_pki_types::CertificateDer;
use std::time::SystemTime;
use x509_parser::prelude::{FromDer, X509Certificate};
use zeroize::Zeroizing;

/// A freshly generated CA certificate and its key (to be sealed by the caller).
pub struct NewCaCert {
    pub cert_der: Vec<u8>,
    pub key_pkcs8: Zeroizing<Vec<u8>>,
}

/// A new root, its first intermediate and the old root's cross-signature of it.
pub struct NewRoot {
    pub root: NewCaCert,
    pub intermediate: NewCaCert,
    /// The new root's subject and key, issued by the old root.
    pub cross_der: Vec<u8>,
}

fn root_issuer(root_der: &[u8], root_key_pkcs8: &[u8]) -> Result<Issuer<'static, KeyPair>> {
    let key = load_rsa_key(root_key_pkcs8)?;
    let (_, cert) = X509Certificate::from_der(root_der)
        .map_err(|e| Error::BadInput(format!("root certificate: {e}")))?;
    if cert.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(&key).as_slice() {
        return Err(Error::BadInput(
            "root key does not match the root certificate".into(),
        ));
    }
    Ok(Issuer::from_ca_cert_der(
        &CertificateDer::from(root_der.to_vec()),
        key,
    )?)
}

/// A new RSA-4096 intermediate (profile of generation `generation`, 5 years) under the root
/// `root_der` whose key is `root_key_pkcs8`. Slow: run it on a blocking thread.
pub fn generate_intermediate(
    trust_domain: &str,
    root_der: &[u8],
    root_key_pkcs8: &[u8],
    generation: u32,
    now: SystemTime,
) -> Result<NewCaCert> {
    validate_label("trust domain", trust_domain, true)?;
    let issuer = root_issuer(root_der, root_key_pkcs8)?;
    let key = keys::generate_rsa_4096()?;
    let cert = intermediate_profile(trust_domain, generation, now).signed_by(&key, &issuer)?;
    Ok(NewCaCert {
        cert_der: cert.der().to_vec(),
        key_pkcs8: Zeroizing::new(key.serialize_der()),
    })
}

/// A new root of generation `root_generation` (RSA-4096, 10 years), an intermediate of
/// generation `int_generation` under it, and the cross-signature of the new root by the
/// old root (valid no longer than the old root). Slow: two RSA-4096 keys.
pub fn generate_root(
    trust_domain: &str,
    old_root_der: &[u8],
    old_root_key_pkcs8: &[u8],
    root_generation: u32,
    int_generation: u32,
    now: SystemTime,
) -> Result<NewRoot> {
    validate_label("trust domain", trust_domain, true)?;
    let old = root_issuer(old_root_der, old_root_key_pkcs8)?;
    let (_, old_cert) = X509Certificate::from_der(old_root_der)
        .map_err(|e| Error::BadInput(format!("old root certificate: {e}")))?;
    let old_not_after = old_cert.validity().not_after.to_datetime();

    let root_key = keys::generate_rsa_4096()?;
    let root_params = root_profile(trust_domain, root_generation, now);
    let root_cert = root_params.self_signed(&root_key)?;

    // The same subject and key (and so the same subject key identifier), issued by the
    // old root: a fresh serial, an authority key identifier naming the old root.
    let mut cross = root_profile(trust_domain, root_generation, now);
    cross.serial_number = Some(random_serial());
    cross.not_before = to_offset(now - BACKDATE);
    if cross.not_after > old_not_after {
        cross.not_after = old_not_after;
    }
    cross.use_authority_key_identifier_extension = true;
    let cross_cert = cross.signed_by(&root_key, &old)?;

    let root_issuer = Issuer::new(root_params, &root_key);
    let int_key = keys::generate_rsa_4096()?;
    let int_cert = intermediate_profile(trust_domain, int_generation, now)
        .signed_by(&int_key, &root_issuer)?;
    Ok(NewRoot {
        root: NewCaCert {
            cert_der: root_cert.der().to_vec(),
            key_pkcs8: Zeroizing::new(root_key.serialize_der()),
        },
        intermediate: NewCaCert {
            cert_der: int_cert.der().to_vec(),
            key_pkcs8: Zeroizing::new(int_key.serialize_der()),
        },
        cross_der: cross_cert.der().to_vec(),
    })
}

fn parse<'a>(what: &str, der: &'a [u8]) -> Result<X509Certificate<'a>> {
    X509Certificate::from_der(der)
        .map(|(_, c)| c)
        .map_err(|e| Error::BadInput(format!("{what}: {e}")))
}

fn validity_covers(c: &X509Certificate<'_>, now: SystemTime) -> bool {
    let t = crate::unix_secs(now) as i64;
    c.validity().not_before.timestamp() <= t && t <= c.validity().not_after.timestamp()
}

/// Whether `new_root_der` may replace `trusted_root_der` as a pinned root: `new_root_der`
/// is a self-signed CA certificate valid at `now`, and `cross_der` is a CA certificate
/// valid at `now` with exactly its subject and public key, signed by the trusted root's
/// key and naming the trusted root as issuer.
pub fn verify_cross_signed_root(
    trusted_root_der: &[u8],
    cross_der: &[u8],
    new_root_der: &[u8],
    now: SystemTime,
) -> Result<()> {
    let trusted = parse("trusted root", trusted_root_der)?;
    let cross = parse("cross-signature", cross_der)?;
    let new = parse("new root", new_root_der)?;
    let refuse = |m: &str| Err(Error::BadInput(format!("cross-signature refused: {m}")));
    if !new.is_ca() || !cross.is_ca() {
        return refuse("not a CA certificate");
    }
    if new.subject().as_raw() != new.issuer().as_raw()
        || new.verify_signature(Some(new.public_key())).is_err()
    {
        return refuse("the new root is not self-signed");
    }
    if cross.subject().as_raw() != new.subject().as_raw()
        || cross.public_key().raw != new.public_key().raw
    {
        return refuse("it is not for the new root's subject and key");
    }
    if cross.issuer().as_raw() != trusted.subject().as_raw()
        || cross.verify_signature(Some(trusted.public_key())).is_err()
    {
        return refuse("it is not signed by the trusted root");
    }
    if !validity_covers(&cross, now) || !validity_covers(&new, now) {
        return refuse("outside its validity");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CaMaterial;
    use std::time::SystemTime;

    #[test]
    fn a_new_root_is_accepted_only_through_the_old_roots_cross_signature() {
        let now = SystemTime::now();
        let m = CaMaterial::generate("rot.test", now, |_| {}).unwrap();
        let new =
            generate_root("rot.test", &m.root_cert_der, &m.root_key_pkcs8, 2, 2, now).unwrap();
        verify_cross_signed_root(&m.root_cert_der, &new.cross_der, &new.root.cert_der, now)
            .unwrap();
        // A foreign CA's "cross-signature" of the same new root does not verify.
        let other = CaMaterial::generate("rot.test", now, |_| {}).unwrap();
        let forged = generate_root(
            "rot.test",
            &other.root_cert_der,
            &other.root_key_pkcs8,
            2,
            2,
            now,
        )
        .unwrap();
        assert!(
            verify_cross_signed_root(
                &m.root_cert_der,
                &forged.cross_der,
                &forged.root.cert_der,
                now
            )
            .is_err()
        );
        // The real cross-signature does not vouch for another new root.
        assert!(
            verify_cross_signed_root(&m.root_cert_der, &new.cross_der, &forged.root.cert_der, now)
                .is_err()
        );
        // The new intermediate chains to the new root; a rotated intermediate to the old.
        let ca = crate::Ca::load(
            "rot.test",
            &new.root.cert_der,
            &new.intermediate.cert_der,
            &new.intermediate.key_pkcs8,
        )
        .unwrap();
        assert!(ca.intermediate_der() != m.intermediate_cert_der.as_slice());
        let int2 =
            generate_intermediate("rot.test", &m.root_cert_der, &m.root_key_pkcs8, 2, now).unwrap();
        crate::Ca::load(
            "rot.test",
            &m.root_cert_der,
            &int2.cert_der,
            &int2.key_pkcs8,
        )
        .unwrap();
        assert!(
            crate::Ca::load(
                "rot.test",
                &new.root.cert_der,
                &int2.cert_der,
                &int2.key_pkcs8
            )
            .is_err()
        );
    }
}
