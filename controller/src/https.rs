//! The HTTPS listener (axum over rustls): TLS 1.2/1.3 with forward-secret AEAD suites only.

use anyhow::Result;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Serve `app` over TLS until `shutdown`, then let open connections finish gracefully.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    app: axum::Router,
    shutdown: CancellationToken,
) -> Result<()> {
    let acceptor = TlsAcceptor::from(tls);
    let tracker = TaskTracker::new();
    loop {
        let (tcp, remote) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r { Ok(c) => c, Err(e) => { tracing::warn!(error = %e, "accept"); continue; } },
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        let stop = shutdown.clone();
        tracker.spawn(async move {
            let tls =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(t)) => t,
                    Ok(Err(e)) => {
                        tracing::debug!(%remote, error = %e, "HTTPS handshake refused");
                        return;
                    }
                    Err(_) => return,
                };
            let svc = TowerToHyperService::new(
                app.layer(axum::Extension(axum::extract::ConnectInfo(remote))),
            );
            let builder = auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
                }
            }
        });
    }
    tracker.close();
    tracker.wait().await;
    Ok(())
}
