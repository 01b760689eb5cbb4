//! The storage interface every durable record of the controller goes through.
//!
//! A [`Backend`] holds named trees of binary keys and values: point reads, ordered range
//! reads, and one atomic write — a [`Txn`] of conditions (key absent, present, or equal to
//! a value) and puts/deletes that applies whole or not at all. Two implementations:
//! [`sled::SledBackend`] (embedded, the default: `--store sled`) and
//! [`etcd::EtcdBackend`] (`--store etcd://HOST:PORT[,...]`). Both are synchronous and are
//! called from the blocking pool only, never from an async worker.
//!
//! [`Kv`] is the handle the store types hold; [`Tree`] is one named tree of it, with the
//! read/write calls the store types use. Durability: a committed [`Txn`] is durable once
//! [`Kv::flush`] returns (sled: one group-commit flush of the database, shared with every
//! concurrent writer; etcd: already durable when the transaction is acknowledged).

pub mod etcd;
pub mod sled;
#[cfg(any(test, feature = "testing"))]
pub mod suite;
pub mod url;

use std::ops::Bound;
use std::sync::Arc;

use thiserror::Error;

/// Largest value either backend accepts (etcd refuses requests above 1.5 MiB by default;
/// the largest zonemesh record, a change carrying a CRL, stays far below this).
pub const MAX_VALUE: usize = 1024 * 1024;
/// Most writes and conditions in one transaction (etcd's default `--max-txn-ops` is 128).
pub const MAX_TXN_OPS: usize = 128;
/// Entries read per round trip by [`Tree::iter`] and friends.
const PAGE: usize = 256;

/// Why a storage call failed.
#[derive(Debug, Error)]
pub enum KvError {
    #[error("sled: {0}")]
    Sled(#[from] ::sled::Error),
    #[error("etcd store at {endpoints} cannot be reached: {detail}")]
    Unreachable { endpoints: String, detail: String },
    #[error("etcd store at {endpoints}: {detail}")]
    Etcd { endpoints: String, detail: String },
    #[error("value of {size} bytes in tree {tree} is larger than the store's limit of {MAX_VALUE}")]
    TooLarge { tree: String, size: usize },
    #[error("transaction of {0} operations is larger than the store's limit of {MAX_TXN_OPS}")]
    TooManyOps(usize),
    #[error("bad store URL {url:?}: {why}")]
    BadUrl { url: String, why: String },
    #[error("flush: {0}")]
    Flush(String),
}

pub type KvResult<T> = Result<T, KvError>;

/// A key-value pair as stored.
pub type Pair = (Vec<u8>, Vec<u8>);

/// What must hold of a key for a [`Txn`] to apply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cond {
    Absent,
    Present,
    Equals(Vec<u8>),
}

/// One condition of a [`Txn`].
#[derive(Clone, Debug)]
pub struct Check {
    pub tree: String,
    pub key: Vec<u8>,
    pub cond: Cond,
}

/// One write of a [`Txn`].
#[derive(Clone, Debug)]
pub enum Op {
    Put {
        tree: String,
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Delete {
        tree: String,
        key: Vec<u8>,
    },
}

/// An atomic change: when every check holds, every op applies; otherwise nothing does.
#[derive(Clone, Debug, Default)]
pub struct Txn {
    pub checks: Vec<Check>,
    pub ops: Vec<Op>,
}

impl Txn {
    pub fn new() -> Self {
        Self::default()
    }

    /// Require `key` of `tree` to be in state `cond`.
    pub fn check(&mut self, tree: &str, key: impl AsRef<[u8]>, cond: Cond) -> &mut Self {
        self.checks.push(Check {
            tree: tree.to_string(),
            key: key.as_ref().to_vec(),
            cond,
        });
        self
    }

    /// Require `key` to hold exactly `old` (`None`: absent).
    pub fn expect(&mut self, tree: &str, key: impl AsRef<[u8]>, old: Option<&[u8]>) -> &mut Self {
        let cond = match old {
            Some(v) => Cond::Equals(v.to_vec()),
            None => Cond::Absent,
        };
        self.check(tree, key, cond)
    }

