//! The controller's control plane in this process: the real `Mesh` over a store made by
//! the real `init`, optionally served by the real gRPC listener on a loopback port with
//! real mTLS, and driven by a clock the test moves.

use crate::cluster::{Controller, NodeCreds};
use anyhow::Result;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tempfile::TempDir;
use tokio_util::sync::CancellationToken;
use zonemesh_ca::VerifiedNode;
use zonemesh_controller::authority::Authority;
use zonemesh_controller::clock::{Alarm, Clock};
use zonemesh_controller::kv::sled::SledBackend;
use zonemesh_controller::kv::{Backend, Kv};
use zonemesh_controller::mesh::Mesh;
use zonemesh_controller::secrets::KekSource;
use zonemesh_controller::store::Store;
use zonemesh_proto as pb;

/// Real time plus an offset the test sets; alarms fire when either real time or the
/// offset carries the clock past them.
#[derive(Debug, Default)]
pub struct TestClock {
    offset: Mutex<Duration>,
    moved: tokio::sync::Notify,
}

impl TestClock {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Move the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        *self.offset.lock().unwrap() += by;
        self.moved.notify_waiters();
    }
}

/// Shares one `TestClock` with the Mesh (the trait object wants an owned value).
#[derive(Debug, Clone)]
pub struct SharedClock(pub Arc<TestClock>);

impl Clock for SharedClock {
    fn now(&self) -> SystemTime {
        SystemTime::now() + *self.0.offset.lock().unwrap()
    }

    fn alarm(&self, at: SystemTime) -> Alarm {
        let me = self.clone();
        Box::pin(async move {
            loop {
                let moved = me.0.moved.notified();
                let now = me.now();
                if now >= at {
                    return;
                }
                let real = at.duration_since(now).unwrap_or_default();
                tokio::select! {
                    _ = moved => {}
                    _ = tokio::time::sleep(real) => {}
                }
            }
        })
    }
}

/// A CA from the real `init`, its store, and a `Mesh` on a test clock.
pub struct Plane {
    pub dir: TempDir,
    pub store: Store,
    pub auth: Arc<Authority>,
    pub mesh: Arc<Mesh>,
    pub clock: Arc<TestClock>,
    pub fingerprint: String,
}

impl Plane {
    /// `init` a controller data directory and open it here; `prepare` may write to the
    /// store before the Mesh reads it.
    pub fn new_with(prepare: impl FnOnce(&Store)) -> Result<Self> {
        Self::build(prepare, None)
    }

    /// A plane whose Mesh runs `hook` just before every enrollment signature.
    pub fn with_sign_hook(hook: Arc<zonemesh_controller::mesh::SignHook>) -> Result<Self> {
        Self::build(|_| {}, Some(hook))
    }

    fn build(
        prepare: impl FnOnce(&Store),
        hook: Option<Arc<zonemesh_controller::mesh::SignHook>>,
    ) -> Result<Self> {
        let dir = TempDir::new()?;
        let ctl = Controller::init(dir.path())?;
        let store = Store::open(&ctl.data_dir.join("db"))?;
        let kek = KekSource::new(&ctl.data_dir, None).load()?;
        let auth = Arc::new(Authority::load(store.clone(), &kek, SystemTime::now())?);
        prepare(&store);
        let clock = TestClock::new();
        let shared = Arc::new(SharedClock(clock.clone()));
        let mesh = match hook {
            Some(h) => Mesh::with_sign_hook(auth.clone(), shared, h)?,
            None => Mesh::with_clock(auth.clone(), shared)?,
        };
        let fingerprint = ctl.fingerprint.clone();
        // The data directory stays (in `dir`); the controller process never ran.
        drop(ctl);
        Ok(Self {
            dir,
            store,
            auth,
            mesh,
            clock,
            fingerprint,
        })
    }

    pub fn new() -> Result<Self> {
        Self::new_with(|_| {})
    }

    /// A plane whose store is the data directory's sled database seen through `wrap` (a
    /// test's fault-injecting [`Backend`] around the real one).
    pub fn with_backend(wrap: impl FnOnce(Arc<dyn Backend>) -> Arc<dyn Backend>) -> Result<Self> {
        let dir = TempDir::new()?;
        let ctl = Controller::init(dir.path())?;
        let sled = SledBackend::open(&ctl.data_dir.join("db"))?;
        let store = Store::on(Kv::new(wrap(Arc::new(sled))))?;
        let kek = KekSource::new(&ctl.data_dir, None).load()?;
        let auth = Arc::new(Authority::load(store.clone(), &kek, SystemTime::now())?);
        let clock = TestClock::new();
        let mesh = Mesh::with_clock(auth.clone(), Arc::new(SharedClock(clock.clone())))?;
        let fingerprint = ctl.fingerprint.clone();
        drop(ctl);
        Ok(Self {
            dir,
            store,
            auth,
            mesh,
            clock,
            fingerprint,
        })
    }

