//! Which controller does the work that must happen once: CRL signing and publication,
//! renewals of portal-domain certificates, expiry of blocks and purging of sessions.
//!
//! With the embedded store there is one controller and it always leads
//! ([`Leadership::always`]). With several controllers on one etcd cluster, [`campaign`]
//! holds an etcd lease and puts the leader key under it only when the key is absent (one
//! transaction), so at most one controller holds it; the lease is kept alive every third
//! of its TTL. A controller that dies stops the keepalives and its key goes with the lease,
//! so another takes over within the TTL plus one poll ([`LeaseConfig`]: 2 s + 250 ms by
//! default, well inside 5 s). A controller that stops cleanly revokes its lease first.
//!
//! Leadership is fenced by time on the holder's side: it counts as leader only until the
//! moment its last acknowledged keepalive (measured from when it was sent) runs out, so
//! a controller cut off from etcd stops acting as leader before etcd gives the key to
//! another one.

use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp};
use parking_lot::Mutex;
use thiserror::Error;
use tokio_util::sync::CancellationToken;

/// Why a campaign could not run at all.
#[derive(Debug, Error)]
pub enum LeaderError {
    #[error("leader election on etcd at {endpoints}: {detail}")]
    Etcd { endpoints: String, detail: String },
}

/// Timing of the lease.
#[derive(Clone, Copy, Debug)]
pub struct LeaseConfig {
    /// Lease TTL (etcd rounds to whole seconds; at least 2 s with its default timings).
    pub ttl: Duration,
    /// How often a follower looks whether the leader key is gone.
    pub poll: Duration,
    /// Deadline of each call to etcd.
    pub call_timeout: Duration,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(2),
            poll: Duration::from_millis(250),
            call_timeout: Duration::from_secs(1),
        }
    }
}

#[derive(Debug)]
struct State {
    /// Leader until this instant (`None`: not leader).
    until: Option<Instant>,
    /// The holder of the leader key as last seen (its id), if any.
    holder: Option<String>,
}

#[derive(Debug)]
struct Inner {
    id: String,
    always: bool,
    state: Mutex<State>,
    changed: tokio::sync::watch::Sender<bool>,
}

/// This controller's view of who leads. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Leadership {
    inner: Arc<Inner>,
}

impl Leadership {
    /// The only controller of its store: always the leader.
    pub fn always(id: impl Into<String>) -> Self {
        let id = id.into();
        Self::with(id.clone(), true, Some(id))
    }

    /// A controller that leads only while [`campaign`] holds the lease for it.
    pub fn elected(id: impl Into<String>) -> Self {
        Self::with(id.into(), false, None)
    }

    fn with(id: String, always: bool, holder: Option<String>) -> Self {
        Self {
            inner: Arc::new(Inner {
                id,
                always,
                state: Mutex::new(State {
                    until: None,
                    holder,
                }),
                changed: tokio::sync::watch::Sender::new(always),
            }),
        }
    }

    /// This controller's id (what the leader key holds while it leads).
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// True while this controller may do the once-only work.
    pub fn is_leader(&self) -> bool {
        self.inner.always
            || self
                .inner
                .state
                .lock()
                .until
                .is_some_and(|u| Instant::now() < u)
    }

    /// The id of the controller that holds the leader key, as last seen.
    pub fn holder(&self) -> Option<String> {
        if self.is_leader() {
            return Some(self.inner.id.clone());
        }
        self.inner.state.lock().holder.clone()
    }

    /// Resolves once this controller leads (at once when it does now).
    pub async fn wait_leader(&self) {
        let mut rx = self.inner.changed.subscribe();
        while !self.is_leader() {
            // A lapse by time sends nothing, so look again at least every 100 ms.
            let _ = tokio::time::timeout(Duration::from_millis(100), rx.changed()).await;
        }
    }

    fn lead_until(&self, until: Instant) {
        let was = self.is_leader();
        self.inner.state.lock().until = Some(until);
        if !was {
            tracing::info!(id = %self.inner.id, "this controller is now the leader");
            self.inner.changed.send_replace(true);
        }
    }

