//! Source blocks: agents' security events, the never-block policy, and the blocklist
//! carried to every agent.

use super::{MAX_BLOCK_REASON, Mesh, store_err};
use crate::audit::{AuditEvent, AuditLog};
use crate::blocklist::{
    self, BlockTiming, Corroborated, EventTrust, Evidence, NeverBlock, Noted, OWN_REPORTER,
    PolicyConfig,
};
use crate::error::{ControllerError, Result};
use crate::limits::Refused;
use crate::store::{
    AllowRecord, BlockRecord, OffenceRecord, Store, StoreError, Txn, decode, encode, from_unix,
    unix,
};
use crate::text::{self, Escaped};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

/// Recent events kept for the Security page.
pub const RECENT_EVENTS: usize = 200;
/// Expired blocks taken off per transaction (a check and a delete each, with the
/// change-log entry: within the store's limit of operations per transaction).
const EXPIRED_PER_TXN: usize = 60;
/// Operator allow-list entries kept.
pub const MAX_ALLOW: usize = 1024;
/// Addresses whose offence history is kept; beyond it, histories past their memory go
/// first, then the oldest.
pub const MAX_OFFENCES: usize = 100_000;

/// One reported kind of one call (or one of the controller's own failures), as shown.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecentEvent {
    pub at_unix: u64,
    /// `zone/node`, or `controller`.
    pub node: String,
    pub kind: String,
    pub source: String,
    pub detail: String,
    /// Events of this kind in the call.
    pub count: u32,
    /// Whether they counted toward a block.
    pub counted: bool,
}

/// Counters of reported events and of blocks, for the metrics.
#[derive(Debug, Default)]
pub struct EventCounts {
    /// By kind: the kinds this controller knows, then "other" (kinds are the agents' text,
    /// so they are never keys by themselves).
    by_kind: [AtomicU64; KNOWN_KINDS.len() + 1],
    /// Automatic blocks placed.
    pub blocks: AtomicU64,
    /// Blocks that ended by themselves.
    pub expired: AtomicU64,
}

/// Kinds counted by name; the rest count as "other".
pub const KNOWN_KINDS: &[&str] = &[
    "ssh.auth_failure",
    "tls.auth_failure",
    "http.auth_failure",
    "sip.auth_failure",
    "log.auth_failure",
    "http.signin_failure",
    "wireguard.unknown_key",
    "wireguard.invalid_handshake",
    "wireguard.spoofed_source",
    "peer.refused",
];

impl EventCounts {
    fn add(&self, kind: &str, n: u32) {
        let i = KNOWN_KINDS
            .iter()
            .position(|k| *k == kind)
            .unwrap_or(KNOWN_KINDS.len());
        self.by_kind[i].fetch_add(u64::from(n), Ordering::Relaxed);
    }

    /// `(kind, events)` for every known kind and "other".
    pub fn by_kind(&self) -> Vec<(&'static str, u64)> {
        KNOWN_KINDS
            .iter()
            .copied()
            .chain(["other"])
            .zip(self.by_kind.iter().map(|c| c.load(Ordering::Relaxed)))
            .collect()
    }
}
use zonemesh_ca::VerifiedNode;
use zonemesh_proto as pb;

