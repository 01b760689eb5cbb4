//! `zonemesh-controller init` and `ca ...` as an operator runs them: outputs checked with
//! openssl, bad input refused with one line and a non-zero exit, nothing half-written, CA
//! keys never in the clear in the database.

use anyhow::Result;
use std::path::Path;
use std::process::Command;
use zonemesh_tests::{bin, openssl, rsa2048, rsa4096, run, run_ok, write};

fn ctl(dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(bin("zonemesh-controller"));
    c.arg("--data-dir")
        .arg(dir)
        .args(args)
        .env_remove("ZONEMESH_KEK")
        .env_remove("ZONEMESH_PEPPER");
    c
}

fn csr_pem(key: &rcgen::KeyPair) -> String {
    let p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.serialize_request(key).unwrap().pem().unwrap()
}

fn all_bytes(dir: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(all_bytes(&p));
        } else if let Ok(b) = std::fs::read(&p) {
            out.extend(b);
        }
    }
    out
}

/// `ca sign-csr` for node `node` in zone eu-1.
fn sign_csr(dir: &Path, csr: &str, node: &str, wg: &str, out: &str) -> Command {
    ctl(
        dir,
        &[
            "ca", "sign-csr", "--csr", csr, "--zone", "eu-1", "--node", node, "--wg-key", wg,
            "--out", out,
        ],
    )
}

/// One line on stderr, non-zero exit.
fn refused(c: &mut Command, expect: &str) {
    let out = run(c).unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{c:?} succeeded");
    assert_eq!(err.trim().lines().count(), 1, "{c:?}: {err}");
    assert!(err.contains(expect), "{c:?}: expected {expect:?} in {err}");
}

