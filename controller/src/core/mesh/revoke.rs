//! Revocation: a node's certificates all go on the CRL at once and its streams end.
//!
//! Every change that puts serials on the CRL (or re-signs it) is one store transaction:
//! the caller's own writes (the node marked revoked, its address and key freed, its serial
//! records dropped), the revocation records, the CRL number and the change-log entry that
//! carries the new CRLs. The CRLs are signed before the transaction from the stored
//! revocations plus the pending ones; the transaction checks the CRL number it read, so
//! when another controller of the same store took a CRL meanwhile nothing applies and the
//! CRLs are signed again (at most [`MAX_CRL_RACES`] times).

use super::{Mesh, store_err};
use crate::authority::MAX_CRL_RACES;
use crate::error::{ControllerError, Result};
use crate::store::{
    NodeRecord, StoreError, Txn, decode, encode, host_revoke_key, serials_gen_key, unix,
};
use std::time::SystemTime;
use zonemesh_ca::RevocationReason;
use zonemesh_proto as pb;

/// Checks and writes `commit_with` adds to every change: the version check, the log entry,
/// the version and the oldest entry dropped.
const CHANGE_OPS: usize = 4;
/// A node's other certificates revoked per transaction when it holds more than fit in one
/// with the node's own writes (see [`Mesh::revoke_node`]).
pub const SERIALS_PER_TXN: usize = 48;

/// One try of a revocation: the serials to revoke, the caller's own checks and writes,
/// the change to log (its CRL fields are filled in), and what the caller returns.
pub(super) struct RevokePlan<T> {
    pub serials: Vec<String>,
    pub txn: Txn,
    pub delta: pb::Delta,
    pub value: T,
}

/// What a committed revocation did.
pub(super) struct Revoked<T> {
    pub value: T,
    /// Serials newly on the CRL.
    pub newly: usize,
    pub version: u64,
}

impl Mesh {
    /// Tell every CRL listener of `crls` (with the trusted roots).
    fn tell_crl_listeners(&self, crls: &[Vec<u8>]) -> Result<()> {
        let roots = self.auth.trusted_roots();
        for l in self.crl_listeners.lock().iter() {
            l.crl_changed(&roots, crls)
                .map_err(ControllerError::CrlUpdate)?;
        }
        Ok(())
    }

    /// Sign CRLs listing the serials `plan` names, then commit them with `plan`'s writes
    /// and its change as one transaction; on a conflict (the CRL number moved, or one of
    /// the plan's own checks failed) `plan` is asked again, against what the store holds
    /// now. The verifiers take the new CRLs before the commit and go back to the ones in
    /// force when it does not apply. Blocking (RSA signatures, the store, the flush).
    pub(super) fn commit_revocation<T>(
        &self,
        reason: RevocationReason,
        now: SystemTime,
        mut plan: impl FnMut() -> Result<RevokePlan<T>>,
    ) -> Result<Revoked<T>> {
        let lock = self.auth.crl_lock();
        let mut tries = 0;
        loop {
            tries += 1;
            let RevokePlan {
                serials,
                mut txn,
                mut delta,
                value,
            } = plan()?;
            let pending = self.auth.sign_pending(&lock, &serials, reason, now)?;
            let newly = pending.newly().len();
            pending.add_to(&mut txn);
            let ops = txn.checks.len() + txn.ops.len() + CHANGE_OPS;
            if ops > crate::core::kv::MAX_TXN_OPS {
                return Err(ControllerError::Store(StoreError::Db(
                    crate::core::kv::KvError::TooManyOps(ops),
                )));
            }
            delta.crl_der = pending.crl_der();
            delta.issuer_crls_der = pending.issuer_crls_der();
            self.tell_crl_listeners(&pending.crls_der())?;
            let guard = self.change_lock.lock();
            let auth = &self.auth;
            let lock_ref = &lock;
            let r = self.commit_with_then(guard, delta, txn, move || {
                auth.install_pending(lock_ref, pending)
            });
            match r {
                Ok(version) => {
                    return Ok(Revoked {
                        value,
                        newly,
                        version,
                    });
                }
                Err(e) => {
                    if let Err(back) = self.tell_crl_listeners(&self.auth.crls_der()) {
                        tracing::error!(error = %back, "restoring the CRLs in force failed");
                    }
                    let conflict = matches!(e, ControllerError::Store(StoreError::Conflict));
                    if !conflict || tries >= MAX_CRL_RACES {
                        return Err(e);
                    }
                    self.auth.note_crl_race();
                }
            }
        }
    }

