//! The gRPC listener: TLS accepted here (so the CRL is checked on every handshake), then
//! handed to tonic with the verified peer identity attached to every request.

use crate::domains::Domains;
use crate::error::ControllerError;
use crate::listen::{GuardedIo, GuardedListener, HttpOptions, serve_connection};
use crate::mesh::Mesh;
use futures::Stream;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::net::TcpStream;
use tokio::sync::broadcast;
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
    serve_with(listener, tls, mesh, domains, None, shutdown).await
}

/// [`serve_with_domains`], with the SSH CA behind IssueSshHostCertificate.
pub async fn serve_with(
    listener: impl Into<GuardedListener>,
    tls: Arc<rustls::ServerConfig>,
    mesh: Arc<Mesh>,
    domains: Option<Arc<Domains>>,
    ssh: Option<Arc<crate::ssh::Ssh>>,
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
    let app = tonic::service::Routes::new(
        EnrollmentServer::new(svc.clone()).max_decoding_message_size(MAX_MESSAGE),
    )
    .add_service(MeshServer::new(svc).max_decoding_message_size(MAX_MESSAGE))
    .prepare()
    .into_axum_router();
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
            let info = PeerConn { remote, node };
            let opts = HttpOptions {
                h2_only: true,
                max_concurrent_streams: MAX_CONCURRENT_STREAMS,
                keep_alive: Duration::from_secs(30),
            };
            if let Err(e) = serve_connection(io, app, info, activity, opts, stop).await {
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
        .ca()
        .trust_store()
        .verify_node_chain(&chain, &[auth.crl_der().to_vec()], mesh.now())
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
            mesh.enroll(&body, source, now)
        })
        .await
        .map(Response::new)
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::MeshUpdate, Status>> + Send>>;
type EdgeStream = Pin<Box<dyn Stream<Item = Result<pb::EdgeUpdate, Status>> + Send>>;

struct WatchState {
    mesh: Arc<Mesh>,
    pending: std::collections::VecDeque<Arc<pb::MeshUpdate>>,
    last: u64,
    /// Log entries up to this version are replayed (in chunks) before live changes.
    replay_to: u64,
    rx: broadcast::Receiver<Arc<pb::MeshUpdate>>,
    cancel: CancellationToken,
    /// Cancels `cancel` when the stream is dropped, so the Mesh forgets it.
    _registered: tokio_util::sync::DropGuard,
    shutdown: CancellationToken,
    node: String,
    /// The stream ends when the client certificate expires.
    not_after: SystemTime,
    expiry: crate::clock::Alarm,
    ended: bool,
}

impl WatchState {
    /// Queue the next chunk of the log replay (or the snapshot, if the log moved on).
    async fn replay_next(&mut self) -> Result<(), Status> {
        let (mesh, after, upto) = (self.mesh.clone(), self.last, self.replay_to);
        let chunk = blocking(move || mesh.replay(after, upto)).await?;
        match chunk {
            Some(c) if !c.is_empty() => {
                self.last = c.last().map(|u| u.version).unwrap_or(self.last);
                self.pending.extend(c);
            }
            _ => {
                let mesh = self.mesh.clone();
                let snap = blocking(move || mesh.snapshot()).await?;
                self.last = snap.version;
                self.replay_to = snap.version;
                self.pending.push_back(snap);
            }
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl MeshRpc for GrpcService {
    async fn renew(
        &self,
        req: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::RenewResponse>, Status> {
        self.node_call(req, |mesh, who, body, now| {
            mesh.renew(who, &body.csr_der, crate::mesh::RenewKey::Keep, now)
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
        let who = node(&req)?;
        self.mesh
            .report_health(&who, req.get_ref(), self.mesh.now())
            .map_err(Status::from)?;
        Ok(Response::new(pb::Ack {}))
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

    async fn watch(&self, req: Request<pb::WatchRequest>) -> Result<Response<WatchStream>, Status> {
        let who = node(&req)?;
        let node_key = crate::store::node_key(&who.id.zone, &who.id.node);
        let mesh = self.mesh.clone();
        let resume = req.get_ref().resume_from_version;
        let w = who.clone();
        let sub = blocking(move || {
            let now = mesh.now();
            mesh.watch(&w, resume, now)
        })
        .await?;
        tracing::debug!(node = %node_key, from = resume, version = sub.last_version, "watch started");
        let state = WatchState {
            mesh: self.mesh.clone(),
            pending: sub.initial.into(),
            last: sub.last_version,
            replay_to: sub.replay_to,
            rx: sub.rx,
            _registered: sub.cancel.clone().drop_guard(),
            cancel: sub.cancel,
            shutdown: self.shutdown.clone(),
            node: node_key,
            not_after: who.not_after,
            expiry: self.mesh.clock().alarm(who.not_after),
            ended: false,
        };
        let stream = futures::stream::unfold(state, |mut st| async move {
            loop {
                if st.ended {
                    return None;
                }
                if st.cancel.is_cancelled() {
                    tracing::info!(node = %st.node, "watch ended: node revoked");
                    return None;
                }
                if st.shutdown.is_cancelled() {
                    tracing::debug!(node = %st.node, "watch ended: controller shutting down");
                    return None;
                }
                if st.mesh.now() >= st.not_after {
                    tracing::info!(node = %st.node, "watch ended: client certificate expired");
                    st.ended = true;
                    let status = Status::unauthenticated("certificate has expired");
                    return Some((Err(status), st));
                }
                if let Some(u) = st.pending.pop_front() {
                    return Some((Ok(u.as_ref().clone()), st));
                }
                if st.last < st.replay_to {
                    if let Err(e) = st.replay_next().await {
                        st.ended = true;
                        return Some((Err(e), st));
                    }
                    continue;
                }
                let next = tokio::select! {
                    _ = st.cancel.cancelled() => continue,
                    _ = st.shutdown.cancelled() => continue,
                    _ = &mut st.expiry => None,
                    r = st.rx.recv() => Some(r),
                };
                let Some(next) = next else {
                    // The loop re-checks the clock (it may have been set back), so re-arm.
                    st.expiry = st.mesh.clock().alarm(st.not_after);
                    continue;
                };
                match next {
                    Ok(u) if u.version > st.last => {
                        st.last = u.version;
                        st.replay_to = st.replay_to.max(u.version);
                        return Some((Ok(u.as_ref().clone()), st));
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        let (mesh, after) = (st.mesh.clone(), st.last);
                        match blocking(move || mesh.resume_from(after)).await {
                            Ok(r) => {
                                st.last = r.last_version;
                                st.replay_to = r.replay_to;
                                st.pending.extend(r.initial);
                            }
                            Err(e) => {
                                st.ended = true;
                                return Some((Err(e), st));
                            }
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }
}
