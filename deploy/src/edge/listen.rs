//! What both edge listeners share: a connection cap per listener and per source, backoff
//! after failed accepts, and per-connection deadlines kept in the socket wrapper
//! ([`Deadlined`]) under TLS: the first request must start soon after accept (this covers
//! a silent peer and a handshake that never ends), and a connection with no request in
//! flight is closed once idle. A request in flight (a long download included) is never cut.

use hyper::body::{Body, Frame, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;

/// Time for an HTTP/1 request head to arrive.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Time open connections get to finish at shutdown.
pub(crate) const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
const BACKOFF_START: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
const LOG_EVERY: Duration = Duration::from_secs(5);

/// Connection limits and deadlines of one listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenerLimits {
    /// Connections open at once.
    pub max_conns: usize,
    /// Connections open at once from one source (IPv6 counted per /64).
    pub max_per_source: usize,
    /// From accept to the start of the first request, TLS handshake included.
    pub first_request: Duration,
    /// With no request in flight, after the last one ended.
    pub idle: Duration,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        Self {
            max_conns: 4096,
            max_per_source: 256,
            first_request: Duration::from_secs(10),
            idle: Duration::from_secs(60),
        }
    }
}

fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// At most one log line per [`LOG_EVERY`].
struct Throttled {
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttled {
    fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        match self.last {
            Some(t) if now.duration_since(t) < LOG_EVERY => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

struct Admission {
    what: &'static str,
    limits: ListenerLimits,
    slots: Arc<Semaphore>,
    /// Only sources with an open connection: never more entries than `max_conns`.
    per_source: Mutex<HashMap<IpAddr, usize>>,
    log: Mutex<Throttled>,
}

/// A connection's place in its listener's limits, given back on drop.
struct Admitted {
    admission: Arc<Admission>,
    source: IpAddr,
    _slot: OwnedSemaphorePermit,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut map = self.admission.per_source.lock();
        if let Some(n) = map.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.source);
            }
        }
    }
}

impl Admission {
    fn admit(self: &Arc<Self>, peer: IpAddr) -> Option<Admitted> {
        let source = source_key(peer);
        let refused = |why: &'static str| {
            if let Some(suppressed) = self.log.lock().allow() {
                tracing::warn!(listener = self.what, source = %source, suppressed, limit = why, "edge connection refused: limit reached");
            }
            None
        };
        let Ok(slot) = self.slots.clone().try_acquire_owned() else {
            return refused("listener");
        };
        let mut map = self.per_source.lock();
        let n = map.entry(source).or_insert(0);
        if *n >= self.limits.max_per_source {
            drop(map);
            return refused("source");
        }
        *n += 1;
        drop(map);
        Some(Admitted {
            admission: self.clone(),
            source,
            _slot: slot,
        })
    }
}

struct ActivityState {
    accepted: Instant,
    in_flight: AtomicUsize,
    served: AtomicBool,
    last_end: Mutex<Instant>,
}

/// Requests in flight on one connection.
#[derive(Clone)]
pub(crate) struct Activity(Arc<ActivityState>);

/// One request in flight, until dropped with its response body.
pub(crate) struct InFlight(Activity);

