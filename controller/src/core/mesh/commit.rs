//! Recording a change: written to the change log under the change lock, flushed with
//! every concurrent writer, then broadcast in version order.

use super::{CHANGE_LOG_LEN, Mesh, store_err};
use crate::error::{ControllerError, Result};
use crate::store::{NodeRecord, ZoneRecord};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use zonemesh_proto as pb;

impl Mesh {
    /// Tell `l` of every new CRL from now on, before the change carrying it is recorded.
    pub fn add_crl_listener(&self, l: Arc<dyn super::CrlListener>) {
        self.crl_listeners.lock().push(l);
    }

    /// Record one change durably, then fan it out. Returns its version. The change lock
    /// covers only the log write; the flush (shared with concurrent writers) runs after it,
    /// and changes are broadcast in version order once durable.
    pub(super) fn commit(&self, delta: pb::Delta) -> Result<u64> {
        if !delta.crl_der.is_empty() {
            for l in self.crl_listeners.lock().iter() {
                l.crl_changed(&delta.crl_der)
                    .map_err(ControllerError::CrlUpdate)?;
            }
        }
        let guard = self.change_lock.lock();
        let v = self.appended.load(Ordering::SeqCst) + 1;
        let update = Arc::new(pb::MeshUpdate {
            version: v,
            kind: Some(pb::mesh_update::Kind::Delta(delta)),
        });
        self.store
            .changes
            .insert(
                v.to_be_bytes(),
                prost::Message::encode_to_vec(update.as_ref()),
            )
            .map_err(store_err)?;
        self.store
            .meta
            .insert("mesh_version", &v.to_be_bytes())
            .map_err(store_err)?;
        if v > CHANGE_LOG_LEN {
            let cutoff = (v - CHANGE_LOG_LEN).to_be_bytes();
            for k in self.store.changes.range(..cutoff).keys() {
                self.store
                    .changes
                    .remove(k.map_err(store_err)?)
                    .map_err(store_err)?;
            }
        }
        self.appended.store(v, Ordering::SeqCst);
        self.unpublished.lock().insert(v, update);
        drop(guard);
        // The flush runs outside the change lock (and is shared with every writer waiting
        // at the same time); it covers this version and every earlier one.
        self.store.flush()?;
        self.publish_upto(v);
        Ok(v)
    }

    /// Broadcast, in version order, every durable change up to `v` not yet published.
    fn publish_upto(&self, v: u64) {
        let mut pending = self.unpublished.lock();
        while let Some(entry) = pending.first_entry() {
            if *entry.key() > v {
                break;
            }
            let (version, update) = entry.remove_entry();
            self.version.store(version, Ordering::SeqCst);
            *self.snapshot_cache.lock() = None;
            if let Some(pb::mesh_update::Kind::Delta(d)) = &update.kind
                && !(d.upserted.is_empty() && d.removed.is_empty() && d.zones.is_empty())
            {
                *self.never_block.lock() = None;
            }
            // No receivers is fine: nobody is watching yet.
            let _ = self.tx.send(update);
        }
    }

    pub(super) fn peer_of(&self, n: &NodeRecord) -> pb::Peer {
        pb::Peer {
            zone: n.zone.clone(),
            node: n.node.clone(),
            certificate_der: n.cert_der.clone(),
            chain_der: self.auth.chain(),
            wg_public_key: n.wg_public_key.to_vec(),
            endpoints: n.endpoints.iter().map(ToString::to_string).collect(),
            overlay_ip: n.overlay_ip.to_string(),
        }
    }

    pub(super) fn zone_msg(z: &ZoneRecord) -> pb::Zone {
        pb::Zone {
            name: z.name.clone(),
            cidr: z.cidr.to_string(),
            intra_zone_tunnels: z.intra_zone_tunnels,
        }
    }
}
