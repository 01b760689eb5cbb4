//! The agent's one connection to the controller: a long-lived gRPC channel over mutual TLS
//! whose client certificate is swapped in memory on renewal. With several controllers
//! (`enroll --controller A,B,C`) the link uses one at a time and moves to the next when the
//! Watch stream finds it gone or refusing ([`ControllerLink::fail_over`]).

use super::super::client::{self, NodeCertResolver};
use anyhow::Result;
use arc_swap::ArcSwap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tonic::transport::Channel;
use zonemesh_proto as pb;

/// Snapshots of large meshes exceed tonic's default 4 MiB message limit.
const MAX_MESSAGE: usize = 256 * 1024 * 1024;

/// First wait after a failed attempt while other controllers remain untried in this round.
const FAILOVER_DELAY: Duration = Duration::from_millis(250);
/// First wait once every controller has failed in a row; doubled per further round.
const ROUND_DELAY: Duration = Duration::from_millis(500);
/// Longest wait between two attempts.
const MAX_DELAY: Duration = Duration::from_secs(30);

pub(super) struct ControllerLink {
    controllers: Vec<String>,
    /// Index into `controllers` of the one in use.
    current: AtomicUsize,
    resolver: Arc<NodeCertResolver>,
    /// Rebuilt when the pinned roots change (a root rotation).
    tls: parking_lot::Mutex<rustls::ClientConfig>,
    channel: ArcSwap<Channel>,
    /// Bumped when the certificate or the controller changed: streams opened before
    /// reopen on the new channel.
    generation: tokio::sync::watch::Sender<u64>,
}

impl ControllerLink {
    /// A link to the first of `controllers`, presenting `cert` (and `chain`) with `key`;
    /// connects on first use. Must be called inside a tokio runtime.
    pub(super) fn new(
        controllers: Vec<String>,
        roots_der: &[Vec<u8>],
        cert_der: &[u8],
        chain: &[Vec<u8>],
        key_pkcs8: &[u8],
    ) -> Result<Self> {
        anyhow::ensure!(!controllers.is_empty(), "no controller address");
        let resolver = Arc::new(NodeCertResolver::new(cert_der, chain, key_pkcs8)?);
        let tls = client::mtls_config_with(roots_der, resolver.clone())?;
        // Every address is checked now, so a failover never meets a bad one.
        for c in &controllers[1..] {
            client::check_address(c, tls.clone())?;
        }
        let channel = client::connect_lazy(&controllers[0], tls.clone())?;
        Ok(Self {
            controllers,
            current: AtomicUsize::new(0),
            resolver,
            tls: parking_lot::Mutex::new(tls),
            channel: ArcSwap::from_pointee(channel),
            generation: tokio::sync::watch::Sender::new(0),
        })
    }

    /// The channel (shared; cloning it is cheap).
    pub(super) fn channel(&self) -> Channel {
        Channel::clone(&self.channel.load())
    }

    /// A Mesh client on the channel.
    pub(super) fn mesh(&self) -> pb::mesh_client::MeshClient<Channel> {
        pb::mesh_client::MeshClient::new(self.channel()).max_decoding_message_size(MAX_MESSAGE)
    }

    /// The controller address in use.
    pub(super) fn controller(&self) -> String {
        self.controllers[self.current.load(Ordering::Relaxed) % self.controllers.len()].clone()
    }

    /// Every controller address, in the order they are tried.
    pub(super) fn controllers(&self) -> &[String] {
        &self.controllers
    }

    /// The certificate presented now (DER).
    pub(super) fn current_cert(&self) -> Vec<u8> {
        self.resolver.current_cert()
    }

    /// Move to the next controller (the same one when there is only one) on a fresh
    /// channel; streams on the old one are told through [`ControllerLink::generation`].
    /// Returns the address now in use.
    pub(super) fn fail_over(&self) -> Result<String> {
        if self.controllers.len() == 1 {
            return Ok(self.controller());
        }
        let next = (self.current.load(Ordering::Relaxed) + 1) % self.controllers.len();
        let channel = client::connect_lazy(&self.controllers[next], self.tls.lock().clone())?;
        self.channel.store(Arc::new(channel));
        self.current.store(next, Ordering::Relaxed);
        self.generation.send_modify(|g| *g += 1);
        Ok(self.controllers[next].clone())
    }

