//! The agent's one connection to the controller: a long-lived gRPC channel over mutual TLS
//! whose client certificate is swapped in memory on renewal.

use super::super::client::{self, NodeCertResolver};
use anyhow::Result;
use arc_swap::ArcSwap;
use std::sync::Arc;
use tonic::transport::Channel;
use zonemesh_proto as pb;

/// Snapshots of large meshes exceed tonic's default 4 MiB message limit.
const MAX_MESSAGE: usize = 256 * 1024 * 1024;

pub(super) struct ControllerLink {
    controller: String,
    resolver: Arc<NodeCertResolver>,
    /// Rebuilt when the pinned roots change (a root rotation).
    tls: parking_lot::Mutex<rustls::ClientConfig>,
    channel: ArcSwap<Channel>,
    /// Bumped when the certificate changed: streams opened before reconnect.
    generation: tokio::sync::watch::Sender<u64>,
}

impl ControllerLink {
    /// A link presenting `cert` (and `chain`) with `key`; connects on first use. Must be
    /// called inside a tokio runtime.
    pub(super) fn new(
        controller: &str,
        roots_der: &[Vec<u8>],
        cert_der: &[u8],
        chain: &[Vec<u8>],
        key_pkcs8: &[u8],
    ) -> Result<Self> {
        let resolver = Arc::new(NodeCertResolver::new(cert_der, chain, key_pkcs8)?);
        let tls = client::mtls_config_with(roots_der, resolver.clone())?;
        let channel = client::connect_lazy(controller, tls.clone())?;
        Ok(Self {
            controller: controller.into(),
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

    /// The certificate presented now (DER).
    pub(super) fn current_cert(&self) -> Vec<u8> {
        self.resolver.current_cert()
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
        let channel = client::connect_lazy(&self.controller, tls)?;
        self.channel.store(Arc::new(channel));
        self.generation.send_modify(|g| *g += 1);
        Ok(())
    }

    /// Trust `roots_der` for the controller's certificate from the next connection on (the
    /// pinned roots changed). Streams open on the current connection go on.
    pub(super) fn set_roots(&self, roots_der: &[Vec<u8>]) -> Result<()> {
        let tls = client::mtls_config_with(roots_der, self.resolver.clone())?;
        let channel = client::connect_lazy(&self.controller, tls.clone())?;
        *self.tls.lock() = tls;
        self.channel.store(Arc::new(channel));
        Ok(())
    }

    /// Changes whenever the certificate is renewed.
    pub(super) fn generation(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generation.subscribe()
    }
}
