//! The one atomic file writer: a fresh temporary file beside the target (random name,
//! created exclusively, never through a symlink), fsync, rename, fsync of the directory.
//! A crash leaves either the old contents or the new, and a link planted beside the target
//! by another local user can neither redirect nor truncate anything.
//!
//! This does blocking I/O: async callers run it on the blocking pool.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Write `contents` to `path` atomically, creating it with `mode`.
///
/// # Errors
/// Any I/O failure, with the path in the message; the temporary file is removed.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("out");
    let with_path = |e: std::io::Error, what: &str| {
        std::io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
    };
    let mut created = None;
    for _ in 0..8 {
        let tmp = dir.join(format!(".{name}.{:016x}.tmp", rand::random::<u64>()));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(mode)
            .open(&tmp)
        {
            Ok(f) => {
                created = Some((tmp, f));
                break;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(with_path(e, "creating a temporary file for")),
        }
    }
    let Some((tmp, mut f)) = created else {
        return Err(std::io::Error::other(format!(
            "no free temporary name for {}",
            path.display()
        )));
    };
    let result = (|| {
        f.write_all(contents)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(|e| with_path(e, "writing"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn never_follows_a_planted_symlink_and_leaves_no_temporary_file() {
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let target = d.path().join("state.json");
        for n in [
            format!(".state.json.tmp{}", std::process::id()),
            ".state.json.tmp".to_string(),
        ] {
            std::os::unix::fs::symlink(&victim, d.path().join(n)).unwrap();
        }
        write_atomic(&target, b"new contents", 0o600).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert_eq!(std::fs::read(&target).unwrap(), b"new contents");
        let meta = std::fs::symlink_metadata(&target).unwrap();
        assert!(meta.file_type().is_file());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let left: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".tmp") && !n.starts_with(".state.json.tmp"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn a_missing_directory_is_an_error_naming_the_path() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("nope/file");
        let e = write_atomic(&target, b"x", 0o600).unwrap_err();
        assert!(e.to_string().contains("nope/file"), "{e}");
    }
}
