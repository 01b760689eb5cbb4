//! The Linux TUN device (tun-rs) with virtio-net offload: the kernel hands us TCP/UDP
//! super-packets of up to 64 KiB which we split, and we hand it coalesced ones back.
//! Also the routes the data plane adds through the device.

use super::io::{TUN_OFFSET, TunBatch, TunDevice};
use super::{DataPlaneConfig, DataPlaneError};
use ipnet::IpNet;
use std::io;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};

/// Transmit queue length of the device (the kernel default of 500 drops bursts).
const TX_QUEUE_LEN: u32 = 10_000;

/// A TUN device created by the data plane; removed by the kernel when dropped.
pub struct RealTun {
    dev: tun_rs::AsyncDevice,
    /// Most packets one offloaded read can split into.
    max_split: usize,
    /// Whether the device carries virtio-net headers (offload on).
    vnet_hdr: bool,
    /// Cleared when the kernel refuses coalesced writes; packets are then written one by
    /// one (each with an empty virtio-net header).
    coalesce: AtomicBool,
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
        let tun = RealTun {
            dev,
            max_split,
            vnet_hdr: offload,
            coalesce: AtomicBool::new(offload),
        };
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
        if !self.vnet_hdr || self.coalesce.load(Ordering::Relaxed) {
            return match self
                .dev
                .send_multiple(gro, &mut bufs[..n], TUN_OFFSET)
                .await
            {
                Err(e) if self.vnet_hdr && e.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::warn!(error = %e, "kernel refused coalesced TUN writes; writing packets one by one");
                    self.coalesce.store(false, Ordering::Relaxed);
                    Err(e)
                }
                r => r.map(|_| ()),
            };
        }
        // Offload on, coalescing off: one write per packet behind an all-zero header
        // (no GSO, no checksum offload).
        let start = TUN_OFFSET - tun_rs::VIRTIO_NET_HDR_LEN;
        for buf in &mut bufs[..n] {
            buf[start..TUN_OFFSET].fill(0);
            self.dev.send(&buf[start..]).await?;
        }
        Ok(())
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
