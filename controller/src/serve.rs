//! `zonemesh-controller serve`: one process with the store, the gRPC control plane, the
//! HTTPS side, the PKI endpoints and the admin socket, stopped cleanly by SIGTERM/SIGINT.

use crate::admin::{self, AdminHandler};
use crate::authority::{Authority, CRL_REFRESH};
use crate::mesh::Mesh;
use crate::secrets::KekSource;
use crate::store::Store;
use crate::tls::{CrlClientVerifier, ServerIdentity, server_config};
use anyhow::{Context, Result, bail};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use zonemesh_ca::TlsNames;

/// Everything `serve` needs, validated before any port is bound.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub data_dir: PathBuf,
    pub kek_file: Option<PathBuf>,
    pub grpc_listen: SocketAddr,
    pub https_listen: SocketAddr,
    pub pki_listen: Option<SocketAddr>,
    pub tls_names: Vec<String>,
}

impl ServeConfig {
    /// Check the configuration completely; returns the names for the TLS certificate.
    pub fn validate(&self) -> Result<TlsNames> {
        if !self.data_dir.join("db").exists() {
            bail!(
                "{} holds no zonemesh data; run `zonemesh-controller init --data-dir {}` first",
                self.data_dir.display(),
                self.data_dir.display()
            );
        }
        let mut ports = vec![self.grpc_listen, self.https_listen];
        ports.extend(self.pki_listen);
        for (i, a) in ports.iter().enumerate() {
            if ports[..i].contains(a) {
                bail!("listen address {a} is used twice");
            }
        }
        let mut names = TlsNames::default();
        let mut add = |n: &str| {
            if let Ok(ip) = n.parse::<IpAddr>() {
                if !ip.is_unspecified() && !names.ips.contains(&ip) {
                    names.ips.push(ip);
                }
            } else if !names.dns.iter().any(|d| d == n) {
                names.dns.push(n.to_string());
            }
        };
        for n in &self.tls_names {
            add(n);
        }
        if self.tls_names.is_empty() {
            add("localhost");
            add("127.0.0.1");
            add(&self.grpc_listen.ip().to_string());
            add(&self.https_listen.ip().to_string());
        }
        for d in &names.dns {
            zonemesh_ca::validate_label("TLS name", d, true)
                .map_err(|e| anyhow::anyhow!("--tls-name {d}: {e}"))?;
        }
        Ok(names)
    }
}

async fn bind(addr: SocketAddr, what: &str) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} ({what})"))
}

/// Run until SIGTERM/SIGINT or `shutdown`.
pub async fn run(cfg: ServeConfig, shutdown: CancellationToken) -> Result<()> {
    let names = cfg.validate()?;
    let kek = KekSource::new(&cfg.data_dir, cfg.kek_file.clone()).load()?;
    let store = Store::open(&cfg.data_dir.join("db"))?;
    let auth = Arc::new(Authority::load(store.clone(), &kek, SystemTime::now())?);
    drop(kek);
    let mesh = Mesh::new(auth.clone())?;
    let identity = ServerIdentity::issue(&auth, names, SystemTime::now())?;
    let verifier = CrlClientVerifier::new(&[auth.ca().root_der().to_vec()], &auth.crl_der())?;
    mesh.add_crl_listener(verifier.clone());
    let grpc_tls = Arc::new(server_config(identity.clone(), Some(verifier), &[b"h2"])?);

    let grpc_listener = bind(cfg.grpc_listen, "gRPC").await?;
    let https_listener = bind(cfg.https_listen, "HTTPS").await?;
    let pki_listener = match cfg.pki_listen {
        Some(a) => Some(bind(a, "PKI HTTP").await?),
        None => None,
    };
    tracing::info!(grpc = %cfg.grpc_listen, https = %cfg.https_listen, pki = ?cfg.pki_listen, version = mesh.version(), "controller serving");

    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(crate::grpc::serve(
        grpc_listener,
        grpc_tls,
        mesh.clone(),
        shutdown.clone(),
    ));
    let https_app = crate::pki_http::router(auth.clone());
    let https_tls = Arc::new(server_config(
        identity.clone(),
        None,
        &[b"h2", b"http/1.1"],
    )?);
    tasks.spawn(crate::https::serve(
        https_listener,
        https_tls,
        https_app,
        shutdown.clone(),
    ));
    if let Some(l) = pki_listener {
        tasks.spawn(crate::pki_http::serve_plain(
            l,
            crate::pki_http::router(auth.clone()),
            shutdown.clone(),
        ));
    }
    let handler = Arc::new(AdminHandler {
        auth: auth.clone(),
        mesh: Some(mesh.clone()),
    });
    tasks.spawn(admin::serve(
        admin::socket_path(&cfg.data_dir),
        handler,
        shutdown.clone(),
    ));
    {
        let (identity, auth, stop) = (identity.clone(), auth.clone(), shutdown.clone());
        tasks.spawn(async move {
            identity.renew_loop(auth, stop).await;
            Ok(())
        });
    }
    {
        let (mesh, stop) = (mesh.clone(), shutdown.clone());
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(CRL_REFRESH) => {}
                }
                let m = mesh.clone();
                let r = tokio::task::spawn_blocking(move || {
                    m.authority().refresh_crl(SystemTime::now())?;
                    m.publish_crl()
                })
                .await?;
                if let Err(e) = r {
                    tracing::error!(error = %e, "CRL refresh failed");
                }
            }
        });
    }
    {
        let stop = shutdown.clone();
        tasks.spawn(async move {
            wait_for_signal(&stop).await;
            stop.cancel();
            Ok(())
        });
    }

    let mut first_err = None;
    while let Some(res) = tasks.join_next().await {
        let err = match res {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e),
            Err(e) => Some(anyhow::anyhow!("task failed: {e}")),
        };
        if let Some(e) = err {
            tracing::error!(error = %e, "controller task stopped with an error; shutting down");
            shutdown.cancel();
            first_err.get_or_insert(e);
        }
    }
    store.flush()?;
    tracing::info!("controller stopped");
    match first_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

async fn wait_for_signal(stop: &CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        stop.cancelled().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        _ = stop.cancelled() => {}
    }
}