    pub fn put(
        &mut self,
        tree: &str,
        key: impl AsRef<[u8]>,
        value: impl Into<Vec<u8>>,
    ) -> &mut Self {
        self.ops.push(Op::Put {
            tree: tree.to_string(),
            key: key.as_ref().to_vec(),
            value: value.into(),
        });
        self
    }

    pub fn delete(&mut self, tree: &str, key: impl AsRef<[u8]>) -> &mut Self {
        self.ops.push(Op::Delete {
            tree: tree.to_string(),
            key: key.as_ref().to_vec(),
        });
        self
    }

    /// True when the transaction holds no writes.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Refuse what neither backend can apply in one piece (same rule for both).
    pub fn validate(&self) -> KvResult<()> {
        let n = self.checks.len() + self.ops.len();
        if n > MAX_TXN_OPS {
            return Err(KvError::TooManyOps(n));
        }
        for op in &self.ops {
            if let Op::Put { tree, value, .. } = op
                && value.len() > MAX_VALUE
            {
                return Err(KvError::TooLarge {
                    tree: tree.clone(),
                    size: value.len(),
                });
            }
        }
        Ok(())
    }
}

/// An ordered read of one tree.
#[derive(Clone, Debug)]
pub struct Query {
    pub start: Bound<Vec<u8>>,
    pub end: Bound<Vec<u8>>,
    /// Newest (largest) key first.
    pub reverse: bool,
    /// At most this many entries (at least 1).
    pub limit: usize,
}

/// The first key after every key starting with `prefix` (`None`: no such key).
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// A storage implementation. Synchronous: call it from the blocking pool only.
pub trait Backend: Send + Sync + 'static {
    /// The store's URL as given to `--store` (no secrets in it).
    fn url(&self) -> String;
    fn get(&self, tree: &str, key: &[u8]) -> KvResult<Option<Vec<u8>>>;
    /// Entries of `tree` in key order (reversed when asked), at most `q.limit`.
    fn range(&self, tree: &str, q: &Query) -> KvResult<Vec<Pair>>;
    fn count(&self, tree: &str) -> KvResult<usize>;
    /// Apply `txn` atomically; `Ok(false)` when a check failed (nothing applied).
    fn commit(&self, txn: &Txn) -> KvResult<bool>;
    /// Make every committed transaction durable.
    fn flush(&self) -> KvResult<()>;
    /// Make `name` exist (sled lists opened trees; etcd has nothing to do).
    fn create_tree(&self, _name: &str) -> KvResult<()> {
        Ok(())
    }
    /// Every tree holding at least one key (sled: every tree ever opened, empty or not).
    fn tree_names(&self) -> KvResult<Vec<String>>;
}

/// A shared handle on a backend, with its group-commit flusher.
#[derive(Clone)]
pub struct Kv {
    backend: Arc<dyn Backend>,
    flusher: crate::durable::Flusher,
}

impl std::fmt::Debug for Kv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Kv({})", self.backend.url())
    }
}

impl Kv {
    pub fn new(backend: Arc<dyn Backend>) -> Self {
        let flusher = crate::durable::Flusher::new(backend.clone());
        Self { backend, flusher }
    }

    /// The handle of `flusher`'s store.
    pub(crate) fn with_flusher(
        backend: Arc<dyn Backend>,
        flusher: crate::durable::Flusher,
    ) -> Self {
        Self { backend, flusher }
    }

    /// An embedded sled store in `dir`.
    pub fn sled(dir: &std::path::Path) -> KvResult<Self> {
        Ok(Self::new(Arc::new(sled::SledBackend::open(dir)?)))
    }

    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    pub fn flusher(&self) -> &crate::durable::Flusher {
        &self.flusher
    }

    pub fn url(&self) -> String {
        self.backend.url()
    }

