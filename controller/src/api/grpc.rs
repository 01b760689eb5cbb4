//! The gRPC listener: TLS accepted here (so the CRL is checked on every handshake), then
//! handed to tonic with the verified peer identity attached to every request.

use crate::domains::Domains;
use crate::error::ControllerError;
use crate::listen::{GuardedIo, GuardedListener, HttpOptions, serve_connection};
use crate::mesh::Mesh;
use futures::{Stream, StreamExt};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use zonemesh_ca::VerifiedNode;
use zonemesh_proto as pb;
use zonemesh_proto::enrollment_server::{Enrollment, EnrollmentServer};
use zonemesh_proto::mesh_server::{Mesh as MeshRpc, MeshServer};

/// Largest gRPC message accepted (a CSR is about 1.6 KiB).
pub const MAX_MESSAGE: usize = 64 * 1024;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Concurrent HTTP/2 streams per connection (an agent uses a handful).
pub const MAX_CONCURRENT_STREAMS: u32 = 64;

/// What tonic attaches to every request of a connection.
#[derive(Clone, Debug)]
pub struct PeerConn {
    pub remote: SocketAddr,
    /// Set when the client presented a certificate that verified against the CA and CRL.
    pub node: Option<Arc<VerifiedNode>>,
}

/// Serve Enrollment and Mesh on `listener` until `shutdown`; returns once every
/// connection task has finished. Connections are admitted, timed out and served as on the
/// other listeners (`crate::listen`).
pub async fn serve(
    listener: impl Into<GuardedListener>,
    tls: Arc<rustls::ServerConfig>,
    mesh: Arc<Mesh>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    serve_with_domains(listener, tls, mesh, None, shutdown).await
}

/// [`serve`], with the portal domains behind WatchEdge and ReportDeployment.
pub async fn serve_with_domains(
    listener: impl Into<GuardedListener>,
    tls: Arc<rustls::ServerConfig>,
    mesh: Arc<Mesh>,
    domains: Option<Arc<Domains>>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    serve_with(listener, tls, mesh, domains, None, None, shutdown).await
}

/// [`serve_with_domains`], with the SSH CA behind IssueSshHostCertificate, and connections
/// that present a node certificate served on `agents` (the lower-priority runtime of
/// [`crate::agent_rt`]) when given, else on the caller's runtime.
pub async fn serve_with(
    listener: impl Into<GuardedListener>,
    tls: Arc<rustls::ServerConfig>,
    mesh: Arc<Mesh>,
    domains: Option<Arc<Domains>>,
    ssh: Option<Arc<crate::ssh::Ssh>>,
    agents: Option<tokio::runtime::Handle>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut listener = listener.into();
    let acceptor = TlsAcceptor::from(tls);
    let svc = GrpcService {
        mesh: mesh.clone(),
        domains,
        ssh,
        shutdown: shutdown.clone(),
    };
    let watch_svc = svc.clone();
    let app = tonic::service::Routes::new(
        EnrollmentServer::new(svc.clone()).max_decoding_message_size(MAX_MESSAGE),
    )
    .add_service(MeshServer::new(svc).max_decoding_message_size(MAX_MESSAGE))
    .prepare()
    .into_axum_router()
    .route(
        WATCH_PATH,
        axum::routing::post(move |req: axum::extract::Request| {
            let svc = watch_svc.clone();
            async move { svc.watch_http(req).await }
        }),
    );
    let mut conns = tokio::task::JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        let (tcp, remote) = tokio::select! {
            _ = shutdown.cancelled() => break,
            c = listener.accept() => c,
        };
        let acceptor = acceptor.clone();
        let mesh = mesh.clone();
        let stop = shutdown.clone();
        let app = app.clone();
        let agents = agents.clone();
        conns.spawn(async move {
            let activity = tcp.activity();
            let hs = tokio::select! {
                _ = stop.cancelled() => return,
                r = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)) => r,
            };
            let io = match hs {
                Ok(Ok(io)) => io,
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::TimedOut => return,
                Ok(Err(e)) => {
                    tracing::info!(%remote, error = %e, "TLS handshake refused");
                    return;
                }
                Err(_) => return,
            };
            let node = peer_identity(&mesh, &io);
            let is_agent = node.is_some();
            let info = PeerConn { remote, node };
            let opts = HttpOptions {
                h2_only: true,
                max_concurrent_streams: MAX_CONCURRENT_STREAMS,
                keep_alive: Duration::from_secs(30),
            };
            let served = serve_connection(io, app, info, activity, opts, stop);
            let ended = match agents.filter(|_| is_agent) {
                // Aborted with this task when the drain gives up on it.
                Some(rt) => {
                    match tokio_util::task::AbortOnDropHandle::new(rt.spawn(served)).await {
                        Ok(r) => r,
                        Err(e) => Err(e.into()),
                    }
                }
                None => served.await,
            };
            if let Err(e) = ended {
                tracing::debug!(%remote, error = %e, "gRPC connection ended with an error");
            }
        });
    }
    drop(listener);
    crate::listen::drain(conns).await;
    Ok(())
}