    /// The node `nkey` as stored (its bytes, for the transaction's check), if it is
    /// enrolled and not revoked.
    fn live_node(&self, nkey: &str) -> Result<(Vec<u8>, NodeRecord)> {
        let bytes = self
            .store
            .nodes
            .get(nkey)
            .map_err(store_err)?
            .ok_or_else(|| {
                ControllerError::NotFound(format!(
                    "no node {nkey} (use zone/node, see `node list`)"
                ))
            })?;
        let node: NodeRecord = decode("nodes", &bytes)?;
        if node.revoked {
            return Err(ControllerError::AlreadyExists(format!(
                "node {nkey} is already revoked"
            )));
        }
        Ok((bytes, node))
    }

    /// Revoke a node: every certificate it was issued since it enrolled goes on the CRL,
    /// its overlay address and WireGuard key are freed, its serial records dropped and its
    /// removal logged, all in one transaction with the new CRLs (nothing applies when the
    /// store cannot be reached or the commit fails). Its open streams end now, and every
    /// other watcher receives its removal and the new CRL.
    ///
    /// A node holding more certificates than fit in one transaction (more than
    /// [`SERIALS_PER_TXN`] besides its current one: TLS certificates it asked for) has the
    /// others revoked first, [`SERIALS_PER_TXN`] per transaction, each published with its
    /// CRL; the node itself, its current certificate and the rest go last. Each step is a
    /// consistent state: certificates of a still-enrolled node revoked. A crash in between
    /// leaves the node enrolled, and `node revoke` again finishes.
    pub fn revoke_node(
        &self,
        nkey: &str,
        reason: RevocationReason,
        now: SystemTime,
    ) -> Result<NodeRecord> {
        loop {
            let (_, node) = self.live_node(nkey)?;
            let extra = self
                .store
                .node_serials(nkey)?
                .into_iter()
                .filter(|s| s.serial_hex != node.serial_hex)
                .count();
            if extra <= SERIALS_PER_TXN {
                break;
            }
            self.commit_revocation(reason, now, || {
                let (bytes, node) = self.live_node(nkey)?;
                let chunk: Vec<String> = self
                    .store
                    .node_serials(nkey)?
                    .into_iter()
                    .map(|s| s.serial_hex)
                    .filter(|s| *s != node.serial_hex)
                    .take(SERIALS_PER_TXN)
                    .collect();
                let mut txn = Txn::new();
                txn.expect("nodes", nkey, Some(&bytes));
                for s in &chunk {
                    txn.delete("node_serials", format!("{nkey}/{s}"));
                }
                Ok(RevokePlan {
                    serials: chunk,
                    txn,
                    delta: pb::Delta::default(),
                    value: (),
                })
            })?;
        }
        let done = self.commit_revocation(reason, now, || {
            let (bytes, mut node) = self.live_node(nkey)?;
            let issued = self.store.node_serials(nkey)?;
            let gen_key = serials_gen_key(nkey);
            let generation = self.store.meta.get(&gen_key).map_err(store_err)?;
            let mut serials: Vec<String> = issued.iter().map(|s| s.serial_hex.clone()).collect();
            if !serials.contains(&node.serial_hex) {
                serials.push(node.serial_hex.clone());
            }
            node.revoked = true;
            let mut txn = Txn::new();
            txn.expect("nodes", nkey, Some(&bytes))
                .put("nodes", nkey, encode(&node))
                // Its SSH host certificates are revoked next (`Ssh::finish_host_revocations`);
                // the marker makes that survive a stop in between.
                .put("meta", host_revoke_key(nkey), unix(now).to_be_bytes())
                .expect("meta", &gen_key, generation.as_deref())
                .delete("meta", &gen_key);
            for s in &issued {
                txn.delete("node_serials", format!("{nkey}/{}", s.serial_hex));
            }
            let wg_owner = self
                .store
                .wgkeys
                .get(node.wg_public_key)
                .map_err(store_err)?;
            if wg_owner.as_deref() == Some(nkey.as_bytes()) {
                txn.expect("wgkeys", node.wg_public_key, Some(nkey.as_bytes()))
                    .delete("wgkeys", node.wg_public_key);
            }
            let addr = node.overlay_ip.to_string();
            if self.store.alloc.get(&addr).map_err(store_err)?.as_deref() == Some(nkey.as_bytes()) {
                txn.expect("alloc", &addr, Some(nkey.as_bytes()))
                    .delete("alloc", &addr);
            }
            let delta = pb::Delta {
                removed: vec![pb::PeerRef {
                    zone: node.zone.clone(),
                    node: node.node.clone(),
                }],
                ..Default::default()
            };
            Ok(RevokePlan {
                serials,
                txn,
                delta,
                value: node,
            })
        })?;
        let node = done.value;
        if let Some(streams) = self.streams.lock().remove(nkey) {
            for s in streams {
                s.cancel();
            }
        }
        self.health.lock().remove(nkey);
        tracing::info!(node = %nkey, serial = %node.serial_hex, revoked_serials = done.newly, "node revoked");
        Ok(node)
    }