impl Mesh {
    /// Security events from an agent. Each is logged; only source-verified kinds about an
    /// address that may be blocked are counted, and a block needs corroboration from
    /// several nodes (see [`crate::blocklist`]). Returns the addresses blocked.
    pub fn report_events(
        &self,
        who: &VerifiedNode,
        events: &pb::SecurityEvents,
        now: SystemTime,
    ) -> Result<Vec<IpAddr>> {
        let node = self.caller(who, now)?;
        let reporter = node.key();
        self.report_rate
            .take(&reporter, now)
            .map_err(|refused| match refused {
                Refused::Full => ControllerError::RateLimited(
                    "too many security reports; try again later".into(),
                ),
                Refused::Empty => ControllerError::RateLimited(
                    "too many security reports from this node; try again later".into(),
                ),
            })?;
        let protected = self.never_block()?;
        let now_unix = unix(now);
        // One log line per kind and call, however many events a flood produces.
        let mut seen: BTreeMap<&str, (u32, &str, &str)> = BTreeMap::new();
        let mut decisions = Vec::new();
        for ev in events.events.iter().take(blocklist::MAX_EVENTS_PER_REPORT) {
            let kind = text::cap(&ev.kind, blocklist::MAX_KIND);
            let source = text::cap(&ev.source, blocklist::MAX_SOURCE);
            self.metrics().security_event(kind);
            let e = seen.entry(kind).or_insert((
                0,
                source,
                text::cap(&ev.detail, blocklist::MAX_DETAIL),
            ));
            e.0 += 1;
            if blocklist::classify(kind) != EventTrust::SourceVerified {
                continue;
            }
            let Some(ip) = blocklist::parse_source(source) else {
                continue;
            };
            if protected.reason(ip).is_some() || self.is_blocked(ip, now)? {
                continue;
            }
            if let Noted::Block(c) = self.evidence.lock().note(&reporter, ip, kind, now) {
                decisions.push(c);
            }
        }
        for (kind, (count, source, detail)) in &seen {
            let counted = blocklist::classify(kind) == EventTrust::SourceVerified;
            self.event_counts.add(kind, *count);
            self.remember_event(RecentEvent {
                at_unix: now_unix,
                node: reporter.clone(),
                kind: kind.to_string(),
                source: source.to_string(),
                detail: detail.to_string(),
                count: *count,
                counted,
            });
            tracing::info!(
                node = %reporter,
                kind = %Escaped(kind),
                count,
                source = %Escaped(source),
                detail = %Escaped(detail),
                counted,
                "security events reported by agent"
            );
        }
        let mut blocked = Vec::new();
        for c in decisions {
            match self.place_auto_block(&c, now) {
                Ok(()) => blocked.push(c.address),
                Err(e) => tracing::warn!(source = %c.address, error = %e, "block not placed"),
            }
        }
        Ok(blocked)
    }

