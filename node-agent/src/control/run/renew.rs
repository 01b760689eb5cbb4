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

/// Whether this renewal replaces the key: every `every`-th renewal (0: never).
fn rotation_due(every: u32, renewals_since_key: u32) -> bool {
    every > 0 && renewals_since_key.saturating_add(1) >= every
}

pub(super) async fn renew_loop(agent: Arc<Agent>, shutdown: CancellationToken) {
    let mut ca_changes = agent.ca_changes.subscribe();
    // Drawn once per certificate, so a CA change does not move the usual renewal.
    let mut jitter: Option<(Vec<u8>, SystemTime)> = None;
    loop {
        let cert = agent.link.current_cert();
        let usual = match &jitter {
            Some((c, at)) if *c == cert => *at,
            _ => {
                let at = match cert_info(&cert) {
                    Ok(info) => renew_at(info.not_before, info.not_after),
                    Err(_) => agent.clock.now() + RETRY,
                };
                jitter = Some((cert.clone(), at));
                at
            }
        };
        // After a CA rotation: onto the issuing intermediate at this node's point of the
        // spread, if that comes first.
        let rotation = agent.rotation_renewal_at();
        let at = rotation.map_or(usual, |r| r.min(usual));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = agent.clock.alarm(at) => {}
            r = ca_changes.changed() => {
                if r.is_err() {
                    return;
                }
                continue;
            }
        }
        let rotate = rotation_due(
            agent.opts.rotate_key_every,
            agent.opts.state.renewals_since_key(),
        );
        let renewal = enroll::renew_over(&agent.opts.state, agent.link.channel(), rotate);
        let result = agent
            .rpc(&shutdown, RENEW_DEADLINE, renewal)
            .await
            .and_then(|r| {
                agent.link.renewed(
                    &r.cert_der,
                    &r.chain_der,
                    r.rotated_key.as_deref().map(|k| &k[..]),
                )?;
                Ok(r)
            });
        match result {
            Ok(r) => tracing::info!(
                serial = %r.info.serial_hex,
                key_rotated = r.rotated_key.is_some(),
                ca_rotation = rotation.is_some_and(|r| r <= usual),
                "node certificate renewed"
            ),
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

#[cfg(test)]
mod tests {
    use super::rotation_due;

    #[test]
    fn every_nth_renewal_rotates_the_key() {
        assert!(!rotation_due(0, 0));
        assert!(!rotation_due(0, 1000));
        assert!(rotation_due(1, 0));
        let rotated: Vec<bool> = (0..4).map(|n| rotation_due(4, n)).collect();
        assert_eq!(rotated, [false, false, false, true]);
        assert!(
            rotation_due(4, 9),
            "a counter past N (N lowered) rotates at once"
        );
    }
}
