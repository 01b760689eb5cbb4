//! `--manage-sshd`: this node's sshd trusts zonemesh's SSH certificates. The job obtains a
//! host certificate for the sshd host key over mutual TLS (IssueSshHostCertificate) and
//! renews it at 2/3 of its life; from the SSH state on the Watch stream it writes the
//! user CA key, one AuthorizedPrincipalsFile per principal granted in this node's zone
//! and the KRL, and a drop-in naming them; then, when the drop-in or the host certificate
//! changed, it runs the reload command. sshd reads the CA key, principals and KRL at each
//! login, so a revocation needs no reload.
//!
//! Every file the agent writes is recorded with its SHA-256 in the state directory
//! ([`MANIFEST`]); a file that exists and is not the one recorded is never replaced (an
//! operator wrote it), and the change is refused with the path. Started without
//! `--manage-sshd`, the agent removes what it wrote (files still as it wrote them) and
//! reloads sshd once with the command it last used.

use super::super::client::status_message;
use super::super::state::StateDir;
use super::{Agent, RPC_DEADLINE};
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio_util::sync::CancellationToken;
use zonemesh_proto as pb;

/// Where the agent records the files it wrote, in its state directory.
pub const MANIFEST: &str = "sshd-files.json";
/// The drop-in's name in the sshd config directory.
pub const DROP_IN: &str = "50-zonemesh.conf";
/// Wait after a failed host certificate request or a refused write.
const RETRY: Duration = Duration::from_secs(30);
/// Longest the reload command may run.
const RELOAD_LIMIT: Duration = Duration::from_secs(30);
const HEADER: &str = "# Written by zonemesh-agent (--manage-sshd). Replaced on every change; removed when the agent runs without --manage-sshd.\n";

/// Where sshd's files are and how it is reloaded (`run --manage-sshd ...`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SshdConfig {
    /// The sshd host private key; its public half is `<key>.pub`, its certificate is
    /// written to `<key>-cert.pub`.
    pub host_key: PathBuf,
    /// sshd's drop-in directory (`Include`d by sshd_config).
    pub config_dir: PathBuf,
    /// Where the CA key, principals and KRL are written.
    pub files_dir: PathBuf,
    /// Run with `sh -c` after the drop-in or the host certificate changed.
    pub reload: String,
}

impl SshdConfig {
    /// The Debian locations.
    pub fn debian() -> Self {
        Self {
            host_key: "/etc/ssh/ssh_host_ed25519_key".into(),
            config_dir: "/etc/ssh/sshd_config.d".into(),
            files_dir: "/etc/ssh/zonemesh".into(),
            reload: "systemctl reload ssh".into(),
        }
    }

    pub fn host_public_key(&self) -> PathBuf {
        suffixed(&self.host_key, ".pub")
    }

    pub fn host_cert(&self) -> PathBuf {
        suffixed(&self.host_key, "-cert.pub")
    }

    pub fn drop_in(&self) -> PathBuf {
        self.config_dir.join(DROP_IN)
    }

    fn user_ca(&self) -> PathBuf {
        self.files_dir.join("user_ca.pub")
    }

    fn principals_dir(&self) -> PathBuf {
        self.files_dir.join("principals")
    }

    fn krl(&self) -> PathBuf {
        self.files_dir.join("revoked.krl")
    }
}

fn suffixed(p: &Path, suffix: &str) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// A principal name that is safe as a file name (the controller checks the same).
fn safe_principal(p: &str) -> bool {
    !p.is_empty()
        && p.len() <= 32
        && p != "."
        && p != ".."
        && p.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-' | '.'))
}

/// The drop-in for `cfg`.
pub fn drop_in_text(cfg: &SshdConfig) -> String {
    format!(
        "{HEADER}HostCertificate {}\nTrustedUserCAKeys {}\nAuthorizedPrincipalsFile {}/%u\nRevokedKeys {}\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n",
        cfg.host_cert().display(),
        cfg.user_ca().display(),
        cfg.principals_dir().display(),
        cfg.krl().display(),
    )
}

/// Every file sshd needs for `state` on a node of `zone`, with its contents and mode.
/// The host certificate is not among them (it has its own schedule).
pub fn desired_files(
    cfg: &SshdConfig,
    zone: &str,
    state: &pb::SshState,
) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = vec![(
        cfg.user_ca(),
        format!("{HEADER}{}\n", state.user_ca_public_key.trim()).into_bytes(),
    )];
    let mut principals: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for g in state.grants.iter().filter(|g| g.zone == zone) {
        if safe_principal(&g.principal) && !g.certificate_principal.contains(char::is_whitespace) {
            principals
                .entry(g.principal.as_str())
                .or_default()
                .push(g.certificate_principal.as_str());
        }
    }
    for (p, certs) in principals {
        let mut body = HEADER.to_string();
        for c in certs {
            body.push_str(c);
            body.push('\n');
        }
        out.push((cfg.principals_dir().join(p), body.into_bytes()));
    }
    out.push((cfg.krl(), state.krl.clone()));
    out.push((cfg.drop_in(), drop_in_text(cfg).into_bytes()));
    out
}