    fn step_down(&self, holder: Option<String>) {
        let was = self.is_leader();
        {
            let mut st = self.inner.state.lock();
            st.until = None;
            st.holder = holder;
        }
        if was && !self.inner.always {
            tracing::warn!(id = %self.inner.id, "this controller no longer leads");
            self.inner.changed.send_replace(false);
        }
    }

    fn saw_holder(&self, holder: Option<String>) {
        self.inner.state.lock().holder = holder;
    }
}

/// The etcd members the campaign talks to, one at a time: its own clients (lease traffic
/// never waits behind the store's calls), one per member and made when first needed. A
/// client balanced over every member would keep choosing a dead one; so, as the store's
/// backend does, the campaign sticks to one member and moves to the next when a call
/// fails.
pub struct Members {
    endpoints: Vec<String>,
    options: etcd_client::ConnectOptions,
    clients: Vec<Option<etcd_client::Client>>,
    current: usize,
}

impl Members {
    fn describe(&self) -> String {
        self.endpoints.join(",")
    }

    /// The client of the current member, connecting to it if need be.
    async fn client(&mut self) -> EtcdResult<etcd_client::Client> {
        let i = self.current;
        if self.clients[i].is_none() {
            let c = tokio::time::timeout(
                CONNECT_TIMEOUT,
                etcd_client::Client::connect([&self.endpoints[i]], Some(self.options.clone())),
            )
            .await
            .map_err(|_| etcd_client::Error::InvalidArgs("etcd connect timed out".into()))??;
            self.clients[i] = Some(c);
        }
        Ok(self.clients[i].clone().expect("set above"))
    }

    /// The current member failed: forget its client and move on to the next member.
    fn next(&mut self) {
        self.clients[self.current] = None;
        self.current = (self.current + 1) % self.endpoints.len();
    }
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// The members to campaign on (nothing is dialled yet; a member that is down at start is
/// simply skipped when the campaign reaches it).
pub fn connect(
    endpoints: &[String],
    options: Option<etcd_client::ConnectOptions>,
) -> Result<Members, LeaderError> {
    if endpoints.is_empty() {
        return Err(LeaderError::Etcd {
            endpoints: String::new(),
            detail: "no etcd endpoint given".into(),
        });
    }
    let options = options
        .unwrap_or_default()
        .with_connect_timeout(CONNECT_TIMEOUT)
        .with_keep_alive(Duration::from_secs(1), Duration::from_secs(2));
    Ok(Members {
        endpoints: endpoints.to_vec(),
        options,
        clients: vec![None; endpoints.len()],
        current: 0,
    })
}

/// Campaign for `key` until `stop`: lead while the lease holds, follow otherwise, and try
/// again after any etcd failure (on the next member). Never returns an error: etcd being
/// away only means this controller does not lead.
pub async fn campaign(
    mut members: Members,
    key: Vec<u8>,
    lead: Leadership,
    cfg: LeaseConfig,
    stop: CancellationToken,
) {
    while !stop.is_cancelled() {
        // The round watches `stop` itself, so a leader revokes its lease on the way out
        // (every etcd call in it has a deadline).
        let r = match members.client().await {
            Ok(mut c) => round(&mut c, &key, &lead, cfg, &stop).await,
            Err(e) => Err(e),
        };
        lead.step_down(None);
        if let Err(e) = r {
            tracing::warn!(error = %e, endpoints = %members.describe(), "leader election: etcd call failed; trying the next member");
            members.next();
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(cfg.poll) => {}
            }
        }
    }
    lead.step_down(None);
}

type EtcdResult<T> = Result<T, etcd_client::Error>;

async fn timed<T>(
    cfg: LeaseConfig,
    f: impl std::future::Future<Output = EtcdResult<T>>,
) -> EtcdResult<T> {
    tokio::time::timeout(cfg.call_timeout, f)
        .await
        .map_err(|_| etcd_client::Error::InvalidArgs("etcd call timed out".into()))?
}

