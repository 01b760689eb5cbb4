//! Jobs end to end on a real store and CA, with fake edges on the edge stream API: join,
//! retry, restart resume, renewal at 2/3, and a failed renewal that keeps the certificate.

use super::store::IssuerKind as Issuer;
use super::*;
use crate::audit::AuditLog;
use crate::store::{Store, ZoneRecord, encode};
use parking_lot::Mutex;
use std::sync::OnceLock;
use zonemesh_ca::CaMaterial;

fn material() -> &'static CaMaterial {
    static M: OnceLock<CaMaterial> = OnceLock::new();
    M.get_or_init(|| CaMaterial::generate("domains.test", SystemTime::now(), |_| {}).unwrap())
}

#[derive(Debug)]
struct ManualClock(Mutex<SystemTime>);

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        *self.0.lock()
    }
    fn alarm(&self, _at: SystemTime) -> crate::clock::Alarm {
        Box::pin(std::future::pending())
    }
}

struct Fixture {
    dir: tempfile::TempDir,
    auth: Arc<Authority>,
    kek: Kek,
    audit: Arc<AuditLog>,
    clock: Arc<ManualClock>,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        let kek = Kek::generate();
        Authority::install(&store, &kek, material()).unwrap();
        let auth = Arc::new(Authority::load(store.clone(), &kek, SystemTime::now()).unwrap());
        for (i, z) in ["eu", "us"].into_iter().enumerate() {
            let rec = ZoneRecord {
                name: z.into(),
                cidr: format!("100.64.{}.0/24", i + 1).parse().unwrap(),
                intra_zone_tunnels: false,
                created_unix: 0,
            };
            store.zones.insert(z, encode(&rec)).unwrap();
        }
        let audit = Arc::new(AuditLog::open_with(store.flusher()).unwrap());
        Self {
            dir,
            auth,
            kek,
            audit,
            clock: Arc::new(ManualClock(Mutex::new(SystemTime::now()))),
        }
    }

    fn domains(&self, tune: impl FnOnce(&mut DomainsConfig)) -> Arc<Domains> {
        let mut cfg = DomainsConfig::new("http://127.0.0.1:9/ocsp");
        cfg.deploy_wait = Duration::from_secs(20);
        cfg.retry_backoff = Duration::from_millis(1100);
        tune(&mut cfg);
        Domains::with_clock(
            self.auth.clone(),
            &self.kek,
            cfg,
            Some(self.audit.clone()),
            self.clock.clone(),
        )
        .unwrap()
    }

    fn node(&self, zone: &str, name: &str) -> NodeRecord {
        let n = NodeRecord {
            zone: zone.into(),
            node: name.into(),
            serial_hex: "01".into(),
            cert_der: vec![],
            wg_public_key: [name.len() as u8; 32],
            endpoints: vec![],
            overlay_ip: "100.64.1.9".parse().unwrap(),
            enrolled_unix: 0,
            not_after_unix: u64::MAX / 2,
            revoked: false,
        };
        self.auth.store().put_node(&n).unwrap();
        n
    }

    fn audit_kinds(&self) -> Vec<String> {
        self.audit
            .list(None)
            .unwrap()
            .into_iter()
            .map(|r| r.event.kind)
            .collect()
    }

    fn advance(&self, by: Duration) {
        *self.clock.0.lock() += by;
    }
}

/// How a fake edge answers a certificate.
#[derive(Clone, Copy)]
enum Answer {
    /// Fail the first `n` installs, then serve.
    FailFirst(usize),
    /// Never report.
    Silent,
}

/// What a fake edge received.
#[derive(Default)]
struct Seen {
    certificates: Vec<(String, String, usize)>,
}

/// HTTP-01 responses a fake edge holds.
type Tokens = Arc<Mutex<std::collections::HashMap<String, String>>>;

/// An edge on the stream API: installs what it gets and reports like the agent does.
fn fake_edge(
    d: &Arc<Domains>,
    node: NodeRecord,
    answer: Answer,
) -> (Arc<Mutex<Seen>>, tokio::task::JoinHandle<()>) {
    fake_edge_with(d, node, answer, Tokens::default())
}

