//! Headless Chromium on the Server access page against a real sshd configured only by its
//! agent (the [`SshLab`]): a user without TOTP is shown why and gets nothing, even posting
//! the form by hand; after enrolling TOTP on the page, a pasted key and an uploaded key
//! file each give a downloaded certificate that logs in over ssh; a 1024-bit RSA key, a
//! private key, an oversized file and a wrong CSRF token are each refused with a message
//! and issue nothing. Root only (the server is a network namespace).

use anyhow::{Context, Result, bail};
use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use zonemesh_tests::browser::{self, Browser};
use zonemesh_tests::run_ok;
use zonemesh_tests::sshlab::{self, SshLab};

const USER: &str = "page-user@corp.test";
const PASSWORD: &str = "a long lab password for ssh tests";

/// User certificates issued to [`USER`] so far.
fn issued(lab: &SshLab) -> Result<usize> {
    let v: Value = serde_json::from_str(&lab.ctl.admin_ok(&["ssh", "certs", "--json"])?)?;
    Ok(v.as_array()
        .context("certs")?
        .iter()
        .filter(|c| c["kind"] == "user" && c["key_id"] == USER)
        .count())
}

/// Wait until the page shows `css` (a refusal replaces the page; a download does not).
fn wait_for(b: &Browser, css: &str, within: Duration) -> Result<String> {
    let deadline = Instant::now() + within;
    loop {
        let t = b.text(css)?;
        if !t.is_empty() {
            return Ok(t);
        }
        if Instant::now() > deadline {
            bail!("no {css} on the page: {}", b.source()?);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Nothing downloaded a moment after a refusal.
fn no_download(b: &Browser) -> Result<()> {
    std::thread::sleep(Duration::from_millis(500));
    let d = b.downloads()?;
    if !d.is_empty() {
        bail!("a refused form downloaded {d:?}");
    }
    Ok(())
}

/// Save a downloaded certificate beside `key` (where ssh picks it up) and check it.
fn save_cert(cert: &[u8], key: &Path) -> Result<()> {
    let p = format!("{}-cert.pub", key.display());
    std::fs::write(&p, cert)?;
    let l = run_ok(Command::new("ssh-keygen").args(["-L", "-f", &p]))?;
    assert!(l.contains(&format!("Key ID: \"{USER}\"")), "{l}");
    assert!(l.contains("root@eu"), "{l}");
    Ok(())
}

/// Log in as `root` with `key` (its certificate beside it); the grant reaches the
/// server over the Watch stream, so the first attempts may be refused.
fn logs_in(lab: &SshLab, key: &Path) -> Result<()> {
    let s = &lab.servers[0];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let o = lab.ssh(s, "root", key)?;
        if o.status.success() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "refused: {}{}\nsshd: {}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr),
                s.sshd_log()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn keygen(path: &Path, args: &[&str]) -> Result<()> {
    run_ok(
        Command::new("ssh-keygen")
            .args(["-q", "-N", "", "-C", "page-test", "-f"])
            .arg(path)
            .args(args),
    )
    .map(drop)
}

#[test]
fn chromium_server_access_page_issues_certificates_that_log_in() -> Result<()> {
    if let Some(why) = sshlab::skip_reason().or_else(browser::sign_in_skip_reason) {
        println!("skipped: {why}");
        return Ok(());
    }
    let lab = SshLab::new(49, &[("eu", 1)])?;
    lab.add_user(USER);
    lab.ctl.admin_ok(&[
        "ssh",
        "grant",
        "--email",
        USER,
        "--zone",
        "eu",
        "--principal",
        "root",
    ])?;

    let base = format!("https://localhost:{}", lab.ctl.https.port());
    let br = Browser::start()?;
    br.sign_in(&base, USER, PASSWORD, "/dashboard")?;

    // Without TOTP: the page says why and has no form; a form posted anyway with the
    // session's own CSRF token issues nothing.
    br.click("#ssh-link")?;
    br.wait_url("/ssh", Duration::from_secs(10))?;
    let why = br.text("#need-totp")?;
    assert!(why.contains("TOTP"), "{}", br.source()?);
    assert!(!br.source()?.contains("sign-form"), "a form without TOTP");
    let pasted = lab.user_key("web-paste")?;
    let pubkey = std::fs::read_to_string(format!("{}.pub", pasted.display()))?;
    br.script(&format!(
        "const f = document.createElement('form'); f.method = 'post'; f.action = '/ssh';
         const add = (n, v) => {{ const i = document.createElement('input'); i.name = n; i.value = v; f.appendChild(i); }};
         add('csrf', document.querySelector('input[name=csrf]').value);
         add('public_key', {key}); add('ttl', '1');
         document.body.appendChild(f); f.submit();",
        key = serde_json::to_string(pubkey.trim())?
    ))?;
    let msg = wait_for(&br, "#message", Duration::from_secs(10))?;
    assert!(msg.contains("TOTP"), "{msg}");
    no_download(&br)?;
    assert_eq!(issued(&lab)?, 0);

    // Enroll TOTP on the page.
    br.goto(&format!("{base}/enroll"))?;
    br.wait_url("/enroll", Duration::from_secs(10))?;
    br.enroll_totp()?;

    // Paste: the downloaded certificate logs in.
    br.click("#ssh-link")?;
    br.wait_url("/ssh", Duration::from_secs(10))?;
    let known = br.text("#known-hosts")?;
    assert!(known.starts_with("@cert-authority"), "{known}");
    br.type_into("#public_key", pubkey.trim())?;
    br.click("#sign")?;
    let cert = br.take_download("id-cert.pub", Duration::from_secs(20))?;
    save_cert(&cert, &pasted)?;
    logs_in(&lab, &pasted)?;
    assert_eq!(issued(&lab)?, 1);
    println!("pasted key: certificate downloaded, ssh login as root ok");

    // Upload: the same, from a key file.
    let uploaded = lab.user_key("web-upload")?;
    br.goto(&format!("{base}/ssh"))?;
    br.wait_url("/ssh", Duration::from_secs(10))?;
    br.upload(
        "#key_file",
        Path::new(&format!("{}.pub", uploaded.display())),
    )?;
    br.click("#sign")?;
    let cert = br.take_download("id-cert.pub", Duration::from_secs(20))?;
    save_cert(&cert, &uploaded)?;
    logs_in(&lab, &uploaded)?;
    assert_eq!(issued(&lab)?, 2);
    println!("uploaded key file: certificate downloaded, ssh login as root ok");

    // Refusals, each with its message and nothing issued.
    let weak = lab.dir.join("id-weak-rsa");
    keygen(&weak, &["-t", "rsa", "-b", "1024"])?;
    let huge = lab.dir.join("huge.pub");
    std::fs::write(
        &huge,
        format!("ssh-ed25519 {} huge\n", "A".repeat(64 * 1024)),
    )?;
    let weak_pub = std::path::PathBuf::from(format!("{}.pub", weak.display()));
    let cases = [
        ("a 1024-bit RSA key", &weak_pub, "3072"),
        ("a private key", &uploaded, "private key"),
        ("a 64 KiB file", &huge, "KiB"),
    ];
    for (what, file, expect) in cases {
        br.goto(&format!("{base}/ssh"))?;
        br.wait_url("/ssh", Duration::from_secs(10))?;
        br.upload("#key_file", file)?;
        br.click("#sign")?;
        let msg = wait_for(&br, "#message", Duration::from_secs(10))
            .with_context(|| format!("no refusal for {what}"))?;
        assert!(msg.contains(expect), "{what}: {msg}");
        assert!(!msg.contains("PRIVATE"), "the key is echoed: {msg}");
        no_download(&br)?;
        assert_eq!(issued(&lab)?, 2, "{what} issued a certificate");
        println!("{what}: refused with \"{msg}\"");
    }

    // A wrong CSRF token: the form is refused and nothing issued.
    br.goto(&format!("{base}/ssh"))?;
    br.wait_url("/ssh", Duration::from_secs(10))?;
    br.type_into("#public_key", pubkey.trim())?;
    br.script("document.querySelector('#sign-form input[name=csrf]').value = 'forged'")?;
    br.click("#sign")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !br.source()?.contains("Form expired") {
        if Instant::now() > deadline {
            bail!("a forged CSRF token was not refused: {}", br.source()?);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    no_download(&br)?;
    assert_eq!(issued(&lab)?, 2);
    println!("wrong CSRF token: refused");

    // Every issue is audited with the user's e-mail.
    let audit = lab.ctl.admin_ok(&["audit", "--json"])?;
    let n = audit
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|r| r["kind"] == "ssh.user_cert_issued" && r.to_string().contains(USER))
        .count();
    assert_eq!(n, 2, "{audit}");
    Ok(())
}
