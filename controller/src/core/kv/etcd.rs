//! The etcd backend: every tree is a key prefix `<prefix><tree>/` (default prefix
//! `/zonemesh/`), keys and values are stored as given (binary-safe). A [`Txn`] is one etcd
//! transaction whose compares are on the value or the existence (version 0) of each
//! checked key, so it applies whole or not at all on the cluster. An acknowledged
//! transaction is already durable (etcd commits it through its raft log), so `flush` has
//! nothing left to do.
//!
//! The backend is synchronous: a dedicated thread runs a current-thread tokio runtime with
//! one etcd client per member; each call is sent to it and waited for with a deadline. The
//! thread and every call in flight end when the backend is dropped (no detached tasks).
//!
//! **A dead member.** Calls go to one member (the *current* one) until it fails; then the
//! next member becomes current and the call is tried there, within the call's deadline
//! ([`EtcdConfig::timeout`], each attempt at most [`ATTEMPT_TIMEOUT`]). What is tried
//! again depends on what the failure says about the first attempt:
//! - *not sent* (no connection could be made, or the member refused because it has no
//!   leader): nothing was applied, so any call is tried again;
//! - *unknown* (the connection broke or the deadline passed while the request was out):
//!   reads are tried again; a transaction only when its checks make a replay harmless
//!   ([`replay_is_noop`]: a key it checks is left by its own writes in a state that fails
//!   the check, as "absent, then put" or "equal to N, then N+1"). If such a replay then
//!   finds its checks failing, the first attempt may have applied, and the call is an
//!   error saying so, never "not applied". Any other write is not replayed: the error says
//!   the change may or may not have been applied.
//!
//! A cluster that stays unreachable is [`KvError::Unreachable`] after the deadline, naming
//! every endpoint and the last failure seen on each.

use super::{Backend, Cond, KvError, KvResult, Op, Pair, Query, Txn, prefix_end};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, KvClient, SortOrder, SortTarget, TxnOp,
};
use std::future::Future;
use std::ops::Bound;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc as std_mpsc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Deadline of every call to etcd (every attempt and endpoint included).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Deadline of one attempt on one member: a member that does not answer in this time (a
/// follower whose leader just died, a partitioned host) leaves time to try another.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Pause after every member failed in turn, doubled up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_millis(400);

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

/// One client per member, and which member calls go to now.
struct Members {
    endpoints: Vec<String>,
    clients: Vec<KvClient>,
    current: AtomicUsize,
}

impl Members {
    fn current(&self) -> usize {
        self.current.load(Ordering::Relaxed) % self.clients.len()
    }

    /// Member `failed` failed: move on to the next one, unless another call already did.
    fn rotate_from(&self, failed: usize) {
        let next = (failed + 1) % self.clients.len();
        let _ = self
            .current
            .compare_exchange(failed, next, Ordering::Relaxed, Ordering::Relaxed);
    }
}

type Job = Box<dyn FnOnce(Arc<Members>) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

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

/// What a call is, for what may be tried again after a failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Call {
    /// Reads: always safe to try again.
    Read,
    /// A write; `replay_safe` when its checks make a replay after an applied first attempt
    /// fail instead of applying twice.
    Write { replay_safe: bool },
}

/// How one attempt failed.
#[derive(Debug, PartialEq, Eq)]
enum Failure {
    /// The request never reached a member that could apply it.
    NotSent(String),
    /// The request may have been applied.
    Unknown(String),
    /// A refusal that another member would repeat (bad request, permission, ...).
    Final(String),
}

/// The deepest cause of `e` (the operating system's word, as "Connection refused").
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// True when `e`'s causes include a failure to connect (the request was never sent).
fn is_connect_error(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.downcast_ref::<tonic::ConnectError>().is_some() {
            return true;
        }
        cur = err.source();
    }
    false
}

