//! The job runner: one job per domain at a time, owned by the serve task set.
//!
//! A job issues a certificate (ACME or the internal CA), stores it sealed, hands it to the
//! domain's edges and waits until every edge reports serving it. A failed attempt is
//! retried with doubling backoff up to the configured number of attempts; the last
//! reason stays on the domain. A job that was running when the controller stopped resumes
//! at start (an ACME order from its stored URL; an issued certificate is only deployed
//! again). Certificates are renewed at 2/3 of their lifetime by the same job; a failed
//! renewal leaves the current certificate in service, is shown and audited, and is tried
//! again after a pause.

use super::store::{DomainRecord, JobCause, StoredCert};
use super::{DomainState, Domains, IssuerKind, edges::OpenChallenge};
use crate::audit::AuditEvent;
use crate::error::ControllerError;
use crate::store::unix;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use zonemesh_deploy::CertBundle;
use zonemesh_deploy::acme::{AcmeIssuer, ChallengeResponder, Http01};
use zonemesh_proto as pb;

/// Longest pause between scans for due renewals.
const SCAN_EVERY: Duration = Duration::from_secs(30);

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ControllerError> + Send + 'static,
) -> Result<T, String> {
    crate::blocking::run(f).await.map_err(|e| e.to_string())
}

/// When `cert` is due for renewal: the one renewal schedule (2/3 of the lifetime).
pub fn renewal_due(cert: &StoredCert) -> SystemTime {
    zonemesh_ca::renew_at(
        crate::store::from_unix(cert.not_before_unix),
        crate::store::from_unix(cert.not_after_unix),
        0.0,
    )
}

