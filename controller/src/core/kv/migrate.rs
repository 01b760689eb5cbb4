//! Copying a whole store into another (`store migrate`), then checking the copy: per tree,
//! the number of entries and a SHA-256 over every key and value in key order must match.

use super::{Kv, KvError, KvResult, MAX_TXN_OPS, Txn};
use serde::Serialize;
use sha2::{Digest, Sha256};

/// One tree of a migration: what was found on each side.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct TreeCheck {
    pub tree: String,
    pub source_entries: u64,
    pub target_entries: u64,
    pub source_sha256: String,
    pub target_sha256: String,
}

impl TreeCheck {
    pub fn matches(&self) -> bool {
        self.source_entries == self.target_entries && self.source_sha256 == self.target_sha256
    }
}

/// Why a migration stopped.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(transparent)]
    Kv(#[from] KvError),
    #[error(
        "the target store {0} already holds data (trees: {1}); refusing to mix stores (pass --overwrite to write over it)"
    )]
    NotEmpty(String, String),
    #[error("the copy does not match the source in tree(s) {0}")]
    Mismatch(String),
}

/// Count and digest of one tree, read in key order.
pub fn digest(kv: &Kv, tree: &str) -> KvResult<(u64, String)> {
    let mut h = Sha256::new();
    let mut n = 0u64;
    for item in kv.open_tree(tree)?.iter() {
        let (k, v) = item?;
        h.update((k.len() as u64).to_be_bytes());
        h.update(&k);
        h.update((v.len() as u64).to_be_bytes());
        h.update(&v);
        n += 1;
    }
    Ok((n, hex::encode(h.finalize())))
}

/// Copy every tree of `from` into `to` and check the copy. Refuses a target that holds
/// data unless `overwrite`. Blocking.
pub fn migrate(from: &Kv, to: &Kv, overwrite: bool) -> Result<Vec<TreeCheck>, MigrateError> {
    let existing = to.tree_names()?;
    let mut nonempty = Vec::new();
    for t in &existing {
        if !to.open_tree(t)?.is_empty()? {
            nonempty.push(t.clone());
        }
    }
    if !nonempty.is_empty() && !overwrite {
        return Err(MigrateError::NotEmpty(to.url(), nonempty.join(", ")));
    }
    let names = from.tree_names()?;
    for name in &names {
        let mut txn = Txn::new();
        for item in from.open_tree(name)?.iter() {
            let (k, v) = item?;
            txn.put(name, k, v);
            if txn.ops.len() >= MAX_TXN_OPS {
                to.commit(&txn)?;
                txn = Txn::new();
            }
        }
        to.commit(&txn)?;
    }
    to.flush()?;
    let mut checks = Vec::new();
    for name in &names {
        let (sn, sd) = digest(from, name)?;
        let (tn, td) = digest(to, name)?;
        checks.push(TreeCheck {
            tree: name.clone(),
            source_entries: sn,
            target_entries: tn,
            source_sha256: sd,
            target_sha256: td,
        });
    }
    let bad: Vec<&str> = checks
        .iter()
        .filter(|c| !c.matches())
        .map(|c| c.tree.as_str())
        .collect();
    if !bad.is_empty() {
        return Err(MigrateError::Mismatch(bad.join(", ")));
    }
    Ok(checks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_every_tree_checks_it_and_refuses_a_full_target() {
        let d = tempfile::tempdir().unwrap();
        let a = Kv::sled(&d.path().join("a")).unwrap();
        let b = Kv::sled(&d.path().join("b")).unwrap();
        for t in ["nodes", "audit", "ssh_ca"] {
            let tree = a.open_tree(t).unwrap();
            for i in 0..300u32 {
                tree.insert(i.to_be_bytes(), vec![i as u8; 10]).unwrap();
            }
        }
        let checks = migrate(&a, &b, false).unwrap();
        let nodes = checks.iter().find(|c| c.tree == "nodes").unwrap();
        assert_eq!(nodes.target_entries, 300);
        assert!(checks.iter().all(TreeCheck::matches));
        assert!(matches!(
            migrate(&a, &b, false),
            Err(MigrateError::NotEmpty(..))
        ));
        // A changed byte changes the digest.
        b.open_tree("nodes")
            .unwrap()
            .insert(7u32.to_be_bytes(), [0u8; 10])
            .unwrap();
        assert_ne!(digest(&a, "nodes").unwrap(), digest(&b, "nodes").unwrap());
        assert!(
            migrate(&a, &b, true)
                .unwrap()
                .iter()
                .all(TreeCheck::matches)
        );
    }
}
