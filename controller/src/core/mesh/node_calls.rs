//! Calls from enrolled nodes: the caller check every Mesh call starts with, renewal, TLS
//! certificates for the node's services, endpoint updates and health reports.

use super::csr::{check_csr_names, same_public_key};
use super::{MAX_HEALTH_ROWS, MAX_PEER_NAME, Mesh, parse_endpoints, store_err};
use crate::authority::owned_cert_ops;
use crate::error::{ControllerError, Result};
use crate::store::{
    CertKind, NodeRecord, StoreError, Txn, decode, encode, node_key, serials_gen_key, unix,
};

/// Serial records of expired certificates a renewal drops at most (the rest go with the
/// next renewals), so the renewal's transaction stays small.
const MAX_PRUNED_PER_RENEWAL: usize = 32;
use crate::text::{self};
use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, SystemTime};
use zonemesh_ca::{NodeRequest, RevocationReason, VerifiedNode, WireGuardKey};
use zonemesh_proto as pb;

/// Whether a renewal keeps the node's key (the default) or is an explicit key rotation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RenewKey {
    /// The CSR must carry the public key of the node's current certificate.
    Keep,
    /// The node asked to move to a new key.
    Rotate,
}

/// Last reported health of a node's peers.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct HealthRow {
    pub peer: String,
    pub loss: f32,
    pub rtt_micros: u32,
    pub reported_unix: u64,
}

impl Mesh {
    /// The caller's current, unrevoked node record. Only the node's current certificate
    /// is accepted (renewal supersedes the previous one, re-enrollment every earlier one),
    /// only while it is valid at `now`, and only with the WireGuard key the node holds.
    pub fn caller(&self, who: &VerifiedNode, now: SystemTime) -> Result<NodeRecord> {
        if who.not_after <= now {
            return Err(ControllerError::Unauthenticated(
                "certificate has expired".into(),
            ));
        }
        if self.auth.is_revoked(&who.serial_hex) {
            return Err(ControllerError::Unauthenticated(
                "certificate has been revoked".into(),
            ));
        }
        let node = self
            .store
            .node(&node_key(&who.id.zone, &who.id.node))?
            .filter(|n| !n.revoked)
            .ok_or_else(|| ControllerError::Unauthenticated("node is not enrolled".into()))?;
        if node.serial_hex != who.serial_hex {
            return Err(ControllerError::Unauthenticated(
                "certificate is not the node's current certificate".into(),
            ));
        }
        if node.wg_public_key != who.wg_public_key.0 {
            return Err(ControllerError::Unauthenticated(
                "certificate binds a WireGuard key the node no longer has".into(),
            ));
        }
        Ok(node)
    }

    fn rate_limited(what: &str) -> ControllerError {
        ControllerError::RateLimited(format!(
            "too many {what} requests from this node; try later"
        ))
    }

    /// A new certificate for the node, for the same key unless `key` is
    /// [`RenewKey::Rotate`]. The new certificate's records, the node record, the previous
    /// certificate's revocation (superseded) with the CRLs listing it, the previous
    /// serial's record and those of serials that expired a day ago or more (their
    /// revocation no longer matters) go in one transaction with the change-log entry. A
    /// certificate signed for a renewal that does not apply is never recorded nor handed
    /// out.
    pub fn renew(
        &self,
        who: &VerifiedNode,
        csr_der: &[u8],
        key: RenewKey,
        now: SystemTime,
    ) -> Result<pb::RenewResponse> {
        let current = self.caller(who, now)?;
        let nkey = current.key();
        if !self.renew_limit.allow(&nkey, now) {
            return Err(Self::rate_limited("renewal"));
        }
        check_csr_names(
            csr_der,
            self.auth.trust_domain(),
            &current.zone,
            &current.node,
        )?;
        if key == RenewKey::Keep && !same_public_key(csr_der, &current.cert_der) {
            return Err(ControllerError::PermissionDenied(
                "renewal keeps the node's key: this CSR is for a different key".into(),
            ));
        }
        let cert = self.auth.sign_node(
            &NodeRequest {
                csr_der,
                zone: &current.zone,
                node: &current.node,
                wg_public_key: WireGuardKey(current.wg_public_key),
            },
            now,
        )?;
        let cutoff = unix(now).saturating_sub(86_400);
        let done = self.commit_revocation(RevocationReason::Superseded, now, || {
            // A revocation or another renewal may have happened meanwhile: only replace
            // the certificate this call was authorised with.
            let bytes = self.store.nodes.get(&nkey).map_err(store_err)?;
            let mut node = match bytes.as_deref().map(|b| decode::<NodeRecord>("nodes", b)) {
                Some(Ok(n)) if !n.revoked && n.serial_hex == current.serial_hex => n,
                Some(Err(e)) => return Err(e.into()),
                _ => {
                    return Err(ControllerError::Unauthenticated(
                        "the node's certificate changed during renewal".into(),
                    ));
                }
            };
            node.serial_hex = cert.serial_hex.clone();
            node.cert_der = cert.der.clone();
            node.not_after_unix = unix(cert.not_after);
            let gen_key = serials_gen_key(&nkey);
            let generation = self.store.meta.get(&gen_key).map_err(store_err)?;
            let mut txn = Txn::new();
            txn.expect("nodes", &nkey, bytes.as_deref())
                .put("nodes", &nkey, encode(&node))
                .delete("node_serials", format!("{nkey}/{}", current.serial_hex));
            owned_cert_ops(
                &mut txn,
                &nkey,
                &cert,
                CertKind::Node,
                nkey.clone(),
                generation.as_deref(),
                now,
            );
            for s in self
                .store
                .node_serials(&nkey)?
                .into_iter()
                .filter(|s| s.not_after_unix < cutoff && s.serial_hex != current.serial_hex)
                .take(MAX_PRUNED_PER_RENEWAL)
            {
                txn.delete("node_serials", format!("{nkey}/{}", s.serial_hex));
            }
            Ok(super::revoke::RevokePlan {
                serials: vec![current.serial_hex.clone()],
                txn,
                delta: pb::Delta {
                    upserted: vec![self.peer_of(&node)],
                    ..Default::default()
                },
                value: (),
            })
        })?;
        self.metrics()
            .certificate_issued(crate::metrics::CertKind::Node);
        tracing::info!(node = %nkey, serial = %cert.serial_hex, superseded = %current.serial_hex, version = done.version, "node certificate renewed");
        Ok(pb::RenewResponse {
            certificate_der: cert.der,
            chain_der: self.auth.chain(),
            ca: Some(self.auth.ca_bundle()),
        })
    }

