//! Portal domains: their certificates, the jobs that issue and deploy them, and the edges
//! that serve them.
//!
//! - [`store`]: the durable records (domains, edges, reports, the sealed ACME account).
//! - [`edges`]: open WatchEdge streams and HTTP-01 challenges in flight.
//! - [`jobs`]: one job per domain at a time, run by [`Domains::run`] in the serve task set:
//!   pending → validating (ACME) → issued → deploying (N of M edges) → deployed | failed,
//!   retried with backoff, resumed after a restart, and renewal at 2/3 of the lifetime.
//!
//! Everything the admin socket, the web pages and the gRPC service do with domains goes
//! through [`Domains`].

pub mod edges;
pub mod jobs;
pub mod store;

use crate::audit::{AuditEvent, AuditLog};
use crate::authority::Authority;
use crate::clock::{Clock, SystemClock};
use crate::error::{ControllerError, Result};
use crate::limits::{KeyedBuckets, Rate};
use crate::store::{NodeRecord, unix};
use edges::EdgeHub;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use store::{DomainRecord, DomainStore, DomainStoreError, EdgeRecord, ReportRecord};
pub use store::{DomainState, IssuerKind};
use tokio_util::sync::CancellationToken;
use zonemesh_ca::Kek;
use zonemesh_deploy::acme::AcmeConfig;
use zonemesh_proto as pb;

/// Most domains kept (each holds a sealed key and a chain).
pub const MAX_DOMAINS: usize = 4096;
/// Deployment reports an edge may send: burst, and refill per minute.
pub const REPORT_RATE: Rate = Rate::new(120, Duration::from_secs(60));
const REPORT_LIMITED_NODES: usize = 65_536;
const MAX_DETAIL: usize = 512;

/// How domains are issued and deployed (`serve --acme-*`, `--pki-url`).
#[derive(Clone, Debug)]
pub struct DomainsConfig {
    /// The ACME server; `None`: `acme` domains fail with a reason saying so.
    pub acme: Option<AcmeConfig>,
    /// The OCSP responder named in internal certificates.
    pub ocsp_url: String,
    /// Lifetime of internal certificates (`None`: the CA's default, 24 h).
    pub internal_lifetime: Option<Duration>,
    /// How long a deployment waits for every edge to report.
    pub deploy_wait: Duration,
    /// Attempts per job before it fails.
    pub attempts: u32,
    /// Wait before the second attempt; doubled for each further one.
    pub retry_backoff: Duration,
    /// After a failed automatic renewal, the next one waits this long.
    pub renewal_retry: Duration,
}

impl DomainsConfig {
    /// Defaults: 60 s for the edges, 3 attempts from 2 s apart, renewal retried hourly.
    pub fn new(ocsp_url: impl Into<String>) -> Self {
        Self {
            acme: None,
            ocsp_url: ocsp_url.into(),
            internal_lifetime: None,
            deploy_wait: Duration::from_secs(60),
            attempts: 3,
            retry_backoff: Duration::from_secs(2),
            renewal_retry: Duration::from_secs(3600),
        }
    }
}

/// A domain as `domain list --json`, the page and `GET /api/domains/{name}` show it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainView {
    pub name: String,
    pub issuer: IssuerKind,
    pub owner: String,
    pub edge_zones: Vec<String>,
    pub state: DomainState,
    pub edges_serving: usize,
    pub edges_total: usize,
    pub serial_hex: Option<String>,
    pub not_after_unix: Option<u64>,
    pub error: Option<String>,
    pub staple: Option<String>,
}

/// A job as the endpoint and `domain deploy` follow it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobView {
    pub id: u64,
    pub state: DomainState,
    pub detail: String,
}

/// A domain with its latest job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainDetail {
    #[serde(flatten)]
    pub domain: DomainView,
    pub job: Option<JobView>,
}

/// The domains service.
pub struct Domains {
    store: DomainStore,
    auth: Arc<Authority>,
    kek: Kek,
    cfg: DomainsConfig,
    hub: EdgeHub,
    audit: Option<Arc<AuditLog>>,
    clock: Arc<dyn Clock>,
    /// Serialises read-modify-write of domain records.
    lock: parking_lot::Mutex<()>,
    /// Wakes the job runner (a job was requested).
    wake: tokio::sync::Notify,
    acme: tokio::sync::OnceCell<zonemesh_deploy::acme::AcmeIssuer>,
    reports: KeyedBuckets<String>,
}

impl std::fmt::Debug for Domains {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Domains").finish_non_exhaustive()
    }
}

impl From<DomainStoreError> for ControllerError {
    fn from(e: DomainStoreError) -> Self {
        match e {
            DomainStoreError::Store(s) => ControllerError::Store(s),
            DomainStoreError::Seal(c) => ControllerError::Ca(c),
        }
    }
}

