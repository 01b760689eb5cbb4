//! The UDP socket: quinn-udp for GSO sends (`UDP_SEGMENT`) and GRO + `recvmmsg` receives,
//! driven by tokio readiness.

use super::DataPlaneError;
use super::io::{RecvInfo, UdpBatch, UdpTransport};
use quinn_udp::{Transmit, UdpSocketState};
use std::io::{self, IoSliceMut};
use std::net::{SocketAddr, SocketAddrV4};
use tokio::io::Interest;

/// Socket buffer size asked for (forced past the sysctl limit when we have CAP_NET_ADMIN).
const SOCKET_BUFFER: usize = 7 << 20;
/// Most receive buffers used in one `recvmmsg`.
const MAX_RECV_BUFS: usize = 16;

/// The data plane's UDP socket (IPv4).
pub struct RealUdp {
    sock: tokio::net::UdpSocket,
    state: UdpSocketState,
}

impl RealUdp {
    /// Binds `0.0.0.0:port` with large buffers, GSO and GRO.
    pub fn bind(port: u16) -> Result<Self, DataPlaneError> {
        let err = |source| DataPlaneError::Udp { port, source };
        let s = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )
        .map_err(err)?;
        s.set_nonblocking(true).map_err(err)?;
        s.bind(&SocketAddr::V4(SocketAddrV4::new([0, 0, 0, 0].into(), port)).into())
            .map_err(err)?;
        set_buffers(&s);
        let sock = tokio::net::UdpSocket::from_std(s.into()).map_err(err)?;
        let state = UdpSocketState::new((&sock).into()).map_err(err)?;
        tracing::info!(
            port = sock.local_addr().map(|a| a.port()).unwrap_or(port),
            gso_segments = state.max_gso_segments(),
            gro_segments = state.gro_segments(),
            "UDP socket bound"
        );
        Ok(Self { sock, state })
    }

    /// The bound address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.sock.local_addr()
    }
}

fn set_buffers(s: &socket2::Socket) {
    use nix::sys::socket::{setsockopt, sockopt};
    if setsockopt(s, sockopt::SndBufForce, &SOCKET_BUFFER).is_err() {
        let _ = s.set_send_buffer_size(SOCKET_BUFFER);
    }
    if setsockopt(s, sockopt::RcvBufForce, &SOCKET_BUFFER).is_err() {
        let _ = s.set_recv_buffer_size(SOCKET_BUFFER);
    }
}

impl UdpTransport for RealUdp {
    async fn recv(&self, batch: &mut UdpBatch) -> io::Result<usize> {
        let count = batch.bufs.len().min(MAX_RECV_BUFS);
        loop {
            self.sock.readable().await?;
            let UdpBatch { bufs, meta, .. } = &mut *batch;
            let mut it = bufs.iter_mut();
            let mut iovs: [IoSliceMut<'_>; MAX_RECV_BUFS] = std::array::from_fn(|_| {
                IoSliceMut::new(it.next().map(|b| &mut b[..]).unwrap_or(&mut []))
            });
            let r = self.sock.try_io(Interest::READABLE, || {
                self.state
                    .recv((&self.sock).into(), &mut iovs[..count], &mut meta[..count])
            });
            match r {
                Ok(n) => {
                    for i in 0..n {
                        let m = &batch.meta[i];
                        batch.info[i] = RecvInfo {
                            addr: canonical(m.addr),
                            len: m.len,
                            stride: m.stride,
                        };
                    }
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }

    async fn send(
        &self,
        dst: SocketAddr,
        contents: &[u8],
        segment_size: Option<usize>,
    ) -> io::Result<()> {
        match self.send_one(dst, contents, segment_size).await {
            Err(e) if segment_size.is_some() => {
                // The kernel refused the segmented send (quinn-udp turns GSO off for the
                // next ones); send the datagrams one by one this time.
                tracing::debug!(error = %e, "GSO send failed; falling back to single datagrams");
                for d in contents.chunks(segment_size.unwrap_or(contents.len()).max(1)) {
                    self.send_one(dst, d, None).await?;
                }
                Ok(())
            }
            r => r,
        }
    }

    fn max_segments(&self) -> usize {
        self.state.max_gso_segments()
    }
}

impl RealUdp {
    async fn send_one(
        &self,
        dst: SocketAddr,
        contents: &[u8],
        segment_size: Option<usize>,
    ) -> io::Result<()> {
        let t = Transmit {
            destination: dst,
            ecn: None,
            contents,
            segment_size,
            src_ip: None,
        };
        loop {
            self.sock.writable().await?;
            match self.sock.try_io(Interest::WRITABLE, || {
                self.state.try_send((&self.sock).into(), &t)
            }) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return r,
            }
        }
    }
}

fn canonical(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => a,
        },
        v4 => v4,
    }
}
