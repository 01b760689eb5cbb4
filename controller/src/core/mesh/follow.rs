//! Changes recorded by another controller of the same store. With several controllers on
//! one etcd cluster, every controller writes its changes to the shared change log under
//! the shared version; each one follows that log ([`Mesh::follow_store`], polled by
//! [`follow_loop`]) and publishes what others wrote to its own Watch streams exactly as if
//! it had recorded them: same versions, same encoded frames, so an agent resumes on any
//! controller. What a change means locally is applied first: a new CRL reaches the TLS
//! verifier and the PKI endpoints, a removed node's streams end, a new SSH state replaces
//! the one held, and a CA rotation or retirement (a change carrying the CA bundle) reloads
//! the CA certificates from the store: new certificates come from the new intermediate,
//! the verifiers trust the new roots, and this controller's TLS certificate is renewed. With the embedded store this controller is the only writer and there is
//! never anything to follow.

use super::watch::{Frame, Published};
use super::{Mesh, store_err};
use crate::error::{ControllerError, Result};
use crate::store::node_key;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use zonemesh_proto as pb;

/// A logged change's CRLs: the issuing intermediate's, then the other trusted ones'.
type LoggedCrls = (Vec<u8>, Vec<Vec<u8>>);

/// How often the shared version is read by [`follow_loop`].
pub const FOLLOW_EVERY: Duration = Duration::from_millis(100);

impl Mesh {
    /// Publish every change the store holds beyond what this controller has recorded or
    /// followed. Returns the number of versions taken in. Blocking (it reads the store).
    pub fn follow_store(&self) -> Result<u64> {
        let head = self.store.meta_u64(super::MESH_VERSION)?;
        if head <= self.appended.load(Ordering::SeqCst) {
            return Ok(0);
        }
        let guard = self.change_lock.lock();
        let n = self.follow_locked(head)?;
        drop(guard);
        self.publish_followed(head);
        Ok(n)
    }

    /// Publish what was followed up to `head` (the change lock released).
    pub(super) fn publish_followed(&self, head: u64) {
        self.publish_upto(head);
        // A jump past the change log publishes no change of its own.
        if self.version.fetch_max(head, Ordering::SeqCst) < head {
            self.fanout
                .announce(self.version.load(Ordering::SeqCst), false);
        }
    }

    /// [`Mesh::follow_store`] with the change lock held, up to `head`; the caller
    /// publishes.
    pub(super) fn follow_locked(&self, head: u64) -> Result<u64> {
        let local = self.appended.load(Ordering::SeqCst);
        if head <= local {
            return Ok(0);
        }
        match self.logged(local, head)? {
            Some(updates) => {
                for u in updates {
                    let delta = match u.kind {
                        Some(pb::mesh_update::Kind::Delta(d)) => d,
                        // Only deltas are logged; anything else changes nothing here.
                        _ => pb::Delta::default(),
                    };
                    self.take_in(&delta)?;
                    let frame = Frame::encode(&pb::MeshUpdate {
                        version: u.version,
                        kind: Some(pb::mesh_update::Kind::Delta(delta.clone())),
                    });
                    self.unpublished
                        .lock()
                        .insert(u.version, Arc::new(Published { delta, frame }));
                }
            }
            None => {
                // The log no longer reaches back to us: watchers get a fresh snapshot, and
                // the CRL and SSH state are read again.
                self.fanout.forget_recent();
                self.auth.reload_ca(self.now())?;
                if let Some((crl, others)) = self.latest_logged_crl(head)? {
                    self.adopt_crls(crl, others)?;
                }
                tracing::warn!(
                    from = local,
                    to = head,
                    "followed the store past the change log; watchers get a snapshot"
                );
            }
        }
        self.appended.store(head, Ordering::SeqCst);
        Ok(head - local)
    }

    /// The newest CRLs the change log holds up to `head`.
    fn latest_logged_crl(&self, head: u64) -> Result<Option<LoggedCrls>> {
        for item in self.store.changes.range(..=head.to_be_bytes()).rev() {
            let (_, v) = item.map_err(store_err)?;
            if let Ok(pb::MeshUpdate {
                kind: Some(pb::mesh_update::Kind::Delta(d)),
                ..
            }) = <pb::MeshUpdate as prost::Message>::decode(v.as_ref())
                && !d.crl_der.is_empty()
            {
                return Ok(Some((d.crl_der, d.issuer_crls_der)));
            }
        }
        Ok(None)
    }

    /// Serve and check against CRLs another controller signed.
    fn adopt_crls(&self, issuing: Vec<u8>, others: Vec<Vec<u8>>) -> Result<()> {
        self.auth.adopt_crls(issuing, others);
        let (roots, crls) = (self.auth.trusted_roots(), self.auth.crls_der());
        for l in self.crl_listeners.lock().iter() {
            l.crl_changed(&roots, &crls)
                .map_err(ControllerError::CrlUpdate)?;
        }
        Ok(())
    }

    /// What a change recorded elsewhere means on this controller.
    fn take_in(&self, d: &pb::Delta) -> Result<()> {
        // A rotation or retirement: the CA set first, so the CRLs it carries line up with
        // the trusted intermediates and the verifiers get the new roots with them.
        if d.ca.is_some() {
            self.auth.reload_ca(self.now())?;
        }
        if !d.crl_der.is_empty() {
            self.adopt_crls(d.crl_der.clone(), d.issuer_crls_der.clone())?;
        }
        for r in &d.removed {
            let key = node_key(&r.zone, &r.node);
            if let Some(streams) = self.streams.lock().remove(&key) {
                for s in streams {
                    s.cancel();
                }
            }
            self.health.lock().remove(&key);
        }
        if let Some(ssh) = &d.ssh {
            *self.ssh_state.lock() = Some(ssh.clone());
        }
        Ok(())
    }
}

/// Follow the store every [`FOLLOW_EVERY`] until `stop` (in the serve task set).
pub async fn follow_loop(mesh: Arc<Mesh>, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(FOLLOW_EVERY) => {}
        }
        let m = mesh.clone();
        match crate::blocking::run(move || m.follow_store()).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(versions = n, "followed changes of another controller"),
            Err(e) => tracing::warn!(error = %e, "following the store failed"),
        }
    }
}
