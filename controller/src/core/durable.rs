//! Group commit for the store (see [`crate::core::kv`]): callers that need their writes durable take a
//! ticket and wait; one caller at a time flushes the whole database for every ticket
//! taken before its flush began, so N concurrent durable writes cost far fewer than N
//! flushes. Async callers wait without holding a worker; the flush itself runs on the
//! blocking pool.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::watch;

use crate::blocking::BlockingError;

/// Why a durable write could not be confirmed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FlushError {
    #[error("database flush failed: {0}")]
    Db(String),
    #[error("flush task failed: {0}")]
    Task(String),
}

impl From<BlockingError> for FlushError {
    fn from(e: BlockingError) -> Self {
        FlushError::Task(e.to_string())
    }
}

#[derive(Clone, Debug, Default)]
struct Progress {
    /// Every ticket up to this one is covered by a finished flush (ok or not).
    done: u64,
    /// Every ticket up to this one is covered by a successful flush.
    ok: u64,
    /// A flush is under way.
    running: bool,
    last_error: Option<String>,
}

struct Inner {
    backend: Arc<dyn crate::core::kv::Backend>,
    tickets: AtomicU64,
    flushes: AtomicU64,
    progress: watch::Sender<Progress>,
}

/// The controller's one durable writer over a store (cheap to clone).
#[derive(Clone)]
pub struct Flusher {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Flusher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flusher")
            .field("flushes", &self.flushes())
            .finish()
    }
}

enum Step {
    Covered(Result<(), FlushError>),
    Lead,
    Wait,
}

impl Flusher {
    /// A flusher for `backend`.
    pub fn new(backend: Arc<dyn crate::core::kv::Backend>) -> Self {
        Self {
            inner: Arc::new(Inner {
                backend,
                tickets: AtomicU64::new(0),
                flushes: AtomicU64::new(0),
                progress: watch::Sender::new(Progress::default()),
            }),
        }
    }

    /// The store this flusher makes durable.
    pub fn kv(&self) -> crate::core::kv::Kv {
        crate::core::kv::Kv::with_flusher(self.inner.backend.clone(), self.clone())
    }

    /// How many flushes of the database this flusher has made.
    pub fn flushes(&self) -> u64 {
        self.inner.flushes.load(Ordering::Relaxed)
    }

    /// Take a ticket for every write made before this call.
    fn ticket(&self) -> u64 {
        self.inner.tickets.fetch_add(1, Ordering::SeqCst) + 1
    }

    fn step(&self, rx: &mut watch::Receiver<Progress>, ticket: u64) -> Step {
        let p = rx.borrow_and_update().clone();
        if p.ok >= ticket {
            return Step::Covered(Ok(()));
        }
        if p.done >= ticket {
            let e = p.last_error.expect("a failed flush records its error");
            return Step::Covered(Err(FlushError::Db(e)));
        }
        let won = self.inner.progress.send_if_modified(|p| {
            if p.running {
                false
            } else {
                p.running = true;
                true
            }
        });
        if won { Step::Lead } else { Step::Wait }
    }

    /// Flush once for every ticket taken so far; only the caller that set `running`.
    fn lead(&self) {
        let upto = self.inner.tickets.load(Ordering::SeqCst);
        let r = self.inner.backend.flush();
        self.inner.flushes.fetch_add(1, Ordering::Relaxed);
        self.inner.progress.send_modify(|p| {
            p.running = false;
            p.done = p.done.max(upto);
            match r {
                Ok(_) => p.ok = p.ok.max(upto),
                Err(e) => {
                    tracing::error!(error = %e, "database flush failed");
                    p.last_error = Some(e.to_string());
                }
            }
        });
    }

    /// Return once every write made before this call is on disk, without blocking an
    /// async worker.
    pub async fn flush(&self) -> Result<(), FlushError> {
        let ticket = self.ticket();
        let mut rx = self.inner.progress.subscribe();
        loop {
            match self.step(&mut rx, ticket) {
                Step::Covered(r) => return r,
                Step::Lead => {
                    let this = self.clone();
                    if let Err(e) = crate::blocking::run_infallible(move || this.lead()).await {
                        return Err(e.into());
                    }
                }
                Step::Wait => {
                    // The sender lives in `inner`, which we hold: this cannot fail.
                    let _ = rx.changed().await;
                }
            }
        }
    }

    /// [`Flusher::flush`] for blocking contexts (the blocking pool, the admin socket's
    /// handler threads); never call it on an async worker.
    pub fn flush_blocking(&self) -> Result<(), FlushError> {
        let ticket = self.ticket();
        let mut rx = self.inner.progress.subscribe();
        loop {
            match self.step(&mut rx, ticket) {
                Step::Covered(r) => return r,
                Step::Lead => self.lead(),
                Step::Wait => {
                    let _ = futures::executor::block_on(rx.changed());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn db() -> (tempfile::TempDir, crate::core::kv::Kv) {
        let dir = tempfile::tempdir().unwrap();
        let kv = crate::core::kv::Kv::sled(dir.path()).unwrap();
        (dir, kv)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_durable_writes_share_flushes() {
        let (_dir, db) = db();
        let f = db.flusher().clone();
        let tree = db.open_tree("t").unwrap();
        let n = 200u64;
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..n {
            let (f, tree) = (f.clone(), tree.clone());
            tasks.spawn(async move {
                tree.insert(i.to_be_bytes(), [0u8; 256]).unwrap();
                f.flush().await.unwrap();
                // Returned only after a flush that began after our write finished.
                assert!(f.inner.progress.borrow().ok >= 1);
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.unwrap();
        }
        let flushes = f.flushes();
        assert!(flushes >= 1);
        assert!(
            flushes < n / 4,
            "{n} concurrent durable writes made {flushes} flushes"
        );
    }

    #[test]
    fn each_caller_waits_for_a_flush_that_covers_its_write() {
        let (_dir, db) = db();
        let f = db.flusher().clone();
        let tree = db.open_tree("t").unwrap();
        let threads: Vec<_> = (0..16u64)
            .map(|i| {
                let (f, tree) = (f.clone(), tree.clone());
                std::thread::spawn(move || {
                    tree.insert(i.to_be_bytes(), [1u8; 64]).unwrap();
                    let t = f.inner.tickets.load(Ordering::SeqCst) + 1;
                    f.flush_blocking().unwrap();
                    assert!(f.inner.progress.borrow().ok >= t);
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(f.flushes() <= 16);
    }

    #[tokio::test]
    async fn a_lone_caller_flushes_at_once() {
        let (_dir, db) = db();
        let f = db.flusher().clone();
        db.open_tree("t").unwrap().insert("k", "v").unwrap();
        tokio::time::timeout(Duration::from_secs(5), f.flush())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(f.flushes(), 1);
    }
}
