//! The CA library checked by verifiers we did not write (openssl, webpki) and against
//! hostile CSRs.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair,
    PKCS_ECDSA_P256_SHA256, PublicKeyData, SanType,
};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};
use tempfile::TempDir;
use x509_parser::prelude::{FromDer, X509Certificate};
use zonemesh_ca::*;
use zonemesh_tests::{openssl, rsa2048, rsa4096, run, run_ok, write};

const DAY: Duration = Duration::from_secs(86_400);

fn now() -> SystemTime {
    SystemTime::now()
}

fn material() -> &'static CaMaterial {
    static M: OnceLock<CaMaterial> = OnceLock::new();
    M.get_or_init(|| CaMaterial::generate("corp.test", now(), |_| {}).expect("CA"))
}

fn ca() -> &'static Ca {
    static C: OnceLock<Ca> = OnceLock::new();
    C.get_or_init(|| Ca::from_material(material()).expect("load CA"))
}

fn csr_for(key: &KeyPair, tweak: impl FnOnce(&mut CertificateParams)) -> Vec<u8> {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, "requested");
    tweak(&mut p);
    p.serialize_request(key).unwrap().der().to_vec()
}

fn wg(n: u8) -> WireGuardKey {
    WireGuardKey([n; 32])
}

fn issue_node(node: &str, key: &KeyPair, at: SystemTime) -> IssuedCert {
    let csr = csr_for(key, |_| {});
    ca().sign_node_csr(
        &NodePolicy::default(),
        &NodeRequest {
            csr_der: &csr,
            zone: "eu-1",
            node,
            wg_public_key: wg(9),
        },
        at,
    )
    .expect("sign node")
}

struct Files {
    dir: TempDir,
}

impl Files {
    fn new() -> Self {
        let dir = TempDir::new().unwrap();
        write(
            dir.path(),
            "root.pem",
            to_pem("CERTIFICATE", &material().root_cert_der),
        );
        write(
            dir.path(),
            "int.pem",
            to_pem("CERTIFICATE", &material().intermediate_cert_der),
        );
        Self { dir }
    }
    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_string_lossy().into_owned()
    }
    fn put(&self, name: &str, contents: impl AsRef<[u8]>) -> String {
        write(self.dir.path(), name, contents);
        self.path(name)
    }
    fn text(&self, name: &str) -> String {
        run_ok(&mut openssl(&[
            "x509",
            "-noout",
            "-text",
            "-in",
            &self.path(name),
        ]))
        .unwrap()
    }
}

#[test]
fn openssl_verifies_node_and_tls_chains_and_reads_the_profiles() {
    let f = Files::new();
    let node = issue_node("web-1", &rsa4096(0), now());
    f.put("node.pem", to_pem("CERTIFICATE", &node.der));
    let tls_key = rsa2048(0);
    let names = TlsNames {
        dns: vec!["portal.corp.test".into()],
        ips: vec!["127.0.0.1".parse().unwrap()],
    };
    let tls = ca()
        .issue_tls(&TlsPolicy::default(), &tls_key, &names, None, now())
        .unwrap();
    f.put("tls.pem", to_pem("CERTIFICATE", &tls.der));

    for (leaf, purpose) in [
        ("node.pem", "sslclient"),
        ("node.pem", "sslserver"),
        ("tls.pem", "sslserver"),
    ] {
        let out = run_ok(&mut openssl(&[
            "verify",
            "-purpose",
            purpose,
            "-CAfile",
            &f.path("root.pem"),
            "-untrusted",
            &f.path("int.pem"),
            &f.path(leaf),
        ]))
        .unwrap();
        assert!(out.contains(": OK"), "{leaf}/{purpose}: {out}");
    }

    let root = f.text("root.pem");
    let int = f.text("int.pem");
    let node_t = f.text("node.pem");
    let tls_t = f.text("tls.pem");
    for t in [&root, &int, &node_t] {
        assert!(t.contains("Public-Key: (4096 bit)"), "{t}");
    }
    assert!(tls_t.contains("Public-Key: (2048 bit)"), "{tls_t}");
    for t in [&root, &int, &node_t, &tls_t] {
        assert!(
            t.contains("Signature Algorithm: sha256WithRSAEncryption"),
            "{t}"
        );
    }
    assert!(root.contains("CA:TRUE"));
    assert!(int.contains("CA:TRUE, pathlen:0"), "{int}");
    assert!(node_t.contains("CA:FALSE") && tls_t.contains("CA:FALSE"));
    assert!(
        node_t.contains("URI:spiffe://corp.test/zone/eu-1/node/web-1"),
        "{node_t}"
    );
    assert!(
        node_t.contains("TLS Web Client Authentication")
            && node_t.contains("TLS Web Server Authentication")
    );
    assert!(
        node_t.contains(zonemesh_ca::WG_KEY_BINDING_OID),
        "WireGuard binding extension missing: {node_t}"
    );
    assert!(tls_t.contains("DNS:portal.corp.test") && tls_t.contains("IP Address:127.0.0.1"));

    // Lifetimes: 10 y root, 5 y intermediate, 30 d node, 24 h TLS.
    let life = |der: &[u8]| {
        let (_, c) = X509Certificate::from_der(der).unwrap();
        (c.validity().not_after.timestamp() - c.validity().not_before.timestamp()) as u64
    };
    let backdate = 300;
    assert_eq!(life(&material().root_cert_der), 3650 * 86_400 + backdate);
    assert_eq!(
        life(&material().intermediate_cert_der),
        1825 * 86_400 + backdate
    );
    assert_eq!(life(&node.der), 30 * 86_400 + backdate);
    assert_eq!(life(&tls.der), 86_400 + backdate);
    assert_eq!(node.serial_hex.len(), 32, "128-bit serial");
}

