//! Server access with SSH certificates, end to end: a controller and three servers in two
//! zones (network namespaces), each with a real sshd configured only by its agent's
//! `--manage-sshd` drop-in, and the OpenSSH client in the test's namespace trusting hosts
//! through the `@cert-authority` line alone. Root only.

use anyhow::Result;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};
use zonemesh_tests::sshlab::{SshLab, skip_reason};
use zonemesh_tests::{run, run_ok};

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn logs_in(lab: &SshLab, s: &zonemesh_tests::sshlab::Server, user: &str, key: &Path) -> bool {
    let o = lab.ssh(s, user, key).expect("ssh runs");
    o.status.success()
}

fn assert_login(lab: &SshLab, s: &zonemesh_tests::sshlab::Server, user: &str, key: &Path) {
    let o = lab.ssh(s, user, key).unwrap();
    assert!(
        o.status.success(),
        "{user}@{} ({}) refused: {}\nsshd: {}\nagent: {}",
        s.ip,
        s.name,
        text(&o),
        s.sshd_log(),
        s.agent_log()
    );
}

fn assert_refused(
    lab: &SshLab,
    s: &zonemesh_tests::sshlab::Server,
    user: &str,
    key: &Path,
) -> String {
    let o = lab.ssh(s, user, key).unwrap();
    assert!(
        !o.status.success(),
        "{user}@{} ({}) was let in",
        s.ip,
        s.name
    );
    let t = text(&o);
    assert!(t.contains("Permission denied"), "{t}");
    t
}

