//! The internal issuer: portal certificates from zonemesh's own CA (controller side).
//!
//! A fresh RSA-2048 key per certificate (the same key size as ACME certificates, so
//! handshake costs compare like with like), SHA-256, 24 h by default and 7 d at most (the
//! CA's TLS policy), SAN = the domain, serverAuth, and the controller's OCSP responder in
//! the AIA so every edge staples a fresh response. RSA key generation is slow: callers run
//! [`issue`] on the blocking pool.

use crate::bundle::CertBundle;
use std::time::{Duration, SystemTime};
use zeroize::Zeroizing;
use zonemesh_ca::{Ca, IssuedCert, TlsPolicy};

/// Why an internal certificate was not issued.
#[derive(Debug, thiserror::Error)]
pub enum InternalError {
    #[error("internal CA: {0}")]
    Ca(#[from] zonemesh_ca::Error),
}

/// What to issue.
#[derive(Clone, Debug)]
pub struct PortalRequest<'a> {
    /// The portal's DNS name (lower case, no trailing dot).
    pub domain: &'a str,
    /// The controller's OCSP responder, e.g. `http://10.0.0.1:8080/ocsp`.
    pub ocsp_url: &'a str,
    /// `None`: the policy's default (24 h).
    pub lifetime: Option<Duration>,
}

/// Generate a key for `req.domain` and issue its certificate (blocking). Returns the
/// bundle the edges get (leaf, then the intermediate) and the issued leaf, which the
/// caller records with the CA's other serials.
///
/// # Errors
/// A name, lifetime or key the CA's policy refuses.
pub fn issue(
    ca: &Ca,
    policy: &TlsPolicy,
    req: &PortalRequest<'_>,
    now: SystemTime,
) -> Result<(CertBundle, IssuedCert), InternalError> {
    let key = zonemesh_ca::generate_rsa_2048()?;
    let cert = ca.issue_portal(policy, &key, req.domain, req.ocsp_url, req.lifetime, now)?;
    let bundle = CertBundle {
        domain: req.domain.to_string(),
        chain_der: vec![cert.der.clone(), ca.intermediate_der().to_vec()],
        key_pkcs8_der: Zeroizing::new(key.serialize_der()),
        serial_hex: cert.serial_hex.clone(),
        not_after_unix: zonemesh_ca::unix_secs(cert.not_after),
    };
    Ok((bundle, cert))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;
    use zonemesh_ca::CaMaterial;

    fn openssl(args: &[&str]) -> Option<(bool, String)> {
        let out = Command::new("openssl").args(args).output().ok()?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Some((out.status.success(), text))
    }

    #[test]
    fn portal_certificate_verifies_with_openssl_and_names_our_ocsp_responder() {
        if openssl(&["version"]).is_none() {
            println!("skipped: openssl not installed");
            return;
        }
        let now = SystemTime::now();
        let m = CaMaterial::generate("example.test", now, |_| {}).unwrap();
        let ca = Ca::from_material(&m).unwrap();
        let policy = TlsPolicy::default();
        let req = PortalRequest {
            domain: "portal.example.test",
            ocsp_url: "http://127.0.0.1:8080/ocsp",
            lifetime: None,
        };
        let (bundle, cert) = issue(&ca, &policy, &req, now).unwrap();
        assert_eq!(bundle.serial_hex, cert.serial_hex);
        assert_eq!(bundle.chain_der.len(), 2);
        let life = cert.not_after.duration_since(now).unwrap().as_secs();
        assert!(
            (86_390..=86_400).contains(&life),
            "24 h by default, got {life} s"
        );

        let d = tempfile::tempdir().unwrap();
        let put = |name: &str, label: &str, der: &[u8]| {
            let p = d.path().join(name);
            std::fs::write(&p, zonemesh_ca::to_pem(label, der)).unwrap();
            p.to_str().unwrap().to_string()
        };
        let root = put("root.pem", "CERTIFICATE", ca.root_der());
        let int = put("int.pem", "CERTIFICATE", ca.intermediate_der());
        let leaf = put("leaf.pem", "CERTIFICATE", &bundle.chain_der[0]);
        let key = put("key.pem", "PRIVATE KEY", &bundle.key_pkcs8_der);
        let (ok, out) = openssl(&[
            "verify",
            "-CAfile",
            &root,
            "-untrusted",
            &int,
            "-purpose",
            "sslserver",
            "-verify_hostname",
            "portal.example.test",
            &leaf,
        ])
        .unwrap();
        assert!(ok && out.contains("OK"), "{out}");
        let (ok, text) = openssl(&["x509", "-in", &leaf, "-noout", "-text"]).unwrap();
        assert!(ok, "{text}");
        for want in [
            "Public-Key: (2048 bit)",
            "sha256WithRSAEncryption",
            "TLS Web Server Authentication",
            "DNS:portal.example.test",
            "OCSP - URI:http://127.0.0.1:8080/ocsp",
            "CA:FALSE",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        assert!(!text.contains("TLS Web Client Authentication"), "{text}");
        // The key is the certificate's.
        let (ok, m1) = openssl(&["x509", "-in", &leaf, "-noout", "-modulus"]).unwrap();
        assert!(ok);
        let (ok, m2) = openssl(&["rsa", "-in", &key, "-noout", "-modulus"]).unwrap();
        assert!(ok && m1 == m2, "{m1} vs {m2}");

        // Seven days at most; a wildcard or a bad responder URL is refused.
        let week = Some(Duration::from_secs(7 * 86_400 + 1));
        let long = PortalRequest {
            lifetime: week,
            ..req.clone()
        };
        assert!(issue(&ca, &policy, &long, now).is_err());
        let wild = PortalRequest {
            domain: "*.example.test",
            ..req.clone()
        };
        assert!(issue(&ca, &policy, &wild, now).is_err());
        let bad_url = PortalRequest {
            ocsp_url: "ldap://x",
            ..req
        };
        assert!(issue(&ca, &policy, &bad_url, now).is_err());
    }
}
