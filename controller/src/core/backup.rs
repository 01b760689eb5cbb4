//! Backups of the controller's store: every tree (sled or etcd), copied while the controller runs,
//! into one file with a header (format version, CA fingerprint, entry counts, SHA-256 of
//! the body), and restored into an empty data directory.
//!
//! What is in it: every tree of the database, found by name, so trees added later are
//! covered without a change here. CA and portal keys stay as the store holds them, sealed
//! under the KEK. What is never in it: the KEK and the pepper, which live outside the
//! database (`secrets/` or the environment); the restored controller needs the same ones.
//!
//! Consistency: each tree is read in one pass after a flush; every write acknowledged
//! before the backup began is in it. Writes made while it runs may be in it or not.
//!
//! File layout: one JSON header line, then the body: for each tree `T` + name, then its
//! entries `E` + key + value (lengths as big-endian u32), then `Z`.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::Path;

/// The backup format this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
const MAGIC: &str = "zonemesh-backup";
/// Largest key or value accepted when reading (sled values here are far smaller).
const MAX_ITEM: u32 = 64 * 1024 * 1024;

/// Why a backup could not be taken or restored.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("database: {0}")]
    Db(#[from] sled::Error),
    #[error("store: {0}")]
    Kv(#[from] crate::core::kv::KvError),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("not a zonemesh backup: {0}")]
    Format(String),
    #[error("backup format {0} is not supported by this version (it reads {FORMAT_VERSION})")]
    Version(u32),
    #[error("backup is damaged: checksum {found} does not match the header's {expected}")]
    Checksum { expected: String, found: String },
    #[error("{0} is not empty; restore only into a new or empty directory")]
    NotEmpty(String),
    #[error(
        "the store {url} already holds data (trees: {trees}); restore only into an empty store (pass --overwrite to write over it)"
    )]
    StoreNotEmpty { url: String, trees: String },
}

/// One tree of a backup and how many entries it holds.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TreeCount {
    pub name: String,
    pub entries: u64,
}

/// The first line of a backup file.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct BackupHeader {
    pub magic: String,
    pub format: u32,
    pub created_unix: u64,
    /// SHA-256 of the CA root certificate, hex.
    pub ca_fingerprint: String,
    pub trees: Vec<TreeCount>,
    pub body_bytes: u64,
    pub body_sha256: String,
}

