//! Recording a change: written to the change log under the change lock, flushed with
//! every concurrent writer, then published in version order: encoded once, kept for
//! watchers that are behind, and announced to every stream.

use super::watch::{Frame, Published};
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
        // Another controller of the same store may have recorded changes since: take them
        // in first, so this one gets the next shared version (published with it below).
        let head = self.store.meta_u64("mesh_version")?;
        self.follow_locked(head)?;
        let v = self.appended.load(Ordering::SeqCst) + 1;
        // Encoded once: the same bytes go to the change log and to every watcher.
        let frame = Frame::encode(&pb::MeshUpdate {
            version: v,
            kind: Some(pb::mesh_update::Kind::Delta(delta.clone())),
        });
        self.store
            .changes
            .insert(v.to_be_bytes(), frame.message())
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
        self.unpublished
            .lock()
            .insert(v, Arc::new(Published { delta, frame }));
        drop(guard);
        // The flush runs outside the change lock (and is shared with every writer waiting
        // at the same time); it covers this version and every earlier one.
        self.store.flush()?;
        self.publish_upto(v);
        Ok(v)
    }

    /// Publish, in version order, every durable change up to `v` not yet published, then
    /// wake the streams (once, outside the lock: the wake-up is the part that grows with
    /// the number of watchers, and each stream then takes the shared frame).
    pub(super) fn publish_upto(&self, v: u64) {
        let mut published = None;
        {
            let mut pending = self.unpublished.lock();
            while let Some(entry) = pending.first_entry() {
                if *entry.key() > v {
                    break;
                }
                let (version, change) = entry.remove_entry();
                let d = &change.delta;
                if !(d.upserted.is_empty() && d.removed.is_empty() && d.zones.is_empty()) {
                    *self.never_block.lock() = None;
                }
                // Kept before the version is visible, so a stream that sees the version
                // finds the change.
                self.fanout.keep(change);
                self.version.store(version, Ordering::SeqCst);
                published = Some(version);
            }
        }
        if let Some(version) = published {
            self.fanout.announce(version);
        }
    }

    pub(super) fn peer_of(&self, n: &NodeRecord) -> pb::Peer {
        pb::Peer {
            zone: n.zone.clone(),
            node: n.node.clone(),
            certificate_der: n.cert_der.clone(),
            // Sent once per stream (Snapshot/Delta ca_chain_der), not with every peer.
            chain_der: Vec::new(),
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
