//! The edge role (`--edge-*`): a WatchEdge stream on the agent's link brings the
//! certificates (with their keys) and HTTP-01 challenges of the domains whose edge zones
//! hold this node; each change is applied to the [`Edge`] and reported with
//! ReportDeployment: `SERVING` once a handshake with our own listener shows the new serial
//! (or, files only, once the files are written and the reload command succeeded),
//! `CHALLENGE_READY` once a token is answered, `FAILED` with the reason otherwise. A later
//! change of a served domain's staple (fetched, revoked) is reported again. When the mesh
//! Watch brings a new CRL, every staple is fetched again at once.
//!
//! Keys travel inside the bundles only: nothing here logs an update or a bundle's key.

use super::super::client::status_message;
use super::{Agent, RPC_DEADLINE};
use anyhow::Result;
use futures::StreamExt;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use zonemesh_deploy::CertBundle;
use zonemesh_deploy::edge::Edge;
use zonemesh_proto as pb;

use pb::deployment_report::State;

/// The edge's 401/403 answers, as `http.auth_failure` events into the agent's event queue
/// (never waiting: a full queue drops and counts).
#[derive(Debug, Default)]
pub(super) struct AuthFailures(std::sync::OnceLock<super::super::logwatch::EventQueue>);

impl AuthFailures {
    pub(super) fn attach(&self, q: super::super::logwatch::EventQueue) {
        let _ = self.0.set(q);
    }
}

impl zonemesh_deploy::edge::AuthFailureHook for AuthFailures {
    fn auth_failure(&self, source: std::net::IpAddr, status: u16) {
        if let Some(q) = self.0.get() {
            let hit = super::super::logwatch::patterns::Hit {
                kind: "http.auth_failure",
                source,
                rule: if status == 401 {
                    "edge-401"
                } else {
                    "edge-403"
                },
            };
            q.offer(&hit, "edge");
        }
    }
}

/// Bundles of one update installed concurrently.
const INSTALLS_AT_ONCE: usize = 8;
/// Most domains whose last report is remembered (an edge serves at most this many).
const MAX_REMEMBERED: usize = zonemesh_deploy::edge::MAX_DOMAINS;

fn report(domain: &str, serial: &str, state: State, detail: String) -> pb::DeploymentReport {
    pb::DeploymentReport {
        domain: domain.into(),
        serial_hex: serial.into(),
        state: state as i32,
        detail,
        staple: String::new(),
        token: String::new(),
    }
}

/// Install one bundle and check that it is served; the report to send.
async fn install_and_check(edge: &Edge, bundle: CertBundle) -> pb::DeploymentReport {
    let domain = bundle.domain.clone();
    let announced = bundle.serial_hex.clone();
    let installed = match edge.install(bundle).await {
        Ok(i) => i,
        Err(e) => {
            tracing::warn!(domain = %domain, serial = %announced, error = %e, "certificate not installed");
            return report(&domain, &announced, State::Failed, e.to_string());
        }
    };
    if edge.https_addr().is_some() {
        match edge.probe(&domain).await {
            Ok(s) if s.serial_hex == installed.serial_hex => {}
            Ok(s) => {
                return report(
                    &domain,
                    &installed.serial_hex,
                    State::Failed,
                    format!(
                        "our HTTPS listener serves serial {}, not {}",
                        s.serial_hex, installed.serial_hex
                    ),
                );
            }
            Err(e) => return report(&domain, &installed.serial_hex, State::Failed, e.to_string()),
        }
    }
    tracing::info!(domain = %domain, serial = %installed.serial_hex, staple = %installed.staple, "serving");
    let mut r = report(
        &domain,
        &installed.serial_hex,
        State::Serving,
        String::new(),
    );
    r.staple = installed.staple.to_string();
    r
}

/// Apply one WatchEdge message to the edge; the reports to send, in order.
pub(super) async fn apply_update(edge: &Edge, u: pb::EdgeUpdate) -> Vec<pb::DeploymentReport> {
    let mut reports = Vec::new();
    if u.snapshot {
        // A snapshot replaces everything held.
        let keep: HashSet<&str> = u.certificates.iter().map(|c| c.domain.as_str()).collect();
        for d in edge.domains() {
            if !keep.contains(d.as_str()) {
                edge.remove(&d);
            }
        }
        edge.clear_challenges();
    }
    for d in &u.removed_domains {
        edge.remove(d);
    }
    for t in &u.cleared_tokens {
        edge.clear_challenge(t);
    }
    // Challenges first: an ACME server is waiting for them.
    for c in &u.challenges {
        let mut r = match edge.set_challenge(&c.domain, &c.token, &c.key_authorization) {
            Ok(()) => report(&c.domain, "", State::ChallengeReady, String::new()),
            Err(e) => report(&c.domain, "", State::Failed, e.to_string()),
        };
        r.token = c.token.clone();
        reports.push(r);
    }
    // One bundle per domain (the last one given), several installs at once: a snapshot
    // of many domains with a slow OCSP responder is not paid for one after the other.
    let mut last: HashMap<String, usize> = HashMap::new();
    for (i, c) in u.certificates.iter().enumerate() {
        last.insert(c.domain.clone(), i);
    }
    let bundles = u
        .certificates
        .into_iter()
        .enumerate()
        .filter(|(i, c)| last.get(&c.domain) == Some(i))
        .map(|(_, c)| CertBundle::from(c));
    let installed: Vec<_> = futures::stream::iter(bundles.map(|b| install_and_check(edge, b)))
        .buffered(INSTALLS_AT_ONCE)
        .collect()
        .await;
    reports.extend(installed);
    reports
}

