//! The SSH state on the Watch stream: the whole state in every snapshot, and a delta
//! carrying the whole state again whenever it changes (it is small: a key, the granted
//! (zone, principal) pairs and a KRL), so one change reaches every server at once.

use super::Mesh;
use crate::error::Result;
use zonemesh_proto as pb;

impl Mesh {
    /// The SSH state snapshots carry from now on, without a change of its own (start-up).
    pub fn set_ssh_state(&self, state: pb::SshState) {
        *self.ssh_state.lock() = Some(state);
        *self.fanout.snapshot.lock() = None;
    }

    /// The SSH state in snapshots, if any.
    pub fn ssh_state(&self) -> Option<pb::SshState> {
        self.ssh_state.lock().clone()
    }

    /// Record a new SSH state and send it to every watcher. Returns its version. Blocking
    /// (the change log is flushed).
    pub fn publish_ssh(&self, state: pb::SshState) -> Result<u64> {
        *self.ssh_state.lock() = Some(state.clone());
        self.commit(pb::Delta {
            ssh: Some(state),
            ..Default::default()
        })
    }
}
