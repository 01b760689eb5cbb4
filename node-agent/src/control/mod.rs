//! The agent's side of the control plane: its state directory, the TLS/gRPC client to the
//! controller (pinned at enrollment, mutual TLS afterwards), enrollment and renewal, and
//! the run loop with what it acts on (host effects, clock).

pub mod blocklist;
pub mod client;
pub mod clock;
pub mod effects;
pub mod enroll;
pub mod health;
pub mod logwatch;
pub mod meshview;
pub mod metrics;
pub mod run;
pub mod state;
pub mod trust;

use anyhow::Context;

/// Run blocking work (files, fsync, subprocesses, RSA, chain checks) on the blocking pool,
/// never on an async worker. A panic in `f` comes back as an error.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .context("blocking task failed")?
}