    /// One named tree (created on first write).
    pub fn open_tree(&self, name: &str) -> KvResult<Tree> {
        self.backend.create_tree(name)?;
        Ok(Tree {
            kv: self.clone(),
            name: Arc::from(name),
        })
    }

    /// Apply `txn` atomically (not yet flushed); `Ok(false)` when a check failed.
    pub fn commit(&self, txn: &Txn) -> KvResult<bool> {
        txn.validate()?;
        if txn.ops.is_empty() && txn.checks.is_empty() {
            return Ok(true);
        }
        self.backend.commit(txn)
    }

    /// Every write so far durable (group commit; blocking contexts only).
    pub fn flush(&self) -> KvResult<()> {
        self.flusher
            .flush_blocking()
            .map_err(|e| KvError::Flush(e.to_string()))
    }

    pub fn tree_names(&self) -> KvResult<Vec<String>> {
        self.backend.tree_names()
    }
}

/// A compare-and-swap that found another value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CasFailed {
    pub current: Option<Vec<u8>>,
}

/// One named tree of a [`Kv`].
#[derive(Clone)]
pub struct Tree {
    kv: Kv,
    name: Arc<str>,
}

impl std::fmt::Debug for Tree {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tree({})", self.name)
    }
}

impl Tree {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn kv(&self) -> &Kv {
        &self.kv
    }

    pub fn get(&self, key: impl AsRef<[u8]>) -> KvResult<Option<Vec<u8>>> {
        self.kv.backend.get(&self.name, key.as_ref())
    }

    pub fn contains_key(&self, key: impl AsRef<[u8]>) -> KvResult<bool> {
        Ok(self.get(key)?.is_some())
    }

