//! `zonemesh-controller serve`: one process with the store, the gRPC control plane, the
//! HTTPS side, the PKI endpoints and the admin socket, stopped cleanly by SIGTERM/SIGINT.

use crate::admin::{self, AdminHandler};
use crate::audit::{AuditEvent, AuditLog};
use crate::auth::{Pepper, SecuritySink, WebConfig};
use crate::authority::{Authority, CRL_REFRESH};
use crate::error::ControllerError;
use crate::leader::{Leadership, LeaseConfig};
use crate::listen::{self, GuardedListener, ListenerBudget};
use crate::mesh::Mesh;
use crate::secrets::KekSource;
use crate::store::Store;
use crate::tls::{CrlClientVerifier, grpc_server_config, issue_own};
use crate::web::{self, CertSource, DashboardSource, NodeRow, WebState, ZoneRow};
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
    /// `--store` (default: the one saved in the data directory, else sled in `<dir>/db`).
    pub store: Option<String>,
    pub kek_file: Option<PathBuf>,
    pub grpc_listen: SocketAddr,
    pub https_listen: SocketAddr,
    pub pki_listen: Option<SocketAddr>,
    pub tls_names: Vec<String>,
    /// The ACME server's directory (`--acme-directory`).
    pub acme_directory: Option<String>,
    /// Extra roots for the ACME server's HTTPS (`--acme-root`, PEM).
    pub acme_root: Option<PathBuf>,
    /// The ACME account's contact (`--acme-email`).
    pub acme_email: Option<String>,
    /// Where relying parties reach the PKI listener (`--pki-url`), for the OCSP URL in
    /// internal portal certificates.
    pub pki_url: Option<String>,
    /// Plain-HTTP listener for `GET /metrics` (`--metrics-listen`); off when `None`.
    pub metrics_listen: Option<SocketAddr>,
    /// When reported failures block a source, and for how long (`--block-*`).
    pub block_policy: crate::blocklist::PolicyConfig,
}