/// Why a WatchEdge session ended without an error.
enum Ended {
    Shutdown,
    Renewed,
}

async fn send_report(agent: &Agent, shutdown: &CancellationToken, r: pb::DeploymentReport) {
    let mut rpc = agent.link.mesh();
    let (domain, state) = (r.domain.clone(), r.state);
    let call = async {
        rpc.report_deployment(r)
            .await
            .map_err(|s| anyhow::anyhow!("{}", status_message(&s)))
    };
    if let Err(e) = agent.rpc(shutdown, RPC_DEADLINE, call).await
        && !shutdown.is_cancelled()
    {
        tracing::warn!(domain = %domain, state, error = %e, "deployment report not delivered");
    }
}

async fn watch_edge_once(
    agent: &Agent,
    edge: &Edge,
    shutdown: &CancellationToken,
) -> Result<Ended> {
    let mut renewed = agent.link.generation();
    let mut rpc = agent.link.mesh();
    let hello = pb::EdgeHello {
        https: edge.https_addr().is_some(),
        files: edge.writes_files(),
    };
    let open = async {
        rpc.watch_edge(hello)
            .await
            .map_err(|s| anyhow::anyhow!("WatchEdge refused: {}", status_message(&s)))
    };
    let mut stream = match agent.rpc(shutdown, RPC_DEADLINE, open).await {
        Ok(s) => s.into_inner(),
        Err(_) if shutdown.is_cancelled() => return Ok(Ended::Shutdown),
        Err(e) => return Err(e),
    };
    tracing::info!("watching edge certificates");
    let mut status = edge.status();
    // What was last reported as served, per domain: (serial, staple).
    let mut served: HashMap<String, (String, String)> = HashMap::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(Ended::Shutdown),
            _ = renewed.changed() => return Ok(Ended::Renewed),
            m = stream.message() => {
                let update = match m {
                    Ok(Some(u)) => u,
                    Ok(None) => anyhow::bail!("controller ended the WatchEdge stream"),
                    Err(s) => anyhow::bail!("WatchEdge stream: {}", status_message(&s)),
                };
                for r in apply_update(edge, update).await {
                    if r.state == State::Serving as i32 {
                        if served.len() < MAX_REMEMBERED || served.contains_key(&r.domain) {
                            served.insert(r.domain.clone(), (r.serial_hex.clone(), r.staple.clone()));
                        }
                    } else if r.state == State::Failed as i32 && r.token.is_empty() {
                        served.remove(&r.domain);
                    }
                    send_report(agent, shutdown, r).await;
                }
                served.retain(|d, _| status.borrow().contains_key(d));
            }
            changed = status.changed() => {
                if changed.is_err() {
                    anyhow::bail!("the edge stopped");
                }
                // A staple fetched, refreshed into another state, or revoked: say so.
                let now = status.borrow_and_update().clone();
                for (domain, st) in now {
                    let staple = st.staple.to_string();
                    let Some((serial, last)) = served.get_mut(&domain) else { continue };
                    if *serial != st.serial_hex || *last == staple {
                        continue;
                    }
                    *last = staple.clone();
                    let mut r = report(&domain, &st.serial_hex, State::Serving, String::new());
                    r.staple = staple;
                    send_report(agent, shutdown, r).await;
                }
            }
        }
    }
}