/// The verified identity of a TLS client (the handshake already checked chain and CRL;
/// this also reads the zonemesh identity out of it).
fn peer_identity(
    mesh: &Mesh,
    io: &tokio_rustls::server::TlsStream<GuardedIo<TcpStream>>,
) -> Option<Arc<VerifiedNode>> {
    let certs = io.get_ref().1.peer_certificates()?;
    let chain: Vec<Vec<u8>> = certs.iter().map(|c| c.to_vec()).collect();
    let auth = mesh.authority();
    match auth
        .trust_store()
        .verify_node_chain(&chain, &auth.crls_der(), mesh.now())
    {
        Ok(v) => Some(Arc::new(v)),
        Err(e) => {
            tracing::info!(error = %e, "client certificate is not a node identity");
            None
        }
    }
}

/// How often an open edge stream re-checks that its node is still current.
const EDGE_RECHECK: Duration = Duration::from_secs(3);

struct EdgeWatch {
    mesh: Arc<Mesh>,
    domains: Arc<Domains>,
    who: Arc<VerifiedNode>,
    first: Option<pb::EdgeUpdate>,
    sub: crate::domains::edges::EdgeStream,
    shutdown: CancellationToken,
}

impl Drop for EdgeWatch {
    /// A stream the client dropped leaves the hub too.
    fn drop(&mut self) {
        self.end();
    }
}

impl EdgeWatch {
    fn end(&self) {
        let key = crate::store::node_key(&self.who.id.zone, &self.who.id.node);
        self.domains.hub().close(&key, &self.sub.cancel);
    }
}

impl GrpcService {
    fn domains(&self) -> Result<&Arc<Domains>, Status> {
        self.domains
            .as_ref()
            .ok_or_else(|| Status::unavailable("portal domains are not served here"))
    }
}

#[derive(Clone)]
struct GrpcService {
    mesh: Arc<Mesh>,
    domains: Option<Arc<Domains>>,
    ssh: Option<Arc<crate::ssh::Ssh>>,
    /// Ends open Watch streams, which would otherwise hold graceful shutdown up forever.
    shutdown: CancellationToken,
}

fn conn<T>(req: &Request<T>) -> Result<PeerConn, Status> {
    req.extensions()
        .get::<PeerConn>()
        .cloned()
        .ok_or_else(|| Status::internal("connection info missing"))
}

fn node<T>(req: &Request<T>) -> Result<Arc<VerifiedNode>, Status> {
    conn(req)?
        .node
        .ok_or_else(|| Status::unauthenticated("a valid node client certificate is required"))
}

/// Run blocking work (RSA signing, sled flushes) off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ControllerError> + Send + 'static,
) -> Result<T, Status> {
    crate::blocking::run(f).await.map_err(Status::from)
}