/// Lower-case, no trailing dot, a valid fully qualified DNS name.
pub fn normalize_domain(name: &str) -> Result<String> {
    let n = name.trim().trim_end_matches('.').to_ascii_lowercase();
    zonemesh_ca::validate_label("domain", &n, true)
        .map_err(|e| ControllerError::BadRequest(e.to_string()))?;
    if !n.contains('.') || n.len() > 253 || n.starts_with('.') || n.contains("..") {
        return Err(ControllerError::BadRequest(format!(
            "domain {} must be a fully qualified DNS name",
            crate::text::Escaped(name)
        )));
    }
    Ok(n)
}

impl Domains {
    /// The service on `store`'s domain trees, with `kek` sealing keys and the ACME account.
    pub fn new(
        auth: Arc<Authority>,
        kek: &Kek,
        cfg: DomainsConfig,
        audit: Option<Arc<AuditLog>>,
    ) -> Result<Arc<Self>> {
        Self::with_clock(auth, kek, cfg, audit, Arc::new(SystemClock))
    }

    /// [`Self::new`] with an injected clock (renewal tests).
    pub fn with_clock(
        auth: Arc<Authority>,
        kek: &Kek,
        cfg: DomainsConfig,
        audit: Option<Arc<AuditLog>>,
        clock: Arc<dyn Clock>,
    ) -> Result<Arc<Self>> {
        Ok(Arc::new(Self {
            store: DomainStore::open(auth.store())?,
            kek: Kek::from_bytes(kek.as_bytes())?,
            auth,
            cfg,
            hub: EdgeHub::default(),
            audit,
            clock,
            lock: parking_lot::Mutex::new(()),
            wake: tokio::sync::Notify::new(),
            acme: tokio::sync::OnceCell::new(),
            reports: KeyedBuckets::new(REPORT_RATE, REPORT_LIMITED_NODES),
        }))
    }

    pub fn now(&self) -> SystemTime {
        self.clock.now()
    }

    /// The open edge streams and challenges.
    pub fn hub(&self) -> &EdgeHub {
        &self.hub
    }

    fn audit(&self, event: AuditEvent) {
        if let Some(a) = &self.audit
            && let Err(e) = a.record_at(event, self.now())
        {
            tracing::error!(error = %e, "audit record failed");
        }
    }

    fn get(&self, name: &str) -> Result<DomainRecord> {
        let n = normalize_domain(name)?;
        self.store
            .domain(&n)?
            .ok_or_else(|| ControllerError::NotFound(format!("no domain {n}")))
    }

    /// Add a domain (blocking: flushes).
    pub fn add(
        &self,
        name: &str,
        issuer: IssuerKind,
        owner: &str,
        edge_zones: &[String],
        actor: &str,
    ) -> Result<DomainView> {
        let name = normalize_domain(name)?;
        let owner = crate::auth::normalize_email(owner);
        if !owner.contains('@') {
            return Err(ControllerError::BadRequest(format!(
                "owner {} is not an e-mail address",
                crate::text::Escaped(&owner)
            )));
        }
        if edge_zones.is_empty() {
            return Err(ControllerError::BadRequest(
                "a domain needs at least one --edge-zone".into(),
            ));
        }
        let mut zones: Vec<String> = Vec::new();
        for z in edge_zones {
            if self.auth.store().zone(z)?.is_none() {
                return Err(ControllerError::NotFound(format!(
                    "no zone {} (see `zone list`)",
                    crate::text::Escaped(z)
                )));
            }
            if !zones.contains(z) {
                zones.push(z.clone());
            }
        }
        let guard = self.lock.lock();
        if self.store.domain(&name)?.is_some() {
            return Err(ControllerError::AlreadyExists(format!(
                "domain {name} already exists"
            )));
        }
        if self.store.domains()?.len() >= MAX_DOMAINS {
            return Err(ControllerError::RateLimited(format!(
                "at most {MAX_DOMAINS} domains"
            )));
        }
        let rec = DomainRecord {
            name: name.clone(),
            issuer,
            owner: owner.clone(),
            edge_zones: zones,
            created_unix: unix(self.now()),
            state: DomainState::Pending,
            error: None,
            cert: None,
            job: None,
            order_url: None,
            retry_not_before_unix: None,
        };
        self.store.put_domain(&rec)?;
        drop(guard);
        self.store.main().flush()?;
        self.audit(
            AuditEvent::new("domain.added", "ok")
                .actor(actor)
                .subject(&name)
                .detail(format!(
                    "issuer {}, owner {owner}, edge zones {}",
                    issuer.as_str(),
                    rec.edge_zones.join(",")
                )),
        );
        self.view(&rec)
    }

