//! Password change by a signed-in user over real HTTPS: NIST rules, the current password
//! checked, CSRF, every other session of the user ended, audited.

mod web_common;

use web_common::Server;
use zonemesh_controller::auth::Role;

const EMAIL: &str = "owner@example.com";
const OLD: &str = "the old long passphrase";
const NEW: &str = "a brand new passphrase";

async fn change(
    c: &mut web_common::Client,
    csrf: &str,
    current: &str,
    new: &str,
    confirm: &str,
) -> web_common::Resp {
    c.post(
        "/account/password",
        &[
            ("csrf", csrf),
            ("current", current),
            ("new", new),
            ("confirm", confirm),
        ],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_change_ends_other_sessions_and_is_audited() {
    let server = Server::start(|_| {}).await;
    server
        .state
        .users()
        .add_user(EMAIL, Role::PortalOwner, OLD)
        .unwrap();
    server
        .state
        .users()
        .add_user("bystander@example.com", Role::PortalOwner, OLD)
        .unwrap();
    let mut laptop = server.client("127.0.0.3");
    let mut phone = server.client("127.0.0.4");
    let mut bystander = server.client("127.0.0.5");
    for (c, who) in [
        (&mut laptop, EMAIL),
        (&mut phone, EMAIL),
        (&mut bystander, "bystander@example.com"),
    ] {
        assert_eq!(c.sign_in(who, OLD).await.location(), Some("/dashboard"));
    }
    let page = laptop.get("/dashboard").await;
    assert!(
        page.body.contains("/account/password"),
        "linked from every page"
    );
    let page = laptop.get("/account/password").await;
    assert_eq!(page.status, 200);
    let csrf = page.csrf();
    // Refused: weak new passwords (NIST rules), confirmation differs, wrong current
    // password, no CSRF token, no session.
    for weak in ["short", "password1", "owner@example.com"] {
        let r = change(&mut laptop, &csrf, OLD, weak, weak).await;
        assert_eq!(r.status, 400, "{weak}: {}", r.body);
    }
    assert_eq!(
        change(&mut laptop, &csrf, OLD, NEW, "a brand new passphrasE")
            .await
            .status,
        400
    );
    let r = change(&mut laptop, &csrf, "not the password", NEW, NEW).await;
    assert_eq!(r.status, 401, "{}", r.body);
    let r = laptop
        .post(
            "/account/password",
            &[
                ("csrf", "forged"),
                ("current", OLD),
                ("new", NEW),
                ("confirm", NEW),
            ],
        )
        .await;
    assert_eq!(r.status, 403);
    let mut anonymous = server.client("127.0.0.6");
    let r = change(&mut anonymous, &csrf, OLD, NEW, NEW).await;
    assert_eq!(r.location(), Some("/signin"));
    // Nothing changed so far: the phone's session lives and the old password works.
    assert_eq!(phone.get("/dashboard").await.status, 200);

    let r = change(&mut laptop, &csrf, OLD, NEW, NEW).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("password was changed"), "{}", r.body);
    // This session goes on; the user's other session ended; other users are untouched.
    assert_eq!(laptop.get("/dashboard").await.status, 200);
    assert_eq!(phone.get("/dashboard").await.location(), Some("/signin"));
    assert_eq!(bystander.get("/dashboard").await.status, 200);
    // The old password stops working, the new one works.
    let mut again = server.client("127.0.0.3");
    assert_eq!(again.sign_in(EMAIL, OLD).await.status, 401);
    assert_eq!(
        again.sign_in(EMAIL, NEW).await.location(),
        Some("/dashboard")
    );

    let audit = server.audit.list(None).unwrap();
    let rec = audit
        .iter()
        .find(|r| r.event.kind == "user.password-changed")
        .expect("audited");
    assert_eq!(rec.event.actor.as_deref(), Some(EMAIL));
    assert_eq!(rec.event.source.unwrap().to_string(), "127.0.0.3");
    assert!(
        audit
            .iter()
            .any(|r| r.event.kind == "user.password-change-failure"),
        "the wrong current password is audited"
    );
    // No password in the audit log.
    let all = serde_json::to_string(&audit).unwrap();
    assert!(!all.contains(NEW) && !all.contains(OLD));
    server.stop().await;
}
