//! `node revoke` also revokes the node's SSH host certificates: they are on the KRL (the
//! servers' `RevokedKeys`, usable by clients as `RevokedHostKeys`), `ssh known-hosts`
//! carries an `@revoked` line for the node's host key and `ssh revoked-hosts` lists them.
//! A real OpenSSH client with either refuses the revoked server, and still trusts the
//! other one. Root only (servers are network namespaces with a real sshd each).

use anyhow::Result;
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};
use zonemesh_tests::sshlab::{Server, SshLab, skip_reason};
use zonemesh_tests::{run, run_ok};

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `ssh root@server true` trusting hosts through `known_hosts` (and `RevokedHostKeys`).
fn ssh(s: &Server, key: &Path, known_hosts: &Path, krl: Option<&Path>) -> Result<Output> {
    let mut c = Command::new("ssh");
    c.args([
        "-F",
        "/dev/null",
        "-o",
        "BatchMode=yes",
        "-o",
        "IdentitiesOnly=yes",
    ])
    .arg("-o")
    .arg(format!("IdentityFile={}", key.display()))
    .arg("-o")
    .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
    .args(["-o", "GlobalKnownHostsFile=/dev/null"])
    .args(["-o", "StrictHostKeyChecking=yes", "-o", "ConnectTimeout=5"]);
    if let Some(k) = krl {
        c.arg("-o").arg(format!("RevokedHostKeys={}", k.display()));
    }
    run(c.arg(format!("root@{}", s.ip)).arg("true"))
}

fn assert_in(s: &Server, key: &Path, kh: &Path, krl: Option<&Path>) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let o = ssh(s, key, kh, krl)?;
        if o.status.success() {
            return Ok(());
        }
        // The grant reaches the servers over the Watch stream.
        assert!(
            Instant::now() < deadline,
            "{} refused: {}\nsshd: {}",
            s.name,
            text(&o),
            s.sshd_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn assert_host_refused(s: &Server, key: &Path, kh: &Path, krl: Option<&Path>) -> Result<String> {
    let o = ssh(s, key, kh, krl)?;
    let t = text(&o);
    assert!(!o.status.success(), "{} was trusted: {t}", s.name);
    assert!(t.contains("Host key verification failed"), "{t}");
    assert!(t.to_lowercase().contains("revoked"), "{t}");
    Ok(t)
}

#[test]
fn a_revoked_node_is_refused_as_an_ssh_host() -> Result<()> {
    if let Some(why) = skip_reason() {
        println!("skipped: {why}");
        return Ok(());
    }
    let lab = SshLab::new(50, &[("eu", 2)])?;
    let ctl = &lab.ctl;
    let (gone, kept) = (&lab.servers[0], &lab.servers[1]);
    lab.add_user("ops@corp.test");
    ctl.admin_ok(&[
        "ssh",
        "grant",
        "--email",
        "ops@corp.test",
        "--zone",
        "eu",
        "--principal",
        "root",
    ])?;
    let key = lab.user_key("ops")?;
    lab.sign("ops@corp.test", &key, Some("1h"))?;
    let kh = lab.known_hosts()?;
    assert_in(gone, &key, &kh, None)?;
    assert_in(kept, &key, &kh, None)?;
    let v: Value = serde_json::from_str(&ctl.admin_ok(&["ssh", "revoked-hosts", "--json"])?)?;
    assert_eq!(v, serde_json::json!([]));

    let host_cert = gone.dir.join("ssh_host_ed25519_key-cert.pub");
    let serial: u64 = run_ok(
        Command::new("ssh-keygen")
            .arg("-L")
            .arg("-f")
            .arg(&host_cert),
    )?
    .lines()
    .find_map(|l| l.trim().strip_prefix("Serial: "))
    .expect("serial")
    .parse()?;
    let node = format!("eu/{}", gone.name);
    ctl.admin_ok(&["node", "revoke", &node])?;

    // The listing, the audit log and the KRL name the host certificate.
    let v: Value = serde_json::from_str(&ctl.admin_ok(&["ssh", "revoked-hosts", "--json"])?)?;
    let rows = v.as_array().unwrap();
    assert_eq!(rows.len(), 1, "{v}");
    assert_eq!(rows[0]["serial"], serial, "{v}");
    assert_eq!(rows[0]["node"], node.as_str(), "{v}");
    let table = ctl.admin_ok(&["ssh", "revoked-hosts"])?;
    assert!(
        table.contains(&node) && table.contains(&serial.to_string()),
        "{table}"
    );
    let audit = ctl.admin_ok(&["audit", "--json"])?;
    assert!(
        audit
            .lines()
            .any(|l| l.contains("ssh.host_certs_revoked") && l.contains(&node)),
        "{audit}"
    );
    let krl = lab.dir.join("revoked-hosts.krl");
    ctl.admin_ok(&["ssh", "krl", "--out", &krl.display().to_string()])?;
    let q = run(Command::new("ssh-keygen")
        .arg("-Q")
        .arg("-f")
        .arg(&krl)
        .arg(&host_cert))?;
    assert!(
        !q.status.success() && text(&q).contains("REVOKED"),
        "{}",
        text(&q)
    );
    let other = kept.dir.join("ssh_host_ed25519_key-cert.pub");
    let q = run(Command::new("ssh-keygen")
        .arg("-Q")
        .arg("-f")
        .arg(&krl)
        .arg(&other))?;
    assert!(q.status.success(), "{}", text(&q));

    // A client with the KRL as RevokedHostKeys and only the @cert-authority line refuses
    // the revoked server and still trusts the other.
    let t = assert_host_refused(gone, &key, &kh, Some(&krl))?;
    println!("RevokedHostKeys: {}", t.lines().next().unwrap_or_default());
    assert_in(kept, &key, &kh, Some(&krl))?;

    // A client with a fresh `ssh known-hosts` (the @cert-authority and @revoked lines)
    // does the same without any other file.
    let fresh = ctl.admin_ok(&["ssh", "known-hosts"])?;
    let revoked: Vec<&str> = fresh
        .lines()
        .filter(|l| l.starts_with("@revoked "))
        .collect();
    assert_eq!(revoked.len(), 1, "{fresh}");
    let host_pub = std::fs::read_to_string(gone.dir.join("ssh_host_ed25519_key.pub"))?;
    let host_key: Vec<&str> = host_pub.split_whitespace().take(2).collect();
    assert_eq!(revoked[0], format!("@revoked * {}", host_key.join(" ")));
    let kh2 = lab.dir.join("known_hosts.fresh");
    std::fs::write(&kh2, &fresh)?;
    let t = assert_host_refused(gone, &key, &kh2, None)?;
    println!("@revoked: {}", t.lines().next().unwrap_or_default());
    assert_in(kept, &key, &kh2, None)?;

    // Revoking again adds nothing; the other node's certificate is untouched.
    let certs: Value = serde_json::from_str(&ctl.admin_ok(&["ssh", "certs", "--json"])?)?;
    let host_rows: Vec<&Value> = certs
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["kind"] == "host")
        .collect();
    assert!(
        host_rows
            .iter()
            .all(|c| (c["key_id"] == node.as_str()) == (c["revoked"] == true)),
        "{certs}"
    );
    Ok(())
}