impl BackupHeader {
    /// Entries in every tree.
    pub fn entries(&self) -> u64 {
        self.trees.iter().map(|t| t.entries).sum()
    }
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> BackupError {
    let path = path.display().to_string();
    move |source| BackupError::Io { what, path, source }
}

/// Writes the body and hashes it on the way.
struct Hashing<W> {
    inner: W,
    hash: Sha256,
    bytes: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn put_item(w: &mut impl Write, tag: u8, bytes: &[u8]) -> std::io::Result<()> {
    let len = u32::try_from(bytes.len())
        .map_err(|_| std::io::Error::other("a record larger than 4 GiB"))?;
    w.write_all(&[tag])?;
    w.write_all(&len.to_be_bytes())?;
    w.write_all(bytes)
}

/// Write a backup of every tree of the store `db` to `out` (created with mode 0600, replaced
/// atomically), via a body file beside it. Blocking: run it on the blocking pool.
pub fn write_backup(
    db: &crate::core::kv::Kv,
    ca_fingerprint: &str,
    now_unix: u64,
    out: &Path,
) -> Result<BackupHeader, BackupError> {
    use std::os::unix::fs::OpenOptionsExt;
    db.flush()?;
    let body_path = out.with_extension("body.tmp");
    let open = |p: &Path| {
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(p)
    };
    let body = open(&body_path).map_err(io("creating", &body_path))?;
    let mut w = Hashing {
        inner: BufWriter::new(body),
        hash: Sha256::new(),
        bytes: 0,
    };
    let mut trees = Vec::new();
    let mut names = db.tree_names()?;
    names.sort();
    let werr = io("writing", &body_path);
    let written: std::io::Result<()> = (|| {
        for name in names {
            let tree = db.open_tree(&name).map_err(std::io::Error::other)?;
            put_item(&mut w, b'T', name.as_bytes())?;
            let mut entries = 0u64;
            for item in tree.iter() {
                let (k, v) = item.map_err(std::io::Error::other)?;
                put_item(&mut w, b'E', &k)?;
                w.write_all(&(v.len() as u32).to_be_bytes())?;
                w.write_all(&v)?;
                entries += 1;
            }
            trees.push(TreeCount {
                name: name.clone(),
                entries,
            });
        }
        w.write_all(b"Z")?;
        w.flush()
    })();
    written.map_err(werr)?;
    let Hashing {
        inner,
        hash,
        bytes: body_bytes,
    } = w;
    drop(inner);
    let header = BackupHeader {
        magic: MAGIC.into(),
        format: FORMAT_VERSION,
        created_unix: now_unix,
        ca_fingerprint: ca_fingerprint.into(),
        trees,
        body_bytes,
        body_sha256: hex::encode(hash.finalize()),
    };
    let tmp = out.with_extension("tmp");
    let result = (|| {
        let mut f = BufWriter::new(open(&tmp)?);
        let mut line = serde_json::to_vec(&header).map_err(std::io::Error::other)?;
        line.push(b'\n');
        f.write_all(&line)?;
        std::io::copy(&mut std::fs::File::open(&body_path)?, &mut f)?;
        let f = f.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        std::fs::rename(&tmp, out)
    })();
    let _ = std::fs::remove_file(&body_path);
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io("writing", out))?;
    Ok(header)
}

/// Read and check a backup's header (without reading the body).
pub fn read_header(path: &Path) -> Result<BackupHeader, BackupError> {
    let f = std::fs::File::open(path).map_err(io("opening", path))?;
    let mut r = BufReader::new(f);
    header_of(&mut r, path)
}

fn header_of(r: &mut impl BufRead, path: &Path) -> Result<BackupHeader, BackupError> {
    let mut line = Vec::new();
    r.by_ref()
        .take(1024 * 1024)
        .read_until(b'\n', &mut line)
        .map_err(io("reading", path))?;
    let h: BackupHeader =
        serde_json::from_slice(&line).map_err(|e| BackupError::Format(format!("header: {e}")))?;
    if h.magic != MAGIC {
        return Err(BackupError::Format(format!("magic {:?}", h.magic)));
    }
    if h.format != FORMAT_VERSION {
        return Err(BackupError::Version(h.format));
    }
    Ok(h)
}

/// Check a backup's checksum and entry counts without writing anything.
pub fn verify(path: &Path) -> Result<BackupHeader, BackupError> {
    read_body(path, |_, _, _| Ok(()))
}

/// Read the body, calling `each(tree, key, value)` per entry, and check it completely
/// (checksum, counts, framing) before returning.
fn read_body(
    path: &Path,
    mut each: impl FnMut(&[u8], Vec<u8>, Vec<u8>) -> Result<(), BackupError>,
) -> Result<BackupHeader, BackupError> {
    let f = std::fs::File::open(path).map_err(io("opening", path))?;
    let mut r = BufReader::new(f);
    let header = header_of(&mut r, path)?;
    // Hash the whole body first: nothing is applied from a damaged file.
    let mut hash = Sha256::new();
    let mut n = 0u64;
    loop {
        let buf = r.fill_buf().map_err(io("reading", path))?;
        if buf.is_empty() {
            break;
        }
        hash.update(buf);
        n += buf.len() as u64;
        let len = buf.len();
        r.consume(len);
    }
    let found = hex::encode(hash.finalize());
    if found != header.body_sha256 || n != header.body_bytes {
        return Err(BackupError::Checksum {
            expected: header.body_sha256,
            found,
        });
    }
    let f = std::fs::File::open(path).map_err(io("opening", path))?;
    let mut r = BufReader::new(f);
    header_of(&mut r, path)?;
    let bad = |m: &str| BackupError::Format(m.to_string());
    let mut counts: Vec<TreeCount> = Vec::new();
    let mut tree: Option<Vec<u8>> = None;
    loop {
        let mut tag = [0u8; 1];
        r.read_exact(&mut tag).map_err(io("reading", path))?;
        match tag[0] {
            b'Z' => break,
            b'T' => {
                let name = read_item(&mut r, path)?;
                counts.push(TreeCount {
                    name: String::from_utf8_lossy(&name).into_owned(),
                    entries: 0,
                });
                tree = Some(name);
            }
            b'E' => {
                let t = tree.as_deref().ok_or_else(|| bad("entry before a tree"))?;
                let k = read_item(&mut r, path)?;
                let v = read_item(&mut r, path)?;
                each(t, k, v)?;
                if let Some(c) = counts.last_mut() {
                    c.entries += 1;
                }
            }
            _ => return Err(bad("unknown record tag")),
        }
    }
    if counts != header.trees {
        return Err(bad("tree entry counts differ from the header"));
    }
    Ok(header)
}

fn read_item(r: &mut impl Read, path: &Path) -> Result<Vec<u8>, BackupError> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).map_err(io("reading", path))?;
    let len = u32::from_be_bytes(len);
    if len > MAX_ITEM {
        return Err(BackupError::Format("a record larger than the limit".into()));
    }
    let mut buf = vec![0u8; len as usize];
    r.read_exact(&mut buf).map_err(io("reading", path))?;
    Ok(buf)
}

