//! What every TCP listener of the controller shares: admission (a connection limit per
//! listener and per source, sized from the file-descriptor limit), accept-error backoff with
//! a rate-limited log line, and per-connection deadlines (the first request must arrive
//! soon after accept, and a connection with no request in flight is closed when idle).
//!
//! The deadlines live in the socket wrapper [`GuardedIo`], under TLS, so one mechanism
//! covers a silent TCP peer, a TLS handshake that never finishes, a TLS session that never
//! sends a request, an HTTP/2 connection that never opens a stream and an idle keep-alive.

use hyper::body::{Body, Frame, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
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
use tower::ServiceExt;

/// File descriptors kept back from the listeners: the admin socket, the store, logs, the
/// runtime's own descriptors.
pub const RESERVED_FDS: u64 = 128;
/// Never size limits above this, whatever the hard limit says.
const MAX_FD_BUDGET: u64 = 1 << 20;
/// How long after accept the first request (or gRPC stream) must have started; this
/// includes the TLS handshake.
pub const FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed to read one HTTP/1 request head.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
const BACKOFF_START: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// At most one log line per this period for each kind of accept problem.
const LOG_EVERY: Duration = Duration::from_secs(5);

/// Raise the soft `RLIMIT_NOFILE` to the hard limit; returns the soft limit in force.
pub fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) => {
            let want = hard.min(MAX_FD_BUDGET).max(soft);
            if want > soft && setrlimit(Resource::RLIMIT_NOFILE, want, hard).is_ok() {
                want
            } else {
                soft
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the file-descriptor limit; assuming 1024");
            1024
        }
    }
}

/// How many connections one listener holds at once, in total and from one source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnLimits {
    pub max_conns: usize,
    pub max_per_source: usize,
}

impl ConnLimits {
    fn share(budget: u64, num: u64, den: u64, per_source_div: usize) -> Self {
        let max_conns = usize::try_from((budget * num / den).max(8)).unwrap_or(usize::MAX);
        Self {
            max_conns,
            max_per_source: (max_conns / per_source_div).max(4),
        }
    }
}

impl Default for ConnLimits {
    /// For listeners started outside `serve` (tests, embedding): generous but finite.
    fn default() -> Self {
        Self {
            max_conns: 1024,
            max_per_source: 256,
        }
    }
}

/// The connection limits of every listener, split from `(fd limit - reserve)`.
#[derive(Clone, Copy, Debug)]
pub struct ListenerBudget {
    pub grpc: ConnLimits,
    pub https: ConnLimits,
    pub pki: ConnLimits,
}

impl ListenerBudget {
    /// Split `fd_limit` minus [`RESERVED_FDS`] between the gRPC, HTTPS and (if served) PKI
    /// listeners. gRPC holds one connection per agent, so it gets the larger share (3/5
    /// with PKI, 3/4 without: 10,000 agents fit under a 20,000 limit). Nodes behind one
    /// NAT share an address on gRPC, so a source may hold a quarter of it; browsers and
    /// relying parties an eighth of theirs.
    pub fn from_fd_limit(fd_limit: u64, with_pki: bool) -> Self {
        let budget = fd_limit
            .min(MAX_FD_BUDGET)
            .saturating_sub(RESERVED_FDS)
            .max(64);
        if with_pki {
            Self {
                grpc: ConnLimits::share(budget, 3, 5, 4),
                https: ConnLimits::share(budget, 1, 5, 8),
                pki: ConnLimits::share(budget, 1, 5, 8),
            }
        } else {
            Self {
                grpc: ConnLimits::share(budget, 3, 4, 4),
                https: ConnLimits::share(budget, 1, 4, 8),
                pki: ConnLimits::share(budget, 0, 1, 8),
            }
        }
    }
}

/// The address a per-source limit counts under: IPv6 by /64 (one host's usual share).
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

