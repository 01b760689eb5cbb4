//! The agent's state directory: keys (mode 0600, never sent anywhere), certificates and
//! the identity the controller assigned.

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;
use x509_parser::prelude::{FromDer, X509Certificate};
use zeroize::Zeroizing;

/// What the controller assigned at enrollment, plus where to reach it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Identity {
    /// The controller enrolled through (the first of `controllers` when there are several).
    pub controller: String,
    /// Every controller address given at enrollment (`--controller A,B,C`), in the order
    /// they are tried; empty in identities written before several were supported.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub controllers: Vec<String>,
    pub ca_fingerprint: String,
    pub trust_domain: String,
    pub zone: String,
    pub node: String,
    pub spiffe_id: String,
    pub overlay_ip: String,
    pub zone_cidr: String,
    pub endpoints: Vec<String>,
}

impl Identity {
    /// The controller addresses in the order they are tried (at least one).
    pub fn controller_addrs(&self) -> Vec<String> {
        if self.controllers.is_empty() {
            vec![self.controller.clone()]
        } else {
            self.controllers.clone()
        }
    }
}

/// Split `--controller A,B,C` into its addresses (each HOST:PORT, no duplicates).
pub fn parse_controllers(list: &str) -> Result<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    for a in list.split(',').map(str::trim).filter(|a| !a.is_empty()) {
        if a.rsplit_once(':')
            .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
        {
            bail!("--controller {a:?} must be HOST:PORT");
        }
        if !out.iter().any(|o| o == a) {
            out.push(a.to_string());
        }
    }
    if out.is_empty() {
        bail!("--controller needs at least one HOST:PORT");
    }
    Ok(out)
}

/// Paths inside a state directory.
#[derive(Clone, Debug)]
pub struct StateDir {
    pub dir: PathBuf,
}

