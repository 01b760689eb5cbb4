//! The two I/O edges of the data plane, as traits: the TUN device (IP packets) and the UDP
//! transport (WireGuard datagrams). Both move packets in batches so that one system call
//! and one wake-up carry many packets. Real implementations live in `tun` and `udp`,
//! in-memory ones in `fake`.

use std::future::Future;
use std::io;
use std::net::SocketAddr;

/// Headroom in front of every packet in a [`TunBatch`] buffer. The Linux TUN device with
/// offload needs room for its virtio-net header there.
pub const TUN_OFFSET: usize = 16;

/// Largest UDP payload; one GSO/GRO super-datagram never exceeds it.
pub const MAX_UDP_PAYLOAD: usize = 65_535;

/// A set of IP packet buffers moved to or from the TUN device in one go.
///
/// Packet `i` lives at `bufs[i][TUN_OFFSET..TUN_OFFSET + sizes[i]]`. For writes, every
/// buffer `i < n` must also have length exactly `TUN_OFFSET + sizes[i]`.
pub struct TunBatch {
    /// Packet buffers, each with `TUN_OFFSET` bytes of headroom.
    pub bufs: Vec<Vec<u8>>,
    /// Length of each packet.
    pub sizes: Vec<usize>,
    /// Packet space per buffer (not counting the headroom).
    pub packet_space: usize,
    /// Scratch for one offloaded super-packet read from the device.
    pub(crate) raw: Vec<u8>,
    /// Coalescing state for offloaded writes, reused between batches.
    pub(crate) gro: tun_rs::GROTable,
}

impl TunBatch {
    /// A batch of `count` buffers, each able to hold a packet of `packet_space` bytes.
    pub fn new(count: usize, packet_space: usize) -> Self {
        Self {
            bufs: (0..count)
                .map(|_| vec![0u8; TUN_OFFSET + packet_space])
                .collect(),
            sizes: vec![0; count],
            packet_space,
            raw: vec![0u8; tun_rs::VIRTIO_NET_HDR_LEN + MAX_UDP_PAYLOAD],
            gro: tun_rs::GROTable::new(),
        }
    }

    /// A batch for writes: like [`TunBatch::new`], but every buffer has room to grow to a
    /// 64 KiB super-packet, which the offloading device needs to coalesce TCP segments
    /// into one write.
    pub fn for_writes(count: usize, packet_space: usize) -> Self {
        let mut b = Self::new(count, packet_space);
        for buf in &mut b.bufs {
            buf.reserve_exact(2 * TUN_OFFSET + MAX_UDP_PAYLOAD - buf.len());
        }
        b
    }

    /// Number of buffers.
    pub fn capacity(&self) -> usize {
        self.bufs.len()
    }

    /// Packet `i` as read from the device.
    pub fn packet(&self, i: usize) -> &[u8] {
        &self.bufs[i][TUN_OFFSET..TUN_OFFSET + self.sizes[i]]
    }

    /// Copies `pkt` into slot `i` for writing. Returns false (and leaves the slot alone)
    /// if it does not fit.
    pub fn set_packet(&mut self, i: usize, pkt: &[u8]) -> bool {
        if pkt.len() > self.packet_space {
            return false;
        }
        let b = &mut self.bufs[i];
        b.resize(TUN_OFFSET + pkt.len(), 0);
        b[TUN_OFFSET..].copy_from_slice(pkt);
        self.sizes[i] = pkt.len();
        true
    }
}

/// Where one received buffer of a [`UdpBatch`] came from and how it is cut into datagrams.
#[derive(Debug, Clone, Copy)]
pub struct RecvInfo {
    /// Source address.
    pub addr: SocketAddr,
    /// Bytes in the buffer.
    pub len: usize,
    /// Size of each datagram in the buffer (GRO); the last one may be shorter.
    pub stride: usize,
}

/// Receive buffers for the UDP transport.
pub struct UdpBatch {
    /// Buffers, each large enough for one coalesced (GRO) super-datagram.
    pub bufs: Vec<Vec<u8>>,
    /// What landed in each buffer; valid for the first `n` returned by `recv`.
    pub info: Vec<RecvInfo>,
    pub(crate) meta: Vec<quinn_udp::RecvMeta>,
}

impl UdpBatch {
    /// `count` buffers of `MAX_UDP_PAYLOAD` bytes.
    pub fn new(count: usize) -> Self {
        Self {
            bufs: (0..count).map(|_| vec![0u8; MAX_UDP_PAYLOAD]).collect(),
            info: vec![
                RecvInfo {
                    addr: SocketAddr::from(([0, 0, 0, 0], 0)),
                    len: 0,
                    stride: 0,
                };
                count
            ],
            meta: vec![quinn_udp::RecvMeta::default(); count],
        }
    }
}

/// The TUN side: IP packets in and out of the kernel.
pub trait TunDevice: Send + Sync + 'static {
    /// Waits for packets and stores them in `batch` from slot 0; returns how many.
    fn recv(&self, batch: &mut TunBatch) -> impl Future<Output = io::Result<usize>> + Send;
    /// Writes the first `n` packets of `batch` (which it may coalesce and modify).
    fn send(&self, batch: &mut TunBatch, n: usize) -> impl Future<Output = io::Result<()>> + Send;
}

/// The UDP side: WireGuard datagrams to and from peers.
pub trait UdpTransport: Send + Sync + 'static {
    /// Waits for datagrams and stores them in `batch`; returns how many buffers were filled.
    fn recv(&self, batch: &mut UdpBatch) -> impl Future<Output = io::Result<usize>> + Send;
    /// Sends `contents` to `dst`. With `segment_size`, `contents` holds several datagrams of
    /// that size back to back (the last may be shorter), sent with one call where possible.
    fn send(
        &self,
        dst: SocketAddr,
        contents: &[u8],
        segment_size: Option<usize>,
    ) -> impl Future<Output = io::Result<()>> + Send;
    /// How many datagrams one `send` may carry.
    fn max_segments(&self) -> usize;
}