/// Keep a WatchEdge stream open, reconnecting with backoff.
pub(super) async fn edge_loop(agent: Arc<Agent>, edge: Arc<Edge>, shutdown: CancellationToken) {
    let mut backoff = Duration::from_millis(500);
    while !shutdown.is_cancelled() {
        let started = Instant::now();
        match watch_edge_once(&agent, &edge, &shutdown).await {
            Ok(Ended::Shutdown) => return,
            Ok(Ended::Renewed) => {
                backoff = Duration::from_millis(500);
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "edge stream down; serving what is installed");
            }
        }
        if started.elapsed() > Duration::from_secs(30) {
            backoff = Duration::from_millis(500);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

/// Fetch every staple again whenever the mesh brings a new CRL (a revocation).
pub(super) async fn staple_refresh_loop(
    agent: Arc<Agent>,
    edge: Arc<Edge>,
    shutdown: CancellationToken,
) {
    let mut crl = agent.crl_changes.subscribe();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = crl.changed() => {
                if r.is_err() {
                    return;
                }
                tracing::info!("new CRL: refreshing every OCSP staple");
                edge.refresh_staples();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::OnceLock;
    use std::time::SystemTime;
    use zonemesh_deploy::edge::{EdgeConfig, StapleState};
    use zonemesh_deploy::files::FilesConfig;

    fn ca() -> &'static zonemesh_ca::Ca {
        static CA: OnceLock<zonemesh_ca::Ca> = OnceLock::new();
        CA.get_or_init(|| {
            let m = zonemesh_ca::CaMaterial::generate("edge.test", SystemTime::now(), |_| {})
                .expect("CA");
            zonemesh_ca::Ca::from_material(&m).expect("CA")
        })
    }

    fn leaf_keys() -> &'static [zonemesh_ca::KeyPair] {
        static KEYS: OnceLock<Vec<zonemesh_ca::KeyPair>> = OnceLock::new();
        KEYS.get_or_init(|| {
            (0..2)
                .map(|_| zonemesh_ca::generate_rsa_2048().expect("key"))
                .collect()
        })
    }

    fn cert(domain: &str, key: usize) -> pb::DomainCertificate {
        let k = &leaf_keys()[key];
        let issued = ca()
            .issue_tls(
                &zonemesh_ca::TlsPolicy::default(),
                k,
                &zonemesh_ca::TlsNames {
                    dns: vec![domain.into()],
                    ips: vec![],
                },
                None,
                SystemTime::now(),
            )
            .expect("issue");
        pb::DomainCertificate {
            domain: domain.into(),
            chain_der: vec![issued.der, ca().intermediate_der().to_vec()],
            key_pkcs8_der: k.serialize_der(),
            serial_hex: issued.serial_hex,
            not_after_unix: zonemesh_ca::unix_secs(issued.not_after),
        }
    }

    fn state(r: &pb::DeploymentReport) -> State {
        State::try_from(r.state).unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn updates_are_installed_checked_and_reported() {
        let stop = CancellationToken::new();
        let edge = Edge::start(
            EdgeConfig {
                https: Some("127.0.0.1:0".parse().unwrap()),
                http: Some("127.0.0.1:0".parse().unwrap()),
                // Never dialled here.
                upstream: Some("http://127.0.0.1:9".into()),
                ..Default::default()
            },
            stop.clone(),
        )
        .await
        .unwrap();
        let a = cert("a.portal.test", 0);
        let snapshot = pb::EdgeUpdate {
            snapshot: true,
            certificates: vec![a.clone()],
            challenges: vec![pb::Challenge {
                domain: "b.portal.test".into(),
                token: "tok1".into(),
                key_authorization: "tok1.thumb".into(),
            }],
            ..Default::default()
        };
        let reports = apply_update(&edge, snapshot).await;
        assert_eq!(reports.len(), 2, "{reports:?}");
        assert_eq!(state(&reports[0]), State::ChallengeReady);
        assert_eq!(reports[0].token, "tok1");
        assert_eq!(state(&reports[1]), State::Serving, "{}", reports[1].detail);
        assert_eq!(reports[1].serial_hex, a.serial_hex);
        // Our certificates carry no OCSP URL yet: served unstapled, and said so.
        assert_eq!(reports[1].staple, StapleState::NoResponder.to_string());
        assert_eq!(
            edge.probe("a.portal.test").await.unwrap().serial_hex,
            a.serial_hex
        );

        // A renewal, a bad bundle and a cleared token in one change.
        let a2 = cert("a.portal.test", 1);
        let mut bad = cert("c.portal.test", 0);
        bad.key_pkcs8_der = leaf_keys()[1].serialize_der();
        let reports = apply_update(
            &edge,
            pb::EdgeUpdate {
                certificates: vec![a2.clone(), bad],
                cleared_tokens: vec!["tok1".into()],
                ..Default::default()
            },
        )
        .await;
        assert_eq!(state(&reports[0]), State::Serving);
        assert_eq!(reports[0].serial_hex, a2.serial_hex);
        assert_eq!(state(&reports[1]), State::Failed);
        assert!(
            reports[1].detail.contains("private key"),
            "{}",
            reports[1].detail
        );
        assert!(!format!("{reports:?}").contains("PRIVATE"));

        // A snapshot without the domain: no longer served.
        let reports = apply_update(
            &edge,
            pb::EdgeUpdate {
                snapshot: true,
                ..Default::default()
            },
        )
        .await;
        assert!(reports.is_empty());
        assert!(edge.domains().is_empty());
        assert!(edge.probe("a.portal.test").await.is_err());
        stop.cancel();
        edge.join().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_files_only_edge_reports_serving_after_the_reload() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("reloaded");
        let stop = CancellationToken::new();
        let edge = Edge::start(
            EdgeConfig {
                files: Some(FilesConfig {
                    dir: dir.path().into(),
                    reload: Some(format!("touch '{}'", marker.display())),
                }),
                ..Default::default()
            },
            stop.clone(),
        )
        .await
        .unwrap();
        let a = cert("files.portal.test", 0);
        let reports = apply_update(
            &edge,
            pb::EdgeUpdate {
                snapshot: true,
                certificates: vec![a.clone()],
                ..Default::default()
            },
        )
        .await;
        assert_eq!(state(&reports[0]), State::Serving, "{}", reports[0].detail);
        assert!(marker.exists());
        assert!(dir.path().join("files.portal.test/privkey.pem").exists());
        stop.cancel();
        edge.join().await;
    }
}
