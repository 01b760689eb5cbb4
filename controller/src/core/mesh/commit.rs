//! Recording a change: written to the change log under the change lock, flushed with
//! every concurrent writer, then published in version order: encoded once, kept for
//! watchers that are behind, and announced to every stream.

use super::watch::{Frame, Published};
use super::{CHANGE_LOG_LEN, MESH_VERSION, Mesh, store_err};

/// Times a change is tried again because another controller took its version first.
const MAX_VERSION_RACES: u32 = 16;
use crate::error::{ControllerError, Result};
use crate::store::{NodeRecord, StoreError, Txn, ZoneRecord};
use parking_lot::MutexGuard;
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
        self.commit_txn(delta, Txn::new())
    }

    /// [`Mesh::commit`] with the writes of `txn` in the same store transaction (both or
    /// neither), for a caller that checks nothing under the change lock itself (its
    /// `txn` checks are its guard).
    pub(super) fn commit_txn(&self, delta: pb::Delta, txn: Txn) -> Result<u64> {
        if !delta.crl_der.is_empty() || delta.ca.is_some() {
            let (roots, crls) = (self.auth.trusted_roots(), self.auth.crls_der());
            for l in self.crl_listeners.lock().iter() {
                l.crl_changed(&roots, &crls)
                    .map_err(ControllerError::CrlUpdate)?;
            }
        }
        let guard = self.change_lock.lock();
        self.commit_with(guard, delta, txn)
    }

    /// Record `delta` together with the writes of `txn` as one store transaction (both or
    /// neither), under the change lock the caller took for its checks; then flush and fan
    /// out as [`Mesh::commit`]. The change-log entry and the version counter are written
    /// in the same transaction, conditional on the counter still holding the previous
    /// version, so two writers of one store cannot both take a version. Changes another
    /// controller of the same store recorded first are taken in (followed) before, so
    /// this one gets the next shared version; when another writer takes that version in
    /// between, its change is followed and the transaction tried again (its own checks
    /// still guard what the caller checked).
    pub(super) fn commit_with(
        &self,
        guard: MutexGuard<'_, ()>,
        delta: pb::Delta,
        txn: Txn,
    ) -> Result<u64> {
        self.commit_with_then(guard, delta, txn, || {})
    }

    /// [`Mesh::commit_with`], running `committed` once the transaction has applied, still
    /// under the change lock and before the change is flushed and published (a revocation
    /// puts its CRLs in service there, so no watcher sees the change before them).
    pub(super) fn commit_with_then(
        &self,
        guard: MutexGuard<'_, ()>,
        delta: pb::Delta,
        txn: Txn,
        committed: impl FnOnce(),
    ) -> Result<u64> {
        let mut tries = 0;
        let (v, frame) = loop {
            let head = self.store.meta_u64(MESH_VERSION)?;
            if let Err(e) = self.follow_locked(head) {
                let a = self.appended.load(Ordering::SeqCst);
                drop(guard);
                self.publish_followed(a);
                return Err(e);
            }
            let prev = self.appended.load(Ordering::SeqCst);
            let v = prev + 1;
            // Encoded once: the same bytes go to the change log and to every watcher.
            let frame = Frame::encode(&pb::MeshUpdate {
                version: v,
                kind: Some(pb::mesh_update::Kind::Delta(delta.clone())),
            });
            let prev_bytes = prev.to_be_bytes();
            let stored_prev = self.store.meta.get(MESH_VERSION).map_err(store_err)?;
            // A store that never recorded a version (or holds an older layout) counts as 0.
            let expect = if prev == 0 {
                stored_prev.as_deref()
            } else {
                Some(&prev_bytes[..])
            };
            let mut t = txn.clone();
            t.expect("meta", MESH_VERSION, expect)
                .put("changes", v.to_be_bytes(), frame.message().to_vec())
                .put("meta", MESH_VERSION, v.to_be_bytes());
            if v > CHANGE_LOG_LEN {
                // Keys below v - CHANGE_LOG_LEN went one per change before this one.
                t.delete("changes", (v - CHANGE_LOG_LEN - 1).to_be_bytes());
            }
            if self.store.kv().commit(&t).map_err(store_err)? {
                break (v, frame);
            }
            // Nothing was applied. Another controller took the version: follow, retry.
            let stored = self.store.meta_u64(MESH_VERSION)?;
            tries += 1;
            if stored != prev && tries < MAX_VERSION_RACES {
                continue;
            }
            // The caller's own checks failed (or the race went on): nothing changed.
            let a = self.appended.load(Ordering::SeqCst);
            drop(guard);
            self.publish_followed(a);
            return Err(ControllerError::Store(StoreError::Conflict));
        };
        committed();
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

    pub(super) fn publish_upto(&self, v: u64) {
        let mut published = None;
        // Only new or updated peers may wait for enrollments in flight.
        let mut may_wait = true;
        {
            let mut pending = self.unpublished.lock();
            while let Some(entry) = pending.first_entry() {
                if *entry.key() > v {
                    break;
                }
                let (version, change) = entry.remove_entry();
                let d = &change.delta;
                may_wait &= only_upserts(d);
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
            self.fanout.announce(version, may_wait);
        }
    }

    /// Hold Watch announcements of new peers back while this enrollment is in flight
    /// (see [`super::watch::Fanout::hold`]).
    pub(super) fn hold_announcements(&self) -> super::watch::HoldGuard<'_> {
        self.fanout.hold()
    }

    /// Announce new peers held back by enrollments when their time comes, until `stop`
    /// (run by `serve`; see `Fanout::run_announcer`).
    pub async fn run_announcer(&self, stop: &tokio_util::sync::CancellationToken) {
        self.fanout.run_announcer(stop).await;
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

/// Whether `d` only adds or updates peers (an enrollment, new endpoints).
fn only_upserts(d: &pb::Delta) -> bool {
    d.removed.is_empty()
        && d.zones.is_empty()
        && d.crl_der.is_empty()
        && d.blocked.is_empty()
        && d.unblocked.is_empty()
        && d.ca_chain_der.is_empty()
        && d.ssh.is_none()
        && d.ca.is_none()
        && d.issuer_crls_der.is_empty()
}