pub(super) async fn run(
    d: Arc<Domains>,
    leader: crate::leader::Leadership,
    shutdown: CancellationToken,
) {
    let mut set: JoinSet<()> = JoinSet::new();
    let mut running: HashMap<tokio::task::Id, String> = HashMap::new();
    loop {
        let busy: HashSet<String> = running.values().cloned().collect();
        // Jobs and renewals start only on the leader (several controllers share the
        // domains); a follower looks again soon.
        let scan = if leader.is_leader() {
            let d = d.clone();
            blocking(move || d.due_jobs(&busy)).await
        } else {
            Ok((Vec::new(), Some(d.now() + Duration::from_secs(1))))
        };
        let mut next = SCAN_EVERY;
        match scan {
            Ok((names, due)) => {
                for name in names {
                    let (d2, stop) = (d.clone(), shutdown.clone());
                    let n = name.clone();
                    let h = set.spawn(async move { run_job(d2, n, stop).await });
                    running.insert(h.id(), name);
                }
                if let Some(at) = due {
                    let wait = at.duration_since(d.now()).unwrap_or(Duration::ZERO);
                    next = next.min(wait.max(Duration::from_millis(200)));
                }
            }
            Err(e) => tracing::error!(error = %e, "domain job scan failed"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = d.wake.notified() => {}
            _ = tokio::time::sleep(next) => {}
            Some(r) = set.join_next_with_id(), if !set.is_empty() => {
                let id = match r {
                    Ok((id, ())) => id,
                    Err(e) => {
                        tracing::error!(error = %e, "domain job task failed");
                        e.id()
                    }
                };
                running.remove(&id);
            }
        }
    }
    while let Some(r) = set.join_next().await {
        if let Err(e) = r {
            tracing::error!(error = %e, "domain job task failed at shutdown");
        }
    }
}

impl Domains {
    /// Wake the job runner (a test moved its clock, or a job was requested).
    pub fn kick(&self) {
        self.wake.notify_one();
    }

    /// Domains with a job to run now (renewals that are due get their job created here),
    /// and the earliest renewal still to come.
    fn due_jobs(
        &self,
        busy: &HashSet<String>,
    ) -> Result<(Vec<String>, Option<SystemTime>), ControllerError> {
        let now = self.now();
        let mut out = Vec::new();
        let mut next: Option<SystemTime> = None;
        for rec in self.store.domains()? {
            if busy.contains(&rec.name) {
                continue;
            }
            if rec.active_job().is_some() {
                out.push(rec.name.clone());
                continue;
            }
            let Some(cert) = &rec.cert else { continue };
            let mut due = renewal_due(cert);
            if let Some(nb) = rec.retry_not_before_unix {
                due = due.max(crate::store::from_unix(nb));
            }
            if now >= due {
                self.start_job(&rec.name, JobCause::Renewal, "controller")?;
                out.push(rec.name.clone());
            } else {
                next = Some(next.map_or(due, |n| n.min(due)));
            }
        }
        Ok((out, next))
    }

    /// Change the running job `id` of `name` (no flush: progress only).
    fn update_job(
        &self,
        name: &str,
        id: u64,
        f: impl FnOnce(&mut DomainRecord),
    ) -> Result<Option<DomainRecord>, ControllerError> {
        let _guard = self.lock.lock();
        let Some(mut rec) = self.store.domain(name)? else {
            return Ok(None);
        };
        if rec.job.as_ref().map(|j| j.id) != Some(id) {
            return Ok(None);
        }
        f(&mut rec);
        self.store.put_domain(&rec)?;
        Ok(Some(rec))
    }

    async fn acme_issuer(self: &Arc<Self>) -> Result<&AcmeIssuer, String> {
        self.acme
            .get_or_try_init(|| async {
                let cfg = self.cfg.acme.clone().ok_or_else(|| {
                    "no ACME server configured (start the controller with --acme-directory URL)"
                        .to_string()
                })?;
                let d = self.clone();
                let stored = blocking(move || Ok(d.store.acme_account(&d.kek)?)).await?;
                let (issuer, created) =
                    AcmeIssuer::connect(cfg, stored.as_ref().map(|s| s.as_slice()))
                        .await
                        .map_err(|e| e.to_string())?;
                if let Some(creds) = created {
                    let d = self.clone();
                    blocking(move || {
                        d.store.put_acme_account(&d.kek, &creds)?;
                        Ok(d.store.main().flush()?)
                    })
                    .await?;
                }
                Ok(issuer)
            })
            .await
    }
}

/// HTTP-01 through the domain's edges.
struct EdgeResponder {
    d: Arc<Domains>,
    domain: String,
    zones: Vec<String>,
    job: u64,
}

impl ChallengeResponder for EdgeResponder {
    async fn publish(&self, ch: &Http01) -> Result<(), String> {
        let mut changed = self.d.hub.subscribe();
        self.d.hub.add_challenge(
            &ch.token,
            OpenChallenge {
                domain: self.domain.clone(),
                zones: self.zones.clone(),
                key_authorization: ch.key_authorization.clone(),
                ready: HashSet::new(),
            },
        )?;
        loop {
            if self.d.hub.ready_count(&ch.token) > 0 {
                return Ok(());
            }
            if changed.changed().await.is_err() {
                return Err("controller shutting down".into());
            }
        }
    }

    async fn withdraw(&self, ch: &Http01) {
        self.d.hub.remove_challenge(&ch.token);
    }

    async fn order_started(&self, url: &str) {
        let (d, name, url, job) = (
            self.d.clone(),
            self.domain.clone(),
            url.to_string(),
            self.job,
        );
        let stored = blocking(move || {
            d.update_job(&name, job, |r| r.order_url = Some(url))?;
            Ok(d.store.main().flush()?)
        })
        .await;
        if let Err(e) = stored {
            tracing::warn!(error = %e, "ACME order URL not stored");
        }
    }
}

fn set_progress(
    d: &Arc<Domains>,
    name: &str,
    id: u64,
    state: DomainState,
    detail: String,
) -> impl Future<Output = Result<(), String>> + use<> {
    let (d, name) = (d.clone(), name.to_string());
    async move {
        blocking(move || {
            d.update_job(&name, id, |r| {
                r.state = state;
                if let Some(j) = r.job.as_mut() {
                    j.state = state;
                    j.detail = detail;
                }
            })?;
            Ok(())
        })
        .await
    }
}

async fn issue(d: &Arc<Domains>, rec: &DomainRecord, id: u64) -> Result<CertBundle, String> {
    match rec.issuer {
        IssuerKind::Internal => {
            let (d, name) = (d.clone(), rec.name.clone());
            blocking(move || {
                let now = d.now();
                let auth = &d.auth;
                let req = zonemesh_deploy::internal::PortalRequest {
                    domain: &name,
                    ocsp_url: &d.cfg.ocsp_url,
                    lifetime: d.cfg.internal_lifetime,
                };
                let (bundle, cert) =
                    zonemesh_deploy::internal::issue(&auth.ca(), &auth.tls_policy, &req, now)
                        .map_err(|e| match e {
                            zonemesh_deploy::internal::InternalError::Ca(c) => {
                                ControllerError::Ca(c)
                            }
                        })?;
                auth.record_portal(&cert, &name, now)?;
                Ok(bundle)
            })
            .await
        }
        IssuerKind::Acme => {
            set_progress(
                d,
                &rec.name,
                id,
                DomainState::Validating,
                "ACME order: answering HTTP-01 on the edges".into(),
            )
            .await?;
            let issuer = d.acme_issuer().await?;
            let responder = EdgeResponder {
                d: d.clone(),
                domain: rec.name.clone(),
                zones: rec.edge_zones.clone(),
                job: id,
            };
            issuer
                .issue(&rec.name, rec.order_url.as_deref(), &responder)
                .await
                .map_err(|e| e.to_string())
        }
    }
}

/// Store `bundle` as the domain's certificate (sealed, flushed) and hand it to its edges.
async fn install(d: &Arc<Domains>, name: &str, id: u64, bundle: CertBundle) -> Result<(), String> {
    let (d2, name2) = (d.clone(), name.to_string());
    let (rec, msg) = blocking(move || {
        let (_, leaf) = x509_parser::parse_x509_certificate(&bundle.chain_der[0])
            .map_err(ControllerError::IssuedCertificate)?;
        let cert = StoredCert {
            chain_der: bundle.chain_der.clone(),
            key_sealed: super::store::seal_key(&d2.kek, &name2, &bundle.key_pkcs8_der)?,
            serial_hex: bundle.serial_hex.clone(),
            not_before_unix: leaf.validity().not_before.timestamp().max(0) as u64,
            not_after_unix: bundle.not_after_unix,
        };
        let detail = format!(
            "issued serial {}, valid until {}",
            cert.serial_hex,
            humantime::format_rfc3339_seconds(crate::store::from_unix(cert.not_after_unix))
        );
        let rec = d2.update_job(&name2, id, |r| {
            r.cert = Some(cert);
            r.state = DomainState::Issued;
            r.order_url = None;
            if let Some(j) = r.job.as_mut() {
                j.state = DomainState::Issued;
                j.detail = detail;
                j.issued_serial = Some(bundle.serial_hex.clone());
            }
        })?;
        d2.store.main().flush()?;
        Ok((rec, pb::DomainCertificate::from(&bundle)))
    })
    .await?;
    let Some(rec) = rec else {
        return Err("the domain was removed".into());
    };
    d.audit_durable(
        AuditEvent::new("domain.certificate_issued", "ok")
            .actor("controller")
            .subject(name)
            .detail(format!(
                "serial {} from the {} issuer",
                msg.serial_hex,
                rec.issuer.as_str()
            )),
    )
    .await;
    let sent = d.hub.push(
        &rec.edge_zones,
        &pb::EdgeUpdate {
            certificates: vec![msg],
            ..Default::default()
        },
    );
    tracing::info!(domain = %name, edges = sent, "certificate sent to the edges");
    Ok(())
}

/// Where the edges stand with `serial`: serving, total, the first failure, who is missing.
struct Tally {
    serving: usize,
    total: usize,
    failed: Option<(String, String)>,
    missing: Vec<String>,
}

impl Domains {
    fn tally(&self, name: &str, serial: &str) -> Result<Tally, ControllerError> {
        let rec = self
            .store
            .domain(name)?
            .ok_or_else(|| ControllerError::NotFound(format!("no domain {name}")))?;
        let mut t = Tally {
            serving: 0,
            total: 0,
            failed: None,
            missing: Vec::new(),
        };
        for e in self.store.edges_in(&rec.edge_zones)? {
            t.total += 1;
            let key = crate::store::node_key(&e.zone, &e.node);
            match self.store.report(name, &key)? {
                Some(r) if r.serial_hex == serial && r.state == "serving" => t.serving += 1,
                Some(r) if r.serial_hex == serial && r.state == "failed" => {
                    t.failed.get_or_insert((key, r.detail));
                }
                _ => t.missing.push(key),
            }
        }
        Ok(t)
    }

    async fn audit_durable(&self, event: AuditEvent) {
        if let Some(a) = &self.audit
            && let Err(e) = a.record_durable(event, self.now()).await
        {
            tracing::error!(error = %e, "audit record failed");
        }
    }
}

async fn wait_deployed(
    d: &Arc<Domains>,
    name: &str,
    id: u64,
    serial: &str,
) -> Result<String, String> {
    let deadline = tokio::time::Instant::now() + d.cfg.deploy_wait;
    let mut changed = d.hub.subscribe();
    let mut shown = None;
    loop {
        changed.borrow_and_update();
        let t = {
            let (d, name, serial) = (d.clone(), name.to_string(), serial.to_string());
            blocking(move || d.tally(&name, &serial)).await?
        };
        let detail = format!("{}/{} edges serve serial {serial}", t.serving, t.total);
        if shown.as_ref() != Some(&detail) {
            set_progress(d, name, id, DomainState::Deploying, detail.clone()).await?;
            shown = Some(detail.clone());
        }
        if let Some((edge, why)) = t.failed {
            return Err(format!(
                "edge {edge} could not install serial {serial}: {why}"
            ));
        }
        if t.total == 0 {
            let rec = d.detail(name).map_err(|e| e.to_string())?;
            return Err(format!(
                "no edge of zone(s) {} has connected (start agents there with --edge-https or --edge-files)",
                rec.domain.edge_zones.join(", ")
            ));
        }
        if t.serving == t.total {
            return Ok(detail);
        }
        tokio::select! {
            r = changed.changed() => if r.is_err() { return Err("controller shutting down".into()) },
            _ = tokio::time::sleep_until(deadline) => {
                return Err(format!(
                    "{}/{} edges serve serial {serial} after {} s; no report from {}",
                    t.serving,
                    t.total,
                    d.cfg.deploy_wait.as_secs(),
                    t.missing.join(", ")
                ));
            }
        }
    }
}

/// One attempt: issue (unless this job already did) and deploy.
async fn attempt(d: &Arc<Domains>, name: &str, id: u64) -> Result<String, String> {
    let rec = {
        let (d, name) = (d.clone(), name.to_string());
        blocking(move || Ok(d.store.domain(&name)?)).await?
    }
    .ok_or("the domain was removed")?;
    let already = rec
        .job
        .as_ref()
        .and_then(|j| j.issued_serial.clone())
        .filter(|s| rec.cert.as_ref().is_some_and(|c| &c.serial_hex == s));
    let serial = match already {
        Some(s) => {
            // A retry or a resumed job: hand the issued certificate out again (an edge that
            // failed may succeed now; one that missed it while disconnected gets it).
            if let Some(c) = &rec.cert {
                let (d2, name2, c2) = (d.clone(), name.to_string(), c.clone());
                let msg = blocking(move || {
                    // An earlier attempt's failures are answered by this one's reports.
                    d2.store.clear_failed_reports(&name2, &c2.serial_hex)?;
                    d2.certificate_message(&name2, &c2)
                })
                .await?;
                d.hub.push(
                    &rec.edge_zones,
                    &pb::EdgeUpdate {
                        certificates: vec![msg],
                        ..Default::default()
                    },
                );
            }
            s
        }
        None => {
            let bundle = issue(d, &rec, id).await?;
            let serial = bundle.serial_hex.clone();
            install(d, name, id, bundle).await?;
            serial
        }
    };
    wait_deployed(d, name, id, &serial).await
}

async fn run_job(d: Arc<Domains>, name: String, shutdown: CancellationToken) {
    loop {
        let rec = {
            let (d, name) = (d.clone(), name.clone());
            blocking(move || Ok(d.store.domain(&name)?)).await
        };
        let job = match rec {
            Ok(Some(r)) => match r.active_job() {
                Some(j) => j.clone(),
                None => return,
            },
            Ok(None) => return,
            Err(e) => {
                tracing::error!(domain = %name, error = %e, "domain job cannot read its domain");
                return;
            }
        };
        let n = job.attempt + 1;
        let counted = {
            let (d, name) = (d.clone(), name.clone());
            blocking(move || {
                d.update_job(&name, job.id, |r| {
                    if let Some(j) = r.job.as_mut() {
                        j.attempt = n;
                    }
                })?;
                Ok(d.store.main().flush()?)
            })
            .await
        };
        if let Err(e) = counted {
            tracing::error!(domain = %name, error = %e, "domain job cannot record its attempt");
            return;
        }
        tracing::info!(domain = %name, job = job.id, attempt = n, cause = ?job.cause, "domain job attempt");
        let outcome = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = attempt(&d, &name, job.id) => r,
        };
        let renewal = job.cause == JobCause::Renewal;
        match outcome {
            Ok(detail) => {
                let kind = if renewal {
                    "domain.renewed"
                } else {
                    "domain.deployed"
                };
                d.audit_durable(
                    AuditEvent::new(kind, "ok")
                        .actor(job.actor.as_str())
                        .subject(&name)
                        .detail(format!("job {}: {detail}", job.id)),
                )
                .await;
                finish(
                    &d,
                    &name,
                    job.id,
                    DomainState::Deployed,
                    detail.clone(),
                    None,
                    None,
                )
                .await;
                tracing::info!(domain = %name, job = job.id, "{detail}");
                return;
            }
            Err(reason) if n >= d.cfg.attempts => {
                let retry = renewal.then(|| unix(d.now() + d.cfg.renewal_retry));
                let detail = format!("failed after {n} attempt(s): {reason}");
                let kind = if renewal {
                    "domain.renewal_failed"
                } else {
                    "domain.deploy_failed"
                };
                d.audit_durable(
                    AuditEvent::new(kind, "failed")
                        .actor(job.actor.as_str())
                        .subject(&name)
                        .detail(format!("job {}: {reason}", job.id)),
                )
                .await;
                finish(
                    &d,
                    &name,
                    job.id,
                    DomainState::Failed,
                    detail,
                    Some(reason.clone()),
                    retry,
                )
                .await;
                tracing::warn!(domain = %name, job = job.id, %reason, "domain job failed");
                return;
            }
            Err(reason) => {
                let wait = d.cfg.retry_backoff * 2u32.saturating_pow(n - 1);
                tracing::info!(domain = %name, job = job.id, attempt = n, %reason, "domain job attempt failed; retrying");
                let (d2, name2, r2) = (d.clone(), name.clone(), reason.clone());
                let _ = blocking(move || {
                    d2.update_job(&name2, job.id, |r| {
                        r.error = Some(r2.clone());
                        if let Some(j) = r.job.as_mut() {
                            j.detail = format!(
                                "attempt {n} failed: {r2}; retrying in {} s",
                                wait.as_secs()
                            );
                        }
                    })?;
                    Ok(())
                })
                .await;
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn finish(
    d: &Arc<Domains>,
    name: &str,
    id: u64,
    state: DomainState,
    detail: String,
    error: Option<String>,
    retry_not_before: Option<u64>,
) {
    let (d2, name2) = (d.clone(), name.to_string());
    let r = blocking(move || {
        let now = unix(d2.now());
        d2.update_job(&name2, id, |r| {
            r.state = state;
            r.error = error;
            r.order_url = None;
            r.retry_not_before_unix = retry_not_before;
            if let Some(j) = r.job.as_mut() {
                j.state = state;
                j.detail = detail;
                j.finished_unix = Some(now);
            }
        })?;
        Ok(d2.store.main().flush()?)
    })
    .await;
    if let Err(e) = r {
        tracing::error!(domain = %name, error = %e, "domain job outcome not stored");
    }
}