    /// A TLS certificate for the node's own services: only `<node>.<zone>.<trust-domain>`
    /// and the node's overlay address.
    pub fn issue_tls(
        &self,
        who: &VerifiedNode,
        req: &pb::IssueTlsRequest,
        now: SystemTime,
    ) -> Result<pb::IssueTlsResponse> {
        let node = self.caller(who, now)?;
        if !self.issue_tls_limit.allow(&node.key(), now) {
            return Err(Self::rate_limited("TLS certificate"));
        }
        let allowed_dns = format!("{}.{}.{}", node.node, node.zone, self.auth.trust_domain());
        for d in &req.dns_names {
            if d != &allowed_dns {
                return Err(ControllerError::PermissionDenied(format!(
                    "{d:?} is not a name of this node (allowed: {allowed_dns})"
                )));
            }
        }
        let mut ips = Vec::new();
        for ip in &req.ip_addresses {
            let parsed: IpAddr = ip.parse().map_err(|e| {
                ControllerError::BadRequest(format!("{ip:?} is not an IP address: {e}"))
            })?;
            if parsed != node.overlay_ip {
                return Err(ControllerError::PermissionDenied(format!(
                    "{ip} is not this node's overlay address"
                )));
            }
            ips.push(parsed);
        }
        let names = zonemesh_ca::TlsNames {
            dns: req.dns_names.clone(),
            ips,
        };
        let lifetime = (req.lifetime_secs > 0).then(|| Duration::from_secs(req.lifetime_secs));
        let cert = self.auth.ca().sign_tls_csr(
            &self.auth.tls_policy,
            &req.csr_der,
            &names,
            lifetime,
            now,
        )?;
        self.record_node_tls(&node.key(), &cert, &names, now)?;
        Ok(pb::IssueTlsResponse {
            certificate_der: cert.der,
            chain_der: self.auth.chain(),
        })
    }

    /// Record a TLS certificate as node `nkey`'s, in one transaction checked against the
    /// node record (still enrolled, not revoked) and its serial generation: a revocation
    /// of the node either comes first (and this is refused) or sees the new serial.
    fn record_node_tls(
        &self,
        nkey: &str,
        cert: &zonemesh_ca::IssuedCert,
        names: &zonemesh_ca::TlsNames,
        now: SystemTime,
    ) -> Result<()> {
        for _ in 0..crate::authority::MAX_CRL_RACES {
            let bytes = self.store.nodes.get(nkey).map_err(store_err)?;
            let live = match bytes.as_deref() {
                Some(b) => !decode::<NodeRecord>("nodes", b)?.revoked,
                None => false,
            };
            if !live {
                return Err(ControllerError::Unauthenticated(
                    "node is not enrolled".into(),
                ));
            }
            let gen_key = serials_gen_key(nkey);
            let generation = self.store.meta.get(&gen_key).map_err(store_err)?;
            let mut txn = Txn::new();
            txn.expect("nodes", nkey, bytes.as_deref());
            owned_cert_ops(
                &mut txn,
                nkey,
                cert,
                CertKind::Tls,
                format!("{names:?}"),
                generation.as_deref(),
                now,
            );
            if self.store.kv().commit(&txn).map_err(store_err)? {
                self.store.flush()?;
                self.metrics()
                    .certificate_issued(crate::metrics::CertKind::Tls);
                return Ok(());
            }
        }
        Err(StoreError::Conflict.into())
    }

    pub fn update_endpoints(
        &self,
        who: &VerifiedNode,
        endpoints: &[String],
        now: SystemTime,
    ) -> Result<()> {
        let mut node = self.caller(who, now)?;
        if !self.update_endpoints_limit.allow(&node.key(), now) {
            return Err(Self::rate_limited("endpoint update"));
        }
        let parsed = parse_endpoints(endpoints)?;
        if parsed == node.endpoints {
            return Ok(());
        }
        node.endpoints = parsed;
        self.store.put_node(&node)?;
        self.commit(pb::Delta {
            upserted: vec![self.peer_of(&node)],
            ..Default::default()
        })?;
        Ok(())
    }

    pub fn report_health(
        &self,
        who: &VerifiedNode,
        report: &pb::HealthReport,
        now: SystemTime,
    ) -> Result<()> {
        let node = self.caller(who, now)?;
        let rows = report
            .peers
            .iter()
            .take(MAX_HEALTH_ROWS)
            .map(|p| HealthRow {
                peer: text::capped(&p.peer, MAX_PEER_NAME),
                loss: p.loss,
                rtt_micros: p.rtt_micros,
                reported_unix: unix(now),
            })
            .collect();
        self.health.lock().insert(node.key(), rows);
        Ok(())
    }

    /// Health matrix: node → its peers' loss and latency.
    pub fn health(&self) -> HashMap<String, Vec<HealthRow>> {
        self.health.lock().clone()
    }
}