#[test]
fn revoked_certificate_fails_openssl_crl_check_and_ocsp_says_revoked() {
    let f = Files::new();
    let good = issue_node("good-1", &rsa4096(1), now());
    let bad = issue_node("bad-1", &rsa4096(2), now());
    f.put("good.pem", to_pem("CERTIFICATE", &good.der));
    f.put("bad.pem", to_pem("CERTIFICATE", &bad.der));
    let revoked = vec![RevokedEntry {
        serial_hex: bad.serial_hex.clone(),
        revoked_at: now(),
        reason: RevocationReason::KeyCompromise,
    }];
    let crl = ca().crl(&revoked, 2, now(), DAY).unwrap();
    f.put("crl.pem", to_pem("X509 CRL", &crl));
    let crl_text = run_ok(&mut openssl(&[
        "crl",
        "-noout",
        "-text",
        "-in",
        &f.path("crl.pem"),
    ]))
    .unwrap();
    assert!(
        crl_text.to_lowercase().contains(&bad.serial_hex),
        "{crl_text}"
    );
    assert!(crl_text.contains("Key Compromise"), "{crl_text}");

    let verify = |leaf: &str| {
        run(&mut openssl(&[
            "verify",
            "-crl_check",
            "-CAfile",
            &f.path("root.pem"),
            "-untrusted",
            &f.path("int.pem"),
            "-CRLfile",
            &f.path("crl.pem"),
            &f.path(leaf),
        ]))
        .unwrap()
    };
    let ok = verify("good.pem");
    assert!(ok.status.success(), "{ok:?}");
    let revoked_out = verify("bad.pem");
    assert!(!revoked_out.status.success());
    let msg = String::from_utf8_lossy(&revoked_out.stdout).to_string()
        + &String::from_utf8_lossy(&revoked_out.stderr);
    assert!(msg.contains("certificate revoked"), "{msg}");

    // OCSP: openssl builds the request, we answer, openssl checks the signed answer.
    let lookup = |serial: &str| {
        if serial == bad.serial_hex {
            CertStatus::Revoked {
                at: now(),
                reason: RevocationReason::KeyCompromise,
            }
        } else if serial == good.serial_hex {
            CertStatus::Good
        } else {
            CertStatus::Unknown
        }
    };
    for (leaf, expect) in [("good.pem", ": good"), ("bad.pem", ": revoked")] {
        for digest in ["-sha1", "-sha256"] {
            let req = f.path(&format!("{leaf}{digest}.req"));
            run_ok(&mut openssl(&[
                "ocsp",
                digest,
                "-no_nonce",
                "-issuer",
                &f.path("int.pem"),
                "-cert",
                &f.path(leaf),
                "-reqout",
                &req,
            ]))
            .unwrap();
            let out = ca().ocsp_respond(&std::fs::read(&req).unwrap(), lookup, now());
            let resp = f.put(&format!("{leaf}{digest}.resp"), &out.response_der);
            let text = run_ok(&mut openssl(&[
                "ocsp",
                digest,
                "-no_nonce",
                "-respin",
                &resp,
                "-issuer",
                &f.path("int.pem"),
                "-cert",
                &f.path(leaf),
                "-CAfile",
                &f.path("root.pem"),
            ]))
            .unwrap_or_else(|e| {
                let dump = |args: &[&str]| {
                    String::from_utf8_lossy(&run(&mut openssl(args)).unwrap().stdout).into_owned()
                };
                panic!(
                    "{e}\nrequest:\n{}\nresponse:\n{}",
                    dump(&["ocsp", "-reqin", &req, "-req_text"]),
                    dump(&["ocsp", "-respin", &resp, "-resp_text", "-noverify"])
                )
            });
            assert!(text.contains(expect), "{leaf} {digest}: {text}");
            assert!(!text.contains("WARNING"), "{leaf} {digest}: {text}");
        }
    }
    // A request with a nonce gets it echoed, and openssl checks the match.
    let req = f.path("nonce.req");
    run_ok(&mut openssl(&[
        "ocsp",
        "-issuer",
        &f.path("int.pem"),
        "-cert",
        &f.path("good.pem"),
        "-reqout",
        &req,
    ]))
    .unwrap();
    let out = ca().ocsp_respond(&std::fs::read(&req).unwrap(), lookup, now());
    let resp = f.put("nonce.resp", &out.response_der);
    let checked = run(&mut openssl(&[
        "ocsp",
        "-reqin",
        &req,
        "-respin",
        &resp,
        "-issuer",
        &f.path("int.pem"),
        "-CAfile",
        &f.path("root.pem"),
    ]))
    .unwrap();
    let all = String::from_utf8_lossy(&checked.stdout).to_string()
        + &String::from_utf8_lossy(&checked.stderr);
    assert!(
        checked.status.success() && all.contains("Response verify OK") && !all.contains("Nonce"),
        "{all}"
    );

    // Garbage gets a malformedRequest answer, not a panic.
    let junk = ca().ocsp_respond(b"\x30\x03\x02\x01\x05garbage", lookup, now());
    assert_eq!(junk.response_der, vec![0x30, 0x03, 0x0a, 0x01, 0x01]);
}

