//! The SSH CA through the admin CLI of a real controller: key types, `ssh init` on an
//! installation without one, the public keys and known_hosts line, refusals of bad
//! input with nothing issued, every issue in the audit log, and the KRL as
//! `ssh-keygen -Q` reads it. Needs `ssh-keygen` (openssh-client).

use anyhow::Result;
use std::process::Command;
use zonemesh_tests::cluster::Controller;
use zonemesh_tests::{have, run, run_ok};

fn keygen(dir: &std::path::Path, name: &str, args: &[&str]) -> Result<std::path::PathBuf> {
    let p = dir.join(name);
    run_ok(
        Command::new("ssh-keygen")
            .args(["-q", "-N", "", "-f"])
            .arg(&p)
            .args(args),
    )?;
    Ok(p)
}

#[test]
fn bad_keys_and_ttls_are_refused_with_their_reason_and_nothing_is_issued() -> Result<()> {
    if !have("ssh-keygen") {
        println!("skipped: ssh-keygen not installed");
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let ctl = Controller::start_new(dir.path())?;
    ctl.admin_with_stdin(
        &[
            "user",
            "add",
            "--email",
            "u@corp.test",
            "--role",
            "portal-owner",
        ],
        "a long password for the ssh ca test\n",
    );
    ctl.zone_add("eu", "100.64.1.0/24")?;
    ctl.admin_ok(&[
        "ssh",
        "grant",
        "--email",
        "u@corp.test",
        "--zone",
        "eu",
        "--principal",
        "deploy",
    ])?;
    let d = dir.path();
    let rsa1024 = keygen(d, "rsa1024", &["-t", "rsa", "-b", "1024"])?;
    let garbage = d.join("garbage.pub");
    std::fs::write(&garbage, "this is not a key\n")?;
    let huge = d.join("huge.pub");
    std::fs::write(&huge, format!("ssh-ed25519 {}\n", "A".repeat(1024 * 1024)))?;
    let dsa = d.join("dsa.pub");
    // A DSA public key line (OpenSSH no longer generates them by default).
    std::fs::write(
        &dsa,
        "ssh-dss AAAAB3NzaC1kc3MAAACBAP1/U4EddRIpUt9KnC7s5Of2EbdSPO9EAMMeP4C2USZpRV1AIlH7WT2NWPq/xfW6MPbLm1Vs14E7gB00b/JmYLdrmVClpJ+f6AR7ECLCT7up1/63xhv4O1fnxqimFQ8E+4P208UewwI1VBNaFpEy9nXzrith1yrv8iIDGZ3RSAHHAAAAFQCXYFCPFSMLzLKSuYKi64QL8Fgc9QAAAIEA9+GghdabPd7LvKtcNrhXuXmUr7v6OuqC+VdMCz0HgmdRWVeOutRZT+ZxBxCBgLRJFnEj6EwoFhO3zwkyjMim4TwWeotUfI0o4KOuHiuzpnWRbqN/C/ohNWLx+2J6ASQ7zKTxvqhRkImog9/hWuWfBpKLZl6Ae1UlZAFMO/7PSSo= dsa\n",
    )?;
    let ed = keygen(d, "ed", &["-t", "ed25519"])?;
    let pubf = |p: &std::path::Path| format!("{}.pub", p.display());
    let cases: Vec<(String, Vec<String>, &str)> = vec![
        (
            dsa.display().to_string(),
            vec![],
            "DSA keys are not accepted",
        ),
        (
            pubf(&rsa1024),
            vec![],
            "RSA keys need at least 3072 bits; this one has 1024",
        ),
        (
            garbage.display().to_string(),
            vec![],
            "not an OpenSSH public key",
        ),
        (huge.display().to_string(), vec![], "at most 16384"),
        (
            pubf(&ed),
            vec!["--ttl".into(), "9h".into()],
            "above the maximum of 8h",
        ),
        (
            pubf(&ed),
            vec!["--ttl".into(), "25h".into()],
            "above the maximum",
        ),
    ];
    let out = d.join("cert.pub");
    for (key, extra, want) in &cases {
        let mut args = vec![
            "ssh",
            "sign-user",
            "--email",
            "u@corp.test",
            "--pubkey",
            key.as_str(),
        ];
        args.extend(extra.iter().map(String::as_str));
        let o_s = out.display().to_string();
        args.extend(["--out", o_s.as_str()]);
        let o = ctl.admin(&args)?;
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{key} was signed");
        assert!(err.contains(want), "{key}: {err}");
        assert!(!out.exists(), "a certificate file was written for {key}");
    }
    // A user without grants, and one who does not exist.
    ctl.admin_with_stdin(
        &[
            "user",
            "add",
            "--email",
            "nogrant@corp.test",
            "--role",
            "portal-owner",
        ],
        "a long password for the ssh ca test\n",
    );
    for (email, want) in [
        ("nogrant@corp.test", "has no SSH grants"),
        ("ghost@corp.test", "no enabled user"),
    ] {
        let o = ctl.admin(&[
            "ssh",
            "sign-user",
            "--email",
            email,
            "--pubkey",
            &pubf(&ed),
            "--out",
            &out.display().to_string(),
        ])?;
        assert!(String::from_utf8_lossy(&o.stderr).contains(want));
    }
    let certs: serde_json::Value =
        serde_json::from_str(&ctl.admin_ok(&["ssh", "certs", "--json"])?)?;
    assert_eq!(
        certs.as_array().unwrap().len(),
        0,
        "nothing issued: {certs}"
    );
    // Bad grants.
    for (args, want) in [
        (
            vec!["--zone", "nowhere", "--principal", "deploy"],
            "no zone",
        ),
        (
            vec!["--zone", "eu", "--principal", "Root!"],
            "is not a login name",
        ),
        (
            vec!["--zone", "eu", "--principal", "x", "--max-ttl", "48h"],
            "outside",
        ),
        (
            vec![
                "--zone",
                "eu",
                "--principal",
                "x",
                "--allow",
                "pty-everything",
            ],
            "unknown extension",
        ),
    ] {
        let mut a = vec!["ssh", "grant", "--email", "u@corp.test"];
        a.extend(args);
        let o = ctl.admin(&a)?;
        assert!(
            String::from_utf8_lossy(&o.stderr).contains(want),
            "{a:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }

    // A good key: issued, audited, then revoked on the KRL.
    let good = ctl.admin_ok(&[
        "ssh",
        "sign-user",
        "--email",
        "u@corp.test",
        "--pubkey",
        &pubf(&ed),
        "--ttl",
        "1h",
        "--out",
        &out.display().to_string(),
        "--json",
    ])?;
    let good: serde_json::Value = serde_json::from_str(&good)?;
    assert_eq!(good["key_id"], "u@corp.test");
    assert_eq!(good["principals"], serde_json::json!(["deploy@eu"]));
    let audit = ctl.admin_ok(&["audit", "--json"])?;
    assert!(audit.contains("ssh.user_cert_issued"), "{audit}");
    assert!(
        audit.contains("ssh.user_cert_refused"),
        "refusals are audited too"
    );
    let krl = d.join("krl");
    ctl.admin_ok(&["ssh", "krl", "--out", &krl.display().to_string()])?;
    let q = run_ok(
        Command::new("ssh-keygen")
            .arg("-Q")
            .arg("-f")
            .arg(&krl)
            .arg(&out),
    )?;
    assert!(q.contains(": ok"), "{q}");
    ctl.admin_ok(&["ssh", "revoke", "--serial", &good["serial"].to_string()])?;
    ctl.admin_ok(&["ssh", "krl", "--out", &krl.display().to_string()])?;
    let q = run(Command::new("ssh-keygen")
        .arg("-Q")
        .arg("-f")
        .arg(&krl)
        .arg(&out))?;
    assert!(
        String::from_utf8_lossy(&q.stdout).contains("REVOKED"),
        "{q:?}"
    );
    Ok(())
}

#[test]
fn the_ssh_ca_is_ed25519_by_default_rsa4096_on_request_and_never_replaced() -> Result<()> {
    if !have("ssh-keygen") {
        println!("skipped: ssh-keygen not installed");
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let ctl = Controller::init(dir.path())?;
    let ca: serde_json::Value = serde_json::from_str(&ctl.admin_ok(&["ssh", "ca", "--json"])?)?;
    assert_eq!(ca["key_type"], "ed25519");
    assert!(ca["user_ca"].as_str().unwrap().starts_with("ssh-ed25519 "));
    assert_ne!(ca["user_ca"], ca["host_ca"], "separate user and host keys");
    let kh = ctl.admin_ok(&["ssh", "known-hosts"])?;
    assert_eq!(
        kh.trim(),
        format!("@cert-authority * {}", ca["host_ca"].as_str().unwrap())
    );
    // ssh-keygen reads both public keys.
    for k in ["user_ca", "host_ca"] {
        let p = dir.path().join(format!("{k}.pub"));
        std::fs::write(&p, format!("{}\n", ca[k].as_str().unwrap()))?;
        let fp = run_ok(Command::new("ssh-keygen").arg("-l").arg("-f").arg(&p))?;
        assert!(
            fp.contains(&ca[format!("{k}_fingerprint")].as_str().unwrap().to_string()),
            "{fp}"
        );
    }
    let again = ctl.admin(&["ssh", "init"])?;
    assert!(String::from_utf8_lossy(&again.stderr).contains("already has an SSH CA"));
    // The keys are sealed: nothing in the database holds the private key in the clear.
    let o = run(Command::new("grep")
        .args(["-rl", "OPENSSH PRIVATE KEY"])
        .arg(&ctl.data_dir))?;
    assert!(o.stdout.is_empty(), "a private key in the clear: {o:?}");

    // RSA-4096 at init.
    let dir2 = tempfile::tempdir()?;
    run_ok(
        Command::new(zonemesh_tests::bin("zonemesh-controller"))
            .arg("init")
            .arg("--data-dir")
            .arg(dir2.path().join("ctl"))
            .args(["--trust-domain", "corp.test", "--ssh-ca-key", "rsa4096"]),
    )?;
    let o = run_ok(
        Command::new(zonemesh_tests::bin("zonemesh-controller"))
            .arg("--data-dir")
            .arg(dir2.path().join("ctl"))
            .args(["ssh", "ca", "--json"]),
    )?;
    let ca: serde_json::Value = serde_json::from_str(&o)?;
    assert_eq!(ca["key_type"], "rsa4096");
    let p = dir2.path().join("ca.pub");
    std::fs::write(&p, format!("{}\n", ca["user_ca"].as_str().unwrap()))?;
    let fp = run_ok(Command::new("ssh-keygen").arg("-l").arg("-f").arg(&p))?;
    assert!(fp.starts_with("4096 "), "{fp}");

    // An installation without one gets it from `ssh init`.
    let dir3 = tempfile::tempdir()?;
    let ctl_bin = zonemesh_tests::bin("zonemesh-controller");
    let data = dir3.path().join("ctl");
    run_ok(
        Command::new(&ctl_bin)
            .arg("init")
            .arg("--data-dir")
            .arg(&data)
            .args(["--trust-domain", "corp.test", "--ssh-ca-key", "none"]),
    )?;
    let o = run(Command::new(&ctl_bin)
        .arg("--data-dir")
        .arg(&data)
        .args(["ssh", "ca"]))?;
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no SSH CA yet"),
        "{o:?}"
    );
    let o = run_ok(
        Command::new(&ctl_bin)
            .arg("--data-dir")
            .arg(&data)
            .args(["ssh", "init"]),
    )?;
    assert!(o.contains("ssh-ed25519 "), "{o}");
    Ok(())
}
