//! The agent's side of CA rotation: each CA bundle from the Watch stream is checked against
//! the pinned roots ([`crate::control::trust::accept_bundle`]); a change of the pinned roots
//! is written to the state directory and the controller link, and the renewal task is told
//! so it can move onto the issuing intermediate at this node's point of the spread.

use super::{Agent, unix};
use crate::control::meshview::MeshView;
use crate::control::trust::{accept_bundle, renewal_point};
use std::time::SystemTime;
use zonemesh_ca::TrustStore;
use zonemesh_proto as pb;

impl Agent {
    /// The trust store for checking peers now, after acting on the view's CA bundle if it
    /// is new. Blocking: writes `ca.crt` and `identity.json` when the pin moves.
    pub(super) fn refresh_trust(&self, view: &MeshView, now: SystemTime) -> TrustStore {
        let mut t = self.trust.lock();
        let Some(bundle) = view.ca.as_ref() else {
            return t.store.clone();
        };
        if t.bundle.as_ref() == Some(bundle) {
            return t.store.clone();
        }
        let out = accept_bundle(&t.pinned, bundle, now);
        for reason in &out.refused {
            tracing::warn!(%reason, "CA bundle root refused");
            let _ = self.events.try_send(pb::SecurityEvent {
                kind: "ca.root_refused".into(),
                source: String::new(),
                detail: reason.clone(),
                at_unix: unix(now),
            });
        }
        if out.roots != t.pinned {
            match self.opts.state.write_pinned_roots(&out.roots) {
                Ok(()) => {
                    tracing::info!(
                        pinned = %zonemesh_ca::fingerprint_sha256(&out.roots[0]),
                        roots = out.roots.len(),
                        "pinned CA roots changed"
                    );
                    if let Err(e) = self.link.set_roots(&out.roots) {
                        tracing::warn!(error = %e, "controller link keeps its old roots");
                    }
                    t.pinned = out.roots;
                }
                Err(e) => {
                    // Not acted on: tried again with the next sync.
                    tracing::warn!(error = %e, "could not write the pinned roots");
                    return t.store.clone();
                }
            }
        }
        let mut intermediates = t.own_chain.clone();
        intermediates.extend(bundle.intermediates.iter().cloned());
        intermediates.extend(bundle.cross_signatures.iter().cloned());
        t.store = TrustStore::new(&self.id.trust_domain, t.pinned.clone(), intermediates);
        t.bundle = Some(bundle.clone());
        let store = t.store.clone();
        drop(t);
        self.ca_changes.send_modify(|g| *g += 1);
        store
    }

    /// When the current certificate must be renewed because of a CA rotation (its
    /// intermediate is not the issuing one), if it must.
    pub(super) fn rotation_renewal_at(&self) -> Option<SystemTime> {
        let t = self.trust.lock();
        let bundle = t.bundle.as_ref()?;
        renewal_point(&self.link.current_cert(), bundle, &self.id.spiffe_id)
    }
}