/// Restore the backup at `from` into the sled database directory `db_dir`, which must not
/// exist or be empty. The checksum is checked before anything is written.
pub fn restore(from: &Path, db_dir: &Path) -> Result<BackupHeader, BackupError> {
    if let Ok(mut entries) = std::fs::read_dir(db_dir)
        && entries.next().is_some()
    {
        return Err(BackupError::NotEmpty(db_dir.display().to_string()));
    }
    verify(from)?;
    let db = sled::Config::new().path(db_dir).open()?;
    let mut batch: Option<(Vec<u8>, sled::Batch, usize)> = None;
    let apply =
        |db: &sled::Db, b: Option<(Vec<u8>, sled::Batch, usize)>| -> Result<(), BackupError> {
            if let Some((name, batch, _)) = b {
                db.open_tree(name)?.apply_batch(batch)?;
            }
            Ok(())
        };
    let header = read_body(from, |tree, k, v| {
        if batch
            .as_ref()
            .is_some_and(|(n, _, c)| n != tree || *c >= 10_000)
        {
            apply(&db, batch.take())?;
        }
        let (_, b, c) = batch.get_or_insert_with(|| (tree.to_vec(), sled::Batch::default(), 0));
        b.insert(k, v);
        *c += 1;
        Ok(())
    })?;
    apply(&db, batch.take())?;
    // Trees that were empty in the backup exist again too.
    for t in &header.trees {
        db.open_tree(t.name.as_bytes())?;
    }
    db.flush()?;
    Ok(header)
}

