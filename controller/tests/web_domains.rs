//! The Domains page and the one-click endpoint over real HTTPS: CSRF, `202` with the job
//! at once, a second press joins it, another owner's domain is `403` with nothing done,
//! an unknown domain is `404`; the page lists only the owner's domains and loads its
//! script from a file the CSP allows.

mod web_common;

use std::sync::Arc;
use std::time::SystemTime;
use web_common::Server;
use zonemesh_ca::{CaMaterial, Kek};
use zonemesh_controller::auth::Role;
use zonemesh_controller::authority::Authority;
use zonemesh_controller::domains::{Domains, DomainsConfig, IssuerKind};
use zonemesh_controller::store::{Store, ZoneRecord, encode};

const ALICE: &str = "alice@example.com";
const BOB: &str = "bob@example.com";
const PASS: &str = "a long enough passphrase";
const DOMAIN: &str = "portal.alice.test";

/// Domains on a store of their own (the job runner is not started: jobs stay pending, so
/// joining is deterministic).
fn domains(dir: &std::path::Path) -> Arc<Domains> {
    let store = Store::open(&dir.join("domains-db")).unwrap();
    let kek = Kek::generate();
    let m = CaMaterial::generate("web.domains.test", SystemTime::now(), |_| {}).unwrap();
    Authority::install(&store, &kek, &m).unwrap();
    let auth = Arc::new(Authority::load(store.clone(), &kek, SystemTime::now()).unwrap());
    let zone = ZoneRecord {
        name: "eu".into(),
        cidr: "100.64.1.0/24".parse().unwrap(),
        intra_zone_tunnels: false,
        created_unix: 0,
    };
    store.zones.insert("eu", encode(&zone)).unwrap();
    let d = Domains::new(
        auth,
        &kek,
        DomainsConfig::new("http://127.0.0.1:9/ocsp"),
        None,
    )
    .unwrap();
    d.add(DOMAIN, IssuerKind::Internal, ALICE, &["eu".into()], "cli")
        .unwrap();
    d.add(
        "portal.bob.test",
        IssuerKind::Acme,
        BOB,
        &["eu".into()],
        "cli",
    )
    .unwrap();
    d
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_endpoint_checks_csrf_answers_202_joins_and_refuses_other_owners() {
    let server = Server::start(|_| {}).await;
    for who in [ALICE, BOB] {
        server
            .state
            .users()
            .add_user(who, Role::PortalOwner, PASS)
            .unwrap();
    }
    let d = domains(server.dir.path());
    server.state.attach_domains(d.clone());
    let mut alice = server.client("127.0.0.3");
    let mut bob = server.client("127.0.0.4");
    assert_eq!(
        alice.sign_in(ALICE, PASS).await.location(),
        Some("/dashboard")
    );
    assert_eq!(bob.sign_in(BOB, PASS).await.location(), Some("/dashboard"));

    // The page: only her domain, the button, the script as a file.
    let page = alice.get("/domains").await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(page.body.contains(DOMAIN) && !page.body.contains("portal.bob.test"));
    assert!(page.body.contains("Deploy Certificate"));
    assert!(
        page.body
            .contains(r#"<script src="/static/domains.js"></script>"#)
    );
    let csp = page.header("content-security-policy").unwrap();
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
        "{csp}"
    );
    let js = alice.get("/static/domains.js").await;
    assert_eq!(js.status, 200);
    assert!(
        js.header("content-type")
            .unwrap()
            .starts_with("text/javascript")
    );
    assert!(js.body.contains("x-csrf-token") && js.body.contains("/api/domains/"));
    let csrf = page.csrf();

    let path = format!("/api/domains/{DOMAIN}/deploy-certificate");
    // Without the CSRF token: refused, nothing started.
    let r = alice.post(&path, &[("csrf", "forged")]).await;
    assert_eq!(r.status, 403);
    assert!(
        d.detail(DOMAIN).unwrap().job.is_none(),
        "no job after a forged press"
    );

    // With it: 202 and the job at once; a second press joins it.
    let r = alice.post(&path, &[("csrf", &csrf)]).await;
    assert_eq!(r.status, 202, "{}", r.body);
    let first = json(&r.body);
    assert_eq!(first["state"], "pending");
    let job = first["job"].as_u64().unwrap();
    let r = alice.post(&path, &[("csrf", &csrf)]).await;
    assert_eq!(r.status, 202);
    assert_eq!(json(&r.body)["job"].as_u64(), Some(job), "joined");

    // The page follows the job here.
    let r = alice.get(&format!("/api/domains/{DOMAIN}")).await;
    assert_eq!(r.status, 200);
    let v = json(&r.body);
    assert_eq!(v["name"], DOMAIN);
    assert_eq!(v["issuer"], "internal");
    assert_eq!(v["owner"], ALICE);
    assert_eq!(v["job"]["id"].as_u64(), Some(job));
    assert_eq!(v["job"]["state"], "pending");
    assert!(v["edges_total"].is_u64() && v.get("staple").is_some());

    // Bob: 403 on Alice's domain and nothing happens; he never sees it.
    let bob_csrf = bob.get("/domains").await.csrf();
    let r = bob.post(&path, &[("csrf", &bob_csrf)]).await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(d.detail(DOMAIN).unwrap().job.unwrap().id, job, "no new job");
    assert_eq!(bob.get(&format!("/api/domains/{DOMAIN}")).await.status, 403);
    let denied =
        server.audit.list(None).unwrap().into_iter().any(|r| {
            r.event.kind == "domain.deploy_denied" && r.event.actor.as_deref() == Some(BOB)
        });
    assert!(denied, "the refusal is audited");
    // His own domain works for him.
    let r = bob
        .post(
            "/api/domains/portal.bob.test/deploy-certificate",
            &[("csrf", &bob_csrf)],
        )
        .await;
    assert_eq!(r.status, 202);

    // Unknown domains: 404.
    let r = alice
        .post(
            "/api/domains/nope.example.test/deploy-certificate",
            &[("csrf", &csrf)],
        )
        .await;
    assert_eq!(r.status, 404);
    assert_eq!(
        alice.get("/api/domains/nope.example.test").await.status,
        404
    );

    // A portal owner may add an acme domain of her own, never an internal one.
    let add = |issuer: &'static str, name: &'static str| {
        let csrf = csrf.clone();
        (issuer, name, csrf)
    };
    let (issuer, name, c) = add("internal", "inside.alice.test");
    let r = alice
        .post(
            "/domains",
            &[
                ("csrf", &c),
                ("name", name),
                ("issuer", issuer),
                ("zones", "eu"),
            ],
        )
        .await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(r.body.contains("Only an administrator"), "{}", r.body);
    assert!(d.detail(name).is_err(), "not added");
    let (issuer, name, c) = add("acme", "shop.alice.test");
    let r = alice
        .post(
            "/domains",
            &[
                ("csrf", &c),
                ("name", name),
                ("issuer", issuer),
                ("owner", BOB),
                ("zones", "eu"),
            ],
        )
        .await;
    assert!(
        r.status == 303 || r.status == 302,
        "{} {}",
        r.status,
        r.body
    );
    let added = d.detail(name).unwrap().domain;
    assert_eq!(
        added.owner, ALICE,
        "a portal owner's domain is hers, whatever the form says"
    );
    assert_eq!(added.issuer, IssuerKind::Acme);
    let r = alice
        .post(
            "/domains",
            &[
                ("csrf", "forged"),
                ("name", "x.alice.test"),
                ("issuer", "acme"),
                ("zones", "eu"),
            ],
        )
        .await;
    assert_eq!(r.status, 403);
    assert!(d.detail("x.alice.test").is_err());

    // Signed out: sent to sign in, nothing started.
    let mut stranger = server.client("127.0.0.5");
    let r = stranger.post(&path, &[("csrf", &csrf)]).await;
    assert_ne!(r.status, 202);
    server.stop().await;
}