    /// Present the renewed certificate (with its new key after a rotation) from now on:
    /// new connections use it, and a fresh channel replaces the one authenticated with the
    /// old certificate.
    pub(super) fn renewed(
        &self,
        cert_der: &[u8],
        chain: &[Vec<u8>],
        new_key_pkcs8: Option<&[u8]>,
    ) -> Result<()> {
        match new_key_pkcs8 {
            Some(key) => self.resolver.swap_identity(cert_der, chain, key)?,
            None => self.resolver.swap_cert(cert_der, chain),
        }
        let tls = self.tls.lock().clone();
        let channel = client::connect_lazy(&self.controller(), tls)?;
        self.channel.store(Arc::new(channel));
        self.generation.send_modify(|g| *g += 1);
        Ok(())
    }

    /// Trust `roots_der` for the controllers' certificates from the next connection on
    /// (the pinned roots changed). Streams open on the current connection go on.
    pub(super) fn set_roots(&self, roots_der: &[Vec<u8>]) -> Result<()> {
        let tls = client::mtls_config_with(roots_der, self.resolver.clone())?;
        let channel = client::connect_lazy(&self.controller(), tls.clone())?;
        *self.tls.lock() = tls;
        self.channel.store(Arc::new(channel));
        Ok(())
    }

    /// Changes whenever the certificate is renewed or the link moves to another controller.
    pub(super) fn generation(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// How long to wait before the next attempt after `failures` failed attempts in a row
    /// (at least 1): short while untried controllers remain in the round, then doubling
    /// per round of all of them, at most [`MAX_DELAY`], with random jitter (half to all of
    /// it) so a fleet that lost its controller does not arrive at the next one at once.
    pub(super) fn retry_delay(&self, failures: u32) -> Duration {
        retry_delay(
            self.controllers.len(),
            failures,
            rand::random_range(0.5..=1.0),
        )
    }
}

/// [`ControllerLink::retry_delay`] with the jitter factor given.
pub(super) fn retry_delay(controllers: usize, failures: u32, jitter: f64) -> Duration {
    let n = u32::try_from(controllers.max(1)).unwrap_or(u32::MAX);
    let failures = failures.max(1);
    let base = if !failures.is_multiple_of(n) {
        FAILOVER_DELAY
    } else {
        let rounds = (failures / n).saturating_sub(1).min(16);
        ROUND_DELAY.saturating_mul(1 << rounds).min(MAX_DELAY)
    };
    base.mul_f64(jitter.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::retry_delay;
    use std::time::Duration;

    #[test]
    fn failover_is_quick_within_a_round_and_backs_off_per_round_within_bounds() {
        let ms = |d: Duration| d.as_millis();
        // One controller: every failure is a full round.
        assert_eq!(ms(retry_delay(1, 1, 1.0)), 500);
        assert_eq!(ms(retry_delay(1, 2, 1.0)), 1000);
        assert_eq!(ms(retry_delay(1, 3, 1.0)), 2000);
        assert_eq!(ms(retry_delay(1, 40, 1.0)), 30_000);
        // Three: the next two are tried quickly, then the round's backoff.
        assert_eq!(ms(retry_delay(3, 1, 1.0)), 250);
        assert_eq!(ms(retry_delay(3, 2, 1.0)), 250);
        assert_eq!(ms(retry_delay(3, 3, 1.0)), 500);
        assert_eq!(ms(retry_delay(3, 4, 1.0)), 250);
        assert_eq!(ms(retry_delay(3, 6, 1.0)), 1000);
        assert_eq!(ms(retry_delay(3, u32::MAX, 1.0)), 30_000);
        // Jitter takes between half and all of it.
        assert_eq!(ms(retry_delay(3, 3, 0.5)), 250);
        assert_eq!(ms(retry_delay(3, 3, 7.0)), 500);
    }
}
