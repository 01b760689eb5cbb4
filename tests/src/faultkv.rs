//! A store that fails on demand: the real sled backend of a [`Plane`] with commits that
//! fail while the test says so, as they do when an etcd cluster cannot be reached.

use crate::inproc::Plane;
use anyhow::Result;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use zonemesh_controller::kv::{Backend, KvError, KvResult, Pair, Query, Txn};

/// The real backend, with commits that fail while `fail` is set (as an unreachable etcd
/// cluster fails them).
pub struct Faulty {
    inner: Arc<dyn Backend>,
    fail: AtomicBool,
}

impl Backend for Faulty {
    fn url(&self) -> String {
        self.inner.url()
    }
    fn get(&self, tree: &str, key: &[u8]) -> KvResult<Option<Vec<u8>>> {
        self.inner.get(tree, key)
    }
    fn range(&self, tree: &str, q: &Query) -> KvResult<Vec<Pair>> {
        self.inner.range(tree, q)
    }
    fn count(&self, tree: &str) -> KvResult<usize> {
        self.inner.count(tree)
    }
    fn commit(&self, txn: &Txn) -> KvResult<bool> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(KvError::Unreachable {
                endpoints: "test".into(),
                detail: "commit refused by the test".into(),
            });
        }
        self.inner.commit(txn)
    }
    fn flush(&self) -> KvResult<()> {
        self.inner.flush()
    }
    fn create_tree(&self, name: &str) -> KvResult<()> {
        self.inner.create_tree(name)
    }
    fn tree_names(&self) -> KvResult<Vec<String>> {
        self.inner.tree_names()
    }
}

impl Faulty {
    /// A [`Plane`] on a failing-on-demand store, and the switch.
    pub fn plane() -> Result<(Plane, Arc<Faulty>)> {
        let mut faulty = None;
        let plane = Plane::with_backend(|inner| {
            let f = Arc::new(Faulty {
                inner,
                fail: AtomicBool::new(false),
            });
            faulty = Some(f.clone());
            f
        })?;
        Ok((plane, faulty.expect("the plane took the backend")))
    }

    /// Make every commit fail (`true`) or go through again.
    pub fn set_failing(&self, on: bool) {
        self.fail.store(on, Ordering::SeqCst);
    }
}