#[test]
fn init_ca_commands_and_bad_input() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("ctl");
    let out = run_ok(&mut ctl(&dir, &["init", "--trust-domain", "corp.test"]))?;
    let fp = out.lines().last().unwrap().trim().to_string();
    assert_eq!(fp.len(), 64);
    refused(
        &mut ctl(&dir, &["init", "--trust-domain", "corp.test"]),
        "refusing to overwrite",
    );

    // Exported root matches the printed fingerprint (openssl computes it).
    let root = write(
        tmp.path(),
        "root.pem",
        run_ok(&mut ctl(&dir, &["ca", "export", "--root"]))?,
    );
    let int = write(
        tmp.path(),
        "int.pem",
        run_ok(&mut ctl(&dir, &["ca", "export", "--intermediate"]))?,
    );
    let f = run_ok(&mut openssl(&[
        "x509",
        "-noout",
        "-fingerprint",
        "-sha256",
        "-in",
        root.to_str().unwrap(),
    ]))?;
    assert_eq!(
        f.trim()
            .rsplit('=')
            .next()
            .unwrap()
            .replace(':', "")
            .to_lowercase(),
        fp
    );
    let show = run_ok(&mut ctl(&dir, &["ca", "show"]))?;
    assert!(show.contains(&fp) && show.contains("RSA-4096"), "{show}");

    // The CA keys are sealed: no PKCS#8 RSA key header anywhere in the database.
    let pkcs8_rsa = [
        0x02, 0x01, 0x00, 0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01,
        0x01,
    ];
    let db = all_bytes(&dir.join("db"));
    assert!(
        !db.windows(pkcs8_rsa.len()).any(|w| w == pkcs8_rsa),
        "an unencrypted private key is in the database"
    );
    // ... and without the key-encryption key the CA cannot be used.
    let kek = dir.join("secrets/kek");
    let saved = std::fs::read(&kek)?;
    std::fs::remove_file(&kek)?;
    refused(&mut ctl(&dir, &["ca", "crl"]), "key-encryption key");
    std::fs::write(&kek, &saved)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&kek, std::fs::Permissions::from_mode(0o600))?;

    // sign-csr writes node certificate + intermediate; openssl verifies it.
    let csr = write(tmp.path(), "n.csr", csr_pem(&rsa4096(5)));
    let wg = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=";
    let node = tmp.path().join("node.pem");
    let out = run_ok(&mut sign_csr(
        &dir,
        csr.to_str().unwrap(),
        "web-1",
        wg,
        node.to_str().unwrap(),
    ))?;
    let serial = out.split_whitespace().nth(2).unwrap().to_string();
    let v = run_ok(&mut openssl(&[
        "verify",
        "-CAfile",
        root.to_str().unwrap(),
        "-untrusted",
        int.to_str().unwrap(),
        node.to_str().unwrap(),
    ]))?;
    assert!(v.contains(": OK"));
    assert_eq!(
        std::fs::read_to_string(&node)?
            .matches("BEGIN CERTIFICATE")
            .count(),
        2
    );

    // issue-tls writes a fresh 2048-bit key and chain.
    let tls = tmp.path().join("tls");
    run_ok(&mut ctl(
        &dir,
        &[
            "ca",
            "issue-tls",
            "--dns",
            "svc.corp.test",
            "--ip",
            "127.0.0.1",
            "--lifetime",
            "12h",
            "--out-dir",
            tls.to_str().unwrap(),
        ],
    ))?;
    let t = run_ok(&mut openssl(&[
        "x509",
        "-noout",
        "-text",
        "-in",
        tls.join("chain.pem").to_str().unwrap(),
    ]))?;
    assert!(t.contains("(2048 bit)") && t.contains("DNS:svc.corp.test"));
    assert_eq!(
        std::fs::metadata(tls.join("key.pem"))?.permissions().mode() & 0o777,
        0o600
    );

    // Revocation shows up in the CRL; openssl's CRL check then refuses the certificate.
    run_ok(&mut ctl(
        &dir,
        &[
            "ca",
            "revoke",
            "--serial",
            &serial,
            "--reason",
            "key-compromise",
        ],
    ))?;
    let crl = write(
        tmp.path(),
        "crl.pem",
        run_ok(&mut ctl(&dir, &["ca", "crl"]))?,
    );
    let r = run(&mut openssl(&[
        "verify",
        "-crl_check",
        "-CAfile",
        root.to_str().unwrap(),
        "-untrusted",
        int.to_str().unwrap(),
        "-CRLfile",
        crl.to_str().unwrap(),
        node.to_str().unwrap(),
    ]))?;
    assert!(!r.status.success());

    // Bad input of every kind: one line, non-zero, nothing written.
    let out_bad = tmp.path().join("never.pem");
    let o = out_bad.to_str().unwrap();
    let garbage = write(
        tmp.path(),
        "garbage.csr",
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
    );
    refused(
        &mut sign_csr(&dir, garbage.to_str().unwrap(), "x", wg, o),
        "CSR",
    );
    let weak = write(tmp.path(), "weak.csr", csr_pem(&rsa2048(2)));
    refused(
        &mut sign_csr(&dir, weak.to_str().unwrap(), "x", wg, o),
        "RSA-2048 key refused",
    );
    refused(
        &mut sign_csr(&dir, csr.to_str().unwrap(), "x", "short", o),
        "WireGuard",
    );
    refused(
        &mut sign_csr(&dir, "/nonexistent.csr", "x", wg, o),
        "reading",
    );
    assert!(!out_bad.exists());
    refused(
        &mut ctl(&dir, &["ca", "revoke", "--serial", "abcdef"]),
        "no certificate with serial abcdef",
    );
    refused(
        &mut ctl(&dir, &["ca", "revoke", "--serial", &serial]),
        "already revoked",
    );
    refused(
        &mut ctl(
            &dir,
            &[
                "ca",
                "issue-tls",
                "--dns",
                "svc.corp.test",
                "--lifetime",
                "30d",
                "--out-dir",
                tls.to_str().unwrap(),
            ],
        ),
        "exceeds the maximum",
    );
    refused(
        &mut ctl(&tmp.path().join("missing"), &["ca", "show"]),
        "does not exist",
    );
    refused(
        &mut ctl(&dir, &["zone", "list"]),
        "no controller is running",
    );
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    Ok(())
}
