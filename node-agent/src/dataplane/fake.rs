//! In-memory TUN devices and UDP networks, so the whole packet path runs in `cargo test`
//! without root. A [`FakeNet`] delivers datagrams between [`FakeUdp`] sockets by address;
//! a [`FakeTun`] hands the data plane packets injected through its [`FakeTunHandle`] and
//! collects the packets the data plane writes.

use super::io::{RecvInfo, TunBatch, TunDevice, UdpBatch, UdpTransport};
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

type Datagram = (SocketAddr, Vec<u8>);

/// A lossless in-memory UDP network.
#[derive(Default)]
pub struct FakeNet {
    sockets: Mutex<HashMap<SocketAddr, mpsc::UnboundedSender<Datagram>>>,
}

impl FakeNet {
    /// An empty network.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Binds a socket at `addr`, replacing any socket there.
    pub fn bind(self: &Arc<Self>, addr: SocketAddr) -> FakeUdp {
        let (tx, rx) = mpsc::unbounded_channel();
        self.sockets.lock().expect("fake net lock").insert(addr, tx);
        FakeUdp {
            addr,
            net: self.clone(),
            rx: tokio::sync::Mutex::new(rx),
            max_segments: 8,
        }
    }

    /// Delivers a datagram from `src` to `dst`; silently dropped if nobody is bound there.
    pub fn deliver(&self, src: SocketAddr, dst: SocketAddr, datagram: &[u8]) {
        if let Some(tx) = self.sockets.lock().expect("fake net lock").get(&dst) {
            let _ = tx.send((src, datagram.to_vec()));
        }
    }
}

/// A socket on a [`FakeNet`].
pub struct FakeUdp {
    addr: SocketAddr,
    net: Arc<FakeNet>,
    rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<Datagram>>,
    max_segments: usize,
}

impl FakeUdp {
    /// This socket's address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl UdpTransport for FakeUdp {
    async fn recv(&self, batch: &mut UdpBatch) -> io::Result<usize> {
        let mut rx = self.rx.lock().await;
        let Some(first) = rx.recv().await else {
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "fake net closed"));
        };
        let mut next = Some(first);
        let mut n = 0;
        while let Some((src, d)) = next {
            batch.bufs[n][..d.len()].copy_from_slice(&d);
            batch.info[n] = RecvInfo {
                addr: src,
                len: d.len(),
                stride: d.len(),
            };
            n += 1;
            next = if n < batch.bufs.len() {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        Ok(n)
    }

    async fn send(
        &self,
        dst: SocketAddr,
        contents: &[u8],
        segment_size: Option<usize>,
    ) -> io::Result<()> {
        let seg = segment_size.unwrap_or(contents.len()).max(1);
        for d in contents.chunks(seg) {
            self.net.deliver(self.addr, dst, d);
        }
        Ok(())
    }

    fn max_segments(&self) -> usize {
        self.max_segments
    }
}

/// A TUN device in memory.
pub struct FakeTun {
    from_host: tokio::sync::Mutex<mpsc::UnboundedReceiver<Vec<u8>>>,
    to_host: mpsc::UnboundedSender<Vec<u8>>,
}

/// The "kernel" side of a [`FakeTun`]: inject packets the host sends, read what arrives.
pub struct FakeTunHandle {
    /// Packets the host sends into the tunnel.
    pub inject: mpsc::UnboundedSender<Vec<u8>>,
    /// Packets the data plane delivered to the host.
    pub delivered: mpsc::UnboundedReceiver<Vec<u8>>,
}

impl FakeTun {
    /// A device and its host-side handle.
    pub fn new() -> (Self, FakeTunHandle) {
        let (inject, from_host) = mpsc::unbounded_channel();
        let (to_host, delivered) = mpsc::unbounded_channel();
        (
            Self {
                from_host: tokio::sync::Mutex::new(from_host),
                to_host,
            },
            FakeTunHandle { inject, delivered },
        )
    }
}

impl TunDevice for FakeTun {
    async fn recv(&self, batch: &mut TunBatch) -> io::Result<usize> {
        let mut rx = self.from_host.lock().await;
        let Some(first) = rx.recv().await else {
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "fake tun closed"));
        };
        let mut next = Some(first);
        let mut n = 0;
        while let Some(p) = next {
            if batch.set_packet(n, &p) {
                n += 1;
            }
            next = if n < batch.capacity() {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        Ok(n)
    }

    async fn send(&self, batch: &mut TunBatch, n: usize) -> io::Result<()> {
        for i in 0..n {
            let _ = self.to_host.send(batch.packet(i).to_vec());
        }
        Ok(())
    }
}

/// A minimal IPv4 ICMP echo request (valid header length fields; checksums are zero
/// because nothing on the fake path checks them).
pub fn ipv4_packet(src: [u8; 4], dst: [u8; 4], payload: &[u8]) -> Vec<u8> {
    let total = 20 + 8 + payload.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 1; // ICMP
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
    p[20] = 8; // echo request
    p[28..].copy_from_slice(payload);
    p
}
