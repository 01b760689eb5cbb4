//! The embedded backend: one sled database, one sled tree per named tree. A [`Txn`] is
//! one sled transaction over every tree it touches; [`Backend::flush`] flushes the
//! database (the [`crate::durable::Flusher`] shares one flush among concurrent writers).

use super::{Backend, Cond, KvError, KvResult, Op, Pair, Query, Txn};
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};
use std::path::{Path, PathBuf};

/// A sled database as a [`Backend`].
pub struct SledBackend {
    db: sled::Db,
    dir: PathBuf,
}

/// sled's error for a directory another process holds.
pub fn is_locked(e: &sled::Error) -> bool {
    matches!(e, sled::Error::Io(io)
        if io.kind() == std::io::ErrorKind::WouldBlock || io.to_string().contains("lock"))
}

impl SledBackend {
    /// Open (or create) the database in `dir`.
    pub fn open(dir: &Path) -> KvResult<Self> {
        let db = sled::Config::new()
            .path(dir)
            .mode(sled::Mode::HighThroughput)
            .open()?;
        Ok(Self {
            db,
            dir: dir.to_path_buf(),
        })
    }

    /// The sled database (backups read its trees directly).
    pub fn db(&self) -> &sled::Db {
        &self.db
    }

    fn tree(&self, name: &str) -> KvResult<sled::Tree> {
        Ok(self.db.open_tree(name)?)
    }
}

impl Backend for SledBackend {
    fn url(&self) -> String {
        format!("sled:{}", self.dir.display())
    }

    fn get(&self, tree: &str, key: &[u8]) -> KvResult<Option<Vec<u8>>> {
        Ok(self.tree(tree)?.get(key)?.map(|v| v.to_vec()))
    }

    fn range(&self, tree: &str, q: &Query) -> KvResult<Vec<Pair>> {
        let t = self.tree(tree)?;
        let it = t.range::<Vec<u8>, _>((q.start.clone(), q.end.clone()));
        let mut out = Vec::new();
        let mut push = |r: sled::Result<(sled::IVec, sled::IVec)>| -> KvResult<bool> {
            let (k, v) = r?;
            out.push((k.to_vec(), v.to_vec()));
            Ok(out.len() < q.limit.max(1))
        };
        if q.reverse {
            for r in it.rev() {
                if !push(r)? {
                    break;
                }
            }
        } else {
            for r in it {
                if !push(r)? {
                    break;
                }
            }
        }
        Ok(out)
    }

    fn count(&self, tree: &str) -> KvResult<usize> {
        Ok(self.tree(tree)?.len())
    }

    fn commit(&self, txn: &Txn) -> KvResult<bool> {
        // Trees in a fixed order, each once.
        let mut names: Vec<&str> = txn
            .checks
            .iter()
            .map(|c| c.tree.as_str())
            .chain(txn.ops.iter().map(|o| match o {
                Op::Put { tree, .. } | Op::Delete { tree, .. } => tree.as_str(),
            }))
            .collect();
        names.sort_unstable();
        names.dedup();
        let trees: Vec<sled::Tree> = names
            .iter()
            .map(|n| self.tree(n))
            .collect::<KvResult<_>>()?;
        let idx = |n: &str| names.binary_search(&n).expect("every tree was opened");
        let r = trees.as_slice().transaction(|view| {
            for c in &txn.checks {
                let cur = view[idx(&c.tree)].get(&c.key)?;
                let ok = match (&c.cond, &cur) {
                    (Cond::Absent, None) | (Cond::Present, Some(_)) => true,
                    (Cond::Equals(want), Some(v)) => want.as_slice() == v.as_ref(),
                    _ => false,
                };
                if !ok {
                    return Err(ConflictableTransactionError::Abort(()));
                }
            }
            for op in &txn.ops {
                match op {
                    Op::Put { tree, key, value } => {
                        view[idx(tree)].insert(key.as_slice(), value.as_slice())?;
                    }
                    Op::Delete { tree, key } => {
                        view[idx(tree)].remove(key.as_slice())?;
                    }
                }
            }
            Ok(())
        });
        match r {
            Ok(()) => Ok(true),
            Err(TransactionError::Abort(())) => Ok(false),
            Err(TransactionError::Storage(e)) => Err(KvError::Sled(e)),
        }
    }

    fn flush(&self) -> KvResult<()> {
        self.db.flush()?;
        Ok(())
    }

    fn create_tree(&self, name: &str) -> KvResult<()> {
        self.tree(name).map(|_| ())
    }

    fn tree_names(&self) -> KvResult<Vec<String>> {
        let mut out = Vec::new();
        for n in self.db.tree_names() {
            let name = String::from_utf8_lossy(&n).into_owned();
            if name == "__sled__default" {
                continue;
            }
            out.push(name);
        }
        out.sort();
        Ok(out)
    }
}