    /// Remove a domain; its edges drop its certificate (blocking: flushes).
    pub fn remove(&self, name: &str, actor: &str) -> Result<String> {
        let rec = self.get(name)?;
        let guard = self.lock.lock();
        self.store.remove_domain(&rec.name)?;
        drop(guard);
        self.store.main().flush()?;
        self.hub.push(
            &rec.edge_zones,
            &pb::EdgeUpdate {
                removed_domains: vec![rec.name.clone()],
                ..Default::default()
            },
        );
        self.audit(
            AuditEvent::new("domain.removed", "ok")
                .actor(actor)
                .subject(&rec.name),
        );
        Ok(rec.name)
    }

    /// Every domain (blocking).
    pub fn list(&self) -> Result<Vec<DomainView>> {
        let mut out = Vec::new();
        for d in self.store.domains()? {
            out.push(self.view(&d)?);
        }
        Ok(out)
    }

    /// The owner of `name`, or not found.
    pub fn owner(&self, name: &str) -> Result<String> {
        Ok(self.get(name)?.owner)
    }

    /// One domain with its latest job (blocking).
    pub fn detail(&self, name: &str) -> Result<DomainDetail> {
        let rec = self.get(name)?;
        Ok(DomainDetail {
            domain: self.view(&rec)?,
            job: rec.job.as_ref().map(|j| JobView {
                id: j.id,
                state: j.state,
                detail: j.detail.clone(),
            }),
        })
    }

    /// What a domain shows: its state, N of M edges serving its current certificate.
    pub fn view(&self, d: &DomainRecord) -> Result<DomainView> {
        let edges = self.store.edges_in(&d.edge_zones)?;
        let mut serving = 0;
        let mut staple = None;
        if let Some(cert) = &d.cert {
            for e in &edges {
                let key = crate::store::node_key(&e.zone, &e.node);
                if let Some(r) = self.store.report(&d.name, &key)?
                    && r.serial_hex == cert.serial_hex
                    && r.state == "serving"
                {
                    serving += 1;
                    if staple.is_none() && !r.staple.is_empty() {
                        staple = Some(r.staple.clone());
                    }
                }
            }
        }
        Ok(DomainView {
            name: d.name.clone(),
            issuer: d.issuer,
            owner: d.owner.clone(),
            edge_zones: d.edge_zones.clone(),
            state: d.state,
            edges_serving: serving,
            edges_total: edges.len(),
            serial_hex: d.cert.as_ref().map(|c| c.serial_hex.clone()),
            not_after_unix: d.cert.as_ref().map(|c| c.not_after_unix),
            error: d.error.clone(),
            staple,
        })
    }

    /// Start a deploy job for `name`, or join the one running (blocking: flushes).
    pub fn deploy(&self, name: &str, actor: &str) -> Result<JobView> {
        let rec = self.get(name)?;
        let (job, joined) = self.start_job(&rec.name, store::JobCause::Deploy, actor)?;
        if !joined {
            self.audit(
                AuditEvent::new("domain.deploy_requested", "ok")
                    .actor(actor)
                    .subject(&rec.name)
                    .detail(format!("job {}", job.id)),
            );
        }
        Ok(job)
    }

    /// Create a job for `name` unless one runs; returns it and whether it was running.
    fn start_job(
        &self,
        name: &str,
        cause: store::JobCause,
        actor: &str,
    ) -> Result<(JobView, bool)> {
        let guard = self.lock.lock();
        let mut rec = self
            .store
            .domain(name)?
            .ok_or_else(|| ControllerError::NotFound(format!("no domain {name}")))?;
        if let Some(j) = rec.active_job() {
            return Ok((
                JobView {
                    id: j.id,
                    state: j.state,
                    detail: j.detail.clone(),
                },
                true,
            ));
        }
        let id = self.store.next_job_id()?;
        let job = store::JobRecord {
            id,
            cause,
            actor: actor.to_string(),
            state: DomainState::Pending,
            detail: "waiting to start".into(),
            attempt: 0,
            issued_serial: None,
            started_unix: unix(self.now()),
            finished_unix: None,
        };
        rec.state = DomainState::Pending;
        rec.error = None;
        rec.order_url = None;
        rec.job = Some(job);
        self.store.put_domain(&rec)?;
        drop(guard);
        self.store.main().flush()?;
        self.wake.notify_one();
        Ok((
            JobView {
                id,
                state: DomainState::Pending,
                detail: "waiting to start".into(),
            },
            false,
        ))
    }