impl StateDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }
    pub fn node_key(&self) -> PathBuf {
        self.dir.join("node.key")
    }
    pub fn wg_key(&self) -> PathBuf {
        self.dir.join("wg.key")
    }
    pub fn cert(&self) -> PathBuf {
        self.dir.join("node.crt")
    }
    pub fn chain(&self) -> PathBuf {
        self.dir.join("chain.pem")
    }
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }
    pub fn identity_file(&self) -> PathBuf {
        self.dir.join("identity.json")
    }
    /// Extra log sources (see the README).
    pub fn sources_file(&self) -> PathBuf {
        self.dir.join("sources.toml")
    }
    pub fn mesh_file(&self) -> PathBuf {
        self.dir.join("mesh.pb")
    }
    pub fn status_socket(&self) -> PathBuf {
        self.dir.join("agent.sock")
    }
    /// A rotated node key written before its certificate, renamed over `node.key` after.
    pub fn node_key_next(&self) -> PathBuf {
        self.dir.join("node.key.next")
    }
    /// Renewals since the node key was last replaced (for `--rotate-key-every`).
    pub fn key_renewals_file(&self) -> PathBuf {
        self.dir.join("key-renewals")
    }

    /// Create the directory with mode 0700.
    pub fn create(&self) -> Result<()> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700))?;
        Ok(())
    }

    pub fn is_enrolled(&self) -> bool {
        self.identity_file().exists()
    }

    pub fn identity(&self) -> Result<Identity> {
        let p = self.identity_file();
        let text = std::fs::read_to_string(&p).with_context(|| {
            format!(
                "{} is not an enrolled state directory (run `zonemesh-agent enroll` first)",
                self.dir.display()
            )
        })?;
        serde_json::from_str(&text).with_context(|| format!("{} is corrupt", p.display()))
    }

    /// The node's RSA private key (PKCS#8 DER).
    pub fn read_node_key(&self) -> Result<Zeroizing<Vec<u8>>> {
        if self.node_key_next().exists() {
            self.finish_key_rotation()?;
        }
        Self::read_key_file(&self.node_key())
    }

    fn read_key_file(path: &Path) -> Result<Zeroizing<Vec<u8>>> {
        let pem = Zeroizing::new(std::fs::read_to_string(path).context("reading node key")?);
        let der = zonemesh_ca::pem_blocks("PRIVATE KEY", &pem)?
            .into_iter()
            .next()
            .context("node.key holds no PRIVATE KEY")?;
        Ok(Zeroizing::new(der))
    }

    /// The WireGuard private key (32 bytes).
    pub fn read_wg_key(&self) -> Result<Zeroizing<[u8; 32]>> {
        use base64::Engine;
        let text = Zeroizing::new(
            std::fs::read_to_string(self.wg_key()).context("reading WireGuard key")?,
        );
        let bytes = Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .decode(text.trim())
                .context("wg.key is not base64")?,
        );
        let arr: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .context("wg.key must hold 32 bytes")?;
        Ok(Zeroizing::new(arr))
    }

    fn read_pem_certs(path: &Path) -> Result<Vec<Vec<u8>>> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let certs = zonemesh_ca::pem_blocks("CERTIFICATE", &text)?;
        if certs.is_empty() {
            bail!("{} holds no certificate", path.display());
        }
        Ok(certs)
    }

    /// The node certificate (DER).
    pub fn read_cert(&self) -> Result<Vec<u8>> {
        Ok(Self::read_pem_certs(&self.cert())?.remove(0))
    }

    /// The chain above the node certificate (DER).
    pub fn read_chain(&self) -> Result<Vec<Vec<u8>>> {
        Self::read_pem_certs(&self.chain())
    }

    /// The pinned CA root (DER): the first of the pinned roots.
    pub fn read_ca(&self) -> Result<Vec<u8>> {
        Ok(Self::read_pem_certs(&self.ca())?.remove(0))
    }

    /// Every pinned CA root (DER): one, or two while a root rotation's grace runs.
    pub fn read_pinned_roots(&self) -> Result<Vec<Vec<u8>>> {
        Self::read_pem_certs(&self.ca())
    }

    /// Pin `roots` (not empty; the first is the one `identity.json` names by fingerprint):
    /// `ca.crt` first, then the identity.
    pub fn write_pinned_roots(&self, roots: &[Vec<u8>]) -> Result<()> {
        let first = roots.first().context("refusing to pin no root at all")?;
        let mut pem = String::new();
        for r in roots {
            pem.push_str(&zonemesh_ca::to_pem("CERTIFICATE", r));
        }
        write_file(&self.ca(), pem.as_bytes(), 0o644)?;
        let mut id = self.identity()?;
        let fp = zonemesh_ca::fingerprint_sha256(first);
        if id.ca_fingerprint != fp {
            id.ca_fingerprint = fp;
            write_file(
                &self.identity_file(),
                serde_json::to_string_pretty(&id)?.as_bytes(),
                0o644,
            )?;
        }
        Ok(())
    }

    /// Replace key, certificate and chain after a key rotation. The new key is written
    /// beside the old one first, then the certificate, then the key is renamed into place;
    /// a crash in between is finished by [`StateDir::finish_key_rotation`] on the next read,
    /// so the stored key always matches the stored certificate.
    pub fn write_rotated(
        &self,
        key_pkcs8: &[u8],
        cert_der: &[u8],
        chain: &[Vec<u8>],
    ) -> Result<()> {
        let pem = Zeroizing::new(zonemesh_ca::to_pem("PRIVATE KEY", key_pkcs8));
        write_file(&self.node_key_next(), pem.as_bytes(), 0o600)?;
        self.write_cert(cert_der, chain)?;
        std::fs::rename(self.node_key_next(), self.node_key())
            .context("moving the rotated node key into place")?;
        Ok(())
    }

    /// A `node.key.next` left by an interrupted rotation: kept if the stored certificate is
    /// for it (the certificate was written), dropped if not (it never was).
    pub fn finish_key_rotation(&self) -> Result<()> {
        use rcgen::PublicKeyData;
        let next = self.node_key_next();
        let key = Self::read_key_file(&next)?;
        let pair = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(
            &rustls_pki_types::PrivatePkcs8KeyDer::from(key.to_vec()),
            &rcgen::PKCS_RSA_SHA256,
        )
        .context("node.key.next")?;
        let cert = self.read_cert()?;
        let (_, c) = X509Certificate::from_der(&cert).context("parsing node.crt")?;
        if c.public_key().raw == pair.subject_public_key_info().as_slice() {
            std::fs::rename(&next, self.node_key()).context("finishing a key rotation")?;
            tracing::info!("finished an interrupted node key rotation");
        } else {
            std::fs::remove_file(&next).context("dropping an unused rotated key")?;
        }
        Ok(())
    }

    /// Renewals since the node key was last replaced (0 when never counted).
    pub fn renewals_since_key(&self) -> u32 {
        std::fs::read_to_string(self.key_renewals_file())
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Record the renewals since the node key was last replaced.
    pub fn set_renewals_since_key(&self, n: u32) -> Result<()> {
        write_file(
            &self.key_renewals_file(),
            format!("{n}\n").as_bytes(),
            0o644,
        )
    }

    /// Replace the certificate and chain (the key stays).
    pub fn write_cert(&self, cert_der: &[u8], chain: &[Vec<u8>]) -> Result<()> {
        let mut chain_pem = String::new();
        for c in chain {
            chain_pem.push_str(&zonemesh_ca::to_pem("CERTIFICATE", c));
        }
        write_file(&self.chain(), chain_pem.as_bytes(), 0o644)?;
        write_file(
            &self.cert(),
            zonemesh_ca::to_pem("CERTIFICATE", cert_der).as_bytes(),
            0o644,
        )
    }
}

/// Serial and validity read from a certificate.
#[derive(Clone, Debug)]
pub struct CertInfo {
    pub serial_hex: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

pub fn cert_info(der: &[u8]) -> Result<CertInfo> {
    let (_, c) = X509Certificate::from_der(der).context("parsing certificate")?;
    let t = |ts: i64| {
        SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(u64::try_from(ts).unwrap_or(0))
    };
    Ok(CertInfo {
        serial_hex: zonemesh_ca::serial_hex(c.raw_serial()),
        not_before: t(c.validity().not_before.timestamp()),
        not_after: t(c.validity().not_after.timestamp()),
    })
}

/// Write a file atomically with `mode` (the shared writer in `zonemesh-deploy`).
pub fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    Ok(zonemesh_deploy::write_atomic(path, contents, mode)?)
}