impl ServeConfig {
    /// The controller's own addresses, which no block may name: the listen addresses and
    /// IP TLS names, and every address of this host when a listener is unspecified.
    pub fn own_addresses(&self) -> Vec<(IpAddr, String)> {
        let mut out = Vec::new();
        let mut unspecified = false;
        let mut listeners = vec![(self.grpc_listen, "gRPC"), (self.https_listen, "HTTPS")];
        listeners.extend(self.pki_listen.map(|a| (a, "PKI HTTP")));
        listeners.extend(self.metrics_listen.map(|a| (a, "metrics")));
        for (addr, what) in listeners {
            if addr.ip().is_unspecified() {
                unspecified = true;
            } else {
                out.push((addr.ip(), format!("the controller's {what} address")));
            }
        }
        for ip in self
            .tls_names
            .iter()
            .filter_map(|n| n.parse::<IpAddr>().ok())
        {
            out.push((ip, "a TLS name of the controller".to_string()));
        }
        if unspecified {
            match nix::ifaddrs::getifaddrs() {
                Ok(addrs) => {
                    for a in addrs {
                        let ip = a.address.as_ref().and_then(|s| {
                            s.as_sockaddr_in()
                                .map(|v4| IpAddr::V4(v4.ip()))
                                .or_else(|| s.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
                        });
                        if let Some(ip) = ip {
                            out.push((
                                ip,
                                format!(
                                    "an address of the controller's host ({})",
                                    a.interface_name
                                ),
                            ));
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot list this host's addresses"),
            }
        }
        out
    }

    /// Check the configuration completely; returns the names for the TLS certificate.
    pub fn validate(&self) -> Result<TlsNames> {
        let url = crate::core::kv::url::StoreUrl::resolve(self.store.as_deref(), &self.data_dir)?;
        let sled_dir = url.sled_dir(&self.data_dir);
        if sled_dir.as_ref().is_some_and(|d| !d.exists()) {
            bail!(
                "{} holds no zonemesh data; run `zonemesh-controller init --data-dir {}` first",
                self.data_dir.display(),
                self.data_dir.display()
            );
        }
        crate::secrets::check_private_dir(&self.data_dir, "data directory")?;
        if let Some(d) = &sled_dir {
            crate::secrets::check_private_dir(d, "database directory")?;
        }
        let mut ports = vec![self.grpc_listen, self.https_listen];
        ports.extend(self.pki_listen);
        ports.extend(self.metrics_listen);
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

impl ServeConfig {
    /// The OCSP responder URL put in internal portal certificates: `--pki-url` (with
    /// `/ocsp` appended unless given), else the PKI listener, else the HTTPS listener.
    pub fn ocsp_url(&self) -> String {
        if let Some(u) = &self.pki_url {
            let u = u.trim_end_matches('/');
            return if u.ends_with("/ocsp") {
                u.to_string()
            } else {
                format!("{u}/ocsp")
            };
        }
        let host = |a: SocketAddr| self.reachable(a);
        match self.pki_listen {
            Some(a) => format!("http://{}/ocsp", host(a)),
            None => format!("https://{}/ocsp", host(self.https_listen)),
        }
    }

    /// `HOST:PORT` of listener `a` as others reach it: the address itself, or with an
    /// unspecified address the first `--tls-name` (`localhost` without one).
    fn reachable(&self, a: SocketAddr) -> String {
        if !a.ip().is_unspecified() {
            return a.to_string();
        }
        let name = self
            .tls_names
            .first()
            .cloned()
            .unwrap_or_else(|| "localhost".into());
        match name.parse::<IpAddr>() {
            Ok(ip) => SocketAddr::new(ip, a.port()).to_string(),
            Err(_) => format!("{name}:{}", a.port()),
        }
    }

    /// The `--controller` address an enrolling agent is given (the console's enroll
    /// command): the gRPC listener as others reach it.
    pub fn agent_address(&self) -> String {
        self.reachable(self.grpc_listen)
    }

    /// The ACME settings, with the extra roots read (a bad file is a configuration error).
    pub fn acme(&self) -> Result<Option<zonemesh_deploy::acme::AcmeConfig>> {
        let Some(dir) = &self.acme_directory else {
            if self.acme_root.is_some() || self.acme_email.is_some() {
                bail!("--acme-root and --acme-email need --acme-directory");
            }
            return Ok(None);
        };
        if !dir.starts_with("https://") {
            bail!("--acme-directory {dir} must be an https:// URL");
        }
        let mut cfg = zonemesh_deploy::acme::AcmeConfig::new(dir.clone());
        cfg.contact_email = self.acme_email.clone();
        if let Some(p) = &self.acme_root {
            let pem = std::fs::read_to_string(p)
                .with_context(|| format!("--acme-root {}", p.display()))?;
            let roots = zonemesh_ca::pem_blocks("CERTIFICATE", &pem)
                .with_context(|| format!("--acme-root {}", p.display()))?;
            if roots.is_empty() {
                bail!("--acme-root {} holds no CERTIFICATE", p.display());
            }
            cfg.extra_roots = roots
                .into_iter()
                .map(rustls_pki_types::CertificateDer::from)
                .collect();
        }
        Ok(Some(cfg))
    }
}

/// What `serve` opens before it binds anything.
struct Opened {
    store: Store,
    auth: Arc<Authority>,
    mesh: Arc<Mesh>,
    web_cfg: WebConfig,
    audit: Arc<AuditLog>,
    domains: Arc<crate::domains::Domains>,
    ssh: Arc<crate::ssh::Ssh>,
}

/// Open the store and everything read from it (blocking: file and store I/O, the KEK's
/// unsealing, fsyncs). Host certificates of nodes revoked just before a stop are
/// revoked here.
fn open_controller(cfg: &ServeConfig) -> Result<Opened> {
    let kek = KekSource::new(&cfg.data_dir, cfg.kek_file.clone()).load()?;
    let store = Store::open_url(&cfg.data_dir, cfg.store.as_deref())?;
    if let Some(given) = &cfg.store {
        // Admin commands given this --data-dir find the same store.
        let url: crate::core::kv::url::StoreUrl = given.parse()?;
        if crate::core::kv::url::StoreUrl::saved(&cfg.data_dir)? != url {
            url.save(&cfg.data_dir)?;
        }
    }
    let auth = Arc::new(Authority::load(store.clone(), &kek, SystemTime::now())?);
    let acme = cfg.acme()?;
    let mesh = Mesh::new(auth.clone())?;
    mesh.set_block_policy(&cfg.block_policy);
    let pepper = Pepper::from_env_or_file(Some(&pepper_path(&cfg.data_dir)))?;
    let web_cfg = WebConfig::new(pepper);
    web_cfg.validate()?;
    let audit = Arc::new(AuditLog::open_with(store.flusher())?);
    mesh.attach_audit(audit.clone());
    let domains = {
        let mut dc = crate::domains::DomainsConfig::new(cfg.ocsp_url());
        dc.acme = acme;
        crate::domains::Domains::new(auth.clone(), &kek, dc, Some(audit.clone()))?
    };
    let ssh = crate::ssh::Ssh::open(&store, &kek, auth.trust_domain(), Some(audit.clone()))?;
    ssh.attach_mesh(mesh.clone())?;
    ssh.finish_host_revocations("controller")?;
    Ok(Opened {
        store,
        auth,
        mesh,
        web_cfg,
        audit,
        domains,
        ssh,
    })
}

/// Run until SIGTERM/SIGINT or `shutdown`.
pub async fn run(cfg: ServeConfig, shutdown: CancellationToken) -> Result<()> {
    let names = cfg.validate()?;
    let fd_limit = listen::raise_fd_limit();
    // Opening the store, unsealing the CA and the first reads are blocking work.
    let opened = {
        let cfg = cfg.clone();
        crate::blocking::run(move || open_controller(&cfg)).await?
    };
    let Opened {
        store,
        auth,
        mesh,
        web_cfg,
        audit,
        domains,
        ssh,
    } = opened;
    let web_state = WebState::new(
        &web_cfg,
        audit.clone(),
        Arc::new(MeshSink(mesh.clone())),
        Arc::new(MeshDashboard(StoreDashboard(store.clone()), mesh.clone())),
    )?;

    let issue = {
        let auth = auth.clone();
        move |now| issue_own(&auth, &names, now)
    };
    let certs = Arc::new(CertSource::new(
        &issue(SystemTime::now())?,
        SystemTime::now(),
    )?);
    let verifier = CrlClientVerifier::new(&auth.trusted_roots(), &auth.crls_der())?;
    mesh.add_crl_listener(verifier.clone());
    let grpc_tls = Arc::new(grpc_server_config(certs.clone(), verifier)?);

    let budget = ListenerBudget::from_fd_limit(fd_limit, cfg.pki_listen.is_some());
    tracing::info!(fd_limit, grpc = ?budget.grpc, https = ?budget.https, pki = ?budget.pki, "connection limits");
    let guarded = |l, what, limits, timeouts| GuardedListener::new(l, what, limits, timeouts);
    let grpc_listener = guarded(
        bind(cfg.grpc_listen, "gRPC").await?,
        "grpc",
        budget.grpc,
        listen::GRPC_TIMEOUTS,
    );
    let https_listener = guarded(
        bind(cfg.https_listen, "HTTPS").await?,
        "https",
        budget.https,
        listen::HTTPS_TIMEOUTS,
    );
    let pki_listener = match cfg.pki_listen {
        Some(a) => Some(guarded(
            bind(a, "PKI HTTP").await?,
            "pki",
            budget.pki,
            listen::PKI_TIMEOUTS,
        )),
        None => None,
    };
    // Scrapers are few: the PKI listener's admission and deadlines.
    let metrics_listener = match cfg.metrics_listen {
        Some(a) => Some(guarded(
            bind(a, "metrics").await?,
            "metrics",
            budget.pki,
            listen::PKI_TIMEOUTS,
        )),
        None => None,
    };
    tracing::info!(grpc = %cfg.grpc_listen, https = %cfg.https_listen, pki = ?cfg.pki_listen, version = mesh.version(), "controller serving");
    mesh.set_own_addresses(cfg.own_addresses());
    let lifted = {
        let m = mesh.clone();
        crate::blocking::run(move || m.lift_forbidden_blocks()).await?
    };
    for ip in lifted {
        tracing::warn!(source = %ip, "block lifted: the address may never be blocked");
    }

    let mut tasks = tokio::task::JoinSet::new();
    let store_url = crate::core::kv::url::StoreUrl::resolve(cfg.store.as_deref(), &cfg.data_dir)?;
    let leader = start_leadership(&cfg, &store_url, &mesh, &mut tasks, &shutdown).await?;
    // Connected agents on their own, lower-priority runtime: a large fleet's fan-out
    // does not slow enrollment or the controller's own work down.
    let agents = crate::agent_rt::AgentRuntime::start()?;
    tasks.spawn(crate::grpc::serve_with(
        grpc_listener,
        grpc_tls,
        mesh.clone(),
        Some(domains.clone()),
        Some(ssh.clone()),
        agents.handle(),
        shutdown.clone(),
    ));
    {
        let (d, stop, lead) = (domains.clone(), shutdown.clone(), leader.clone());
        tasks.spawn(async move {
            d.run_while_leader(lead, stop).await;
            Ok(())
        });
    }
    web_state.attach_domains(domains.clone());
    web_state.attach_mesh(mesh.clone());
    web_state.attach_ssh(ssh.clone());
    web_state.attach_agent_address(cfg.agent_address());
    let https_app = web::router(web_state.clone()).merge(crate::pki_http::router(auth.clone()));
    {
        let (certs, stop) = (certs.clone(), shutdown.clone());
        tasks.spawn(
            async move { Ok(web::serve_https(https_listener, https_app, certs, stop).await?) },
        );
    }
    if let Some(l) = metrics_listener {
        let metrics = mesh.metrics().clone();
        metrics.attach_source(Arc::new(ControllerSample {
            mesh: mesh.clone(),
            web: web_state.clone(),
        }));
        tracing::info!(metrics = ?cfg.metrics_listen, "serving /metrics");
        tasks.spawn(crate::pki_http::serve_plain(
            l,
            crate::metrics::router(metrics),
            shutdown.clone(),
        ));
    }
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
        audit: Some(audit.clone()),
        web: Some(web_state.clone()),
        domains: Some(domains.clone()),
        data_dir: cfg.data_dir.clone(),
        ssh: Some(ssh.clone()),
    });
    tasks.spawn(admin::serve(
        admin::socket_path(&cfg.data_dir),
        handler,
        shutdown.clone(),
    ));
    {
        let stop = shutdown.clone();
        let rotations = auth.ca_changes();
        tasks.spawn(async move {
            certs.renew_loop_with(issue, Some(rotations), stop).await;
            Ok(())
        });
    }
    {
        let (mesh, stop, lead) = (mesh.clone(), shutdown.clone(), leader.clone());
        tasks.spawn(async move {
            retire_ca_loop(mesh, lead, stop).await;
            Ok(())
        });
    }
    {
        let stop = shutdown.clone();
        tasks.spawn(async move {
            web_state
                .maintenance_loop(std::time::Duration::from_secs(600), stop)
                .await;
            Ok(())
        });
    }
    // Leader-only sweeps; the other controllers follow their changes.
    {
        // The CRL, signed and published once.
        let (m, stop, lead) = (mesh.clone(), shutdown.clone(), leader.clone());
        let work = move || m.publish_crl();
        tasks.spawn(leader_loop(
            CRL_REFRESH,
            lead,
            stop,
            "CRL refresh failed",
            work,
        ));
    }
    {
        // Host certificates of revoked nodes, should a revocation's second step have failed.
        let (s, stop, lead) = (ssh.clone(), shutdown.clone(), leader.clone());
        let work = move || s.finish_host_revocations("controller").map(drop);
        let failed = "revoking SSH host certificates of revoked nodes failed";
        tasks.spawn(leader_loop(HOST_REVOKE_SWEEP, lead, stop, failed, work));
    }
    {
        // Blocks whose time is up, each audited with its evidence.
        let (m, stop, lead) = (mesh.clone(), shutdown.clone(), leader.clone());
        let work = move || m.expire_blocks(m.now());
        let failed = "expiring blocks failed";
        tasks.spawn(leader_loop(BLOCK_EXPIRY_TICK, lead, stop, failed, work));
    }
    {
        // Used-up and expired tokens once they are `mesh::TOKEN_PURGE_GRACE` old.
        let (m, stop, lead) = (mesh.clone(), shutdown.clone(), leader.clone());
        let work = move || m.purge_tokens(m.now());
        let failed = "purging enrollment tokens failed";
        tasks.spawn(leader_loop(TOKEN_PURGE_TICK, lead, stop, failed, work));
    }
    {
        // New peers held back by enrollments in flight: a burst goes out as one delta.
        let (mesh, stop) = (mesh.clone(), shutdown.clone());
        tasks.spawn(async move {
            mesh.run_announcer(&stop).await;
            Ok(())
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
    // Every connection on it has ended with the gRPC task.
    agents.shutdown().await;
    store.flush()?;
    tracing::info!("controller stopped");
    match first_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// This controller's name in the leader key: its gRPC address, host and process.
fn leader_id(cfg: &ServeConfig) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!(
        "{}@{} pid {}",
        cfg.grpc_listen,
        host.trim(),
        std::process::id()
    )
}

/// Who does the once-only work. With the embedded store this controller always leads;
/// with a shared store it campaigns for the leader lease and follows the others' changes
/// (both tasks in the serve set).
async fn start_leadership(
    cfg: &ServeConfig,
    url: &crate::core::kv::url::StoreUrl,
    mesh: &Arc<Mesh>,
    tasks: &mut tokio::task::JoinSet<Result<()>>,
    shutdown: &CancellationToken,
) -> Result<Leadership> {
    use crate::core::kv::url::StoreUrl;
    let etcd = match url {
        StoreUrl::Sled(_) => return Ok(Leadership::always(leader_id(cfg))),
        StoreUrl::Etcd(e) => e,
    };
    let options = crate::core::kv::etcd::connect_options(etcd)?;
    let members = crate::leader::connect(&etcd.endpoints, Some(options))?;
    let lead = Leadership::elected(leader_id(cfg));
    // Outside the store's prefix, so no tree (and no backup) ever holds it.
    let key = format!("{}.leader", etcd.prefix.trim_end_matches('/')).into_bytes();
    tracing::info!(id = %lead.id(), key = %String::from_utf8_lossy(&key), "campaigning for the leader lease");
    {
        let (lead, stop) = (lead.clone(), shutdown.clone());
        tasks.spawn(async move {
            crate::leader::campaign(members, key, lead, LeaseConfig::default(), stop).await;
            Ok(())
        });
    }
    {
        let (mesh, stop) = (mesh.clone(), shutdown.clone());
        tasks.spawn(async move {
            crate::mesh::follow_loop(mesh, stop).await;
            Ok(())
        });
    }
    Ok(lead)
}

/// How often ended blocks are taken off the agents' sets (and audited).
const BLOCK_EXPIRY_TICK: std::time::Duration = std::time::Duration::from_secs(1);

/// How often retiring CA certificates are checked against their retirement time.
const CA_RETIRE_TICK: std::time::Duration = std::time::Duration::from_secs(5);

/// Retire CA certificates whose time has come (an intermediate once its last certificate
/// expired, a root after its grace) and publish the smaller bundle to every watcher. Done
/// by the leader only; the other controllers reload the CA set when they follow its change.
async fn retire_ca_loop(mesh: Arc<Mesh>, leader: Leadership, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(CA_RETIRE_TICK) => {}
        }
        if !leader.is_leader() {
            continue;
        }
        let m = mesh.clone();
        let r = crate::blocking::run(move || {
            let retired = m.authority().retire_due(m.now())?;
            if !retired.is_empty() {
                m.publish_ca()?;
            }
            Ok::<_, crate::error::ControllerError>(retired)
        })
        .await;
        match r {
            Ok(retired) => {
                for c in retired {
                    tracing::info!(id = %c.id, kind = %c.kind, sha256 = %c.sha256, "CA certificate retired");
                }
            }
            Err(e) => tracing::error!(error = %e, "retiring CA certificates failed"),
        }
    }
}

/// Run `work` on the blocking pool every `every` while this controller leads, until
/// `stop`; a failure is logged as `failed` and tried again at the next tick.
async fn leader_loop<T, F>(
    every: std::time::Duration,
    leader: Leadership,
    stop: CancellationToken,
    failed: &'static str,
    work: F,
) -> Result<()>
where
    T: Send + 'static,
    F: Fn() -> std::result::Result<T, crate::error::ControllerError> + Clone + Send + 'static,
{
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(every) => {}
        }
        if !leader.is_leader() {
            continue;
        }
        if let Err(e) = crate::blocking::run(work.clone()).await {
            tracing::error!(error = %e, "{failed}");
        }
    }
}

/// How often the leader revokes host certificates of revoked nodes left over (see
/// `Ssh::finish_host_revocations`).
const HOST_REVOKE_SWEEP: std::time::Duration = std::time::Duration::from_secs(60);

/// How often used-up and expired enrollment tokens past their grace are purged.
const TOKEN_PURGE_TICK: std::time::Duration = std::time::Duration::from_secs(600);

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

/// Where the sign-in pepper lives by default (outside the database, like the KEK).
pub fn pepper_path(data_dir: &std::path::Path) -> PathBuf {
    data_dir.join("secrets").join("pepper")
}

/// Sign-in blocks go on the mesh blocklist, which every agent receives, under the same
/// never-block policy as every other block (a sign-in flood through a reverse proxy on
/// loopback blocks it for sign-in only).
pub struct MeshSink(pub Arc<Mesh>);

impl SecuritySink for MeshSink {
    fn sign_in_failed(&self, ip: IpAddr) {
        // Counted in memory; only a resulting block writes (on the blocking pool).
        let mesh = self.0.clone();
        let note = move || {
            if let Err(e) = mesh.note_own_failure(ip, "http.signin_failure", mesh.now()) {
                tracing::warn!(source = %ip, error = %e, "sign-in failure not counted");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(note)),
            Err(_) => note(),
        }
    }

    fn source_blocked(&self, ip: IpAddr, until: SystemTime, reason: &str) {
        let mesh = self.0.clone();
        let reason = reason.to_string();
        let place = move || match mesh.block_source(ip, until, &reason) {
            Ok(()) => {}
            Err(ControllerError::PermissionDenied(why)) => {
                tracing::warn!(source = %ip, reason = %why, "sign-in block not pushed to agents");
                mesh.audit_decision(
                    AuditEvent::new("source.block_refused", "denied")
                        .actor("controller")
                        .source(ip)
                        .detail(why),
                );
            }
            Err(e) => tracing::error!(error = %e, source = %ip, "could not publish block"),
        };
        // The store flushes: keep it off the async workers that call this.
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(place)),
            Err(_) => place(),
        }
    }
}

/// The dashboard reads zones and nodes straight from the store.
pub struct StoreDashboard(pub Store);

impl DashboardSource for StoreDashboard {
    fn zones(&self) -> Vec<ZoneRow> {
        let nodes = self.0.nodes().unwrap_or_default();
        self.0
            .zones()
            .unwrap_or_default()
            .into_iter()
            .map(|z| ZoneRow {
                node_count: nodes
                    .iter()
                    .filter(|n| n.zone == z.name && !n.revoked)
                    .count(),
                cidr: z.cidr.to_string(),
                name: z.name,
            })
            .collect()
    }
    fn nodes(&self) -> Vec<NodeRow> {
        self.0
            .nodes()
            .unwrap_or_default()
            .into_iter()
            .map(|n| NodeRow {
                zone: n.zone,
                name: n.node,
                overlay_ip: n.overlay_ip,
                serial: n.serial_hex,
                cert_expiry: crate::store::from_unix(n.not_after_unix),
                revoked: n.revoked,
            })
            .collect()
    }
}

/// What `/metrics` reads at scrape time: the mesh, its store and the web side's sign-in
/// counters.
struct ControllerSample {
    mesh: Arc<Mesh>,
    web: WebState,
}

impl crate::metrics::SampleSource for ControllerSample {
    fn sample(&self) -> crate::metrics::Sample {
        use std::sync::atomic::Ordering::Relaxed;
        let now = self.mesh.now();
        let signin = self.web.metrics();
        let health = self.mesh.health_matrix(now).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "health matrix unavailable for metrics");
            Default::default()
        });
        crate::metrics::Sample {
            mesh_version: self.mesh.version(),
            watch_streams: self.mesh.watchers() as u64,
            nodes_enrolled: health.nodes.len() as u64,
            blocks_active: self.mesh.blocks(now).map(|b| b.len() as u64).unwrap_or(0),
            signin_success: signin.signin_success.load(Relaxed),
            signin_failure: signin.signin_failure.load(Relaxed),
            signin_throttled: signin.throttled.load(Relaxed),
            pairs: health
                .pairs
                .iter()
                .map(|p| crate::metrics::PairHealth {
                    node: p.node.clone(),
                    peer: p.peer.clone(),
                    loss: f64::from(p.loss),
                    rtt_seconds: p.rtt_micros.map(|us| f64::from(us) / 1e6),
                    age_seconds: p.age_secs as f64,
                })
                .collect(),
        }
    }
}

/// The dashboard of a running controller: the store's zones and nodes, and the mesh's
/// health matrix for the heat map.
pub struct MeshDashboard(pub StoreDashboard, pub Arc<Mesh>);

impl DashboardSource for MeshDashboard {
    fn zones(&self) -> Vec<ZoneRow> {
        self.0.zones()
    }
    fn nodes(&self) -> Vec<NodeRow> {
        self.0.nodes()
    }
    fn health(&self) -> Option<crate::mesh::HealthMatrix> {
        match self.1.health_matrix(self.1.now()) {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::warn!(error = %e, "health matrix unavailable for the dashboard");
                None
            }
        }
    }
}
