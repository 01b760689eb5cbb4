//! Sign-in over real HTTPS: passwords, TOTP from oathtool, mandatory admin 2FA, CSRF,
//! headers, and no secret at rest or in the logs.

mod web_common;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use web_common::{Server, have, oathtool, secret_of};
use zonemesh_controller::auth::{
    AuthError, PasswordCheck, PasswordRejected, Pepper, Role, UserStore, WebConfig,
};
use zonemesh_controller::web::SESSION_COOKIE;

const ADMIN: &str = "root@example.com";
const ADMIN_PW: &str = "staple horse battery correct 42";

/// Everything the process logs, at trace level.
fn logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        struct W(Arc<Mutex<Vec<u8>>>);
        impl Write for W {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let b = buf.clone();
        let sub = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || W(b.clone()))
            .finish();
        tracing::subscriber::set_global_default(sub).unwrap();
        buf
    })
    .clone()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

fn base32_decode(s: &str) -> Vec<u8> {
    let mut bits = 0u64;
    let mut n = 0;
    let mut out = vec![];
    for c in s.trim_end_matches('=').chars() {
        let v = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
            .find(c.to_ascii_uppercase())
            .unwrap() as u64;
        bits = (bits << 5) | v;
        n += 5;
        if n >= 8 {
            out.push((bits >> (n - 8)) as u8);
            n -= 8;
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_needs_totp_codes_from_oathtool_and_nothing_secret_is_stored_or_logged() {
    let logs = logs();
    if !have("oathtool") {
        eprintln!("skipped: oathtool is not installed");
        return;
    }
    let server = Server::start(|_| {}).await;
    let added = server
        .state
        .users()
        .add_user(ADMIN, Role::Admin, ADMIN_PW)
        .unwrap();
    let uri = added.otpauth_uri.clone().unwrap();
    let secret = secret_of(&uri);
    let mut needles_extra: Vec<(String, Vec<u8>)> = vec![];
    assert!(added.qr_terminal.as_deref().unwrap().lines().count() > 10);

    // Right password, no confirmed second factor: only the enrollment page, no session.
    let mut c = server.client("127.0.0.5");
    let r = c.sign_in(ADMIN, ADMIN_PW).await;
    assert_eq!(
        (r.status, r.location()),
        (303, Some("/enroll")),
        "{}",
        r.body
    );
    let pending_cookie = c
        .cookies
        .get(SESSION_COOKIE)
        .cloned()
        .expect("pending cookie");
    let r = c.get("/dashboard").await;
    assert_eq!(
        (r.status, r.location()),
        (303, Some("/enroll")),
        "an admin without TOTP must not see the dashboard"
    );
    let r = c.get("/signin/code").await;
    assert_ne!(r.status, 200);

    let page = c.get("/enroll").await;
    assert_eq!(page.status, 200);
    assert!(page.body.contains("<svg"), "QR code on the page");
    let shown = page
        .body
        .split("<code id=\"secret\">")
        .nth(1)
        .unwrap()
        .split('<')
        .next()
        .unwrap();
    assert_eq!(shown, secret, "the page shows the secret the CLI printed");
    let csrf = page.csrf();
    let now = SystemTime::now();
    let wrong = oathtool(&secret, Some(now - Duration::from_secs(300)));
    let r = c
        .post("/enroll", &[("csrf", &csrf), ("code", &wrong)])
        .await;
    assert_eq!(r.status, 401, "a stale code does not confirm");
    let code = oathtool(&secret, None);
    let r = c.post("/enroll", &[("csrf", &csrf), ("code", &code)]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let recovery: Vec<String> = r
        .body
        .split("id=\"recovery-codes\">")
        .nth(1)
        .unwrap()
        .split("</ul>")
        .next()
        .unwrap()
        .split("<li>")
        .filter_map(|x| x.split("</li>").next())
        .filter(|x| !x.is_empty())
        .map(String::from)
        .collect();
    assert_eq!(recovery.len(), 10, "{}", r.body);
    let session_cookie = c.cookies.get(SESSION_COOKIE).cloned().unwrap();
    assert_ne!(
        session_cookie, pending_cookie,
        "a new token after the second factor"
    );
    let dash = c.get("/dashboard").await;
    assert_eq!(dash.status, 200);
    assert!(
        dash.body.contains("db-1") && dash.body.contains("fra1") && dash.body.contains("revoked")
    );

    // Sign out, then in again: TOTP now asked for; the enrollment code does not work twice.
    let r = c.post("/signout", &[("csrf", &dash.csrf())]).await;
    assert_eq!((r.status, r.location()), (303, Some("/signin")));
    assert_eq!(c.get("/dashboard").await.location(), Some("/signin"));
    let r = c.sign_in(ADMIN, ADMIN_PW).await;
    assert_eq!(r.location(), Some("/signin/code"));
    assert_eq!(c.get("/dashboard").await.location(), Some("/signin/code"));
    let page = c.get("/signin/code").await;
    let csrf = page.csrf();
    let r = c
        .post("/signin/code", &[("csrf", &csrf), ("code", &code)])
        .await;
    assert_eq!(r.status, 401, "the same code is accepted at most once");
    let next = oathtool(&secret, Some(SystemTime::now() + Duration::from_secs(30)));
    let r = c
        .post("/signin/code", &[("csrf", &csrf), ("code", &next)])
        .await;
    assert_eq!(
        (r.status, r.location()),
        (303, Some("/dashboard")),
        "{}",
        r.body
    );
    assert_eq!(c.get("/dashboard").await.status, 200);
    // A recovery code works once in place of a TOTP code.
    let dash = c.get("/dashboard").await;
    c.post("/signout", &[("csrf", &dash.csrf())]).await;
    assert_eq!(
        c.sign_in(ADMIN, ADMIN_PW).await.location(),
        Some("/signin/code")
    );
    let csrf = c.get("/signin/code").await.csrf();
    let r = c
        .post("/signin/code", &[("csrf", &csrf), ("code", &recovery[3])])
        .await;
    assert_eq!(r.location(), Some("/dashboard"), "recovery code accepted");
    c.sign_in(ADMIN, ADMIN_PW).await;
    let csrf = c.get("/signin/code").await.csrf();
    let r = c
        .post("/signin/code", &[("csrf", &csrf), ("code", &recovery[3])])
        .await;
    assert_eq!(r.status, 401, "a recovery code works once");
    for (i, rc) in recovery.iter().enumerate() {
        needles_extra.push((format!("recovery code {i}"), rc.as_bytes().to_vec()));
    }
    let tokens: Vec<String> = vec![
        pending_cookie,
        session_cookie,
        c.cookies.get(SESSION_COOKIE).cloned().unwrap(),
    ];

    // A portal owner too, and some failures, so the logs and the store have seen everything.
    let owner_pw = "Über sichere Passphrase mit Leerzeichen ✓";
    server
        .state
        .users()
        .add_user("owner@example.com", Role::PortalOwner, owner_pw)
        .unwrap();
    let mut o = server.client("127.0.0.6");
    assert_eq!(
        o.sign_in("owner@example.com", owner_pw).await.location(),
        Some("/dashboard")
    );
    assert_eq!(
        o.sign_in(
            "owner@example.com",
            "Über sichere Passphrase mit Leerzeichen ✗"
        )
        .await
        .status,
        401
    );

    let kinds: Vec<String> = server
        .audit
        .list(None)
        .unwrap()
        .into_iter()
        .map(|r| r.event.kind)
        .collect();
    for k in [
        "signin.password",
        "totp.enroll-failure",
        "totp.enrolled",
        "signin.success",
        "signout",
        "signin.second-factor-failure",
        "signin.failure",
    ] {
        assert!(kinds.iter().any(|x| x == k), "audit has {k}: {kinds:?}");
    }
    assert!(
        server
            .state
            .metrics()
            .render_prometheus()
            .contains("zonemesh_signin_failure_total 1")
    );

    // Nothing secret in the data directory or the logs.
    let secret_raw = base32_decode(&secret);
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut needles: Vec<(String, Vec<u8>)> = vec![
        ("admin password".into(), ADMIN_PW.as_bytes().to_vec()),
        ("owner password".into(), owner_pw.as_bytes().to_vec()),
        ("pepper".into(), server.pepper.bytes.to_vec()),
        (
            "pepper b64".into(),
            b64.encode(&server.pepper.bytes[..]).into_bytes(),
        ),
        (
            "pepper encoded".into(),
            server.pepper.encode().as_bytes().to_vec(),
        ),
        ("TOTP secret".into(), secret_raw.clone()),
        ("TOTP secret b32".into(), secret.as_bytes().to_vec()),
        (
            "TOTP secret b64".into(),
            b64.encode(&secret_raw).into_bytes(),
        ),
    ];
    needles.extend(needles_extra);
    for (i, t) in tokens.iter().enumerate() {
        needles.push((format!("session token {i}"), t.as_bytes().to_vec()));
    }
    let files = server.data_bytes();
    assert!(!files.is_empty());
    let log_bytes = logs.lock().unwrap().clone();
    assert!(!log_bytes.is_empty(), "logs were captured");
    for (what, needle) in &needles {
        for (path, bytes) in &files {
            assert!(
                !contains(bytes, needle),
                "{what} found in {}",
                path.display()
            );
        }
        assert!(!contains(&log_bytes, needle), "{what} found in the logs");
    }

    // With another pepper no hash verifies.
    let dir = server.dir.path().join("db");
    let Server {
        state,
        audit,
        db,
        shutdown,
        task,
        dir: tmp,
        ..
    } = server;
    shutdown.cancel();
    let _ = task.await;
    drop((state, audit, db));
    // sled's background flusher lets go of the file lock a moment after the last handle.
    let db = {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match zonemesh_controller::kv::Kv::sled(&dir) {
                Ok(db) => break db,
                Err(_) if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                Err(e) => panic!("reopening the store: {e}"),
            }
        }
    };
    let wrong = UserStore::open(&db, &WebConfig::new(Pepper::generate(1))).unwrap();
    for (email, pw) in [(ADMIN, ADMIN_PW), ("owner@example.com", owner_pw)] {
        let r = wrong
            .check_password(email, zeroize::Zeroizing::new(pw.to_string()))
            .await
            .unwrap();
        assert_eq!(
            r,
            PasswordCheck::Mismatch,
            "{email} must not verify under a different pepper"
        );
    }
    drop(tmp);
}

#[tokio::test]
async fn oathtool_codes_skew_and_replay() {
    if !have("oathtool") {
        eprintln!("skipped: oathtool is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let db = zonemesh_controller::kv::Kv::sled(dir.path()).unwrap();
    let users = UserStore::open(&db, &WebConfig::new(Pepper::generate(1))).unwrap();
    // T sits 10 s into a step.
    let t = UNIX_EPOCH + Duration::from_secs(1_800_000_000 / 30 * 30 + 10);
    let s = |d: i64| {
        if d >= 0 {
            t + Duration::from_secs(d as u64)
        } else {
            t - Duration::from_secs((-d) as u64)
        }
    };
    let add = |name: &str, confirm_at: SystemTime| {
        let email = format!("{name}@example.com");
        let uri = users
            .add_user(&email, Role::Admin, "a perfectly fine passphrase")
            .unwrap()
            .otpauth_uri
            .unwrap();
        let secret = secret_of(&uri);
        let code = oathtool(&secret, Some(confirm_at));
        assert!(
            users
                .confirm_totp(&email, &code, confirm_at)
                .unwrap()
                .is_some(),
            "oathtool's code confirms enrollment"
        );
        (email, secret)
    };

    // Same code twice: refused the second time; +1 step accepted, +2 refused.
    let (a, sa) = add("a", t);
    let now_code = oathtool(&sa, Some(t));
    assert!(
        !users.verify_second_factor(&a, &now_code, t).unwrap(),
        "a code is accepted at most once"
    );
    assert!(
        users
            .verify_second_factor(&a, &oathtool(&sa, Some(s(30))), t)
            .unwrap(),
        "+1 step accepted"
    );
    assert!(
        !users
            .verify_second_factor(&a, &oathtool(&sa, Some(s(60))), t)
            .unwrap(),
        "+2 steps refused"
    );

    // -1 step accepted, -2 refused (on accounts whose last used step is older).
    let (b, sb) = add("b", s(-300));
    assert!(
        users
            .verify_second_factor(&b, &oathtool(&sb, Some(s(-30))), t)
            .unwrap(),
        "-1 step accepted"
    );
    let (c, sc) = add("c", s(-300));
    assert!(
        !users
            .verify_second_factor(&c, &oathtool(&sc, Some(s(-60))), t)
            .unwrap(),
        "-2 steps refused"
    );
    // The current code still works for c, once.
    let cc = oathtool(&sc, Some(t));
    assert!(users.verify_second_factor(&c, &cc, t).unwrap());
    assert!(
        !users
            .verify_second_factor(&c, &cc, t + Duration::from_secs(5))
            .unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_unicode_password_and_nist_rules() {
    let server = Server::start(|_| {}).await;
    let users = server.state.users();
    let pw: String =
        "Grüße aus Zürich — 東京 の 夜景 and a lot of plain words to make it long enough "
            .chars()
            .cycle()
            .take(100)
            .collect();
    assert_eq!(pw.chars().count(), 100);
    assert!(pw.contains(' ') && !pw.is_ascii());
    let pw = format!("{}x", &pw.chars().take(99).collect::<String>());
    users
        .add_user("long@example.com", Role::PortalOwner, &pw)
        .unwrap();
    let mut c = server.client("127.0.0.7");
    let r = c.sign_in("long@example.com", &pw).await;
    assert_eq!(
        (r.status, r.location()),
        (303, Some("/dashboard")),
        "{}",
        r.body
    );
    let changed = format!("{}y", &pw.chars().take(99).collect::<String>());
    let r = c.sign_in("long@example.com", &changed).await;
    assert_eq!(
        r.status, 401,
        "changing the last of 100 characters fails: nothing is truncated"
    );
    // A longer one with the same 100-character prefix is a different password too.
    let r = c.sign_in("long@example.com", &format!("{pw}!")).await;
    assert_eq!(r.status, 401);

    match users.add_user("short@example.com", Role::PortalOwner, "7chars!") {
        Err(AuthError::WeakPassword(PasswordRejected::TooShort)) => {}
        other => panic!("7 characters must be refused: {other:?}"),
    }
    for common in ["password123", "qwertyuiop", "iloveyou1", "Football"] {
        match users.add_user("common@example.com", Role::PortalOwner, common) {
            Err(e @ AuthError::WeakPassword(PasswordRejected::Common)) => {
                assert!(e.to_string().contains("commonly used"), "reason given: {e}")
            }
            other => panic!("{common} must be refused as common: {other:?}"),
        }
    }
    // 8 characters, spaces, and 64+ characters are all fine; no composition rules.
    users
        .add_user("eight@example.com", Role::PortalOwner, "zqx vbnm")
        .unwrap();
    users
        .add_user(
            "long2@example.com",
            Role::PortalOwner,
            &"lowercase only words ".repeat(10),
        )
        .unwrap();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_account_gets_the_same_answer_and_timing() {
    let server = Server::start(|c| {
        c.throttle.free_failures = 1000;
        c.throttle.block_after_failures = 1000;
    })
    .await;
    server
        .state
        .users()
        .add_user(
            "real@example.com",
            Role::PortalOwner,
            "the real passphrase here",
        )
        .unwrap();
    let mut c = server.client("127.0.0.8");
    let strip = |b: &str| {
        b.split("name=\"csrf\" value=\"")
            .map(|p| p.split_once('"').map(|x| x.1).unwrap_or(p))
            .collect::<Vec<_>>()
            .join("")
    };
    let mut t_known = vec![];
    let mut t_unknown = vec![];
    let mut bodies = vec![];
    let mut raw = vec![];
    for i in 0..10 {
        // One Argon2id run, measured under the same load, is the floor for both answers.
        let t = Instant::now();
        server
            .state
            .users()
            .hasher()
            .hash("x@example.com", "some password")
            .unwrap();
        raw.push(t.elapsed().as_secs_f64());
        for (email, times) in [
            ("real@example.com", &mut t_known),
            (&*format!("ghost{i}@example.com"), &mut t_unknown),
        ] {
            let page = c.get("/signin").await;
            let csrf = page.csrf();
            let start = Instant::now();
            let r = c
                .post(
                    "/signin",
                    &[
                        ("csrf", &csrf),
                        ("email", email),
                        ("password", "not the passphrase"),
                    ],
                )
                .await;
            times.push(start.elapsed());
            assert_eq!(r.status, 401, "{}", r.body);
            bodies.push(strip(&r.body).replace(email, "EMAIL"));
        }
    }
    assert!(
        bodies.windows(2).all(|w| w[0] == w[1]),
        "identical pages for unknown accounts and wrong passwords"
    );
    t_known.sort();
    t_unknown.sort();
    let (k, u) = (t_known[5].as_secs_f64(), t_unknown[5].as_secs_f64());
    // An unknown account must cost a full hash like a real one, so the timing does not
    // tell whether the account exists.
    raw.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let h = raw[5];
    eprintln!(
        "median wrong password {:.1} ms, unknown account {:.1} ms, one Argon2id {:.1} ms",
        k * 1e3,
        u * 1e3,
        h * 1e3
    );
    assert!(
        u >= h * 0.5 && k >= h * 0.5,
        "both pay a full hash: known {k:.4}s unknown {u:.4}s hash {h:.4}s"
    );
    assert!(
        u > k * 0.5 && u < k * 2.0,
        "timings differ: known {k:.4}s unknown {u:.4}s"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csrf_cookies_and_security_headers() {
    let server = Server::start(|_| {}).await;
    server
        .state
        .users()
        .add_user(
            "csrf@example.com",
            Role::PortalOwner,
            "csrf test passphrase",
        )
        .unwrap();
    let mut c = server.client("127.0.0.9");

    // Headers on every kind of response.
    for path in [
        "/signin",
        "/healthz",
        "/nope",
        "/dashboard",
        "/static/style.css",
    ] {
        let r = c.get(path).await;
        let hsts = r
            .header("strict-transport-security")
            .unwrap_or_else(|| panic!("HSTS on {path}"));
        let age: u64 = hsts
            .split("max-age=")
            .nth(1)
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            age >= 31_536_000 && hsts.contains("includeSubDomains"),
            "{hsts}"
        );
        assert_eq!(r.header("x-frame-options"), Some("DENY"));
        assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
        let csp = r.header("content-security-policy").unwrap();
        assert!(
            csp.contains("frame-ancestors 'none'")
                && csp.contains("default-src 'none'")
                && !csp.contains("unsafe")
        );
        assert!(r.header("referrer-policy").is_some());
    }

    // Sign-in form without its CSRF cookie or with a wrong token: refused.
    let page = c.get("/signin").await;
    let set = page.header("set-cookie").unwrap().to_string();
    assert!(
        set.contains("Secure") && set.contains("HttpOnly") && set.contains("SameSite=Strict"),
        "{set}"
    );
    let r = c
        .post(
            "/signin",
            &[
                ("csrf", "forged"),
                ("email", "csrf@example.com"),
                ("password", "csrf test passphrase"),
            ],
        )
        .await;
    assert_eq!(r.status, 403);
    let mut bare = server.client("127.0.0.9");
    let r = bare
        .post(
            "/signin",
            &[
                ("csrf", &page.csrf()),
                ("email", "csrf@example.com"),
                ("password", "csrf test passphrase"),
            ],
        )
        .await;
    assert_eq!(r.status, 403, "no CSRF cookie");

    let r = c.sign_in("csrf@example.com", "csrf test passphrase").await;
    assert_eq!(r.status, 303);
    let sc = r
        .headers
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .find(|v| v.starts_with(SESSION_COOKIE))
        .unwrap();
    assert!(
        sc.contains("Secure")
            && sc.contains("HttpOnly")
            && sc.contains("SameSite=Strict")
            && sc.contains("Path=/"),
        "{sc}"
    );
    // Sign-out is state-changing: refused without the session's CSRF token.
    let r = c.post("/signout", &[("csrf", "x")]).await;
    assert_eq!(r.status, 403);
    assert_eq!(c.get("/dashboard").await.status, 200, "still signed in");
    // A cross-site form post is refused even with the right token and cookie.
    let dash = c.get("/dashboard").await;
    let body = web_common::form_encode(&[("csrf", &dash.csrf())]);
    c.origin = Some("https://evil.example".into());
    let r = c.request("POST", "/signout", Some(body.clone())).await;
    assert_eq!(r.status, 403, "cross-origin post refused");
    c.origin = None;
    let r = c.request("POST", "/signout", Some(body)).await;
    assert_eq!(r.status, 303, "same-origin sign-out works");
    assert_eq!(c.get("/dashboard").await.location(), Some("/signin"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_end_after_idle_and_absolute_timeouts() {
    let offset = Arc::new(Mutex::new(Duration::ZERO));
    let o = offset.clone();
    let clock: zonemesh_controller::web::Clock =
        Arc::new(move || SystemTime::now() + *o.lock().unwrap());
    let server = Server::start_with_clock(
        |c| {
            c.session_idle_timeout = Duration::from_secs(600);
            c.session_absolute_timeout = Duration::from_secs(3600);
        },
        Some(clock),
    )
    .await;
    server
        .state
        .users()
        .add_user(
            "timeout@example.com",
            Role::PortalOwner,
            "session timeout passphrase",
        )
        .unwrap();
    let advance = |d: u64| *offset.lock().unwrap() += Duration::from_secs(d);

    // Idle: 10 minutes without a request ends the session.
    let mut c = server.client("127.0.0.10");
    assert_eq!(
        c.sign_in("timeout@example.com", "session timeout passphrase")
            .await
            .location(),
        Some("/dashboard")
    );
    advance(599);
    assert_eq!(
        c.get("/dashboard").await.status,
        200,
        "activity within the idle timeout"
    );
    advance(601);
    assert_eq!(
        c.get("/dashboard").await.location(),
        Some("/signin"),
        "idle timeout"
    );

    // Absolute: requests every 9 minutes keep it alive only up to one hour.
    assert_eq!(
        c.sign_in("timeout@example.com", "session timeout passphrase")
            .await
            .location(),
        Some("/dashboard")
    );
    let mut alive = 0;
    for _ in 0..8 {
        advance(540);
        if c.get("/dashboard").await.status == 200 {
            alive += 1;
        }
    }
    assert_eq!(alive, 6, "alive until 54 min, gone at 63 min");
    assert!(
        server
            .state
            .sessions()
            .purge_expired(SystemTime::now() + *offset.lock().unwrap())
            .unwrap()
            <= 1
    );
    server.stop().await;
}

/// The HTTPS side stays responsive while wrong sign-ins and audit writes pile up: every
/// audit record is durable through one group-commit writer that waits off the async
/// workers, so `/healthz` answers quickly, and the records cost far fewer flushes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_stays_fast_during_failed_sign_ins_and_audit_writes() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use zonemesh_controller::audit::AuditEvent;
    let server = Server::start(|c| {
        c.throttle.free_failures = 1_000_000;
        c.throttle.block_after_failures = 1_000_000;
    })
    .await;
    server
        .state
        .users()
        .add_user(
            "flood@example.com",
            Role::PortalOwner,
            "a passphrase for the flood test",
        )
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let mut load = vec![];
    for k in 0..6u8 {
        let mut c = server.client(&format!("127.0.4.{}", k + 1));
        let stop = stop.clone();
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let r = c.sign_in("flood@example.com", &format!("wrong {k}")).await;
                // Refused, or told to wait (the per-account delay still applies).
                assert!(matches!(r.status, 401 | 429), "{}", r.status);
            }
        }));
    }
    for k in 0..32u32 {
        let (audit, stop, written) = (server.audit.clone(), stop.clone(), written.clone());
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                audit
                    .record_durable(
                        AuditEvent::new("test.flood", "ok").detail(format!("writer {k}")),
                        SystemTime::now(),
                    )
                    .await
                    .unwrap();
                written.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let flushes_before = server.audit.flusher().flushes();
    let written_before = written.load(Ordering::Relaxed);
    let mut probe = server.client("127.0.5.1");
    let mut worst = Duration::ZERO;
    let t0 = std::time::Instant::now();
    let mut probes = 0;
    while t0.elapsed() < Duration::from_secs(3) {
        let t = std::time::Instant::now();
        let r = probe.get("/healthz").await;
        worst = worst.max(t.elapsed());
        assert_eq!(r.body, "ok");
        probes += 1;
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.await.unwrap();
    }
    let records = written.load(Ordering::Relaxed) - written_before;
    let flushes = server.audit.flusher().flushes() - flushes_before;
    println!("{probes} health probes, worst {worst:?}; {records} audit records, {flushes} flushes");
    assert!(records > 100, "only {records} audit records were written");
    assert!(
        flushes * 2 < records,
        "{records} concurrent audit records took {flushes} flushes"
    );
    // Generous for a shared 2-core machine running debug code; a worker blocked on
    // flushes or hashes shows up as whole seconds.
    assert!(
        worst < Duration::from_millis(750),
        "/healthz took {worst:?}"
    );
    server.stop().await;
}