fn classify(e: etcd_client::Error) -> Failure {
    match e {
        // Only `Client::connect` gives a transport error: nothing was sent.
        etcd_client::Error::TransportError(t) => {
            Failure::NotSent(format!("transport error: {} ({})", t, root_cause(&t)))
        }
        etcd_client::Error::GRpcStatus(s) => {
            let root = root_cause(&s);
            let detail = if root.is_empty() || root == s.message() {
                format!("{:?}: {}", s.code(), s.message())
            } else {
                format!("{:?}: {} ({root})", s.code(), s.message())
            };
            match s.code() {
                tonic::Code::Unavailable if is_connect_error(&s) => Failure::NotSent(detail),
                // `require_leader`: the member refuses before proposing anything.
                tonic::Code::Unavailable if s.message().contains("no leader") => {
                    Failure::NotSent(detail)
                }
                tonic::Code::Unavailable
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Cancelled
                | tonic::Code::Unknown
                | tonic::Code::Internal
                | tonic::Code::Aborted => Failure::Unknown(detail),
                _ => Failure::Final(detail),
            }
        }
        other => Failure::Final(other.to_string()),
    }
}

/// True when a replay of `txn` after an applied first attempt cannot apply again: one of
/// its checks is on a key its own writes leave in a state failing that check.
pub fn replay_is_noop(txn: &Txn) -> bool {
    txn.checks.iter().any(|c| {
        // The key's state after the transaction: `None` untouched, `Some(None)` deleted.
        let mut after: Option<Option<&[u8]>> = None;
        for op in &txn.ops {
            match op {
                Op::Put { tree, key, value } if *tree == c.tree && *key == c.key => {
                    after = Some(Some(value))
                }
                Op::Delete { tree, key } if *tree == c.tree && *key == c.key => after = Some(None),
                _ => {}
            }
        }
        match (after, &c.cond) {
            (None, _) => false,
            (Some(None), Cond::Absent) => false,
            (Some(None), _) => true,
            (Some(Some(_)), Cond::Absent) => true,
            (Some(Some(_)), Cond::Present) => false,
            (Some(Some(v)), Cond::Equals(old)) => v != old.as_slice(),
        }
    })
}

/// A call's result, and whether an earlier attempt of it may have applied.
struct Done<T> {
    value: T,
    after_unknown: bool,
}