impl GrpcService {
    /// A node's unary call: its verified identity, the request body and the mesh's clock,
    /// run on the blocking pool (RSA signing, sled flushes).
    async fn node_call<B, T>(
        &self,
        req: Request<B>,
        f: impl FnOnce(&Mesh, &VerifiedNode, B, SystemTime) -> Result<T, ControllerError>
        + Send
        + 'static,
    ) -> Result<T, Status>
    where
        B: Send + 'static,
        T: Send + 'static,
    {
        let who = node(&req)?;
        let mesh = self.mesh.clone();
        let body = req.into_inner();
        blocking(move || {
            let now = mesh.now();
            f(&mesh, &who, body, now)
        })
        .await
    }
}

#[tonic::async_trait]
impl Enrollment for GrpcService {
    async fn enroll(
        &self,
        req: Request<pb::EnrollRequest>,
    ) -> Result<Response<pb::EnrollResponse>, Status> {
        let source = conn(&req)?.remote.ip();
        let mesh = self.mesh.clone();
        let body = req.into_inner();
        blocking(move || {
            let now = mesh.now();
            let r = mesh.enroll(&body, source, now);
            mesh.metrics().enrollment(r.is_ok());
            r
        })
        .await
        .map(Response::new)
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::MeshUpdate, Status>> + Send>>;
type EdgeStream = Pin<Box<dyn Stream<Item = Result<pb::EdgeUpdate, Status>> + Send>>;

/// The Watch RPC's path. It is served by [`GrpcService::watch_http`] rather than by
/// tonic's generated handler: tonic would copy every message into a buffer of the stream's
/// own (kept at the size of the largest message sent, the snapshot), while this handler
/// hands the shared encoded frames to HTTP/2 as they are.
const WATCH_PATH: &str = "/zonemesh.v1.Mesh/Watch";
/// How long a client may take to send its WatchRequest.
const WATCH_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// One open Watch stream: the version the watcher has, and a wake-up on new versions.
/// Nothing else is held per stream; a watcher that does not read is simply not polled
/// (HTTP/2 flow control), and what it missed is taken as one delta when it reads again.
struct WatchState {
    mesh: Arc<Mesh>,
    /// Sent before anything else (the chain for a resumed stream, the first frame).
    queued: std::collections::VecDeque<crate::mesh::Frame>,
    last: u64,
    head: tokio::sync::watch::Receiver<u64>,
    /// Whether the agent takes the CA chain once per stream; else every peer carries it.
    chain_once: bool,
    cancel: CancellationToken,
    /// Cancels `cancel` when the stream is dropped, so the Mesh forgets it.
    _registered: tokio_util::sync::DropGuard,
    shutdown: CancellationToken,
    node: String,
    /// The stream ends when the client certificate expires.
    not_after: SystemTime,
    expiry: crate::clock::Alarm,
    /// When the last message went out (the next waits for [`Mesh::watch_pace`]).
    sent: Option<tokio::time::Instant>,
}

impl WatchState {
    /// The next gRPC frame to send, `Ok(None)` when the stream ends normally (revoked,
    /// shutting down), or the status it ends with.
    async fn next(&mut self) -> Result<Option<bytes::Bytes>, Status> {
        loop {
            if self.cancel.is_cancelled() {
                tracing::info!(node = %self.node, "watch ended: node revoked");
                return Ok(None);
            }
            if self.shutdown.is_cancelled() {
                tracing::debug!(node = %self.node, "watch ended: controller shutting down");
                return Ok(None);
            }
            if self.mesh.now() >= self.not_after {
                tracing::info!(node = %self.node, "watch ended: client certificate expired");
                return Err(Status::unauthenticated("certificate has expired"));
            }
            let frame = match self.queued.pop_front() {
                Some(f) => Some(f),
                None => {
                    // Marked seen before the version is read: a change published after
                    // this wakes the wait below.
                    self.head.borrow_and_update();
                    match self.mesh.next_frame_cached(self.last) {
                        Some(next) => next,
                        None => {
                            let (mesh, after) = (self.mesh.clone(), self.last);
                            blocking(move || mesh.next_frame(after)).await?
                        }
                    }
                }
            };
            if let Some(f) = frame {
                self.last = f.version();
                self.sent = Some(tokio::time::Instant::now());
                if self.chain_once {
                    return Ok(Some(f.grpc()));
                }
                // Decoded and encoded again for this stream alone (a snapshot is large).
                let chain = self.mesh.ca_chain();
                return blocking(move || f.with_peer_chains(&chain))
                    .await
                    .map(|f| Some(f.grpc()));
            }
            tokio::select! {
                _ = self.cancel.cancelled() => {}
                _ = self.shutdown.cancelled() => {}
                // The loop re-checks the clock (it may have been set back), so re-arm.
                _ = &mut self.expiry => self.expiry = self.mesh.clock().alarm(self.not_after),
                r = self.head.changed() => {
                    if r.is_err() {
                        return Ok(None);
                    }
                    self.pace().await;
                }
            }
        }
    }

    /// Wait until the pace since the last message has passed (changes meanwhile are
    /// coalesced into the next message), or the stream is ending.
    async fn pace(&mut self) {
        let Some(sent) = self.sent else { return };
        let until = sent + self.mesh.watch_pace();
        if until <= tokio::time::Instant::now() {
            return;
        }
        tokio::select! {
            _ = self.cancel.cancelled() => {}
            _ = self.shutdown.cancelled() => {}
            _ = tokio::time::sleep_until(until) => {}
        }
    }
}

/// Read the single WatchRequest of a Watch call (a gRPC frame, uncompressed).
async fn watch_request(body: axum::body::Body) -> Result<pb::WatchRequest, Status> {
    use http_body_util::BodyExt;
    let collected = tokio::time::timeout(
        WATCH_REQUEST_TIMEOUT,
        http_body_util::Limited::new(body, MAX_MESSAGE).collect(),
    )
    .await
    .map_err(|_| Status::deadline_exceeded("no WatchRequest in time"))?
    .map_err(|e| Status::invalid_argument(format!("WatchRequest: {e}")))?
    .to_bytes();
    let (head, rest) = collected
        .split_at_checked(5)
        .ok_or_else(|| Status::invalid_argument("WatchRequest: truncated frame"))?;
    if head[0] != 0 {
        return Err(Status::unimplemented("compressed WatchRequest"));
    }
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    let msg = rest
        .get(..len)
        .ok_or_else(|| Status::invalid_argument("WatchRequest: truncated message"))?;
    prost::Message::decode(msg).map_err(|e| Status::invalid_argument(format!("WatchRequest: {e}")))
}

impl GrpcService {
    /// The Watch RPC over HTTP/2: the snapshot or the missed changes, then live changes,
    /// each the shared encoded frame; trailers carry the status the stream ends with.
    async fn watch_http(&self, req: axum::extract::Request) -> axum::response::Response {
        match self.watch_start(req).await {
            Ok(state) => {
                use hyper::body::Frame as H2Frame;
                let frames = futures::stream::unfold(Some(state), |st| async move {
                    let mut st = st?;
                    let frame = match st.next().await {
                        Ok(Some(bytes)) => return Some((H2Frame::data(bytes), Some(st))),
                        Ok(None) => Status::ok(""),
                        Err(status) => status,
                    };
                    let mut trailers = axum::http::HeaderMap::new();
                    if let Err(e) = frame.add_header(&mut trailers) {
                        tracing::warn!(error = %e, "watch status not encodable");
                    }
                    Some((H2Frame::trailers(trailers), None))
                })
                .map(Ok::<_, std::convert::Infallible>);
                let mut resp = axum::response::Response::new(axum::body::Body::new(
                    http_body_util::StreamBody::new(frames),
                ));
                resp.headers_mut().insert(
                    axum::http::header::CONTENT_TYPE,
                    axum::http::HeaderValue::from_static("application/grpc"),
                );
                resp
            }
            Err(status) => status.into_http(),
        }
    }

    async fn watch_start(&self, req: axum::extract::Request) -> Result<WatchState, Status> {
        let who = req
            .extensions()
            .get::<PeerConn>()
            .cloned()
            .ok_or_else(|| Status::internal("connection info missing"))?
            .node
            .ok_or_else(|| {
                Status::unauthenticated("a valid node client certificate is required")
            })?;
        let body = watch_request(req.into_body()).await?;
        let node_key = crate::store::node_key(&who.id.zone, &who.id.node);
        let mesh = self.mesh.clone();
        let resume = body.resume_from_version;
        let w = who.clone();
        let sub = blocking(move || {
            let now = mesh.now();
            mesh.watch(&w, resume, now)
        })
        .await?;
        tracing::debug!(node = %node_key, from = resume, version = sub.last_version, "watch started");
        let mut queued = std::collections::VecDeque::new();
        if body.chain_once && !sub.first.as_ref().is_some_and(|f| f.is_snapshot()) {
            // A resumed stream: the chain first (a snapshot carries it).
            queued.push_back(self.mesh.chain_frame(resume));
        }
        queued.extend(sub.first);
        Ok(WatchState {
            mesh: self.mesh.clone(),
            queued,
            last: sub.last_version,
            head: sub.head,
            chain_once: body.chain_once,
            _registered: sub.cancel.clone().drop_guard(),
            cancel: sub.cancel,
            shutdown: self.shutdown.clone(),
            node: node_key,
            not_after: who.not_after,
            expiry: self.mesh.clock().alarm(who.not_after),
            sent: None,
        })
    }
}

#[tonic::async_trait]
impl MeshRpc for GrpcService {
    async fn renew(
        &self,
        req: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::RenewResponse>, Status> {
        self.node_call(req, |mesh, who, body, now| {
            let key = if body.rotate_key {
                crate::mesh::RenewKey::Rotate
            } else {
                crate::mesh::RenewKey::Keep
            };
            mesh.renew(who, &body.csr_der, key, now)
        })
        .await
        .map(Response::new)
    }

    async fn issue_tls_certificate(
        &self,
        req: Request<pb::IssueTlsRequest>,
    ) -> Result<Response<pb::IssueTlsResponse>, Status> {
        self.node_call(req, |mesh, who, body, now| mesh.issue_tls(who, &body, now))
            .await
            .map(Response::new)
    }

    async fn update_endpoints(
        &self,
        req: Request<pb::UpdateEndpointsRequest>,
    ) -> Result<Response<pb::Ack>, Status> {
        self.node_call(req, |mesh, who, body, now| {
            mesh.update_endpoints(who, &body.endpoints, now)
        })
        .await
        .map(|_| Response::new(pb::Ack {}))
    }

    async fn report_health(
        &self,
        req: Request<pb::HealthReport>,
    ) -> Result<Response<pb::Ack>, Status> {
        // The caller check reads the node record: on the blocking pool.
        self.node_call(req, |mesh, who, body, now| {
            mesh.report_health(who, &body, now)
        })
        .await
        .map(|_| Response::new(pb::Ack {}))
    }

    async fn report_events(
        &self,
        req: Request<pb::SecurityEvents>,
    ) -> Result<Response<pb::Ack>, Status> {
        self.node_call(req, |mesh, who, body, now| {
            mesh.report_events(who, &body, now)
        })
        .await
        .map(|_| Response::new(pb::Ack {}))
    }

    async fn issue_ssh_host_certificate(
        &self,
        req: Request<pb::SshHostCertificateRequest>,
    ) -> Result<Response<pb::SshHostCertificateResponse>, Status> {
        let ssh = self
            .ssh
            .clone()
            .ok_or_else(|| Status::unavailable("this controller has no SSH CA"))?;
        self.node_call(req, move |mesh, who, body, now| {
            let node = mesh.caller(who, now)?;
            ssh.sign_host(&node, &body.host_public_key)
        })
        .await
        .map(Response::new)
    }

    type WatchEdgeStream = EdgeStream;

    async fn watch_edge(
        &self,
        req: Request<pb::EdgeHello>,
    ) -> Result<Response<EdgeStream>, Status> {
        let who = node(&req)?;
        let domains = self.domains()?;
        let (mesh, d, w) = (self.mesh.clone(), domains.clone(), who.clone());
        let hello = req.into_inner();
        let domains = domains.clone();
        let (snapshot, sub) = blocking(move || {
            let node = mesh.caller(&w, mesh.now())?;
            d.open_edge(&node, &hello)
        })
        .await?;
        let state = EdgeWatch {
            mesh: self.mesh.clone(),
            domains,
            who,
            first: Some(snapshot),
            sub,
            shutdown: self.shutdown.clone(),
        };
        let stream = futures::stream::unfold(state, |mut st| async move {
            if let Some(s) = st.first.take() {
                return Some((Ok(s), st));
            }
            loop {
                let next = tokio::select! {
                    _ = st.shutdown.cancelled() => None,
                    _ = st.sub.cancel.cancelled() => None,
                    _ = tokio::time::sleep(EDGE_RECHECK) => Some(None),
                    u = st.sub.rx.recv() => u.map(Some),
                };
                match next {
                    None => {
                        st.end();
                        return None;
                    }
                    Some(Some(u)) => return Some((Ok(u), st)),
                    // The node is re-checked now and then, so a revoked or expired node's
                    // stream (and the keys it would carry) ends.
                    Some(None) => {
                        let (mesh, w) = (st.mesh.clone(), st.who.clone());
                        if let Err(e) = blocking(move || mesh.caller(&w, mesh.now())).await {
                            tracing::info!(node = %st.who.id.node, zone = %st.who.id.zone, "edge stream ended: {}", e.message());
                            st.end();
                            return None;
                        }
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn report_deployment(
        &self,
        req: Request<pb::DeploymentReport>,
    ) -> Result<Response<pb::Ack>, Status> {
        let d = self.domains()?.clone();
        self.node_call(req, move |mesh, who, body, now| {
            d.report(&mesh.caller(who, now)?, &body)
        })
        .await
        .map(|_| Response::new(pb::Ack {}))
    }

    type WatchStream = WatchStream;

    /// Watch through tonic's generated handler, for a Mesh service mounted without the
    /// [`WATCH_PATH`] route: the same stream, each shared frame decoded for tonic to encode.
    async fn watch(&self, req: Request<pb::WatchRequest>) -> Result<Response<WatchStream>, Status> {
        let (parts, ext, body) = req.into_parts();
        let mut http_req = axum::extract::Request::new(axum::body::Body::from(grpc_frame(&body)));
        *http_req.extensions_mut() = ext;
        drop(parts);
        let state = self.watch_start(http_req).await?;
        let stream = futures::stream::unfold(Some(state), |st| async move {
            let mut st = st?;
            match st.next().await {
                Ok(Some(bytes)) => {
                    let update = prost::Message::decode(&bytes[5..])
                        .map_err(|e| Status::internal(format!("watch frame: {e}")));
                    Some((update, Some(st)))
                }
                Ok(None) => None,
                Err(status) => Some((Err(status), None)),
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// `msg` as a gRPC frame (uncompressed).
fn grpc_frame(msg: &impl prost::Message) -> Vec<u8> {
    let body = msg.encode_to_vec();
    let mut out = Vec::with_capacity(5 + body.len());
    out.push(0);
    out.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(&body);
    out
}
