//! Watch streams: the cached snapshot, replay of the change log, and the per-node
//! registry of open streams that a revocation ends.

use super::{MAX_STREAMS_PER_NODE, Mesh, REPLAY_CHUNK, RESUME_MAX_CHANGES, store_err};
use crate::error::{ControllerError, Result};
use crate::store::{BlockRecord, Store, StoreError, node_key, unix};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::SystemTime;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use zonemesh_ca::VerifiedNode;
use zonemesh_proto as pb;

/// What a Watch stream needs to start.
pub struct Subscription {
    /// What to send first: the snapshot, or the first chunk of the replayed log.
    pub initial: Vec<Arc<pb::MeshUpdate>>,
    pub last_version: u64,
    /// Log entries after `last_version` up to this version are still to be replayed
    /// (read lazily with [`Mesh::replay`]) before live changes.
    pub replay_to: u64,
    pub rx: broadcast::Receiver<Arc<pb::MeshUpdate>>,
    pub cancel: CancellationToken,
}

/// Where a watcher picks up after `after`: see [`Mesh::resume_from`].
pub struct Resume {
    pub initial: Vec<Arc<pb::MeshUpdate>>,
    pub last_version: u64,
    pub replay_to: u64,
}

impl Mesh {
    fn active_blocks(&self, now: SystemTime) -> Result<Vec<pb::BlockedSource>> {
        let all: Vec<BlockRecord> = Store::all(&self.store.blocks, "blocks")?;
        Ok(all
            .into_iter()
            .filter(|b| b.until_unix > unix(now))
            .map(|b| pb::BlockedSource {
                address: b.address.to_string(),
                until_unix: b.until_unix,
                reason: b.reason,
            })
            .collect())
    }

    /// The full mesh at the current version (cached until the next change).
    pub fn snapshot(&self) -> Result<Arc<pb::MeshUpdate>> {
        let _guard = self.change_lock.lock();
        if let Some(s) = self.snapshot_cache.lock().clone() {
            return Ok(s);
        }
        let peers = self
            .store
            .nodes()?
            .iter()
            .filter(|n| !n.revoked)
            .map(|n| self.peer_of(n))
            .collect();
        let zones = self.store.zones()?.iter().map(Self::zone_msg).collect();
        let snap = Arc::new(pb::MeshUpdate {
            version: self.version(),
            kind: Some(pb::mesh_update::Kind::Snapshot(pb::Snapshot {
                peers,
                zones,
                crl_der: self.auth.crl_der().to_vec(),
                blocklist: self.active_blocks(SystemTime::now())?,
                ssh: self.ssh_state.lock().clone(),
            })),
        });
        *self.snapshot_cache.lock() = Some(snap.clone());
        Ok(snap)
    }

    /// Up to [`REPLAY_CHUNK`] changes after `after`, at most up to `upto`, or `None` when
    /// the log no longer holds them all (the watcher then needs a snapshot).
    pub fn replay(&self, after: u64, upto: u64) -> Result<Option<Vec<Arc<pb::MeshUpdate>>>> {
        let end = upto.min(after.saturating_add(REPLAY_CHUNK));
        let mut out = Vec::new();
        let mut expected = after + 1;
        if expected > end {
            return Ok(Some(out));
        }
        for item in self
            .store
            .changes
            .range(expected.to_be_bytes()..=end.to_be_bytes())
        {
            let (k, v) = item.map_err(store_err)?;
            let kv = u64::from_be_bytes(k.as_ref().try_into().unwrap_or([0; 8]));
            if kv != expected {
                return Ok(None);
            }
            let update: pb::MeshUpdate = prost::Message::decode(v.as_ref()).map_err(|e| {
                ControllerError::Store(StoreError::Corrupt {
                    tree: "changes",
                    err: Box::new(e),
                })
            })?;
            out.push(Arc::new(update));
            expected += 1;
        }
        Ok((expected == end + 1).then_some(out))
    }

    /// Where a watcher that has seen `after` picks up: the first chunk of the log when it
    /// is at most [`RESUME_MAX_CHANGES`] behind and the log reaches, else the snapshot.
    pub fn resume_from(&self, after: u64) -> Result<Resume> {
        let current = self.version();
        if after != 0
            && after <= current
            && current - after <= RESUME_MAX_CHANGES
            && let Some(chunk) = self.replay(after, current)?
        {
            let last_version = chunk.last().map(|c| c.version).unwrap_or(after);
            return Ok(Resume {
                initial: chunk,
                last_version,
                replay_to: current,
            });
        }
        let snap = self.snapshot()?;
        Ok(Resume {
            last_version: snap.version,
            replay_to: snap.version,
            initial: vec![snap],
        })
    }

    /// Track a Watch stream of `node`, so revoking the node ends it.
    fn register_stream(&self, node: &str) -> CancellationToken {
        let cancel = CancellationToken::new();
        let mut streams = self.streams.lock();
        // Nodes whose streams have all ended are forgotten, so the map holds only nodes
        // with a live stream (each one a node with a certificate from this CA).
        if streams.len() >= 2 * self.live_stream_nodes.load(Ordering::Relaxed).max(64) {
            streams.retain(|_, list| {
                list.retain(|t| !t.is_cancelled());
                !list.is_empty()
            });
            self.live_stream_nodes
                .store(streams.len(), Ordering::Relaxed);
        }
        let list = streams.entry(node.to_string()).or_default();
        list.retain(|t| !t.is_cancelled());
        while list.len() >= MAX_STREAMS_PER_NODE {
            list.remove(0).cancel();
        }
        list.push(cancel.clone());
        cancel
    }

    /// Watch streams registered and not ended, over all nodes (bounded: at most
    /// [`MAX_STREAMS_PER_NODE`] per node).
    pub fn registered_streams(&self) -> usize {
        self.streams
            .lock()
            .values()
            .map(|l| l.iter().filter(|t| !t.is_cancelled()).count())
            .sum()
    }

    /// Register a Watch stream for `node`: what to send first, then live changes.
    pub fn subscribe(&self, node: &str, resume_from: u64) -> Result<Subscription> {
        let cancel = self.register_stream(node);
        self.subscribe_with(cancel, resume_from)
    }

    /// Open a Watch stream for the node presenting `who`. The stream is registered before
    /// the caller is checked, so a revocation racing with this call still ends it.
    pub fn watch(
        &self,
        who: &VerifiedNode,
        resume_from: u64,
        now: SystemTime,
    ) -> Result<Subscription> {
        let cancel = self.register_stream(&node_key(&who.id.zone, &who.id.node));
        if let Err(e) = self.caller(who, now) {
            cancel.cancel();
            return Err(e);
        }
        self.subscribe_with(cancel, resume_from)
    }

    fn subscribe_with(&self, cancel: CancellationToken, resume_from: u64) -> Result<Subscription> {
        // Subscribe before reading state so no change falls between the two.
        let rx = self.tx.subscribe();
        let r = self.resume_from(resume_from)?;
        Ok(Subscription {
            initial: r.initial,
            last_version: r.last_version,
            replay_to: r.replay_to,
            rx,
            cancel,
        })
    }
}
