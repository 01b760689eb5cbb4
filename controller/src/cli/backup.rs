//! `backup --out FILE` and `restore --from FILE`.

use crate::admin::local::request_within;
use crate::admin::{AdminReply, AdminRequest};
use crate::core::backup;
use crate::secrets::KekSource;
use anyhow::{Context, Result, bail};
use std::path::Path;
use std::time::Duration;

/// A backup of a large store takes longer than an ordinary command.
const BACKUP_TIMEOUT: Duration = Duration::from_secs(600);

/// Ask the controller (or the store, when none runs) for a backup and move it to `out`.
pub async fn backup(dir: &Path, kek: &KekSource, out: &Path, json: bool) -> Result<()> {
    let now = crate::store::unix(std::time::SystemTime::now());
    let file_name = format!("backup-{now}-{:08x}.zmbackup", rand::random::<u32>());
    let req = AdminRequest::Backup { file_name };
    let mut w = match request_within(dir, kek, req, BACKUP_TIMEOUT).await? {
        AdminReply::BackupWritten(w) => w,
        other => bail!("unexpected {} reply from the controller", other.kind()),
    };
    let staged = Path::new(&w.path).to_path_buf();
    move_file(&staged, out)?;
    w.path = out.display().to_string();
    if json {
        println!("{}", serde_json::to_string_pretty(&w)?);
    } else {
        println!(
            "backup written to {}: {} entries in {} trees, {} bytes, {} ms (CA {}, sha256 {})",
            out.display(),
            w.entries,
            w.trees.len(),
            w.bytes,
            w.millis,
            w.ca_fingerprint,
            w.body_sha256
        );
    }
    Ok(())
}

/// Rename, or copy and remove across file systems; the result is 0600.
fn move_file(from: &Path, to: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if std::fs::rename(from, to).is_err() {
        let tmp = to.with_extension("partial");
        std::fs::copy(from, &tmp)
            .with_context(|| format!("copying {} to {}", from.display(), tmp.display()))?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, to).with_context(|| format!("writing {}", to.display()))?;
        let _ = std::fs::remove_file(from);
    }
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("making {} private", to.display()))
}

/// Restore `from` into the new data directory `dir`: into its embedded store, or into the
/// store `store` names (etcd), which the directory then remembers.
pub async fn restore(
    dir: &Path,
    from: &Path,
    store: Option<&str>,
    overwrite: bool,
    json: bool,
) -> Result<()> {
    use crate::core::kv::url::StoreUrl;
    if let Ok(mut entries) = std::fs::read_dir(dir)
        && entries.next().is_some()
    {
        bail!(
            "{} is not empty; restore only into a new or empty data directory",
            dir.display()
        );
    }
    let url = StoreUrl::resolve(store, dir)?;
    if overwrite && url.is_sled() {
        bail!(
            "--overwrite is for an etcd --store; the embedded store is restored only into a new data directory"
        );
    }
    crate::secrets::create_private_dir(dir)?;
    let from2 = from.to_path_buf();
    let started = std::time::Instant::now();
    let header = match url.sled_dir(dir) {
        Some(db) => {
            let header = tokio::task::spawn_blocking(move || backup::restore(&from2, &db))
                .await?
                .with_context(|| format!("restoring {}", from.display()))?;
            if let Some(db) = url.sled_dir(dir) {
                crate::secrets::create_private_dir(&db)?;
            }
            header
        }
        None => {
            let (u, d) = (url.clone(), dir.to_path_buf());
            let header = tokio::task::spawn_blocking(move || -> Result<_> {
                let kv = u.open(&d)?;
                Ok(backup::restore_into(&from2, &kv, overwrite)?)
            })
            .await?
            .with_context(|| format!("restoring {} into {url}", from.display()))?;
            url.save(dir)?;
            header
        }
    };
    let millis = started.elapsed().as_millis() as u64;
    if json {
        let v = serde_json::json!({
            "data_dir": dir.display().to_string(),
            "store": url.to_string(),
            "format": header.format,
            "ca_fingerprint": header.ca_fingerprint,
            "created_unix": header.created_unix,
            "trees": header.trees,
            "entries": header.entries(),
            "millis": millis,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "restored {} entries in {} trees into {} in {} ms (CA {})",
            header.entries(),
            header.trees.len(),
            if url.is_sled() {
                dir.display().to_string()
            } else {
                format!("{url} (for {})", dir.display())
            },
            millis,
            header.ca_fingerprint
        );
        println!(
            "the backup holds no KEK and no pepper: put the same ones in {}/secrets/ (kek, pepper) or set ZONEMESH_KEK / ZONEMESH_PEPPER before `serve`",
            dir.display()
        );
    }
    Ok(())
}
