//! `backup`: a copy of the store written inside the data directory, for the CLI to move.

use super::AdminHandler;
use super::proto::{AdminReply, BackupWritten};
use crate::core::backup;
use crate::error::{ControllerError, Result};
use std::time::{Instant, SystemTime};

/// Where backups are staged before the CLI moves them to `--out`.
pub const BACKUP_DIR: &str = "backups";

impl AdminHandler {
    pub(super) fn backup(&self, file_name: &str, now: SystemTime) -> Result<AdminReply> {
        let plain = !file_name.is_empty()
            && file_name.len() <= 128
            && file_name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            && !file_name.starts_with('.');
        if !plain {
            return Err(ControllerError::BadRequest(
                "backup file name must be a plain file name".into(),
            ));
        }
        let dir = self.data_dir.join(BACKUP_DIR);
        crate::secrets::create_private_dir(&dir)
            .map_err(|e| ControllerError::BadRequest(format!("{e:#}")))?;
        let out = dir.join(file_name);
        let fingerprint = zonemesh_ca::fingerprint_sha256(self.auth.ca().root_der());
        let started = Instant::now();
        let h = backup::write_backup(
            self.auth.store().kv(),
            &fingerprint,
            crate::store::unix(now),
            &out,
        )?;
        let bytes = std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
        self.note(
            "store.backup",
            file_name,
            format!("{} entries, {bytes} bytes", h.entries()),
        );
        Ok(AdminReply::BackupWritten(BackupWritten {
            path: out.display().to_string(),
            format: h.format,
            ca_fingerprint: h.ca_fingerprint.clone(),
            entries: h.entries(),
            trees: h.trees,
            bytes,
            body_sha256: h.body_sha256,
            millis: started.elapsed().as_millis() as u64,
        }))
    }
}
