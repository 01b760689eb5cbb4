//! The Linux TUN device (tun-rs) with virtio-net offload: the kernel hands us TCP/UDP
//! super-packets of up to 64 KiB which we split, and we hand it coalesced ones back.
//! Also the routes the data plane adds through the device.

use super::io::{TUN_OFFSET, TunBatch, TunDevice};
use super::{DataPlaneConfig, DataPlaneError};
use ipnet::IpNet;
use std::io;
use std::process::Command;

/// Transmit queue length of the device (the kernel default of 500 drops bursts).
const TX_QUEUE_LEN: u32 = 10_000;

/// A TUN device created by the data plane; removed by the kernel when dropped.
pub struct RealTun {
    dev: tun_rs::AsyncDevice,
    /// Most packets one offloaded read can split into.
    max_split: usize,
}

impl RealTun {
    /// Creates the device with the config's name, MTU and address, then adds the routes.
    /// Returns the device and the routes that were added (to remove at shutdown).
    pub fn create(config: &DataPlaneConfig) -> Result<(Self, Vec<IpNet>), DataPlaneError> {
        let build = |offload: bool| {
            let b = tun_rs::DeviceBuilder::new()
                .name(&config.interface)
                .mtu(config.mtu)
                .tx_queue_len(TX_QUEUE_LEN)
                .offload(offload);
            let b = match config.address {
                IpNet::V4(n) => b.ipv4(n.addr(), n.prefix_len(), None),
                IpNet::V6(n) => b.ipv6(n.addr(), n.prefix_len()),
            };
            b.build_async()
        };
        let tun_err = |source| DataPlaneError::Tun {
            interface: config.interface.clone(),
            source,
        };
        let (dev, offload) = match build(true) {
            Ok(d) => (d, true),
            Err(e) => {
                tracing::warn!(error = %e, "TUN offload unavailable; using plain reads and writes");
                (build(false).map_err(tun_err)?, false)
            }
        };
        tracing::info!(
            interface = %config.interface,
            offload,
            tcp_gso = dev.tcp_gso(),
            udp_gso = dev.udp_gso(),
            "TUN device up"
        );
        let min_segment = usize::from(config.mtu).saturating_sub(60).max(500);
        let max_split = if offload { 65_535 / min_segment + 1 } else { 1 };
        let tun = RealTun { dev, max_split };
        let mut added = Vec::new();
        for route in &config.routes {
            if let Err(e) = add_route(&config.interface, route) {
                delete_routes(&config.interface, &added);
                return Err(e);
            }
            added.push(*route);
        }
        Ok((tun, added))
    }
}

impl TunDevice for RealTun {
    async fn recv(&self, batch: &mut TunBatch) -> io::Result<usize> {
        let TunBatch {
            bufs, sizes, raw, ..
        } = batch;
        let mut n = self.dev.recv_multiple(raw, bufs, sizes, TUN_OFFSET).await?;
        // Take whatever else is already queued, while a full split still fits.
        while bufs.len() - n >= self.max_split {
            match self
                .dev
                .try_recv_multiple(raw, &mut bufs[n..], &mut sizes[n..], TUN_OFFSET)
            {
                Ok(k) => n += k,
                Err(_) => break,
            }
        }
        Ok(n)
    }

    async fn send(&self, batch: &mut TunBatch, n: usize) -> io::Result<()> {
        let TunBatch { bufs, gro, .. } = batch;
        self.dev
            .send_multiple(gro, &mut bufs[..n], TUN_OFFSET)
            .await
            .map(|_| ())
    }
}

fn add_route(interface: &str, route: &IpNet) -> Result<(), DataPlaneError> {
    let out = Command::new("ip")
        .args(["route", "replace", &route.to_string(), "dev", interface])
        .output()
        .map_err(|e| DataPlaneError::Route {
            route: *route,
            interface: interface.into(),
            reason: format!("running ip: {e}"),
        })?;
    if !out.status.success() {
        return Err(DataPlaneError::Route {
            route: *route,
            interface: interface.into(),
            reason: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    tracing::debug!(%route, interface, "route added");
    Ok(())
}

/// Removes routes added through `interface` (best effort: they also vanish with the device).
pub fn delete_routes(interface: &str, routes: &[IpNet]) {
    for route in routes {
        let _ = Command::new("ip")
            .args(["route", "del", &route.to_string(), "dev", interface])
            .stderr(std::process::Stdio::null())
            .status();
    }
}