#[test]
fn csr_asking_for_more_still_gets_exactly_the_policy_certificate() {
    let key = rsa4096(3);
    let csr = csr_for(&key, |p| {
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.subject_alt_names = vec![
            SanType::DnsName("evil.example".try_into().unwrap()),
            SanType::URI(
                "spiffe://corp.test/zone/admin/node/root"
                    .try_into()
                    .unwrap(),
            ),
        ];
        p.not_after = rcgen::date_time_ymd(2099, 1, 1);
    });
    let at = now();
    let cert = ca()
        .sign_node_csr(
            &NodePolicy::default(),
            &NodeRequest {
                csr_der: &csr,
                zone: "eu-1",
                node: "web-2",
                wg_public_key: wg(1),
            },
            at,
        )
        .unwrap();
    let (_, c) = X509Certificate::from_der(&cert.der).unwrap();
    assert!(!c.is_ca());
    let bc = c.basic_constraints().unwrap().unwrap().value;
    assert!(!bc.ca);
    let san = c.subject_alternative_name().unwrap().unwrap().value;
    assert_eq!(san.general_names.len(), 1);
    assert_eq!(
        format!("{}", san.general_names[0]),
        "URI(spiffe://corp.test/zone/eu-1/node/web-2)"
    );
    let life = c.validity().not_after.timestamp() - c.validity().not_before.timestamp();
    assert_eq!(life, 30 * 86_400 + 300);
    assert!(!c.subject().to_string().contains("requested"));
    // The public key is the requester's, unchanged.
    assert_eq!(c.public_key().raw, key.subject_public_key_info().as_slice());
}