/// Restore the backup at `from` into the store `kv` (etcd, or any other backend), which
/// must hold no entries unless `overwrite` (then the backup's entries are written over
/// what is there; entries the backup lacks stay). The checksum is checked before anything
/// is written; entries go in transactions of at most [`MAX_TXN_OPS`] writes.
/// Blocking: run it on the blocking pool.
///
/// [`MAX_TXN_OPS`]: crate::core::kv::MAX_TXN_OPS
pub fn restore_into(
    from: &Path,
    kv: &crate::core::kv::Kv,
    overwrite: bool,
) -> Result<BackupHeader, BackupError> {
    use crate::core::kv::{MAX_TXN_OPS, Txn};
    verify(from)?;
    let mut nonempty = Vec::new();
    for t in kv.tree_names()? {
        if !kv.open_tree(&t)?.is_empty()? {
            nonempty.push(t);
        }
    }
    if !nonempty.is_empty() && !overwrite {
        return Err(BackupError::StoreNotEmpty {
            url: kv.url(),
            trees: nonempty.join(", "),
        });
    }
    let mut txn = Txn::new();
    let header = read_body(from, |tree, k, v| {
        let tree = String::from_utf8_lossy(tree);
        txn.put(&tree, k, v);
        if txn.ops.len() >= MAX_TXN_OPS {
            kv.commit(&std::mem::take(&mut txn))?;
        }
        Ok(())
    })?;
    if !txn.is_empty() {
        kv.commit(&txn)?;
    }
    kv.flush()?;
    Ok(header)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// sled lets go of a directory's lock a moment after its last handle is dropped (its
    /// flusher thread ends on its next tick), so a reopen in the same process may have to
    /// wait for it.
    fn open_when_free(dir: &Path) -> sled::Db {
        let t0 = std::time::Instant::now();
        loop {
            match sled::Config::new().path(dir).open() {
                Ok(db) => return db,
                Err(e)
                    if crate::core::kv::sled::is_locked(&e)
                        && t0.elapsed() < std::time::Duration::from_secs(10) =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(e) => panic!("reopening {}: {e}", dir.display()),
            }
        }
    }

    #[test]
    fn every_tree_comes_back_and_damage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::core::kv::Kv::sled(&dir.path().join("db")).unwrap();
        for t in ["nodes", "revoked", "added_later_by_someone"] {
            let tree = db.open_tree(t).unwrap();
            for i in 0..50u32 {
                tree.insert(format!("{t}-{i}"), vec![i as u8; i as usize])
                    .unwrap();
            }
        }
        db.open_tree("empty").unwrap();
        let out = dir.path().join("b.zmbackup");
        let h = write_backup(&db, "ab12", 7, &out).unwrap();
        assert_eq!(h.ca_fingerprint, "ab12");
        assert!(
            h.trees
                .iter()
                .any(|t| t.name == "added_later_by_someone" && t.entries == 50)
        );
        drop(db);

        let restored = dir.path().join("restored");
        let rh = restore(&out, &restored).unwrap();
        assert_eq!(rh, h);
        let db2 = open_when_free(&restored);
        for t in ["nodes", "revoked", "added_later_by_someone"] {
            let tree = db2.open_tree(t).unwrap();
            assert_eq!(tree.len(), 50);
            assert_eq!(
                tree.get(format!("{t}-7")).unwrap().unwrap().as_ref(),
                &[7u8; 7]
            );
        }
        assert!(db2.tree_names().iter().any(|n| n.as_ref() == b"empty"));
        drop(db2);

        // Not into a directory that holds something.
        assert!(matches!(
            restore(&out, &restored),
            Err(BackupError::NotEmpty(_))
        ));

        // Into a store through the storage interface: every entry, then refused when full.
        let kv = crate::core::kv::Kv::sled(&dir.path().join("kv")).unwrap();
        assert_eq!(restore_into(&out, &kv, false).unwrap(), h);
        let nodes = kv.open_tree("nodes").unwrap();
        assert_eq!(nodes.iter().count(), 50);
        assert_eq!(nodes.get("nodes-7").unwrap().unwrap(), vec![7u8; 7]);
        assert!(matches!(
            restore_into(&out, &kv, false),
            Err(BackupError::StoreNotEmpty { .. })
        ));
        assert!(restore_into(&out, &kv, true).is_ok());
        drop(kv);

        // One flipped byte in the body: refused, nothing written.
        let mut bytes = std::fs::read(&out).unwrap();
        let last = bytes.len() - 10;
        bytes[last] ^= 0xff;
        let damaged = dir.path().join("damaged.zmbackup");
        std::fs::write(&damaged, &bytes).unwrap();
        let fresh = dir.path().join("fresh");
        assert!(matches!(
            restore(&damaged, &fresh),
            Err(BackupError::Checksum { .. })
        ));
        assert!(!fresh.exists());
    }
}