    /// One of the controller's own authentication failures of `ip` (a failed sign-in): the
    /// same evidence as an agent's report, from the reporter `controller`. Returns whether
    /// it placed a block.
    pub fn note_own_failure(&self, ip: IpAddr, kind: &str, now: SystemTime) -> Result<bool> {
        let ip = ip.to_canonical();
        self.event_counts.add(kind, 1);
        self.remember_event(RecentEvent {
            at_unix: unix(now),
            node: OWN_REPORTER.into(),
            kind: text::capped(kind, blocklist::MAX_KIND),
            source: ip.to_string(),
            detail: String::new(),
            count: 1,
            counted: true,
        });
        if self.never_block()?.reason(ip).is_some() || self.is_blocked(ip, now)? {
            return Ok(false);
        }
        let noted = self.evidence.lock().note(OWN_REPORTER, ip, kind, now);
        match noted {
            Noted::Block(c) => {
                self.place_auto_block(&c, now)?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Block a corroborated source for its offence's length (doubling with each repeat),
    /// remember the offence, and audit the evidence.
    fn place_auto_block(&self, c: &Corroborated, now: SystemTime) -> Result<()> {
        let timing = self.block_timing.lock().clone();
        let key = c.address.to_string();
        let past: Option<OffenceRecord> =
            Store::get(&self.store.block_offences, "block_offences", key.as_str())?;
        let prior = past
            .as_ref()
            .map_or(0, |o| timing.prior(o.offences, from_unix(o.last_unix), now));
        let length = timing.length(prior);
        let until = now + length;
        let offence = prior + 1;
        let evidence = c.describe();
        let reason = format!("security events {evidence}");
        self.place_block(c.address, now, until, &reason, offence)?;
        self.remember_offence(&key, offence, now)?;
        self.event_counts.blocks.fetch_add(1, Ordering::Relaxed);
        self.audit_decision(
            AuditEvent::new("source.blocked", "blocked")
                .actor("mesh")
                .source(c.address)
                .detail(format!(
                    "{evidence}; offence {offence}, blocked for {}s until {}",
                    length.as_secs(),
                    unix(until)
                )),
        );
        Ok(())
    }

    fn remember_offence(&self, key: &str, offences: u32, now: SystemTime) -> Result<()> {
        let tree = &self.store.block_offences;
        if tree.len().map_err(store_err)? >= MAX_OFFENCES
            && !tree.contains_key(key).map_err(store_err)?
        {
            let memory = self.block_timing.lock().memory;
            let mut oldest: Option<(Vec<u8>, u64)> = None;
            let mut dropped = false;
            for (k, v) in tree.iter().flatten() {
                let Ok(o) = crate::store::decode::<OffenceRecord>("block_offences", &v) else {
                    continue;
                };
                if now
                    .duration_since(from_unix(o.last_unix))
                    .unwrap_or_default()
                    >= memory
                {
                    tree.remove(&k).map_err(store_err)?;
                    dropped = true;
                } else if oldest.as_ref().is_none_or(|(_, t)| o.last_unix < *t) {
                    oldest = Some((k, o.last_unix));
                }
            }
            if !dropped && let Some((k, _)) = oldest {
                tree.remove(k).map_err(store_err)?;
            }
        }
        tree.insert(
            key,
            encode(&OffenceRecord {
                offences,
                last_unix: unix(now),
            }),
        )
        .map_err(store_err)?;
        // The block's commit flushed before; this record rides the next flush, and a crash
        // in between costs one doubling at most.
        Ok(())
    }

    fn remember_event(&self, e: RecentEvent) {
        let mut r = self.recent_events.lock();
        if r.len() >= RECENT_EVENTS {
            r.pop_front();
        }
        r.push_back(e);
    }

    /// The last reported events, newest first.
    pub fn recent_events(&self) -> Vec<RecentEvent> {
        self.recent_events.lock().iter().rev().cloned().collect()
    }

    /// Event and block counters (for the metrics).
    pub fn event_counts(&self) -> &EventCounts {
        &self.event_counts
    }

    /// Use `policy` from now on (thresholds, window, block lengths). Evidence gathered so
    /// far is dropped.
    pub fn set_block_policy(&self, policy: &PolicyConfig) {
        *self.evidence.lock() = Evidence::new(policy.evidence.clone());
        *self.block_timing.lock() = policy.timing.clone();
    }

    /// The block lengths in force.
    pub fn block_timing(&self) -> BlockTiming {
        self.block_timing.lock().clone()
    }

    /// Past offences of `ip` (0 when none is remembered).
    pub fn offences(&self, ip: IpAddr) -> Result<u32> {
        Ok(Store::get::<OffenceRecord>(
            &self.store.block_offences,
            "block_offences",
            ip.to_canonical().to_string(),
        )?
        .map_or(0, |o| o.offences))
    }

    /// Add `net` to the operator allow-list: never blocked, and blocks inside it are lifted
    /// at once. Returns the record and the lifted addresses.
    pub fn allow_add(
        &self,
        net: ipnet::IpNet,
        note: &str,
        now: SystemTime,
    ) -> Result<(AllowRecord, Vec<IpAddr>)> {
        let net = net.trunc();
        let key = net.to_string();
        let tree = &self.store.block_allow;
        if tree.len().map_err(store_err)? >= MAX_ALLOW
            && !tree.contains_key(&key).map_err(store_err)?
        {
            return Err(ControllerError::BadRequest(format!(
                "the allow-list holds at most {MAX_ALLOW} ranges"
            )));
        }
        let rec = AllowRecord {
            net,
            added_unix: unix(now),
            note: text::capped(note, MAX_BLOCK_REASON),
        };
        tree.insert(key.as_str(), encode(&rec)).map_err(store_err)?;
        self.store.flush()?;
        *self.never_block.lock() = None;
        let lifted = self.lift_forbidden_blocks()?;
        Ok((rec, lifted))
    }

    /// Take `net` off the allow-list.
    pub fn allow_remove(&self, net: ipnet::IpNet) -> Result<AllowRecord> {
        let key = net.trunc().to_string();
        let rec: AllowRecord = Store::get(&self.store.block_allow, "block_allow", key.as_str())?
            .ok_or_else(|| ControllerError::NotFound(format!("{key} is not on the allow-list")))?;
        self.store.block_allow.remove(key).map_err(store_err)?;
        self.store.flush()?;
        *self.never_block.lock() = None;
        Ok(rec)
    }

    /// The operator allow-list, by range.
    pub fn allow_list(&self) -> Result<Vec<AllowRecord>> {
        Ok(Store::all(&self.store.block_allow, "block_allow")?)
    }

    /// End the blocks whose time is up: off the store and every agent's set, each audited
    /// with the evidence it was placed on. Returns them.
    pub fn expire_blocks(&self, now: SystemTime) -> Result<Vec<BlockRecord>> {
        let mut due = Vec::new();
        for item in self.store.blocks.iter() {
            let (k, v) = item.map_err(store_err)?;
            let rec: BlockRecord = decode("blocks", &v)?;
            if rec.until_unix <= unix(now) {
                due.push((k, v, rec));
            }
        }
        let mut expired = Vec::new();
        // Each batch is one transaction: the records (checked unchanged) go together with
        // the change that tells the agents, or not at all.
        for batch in due.chunks(EXPIRED_PER_TXN) {
            let mut txn = Txn::new();
            for (k, v, _) in batch {
                txn.expect("blocks", k, Some(v)).delete("blocks", k);
            }
            let delta = pb::Delta {
                unblocked: batch
                    .iter()
                    .map(|(_, _, b)| b.address.to_string())
                    .collect(),
                ..Default::default()
            };
            match self.commit_txn(delta, txn) {
                Ok(_) => {}
                Err(ControllerError::Store(StoreError::Conflict)) => {
                    // One of them was placed again or lifted meanwhile: the next sweep
                    // reads them afresh.
                    tracing::info!(
                        blocks = batch.len(),
                        "block expiry skipped: changed meanwhile"
                    );
                    continue;
                }
                Err(e) => return Err(e),
            }
            let batch: Vec<BlockRecord> = batch.iter().map(|(_, _, b)| b.clone()).collect();
            self.audit_expired(&batch);
            expired.extend(batch);
        }
        Ok(expired)
    }

    /// Count and audit blocks taken off at their end.
    fn audit_expired(&self, expired: &[BlockRecord]) {
        self.metrics().blocks_expired(expired.len() as u64);
        for b in expired {
            self.event_counts.expired.fetch_add(1, Ordering::Relaxed);
            tracing::info!(source = %b.address, "block expired");
            self.audit_decision(
                AuditEvent::new("source.block_expired", "ok")
                    .actor("mesh")
                    .source(b.address)
                    .detail(format!(
                        "blocked from {} until {}: {}",
                        b.since_unix, b.until_unix, b.reason
                    )),
            );
        }
    }

    /// Record a decision in the audit log, when one is attached.
    pub fn audit_decision(&self, event: AuditEvent) {
        if let Some(a) = self.audit.get()
            && let Err(e) = a.record(event)
        {
            tracing::error!(error = %e, "audit record failed");
        }
    }

    /// Write automatic block decisions to `audit` from now on.
    pub fn attach_audit(&self, audit: Arc<AuditLog>) {
        let _ = self.audit.set(audit);
    }

    /// The controller's own addresses, never blocked; `what` names each (e.g. "the
    /// controller's gRPC address").
    pub fn set_own_addresses(&self, addresses: Vec<(IpAddr, String)>) {
        *self.own_addresses.lock() = addresses;
        *self.never_block.lock() = None;
    }

    /// Every address that may not be blocked, as of now.
    pub fn never_block(&self) -> Result<Arc<NeverBlock>> {
        // Built under the lock, so a commit that invalidates it waits for a build that
        // read the store before the change.
        let mut cache = self.never_block.lock();
        if let Some(nb) = cache.as_ref() {
            return Ok(nb.clone());
        }
        let mut nb = NeverBlock::default();
        for (ip, what) in self.own_addresses.lock().iter() {
            nb.add(*ip, what.clone());
        }
        for n in self.store.nodes()?.iter().filter(|n| !n.revoked) {
            nb.add(
                n.overlay_ip,
                format!("the overlay address of node {}", n.key()),
            );
            for e in &n.endpoints {
                nb.add(e.ip(), format!("an endpoint of node {}", n.key()));
            }
        }
        for z in self.store.zones()? {
            nb.add_range(z.cidr, format!("in the overlay range of zone {}", z.name));
        }
        for a in self.allow_list()? {
            nb.add_range(a.net, format!("on the operator allow-list ({})", a.net));
        }
        let nb = Arc::new(nb);
        *cache = Some(nb.clone());
        Ok(nb)
    }

    fn is_blocked(&self, ip: IpAddr, now: SystemTime) -> Result<bool> {
        Ok(
            Store::get::<BlockRecord>(&self.store.blocks, "blocks", ip.to_string())?
                .is_some_and(|b| b.until_unix > unix(now)),
        )
    }

    /// Put a source on the blocklist carried to every agent, unless the never-block policy
    /// forbids it (then a one-line reason).
    pub fn block_source(&self, ip: IpAddr, until: SystemTime, reason: &str) -> Result<()> {
        self.place_block(ip, self.now(), until, reason, 0)
    }

    fn place_block(
        &self,
        ip: IpAddr,
        now: SystemTime,
        until: SystemTime,
        reason: &str,
        offence: u32,
    ) -> Result<()> {
        let ip = ip.to_canonical();
        self.never_block()?.check(ip)?;
        let rec = BlockRecord {
            address: ip,
            until_unix: unix(until),
            reason: text::capped(reason, MAX_BLOCK_REASON),
            since_unix: unix(now),
            offence,
        };
        // The record and the change that tells the agents: one transaction.
        let mut txn = Txn::new();
        txn.put("blocks", ip.to_string(), encode(&rec));
        let delta = pb::Delta {
            blocked: vec![pb::BlockedSource {
                address: ip.to_string(),
                until_unix: rec.until_unix,
                reason: rec.reason.clone(),
            }],
            ..Default::default()
        };
        self.commit_txn(delta, txn)?;
        tracing::warn!(source = %ip, until = rec.until_unix, reason = %Escaped(&rec.reason), "source blocked");
        self.metrics().block_added();
        Ok(())
    }

    /// Take a source off the blocklist; every agent drops it at once.
    pub fn unblock_source(&self, ip: IpAddr) -> Result<BlockRecord> {
        let ip = ip.to_canonical();
        let key = ip.to_string();
        let raw = self
            .store
            .blocks
            .get(&key)
            .map_err(store_err)?
            .ok_or_else(|| ControllerError::NotFound(format!("{ip} is not blocked")))?;
        let rec: BlockRecord = decode("blocks", &raw)?;
        // Checked unchanged, and lifted together with the change that tells the agents.
        let mut txn = Txn::new();
        txn.expect("blocks", &key, Some(&raw))
            .delete("blocks", &key);
        let delta = pb::Delta {
            unblocked: vec![key.clone()],
            ..Default::default()
        };
        self.commit_txn(delta, txn)?;
        self.evidence.lock().forget(ip);
        tracing::info!(source = %ip, "source unblocked");
        self.metrics().block_removed();
        Ok(rec)
    }

    /// Blocks in force at `now`, soonest to end first (ended ones wait for
    /// [`Mesh::expire_blocks`], which audits them).
    pub fn blocks(&self, now: SystemTime) -> Result<Vec<BlockRecord>> {
        let mut out: Vec<BlockRecord> = Store::all::<BlockRecord>(&self.store.blocks, "blocks")?
            .into_iter()
            .filter(|rec| rec.until_unix > unix(now))
            .collect();
        out.sort_by_key(|b| (b.until_unix, b.address));
        Ok(out)
    }

    /// Lift blocks that the never-block policy forbids (placed before it existed, or
    /// naming a node enrolled since); returns the addresses lifted.
    pub fn lift_forbidden_blocks(&self) -> Result<Vec<IpAddr>> {
        let nb = self.never_block()?;
        let mut lifted = Vec::new();
        for rec in Store::all::<BlockRecord>(&self.store.blocks, "blocks")? {
            if let Some(why) = nb.reason(rec.address) {
                self.unblock_source(rec.address)?;
                self.audit_decision(
                    AuditEvent::new("source.unblocked", "ok")
                        .actor("controller")
                        .source(rec.address)
                        .detail(format!("never blocked: it is {why}")),
                );
                lifted.push(rec.address);
            }
        }
        Ok(lifted)
    }
}