#[test]
fn weak_foreign_or_forged_csrs_are_refused() {
    let policy = NodePolicy::default();
    let sign = |csr: &[u8]| {
        ca().sign_node_csr(
            &policy,
            &NodeRequest {
                csr_der: csr,
                zone: "eu-1",
                node: "x",
                wg_public_key: wg(1),
            },
            now(),
        )
    };

    let weak = csr_for(&rsa2048(1), |_| {});
    let e = sign(&weak).unwrap_err();
    assert!(
        matches!(e, Error::KeyPolicy(_)) && e.to_string().contains("RSA-2048"),
        "{e}"
    );

    let ec = csr_for(
        &KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap(),
        |_| {},
    );
    let e = sign(&ec).unwrap_err();
    assert!(
        matches!(e, Error::KeyPolicy(_)) && e.to_string().contains("EC"),
        "{e}"
    );

    let mut forged = csr_for(&rsa4096(0), |_| {});
    let n = forged.len();
    forged[n - 10] ^= 0x55; // inside the signature
    assert!(matches!(sign(&forged).unwrap_err(), Error::CsrSignature));

    assert!(matches!(
        sign(b"not a csr").unwrap_err(),
        Error::CsrParse(_)
    ));
    let good = csr_for(&rsa4096(0), |_| {});
    let bad_name = ca().sign_node_csr(
        &policy,
        &NodeRequest {
            csr_der: &good,
            zone: "EU",
            node: "x",
            wg_public_key: wg(1),
        },
        now(),
    );
    assert!(matches!(bad_name.unwrap_err(), Error::Name(_)));

    // TLS: lifetime above the maximum is refused, at the maximum accepted.
    let names = TlsNames {
        dns: vec!["svc.corp.test".into()],
        ips: vec![],
    };
    let tls_policy = TlsPolicy::default();
    let e = ca()
        .issue_tls(&tls_policy, &rsa2048(0), &names, Some(8 * DAY), now())
        .unwrap_err();
    assert!(matches!(e, Error::LifetimeTooLong { .. }), "{e}");
    ca().issue_tls(&tls_policy, &rsa2048(0), &names, Some(7 * DAY), now())
        .unwrap();
    assert!(
        ca().issue_tls(&tls_policy, &rsa4096(0), &names, None, now())
            .is_err(),
        "TLS leaves are RSA-2048"
    );
}

#[test]
fn node_chain_verification_refuses_expired_early_revoked_foreign_and_mismatched() {
    let at = now();
    let cert = issue_node("db-1", &rsa4096(4), at);
    let chain = vec![cert.der.clone(), material().intermediate_cert_der.clone()];
    let empty_crl = ca().crl(&[], 1, at, DAY).unwrap();
    let store = ca().trust_store();

    let ok = store
        .verify_node_chain(&chain, std::slice::from_ref(&empty_crl), at)
        .unwrap();
    assert_eq!(ok.id, SpiffeId::new("corp.test", "eu-1", "db-1").unwrap());
    assert_eq!(ok.wg_public_key, wg(9));
    assert_eq!(ok.serial_hex, cert.serial_hex);
    ok.check_wireguard_key(&wg(9)).unwrap();
    assert!(matches!(
        ok.check_wireguard_key(&wg(8)),
        Err(Error::WireGuardKeyMismatch)
    ));

    assert!(matches!(
        store.verify_node_chain(&chain, std::slice::from_ref(&empty_crl), at + 31 * DAY),
        Err(Error::Expired)
    ));
    assert!(matches!(
        store.verify_node_chain(&chain, std::slice::from_ref(&empty_crl), at - DAY),
        Err(Error::NotYetValid)
    ));
    let crl = ca()
        .crl(
            &[RevokedEntry {
                serial_hex: cert.serial_hex.clone(),
                revoked_at: at,
                reason: RevocationReason::Unspecified,
            }],
            2,
            at,
            DAY,
        )
        .unwrap();
    assert!(matches!(
        store.verify_node_chain(&chain, &[crl], at),
        Err(Error::Revoked)
    ));
    assert!(matches!(
        store.verify_node_chain(&chain, &[], at),
        Err(Error::NoCrl)
    ));

    // A node certificate from another CA with the same trust domain and names.
    let other = CaMaterial::generate("corp.test", at, |_| {}).unwrap();
    let other_ca = Ca::from_material(&other).unwrap();
    let csr = csr_for(&rsa4096(4), |_| {});
    let foreign = other_ca
        .sign_node_csr(
            &NodePolicy::default(),
            &NodeRequest {
                csr_der: &csr,
                zone: "eu-1",
                node: "db-1",
                wg_public_key: wg(9),
            },
            at,
        )
        .unwrap();
    let foreign_chain = vec![foreign.der, other.intermediate_cert_der.clone()];
    let r = store.verify_node_chain(&foreign_chain, std::slice::from_ref(&empty_crl), at);
    assert!(matches!(r, Err(Error::UnknownIssuer)), "{r:?}");

    // A TLS leaf from the right CA is not a node identity.
    let tls = ca()
        .issue_tls(
            &TlsPolicy::default(),
            &rsa2048(0),
            &TlsNames {
                dns: vec!["a.corp.test".into()],
                ips: vec![],
            },
            None,
            at,
        )
        .unwrap();
    let r = store.verify_node_chain(
        &[tls.der, material().intermediate_cert_der.clone()],
        std::slice::from_ref(&empty_crl),
        at,
    );
    assert!(r.is_err(), "{r:?}");

    // A trust store for another trust domain refuses the identity.
    let other_domain =
        TrustStore::new("other.test", vec![material().root_cert_der.clone()], vec![]);
    assert!(matches!(
        other_domain.verify_node_chain(&chain, &[empty_crl], at),
        Err(Error::NotANodeCertificate(_))
    ));
}