/// What the agent wrote: path → SHA-256 of the contents, and the reload command used.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub files: BTreeMap<PathBuf, String>,
    pub reload: Option<String>,
}

fn digest(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

impl Manifest {
    pub fn load(state: &StateDir) -> Result<Self> {
        let p = manifest_path(state);
        match std::fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b).with_context(|| format!("reading {}", p.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
        }
    }

    fn save(&self, state: &StateDir) -> Result<()> {
        let p = manifest_path(state);
        if self.files.is_empty() {
            return match std::fs::remove_file(&p) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
                _ => Ok(()),
            };
        }
        zonemesh_deploy::write_atomic(&p, &serde_json::to_vec_pretty(self)?, 0o600)?;
        Ok(())
    }

    /// Whether `path` may be (re)written: it does not exist, or it is exactly what we wrote.
    fn owns(&self, path: &Path) -> Result<bool> {
        match std::fs::read(path) {
            Ok(now) => Ok(self.files.get(path) == Some(&digest(&now))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Write `contents` to `path` unless it already holds them; `Ok(true)` when written.
    /// Refuses a file the agent did not write.
    pub fn write(&mut self, state: &StateDir, path: &Path, contents: &[u8]) -> Result<bool> {
        let want = digest(contents);
        if let Ok(now) = std::fs::read(path)
            && digest(&now) == want
            && self.files.get(path) == Some(&want)
        {
            return Ok(false);
        }
        if !self.owns(path)? {
            bail!(
                "refusing to replace {}: zonemesh-agent did not write it (move it away to let --manage-sshd manage it)",
                path.display()
            );
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        zonemesh_deploy::write_atomic(path, contents, 0o644)?;
        self.files.insert(path.to_path_buf(), want);
        self.save(state)?;
        Ok(true)
    }

    /// Remove every file the agent wrote that is not in `keep` (and still as written).
    pub fn remove_others(&mut self, state: &StateDir, keep: &[PathBuf]) -> Result<bool> {
        let gone: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|p| !keep.contains(p))
            .cloned()
            .collect();
        let mut changed = false;
        for p in gone {
            if self.owns(&p)? {
                match std::fs::remove_file(&p) {
                    Ok(()) => changed = true,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e).with_context(|| format!("removing {}", p.display())),
                }
            } else {
                tracing::warn!(path = %p.display(), "not removing a file changed since zonemesh-agent wrote it");
            }
            self.files.remove(&p);
        }
        self.save(state)?;
        Ok(changed)
    }
}

fn manifest_path(state: &StateDir) -> PathBuf {
    state.mesh_file().with_file_name(MANIFEST)
}

/// Run `cmd` with `sh -c`, at most [`RELOAD_LIMIT`]; blocking.
pub fn run_reload(cmd: &str) -> Result<()> {
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("running {cmd:?}"))?;
    let started = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            if status.success() {
                return Ok(());
            }
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                use std::io::Read;
                let _ = e.read_to_string(&mut err);
            }
            bail!("{cmd:?} failed ({status}): {}", err.trim());
        }
        if started.elapsed() > RELOAD_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{cmd:?} did not finish within {RELOAD_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Without `--manage-sshd`: remove what an earlier `--manage-sshd` run wrote and reload
/// sshd with the command it used. Blocking.
pub fn unmanage(state: &StateDir) -> Result<()> {
    let mut m = Manifest::load(state)?;
    if m.files.is_empty() {
        return Ok(());
    }
    let reload = m.reload.clone();
    let changed = m.remove_others(state, &[])?;
    tracing::info!("sshd is no longer managed: zonemesh's drop-in and files removed");
    if changed
        && let Some(cmd) = reload
        && let Err(e) = run_reload(&cmd)
    {
        tracing::warn!(error = %e, "sshd reload after removing the drop-in failed");
    }
    Ok(())
}

/// The host certificate held, as parsed.
#[derive(Clone, Debug)]
struct HostCert {
    text: String,
    valid_after: SystemTime,
    valid_before: SystemTime,
}

fn parse_host_cert(text: &str, host_key: &ssh_key::PublicKey) -> Option<HostCert> {
    let cert = ssh_key::Certificate::from_openssh(text.trim()).ok()?;
    if cert.public_key() != host_key.key_data()
        || cert.cert_type() != ssh_key::certificate::CertType::Host
    {
        return None;
    }
    Some(HostCert {
        text: text.trim().to_string(),
        valid_after: cert.valid_after_time(),
        valid_before: cert.valid_before_time(),
    })
}

fn read_host_key(cfg: &SshdConfig) -> Result<(String, ssh_key::PublicKey)> {
    let p = cfg.host_public_key();
    let text = std::fs::read_to_string(&p).with_context(|| {
        format!(
            "reading the sshd host public key {} (--ssh-host-key)",
            p.display()
        )
    })?;
    let key = ssh_key::PublicKey::from_openssh(text.trim())
        .with_context(|| format!("{} is not an OpenSSH public key", p.display()))?;
    Ok((text.trim().to_string(), key))
}

/// Write everything sshd needs; `Ok(true)` when sshd must reload. Blocking.
fn apply(
    state_dir: &StateDir,
    cfg: &SshdConfig,
    zone: &str,
    state: &pb::SshState,
    cert: &HostCert,
) -> Result<bool> {
    let mut m = Manifest::load(state_dir)?;
    m.reload = Some(cfg.reload.clone());
    let mut reload = m.write(
        state_dir,
        &cfg.host_cert(),
        format!("{}\n", cert.text).as_bytes(),
    )?;
    let files = desired_files(cfg, zone, state);
    let mut keep: Vec<PathBuf> = files.iter().map(|(p, _)| p.clone()).collect();
    keep.push(cfg.host_cert());
    for (path, contents) in &files {
        let written = m.write(state_dir, path, contents)?;
        if written && path == &cfg.drop_in() {
            reload = true;
        }
    }
    m.remove_others(state_dir, &keep)?;
    Ok(reload)
}

/// Ask the controller for a host certificate for the sshd host key.
async fn fetch_cert(
    agent: &Agent,
    cfg: &SshdConfig,
    shutdown: &CancellationToken,
) -> Result<HostCert> {
    let c = cfg.clone();
    let (text, key) = super::super::blocking(move || read_host_key(&c)).await?;
    let mut rpc = agent.link.mesh();
    let call = async {
        rpc.issue_ssh_host_certificate(pb::SshHostCertificateRequest {
            host_public_key: text,
        })
        .await
        .map_err(|s| anyhow::anyhow!("SSH host certificate refused: {}", status_message(&s)))
    };
    let resp = agent.rpc(shutdown, RPC_DEADLINE, call).await?.into_inner();
    parse_host_cert(&resp.certificate, &key)
        .ok_or_else(|| anyhow::anyhow!("the controller's host certificate is not for our host key"))
}

/// The host certificate on disk, if it is ours and for the current host key.
async fn held_cert(cfg: &SshdConfig) -> Option<HostCert> {
    let c = cfg.clone();
    super::super::blocking(move || {
        let (_, key) = read_host_key(&c)?;
        let text = std::fs::read_to_string(c.host_cert())?;
        parse_host_cert(&text, &key).ok_or_else(|| anyhow::anyhow!("not ours"))
    })
    .await
    .ok()
}

/// The `--manage-sshd` job.
pub(super) async fn sshd_loop(agent: Arc<Agent>, cfg: SshdConfig, shutdown: CancellationToken) {
    let mut changes = agent.ssh_changes.subscribe();
    let mut cert = held_cert(&cfg).await;
    loop {
        let now = agent.clock.now();
        let renew = cert
            .as_ref()
            .map(|c| zonemesh_ca::renew_at(c.valid_after, c.valid_before, rand::random::<f64>()));
        if renew.is_none_or(|at| at <= now) {
            match fetch_cert(&agent, &cfg, &shutdown).await {
                Ok(c) => {
                    tracing::info!(valid_until = %humantime::format_rfc3339_seconds(c.valid_before), "SSH host certificate obtained");
                    cert = Some(c);
                }
                Err(_) if shutdown.is_cancelled() => return,
                Err(e) => tracing::warn!(error = %e, "no SSH host certificate yet; retrying"),
            }
        }
        let state = agent.view.lock().ssh.clone();
        let mut failed = cert.is_none();
        if let (Some(c), Some(state)) = (cert.clone(), state) {
            let (a, cfg2) = (agent.clone(), cfg.clone());
            let generation = state.generation;
            let applied = super::super::blocking(move || {
                let reload = apply(&a.opts.state, &cfg2, &a.id.zone, &state, &c)?;
                if reload {
                    run_reload(&cfg2.reload)?;
                }
                Ok(reload)
            })
            .await;
            match applied {
                Ok(reloaded) => {
                    tracing::debug!(generation, reloaded, "sshd configuration applied");
                }
                Err(e) => {
                    failed = true;
                    tracing::error!(error = %e, "sshd configuration not applied");
                }
            }
        }
        let next = match (failed, cert.as_ref()) {
            (true, _) | (_, None) => now + RETRY,
            (false, Some(c)) => {
                zonemesh_ca::renew_at(c.valid_after, c.valid_before, rand::random::<f64>())
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = changes.changed() => if r.is_err() { return },
            _ = agent.clock.alarm(next) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(root: &Path) -> SshdConfig {
        SshdConfig {
            host_key: root.join("ssh_host_ed25519_key"),
            config_dir: root.join("sshd_config.d"),
            files_dir: root.join("zonemesh"),
            reload: "true".into(),
        }
    }

    fn state() -> pb::SshState {
        let g = |zone: &str, principal: &str| pb::SshGrant {
            zone: zone.into(),
            principal: principal.into(),
            certificate_principal: format!("{principal}@{zone}"),
        };
        pb::SshState {
            user_ca_public_key: "ssh-ed25519 AAAA ca".into(),
            grants: vec![
                g("eu", "deploy"),
                g("us", "deploy"),
                g("eu", "ops"),
                g("eu", "../x"),
            ],
            krl: b"SSHKRL\n\0".to_vec(),
            generation: 3,
        }
    }

    #[test]
    fn a_zone_gets_only_its_principals_and_the_drop_in_names_every_file() {
        let c = cfg(Path::new("/s"));
        let files = desired_files(&c, "eu", &state());
        let names: Vec<String> = files.iter().map(|(p, _)| p.display().to_string()).collect();
        assert_eq!(
            names,
            [
                "/s/zonemesh/user_ca.pub",
                "/s/zonemesh/principals/deploy",
                "/s/zonemesh/principals/ops",
                "/s/zonemesh/revoked.krl",
                "/s/sshd_config.d/50-zonemesh.conf"
            ]
        );
        let deploy = String::from_utf8(files[1].1.clone()).unwrap();
        assert!(deploy.ends_with("\ndeploy@eu\n"), "{deploy}");
        assert!(!deploy.contains("@us"));
        let drop_in = String::from_utf8(files[4].1.clone()).unwrap();
        for line in [
            "HostCertificate /s/ssh_host_ed25519_key-cert.pub",
            "TrustedUserCAKeys /s/zonemesh/user_ca.pub",
            "AuthorizedPrincipalsFile /s/zonemesh/principals/%u",
            "RevokedKeys /s/zonemesh/revoked.krl",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
        ] {
            assert!(drop_in.lines().any(|l| l == line), "{line} in {drop_in}");
        }
    }

    #[test]
    fn a_file_the_agent_did_not_write_is_never_replaced_or_removed() {
        let dir = tempfile::tempdir().unwrap();
        let st = StateDir::new(dir.path().join("state"));
        std::fs::create_dir_all(dir.path().join("state")).unwrap();
        let c = cfg(dir.path());
        let mut m = Manifest::default();
        let p = c.drop_in();
        assert!(m.write(&st, &p, b"one").unwrap());
        assert!(
            !m.write(&st, &p, b"one").unwrap(),
            "unchanged: not rewritten"
        );
        assert!(m.write(&st, &p, b"two").unwrap());
        // An operator edits it: from now on it is theirs.
        std::fs::write(&p, b"operator").unwrap();
        let err = m.write(&st, &p, b"three").unwrap_err().to_string();
        assert!(err.contains("did not write it"), "{err}");
        assert_eq!(std::fs::read(&p).unwrap(), b"operator");
        let other = c.files_dir.join("mine");
        std::fs::create_dir_all(&c.files_dir).unwrap();
        std::fs::write(&other, b"hand-made").unwrap();
        assert!(m.write(&st, &other, b"x").is_err());
        // Unmanaging removes only what is still as written.
        let mut m = Manifest::load(&st).unwrap();
        let kept = c.krl();
        m.write(&st, &kept, b"krl").unwrap();
        unmanage(&st).unwrap();
        assert!(!kept.exists());
        assert_eq!(std::fs::read(&p).unwrap(), b"operator");
        assert_eq!(std::fs::read(&other).unwrap(), b"hand-made");
        assert!(Manifest::load(&st).unwrap().files.is_empty());
    }

    #[test]
    fn the_reload_command_reports_its_failure() {
        run_reload("true").unwrap();
        let e = run_reload("echo nope >&2; exit 3").unwrap_err().to_string();
        assert!(e.contains("nope"), "{e}");
    }
}
