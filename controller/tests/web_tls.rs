//! The HTTPS listener checked with a TLS client we did not write (`openssl s_client`, and
//! `testssl` when installed): old protocols and non-forward-secret suites refused, HSTS
//! present, and the certificate renewed at 2/3 of its life without a restart.

mod web_common;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;
use web_common::{Server, have, issue};

/// Run `openssl s_client` with `args`; true when a handshake completed.
fn handshake(port: u16, args: &[&str]) -> (bool, String) {
    let out = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{port}"),
            "-servername",
            "localhost",
        ])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("openssl");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let ok = out.status.success()
        && text.contains("BEGIN CERTIFICATE")
        && !text.contains("Cipher is (NONE)");
    (ok, text)
}

fn cipher_of(text: &str) -> String {
    text.lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("Cipher    :")
                .or_else(|| l.split("Cipher is ").nth(1))
        })
        .unwrap_or("?")
        .trim()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocols_and_suites_seen_by_openssl() {
    if !have("openssl") {
        eprintln!("skipped: openssl is not installed");
        return;
    }
    let server = Server::start(|_| {}).await;
    let port = server.addr.port();
    let p = port;
    let results = tokio::task::spawn_blocking(move || {
        let mut v = vec![];
        // SECLEVEL=0 makes OpenSSL itself willing to offer the old protocols, so a refusal
        // comes from our server and not from the client's own policy.
        for (name, args, want) in [
            (
                "TLS 1.0",
                vec!["-tls1", "-cipher", "DEFAULT:@SECLEVEL=0"],
                false,
            ),
            (
                "TLS 1.1",
                vec!["-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0"],
                false,
            ),
            ("TLS 1.2", vec!["-tls1_2"], true),
            ("TLS 1.3", vec!["-tls1_3"], true),
            (
                "TLS 1.2 static RSA AES128-GCM-SHA256 (no FS)",
                vec!["-tls1_2", "-cipher", "AES128-GCM-SHA256"],
                false,
            ),
            (
                "TLS 1.2 static RSA AES256-SHA (no FS, CBC)",
                vec!["-tls1_2", "-cipher", "AES256-SHA:@SECLEVEL=0"],
                false,
            ),
            (
                "TLS 1.2 ECDHE-RSA-AES128-SHA256 (CBC)",
                vec!["-tls1_2", "-cipher", "ECDHE-RSA-AES128-SHA256"],
                false,
            ),
            (
                "TLS 1.2 DHE-RSA-AES128-GCM-SHA256 (finite-field DH)",
                vec!["-tls1_2", "-cipher", "DHE-RSA-AES128-GCM-SHA256"],
                false,
            ),
            (
                "TLS 1.2 ECDHE-RSA-AES128-GCM-SHA256",
                vec!["-tls1_2", "-cipher", "ECDHE-RSA-AES128-GCM-SHA256"],
                true,
            ),
            (
                "TLS 1.2 ECDHE-RSA-AES256-GCM-SHA384",
                vec!["-tls1_2", "-cipher", "ECDHE-RSA-AES256-GCM-SHA384"],
                true,
            ),
            (
                "TLS 1.2 ECDHE-RSA-CHACHA20-POLY1305",
                vec!["-tls1_2", "-cipher", "ECDHE-RSA-CHACHA20-POLY1305"],
                true,
            ),
        ] {
            let (ok, text) = handshake(p, &args);
            v.push((name, want, ok, cipher_of(&text), text));
        }
        // SSLv3 / SSLv2: this OpenSSL build may not even offer them; when it does, refused.
        for flag in ["-ssl3", "-ssl2"] {
            let (ok, text) = handshake(p, &[flag]);
            v.push((
                if flag == "-ssl3" { "SSLv3" } else { "SSLv2" },
                false,
                ok,
                cipher_of(&text),
                text,
            ));
        }
        v
    })
    .await
    .unwrap();
    for (name, want, ok, cipher, text) in &results {
        eprintln!(
            "{name:<52} {} {}",
            if *ok { "accepted" } else { "refused " },
            if *ok { cipher.as_str() } else { "" }
        );
        assert_eq!(
            ok,
            want,
            "{name}: expected {}\n{text}",
            if *want { "accepted" } else { "refused" }
        );
        if *ok {
            assert!(
                cipher.contains("GCM") || cipher.contains("CHACHA20"),
                "{name}: AEAD only, got {cipher}"
            );
            assert!(
                cipher.starts_with("TLS_") || cipher.starts_with("ECDHE"),
                "{name}: forward secret only, got {cipher}"
            );
        }
    }
    // ALPN offers h2 and http/1.1.
    let (ok, text) = handshake(port, &["-alpn", "h2"]);
    assert!(ok && text.contains("ALPN protocol: h2"), "{text}");

    // HSTS on the HTTPS response.
    let mut c = server.client("127.0.0.1");
    let r = c.get("/healthz").await;
    assert_eq!(r.body, "ok");
    assert!(
        r.header("strict-transport-security")
            .unwrap()
            .starts_with("max-age=63072000")
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn testssl_finds_no_weak_protocol_or_suite() {
    if !have("testssl") {
        eprintln!("skipped: testssl (Debian package testssl.sh) is not installed");
        return;
    }
    let server = Server::start(|_| {}).await;
    let port = server.addr.port();
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("testssl.json");
    let j = json.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("testssl")
            .args([
                "--quiet",
                "--color",
                "0",
                "--warnings",
                "off",
                "--sneaky",
                "-p",
                "-f",
                "-E",
                "-h",
                "--jsonfile",
                j.to_str().unwrap(),
            ])
            .arg(format!("127.0.0.1:{port}"))
            .output()
            .expect("testssl")
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let findings: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).expect("testssl JSON output")).unwrap();
    let get = |id: &str| {
        findings
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["id"] == id)
            .map(|f| f["finding"].as_str().unwrap_or("").to_string())
            .unwrap_or_default()
    };
    for id in ["SSLv2", "SSLv3", "TLS1", "TLS1_1"] {
        assert!(
            get(id).starts_with("not offered"),
            "{id}: {}\n{text}",
            get(id)
        );
    }
    for id in ["TLS1_2", "TLS1_3"] {
        assert!(get(id).starts_with("offered"), "{id}: {}", get(id));
    }
    let hsts = get("HSTS_time");
    assert!(
        hsts.contains("730 days") || hsts.contains("63072000"),
        "HSTS: {hsts}"
    );
    // Every suite offered (the -E list) uses ECDHE (or TLS 1.3) and an AEAD.
    let suites: Vec<String> = findings
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["id"].as_str().unwrap_or("").starts_with("cipher-tls"))
        .map(|f| f["finding"].as_str().unwrap_or("").to_string())
        .collect();
    eprintln!("testssl suites:\n{}", suites.join("\n"));
    assert!(!suites.is_empty(), "{text}");
    for s in &suites {
        assert!(
            s.contains("ECDH") || s.contains("TLS_AES") || s.contains("TLS_CHACHA20"),
            "forward secret: {s}"
        );
        assert!(
            s.contains("GCM") || s.contains("ChaCha20") || s.contains("CHACHA20"),
            "AEAD: {s}"
        );
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_renews_at_two_thirds_without_restart() {
    let server = Server::start(|_| {}).await;
    // Swap in a certificate issued 40 s ago with a 60 s life: renewal is due at once.
    let issued_at = SystemTime::now() - Duration::from_secs(40);
    let first = issue(issued_at, Duration::from_secs(60));
    server.certs.replace(&first, issued_at).unwrap();
    let c = server.client("127.0.0.1");
    assert_eq!(c.peer_leaf().await, first.chain_der[0]);
    let renew_at = server.certs.renew_at(0.0);
    assert!(
        renew_at <= SystemTime::now() + Duration::from_secs(1),
        "2/3 of a 60 s life issued 40 s ago is now"
    );

    let stop = CancellationToken::new();
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let n = calls.clone();
    let loop_task = tokio::spawn(Arc::clone(&server.certs).renew_loop(
        move |now| {
            n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok::<_, String>(issue(now, Duration::from_secs(3600)))
        },
        stop.clone(),
    ));
    let mut renewed = None;
    for _ in 0..100 {
        let leaf = c.peer_leaf().await;
        if leaf != first.chain_der[0] {
            renewed = Some(leaf);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let leaf = renewed.expect("a renewed certificate is served without a restart");
    assert_eq!(leaf, server.certs.leaf_der());
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
    let (start, end) = server.certs.lifetime();
    assert!(end.duration_since(start).unwrap() >= Duration::from_secs(3500));
    // The next renewal is planned at about 2/3 of the new life (40 min), not sooner.
    let next = server.certs.renew_at(0.0).duration_since(start).unwrap();
    assert!(
        next >= Duration::from_secs(2390) && next <= Duration::from_secs(2410),
        "{next:?}"
    );
    // A broken renewal is refused and the current certificate stays.
    let mut bad = issue(SystemTime::now(), Duration::from_secs(3600));
    bad.key_pkcs8 = first.key_pkcs8.clone();
    assert!(
        server.certs.replace(&bad, SystemTime::now()).is_err(),
        "a key that does not match is never served"
    );
    assert_eq!(c.peer_leaf().await, leaf);
    stop.cancel();
    loop_task.await.unwrap();
    server.stop().await;
}
