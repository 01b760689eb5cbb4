//! Renewal of the node certificate at 2/3 of its life, over the agent's link; the new
//! certificate is presented from the next handshake on.

use super::super::enroll;
use super::super::state::cert_info;
use super::Agent;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio_util::sync::CancellationToken;

/// Deadline of a renewal (the controller signs with RSA-4096).
const RENEW_DEADLINE: Duration = Duration::from_secs(60);
/// Wait after a failed renewal.
const RETRY: Duration = Duration::from_secs(60);

/// When to renew: zonemesh's one schedule (2/3 of the lifetime, minus up to 5% jitter).
fn renew_at(not_before: SystemTime, not_after: SystemTime) -> SystemTime {
    zonemesh_ca::renew_at(not_before, not_after, rand::random::<f64>())
}

pub(super) async fn renew_loop(agent: Arc<Agent>, shutdown: CancellationToken) {
    loop {
        let at = match cert_info(&agent.link.current_cert()) {
            Ok(info) => renew_at(info.not_before, info.not_after),
            Err(_) => agent.clock.now() + RETRY,
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = agent.clock.alarm(at) => {}
        }
        let renewal = enroll::renew_over(&agent.opts.state, agent.link.channel());
        let result = agent
            .rpc(&shutdown, RENEW_DEADLINE, renewal)
            .await
            .and_then(|r| {
                agent.link.renewed(&r.cert_der, &r.chain_der)?;
                Ok(r)
            });
        match result {
            Ok(r) => tracing::info!(serial = %r.info.serial_hex, "node certificate renewed"),
            Err(_) if shutdown.is_cancelled() => return,
            Err(e) => {
                tracing::warn!(error = %e, "renewal failed; retrying in 60 s");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(RETRY) => {}
                }
            }
        }
    }
}