    /// Register `node` as an edge and open its stream: the snapshot first, then changes
    /// (blocking: flushes and unseals keys).
    pub fn open_edge(
        &self,
        node: &NodeRecord,
        hello: &pb::EdgeHello,
    ) -> Result<(pb::EdgeUpdate, edges::EdgeStream)> {
        let key = node.key();
        let known = self.store.edge(&key)?;
        let rec = EdgeRecord {
            zone: node.zone.clone(),
            node: node.node.clone(),
            https: hello.https,
            files: hello.files,
            first_seen_unix: known
                .as_ref()
                .map(|k| k.first_seen_unix)
                .unwrap_or_else(|| unix(self.now())),
        };
        if known.as_ref() != Some(&rec) {
            self.store.put_edge(&rec)?;
            self.store.main().flush()?;
        }
        // Registered before the snapshot is read: a certificate stored meanwhile is in the
        // snapshot or queued after it (an edge installs the same certificate twice at worst).
        let stream = self.hub.open(&key, &node.zone);
        let mut snapshot = pb::EdgeUpdate {
            snapshot: true,
            ..Default::default()
        };
        for d in self.store.domains()? {
            if !d.edge_zones.contains(&node.zone) {
                continue;
            }
            if let Some(c) = &d.cert {
                snapshot
                    .certificates
                    .push(self.certificate_message(&d.name, c)?);
            }
        }
        snapshot.challenges = self.hub.challenges_for(&node.zone);
        tracing::info!(edge = %key, certificates = snapshot.certificates.len(), "edge stream opened");
        Ok((snapshot, stream))
    }

    fn certificate_message(
        &self,
        domain: &str,
        c: &store::StoredCert,
    ) -> Result<pb::DomainCertificate> {
        let key = store::open_key(&self.kek, domain, &c.key_sealed)?;
        Ok(pb::DomainCertificate {
            domain: domain.to_string(),
            chain_der: c.chain_der.clone(),
            key_pkcs8_der: key.to_vec(),
            serial_hex: c.serial_hex.clone(),
            not_after_unix: c.not_after_unix,
        })
    }

    /// An edge's report (blocking: a store write). Only for domains it is an edge of,
    /// rate-limited per node.
    pub fn report(&self, node: &NodeRecord, r: &pb::DeploymentReport) -> Result<()> {
        let key = node.key();
        if !self.reports.allow(&key, self.now()) {
            return Err(ControllerError::RateLimited(
                "too many deployment reports from this node; try later".into(),
            ));
        }
        let domain = normalize_domain(&r.domain)?;
        let rec = self
            .store
            .domain(&domain)?
            .filter(|d| d.edge_zones.contains(&node.zone))
            .ok_or_else(|| {
                ControllerError::PermissionDenied(format!("this node is not an edge of {domain}"))
            })?;
        if self.store.edge(&key)?.is_none() {
            return Err(ControllerError::PermissionDenied(
                "open WatchEdge before reporting".into(),
            ));
        }
        let clip = |s: &str| crate::text::capped(s, MAX_DETAIL);
        use pb::deployment_report::State;
        match State::try_from(r.state) {
            Ok(State::ChallengeReady) => {
                if !self.hub.challenge_ready(&rec.name, &r.token, &key) {
                    return Err(ControllerError::NotFound(
                        "no such challenge is open".into(),
                    ));
                }
            }
            // A failure without a serial is about a challenge the edge could not hold:
            // logged, and it leaves the edge's report on the certificate alone.
            Ok(State::Failed) if r.serial_hex.is_empty() => {
                tracing::warn!(edge = %key, domain = %rec.name, detail = %crate::text::Escaped(&clip(&r.detail)), "edge could not hold an HTTP-01 challenge");
            }
            Ok(s @ (State::Serving | State::Failed)) => {
                let report = ReportRecord {
                    serial_hex: clip(&r.serial_hex),
                    state: if s == State::Serving {
                        "serving"
                    } else {
                        "failed"
                    }
                    .into(),
                    detail: clip(&r.detail),
                    staple: clip(&r.staple),
                    at_unix: unix(self.now()),
                };
                tracing::info!(edge = %key, domain = %rec.name, serial = %report.serial_hex, state = %report.state, "deployment report");
                self.store.put_report(&rec.name, &key, &report)?;
                self.hub.bump();
            }
            _ => {
                return Err(ControllerError::BadRequest(
                    "deployment report without a state".into(),
                ));
            }
        }
        Ok(())
    }

    /// Run the jobs until `shutdown` (in the serve task set).
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        jobs::run(self, crate::leader::Leadership::always("domains"), shutdown).await
    }

    /// Run the jobs until `shutdown`, starting them only while `leader` leads.
    pub async fn run_while_leader(
        self: Arc<Self>,
        leader: crate::leader::Leadership,
        shutdown: CancellationToken,
    ) {
        jobs::run(self, leader, shutdown).await
    }
}

#[cfg(test)]
mod tests;
