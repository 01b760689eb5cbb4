//! The HTTPS listener: rustls with TLS 1.2/1.3 and forward-secret AEAD suites only, the
//! self-renewing certificate of [`CertSource`], and hyper serving the axum router.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::listen::{GuardedIo, GuardedListener, HttpOptions};
use crate::tls::{CertSource, TlsError, provider};

/// The rustls server configuration of the admin listener.
pub fn server_config(certs: Arc<CertSource>) -> Result<rustls::ServerConfig, TlsError> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(certs);
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    cfg.ignore_client_order = true;
    Ok(cfg)
}

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serve `app` over TLS on `listener` until `shutdown`: stop accepting, let open
/// connections finish (up to 10 s), then return. Handlers see the peer address as
/// `ConnectInfo<SocketAddr>`. A plain `TcpListener` gets default limits; `serve` passes a
/// [`GuardedListener`] sized from the file-descriptor limit.
pub async fn serve_https(
    listener: impl Into<GuardedListener>,
    app: axum::Router,
    certs: Arc<CertSource>,
    shutdown: CancellationToken,
) -> Result<(), TlsError> {
    let mut listener = listener.into();
    let acceptor = TlsAcceptor::from(Arc::new(server_config(certs)?));
    let mut conns = JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        let (io, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            c = listener.accept() => c,
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        let stop = shutdown.clone();
        conns.spawn(serve_connection(acceptor, io, peer, app, stop));
    }
    drop(listener);
    crate::listen::drain(conns).await;
    Ok(())
}

async fn serve_connection(
    acceptor: TlsAcceptor,
    tcp: GuardedIo<tokio::net::TcpStream>,
    peer: SocketAddr,
    app: axum::Router,
    stop: CancellationToken,
) {
    let activity = tcp.activity();
    let tls = tokio::select! {
        _ = stop.cancelled() => return,
        r = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)) => match r {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                tracing::debug!(peer = %peer, error = %e, "TLS handshake refused");
                return;
            }
            Err(_) => return,
        },
    };
    let opts = HttpOptions {
        h2_only: false,
        max_concurrent_streams: 64,
        keep_alive: Duration::from_secs(30),
    };
    let ext = axum::extract::ConnectInfo(peer);
    if let Err(e) = crate::listen::serve_connection(tls, app, ext, activity, opts, stop).await {
        tracing::debug!(peer = %peer, error = %e, "HTTPS connection ended with an error");
    }
}
