//! Secrets kept outside the database: the key-encryption key that seals the CA keys.

use anyhow::{Context, Result, bail};
use base64::Engine;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use zonemesh_ca::Kek;

/// Environment variable that carries the KEK (base64 of 32 bytes) instead of a file.
pub const KEK_ENV: &str = "ZONEMESH_KEK";

/// Where the KEK comes from.
#[derive(Clone, Debug)]
pub struct KekSource {
    pub file: PathBuf,
}

impl KekSource {
    /// The default: `<data-dir>/secrets/kek`, beside but outside the database directory.
    pub fn new(data_dir: &Path, file: Option<PathBuf>) -> Self {
        Self {
            file: file.unwrap_or_else(|| data_dir.join("secrets").join("kek")),
        }
    }

    /// Load the KEK from the environment or the secrets file.
    pub fn load(&self) -> Result<Kek> {
        if let Ok(v) = std::env::var(KEK_ENV) {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(v.trim())
                .context("ZONEMESH_KEK is not base64")?;
            return Ok(Kek::from_bytes(&bytes)?);
        }
        let meta = std::fs::metadata(&self.file).with_context(|| {
            format!(
                "key-encryption key {} not found (set {KEK_ENV} or --kek-file)",
                self.file.display()
            )
        })?;
        if meta.permissions().mode() & 0o077 != 0 {
            bail!(
                "key-encryption key {} must not be readable by group or others (chmod 600)",
                self.file.display()
            );
        }
        let text = std::fs::read_to_string(&self.file)
            .with_context(|| format!("reading {}", self.file.display()))?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .context("key-encryption key file is not base64")?;
        Ok(Kek::from_bytes(&bytes)?)
    }

    /// Create a new KEK: from the environment if set (nothing is written), else a fresh
    /// random key written to the secrets file (mode 0600, refusing to overwrite).
    pub fn create(&self) -> Result<Kek> {
        if std::env::var_os(KEK_ENV).is_some() {
            return self.load();
        }
        let kek = Kek::generate();
        let encoded = base64::engine::general_purpose::STANDARD.encode(kek.as_bytes());
        write_secret_file(&self.file, encoded.as_bytes())?;
        Ok(kek)
    }
}

/// Make everything this process creates private to its user (files 0600, directories
/// 0700): the data directory holds the audit log, password hashes and sealed keys.
pub fn private_umask() {
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
}

/// Create `dir` (and its parents) if needed and make it 0700.
pub fn create_private_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("making {} private", dir.display()))
}

/// Refuse a directory that group or others can read, write or enter, with the command
/// that fixes it.
pub fn check_private_dir(dir: &Path, what: &str) -> Result<()> {
    let meta = std::fs::metadata(dir).with_context(|| format!("reading {}", dir.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        bail!(
            "{what} {} is accessible by group or others (mode {mode:o}); run `chmod 700 {}`",
            dir.display(),
            dir.display()
        );
    }
    Ok(())
}

/// Write a secret atomically with mode 0600 (its directory 0700); never overwrites.
pub fn write_secret_file(path: &Path, contents: &[u8]) -> Result<()> {
    if path.exists() {
        bail!(
            "{} already exists; refusing to overwrite a secret",
            path.display()
        );
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(contents)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Write a file atomically with `mode` (the shared writer in `zonemesh-deploy`).
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    Ok(zonemesh_deploy::write_atomic(path, contents, mode)?)
}
