//! A store that fails on demand: the real sled backend of a [`Plane`] with commits that
//! fail while the test says so, as they do when an etcd cluster cannot be reached.

use crate::inproc::Plane;
use anyhow::Result;
use std::sync::Arc;
use std::sync::Mutex;
use zonemesh_controller::kv::{Backend, KvError, KvResult, Pair, Query, Txn};

/// The real backend, with commits that fail once `budget` is spent (as an unreachable
/// etcd cluster fails them).
pub struct Faulty {
    inner: Arc<dyn Backend>,
    /// Commits that still go through; `None`: all of them.
    budget: Mutex<Option<usize>>,
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
        {
            let mut budget = self.budget.lock().unwrap_or_else(|e| e.into_inner());
            match budget.as_mut() {
                Some(0) => {
                    return Err(KvError::Unreachable {
                        endpoints: "test".into(),
                        detail: "commit refused by the test".into(),
                    });
                }
                Some(n) => *n -= 1,
                None => {}
            }
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
                budget: Mutex::new(None),
            });
            faulty = Some(f.clone());
            f
        })?;
        Ok((plane, faulty.expect("the plane took the backend")))
    }

    /// Make every commit fail (`true`) or go through again.
    pub fn set_failing(&self, on: bool) {
        *self.budget.lock().unwrap_or_else(|e| e.into_inner()) = on.then_some(0);
    }

    /// Let `n` more commits through, then fail every one (as a store lost part-way
    /// through a change made of several commits).
    pub fn fail_after(&self, n: usize) {
        *self.budget.lock().unwrap_or_else(|e| e.into_inner()) = Some(n);
    }
}
