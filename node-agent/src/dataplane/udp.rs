//! The UDP socket: quinn-udp for GSO sends (`UDP_SEGMENT`) and GRO + `recvmmsg` receives,
//! driven by tokio readiness.

use super::DataPlaneError;
use super::io::{RecvInfo, UdpBatch, UdpTransport};
use quinn_udp::{Transmit, UdpSocketState};
use std::io::{self, IoSliceMut};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use tokio::io::Interest;

/// Socket buffer size asked for (forced past the sysctl limit when we have CAP_NET_ADMIN).
const SOCKET_BUFFER: usize = 7 << 20;
/// Most receive buffers used in one `recvmmsg`.
const MAX_RECV_BUFS: usize = 16;

/// The data plane's UDP socket (dual-stack where the host has IPv6).
pub struct RealUdp {
    sock: tokio::net::UdpSocket,
    state: UdpSocketState,
    /// Dual-stack IPv6 socket: IPv4 peers are addressed as v4-mapped IPv6.
    v6: bool,
}

impl RealUdp {
    /// Binds `[::]:port` (or `0.0.0.0:port`) with large buffers, GSO and GRO.
    pub fn bind(port: u16) -> Result<Self, DataPlaneError> {
        let err = |source| DataPlaneError::Udp { port, source };
        // Dual-stack first, so peers may have IPv4 or IPv6 endpoints; IPv4 only when the
        // host has no IPv6.
        let (s, v6) = match bind_socket(port, true) {
            Ok(s) => (s, true),
            Err(e) => {
                tracing::info!(error = %e, "no dual-stack UDP socket; using IPv4 only");
                (bind_socket(port, false).map_err(err)?, false)
            }
        };
        set_buffers(&s);
        let sock = tokio::net::UdpSocket::from_std(s.into()).map_err(err)?;
        let state = UdpSocketState::new((&sock).into()).map_err(err)?;
        tracing::info!(
            port = sock.local_addr().map(|a| a.port()).unwrap_or(port),
            gso_segments = state.max_gso_segments(),
            gro_segments = state.gro_segments(),
            "UDP socket bound"
        );
        Ok(Self { sock, state, v6 })
    }

    /// The bound address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.sock.local_addr()
    }
}

fn bind_socket(port: u16, v6: bool) -> io::Result<socket2::Socket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(
        if v6 { Domain::IPV6 } else { Domain::IPV4 },
        Type::DGRAM,
        Some(Protocol::UDP),
    )?;
    s.set_nonblocking(true)?;
    let addr = if v6 {
        s.set_only_v6(false)?;
        SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0))
    } else {
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port))
    };
    s.bind(&addr.into())?;
    Ok(s)
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
        let destination = match dst {
            SocketAddr::V4(v4) if self.v6 => {
                SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0))
            }
            other => other,
        };
        let t = Transmit {
            destination,
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
