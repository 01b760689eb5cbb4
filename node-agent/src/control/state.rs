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
    pub controller: String,
    pub ca_fingerprint: String,
    pub trust_domain: String,
    pub zone: String,
    pub node: String,
    pub spiffe_id: String,
    pub overlay_ip: String,
    pub zone_cidr: String,
    pub endpoints: Vec<String>,
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
        let pem =
            Zeroizing::new(std::fs::read_to_string(self.node_key()).context("reading node key")?);
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

    /// The pinned CA root (DER).
    pub fn read_ca(&self) -> Result<Vec<u8>> {
        Ok(Self::read_pem_certs(&self.ca())?.remove(0))
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
