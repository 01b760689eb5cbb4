//! The controller's OCSP responder signs once per certificate and status, not once per
//! request; a revocation changes the answer at once; requests about another issuer's
//! certificates (or serials this CA never issued) are answered `unauthorized` unsigned.
//! Every signed answer is checked with `openssl ocsp`.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};
use tempfile::TempDir;
use zonemesh_ca::{CaMaterial, Kek, RevocationReason, TlsNames, to_pem};
use zonemesh_controller::authority::Authority;
use zonemesh_controller::store::Store;
use zonemesh_tests::{openssl, rsa2048, run, run_ok};

const UNAUTHORIZED: &[u8] = &[0x30, 0x03, 0x0a, 0x01, 0x06];

struct Fixture {
    dir: TempDir,
    auth: Authority,
}

impl Fixture {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn put(&self, name: &str, data: impl AsRef<[u8]>) -> String {
        let p = self.path(name);
        std::fs::write(&p, data).unwrap();
        p.display().to_string()
    }
}

fn fixture() -> Fixture {
    let dir = TempDir::new().unwrap();
    let store = Store::open(&dir.path().join("db")).unwrap();
    let kek = Kek::generate();
    let m = CaMaterial::generate("corp.test", SystemTime::now(), |_| {}).unwrap();
    Authority::install(&store, &kek, &m).unwrap();
    let auth = Authority::load(store, &kek, SystemTime::now()).unwrap();
    let f = Fixture { dir, auth };
    f.put("root.pem", to_pem("CERTIFICATE", f.auth.ca().root_der()));
    f.put(
        "int.pem",
        to_pem("CERTIFICATE", f.auth.ca().intermediate_der()),
    );
    f
}

/// `openssl ocsp -reqout` for `cert` issued by `issuer`, with extra arguments.
fn request(f: &Fixture, name: &str, issuer: &str, cert: &[&str], extra: &[&str]) -> Vec<u8> {
    let out = f.path(name);
    let mut args = vec!["ocsp", "-issuer", issuer];
    // openssl wants the digest before -cert / -serial.
    args.extend_from_slice(extra);
    args.extend_from_slice(cert);
    args.extend_from_slice(&["-reqout", out.to_str().unwrap()]);
    run_ok(&mut openssl(&args)).unwrap();
    std::fs::read(out).unwrap()
}

/// What `openssl ocsp` says about `resp` for `leaf`, which must verify against our root.
fn verified(f: &Fixture, resp: &[u8], leaf: &str) -> String {
    let r = f.put("resp.der", resp);
    let out = run(&mut openssl(&[
        "ocsp",
        "-no_nonce",
        "-respin",
        &r,
        "-issuer",
        &f.path("int.pem").display().to_string(),
        "-cert",
        leaf,
        "-CAfile",
        &f.path("root.pem").display().to_string(),
    ]))
    .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && text.contains("Response verify OK"),
        "{text}"
    );
    text
}

fn foreign_ca(f: &Fixture) -> (String, String) {
    let p = |n: &str| f.path(n).display().to_string();
    run_ok(&mut openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        &p("fca.key"),
        "-out",
        &p("fca.pem"),
        "-subj",
        "/CN=Foreign Issuing CA",
        "-days",
        "1",
    ]))
    .unwrap();
    run_ok(&mut openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        &p("fleaf.key"),
        "-out",
        &p("fleaf.csr"),
        "-subj",
        "/CN=foreign.example",
    ]))
    .unwrap();
    run_ok(&mut openssl(&[
        "x509",
        "-req",
        "-in",
        &p("fleaf.csr"),
        "-CA",
        &p("fca.pem"),
        "-CAkey",
        &p("fca.key"),
        "-set_serial",
        "4242",
        "-out",
        &p("fleaf.pem"),
        "-days",
        "1",
    ]))
    .unwrap();
    (p("fca.pem"), p("fleaf.pem"))
}