impl Drop for InFlight {
    fn drop(&mut self) {
        let s = &(self.0).0;
        *s.last_end.lock() = Instant::now();
        s.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Activity {
    fn new() -> Self {
        let now = Instant::now();
        Self(Arc::new(ActivityState {
            accepted: now,
            in_flight: AtomicUsize::new(0),
            served: AtomicBool::new(false),
            last_end: Mutex::new(now),
        }))
    }

    pub(crate) fn begin(&self) -> InFlight {
        self.0.in_flight.fetch_add(1, Ordering::AcqRel);
        self.0.served.store(true, Ordering::Release);
        InFlight(self.clone())
    }

    fn deadline(&self, l: &ListenerLimits) -> Option<Instant> {
        if self.0.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        if !self.0.served.load(Ordering::Acquire) {
            return Some(self.0.accepted + l.first_request);
        }
        Some(*self.0.last_end.lock() + l.idle)
    }
}

/// A socket whose reads fail once its connection's deadline has passed, so TLS, HTTP/1
/// and HTTP/2 above it all end. It also holds the connection's admission.
pub(crate) struct Deadlined {
    inner: TcpStream,
    activity: Activity,
    limits: ListenerLimits,
    timer: Pin<Box<Sleep>>,
    _admitted: Admitted,
}

impl Deadlined {
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        loop {
            let now = Instant::now();
            let (deadline, exact) = match self.activity.deadline(&self.limits) {
                Some(d) => (d, true),
                None => (now + self.limits.idle, false),
            };
            if exact && deadline <= now {
                return true;
            }
            let keep = !self.timer.is_elapsed()
                && if exact {
                    self.timer.deadline() == deadline
                } else {
                    self.timer.deadline() > now
                };
            if !keep {
                self.timer.as_mut().reset(deadline);
            }
            if self.timer.as_mut().poll(cx).is_pending() {
                return false;
            }
        }
    }
}

impl AsyncRead for Deadlined {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.expired(cx) {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "connection deadline passed",
            )));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Deadlined {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// A listener with admission, accept backoff and connection deadlines.
pub(crate) struct GuardedListener {
    listener: TcpListener,
    admission: Arc<Admission>,
    limits: ListenerLimits,
    delay: Duration,
    log: Throttled,
}

impl GuardedListener {
    pub(crate) fn new(listener: TcpListener, what: &'static str, limits: ListenerLimits) -> Self {
        Self {
            listener,
            admission: Arc::new(Admission {
                what,
                limits,
                slots: Arc::new(Semaphore::new(limits.max_conns)),
                per_source: Mutex::new(HashMap::new()),
                log: Mutex::new(Throttled {
                    last: None,
                    suppressed: 0,
                }),
            }),
            limits,
            delay: BACKOFF_START,
            log: Throttled {
                last: None,
                suppressed: 0,
            },
        }
    }

    /// The next admitted connection, its activity tracker and peer. Cancel-safe.
    pub(crate) async fn accept(&mut self) -> (Deadlined, Activity, SocketAddr) {
        loop {
            let (tcp, peer) = match self.listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE, ENFILE, ENOBUFS...: wait, doubling up to 1 s.
                    if let Some(suppressed) = self.log.allow() {
                        tracing::warn!(listener = self.admission.what, error = %e, suppressed, "accept failed");
                    }
                    tokio::time::sleep(self.delay).await;
                    self.delay = (self.delay * 2).min(BACKOFF_MAX);
                    continue;
                }
            };
            self.delay = BACKOFF_START;
            let Some(admitted) = self.admission.admit(peer.ip()) else {
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let activity = Activity::new();
            let io = Deadlined {
                inner: tcp,
                activity: activity.clone(),
                limits: self.limits,
                timer: Box::pin(tokio::time::sleep(self.limits.first_request)),
                _admitted: admitted,
            };
            return (io, activity, peer);
        }
    }
}

/// A response body that keeps its request in flight until it is finished or dropped.
pub(crate) struct Tracked<B> {
    pub(crate) inner: B,
    pub(crate) _in_flight: InFlight,
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Serve HTTP/1.1 or HTTP/2 on `io` until the connection ends or `stop` (then drain for
/// up to [`DRAIN_TIMEOUT`]).
pub(crate) async fn serve_connection<I, S, B>(io: I, svc: S, stop: CancellationToken)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<
            hyper::Request<hyper::body::Incoming>,
            Response = hyper::Response<B>,
            Error = std::convert::Infallible,
        > + Send
        + 'static,
    S::Future: Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(64 * 1024);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256)
        .max_header_list_size(64 * 1024)
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(30));
    let conn = builder.serve_connection(TokioIo::new(io), svc);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            tokio::time::timeout(DRAIN_TIMEOUT, conn).await.unwrap_or(Ok(()))
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "edge connection ended with an error");
    }
}

/// Wait for connection tasks after a listener stopped: up to the drain time, then abort.
pub(crate) async fn drain(mut conns: tokio::task::JoinSet<()>) {
    let drained = tokio::time::timeout(DRAIN_TIMEOUT + Duration::from_secs(1), async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        conns.abort_all();
        while conns.join_next().await.is_some() {}
    }
}
