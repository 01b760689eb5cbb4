//! The etcd backend: every tree is a key prefix `<prefix><tree>/` (default prefix
//! `/zonemesh/`), keys and values are stored as given (binary-safe). A [`Txn`] is one etcd
//! transaction whose compares are on the value or the existence (version 0) of each
//! checked key, so it applies whole or not at all on the cluster. An acknowledged
//! transaction is already durable (etcd commits it through its raft log), so `flush` has
//! nothing left to do.
//!
//! The backend is synchronous: a dedicated thread runs a current-thread tokio runtime with
//! the etcd client; each call is sent to it and waited for with a deadline. The thread and
//! every call in flight end when the backend is dropped (no detached tasks).

use super::{Backend, Cond, KvError, KvResult, Op, Pair, Query, Txn, prefix_end};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, KvClient, SortOrder, SortTarget, TxnOp,
};
use std::future::Future;
use std::ops::Bound;
use std::pin::Pin;
use std::sync::mpsc as std_mpsc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Deadline of every call to etcd (connection included).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Where the etcd cluster is and how to reach it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdConfig {
    /// `HOST:PORT` of each member.
    pub endpoints: Vec<String>,
    /// Key prefix of every tree (ends with `/`).
    pub prefix: String,
    /// Mutual TLS: CA certificate, client certificate and key (PEM files).
    pub tls: Option<EtcdTls>,
    /// Deadline of each call.
    pub timeout: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdTls {
    pub ca: std::path::PathBuf,
    pub cert: Option<std::path::PathBuf>,
    pub key: Option<std::path::PathBuf>,
}

type Job = Box<dyn FnOnce(KvClient) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// An etcd cluster as a [`Backend`].
pub struct EtcdBackend {
    cfg: EtcdConfig,
    jobs: Option<mpsc::UnboundedSender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for EtcdBackend {
    fn drop(&mut self) {
        // Closing the queue ends the runtime's loop; calls in flight are aborted with it.
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn etcd_err(endpoints: &str, e: etcd_client::Error) -> KvError {
    match e {
        etcd_client::Error::TransportError(_) => KvError::Unreachable {
            endpoints: endpoints.to_string(),
            detail: e.to_string(),
        },
        etcd_client::Error::GRpcStatus(ref s)
            if matches!(
                s.code(),
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
            ) =>
        {
            KvError::Unreachable {
                endpoints: endpoints.to_string(),
                detail: s.message().to_string(),
            }
        }
        other => KvError::Etcd {
            endpoints: endpoints.to_string(),
            detail: other.to_string(),
        },
    }
}

pub fn connect_options(cfg: &EtcdConfig) -> KvResult<ConnectOptions> {
    let mut o = ConnectOptions::new()
        .with_connect_timeout(CONNECT_TIMEOUT)
        .with_timeout(cfg.timeout)
        .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3))
        .with_require_leader(true);
    if let Some(tls) = &cfg.tls {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| KvError::BadUrl {
                url: p.display().to_string(),
                why: format!("cannot read: {e}"),
            })
        };
        let mut t = etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(read(&tls.ca)?));
        if let (Some(c), Some(k)) = (&tls.cert, &tls.key) {
            t = t.identity(etcd_client::Identity::from_pem(read(c)?, read(k)?));
        }
        o = o.with_tls(t);
    }
    Ok(o)
}