/// One log line per [`LOG_EVERY`], with the number of events it stood for.
#[derive(Debug)]
struct RateLimitedLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimitedLog {
    fn new() -> Self {
        Self {
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(suppressed)` when a line may be written now.
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

/// Backoff after failed accepts (EMFILE, ENFILE, ENOBUFS...): 10 ms doubling to 1 s, reset
/// by a successful accept, and a log line at most every few seconds.
#[derive(Debug)]
pub struct AcceptBackoff {
    what: &'static str,
    delay: Duration,
    log: RateLimitedLog,
}

impl AcceptBackoff {
    pub fn new(what: &'static str) -> Self {
        Self {
            what,
            delay: BACKOFF_START,
            log: RateLimitedLog::new(),
        }
    }

    /// Record a failed accept and wait before the next one.
    pub async fn failed(&mut self, e: &io::Error) {
        if let Some(suppressed) = self.log.allow() {
            tracing::warn!(listener = self.what, error = %e, suppressed, retry_ms = self.delay.as_millis() as u64, "accept failed");
        }
        tokio::time::sleep(self.delay).await;
        self.delay = (self.delay * 2).min(BACKOFF_MAX);
    }

    pub fn succeeded(&mut self) {
        self.delay = BACKOFF_START;
    }
}

/// Admission control of one listener.
#[derive(Debug)]
pub struct Admission {
    what: &'static str,
    limits: ConnLimits,
    slots: Arc<Semaphore>,
    /// Open connections per source; holds only sources with at least one, so it never has
    /// more entries than `limits.max_conns`.
    per_source: Mutex<HashMap<IpAddr, usize>>,
    refused_log: Mutex<RateLimitedLog>,
}

/// A connection's place in its listener's limits, given back on drop.
#[derive(Debug)]
pub struct Admitted {
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
    pub fn new(what: &'static str, limits: ConnLimits) -> Arc<Self> {
        Arc::new(Self {
            what,
            limits,
            slots: Arc::new(Semaphore::new(limits.max_conns)),
            per_source: Mutex::new(HashMap::new()),
            refused_log: Mutex::new(RateLimitedLog::new()),
        })
    }

    pub fn limits(&self) -> ConnLimits {
        self.limits
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.limits.max_conns - self.slots.available_permits()
    }

    /// Take a place for a connection from `peer`, or `None` when the listener or this
    /// source is at its limit (the caller closes the connection at once).
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Option<Admitted> {
        let source = source_key(peer);
        let refused = |why: &'static str| {
            if let Some(suppressed) = self.refused_log.lock().allow() {
                tracing::warn!(listener = self.what, source = %source, suppressed, limit = why, "connection refused: limit reached");
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

/// The per-connection deadlines.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// From accept to the start of the first request.
    pub first_request: Duration,
    /// With no request in flight, after the last one ended.
    pub idle: Duration,
}

#[derive(Debug)]
struct ActivityState {
    accepted: Instant,
    in_flight: AtomicUsize,
    served: AtomicBool,
    last_end: Mutex<Instant>,
}

/// Requests in flight on one connection, and when the last one ended.
#[derive(Clone, Debug)]
pub struct Activity(Arc<ActivityState>);

/// One request in flight; ends when dropped (with the response body).
#[derive(Debug)]
pub struct RequestGuard(Activity);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let s = &(self.0).0;
        // The end time is written before the count drops, so a reader that sees zero also
        // sees when it happened.
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

    /// A request (or stream) starts.
    pub fn begin(&self) -> RequestGuard {
        self.0.in_flight.fetch_add(1, Ordering::AcqRel);
        self.0.served.store(true, Ordering::Release);
        RequestGuard(self.clone())
    }

    /// When the connection is to be closed; `None` while a request is in flight.
    fn deadline(&self, t: &Timeouts) -> Option<Instant> {
        if self.0.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        if !self.0.served.load(Ordering::Acquire) {
            return Some(self.0.accepted + t.first_request);
        }
        Some(*self.0.last_end.lock() + t.idle)
    }
}

/// A socket that fails its reads once its connection's deadline has passed, so whatever
/// protocol runs over it (TLS, HTTP/1, HTTP/2) ends the connection. It also holds the
/// connection's place in the listener's limits.
pub struct GuardedIo<T> {
    inner: T,
    activity: Activity,
    timeouts: Timeouts,
    timer: Pin<Box<Sleep>>,
    _admitted: Admitted,
}

impl<T> GuardedIo<T> {
    /// The activity tracker the service layer reports requests to.
    pub fn activity(&self) -> Activity {
        self.activity.clone()
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// True once the deadline has passed; otherwise arms the timer to wake the reader.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        loop {
            let now = Instant::now();
            let (deadline, exact) = match self.activity.deadline(&self.timeouts) {
                Some(d) => (d, true),
                // While busy, look again after one idle period.
                None => (now + self.timeouts.idle, false),
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

impl<T: AsyncRead + Unpin> AsyncRead for GuardedIo<T> {
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

impl<T: AsyncWrite + Unpin> AsyncWrite for GuardedIo<T> {
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

/// Deadlines of the HTTPS listener (browsers keep idle connections for reuse).
pub const HTTPS_TIMEOUTS: Timeouts = Timeouts {
    first_request: FIRST_REQUEST_TIMEOUT,
    idle: Duration::from_secs(30),
};
/// Deadlines of the gRPC listener (an agent's Watch keeps its connection busy).
pub const GRPC_TIMEOUTS: Timeouts = Timeouts {
    first_request: FIRST_REQUEST_TIMEOUT,
    idle: Duration::from_secs(120),
};
/// Deadlines of the plain-HTTP PKI listener (one CRL or OCSP fetch per connection).
pub const PKI_TIMEOUTS: Timeouts = Timeouts {
    first_request: FIRST_REQUEST_TIMEOUT,
    idle: Duration::from_secs(15),
};

/// A TCP listener with admission, accept backoff and connection deadlines.
pub struct GuardedListener {
    listener: TcpListener,
    admission: Arc<Admission>,
    backoff: AcceptBackoff,
    timeouts: Timeouts,
}

impl GuardedListener {
    pub fn new(
        listener: TcpListener,
        what: &'static str,
        limits: ConnLimits,
        timeouts: Timeouts,
    ) -> Self {
        Self {
            listener,
            admission: Admission::new(what, limits),
            backoff: AcceptBackoff::new(what),
            timeouts,
        }
    }

    pub fn admission(&self) -> Arc<Admission> {
        self.admission.clone()
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The next admitted connection. Cancel-safe: nothing is lost when the future is
    /// dropped between connections.
    pub async fn accept(&mut self) -> (GuardedIo<TcpStream>, SocketAddr) {
        loop {
            let (tcp, peer) = match self.listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    self.backoff.failed(&e).await;
                    continue;
                }
            };
            self.backoff.succeeded();
            // Over the limit: closed at once, which frees the descriptor.
            let Some(admitted) = self.admission.admit(peer.ip()) else {
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let io = GuardedIo {
                inner: tcp,
                activity: Activity::new(),
                timeouts: self.timeouts,
                timer: Box::pin(tokio::time::sleep(self.timeouts.first_request)),
                _admitted: admitted,
            };
            return (io, peer);
        }
    }
}

impl From<TcpListener> for GuardedListener {
    /// Default limits and the HTTPS deadlines, for listeners started outside `serve`.
    fn from(l: TcpListener) -> Self {
        Self::new(l, "listener", ConnLimits::default(), HTTPS_TIMEOUTS)
    }
}

/// A response body that keeps its request counted as in flight until it is finished or
/// dropped (a gRPC Watch stream stays in flight for as long as it is open).
struct TrackedBody {
    inner: axum::body::Body,
    _guard: RequestGuard,
}

impl Body for TrackedBody {
    type Data = axum::body::Bytes;
    type Error = axum::Error;
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

/// HTTP settings of one listener.
#[derive(Clone, Copy, Debug)]
pub struct HttpOptions {
    /// Only HTTP/2 (gRPC).
    pub h2_only: bool,
    pub max_concurrent_streams: u32,
    /// HTTP/2 keep-alive ping interval; a ping unanswered for as long closes the connection.
    pub keep_alive: Duration,
}

/// Serve `app` on one connection until it ends or `stop` (then drain up to 10 s). Every
/// request carries `ext` in its extensions and is reported to `activity`.
pub async fn serve_connection<I, X>(
    io: I,
    app: axum::Router,
    ext: X,
    activity: Activity,
    opts: HttpOptions,
    stop: CancellationToken,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    X: Clone + Send + Sync + 'static,
{
    let svc = tower::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        let guard = activity.begin();
        req.extensions_mut().insert(ext.clone());
        let app = app.clone();
        async move {
            let resp = app.oneshot(req.map(axum::body::Body::new)).await?;
            Ok::<_, std::convert::Infallible>(resp.map(|inner| {
                axum::body::Body::new(TrackedBody {
                    inner,
                    _guard: guard,
                })
            }))
        }
    });
    let svc = TowerToHyperService::new(svc);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    if opts.h2_only {
        builder = builder.http2_only();
    }
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(64 * 1024);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(opts.max_concurrent_streams)
        .max_header_list_size(64 * 1024)
        .keep_alive_interval(opts.keep_alive)
        .keep_alive_timeout(opts.keep_alive);
    let conn = builder.serve_connection(TokioIo::new(io), svc);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => r,
        _ = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            match tokio::time::timeout(DRAIN_TIMEOUT, conn).await {
                Ok(r) => r,
                Err(_) => Ok(()),
            }
        }
    }
}

/// Wait for connection tasks after the listener stopped: up to the drain time, then abort.
pub async fn drain(mut conns: tokio::task::JoinSet<()>) {
    let drained = tokio::time::timeout(DRAIN_TIMEOUT + Duration::from_secs(1), async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        conns.abort_all();
        while conns.join_next().await.is_some() {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_splits_the_fd_limit_and_keeps_a_reserve() {
        let b = ListenerBudget::from_fd_limit(1024, true);
        let total = b.grpc.max_conns + b.https.max_conns + b.pki.max_conns;
        assert!(total as u64 <= 1024 - RESERVED_FDS, "{b:?}");
        assert!(b.pki.max_per_source < b.pki.max_conns / 2, "{b:?}");
        assert!(b.grpc.max_per_source >= 4);
        let agents = ListenerBudget::from_fd_limit(20_000, true);
        assert!(agents.grpc.max_conns > 10_000, "{agents:?}");
        let big = ListenerBudget::from_fd_limit(u64::MAX, false);
        assert!(big.grpc.max_conns as u64 <= MAX_FD_BUDGET);
    }

    #[tokio::test]
    async fn per_source_and_total_limits_are_enforced_and_released() {
        let a = Admission::new(
            "test",
            ConnLimits {
                max_conns: 3,
                max_per_source: 2,
            },
        );
        let x: IpAddr = "198.18.0.1".parse().unwrap();
        let y: IpAddr = "198.18.0.2".parse().unwrap();
        let a1 = a.admit(x).unwrap();
        let _a2 = a.admit(x).unwrap();
        assert!(a.admit(x).is_none(), "third from one source");
        let _b1 = a.admit(y).unwrap();
        assert!(a.admit(y).is_none(), "listener full");
        drop(a1);
        assert!(a.admit(x).is_some());
        // IPv6 sources count per /64.
        let v6a: IpAddr = "2001:db8::1".parse().unwrap();
        let v6b: IpAddr = "2001:db8::2".parse().unwrap();
        assert_eq!(source_key(v6a), source_key(v6b));
    }

    #[test]
    fn rate_limited_log_counts_what_it_suppressed() {
        let mut l = RateLimitedLog::new();
        assert_eq!(l.allow(), Some(0));
        for _ in 0..5 {
            assert_eq!(l.allow(), None);
        }
        l.last = Some(Instant::now() - LOG_EVERY);
        assert_eq!(l.allow(), Some(5));
    }
}