    /// Enroll `zone/name` through `Mesh::enroll` with pooled key `slot`.
    pub fn enroll(&self, zone: &str, name: &str, slot: usize, wg: [u8; 32]) -> Result<Enrolled> {
        let key = crate::rsa4096(slot);
        let resp = enroll_on(&self.mesh, zone, name, slot, wg)?;
        let creds = NodeCreds {
            key_pkcs8: key.serialize_der(),
            cert_der: resp.certificate_der.clone(),
            chain_der: resp.chain_der.clone(),
            root_der: resp.root_der.clone(),
        };
        let who = self.verify(&creds.cert_der)?;
        Ok(Enrolled { creds, who, resp })
    }

    /// The identity the gRPC listener would attach for a connection with `cert_der`.
    pub fn verify(&self, cert_der: &[u8]) -> Result<VerifiedNode> {
        let mut chain = vec![cert_der.to_vec()];
        chain.extend(self.auth.chain());
        Ok(self.auth.ca().trust_store().verify_node_chain(
            &chain,
            &[self.auth.crl_der().to_vec()],
            SystemTime::now(),
        )?)
    }

    /// Serve Enrollment and Mesh with the real listener on a loopback port, as `serve` does.
    pub async fn serve(&self) -> Result<Served> {
        serve_mesh(&self.auth, &self.mesh).await
    }
}

/// Enroll `zone/name` through `mesh` (the zone added first when it is new) with pooled
/// key `slot` and a fresh one-time token.
pub fn enroll_on(
    mesh: &Mesh,
    zone: &str,
    name: &str,
    slot: usize,
    wg: [u8; 32],
) -> Result<pb::EnrollResponse> {
    let now = mesh.now();
    let store = mesh.authority().store();
    if store.zone(zone)?.is_none() {
        let n = store.zones()?.len() + 1;
        mesh.add_zone(zone, &format!("100.64.{n}.0/24"), false, now)?;
    }
    let token = mesh.create_token(zone, Duration::from_secs(3600), 1, now)?;
    let key = crate::rsa4096(slot);
    let req = pb::EnrollRequest {
        token: token.token,
        csr_der: zonemesh_agent::control::enroll::csr_for(&key, name)?,
        wg_public_key: wg.to_vec(),
        endpoints: vec![],
        node_name: name.into(),
        zone: String::new(),
    };
    Ok(mesh.enroll(&req, "127.0.0.1".parse()?, now)?)
}

/// Serve `mesh` (over `auth`) with the real gRPC listener on a loopback port, as `serve`
/// does; several meshes over one store make several controllers in one process.
pub async fn serve_mesh(auth: &Arc<Authority>, mesh: &Arc<Mesh>) -> Result<Served> {
    Plane::serve_with(auth, mesh).await
}

impl Plane {
    async fn serve_with(auth: &Arc<Authority>, mesh: &Arc<Mesh>) -> Result<Served> {
        use zonemesh_controller::tls::{CrlClientVerifier, grpc_server_config, issue_own};
        use zonemesh_controller::web::CertSource;
        let names = zonemesh_ca::TlsNames {
            dns: vec!["localhost".into()],
            ips: vec!["127.0.0.1".parse()?],
        };
        let now = SystemTime::now();
        let certs = Arc::new(CertSource::new(&issue_own(auth, &names, now)?, now)?);
        let verifier = CrlClientVerifier::new(&auth.trusted_roots(), &auth.crls_der())?;
        mesh.add_crl_listener(verifier.clone());
        let tls = Arc::new(grpc_server_config(certs, verifier)?);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(zonemesh_controller::grpc::serve(
            listener,
            tls,
            mesh.clone(),
            shutdown.clone(),
        ));
        Ok(Served {
            addr,
            shutdown,
            task: Some(task),
        })
    }
}

/// A node enrolled in a [`Plane`].
pub struct Enrolled {
    pub creds: NodeCreds,
    pub who: VerifiedNode,
    pub resp: pb::EnrollResponse,
}

/// The gRPC listener of a [`Plane`]; stops when dropped.
pub struct Served {
    pub addr: SocketAddr,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Served {
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// Stop and wait for the listener to finish.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
