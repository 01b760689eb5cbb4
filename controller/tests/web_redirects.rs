//! Where each route sends each kind of session, over real HTTPS: every (route, session
//! kind or none) answers with the route's page (or, for a form sent with a wrong CSRF
//! token, the refusal that only a served visitor reaches) or with the redirect of the one
//! session table.

mod web_common;

use std::time::SystemTime;

use web_common::Server;
use zonemesh_controller::auth::{Role, SessionKind};
use zonemesh_controller::web::SESSION_COOKIE;

const EMAIL: &str = "admin@example.com";

/// Served: the page itself (GET), or the CSRF refusal past the session check (POST).
const PASS: Option<&str> = None;

/// A route (method, path, form fields) and where it sends no session, a full session, a
/// pending second factor and a pending enrollment.
type Row<'a> = (
    &'a str,
    &'a str,
    &'a [(&'a str, &'a str)],
    [Option<&'a str>; 4],
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_sends_every_session_kind_where_it_did() {
    let server = Server::start(|_| {}).await;
    server
        .state
        .users()
        .add_user(EMAIL, Role::Admin, "a long enough passphrase")
        .unwrap();
    let code = [("csrf", "wrong"), ("code", "000000")];
    let password = [
        ("csrf", "wrong"),
        ("current", "x"),
        ("new", "y"),
        ("confirm", "y"),
    ];
    // (method, path, form, [no session, full, pending second factor, pending enrollment])
    let zone = [("csrf", "wrong"), ("name", "z"), ("cidr", "100.64.9.0/24")];
    let table: [Row; 11] = [
        (
            "GET",
            "/",
            &[],
            [
                Some("/signin"),
                Some("/dashboard"),
                Some("/signin"),
                Some("/signin"),
            ],
        ),
        (
            "GET",
            "/signin",
            &[],
            [
                PASS,
                Some("/dashboard"),
                Some("/signin/code"),
                Some("/enroll"),
            ],
        ),
        (
            "GET",
            "/signin/code",
            &[],
            [Some("/signin"), Some("/dashboard"), PASS, Some("/signin")],
        ),
        (
            "POST",
            "/signin/code",
            &code,
            [Some("/signin"), Some("/signin"), PASS, Some("/signin")],
        ),
        (
            "GET",
            "/enroll",
            &[],
            [Some("/signin"), PASS, Some("/signin/code"), PASS],
        ),
        (
            "POST",
            "/enroll",
            &code,
            [Some("/signin"), PASS, Some("/signin"), PASS],
        ),
        (
            "GET",
            "/dashboard",
            &[],
            [Some("/signin"), PASS, Some("/signin/code"), Some("/enroll")],
        ),
        (
            "GET",
            "/account/password",
            &[],
            [Some("/signin"), PASS, Some("/signin/code"), Some("/enroll")],
        ),
        (
            "POST",
            "/account/password",
            &password,
            [Some("/signin"), PASS, Some("/signin/code"), Some("/enroll")],
        ),
        (
            "GET",
            "/admin",
            &[],
            [Some("/signin"), PASS, Some("/signin/code"), Some("/enroll")],
        ),
        (
            "POST",
            "/admin/zones",
            &zone,
            [Some("/signin"), PASS, Some("/signin/code"), Some("/enroll")],
        ),
    ];
    let kinds = [
        None,
        Some(SessionKind::Full),
        Some(SessionKind::PendingSecondFactor),
        Some(SessionKind::PendingEnrollment),
    ];
    for (method, path, form, want) in table {
        for (kind, want) in kinds.into_iter().zip(want) {
            let mut c = server.client("127.0.0.7");
            if let Some(kind) = kind {
                let token = server
                    .state
                    .sessions()
                    .create(EMAIL, Role::Admin, kind, SystemTime::now())
                    .unwrap();
                c.cookies.insert(SESSION_COOKIE.into(), token.to_string());
            }
            let r = if method == "GET" {
                c.get(path).await
            } else {
                c.post(path, form).await
            };
            let what = format!("{method} {path} with {kind:?}");
            match want {
                Some(to) => {
                    assert_eq!(r.status, 303, "{what}: {}", r.body);
                    assert_eq!(r.location(), Some(to), "{what}");
                }
                None if method == "GET" => assert_eq!(r.status, 200, "{what}: {:?}", r.location()),
                None => assert_eq!(r.status, 403, "{what}: {:?}", r.location()),
            }
        }
    }
    server.stop().await;
}