/// One attempt: wait until the key is free, take it, and hold it until the lease is lost
/// or `stop` (then the lease is revoked). `Ok` after a clean end or a lost lease.
async fn round(
    c: &mut etcd_client::Client,
    key: &[u8],
    lead: &Leadership,
    cfg: LeaseConfig,
    stop: &CancellationToken,
) -> EtcdResult<()> {
    // Follow while someone else holds the key.
    loop {
        let r = timed(cfg, c.get(key, None)).await?;
        match r.kvs().first() {
            Some(kv) => lead.saw_holder(Some(String::from_utf8_lossy(kv.value()).into_owned())),
            None => break,
        }
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(cfg.poll) => {}
        }
    }
    let ttl = i64::try_from(cfg.ttl.as_secs().max(1)).unwrap_or(2);
    let granted_at = Instant::now();
    let lease = timed(cfg, c.lease_grant(ttl, None)).await?;
    let lease_id = lease.id();
    let txn = Txn::new()
        .when([Compare::create_revision(key, CompareOp::Equal, 0)])
        .and_then([TxnOp::put(
            key,
            lead.id().as_bytes(),
            Some(PutOptions::new().with_lease(lease_id)),
        )])
        .or_else([TxnOp::get(key, None::<GetOptions>)]);
    let won = match timed(cfg, c.txn(txn)).await {
        Ok(r) => r.succeeded(),
        Err(e) => {
            let _ = timed(cfg, c.lease_revoke(lease_id)).await;
            return Err(e);
        }
    };
    if !won {
        let _ = timed(cfg, c.lease_revoke(lease_id)).await;
        return Ok(());
    }
    let granted = Duration::from_secs(u64::try_from(lease.ttl()).unwrap_or(0));
    lead.lead_until(granted_at + granted);
    let held = hold(c, key, lease_id, lead, cfg, stop).await;
    lead.step_down(None);
    // Let another controller take over at once (a lost lease is already gone).
    let _ = timed(cfg, c.lease_revoke(lease_id)).await;
    held
}

/// Keep the lease alive every third of its TTL; each acknowledged keepalive extends the
/// leadership to (sent + TTL). Ends when the lease is gone, the key is no longer ours, the
/// leadership ran out without an acknowledgement, or at `stop`.
async fn hold(
    c: &mut etcd_client::Client,
    key: &[u8],
    lease_id: i64,
    lead: &Leadership,
    cfg: LeaseConfig,
    stop: &CancellationToken,
) -> EtcdResult<()> {
    let (mut keeper, mut acks) = timed(cfg, c.lease_keep_alive(lease_id)).await?;
    let every = cfg.ttl / 3;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(every) => {}
        }
        if !lead.is_leader() {
            tracing::warn!("leader lease ran out without a keepalive answer");
            return Ok(());
        }
        let sent = Instant::now();
        let ack = async {
            keeper.keep_alive().await?;
            acks.message().await
        };
        match tokio::time::timeout(every.max(Duration::from_millis(200)), ack).await {
            Ok(Ok(Some(a))) if a.ttl() > 0 => {
                lead.lead_until(sent + Duration::from_secs(u64::try_from(a.ttl()).unwrap_or(0)));
            }
            Ok(Ok(_)) => {
                tracing::warn!("leader lease expired");
                return Ok(());
            }
            Ok(Err(e)) => return Err(e),
            // No answer in time: try again while the leadership lasts.
            Err(_) => continue,
        }
        // The key must still be ours (nobody deleted or replaced it).
        match timed(cfg, c.get(key, None)).await {
            Ok(r) if r.kvs().first().is_some_and(|kv| kv.lease() == lease_id) => {}
            Ok(r) => {
                let holder = r
                    .kvs()
                    .first()
                    .map(|kv| String::from_utf8_lossy(kv.value()).into_owned());
                tracing::warn!(?holder, "the leader key is no longer ours");
                lead.step_down(holder);
                return Ok(());
            }
            Err(e) => tracing::debug!(error = %e, "reading the leader key failed"),
        }
    }
}
