//! Source blocks: agents' security events, the never-block policy, and the blocklist
//! carried to every agent.

use super::{MAX_BLOCK_REASON, Mesh, store_err};
use crate::audit::{AuditEvent, AuditLog};
use crate::blocklist::{self, EventTrust, NeverBlock, Noted};
use crate::error::{ControllerError, Result};
use crate::limits::Refused;
use crate::store::{BlockRecord, Store, encode, unix};
use crate::text::{self, Escaped};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::SystemTime;
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
            let evidence = c.describe();
            let until = now + self.block_duration;
            match self.block_source(c.address, until, &format!("security events {evidence}")) {
                Ok(()) => {
                    self.audit_decision(
                        AuditEvent::new("source.blocked", "blocked")
                            .actor("mesh")
                            .source(c.address)
                            .detail(format!("{evidence}; until {}", unix(until))),
                    );
                    blocked.push(c.address);
                }
                Err(e) => tracing::warn!(source = %c.address, error = %e, "block not placed"),
            }
        }
        Ok(blocked)
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
        let ip = ip.to_canonical();
        self.never_block()?.check(ip)?;
        let rec = BlockRecord {
            address: ip,
            until_unix: unix(until),
            reason: text::capped(reason, MAX_BLOCK_REASON),
        };
        self.store
            .blocks
            .insert(ip.to_string(), encode(&rec))
            .map_err(store_err)?;
        self.commit(pb::Delta {
            blocked: vec![pb::BlockedSource {
                address: ip.to_string(),
                until_unix: rec.until_unix,
                reason: rec.reason.clone(),
            }],
            ..Default::default()
        })?;
        tracing::warn!(source = %ip, until = rec.until_unix, reason = %Escaped(&rec.reason), "source blocked");
        self.metrics().block_added();
        Ok(())
    }

    /// Take a source off the blocklist; every agent drops it at once.
    pub fn unblock_source(&self, ip: IpAddr) -> Result<BlockRecord> {
        let ip = ip.to_canonical();
        let rec: BlockRecord = Store::get(&self.store.blocks, "blocks", ip.to_string())?
            .ok_or_else(|| ControllerError::NotFound(format!("{ip} is not blocked")))?;
        self.store
            .blocks
            .remove(ip.to_string())
            .map_err(store_err)?;
        self.commit(pb::Delta {
            unblocked: vec![ip.to_string()],
            ..Default::default()
        })?;
        self.evidence.lock().forget(ip);
        tracing::info!(source = %ip, "source unblocked");
        self.metrics().block_removed();
        Ok(rec)
    }

    /// Blocks in force at `now`, soonest to end first. Expired ones are dropped from the
    /// store on the way.
    pub fn blocks(&self, now: SystemTime) -> Result<Vec<BlockRecord>> {
        let mut out = Vec::new();
        for rec in Store::all::<BlockRecord>(&self.store.blocks, "blocks")? {
            if rec.until_unix > unix(now) {
                out.push(rec);
            } else if self
                .store
                .blocks
                .remove(rec.address.to_string())
                .map_err(store_err)?
                .is_some()
            {
                self.metrics().blocks_expired(1);
            }
        }
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
