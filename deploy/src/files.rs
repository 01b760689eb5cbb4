//! Certificates as files for a web server that already runs (nginx, HAProxy):
//! `DIR/<domain>/fullchain.pem` (leaf then chain), `privkey.pem` (mode 0600) and
//! `ocsp.der` (the current staple, absent when there is none), each written atomically
//! with [`crate::write_atomic`] in a directory of mode 0700, then the reload command.
//!
//! Writing is blocking (the caller runs it on the blocking pool); the reload command runs
//! as a child process with a deadline.

use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long the reload command may take.
pub const RELOAD_TIMEOUT: Duration = Duration::from_secs(30);
/// How much of the reload command's output is kept for the error.
const OUTPUT_KEPT: usize = 400;

/// Where to write and what to run afterwards.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FilesConfig {
    /// The directory holding one subdirectory per domain.
    pub dir: PathBuf,
    /// Run with `sh -c` after files changed; exit status 0 is success.
    pub reload: Option<String>,
}

/// Why files could not be written or the server not reloaded.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    /// The domain is not a DNS name that is safe as a directory name.
    #[error("refusing domain {0:?}: not a valid DNS name")]
    BadDomain(String),
    /// A path is not what it must be (a symlink, not a directory...).
    #[error("{path}: {reason}")]
    Unsafe { path: PathBuf, reason: &'static str },
    /// An I/O failure.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The reload command failed.
    #[error("reload command {status}{}", if output.is_empty() { String::new() } else { format!(": {output}") })]
    Reload { status: String, output: String },
}

/// Whether `name` is a DNS host name we serve and write under: lower-case LDH labels of
/// 1 to 63 characters, not starting or ending with `-`, at most 253 characters in all.
/// No wildcard, no `/`, no `..`.
pub fn is_valid_domain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> FilesError + '_ {
    move |source| FilesError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes one directory per domain under [`FilesConfig::dir`].
#[derive(Clone, Debug)]
pub struct FilesWriter {
    config: FilesConfig,
}

impl FilesWriter {
    /// A writer for `config`; the directory must exist and be a directory (blocking).
    ///
    /// # Errors
    /// The directory is missing, a symlink or not a directory.
    pub fn new(config: FilesConfig) -> Result<Self, FilesError> {
        let meta = std::fs::symlink_metadata(&config.dir).map_err(io_at(&config.dir))?;
        if !meta.is_dir() {
            return Err(FilesError::Unsafe {
                path: config.dir.clone(),
                reason: "not a directory",
            });
        }
        Ok(Self { config })
    }

    /// The configuration.
    pub fn config(&self) -> &FilesConfig {
        &self.config
    }