/// How long after `start` every server refuses the key (polled login attempts).
fn until_refused_everywhere(lab: &SshLab, user: &str, key: &Path, start: Instant) -> Vec<Duration> {
    let mut out = Vec::new();
    for s in &lab.servers {
        loop {
            if !logs_in(lab, s, user, key) {
                out.push(start.elapsed());
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{} still accepts {user} 10 s after the revocation:\n{}",
                s.name,
                s.agent_log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    out
}

#[test]
fn server_access_end_to_end() -> Result<()> {
    if let Some(why) = skip_reason() {
        println!("skipped: {why}");
        return Ok(());
    }
    let t0 = Instant::now();
    let lab = SshLab::new(47, &[("eu", 2), ("us", 1)])?;
    println!("lab up in {:?}", t0.elapsed());
    let ctl = &lab.ctl;
    for u in [
        "alice@corp.test",
        "bob@corp.test",
        "carol@corp.test",
        "dave@corp.test",
        "erin@corp.test",
    ] {
        lab.add_user(u);
    }
    ctl.admin_ok(&[
        "ssh",
        "grant",
        "--email",
        "alice@corp.test",
        "--zone",
        "eu",
        "--principal",
        "root",
    ])?;
    // bob's grant makes `nobody` a principal on eu's servers, which alice's certificate
    // does not carry.
    ctl.admin_ok(&[
        "ssh",
        "grant",
        "--email",
        "bob@corp.test",
        "--zone",
        "eu",
        "--principal",
        "nobody",
    ])?;
    for u in ["carol@corp.test", "dave@corp.test", "erin@corp.test"] {
        for z in ["eu", "us"] {
            ctl.admin_ok(&[
                "ssh",
                "grant",
                "--email",
                u,
                "--zone",
                z,
                "--principal",
                "root",
            ])?;
        }
    }
    let grants: serde_json::Value =
        serde_json::from_str(&ctl.admin_ok(&["ssh", "grants", "--json"])?)?;
    assert_eq!(grants.as_array().unwrap().len(), 8);

    // The certificate as OpenSSH reads it.
    let alice = lab.user_key("alice")?;
    let cert = lab.sign("alice@corp.test", &alice, Some("2h"))?;
    let l = run_ok(Command::new("ssh-keygen").arg("-L").arg("-f").arg(&cert))?;
    assert!(l.contains("Key ID: \"alice@corp.test\""), "{l}");
    assert!(l.contains("user certificate"), "{l}");
    let principals: Vec<&str> = l
        .split("Principals:")
        .nth(1)
        .and_then(|r| r.split("Critical Options:").next())
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(principals, ["root@eu"], "{l}");
    let ext: Vec<&str> = l
        .split("Extensions:")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(ext, ["permit-pty"], "no forwarding unless granted: {l}");
    let valid = l.lines().find(|x| x.trim().starts_with("Valid:")).unwrap();
    assert!(valid.contains("from ") && valid.contains(" to "), "{valid}");

    // Granted zone and principal: in (and the host was verified by its certificate alone).
    // Another zone, or a principal not granted: refused.
    for s in lab.zone("eu") {
        let waited = Instant::now();
        // The grants just made reach the servers over the Watch stream.
        while !logs_in(&lab, s, "root", &alice) && waited.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_login(&lab, s, "root", &alice);
        assert_refused(&lab, s, "nobody", &alice);
    }
    for s in lab.zone("us") {
        assert_refused(&lab, s, "root", &alice);
    }

    // A password is refused: the server offers public keys only.
    {
        let s = &lab.servers[0];
        let kh = lab.known_hosts()?;
        let o = run(Command::new("ssh")
            .args([
                "-F",
                "/dev/null",
                "-o",
                "BatchMode=yes",
                "-o",
                "PubkeyAuthentication=no",
            ])
            .args([
                "-o",
                "PreferredAuthentications=password,keyboard-interactive",
            ])
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", kh.display()))
            .args(["-o", "StrictHostKeyChecking=yes", "-o", "ConnectTimeout=5"])
            .arg(format!("root@{}", s.ip))
            .arg("true"))?;
        let t = text(&o);
        assert!(!o.status.success());
        assert!(t.contains("Permission denied (publickey)"), "{t}");
    }

    // An expired certificate is refused.
    {
        let carol = lab.user_key("carol")?;
        lab.sign("carol@corp.test", &carol, Some("2s"))?;
        std::thread::sleep(Duration::from_millis(2600));
        let t = assert_refused(&lab, &lab.servers[0], "root", &carol);
        assert!(
            lab.servers[0].sshd_log().contains("expired"),
            "{t}\n{}",
            lab.servers[0].sshd_log()
        );
    }

    // A host whose certificate another CA signed is refused by the client.
    {
        let s = &lab.servers[0];
        let d = s.dir.join("rogue");
        std::fs::create_dir_all(&d)?;
        let key = d.join("host");
        let ca = d.join("ca");
        for k in [&key, &ca] {
            run_ok(
                Command::new("ssh-keygen")
                    .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                    .arg(k),
            )?;
        }
        run_ok(
            Command::new("ssh-keygen")
                .arg("-s")
                .arg(&ca)
                .args(["-h", "-I", "rogue", "-n", &s.ip.to_string()])
                .arg(format!("{}.pub", key.display())),
        )?;
        let conf = d.join("sshd_config");
        std::fs::write(
            &conf,
            format!(
                "Port 2222\nListenAddress {}\nPidFile {}/pid\nHostKey {}\nHostCertificate {}-cert.pub\nTrustedUserCAKeys {}/user_ca.pub\nAuthorizedPrincipalsFile {}/principals/%u\nUsePAM no\nStrictModes no\n",
                s.ip,
                d.display(),
                key.display(),
                key.display(),
                s.files_dir().display(),
                s.files_dir().display()
            ),
        )?;
        let mut rogue = Command::new("ip")
            .args(["netns", "exec", &s.ns, "/usr/sbin/sshd", "-D", "-e", "-f"])
            .arg(&conf)
            .stderr(std::process::Stdio::null())
            .spawn()?;
        lab.janitor.track_pid(rogue.id())?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect((s.ip, 2222)).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let o = lab.ssh_at(s.ip, 2222, "root", &alice)?;
        let _ = rogue.kill();
        let _ = rogue.wait();
        let t = text(&o);
        assert!(
            !o.status.success(),
            "a host certificate from another CA was accepted"
        );
        assert!(t.contains("Host key verification failed"), "{t}");
    }

    // Revoking one certificate: the next login fails on every server.
    let mut delays = Vec::new();
    {
        let dave = lab.user_key("dave")?;
        lab.sign("dave@corp.test", &dave, None)?;
        for s in &lab.servers {
            assert_login(&lab, s, "root", &dave);
        }
        let certs: serde_json::Value = serde_json::from_str(&ctl.admin_ok(&[
            "ssh",
            "certs",
            "--email",
            "dave@corp.test",
            "--json",
        ])?)?;
        let serial = certs[0]["serial"].as_u64().unwrap().to_string();
        let start = Instant::now();
        ctl.admin_ok(&["ssh", "revoke", "--serial", &serial])?;
        let d = until_refused_everywhere(&lab, "root", &dave, start);
        println!(
            "ssh revoke --serial: refused on every server after {:?} (per server {d:?})",
            d.iter().max().unwrap()
        );
        delays.push(*d.iter().max().unwrap());
        for s in &lab.servers {
            let q = run(Command::new("ssh-keygen")
                .arg("-Q")
                .arg("-f")
                .arg(s.krl())
                .arg(format!("{}-cert.pub", dave.display())))?;
            assert!(text(&q).contains("REVOKED"), "{}: {}", s.name, text(&q));
        }
    }
    // Disabling a user: the same.
    {
        let erin = lab.user_key("erin")?;
        lab.sign("erin@corp.test", &erin, None)?;
        for s in &lab.servers {
            assert_login(&lab, s, "root", &erin);
        }
        let start = Instant::now();
        ctl.admin_ok(&["user", "disable", "--email", "erin@corp.test"])?;
        let d = until_refused_everywhere(&lab, "root", &erin, start);
        println!(
            "user disable: refused on every server after {:?} (per server {d:?})",
            d.iter().max().unwrap()
        );
        delays.push(*d.iter().max().unwrap());
        let o = ctl.admin(&[
            "ssh",
            "sign-user",
            "--email",
            "erin@corp.test",
            "--pubkey",
            &format!("{}.pub", erin.display()),
            "--out",
            "/dev/null",
        ])?;
        assert!(!o.status.success(), "a disabled user got a certificate");
    }
    assert!(
        delays.iter().all(|d| *d < Duration::from_secs(5)),
        "{delays:?}"
    );

    // Without --manage-sshd the agent takes its drop-in away (and only its own files).
    {
        let s = lab.servers.last().unwrap();
        let mine = s.config_dir().join("10-operator.conf");
        std::fs::write(&mine, "# the operator's own\n")?;
        lab.stop_agent(s);
        lab.start_agent(s, false)?;
        let deadline = Instant::now() + Duration::from_secs(15);
        while s.drop_in().exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(
            !s.drop_in().exists(),
            "drop-in left behind:\n{}",
            s.agent_log()
        );
        assert!(!s.krl().exists());
        assert!(mine.exists(), "the operator's file was removed");
    }
    println!("end to end in {:?}", t0.elapsed());
    Ok(())
}