/// [`fake_edge`], answering HTTP-01 from `tokens`.
fn fake_edge_with(
    d: &Arc<Domains>,
    node: NodeRecord,
    answer: Answer,
    tokens: Tokens,
) -> (Arc<Mutex<Seen>>, tokio::task::JoinHandle<()>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let (d, s) = (d.clone(), seen.clone());
    let task = tokio::spawn(async move {
        let hello = pb::EdgeHello {
            https: true,
            files: false,
        };
        let (snap, mut sub) = d.open_edge(&node, &hello).unwrap();
        let mut fails_left = match answer {
            Answer::FailFirst(n) => n,
            Answer::Silent => 0,
        };
        let mut next = Some(snap);
        loop {
            let u = match next.take() {
                Some(u) => u,
                None => match sub.rx.recv().await {
                    Some(u) => u,
                    None => return,
                },
            };
            for t in u.cleared_tokens {
                tokens.lock().remove(&t);
            }
            for ch in u.challenges {
                tokens
                    .lock()
                    .insert(ch.token.clone(), ch.key_authorization.clone());
                let r = pb::DeploymentReport {
                    domain: ch.domain,
                    state: pb::deployment_report::State::ChallengeReady as i32,
                    token: ch.token,
                    ..Default::default()
                };
                let (d, n) = (d.clone(), node.clone());
                tokio::task::spawn_blocking(move || d.report(&n, &r))
                    .await
                    .unwrap()
                    .unwrap();
            }
            for c in u.certificates {
                s.lock().certificates.push((
                    c.domain.clone(),
                    c.serial_hex.clone(),
                    c.key_pkcs8_der.len(),
                ));
                if matches!(answer, Answer::Silent) {
                    continue;
                }
                let (state, detail) = if fails_left > 0 {
                    fails_left -= 1;
                    (
                        pb::deployment_report::State::Failed,
                        "handshake check failed: test",
                    )
                } else {
                    (pb::deployment_report::State::Serving, "")
                };
                let r = pb::DeploymentReport {
                    domain: c.domain,
                    serial_hex: c.serial_hex,
                    state: state as i32,
                    detail: detail.into(),
                    staple: "stapled".into(),
                    token: String::new(),
                };
                let (d, n) = (d.clone(), node.clone());
                tokio::task::spawn_blocking(move || d.report(&n, &r))
                    .await
                    .unwrap()
                    .unwrap();
            }
        }
    });
    (seen, task)
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let end = std::time::Instant::now() + Duration::from_secs(60);
    while !f() {
        assert!(
            std::time::Instant::now() < end,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn state_of(d: &Domains, name: &str) -> DomainDetail {
    d.detail(name).unwrap()
}

/// Add domain `name` with the internal issuer, owned by the usual owner, on `zone`.
fn add_internal(d: &Domains, name: &str, zone: &str) {
    d.add(
        name,
        Issuer::Internal,
        "owner@example.test",
        &[zone.into()],
        "cli",
    )
    .unwrap();
}

/// The job runner of `d`, until the token is cancelled.
fn running(d: &std::sync::Arc<Domains>) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let stop = CancellationToken::new();
    (stop.clone(), tokio::spawn(d.clone().run(stop)))
}

const NAME: &str = "portal.domains.test";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_reaches_every_edge_of_the_zone_and_a_second_press_joins() {
    let f = Fixture::new();
    let d = f.domains(|_| {});
    d.add(
        NAME,
        Issuer::Internal,
        "Owner@Example.test",
        &["eu".into()],
        "cli",
    )
    .unwrap();
    let (e1, _t1) = fake_edge(&d, f.node("eu", "e1"), Answer::FailFirst(0));
    let (e2, _t2) = fake_edge(&d, f.node("eu", "e2"), Answer::FailFirst(0));
    let (other, _t3) = fake_edge(&d, f.node("us", "e3"), Answer::FailFirst(0));
    until("three edges", || d.hub().connected() == 3).await;
    let (stop, runner) = running(&d);

    let job = d.deploy(NAME, "owner@example.test").unwrap();
    let again = d.deploy(NAME, "owner@example.test").unwrap();
    assert_eq!(again.id, job.id, "a second press joins the running job");
    until("deployed", || {
        state_of(&d, NAME).domain.state == DomainState::Deployed
    })
    .await;
    let v = state_of(&d, NAME);
    assert_eq!((v.domain.edges_serving, v.domain.edges_total), (2, 2));
    assert_eq!(v.domain.owner, "owner@example.test");
    assert_eq!(v.domain.staple.as_deref(), Some("stapled"));
    assert_eq!(v.job.as_ref().unwrap().id, job.id);
    let serial = v.domain.serial_hex.clone().unwrap();
    for e in [&e1, &e2] {
        let got = &e.lock().certificates;
        assert!(
            got.iter()
                .any(|(dn, s, key)| dn == NAME && s == &serial && *key > 1000),
            "the edge got the key"
        );
    }
    assert!(
        other.lock().certificates.is_empty(),
        "keys only go to the domain's edge zones"
    );
    let kinds = f.audit_kinds();
    assert_eq!(
        kinds
            .iter()
            .filter(|k| *k == "domain.deploy_requested")
            .count(),
        1,
        "{kinds:?}"
    );
    assert!(
        kinds.contains(&"domain.certificate_issued".to_string()),
        "{kinds:?}"
    );
    assert!(kinds.contains(&"domain.deployed".to_string()), "{kinds:?}");
    // The key is sealed at rest.
    let rec = d.store.domain(NAME).unwrap().unwrap();
    let cert = rec.cert.unwrap();
    let key = store::open_key(&f.kek, NAME, &cert.key_sealed).unwrap();
    assert!(
        !cert
            .key_sealed
            .windows(64)
            .any(|w| key.windows(64).next() == Some(w))
    );
    // A new edge gets the certificate in its snapshot.
    let (late, _t4) = fake_edge(&d, f.node("eu", "e4"), Answer::FailFirst(0));
    until("snapshot", || !late.lock().certificates.is_empty()).await;
    until("3/3", || state_of(&d, NAME).domain.edges_serving == 3).await;
    stop.cancel();
    runner.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_edge_is_retried_and_a_job_that_keeps_failing_shows_the_reason() {
    let f = Fixture::new();
    let d = f.domains(|c| c.attempts = 2);
    add_internal(&d, NAME, "eu");
    add_internal(&d, "other.domains.test", "us");
    let (_e1, _t1) = fake_edge(&d, f.node("eu", "e1"), Answer::FailFirst(1));
    let (_e2, _t2) = fake_edge(&d, f.node("us", "e2"), Answer::FailFirst(usize::MAX));
    until("two edges", || d.hub().connected() == 2).await;
    let (stop, runner) = running(&d);
    d.deploy(NAME, "cli").unwrap();
    d.deploy("other.domains.test", "cli").unwrap();
    until("retried and deployed", || {
        state_of(&d, NAME).domain.state == DomainState::Deployed
    })
    .await;
    let rec = d.store.domain(NAME).unwrap().unwrap();
    assert_eq!(
        rec.job.as_ref().unwrap().attempt,
        2,
        "deployed on the second attempt"
    );
    assert!(rec.error.is_none());
    until("failed", || {
        state_of(&d, "other.domains.test").domain.state == DomainState::Failed
    })
    .await;
    let v = state_of(&d, "other.domains.test");
    let err = v.domain.error.unwrap();
    assert!(
        err.contains("us/e2") && err.contains("handshake check failed: test"),
        "{err}"
    );
    assert!(
        f.audit_kinds()
            .contains(&"domain.deploy_failed".to_string())
    );
    stop.cancel();
    runner.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_in_flight_resumes_after_a_restart_without_issuing_again() {
    let f = Fixture::new();
    let d1 = f.domains(|_| {});
    add_internal(&d1, NAME, "eu");
    let node = f.node("eu", "e1");
    let (_silent, t1) = fake_edge(&d1, node.clone(), Answer::Silent);
    until("edge", || d1.hub().connected() == 1).await;
    let (stop, runner) = running(&d1);
    let job = d1.deploy(NAME, "cli").unwrap();
    until("deploying", || {
        state_of(&d1, NAME).domain.state == DomainState::Deploying
    })
    .await;
    let serial = state_of(&d1, NAME).domain.serial_hex.unwrap();
    stop.cancel();
    runner.await.unwrap();
    t1.abort();
    drop(d1);

    // The restarted controller: same store, a new service.
    let d2 = f.domains(|_| {});
    let v = state_of(&d2, NAME);
    assert_eq!(v.job.as_ref().unwrap().id, job.id);
    assert_eq!(
        v.domain.state,
        DomainState::Deploying,
        "the job survived the restart"
    );
    let (seen, _t2) = fake_edge(&d2, node, Answer::FailFirst(0));
    let (stop, runner) = running(&d2);
    until("deployed after the restart", || {
        state_of(&d2, NAME).domain.state == DomainState::Deployed
    })
    .await;
    let v = state_of(&d2, NAME);
    assert_eq!(
        v.domain.serial_hex.as_deref(),
        Some(serial.as_str()),
        "not issued again"
    );
    assert_eq!(v.job.unwrap().id, job.id);
    assert!(
        seen.lock()
            .certificates
            .iter()
            .all(|(_, s, _)| s == &serial)
    );
    stop.cancel();
    runner.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_at_two_thirds_and_a_failed_renewal_keeps_the_current_certificate() {
    let f = Fixture::new();
    let d = f.domains(|c| c.attempts = 1);
    add_internal(&d, NAME, "eu");
    let (seen, _t) = fake_edge(&d, f.node("eu", "e1"), Answer::FailFirst(0));
    until("edge", || d.hub().connected() == 1).await;
    let (stop, runner) = running(&d);
    d.deploy(NAME, "cli").unwrap();
    until("deployed", || {
        state_of(&d, NAME).domain.state == DomainState::Deployed
    })
    .await;
    let first = d.store.domain(NAME).unwrap().unwrap();
    let c1 = first.cert.clone().unwrap();
    let due = jobs::renewal_due(&c1);
    let life = c1.not_after_unix - c1.not_before_unix;
    assert_eq!(crate::store::unix(due), c1.not_before_unix + life * 2 / 3);

    // Just before 2/3 nothing happens; at 2/3 the renewal job runs.
    let to_due = due.duration_since(d.now()).unwrap();
    f.advance(to_due - Duration::from_secs(60));
    d.kick();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        d.store.domain(NAME).unwrap().unwrap().job.unwrap().id,
        first.job.as_ref().unwrap().id
    );
    f.advance(Duration::from_secs(61));
    d.kick();
    until("renewed", || {
        let v = state_of(&d, NAME);
        v.domain.state == DomainState::Deployed
            && v.domain.serial_hex.as_deref() != Some(c1.serial_hex.as_str())
    })
    .await;
    let renewed = d.store.domain(NAME).unwrap().unwrap();
    assert_eq!(
        renewed.job.as_ref().unwrap().cause,
        store::JobCause::Renewal
    );
    let c2 = renewed.cert.clone().unwrap();
    assert!(f.audit_kinds().contains(&"domain.renewed".to_string()));

    // The next renewal fails (its issuer cannot be reached): the certificate stays.
    let mut rec = renewed.clone();
    rec.issuer = Issuer::Acme;
    d.store.put_domain(&rec).unwrap();
    f.advance(jobs::renewal_due(&c2).duration_since(d.now()).unwrap() + Duration::from_secs(1));
    d.kick();
    until("renewal failed", || {
        state_of(&d, NAME).domain.state == DomainState::Failed
    })
    .await;
    let v = state_of(&d, NAME);
    assert_eq!(
        v.domain.serial_hex.as_deref(),
        Some(c2.serial_hex.as_str()),
        "still in service"
    );
    assert_eq!(v.domain.edges_serving, 1, "the edge still serves it");
    assert!(
        v.domain
            .error
            .as_deref()
            .unwrap()
            .contains("no ACME server configured"),
        "{v:?}"
    );
    assert!(
        f.audit_kinds()
            .contains(&"domain.renewal_failed".to_string())
    );
    let after = d.store.domain(NAME).unwrap().unwrap();
    assert!(after.retry_not_before_unix.is_some(), "the next try waits");
    // No immediate retry loop.
    let failed_job = after.job.as_ref().unwrap().id;
    d.kick();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        d.store.domain(NAME).unwrap().unwrap().job.unwrap().id,
        failed_job
    );
    assert_eq!(seen.lock().certificates.last().unwrap().1, c2.serial_hex);
    stop.cancel();
    runner.await.unwrap();
    drop(f.dir);
}

/// The edge's HTTP-01 listener: `/.well-known/acme-challenge/<token>` from `tokens`.
async fn serve_http01(listener: tokio::net::TcpListener, tokens: Tokens) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            return;
        };
        let mut buf = vec![0u8; 4096];
        let n = s.read(&mut buf).await.unwrap_or(0);
        let req = String::from_utf8_lossy(&buf[..n]).to_string();
        let path = req.split_whitespace().nth(1).unwrap_or("").to_string();
        let token = path
            .strip_prefix("/.well-known/acme-challenge/")
            .unwrap_or("");
        let found = tokens.lock().get(token).cloned();
        let resp = match found {
            Some(b) => format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{b}",
                b.len()
            ),
            None => {
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".into()
            }
        };
        let _ = s.write_all(resp.as_bytes()).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acme_through_the_edges_with_pebble_and_a_refused_challenge_keeps_the_certificate() {
    use zonemesh_deploy::testing::{Pebble, installed};
    if !installed("pebble") || !installed("pebble-challtestsrv") {
        println!("skipped: pebble not installed");
        return;
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let pebble = Pebble::start(listener.local_addr().unwrap().port());
    let tokens = Tokens::default();
    let http01 = tokio::spawn(serve_http01(listener, tokens.clone()));
    let f = Fixture::new();
    let d = f.domains(|c| {
        let mut acme = zonemesh_deploy::acme::AcmeConfig::new(pebble.directory.clone());
        acme.extra_roots = vec![pebble.tls_root.clone()];
        acme.contact_email = Some("ops@domains.test".into());
        acme.order_timeout = Duration::from_secs(60);
        c.acme = Some(acme);
        c.attempts = 1;
    });
    const SHOP: &str = "shop.domains.test";
    d.add(
        SHOP,
        Issuer::Acme,
        "owner@example.test",
        &["eu".into()],
        "cli",
    )
    .unwrap();
    let (seen, _t) = fake_edge_with(&d, f.node("eu", "e1"), Answer::FailFirst(0), tokens.clone());
    until("edge", || d.hub().connected() == 1).await;
    let (stop, runner) = running(&d);

    d.deploy(SHOP, "owner@example.test").unwrap();
    until("deployed", || {
        state_of(&d, SHOP).domain.state == DomainState::Deployed
    })
    .await;
    let v = state_of(&d, SHOP);
    let serial = v.domain.serial_hex.clone().unwrap();
    assert!(
        seen.lock()
            .certificates
            .iter()
            .any(|(_, s, _)| s == &serial)
    );
    assert!(
        tokens.lock().is_empty(),
        "the edge was told to drop the token"
    );
    let rec = d.store.domain(SHOP).unwrap().unwrap();
    assert!(rec.order_url.is_none(), "the finished order is forgotten");
    let chain = rec.cert.unwrap().chain_der;
    let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
    assert!(
        leaf.issuer().to_string().to_lowercase().contains("pebble"),
        "{}",
        leaf.issuer()
    );
    assert!(
        d.store.acme_account(&f.kek).unwrap().is_some(),
        "the account is stored sealed"
    );

    // Nothing answers HTTP-01 any more: pebble's reason shows, the certificate stays.
    http01.abort();
    let _ = http01.await;
    d.deploy(SHOP, "owner@example.test").unwrap();
    until("failed", || {
        state_of(&d, SHOP).domain.state == DomainState::Failed
    })
    .await;
    let v = state_of(&d, SHOP);
    let err = v.domain.error.unwrap();
    assert!(
        err.contains("urn:ietf:params:acme:error:connection") && err.contains("connection refused"),
        "{err}"
    );
    assert_eq!(
        v.domain.serial_hex.as_deref(),
        Some(serial.as_str()),
        "the previous certificate stays"
    );
    assert_eq!(v.domain.edges_serving, 1);
    stop.cancel();
    runner.await.unwrap();
}
