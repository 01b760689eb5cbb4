//! SSH certificate benchmarks:
//!
//! 1. User certificates signed per second by the controller's SSH CA (policy checks,
//!    signature, the record written and flushed), next to `ssh-keygen -s` signing the same
//!    number of keys with a CA key of the same type in one process, in the same run: for
//!    Ed25519 and RSA-4096 CA keys.
//! 2. Revocation to refusal on every server of a six-node lab (three zones of two servers,
//!    root only): from the start of `ssh revoke --serial N` until every server's KRL holds
//!    the serial (polled every millisecond), each round confirmed by a refused login on
//!    every server; p50 and p99.
//!
//! `SMOKE=1`: fewer certificates and rounds, and a two-node lab (CI).

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};
use zonemesh_controller::ssh::{CaKeyType, CaKeys, Ssh};
use zonemesh_tests::run_ok;
use zonemesh_tests::sshlab::{SshLab, skip_reason};

fn smoke() -> bool {
    std::env::var("SMOKE").is_ok_and(|v| v == "1")
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v.get(i).copied().unwrap_or_default()
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// `n` Ed25519 subject keys (public halves), made with ssh-keygen.
fn subject_keys(dir: &Path, n: usize) -> Result<Vec<PathBuf>> {
    (0..n)
        .map(|i| {
            let p = dir.join(format!("k{i}"));
            run_ok(
                Command::new("ssh-keygen")
                    .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                    .arg(&p),
            )?;
            Ok(PathBuf::from(format!("{}.pub", p.display())))
        })
        .collect()
}

fn signing(kind: CaKeyType, keys: &[PathBuf], dir: &Path) -> Result<()> {
    let data = dir.join(format!("ctl-{}", kind.as_str()));
    std::fs::create_dir_all(&data)?;
    let store = zonemesh_controller::store::Store::open(&data.join("db"))?;
    let kek = zonemesh_ca::Kek::generate();
    let ca = CaKeys::generate(kind, "bench.test")?;
    ca.install(&store, &kek)?;
    // The same CA key for ssh-keygen.
    let ca_file = dir.join(format!("ca-{}", kind.as_str()));
    std::fs::write(
        &ca_file,
        ca.user.to_openssh(ssh_key::LineEnding::LF)?.as_bytes(),
    )?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&ca_file, std::fs::Permissions::from_mode(0o600))?;
    }
    store.zones.insert(
        "eu",
        serde_json::to_vec(&zonemesh_controller::store::ZoneRecord {
            name: "eu".into(),
            cidr: "100.64.0.0/24".parse()?,
            intra_zone_tunnels: false,
            created_unix: 0,
        })?,
    )?;
    let ssh: Arc<Ssh> = Ssh::open(&store, &kek, "bench.test", None)?;
    ssh.grant("u@bench.test", "eu", "deploy", None, &[], "bench")?;
    let texts: Vec<String> = keys
        .iter()
        .map(std::fs::read_to_string)
        .collect::<Result<_, _>>()?;
    let started = Instant::now();
    for t in &texts {
        ssh.sign_user("u@bench.test", t, Some(Duration::from_secs(3600)), "bench")?;
    }
    let ours = started.elapsed();
    let started = Instant::now();
    let mut cmd = Command::new("ssh-keygen");
    cmd.arg("-q")
        .arg("-s")
        .arg(&ca_file)
        .args([
            "-I",
            "u@bench.test",
            "-n",
            "deploy@eu",
            "-V",
            "+1h",
            "-z",
            "1",
        ])
        .args(keys);
    run_ok(&mut cmd)?;
    let anchor = started.elapsed();
    let n = keys.len() as f64;
    let (a, b) = (n / ours.as_secs_f64(), n / anchor.as_secs_f64());
    println!(
        "ssh sign {:>8}: zonemesh {a:>8.0} certs/s (recorded and flushed), ssh-keygen -s {b:>8.0} certs/s (one process, {} keys); ratio {:.3}",
        kind.as_str(),
        keys.len(),
        a / b
    );
    Ok(())
}

/// One round: a fresh certificate logged in everywhere, revoked, until every KRL has it.
fn revocation_round(lab: &SshLab, key: &Path) -> Result<Duration> {
    lab.sign("bench@corp.test", key, Some("1h"))?;
    let cert = PathBuf::from(format!("{}-cert.pub", key.display()));
    let serial: u64 = {
        let l = run_ok(Command::new("ssh-keygen").arg("-L").arg("-f").arg(&cert))?;
        l.lines()
            .find_map(|x| x.trim().strip_prefix("Serial: "))
            .context("serial")?
            .trim()
            .parse()?
    };
    // The certificate works everywhere first (also waits for the grant to arrive).
    for s in &lab.servers {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !lab.ssh(s, "root", key)?.status.success() {
            if Instant::now() > deadline {
                bail!("{} refuses a fresh certificate:\n{}", s.name, s.sshd_log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let start = Instant::now();
    lab.ctl
        .admin_ok(&["ssh", "revoke", "--serial", &serial.to_string()])?;
    let mut pending: Vec<&zonemesh_tests::sshlab::Server> = lab.servers.iter().collect();
    while !pending.is_empty() {
        pending.retain(|s| {
            let krl = std::fs::read(s.krl()).unwrap_or_default();
            !zonemesh_controller::ssh::krl::serials(&krl).is_some_and(|v| v.contains(&serial))
        });
        if start.elapsed() > Duration::from_secs(10) {
            bail!("serial {serial} not on every KRL after 10 s");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let all = start.elapsed();
    for s in &lab.servers {
        if lab.ssh(s, "root", key)?.status.success() {
            bail!("{} still accepts revoked serial {serial}", s.name);
        }
    }
    Ok(all)
}

fn main() -> Result<()> {
    if !zonemesh_tests::have("ssh-keygen") {
        println!("skipped: ssh-keygen not installed");
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let n = if smoke() { 50 } else { 1000 };
    let keys = subject_keys(dir.path(), n)?;
    signing(CaKeyType::Ed25519, &keys, dir.path())?;
    signing(
        CaKeyType::Rsa4096,
        &keys[..if smoke() { 10 } else { 200 }],
        dir.path(),
    )?;

    if let Some(why) = skip_reason() {
        println!("skipped: revocation benchmark: {why}");
        return Ok(());
    }
    let zones: &[(&str, usize)] = if smoke() {
        &[("eu", 1), ("us", 1)]
    } else {
        &[("eu", 2), ("us", 2), ("ap", 2)]
    };
    let lab = SshLab::new(48, zones)?;
    lab.add_user("bench@corp.test");
    for (z, _) in zones {
        lab.ctl.admin_ok(&[
            "ssh",
            "grant",
            "--email",
            "bench@corp.test",
            "--zone",
            z,
            "--principal",
            "root",
        ])?;
    }
    let key = lab.user_key("bench")?;
    let rounds = if smoke() { 3 } else { 30 };
    let mut v = Vec::new();
    for _ in 0..rounds {
        v.push(revocation_round(&lab, &key)?);
    }
    println!(
        "ssh revoke -> on the KRL of all {} servers (login refused on each): p50 {}, p99 {} over {rounds} rounds",
        lab.servers.len(),
        ms(pct(&mut v, 0.5)),
        ms(pct(&mut v, 0.99))
    );
    Ok(())
}
