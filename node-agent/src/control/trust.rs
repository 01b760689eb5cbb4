//! What the agent trusts across CA rotations. The pinned roots (`ca.crt`, the first one
//! the fingerprint in `identity.json`) change only through the controller's CA bundle:
//! a root the agent does not hold is accepted only with a cross-signature of it by a root
//! the agent already pins ([`zonemesh_ca::verify_cross_signed_root`]); a pinned root the
//! bundle no longer lists (retired) is dropped, never the last one. After a rotation a
//! node whose certificate comes from another intermediate than the issuing one renews at
//! a fixed point of the spread window ([`renewal_point`]).

use std::time::{Duration, SystemTime};
use x509_parser::prelude::{FromDer, X509Certificate};
use zonemesh_proto as pb;

/// What a bundle does to the pinned roots.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BundleOutcome {
    /// The roots to pin from now on, the issuing intermediate's root first when accepted.
    pub roots: Vec<Vec<u8>>,
    /// Roots of the bundle that were refused, and why.
    pub refused: Vec<String>,
}

/// The pinned roots after `bundle`: each of its roots that is pinned already or that a
/// pinned root cross-signed (valid at `now`), in the bundle's order. Pinned roots the
/// bundle does not list are dropped only when at least one root remains.
pub fn accept_bundle(pinned: &[Vec<u8>], bundle: &pb::CaBundle, now: SystemTime) -> BundleOutcome {
    let mut roots = Vec::new();
    let mut refused = Vec::new();
    for r in &bundle.roots {
        if pinned.contains(r) {
            roots.push(r.clone());
            continue;
        }
        let vouched = bundle.cross_signatures.iter().any(|c| {
            pinned
                .iter()
                .any(|p| zonemesh_ca::verify_cross_signed_root(p, c, r, now).is_ok())
        });
        if vouched {
            roots.push(r.clone());
        } else {
            refused.push(format!(
                "root {} has no valid cross-signature by a pinned root",
                zonemesh_ca::fingerprint_sha256(r)
            ));
        }
    }
    if roots.is_empty() {
        // A bundle that names none of our roots changes nothing.
        return BundleOutcome {
            roots: pinned.to_vec(),
            refused,
        };
    }
    BundleOutcome { roots, refused }
}

/// The raw subject of a certificate and the raw issuer of another, compared.
fn issued_by(cert_der: &[u8], issuer_der: &[u8]) -> bool {
    match (
        X509Certificate::from_der(cert_der),
        X509Certificate::from_der(issuer_der),
    ) {
        (Ok((_, c)), Ok((_, i))) => c.issuer().as_raw() == i.subject().as_raw(),
        _ => false,
    }
}

/// When a node holding `cert_der` must renew because of a rotation: never when its
/// certificate is from the bundle's issuing intermediate; otherwise at `rotated_unix` plus
/// this node's fixed offset within `spread_secs`.
pub fn renewal_point(
    cert_der: &[u8],
    bundle: &pb::CaBundle,
    spiffe_id: &str,
) -> Option<SystemTime> {
    let issuing = bundle.intermediates.first()?;
    if bundle.rotated_unix == 0 || issued_by(cert_der, issuing) {
        return None;
    }
    let offset = zonemesh_ca::spread_offset(spiffe_id, bundle.spread_secs);
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(bundle.rotated_unix + offset))
}

#[cfg(test)]
mod tests {
    use super::*;
    use zonemesh_ca::CaMaterial;

    #[test]
    fn a_new_root_is_pinned_only_through_a_cross_signature_of_a_pinned_root() {
        let now = SystemTime::now();
        let m = CaMaterial::generate("pin.test", now, |_| {}).unwrap();
        let new =
            zonemesh_ca::generate_root("pin.test", &m.root_cert_der, &m.root_key_pkcs8, 2, 2, now)
                .unwrap();
        let pinned = vec![m.root_cert_der.clone()];
        // Without any cross-signature the new root is refused and the pin stays.
        let bare = pb::CaBundle {
            roots: vec![new.root.cert_der.clone()],
            ..Default::default()
        };
        let out = accept_bundle(&pinned, &bare, now);
        assert_eq!(out.roots, pinned);
        assert_eq!(out.refused.len(), 1, "{out:?}");
        // A cross-signature by another CA's root is refused too.
        let other = CaMaterial::generate("pin.test", now, |_| {}).unwrap();
        let forged = zonemesh_ca::generate_root(
            "pin.test",
            &other.root_cert_der,
            &other.root_key_pkcs8,
            2,
            2,
            now,
        )
        .unwrap();
        let bad = pb::CaBundle {
            roots: vec![forged.root.cert_der.clone(), m.root_cert_der.clone()],
            cross_signatures: vec![forged.cross_der.clone(), new.cross_der.clone()],
            ..Default::default()
        };
        let out = accept_bundle(&pinned, &bad, now);
        assert_eq!(out.roots, pinned, "only the pinned root stays");
        assert_eq!(out.refused.len(), 1);
        // With the old root's cross-signature: both trusted, the new one first.
        let good = pb::CaBundle {
            roots: vec![new.root.cert_der.clone(), m.root_cert_der.clone()],
            cross_signatures: vec![new.cross_der.clone()],
            ..Default::default()
        };
        let out = accept_bundle(&pinned, &good, now);
        assert_eq!(
            out.roots,
            vec![new.root.cert_der.clone(), m.root_cert_der.clone()]
        );
        assert!(out.refused.is_empty());
        // Once the old root is retired (no longer listed) the pin is the new root alone,
        // and a later bundle naming none of the pinned roots changes nothing.
        let after = pb::CaBundle {
            roots: vec![new.root.cert_der.clone()],
            ..Default::default()
        };
        let out2 = accept_bundle(&out.roots, &after, now);
        assert_eq!(out2.roots, vec![new.root.cert_der.clone()]);
        let foreign = pb::CaBundle {
            roots: vec![other.root_cert_der.clone()],
            ..Default::default()
        };
        assert_eq!(accept_bundle(&out2.roots, &foreign, now).roots, out2.roots);

        // Renewal: nodes on another intermediate renew within the spread, at their point.
        let bundle = pb::CaBundle {
            intermediates: vec![new.intermediate.cert_der.clone()],
            rotated_unix: 1_000,
            spread_secs: 600,
            ..Default::default()
        };
        let at = renewal_point(&m.intermediate_cert_der, &bundle, "spiffe://pin.test/z/n").unwrap();
        let secs = zonemesh_ca::unix_secs(at);
        assert!((1_000..1_600).contains(&secs));
        assert_eq!(
            Some(at),
            renewal_point(&m.intermediate_cert_der, &bundle, "spiffe://pin.test/z/n")
        );
        // A certificate issued by the issuing intermediate does not renew early (the new
        // intermediate is issued by the new root, so it stands in for such a leaf here).
        let by_root = pb::CaBundle {
            intermediates: vec![new.root.cert_der.clone()],
            ..bundle.clone()
        };
        assert_eq!(
            renewal_point(
                &new.intermediate.cert_der,
                &by_root,
                "spiffe://pin.test/z/n"
            ),
            None
        );
    }
}
