//! Revocation: a node's certificates all go on the CRL at once and its streams end.

use super::{Mesh, store_err};
use crate::error::{ControllerError, Result};
use crate::store::{NodeRecord, Txn};
use std::time::SystemTime;
use zonemesh_ca::RevocationReason;
use zonemesh_proto as pb;

impl Mesh {
    /// Revoke a node: every certificate it was issued since it enrolled goes on the CRL
    /// (one signature, one flush), its overlay address is freed, its open streams end now,
    /// and every other watcher receives its removal and the new CRL.
    pub fn revoke_node(
        &self,
        nkey: &str,
        reason: RevocationReason,
        now: SystemTime,
    ) -> Result<NodeRecord> {
        let guard = self.change_lock.lock();
        let mut node = self.store.node(nkey)?.ok_or_else(|| {
            ControllerError::NotFound(format!("no node {nkey} (use zone/node, see `node list`)"))
        })?;
        if node.revoked {
            return Err(ControllerError::AlreadyExists(format!(
                "node {nkey} is already revoked"
            )));
        }
        node.revoked = true;
        self.store.put_node(&node)?;
        drop(guard);
        // Renewals that finish after this point see the node revoked and revoke their own
        // certificate; those that finished before are in the node's serial set.
        let issued = self.store.node_serials(nkey)?;
        let mut serials: Vec<String> = issued.iter().map(|s| s.serial_hex.clone()).collect();
        if !serials.contains(&node.serial_hex) {
            serials.push(node.serial_hex.clone());
        }
        let newly = self.auth.revoke_all(&serials, reason, now)?;
        for s in &issued {
            self.store.remove_node_serial(nkey, &s.serial_hex)?;
        }
        // The key, the address and the change-log entry go in one transaction; the CRL
        // number and the revocations were made durable by revoke_all just before.
        let crl = self.auth.crl_der().to_vec();
        if !crl.is_empty() {
            for l in self.crl_listeners.lock().iter() {
                l.crl_changed(&crl).map_err(ControllerError::CrlUpdate)?;
            }
        }
        let guard = self.change_lock.lock();
        let mut txn = Txn::new();
        txn.delete("wgkeys", node.wg_public_key);
        let addr = node.overlay_ip.to_string();
        if self.store.alloc.get(&addr).map_err(store_err)?.as_deref() == Some(nkey.as_bytes()) {
            txn.expect("alloc", &addr, Some(nkey.as_bytes()))
                .delete("alloc", &addr);
        }
        self.commit_with(
            guard,
            pb::Delta {
                removed: vec![pb::PeerRef {
                    zone: node.zone.clone(),
                    node: node.node.clone(),
                }],
                crl_der: crl,
                ..Default::default()
            },
            txn,
        )?;
        if let Some(streams) = self.streams.lock().remove(nkey) {
            for s in streams {
                s.cancel();
            }
        }
        self.health.lock().remove(nkey);
        tracing::info!(node = %nkey, serial = %node.serial_hex, revoked_serials = newly, "node revoked");
        Ok(node)
    }

    /// Push a freshly signed CRL to every watcher (after `ca revoke` of a non-node serial,
    /// or the periodic refresh).
    pub fn publish_crl(&self) -> Result<u64> {
        self.commit(pb::Delta {
            crl_der: self.auth.crl_der().to_vec(),
            ..Default::default()
        })
    }
}