#[test]
fn ocsp_signs_once_per_status_and_refuses_foreign_issuers_unsigned() {
    let f = fixture();
    let now = SystemTime::now();
    let names = TlsNames {
        dns: vec!["svc.corp.test".into()],
        ips: vec![],
    };
    let leaf = f
        .auth
        .issue_tls_key(&rsa2048(1), &names, None, now)
        .unwrap();
    let leaf_pem = f.put("leaf.pem", to_pem("CERTIFICATE", &leaf.der));
    let int = f.path("int.pem").display().to_string();
    let plain = request(&f, "plain.req", &int, &["-cert", &leaf_pem], &["-no_nonce"]);

    // A burst for one certificate: one signature, the same signed bytes every time.
    let first = f.auth.ocsp(&plain, now);
    assert!(verified(&f, &first, &leaf_pem).contains(": good"));
    let burst = std::time::Instant::now();
    for i in 0..1_000u64 {
        let again = f.auth.ocsp(&plain, now + Duration::from_millis(i));
        assert_eq!(again, first);
    }
    eprintln!("1000 cached OCSP answers in {:?}", burst.elapsed());
    assert_eq!(f.auth.ocsp_signatures(), 1, "signatures for 1001 requests");

    // A nonce cannot be echoed by a pre-signed response: it is ignored, not signed for.
    let with_nonce = request(&f, "nonce.req", &int, &["-cert", &leaf_pem], &[]);
    assert_eq!(f.auth.ocsp(&with_nonce, now), first);
    assert_eq!(f.auth.ocsp_signatures(), 1);
    // Another CertID encoding (SHA-256) is its own response.
    let sha256 = request(
        &f,
        "sha256.req",
        &int,
        &["-cert", &leaf_pem],
        &["-no_nonce", "-sha256"],
    );
    let r256 = f.auth.ocsp(&sha256, now);
    assert_ne!(r256, first);
    assert_eq!(f.auth.ocsp_signatures(), 2);

    // Revocation changes the answer on the next request.
    f.auth
        .revoke(&leaf.serial_hex, RevocationReason::KeyCompromise, now)
        .unwrap();
    let revoked = f.auth.ocsp(&plain, now);
    assert!(verified(&f, &revoked, &leaf_pem).contains(": revoked"));
    assert_eq!(f.auth.ocsp_signatures(), 3);
    for _ in 0..100 {
        assert_eq!(f.auth.ocsp(&plain, now), revoked);
    }
    assert_eq!(f.auth.ocsp_signatures(), 3);

    // Re-signed before nextUpdate (responses are valid for an hour).
    let later = now + Duration::from_secs(31 * 60);
    let refreshed = f.auth.ocsp(&plain, later);
    assert_ne!(refreshed, revoked);
    assert_eq!(f.auth.ocsp_signatures(), 4);

    // Another issuer's certificate, and our serial under another issuer's name: refused
    // without a signature; openssl reads it as unauthorized.
    let (fca, fleaf) = foreign_ca(&f);
    let foreign = request(&f, "foreign.req", &fca, &["-cert", &fleaf], &["-no_nonce"]);
    let serial_arg = format!("0x{}", leaf.serial_hex);
    let spoofed = request(
        &f,
        "spoof.req",
        &fca,
        &["-serial", &serial_arg],
        &["-no_nonce"],
    );
    // A serial this CA never issued, under our own name.
    let unissued = request(
        &f,
        "unissued.req",
        &int,
        &["-serial", "0x0123456789abcdef"],
        &["-no_nonce"],
    );
    for (what, req) in [
        ("foreign", &foreign),
        ("spoofed", &spoofed),
        ("unissued", &unissued),
    ] {
        let resp = f.auth.ocsp(req, now);
        assert_eq!(resp, UNAUTHORIZED, "{what}");
        let r = f.put("unauth.der", &resp);
        let text = run(&mut openssl(&[
            "ocsp",
            "-respin",
            &r,
            "-resp_text",
            "-noverify",
        ]))
        .unwrap();
        let text = String::from_utf8_lossy(&text.stdout).to_string()
            + &String::from_utf8_lossy(&text.stderr);
        assert!(text.contains("unauthorized"), "{what}: {text}");
    }
    assert_eq!(
        f.auth.ocsp_signatures(),
        4,
        "nothing signed for refused requests"
    );
}