impl EtcdBackend {
    /// Start the client thread for `cfg` (nothing is contacted yet: the first call is).
    pub fn open(cfg: EtcdConfig) -> KvResult<Self> {
        let options = connect_options(&cfg)?;
        let scheme = if cfg.tls.is_some() { "https" } else { "http" };
        let urls: Vec<String> = cfg
            .endpoints
            .iter()
            .map(|e| format!("{scheme}://{e}"))
            .collect();
        let joined = cfg.endpoints.join(",");
        let (tx, mut rx) = mpsc::unbounded_channel::<Job>();
        let (ready_tx, ready_rx) = std_mpsc::sync_channel::<KvResult<()>>(1);
        let eps = joined.clone();
        // The runtime is built and the client connected on the thread itself, so opening
        // works from any context (also from within another runtime).
        let thread = std::thread::Builder::new()
            .name("zonemesh-etcd".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(KvError::Etcd {
                            endpoints: eps,
                            detail: format!("runtime: {e}"),
                        }));
                        return;
                    }
                };
                rt.block_on(async move {
                    let client = match Client::connect(urls, Some(options)).await {
                        Ok(c) => c,
                        Err(e) => {
                            let _ = ready_tx.send(Err(etcd_err(&eps, e)));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(()));
                    let kv = client.kv_client();
                    let mut tasks = tokio::task::JoinSet::new();
                    loop {
                        tokio::select! {
                            job = rx.recv() => match job {
                                Some(job) => { tasks.spawn(job(kv.clone())); }
                                None => break,
                            },
                            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                        }
                    }
                    tasks.shutdown().await;
                });
            })
            .map_err(|e| KvError::Etcd {
                endpoints: joined.clone(),
                detail: format!("thread: {e}"),
            })?;
        let ready = ready_rx.recv_timeout(CALL_TIMEOUT).unwrap_or_else(|_| {
            Err(KvError::Unreachable {
                endpoints: joined.clone(),
                detail: "the client did not start".into(),
            })
        });
        if let Err(e) = ready {
            drop(tx);
            let _ = thread.join();
            return Err(e);
        }
        Ok(Self {
            cfg,
            jobs: Some(tx),
            thread: Some(thread),
        })
    }

    fn endpoints(&self) -> String {
        self.cfg.endpoints.join(",")
    }

    /// Run `f` on the client thread and wait for it, at most the call deadline.
    fn call<T, F, Fut>(&self, f: F) -> KvResult<T>
    where
        T: Send + 'static,
        F: FnOnce(KvClient) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
    {
        let timeout = self.cfg.timeout;
        let (tx, rx) = std_mpsc::sync_channel(1);
        let job: Job = Box::new(move |kv| {
            Box::pin(async move {
                let r = tokio::time::timeout(timeout, f(kv)).await;
                let _ = tx.send(r);
            })
        });
        let unreachable = |detail: String| KvError::Unreachable {
            endpoints: self.endpoints(),
            detail,
        };
        self.jobs
            .as_ref()
            .and_then(|j| j.send(job).ok())
            .ok_or_else(|| unreachable("the etcd client has stopped".into()))?;
        match rx.recv_timeout(timeout + Duration::from_secs(1)) {
            Ok(Ok(Ok(v))) => Ok(v),
            Ok(Ok(Err(e))) => Err(etcd_err(&self.endpoints(), e)),
            Ok(Err(_)) | Err(_) => Err(unreachable(format!(
                "no answer within {} ms (the change may or may not have been applied)",
                timeout.as_millis()
            ))),
        }
    }

    fn key(&self, tree: &str, key: &[u8]) -> Vec<u8> {
        let mut k = self.tree_prefix(tree);
        k.extend_from_slice(key);
        k
    }

    fn tree_prefix(&self, tree: &str) -> Vec<u8> {
        format!("{}{tree}/", self.cfg.prefix).into_bytes()
    }
}

impl Backend for EtcdBackend {
    fn url(&self) -> String {
        super::url::StoreUrl::Etcd(self.cfg.clone()).to_string()
    }

    fn get(&self, tree: &str, key: &[u8]) -> KvResult<Option<Vec<u8>>> {
        let k = self.key(tree, key);
        self.call(move |mut kv| async move {
            let mut r = kv.get(k, None).await?;
            Ok(r.take_kvs()
                .into_iter()
                .next()
                .map(|kv| kv.value().to_vec()))
        })
    }

