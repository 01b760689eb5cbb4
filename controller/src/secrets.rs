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

/// Write a file atomically: temporary file, fsync, rename, fsync of the directory.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("out"),
        std::process::id()
    ));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("writing {}", path.display()))
}