    /// The directory of `domain`, created 0700 if missing; never through a symlink.
    fn domain_dir(&self, domain: &str) -> Result<PathBuf, FilesError> {
        if !is_valid_domain(domain) {
            return Err(FilesError::BadDomain(domain.into()));
        }
        let dir = self.config.dir.join(domain);
        match std::fs::symlink_metadata(&dir) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(FilesError::Unsafe {
                    path: dir,
                    reason: "is a symlink; refusing to follow it",
                });
            }
            Ok(m) if !m.is_dir() => {
                return Err(FilesError::Unsafe {
                    path: dir,
                    reason: "not a directory",
                });
            }
            Ok(m) => {
                if m.permissions().mode() & 0o777 != 0o700 {
                    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
                        .map_err(io_at(&dir))?;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                std::fs::DirBuilder::new()
                    .mode(0o700)
                    .create(&dir)
                    .map_err(io_at(&dir))?;
            }
            Err(e) => return Err(io_at(&dir)(e)),
        }
        Ok(dir)
    }

    /// Write `domain`'s chain, key and staple (blocking). The staple file is removed when
    /// there is none, so a server never staples a response for the previous certificate.
    ///
    /// # Errors
    /// A bad domain name, an unsafe path, an I/O failure.
    pub fn write_certificate(
        &self,
        domain: &str,
        chain_der: &[Vec<u8>],
        key_pkcs8_der: &[u8],
        staple: Option<&[u8]>,
    ) -> Result<(), FilesError> {
        let dir = self.domain_dir(domain)?;
        let fullchain: String = chain_der
            .iter()
            .map(|c| zonemesh_ca::to_pem("CERTIFICATE", c))
            .collect();
        let key = zeroize::Zeroizing::new(zonemesh_ca::to_pem("PRIVATE KEY", key_pkcs8_der));
        let write = |name: &str, bytes: &[u8], mode: u32| {
            let path = dir.join(name);
            crate::write_atomic(&path, bytes, mode).map_err(io_at(&path))
        };
        // The key first: a server reloading in between sees the old pair or a new key
        // with the old chain, and the chain follows at once.
        write("privkey.pem", key.as_bytes(), 0o600)?;
        write("fullchain.pem", fullchain.as_bytes(), 0o644)?;
        self.write_staple(domain, staple).map(|_| ())
    }

    /// Write (or remove) `domain`'s `ocsp.der` (blocking); true when the file changed.
    ///
    /// # Errors
    /// A bad domain name, an unsafe path, an I/O failure.
    pub fn write_staple(&self, domain: &str, staple: Option<&[u8]>) -> Result<bool, FilesError> {
        let dir = self.domain_dir(domain)?;
        let path = dir.join("ocsp.der");
        let current = match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_file() => Some(std::fs::read(&path).map_err(io_at(&path))?),
            Ok(_) => None,
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_at(&path)(e)),
        };
        match staple {
            Some(bytes) if current.as_deref() == Some(bytes) => Ok(false),
            Some(bytes) => {
                crate::write_atomic(&path, bytes, 0o644).map_err(io_at(&path))?;
                Ok(true)
            }
            None => match std::fs::remove_file(&path) {
                Ok(()) => Ok(true),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
                Err(e) => Err(io_at(&path)(e)),
            },
        }
    }

    /// Run the reload command, if any, with `sh -c` within [`RELOAD_TIMEOUT`].
    ///
    /// # Errors
    /// The command could not start, exited non-zero or took too long.
    pub async fn reload(&self) -> Result<(), FilesError> {
        let Some(cmd) = &self.config.reload else {
            return Ok(());
        };
        let child = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| FilesError::Reload {
                status: "could not start".into(),
                output: e.to_string(),
            })?;
        let out = match tokio::time::timeout(RELOAD_TIMEOUT, child.wait_with_output()).await {
            Ok(Ok(out)) => out,
            Ok(Err(e)) => {
                return Err(FilesError::Reload {
                    status: "failed".into(),
                    output: e.to_string(),
                });
            }
            Err(_) => {
                return Err(FilesError::Reload {
                    status: format!("did not finish within {RELOAD_TIMEOUT:?}"),
                    output: String::new(),
                });
            }
        };
        if out.status.success() {
            return Ok(());
        }
        let mut text = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if text.is_empty() {
            text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        }
        if text.len() > OUTPUT_KEPT {
            let mut cut = text.len() - OUTPUT_KEPT;
            while !text.is_char_boundary(cut) {
                cut += 1;
            }
            text = format!("...{}", &text[cut..]);
        }
        Err(FilesError::Reload {
            status: match out.status.code() {
                Some(c) => format!("exited with status {c}"),
                None => "was killed by a signal".into(),
            },
            output: text,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_names_that_could_escape_the_directory_are_refused() {
        for ok in ["portal.example.test", "a-b.c0.test", "localhost"] {
            assert!(is_valid_domain(ok), "{ok}");
        }
        for bad in [
            "",
            "..",
            "../etc",
            "a/b",
            "a..b",
            ".a",
            "a.",
            "*.example.test",
            "Portal.example.test",
            "-a.test",
            "a_b.test",
            &"a".repeat(64),
        ] {
            assert!(!is_valid_domain(bad), "{bad}");
        }
        let d = tempfile::tempdir().unwrap();
        let w = FilesWriter::new(FilesConfig {
            dir: d.path().into(),
            reload: None,
        })
        .unwrap();
        assert!(matches!(
            w.write_certificate("../x", &[vec![1]], b"k", None),
            Err(FilesError::BadDomain(_))
        ));
    }

    #[tokio::test]
    async fn a_failing_reload_command_is_reported_with_its_output() {
        let d = tempfile::tempdir().unwrap();
        let w = FilesWriter::new(FilesConfig {
            dir: d.path().into(),
            reload: Some("echo 'nginx: [emerg] bad config' >&2; exit 3".into()),
        })
        .unwrap();
        let e = w.reload().await.unwrap_err().to_string();
        assert!(e.contains("status 3") && e.contains("bad config"), "{e}");
    }
}