    /// Revoke one serial this CA issued that is not a live node's current certificate
    /// (`ca revoke` of a TLS certificate, say): the revocation, the CRLs and the change
    /// that carries them in one transaction.
    pub fn revoke_serial(
        &self,
        serial_hex: &str,
        reason: RevocationReason,
        now: SystemTime,
    ) -> Result<u64> {
        let serial = self.auth.known_serial(serial_hex)?;
        let done = self.commit_revocation(reason, now, || {
            // Checked again on every try: another writer may have revoked it meanwhile.
            let serial = self.auth.known_serial(&serial)?;
            Ok(RevokePlan {
                serials: vec![serial],
                txn: Txn::new(),
                delta: pb::Delta::default(),
                value: (),
            })
        })?;
        Ok(done.version)
    }

    /// Push the CA certificates in force to every watcher after a rotation or a
    /// retirement: the bundle, the chain for peers and every CRL, freshly signed and
    /// logged in one transaction (the verifiers take the new roots and CRLs before it is
    /// recorded).
    pub fn publish_ca(&self) -> Result<u64> {
        let now = self.now();
        let done = self.commit_revocation(RevocationReason::Unspecified, now, || {
            Ok(RevokePlan {
                serials: Vec::new(),
                txn: Txn::new(),
                delta: pb::Delta {
                    ca: Some(self.auth.ca_bundle()),
                    ca_chain_der: self.auth.chain_pool(),
                    ..Default::default()
                },
                value: (),
            })
        })?;
        Ok(done.version)
    }

    /// Sign a fresh CRL and push it to every watcher (the periodic refresh), the CRL
    /// number and the change in one transaction.
    pub fn publish_crl(&self) -> Result<u64> {
        let now = self.now();
        let done = self.commit_revocation(RevocationReason::Unspecified, now, || {
            Ok(RevokePlan {
                serials: Vec::new(),
                txn: Txn::new(),
                delta: pb::Delta::default(),
                value: (),
            })
        })?;
        Ok(done.version)
    }
}