/// A node certificate signed by our intermediate with the given key-binding extensions, the
/// way a CA of an earlier release (or a hand-made one) would build it.
fn node_cert_with_bindings(bindings: &[(&[u64], WireGuardKey)], at: SystemTime) -> Vec<u8> {
    let int_key = KeyPair::from_pkcs8_der_and_sign_algo(
        &rustls_pki_types::PrivatePkcs8KeyDer::from(material().intermediate_key_pkcs8.to_vec()),
        &rcgen::PKCS_RSA_SHA256,
    )
    .unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_der(
        &rustls_pki_types::CertificateDer::from(material().intermediate_cert_der.clone()),
        int_key,
    )
    .unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, "old-1");
    p.is_ca = IsCa::ExplicitNoCa;
    p.not_before = (at - DAY).into();
    p.not_after = (at + DAY).into();
    p.subject_alt_names = vec![SanType::URI(
        SpiffeId::new("corp.test", "eu-1", "old-1")
            .unwrap()
            .uri()
            .try_into()
            .unwrap(),
    )];
    p.custom_extensions = bindings
        .iter()
        .map(|(oid, key)| {
            rcgen::CustomExtension::from_oid_content(oid, [&[0x04, 32][..], &key.0].concat())
        })
        .collect();
    p.signed_by(&rsa4096(4), &issuer).unwrap().der().to_vec()
}

#[test]
fn binding_oid_is_a_uuid_arc_and_certificates_from_before_the_move_still_verify() {
    let at = now();
    assert!(WG_KEY_BINDING_OID.starts_with("2.25."));
    let store = ca().trust_store();
    let crl = ca().crl(&[], 1, at, DAY).unwrap();
    let int = material().intermediate_cert_der.clone();

    // Today's certificates carry only the 2.25 OID; openssl reads it (checked above) and so
    // does x509-parser, with the 128-bit arc intact.
    let cert = issue_node("db-2", &rsa4096(4), at);
    let (_, parsed) = X509Certificate::from_der(&cert.der).unwrap();
    let bindings: Vec<_> = parsed
        .extensions()
        .iter()
        .filter(|e| is_wg_key_binding(&e.oid))
        .collect();
    assert_eq!(bindings.len(), 1);
    assert!(
        bindings[0].oid.iter().is_none(),
        "a 128-bit arc does not fit u64 arcs"
    );
    let oids: Vec<String> = parsed
        .extensions()
        .iter()
        .map(|e| e.oid.to_id_string())
        .collect();
    assert!(
        !oids.iter().any(|o| o.starts_with("1.3.6.1.4.1.57264")),
        "{oids:?}"
    );

    // A certificate from before the move (legacy arc) still verifies, with its key.
    let legacy = node_cert_with_bindings(&[(LEGACY_WG_KEY_BINDING_OID, wg(7))], at);
    let v = store
        .verify_node_chain(&[legacy, int], std::slice::from_ref(&crl), at)
        .unwrap();
    assert_eq!(v.wg_public_key, wg(7));
}