/// Run `f` on the current member, moving on to the next one on failure as the module
/// documentation says, until it succeeds, fails for good, or `budget` has passed.
async fn with_failover<T, F, Fut>(
    members: &Members,
    call: Call,
    budget: Duration,
    f: F,
) -> KvResult<Done<T>>
where
    F: Fn(KvClient) -> Fut,
    Fut: Future<Output = Result<T, etcd_client::Error>>,
{
    let started = tokio::time::Instant::now();
    let deadline = started + budget;
    let all = members.endpoints.join(",");
    let mut last: Vec<Option<String>> = vec![None; members.clients.len()];
    let mut after_unknown = false;
    let mut attempts = 0usize;
    let mut backoff = FIRST_BACKOFF;
    loop {
        let i = members.current();
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let per = left.min(ATTEMPT_TIMEOUT);
        attempts += 1;
        let failure = match tokio::time::timeout(per, f(members.clients[i].clone())).await {
            Ok(Ok(value)) => {
                return Ok(Done {
                    value,
                    after_unknown,
                });
            }
            Ok(Err(e)) => classify(e),
            Err(_) => Failure::Unknown(format!("no answer within {} ms", per.as_millis())),
        };
        let ep = &members.endpoints[i];
        let why = match failure {
            Failure::Final(why) => {
                return Err(KvError::Etcd {
                    endpoints: all,
                    detail: format!("{ep}: {why}"),
                });
            }
            Failure::NotSent(why) => why,
            Failure::Unknown(why) => {
                match call {
                    Call::Read => {}
                    Call::Write { replay_safe: true } => after_unknown = true,
                    Call::Write { replay_safe: false } => {
                        members.rotate_from(i);
                        return Err(KvError::Unreachable {
                            endpoints: all,
                            detail: format!(
                                "{ep}: {why}; the change may or may not have been applied \
                                 (not tried again: its checks do not make a replay harmless)"
                            ),
                        });
                    }
                }
                why
            }
        };
        members.rotate_from(i);
        last[i] = Some(why);
        let now = tokio::time::Instant::now();
        if now + FIRST_BACKOFF >= deadline {
            let seen: Vec<String> = members
                .endpoints
                .iter()
                .zip(&last)
                .map(|(ep, w)| format!("{ep}: {}", w.as_deref().unwrap_or("not tried")))
                .collect();
            let mut detail = format!(
                "{} attempts in {} ms failed; {}",
                attempts,
                now.duration_since(started).as_millis(),
                seen.join("; ")
            );
            if after_unknown {
                detail.push_str("; the change may or may not have been applied");
            }
            return Err(KvError::Unreachable {
                endpoints: all,
                detail,
            });
        }
        if attempts.is_multiple_of(members.clients.len()) {
            // Every member failed in turn: wait a little (an election takes about a second).
            tokio::time::sleep(backoff.min(deadline.saturating_duration_since(now))).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
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
    /// Start the client thread for `cfg`. Nothing is contacted yet (the first call is), so
    /// this returns at once and may be called from anywhere, an async worker included: the
    /// clients are made on the backend's own thread, which only checks the endpoints.
    pub fn open(cfg: EtcdConfig) -> KvResult<Self> {
        if cfg.endpoints.is_empty() {
            return Err(KvError::BadUrl {
                url: super::url::StoreUrl::Etcd(cfg).to_string(),
                why: "no etcd endpoint".into(),
            });
        }
        let options = connect_options(&cfg)?;
        let scheme = if cfg.tls.is_some() { "https" } else { "http" };
        let endpoints = cfg.endpoints.clone();
        let joined = cfg.endpoints.join(",");
        let (tx, mut rx) = mpsc::unbounded_channel::<Job>();
        let (ready_tx, ready_rx) = std_mpsc::sync_channel::<KvResult<()>>(1);
        let eps = joined.clone();
        // The runtime is built and the clients made on the thread itself, so opening works
        // from any context (also from within another runtime).
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
                    // One client per member (connected lazily, on first use), so a dead
                    // member is left for the next one instead of being balanced onto.
                    let mut clients = Vec::new();
                    for ep in &endpoints {
                        let url = format!("{scheme}://{ep}");
                        match Client::connect([url], Some(options.clone())).await {
                            Ok(c) => clients.push(c.kv_client()),
                            Err(e) => {
                                let _ = ready_tx.send(Err(KvError::Etcd {
                                    endpoints: eps,
                                    detail: format!("{ep}: {e}"),
                                }));
                                return;
                            }
                        }
                    }
                    let members = Arc::new(Members {
                        endpoints,
                        clients,
                        current: AtomicUsize::new(0),
                    });
                    let _ = ready_tx.send(Ok(()));
                    let mut tasks = tokio::task::JoinSet::new();
                    loop {
                        tokio::select! {
                            job = rx.recv() => match job {
                                Some(job) => { tasks.spawn(job(members.clone())); }
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

    /// Run `f` on the client thread (tried on the members as [`with_failover`] does) and
    /// wait for it, at most the call deadline.
    fn call<T, F, Fut>(&self, call: Call, f: F) -> KvResult<Done<T>>
    where
        T: Send + 'static,
        F: Fn(KvClient) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
    {
        let budget = self.cfg.timeout;
        let (tx, rx) = std_mpsc::sync_channel(1);
        let job: Job = Box::new(move |members| {
            Box::pin(async move {
                let r = with_failover(&members, call, budget, f).await;
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
        // The job keeps its own deadline; this one only guards against a stuck thread.
        match rx.recv_timeout(budget + Duration::from_secs(1)) {
            Ok(r) => r,
            Err(_) => Err(unreachable(format!(
                "no answer within {} ms (the change may or may not have been applied)",
                budget.as_millis()
            ))),
        }
    }

    fn read<T, F, Fut>(&self, f: F) -> KvResult<T>
    where
        T: Send + 'static,
        F: Fn(KvClient) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
    {
        self.call(Call::Read, f).map(|d| d.value)
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
        self.read(move |mut kv| {
            let k = k.clone();
            async move {
                let mut r = kv.get(k, None).await?;
                Ok(r.take_kvs()
                    .into_iter()
                    .next()
                    .map(|kv| kv.value().to_vec()))
            }
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
        self.read(move |mut kv| {
            let (start, end) = (start.clone(), end.clone());
            async move {
                let opts = GetOptions::new()
                    .with_range(end)
                    .with_limit(limit)
                    .with_sort(SortTarget::Key, order);
                let mut r = kv.get(start, Some(opts)).await?;
                Ok(r.take_kvs()
                    .into_iter()
                    .map(|kv| (kv.key()[strip..].to_vec(), kv.value().to_vec()))
                    .collect())
            }
        })
    }

    fn count(&self, tree: &str) -> KvResult<usize> {
        let p = self.tree_prefix(tree);
        self.read(move |mut kv| {
            let p = p.clone();
            async move {
                let r = kv
                    .get(p, Some(GetOptions::new().with_prefix().with_count_only()))
                    .await?;
                Ok(r.count().max(0) as usize)
            }
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
        let t = etcd_client::Txn::new().when(compares).and_then(ops);
        let call = Call::Write {
            replay_safe: replay_is_noop(txn),
        };
        let done = self.call(call, move |mut kv| {
            let t = t.clone();
            async move { Ok(kv.txn(t).await?.succeeded()) }
        })?;
        if done.after_unknown && !done.value {
            // The checks fail on the replay: the attempt whose answer was lost may have
            // applied (or another writer changed a checked key meanwhile).
            return Err(KvError::Unreachable {
                endpoints: self.endpoints(),
                detail: "an attempt's answer was lost and the retry found its checks \
                         failing: the change may or may not have been applied"
                    .into(),
            });
        }
        Ok(done.value)
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
            let first: Option<Vec<u8>> = self.read(move |mut kv| {
                let (start, end) = (start.clone(), end.clone());
                async move {
                    let opts = GetOptions::new()
                        .with_range(end)
                        .with_limit(1)
                        .with_keys_only();
                    let mut r = kv.get(start, Some(opts)).await?;
                    Ok(r.take_kvs().into_iter().next().map(|kv| kv.key().to_vec()))
                }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn txn(f: impl FnOnce(&mut Txn)) -> Txn {
        let mut t = Txn::new();
        f(&mut t);
        t
    }

    #[test]
    fn a_replay_is_harmless_only_when_a_check_fails_after_the_writes() {
        // Absent, then put: the replay finds the key present.
        assert!(replay_is_noop(&txn(|t| {
            t.check("tokens", "a", Cond::Absent)
                .put("tokens", "a", b"1".to_vec());
        })));
        // Equal to N, then N+1 (the enrollment's version counter).
        assert!(replay_is_noop(&txn(|t| {
            t.expect("meta", "v", Some(b"7"))
                .put("meta", "v", b"8".to_vec())
                .put("nodes", "eu/n1", b"x".to_vec());
        })));
        // Equal, then deleted; present, then deleted.
        assert!(replay_is_noop(&txn(|t| {
            t.expect("nodes", "n", Some(b"x")).delete("nodes", "n");
        })));
        assert!(replay_is_noop(&txn(|t| {
            t.check("nodes", "n", Cond::Present).delete("nodes", "n");
        })));
        // No check, or checks the writes leave true: a replay would apply again.
        assert!(!replay_is_noop(&txn(|t| {
            t.put("nodes", "n", b"x".to_vec());
        })));
        assert!(!replay_is_noop(&txn(|t| {
            t.check("nodes", "n", Cond::Present)
                .put("nodes", "n", b"y".to_vec());
        })));
        assert!(!replay_is_noop(&txn(|t| {
            t.expect("meta", "v", Some(b"7"))
                .put("meta", "v", b"7".to_vec());
        })));
        assert!(!replay_is_noop(&txn(|t| {
            t.check("nodes", "n", Cond::Absent).delete("nodes", "n");
        })));
        // A check on a key the writes leave alone.
        assert!(!replay_is_noop(&txn(|t| {
            t.check("zones", "eu", Cond::Present)
                .put("nodes", "eu/n", b"x".to_vec());
        })));
        // The last write of the key counts.
        assert!(!replay_is_noop(&txn(|t| {
            t.check("a", "k", Cond::Absent)
                .put("a", "k", b"1".to_vec())
                .delete("a", "k");
        })));
    }

    #[test]
    fn statuses_are_sorted_by_what_they_say_about_the_request() {
        let s = |code, msg: &str| {
            classify(etcd_client::Error::GRpcStatus(tonic::Status::new(
                code, msg,
            )))
        };
        assert!(matches!(
            s(tonic::Code::Unavailable, "etcdserver: no leader"),
            Failure::NotSent(_)
        ));
        assert!(matches!(
            s(tonic::Code::Unavailable, "etcdserver: leader changed"),
            Failure::Unknown(_)
        ));
        assert!(matches!(
            s(tonic::Code::Unavailable, "etcdserver: request timed out"),
            Failure::Unknown(_)
        ));
        assert!(matches!(
            s(tonic::Code::DeadlineExceeded, "context deadline exceeded"),
            Failure::Unknown(_)
        ));
        assert!(matches!(
            s(
                tonic::Code::InvalidArgument,
                "etcdserver: duplicate key given in txn request"
            ),
            Failure::Final(_)
        ));
        assert!(matches!(
            s(
                tonic::Code::PermissionDenied,
                "etcdserver: permission denied"
            ),
            Failure::Final(_)
        ));
    }

    fn down_store(members: usize) -> (EtcdBackend, Vec<String>) {
        // Ports nothing listens on (bound once, then closed).
        let endpoints: Vec<String> = (0..members)
            .map(|_| {
                let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                format!("127.0.0.1:{}", l.local_addr().unwrap().port())
            })
            .collect();
        let b = EtcdBackend::open(EtcdConfig {
            endpoints: endpoints.clone(),
            prefix: "/zonemesh/".into(),
            tls: None,
            timeout: Duration::from_millis(1500),
        })
        .unwrap();
        (b, endpoints)
    }

    #[test]
    fn a_refused_connection_is_retried_on_every_member_then_named_per_endpoint() {
        let (b, endpoints) = down_store(3);
        let t0 = Instant::now();
        let mut t = Txn::new();
        t.put("nodes", "eu/n1", b"x".to_vec());
        // A write without checks is still tried again: a refused connection sent nothing.
        let err = b.commit(&t).unwrap_err();
        let took = t0.elapsed();
        let msg = err.to_string();
        println!("{took:?}: {msg}");
        assert!(matches!(err, KvError::Unreachable { .. }), "{msg}");
        assert!(took >= Duration::from_millis(1000), "{took:?}: {msg}");
        assert!(took < Duration::from_millis(2500), "{took:?}: {msg}");
        for ep in &endpoints {
            assert!(msg.contains(&format!("{ep}: Unavailable")), "{msg}");
        }
        assert!(msg.contains("attempts in"), "{msg}");
        assert!(msg.to_lowercase().contains("connection refused"), "{msg}");
        assert!(!msg.contains("may or may not"), "{msg}");
        // Reads the same.
        let err = b.get("nodes", b"eu/n1").unwrap_err();
        assert!(matches!(err, KvError::Unreachable { .. }), "{err}");
    }

    #[test]
    fn every_call_to_a_store_that_is_down_is_a_clear_error_within_the_deadline() {
        let (b, endpoints) = down_store(3);
        let kv = super::super::Kv::new(Arc::new(b));
        super::super::suite::unreachable(&kv, &endpoints, Duration::from_millis(2500));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn opening_on_an_async_worker_returns_at_once() {
        // Also on a current-thread runtime, where blocking the worker would stall everything.
        let t0 = Instant::now();
        let (b, _) = down_store(1);
        assert!(
            t0.elapsed() < Duration::from_millis(500),
            "{:?}",
            t0.elapsed()
        );
        // Calls belong on the blocking pool; they keep their deadline there.
        let err = tokio::task::spawn_blocking(move || b.count("nodes"))
            .await
            .unwrap()
            .unwrap_err();
        assert!(matches!(err, KvError::Unreachable { .. }), "{err}");
    }
}