    fn range(&self, tree: &str, q: &Query) -> KvResult<Vec<Pair>> {
        let p = self.tree_prefix(tree);
        let with = |k: &[u8]| {
            let mut v = p.clone();
            v.extend_from_slice(k);
            v
        };
        let start = match &q.start {
            Bound::Included(k) => with(k),
            Bound::Excluded(k) => {
                let mut v = with(k);
                v.push(0);
                v
            }
            Bound::Unbounded => p.clone(),
        };
        let end = match &q.end {
            Bound::Included(k) => {
                let mut v = with(k);
                v.push(0);
                v
            }
            Bound::Excluded(k) => with(k),
            Bound::Unbounded => prefix_end(&p).expect("a tree prefix ends with '/'"),
        };
        if start >= end {
            return Ok(Vec::new());
        }
        let order = if q.reverse {
            SortOrder::Descend
        } else {
            SortOrder::Ascend
        };
        let limit = q.limit.max(1) as i64;
        let strip = p.len();
        self.call(move |mut kv| async move {
            let opts = GetOptions::new()
                .with_range(end)
                .with_limit(limit)
                .with_sort(SortTarget::Key, order);
            let mut r = kv.get(start, Some(opts)).await?;
            Ok(r.take_kvs()
                .into_iter()
                .map(|kv| (kv.key()[strip..].to_vec(), kv.value().to_vec()))
                .collect())
        })
    }

    fn count(&self, tree: &str) -> KvResult<usize> {
        let p = self.tree_prefix(tree);
        self.call(move |mut kv| async move {
            let r = kv
                .get(p, Some(GetOptions::new().with_prefix().with_count_only()))
                .await?;
            Ok(r.count().max(0) as usize)
        })
    }

    fn commit(&self, txn: &Txn) -> KvResult<bool> {
        let compares: Vec<Compare> = txn
            .checks
            .iter()
            .map(|c| {
                let k = self.key(&c.tree, &c.key);
                match &c.cond {
                    Cond::Absent => Compare::version(k, CompareOp::Equal, 0),
                    Cond::Present => Compare::version(k, CompareOp::Greater, 0),
                    Cond::Equals(v) => Compare::value(k, CompareOp::Equal, v.clone()),
                }
            })
            .collect();
        let ops: Vec<TxnOp> = txn
            .ops
            .iter()
            .map(|o| match o {
                Op::Put { tree, key, value } => {
                    TxnOp::put(self.key(tree, key), value.clone(), None)
                }
                Op::Delete { tree, key } => TxnOp::delete(self.key(tree, key), None),
            })
            .collect();
        self.call(move |mut kv| async move {
            let t = etcd_client::Txn::new().when(compares).and_then(ops);
            Ok(kv.txn(t).await?.succeeded())
        })
    }

    fn flush(&self) -> KvResult<()> {
        Ok(())
    }

    fn tree_names(&self) -> KvResult<Vec<String>> {
        // Walk the trees by skipping past each one found: one round trip per tree.
        let root = self.cfg.prefix.clone().into_bytes();
        let root_end = prefix_end(&root).expect("the prefix ends with '/'");
        let mut names = Vec::new();
        let mut from = root.clone();
        loop {
            let (start, end) = (from.clone(), root_end.clone());
            let first: Option<Vec<u8>> = self.call(move |mut kv| async move {
                let opts = GetOptions::new()
                    .with_range(end)
                    .with_limit(1)
                    .with_keys_only();
                let mut r = kv.get(start, Some(opts)).await?;
                Ok(r.take_kvs().into_iter().next().map(|kv| kv.key().to_vec()))
            })?;
            let Some(k) = first else { break };
            let rest = &k[root.len()..];
            let Some(slash) = rest.iter().position(|b| *b == b'/') else {
                break;
            };
            let name = String::from_utf8_lossy(&rest[..slash]).into_owned();
            from = prefix_end(&self.tree_prefix(&name)).expect("ends with '/'");
            names.push(name);
        }
        Ok(names)
    }
}