    /// Write one key (unconditionally).
    pub fn insert(&self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> KvResult<()> {
        let mut t = Txn::new();
        t.put(&self.name, key, value.as_ref().to_vec());
        self.kv.commit(&t).map(|_| ())
    }

    /// Delete one key (absent is fine); returns the value it had.
    pub fn remove(&self, key: impl AsRef<[u8]>) -> KvResult<Option<Vec<u8>>> {
        let key = key.as_ref();
        loop {
            let Some(old) = self.get(key)? else {
                return Ok(None);
            };
            if self
                .compare_and_swap(key, Some(&old), None::<Vec<u8>>)?
                .is_ok()
            {
                return Ok(Some(old));
            }
        }
    }

    /// Replace `old` (`None`: absent) by `new` (`None`: delete) atomically.
    pub fn compare_and_swap<V: Into<Vec<u8>>>(
        &self,
        key: impl AsRef<[u8]>,
        old: Option<&[u8]>,
        new: Option<V>,
    ) -> KvResult<Result<(), CasFailed>> {
        let key = key.as_ref();
        let mut t = Txn::new();
        t.expect(&self.name, key, old);
        match new.map(Into::into) {
            Some(v) => t.put(&self.name, key, v),
            None => t.delete(&self.name, key),
        };
        if self.kv.commit(&t)? {
            Ok(Ok(()))
        } else {
            Ok(Err(CasFailed {
                current: self.get(key)?,
            }))
        }
    }

    /// Apply `f` to the current value atomically (retried on a concurrent change);
    /// returns the value before.
    pub fn fetch_and_update(
        &self,
        key: impl AsRef<[u8]>,
        mut f: impl FnMut(Option<&[u8]>) -> Option<Vec<u8>>,
    ) -> KvResult<Option<Vec<u8>>> {
        let key = key.as_ref();
        loop {
            let old = self.get(key)?;
            let new = f(old.as_deref());
            if new.as_deref() == old.as_deref() {
                return Ok(old);
            }
            if self.compare_and_swap(key, old.as_deref(), new)?.is_ok() {
                return Ok(old);
            }
        }
    }

    /// Like [`Tree::fetch_and_update`], returning the value after.
    pub fn update_and_fetch(
        &self,
        key: impl AsRef<[u8]>,
        mut f: impl FnMut(Option<&[u8]>) -> Option<Vec<u8>>,
    ) -> KvResult<Option<Vec<u8>>> {
        let mut after = None;
        self.fetch_and_update(key, |old| {
            after = f(old);
            after.clone()
        })?;
        Ok(after)
    }

    pub fn len(&self) -> KvResult<usize> {
        self.kv.backend.count(&self.name)
    }

    pub fn is_empty(&self) -> KvResult<bool> {
        Ok(self.first()?.is_none())
    }

    pub fn first(&self) -> KvResult<Option<Pair>> {
        Ok(self
            .query(Bound::Unbounded, Bound::Unbounded, false, 1)?
            .pop())
    }

    pub fn last(&self) -> KvResult<Option<Pair>> {
        Ok(self
            .query(Bound::Unbounded, Bound::Unbounded, true, 1)?
            .pop())
    }

    fn query(
        &self,
        start: Bound<Vec<u8>>,
        end: Bound<Vec<u8>>,
        reverse: bool,
        limit: usize,
    ) -> KvResult<Vec<Pair>> {
        self.kv.backend.range(
            &self.name,
            &Query {
                start,
                end,
                reverse,
                limit,
            },
        )
    }

    /// Every entry, in key order (read a page at a time).
    pub fn iter(&self) -> Iter {
        self.range_bounds(Bound::Unbounded, Bound::Unbounded)
    }

    /// Entries whose key starts with `prefix`.
    pub fn scan_prefix(&self, prefix: impl AsRef<[u8]>) -> Iter {
        let p = prefix.as_ref();
        let end = match prefix_end(p) {
            Some(e) => Bound::Excluded(e),
            None => Bound::Unbounded,
        };
        self.range_bounds(Bound::Included(p.to_vec()), end)
    }

    /// Entries with keys in `r`.
    pub fn range<K: AsRef<[u8]>, R: std::ops::RangeBounds<K>>(&self, r: R) -> Iter {
        let own = |b: Bound<&K>| match b {
            Bound::Included(k) => Bound::Included(k.as_ref().to_vec()),
            Bound::Excluded(k) => Bound::Excluded(k.as_ref().to_vec()),
            Bound::Unbounded => Bound::Unbounded,
        };
        self.range_bounds(own(r.start_bound()), own(r.end_bound()))
    }

    fn range_bounds(&self, start: Bound<Vec<u8>>, end: Bound<Vec<u8>>) -> Iter {
        Iter {
            tree: self.clone(),
            start,
            end,
            reverse: false,
            buf: std::collections::VecDeque::new(),
            done: false,
        }
    }
}

/// Entries of a tree, read from the backend a page at a time.
pub struct Iter {
    tree: Tree,
    start: Bound<Vec<u8>>,
    end: Bound<Vec<u8>>,
    reverse: bool,
    buf: std::collections::VecDeque<Pair>,
    done: bool,
}

impl Iter {
    /// Largest key first.
    pub fn rev(mut self) -> Self {
        self.reverse = !self.reverse;
        self
    }

    pub fn keys(self) -> impl Iterator<Item = KvResult<Vec<u8>>> {
        self.map(|r| r.map(|(k, _)| k))
    }

    pub fn values(self) -> impl Iterator<Item = KvResult<Vec<u8>>> {
        self.map(|r| r.map(|(_, v)| v))
    }

    fn fill(&mut self) -> KvResult<()> {
        let page = self
            .tree
            .query(self.start.clone(), self.end.clone(), self.reverse, PAGE)?;
        if page.len() < PAGE {
            self.done = true;
        }
        if let Some((k, _)) = page.last() {
            if self.reverse {
                self.end = Bound::Excluded(k.clone());
            } else {
                self.start = Bound::Excluded(k.clone());
            }
        }
        self.buf.extend(page);
        Ok(())
    }
}

impl Iterator for Iter {
    type Item = KvResult<Pair>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.buf.is_empty()
            && !self.done
            && let Err(e) = self.fill()
        {
            self.done = true;
            return Some(Err(e));
        }
        self.buf.pop_front().map(Ok)
    }
}
