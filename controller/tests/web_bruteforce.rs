//! A scripted brute force from one loopback source: growing delays, then a block that is
//! audited and handed to the SecuritySink (the Watch stream's blocklist), while a valid
//! user from another source still signs in.

mod web_common;

use std::time::{Duration, Instant};

use web_common::Server;
use zonemesh_controller::auth::Role;

const ATTACKER: &str = "127.0.0.2";
const USER: &str = "127.0.0.3";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brute_force_is_slowed_then_blocked_and_others_still_sign_in() {
    let server = Server::start(|c| {
        c.throttle.free_failures = 2;
        c.throttle.base_delay = Duration::from_millis(100);
        c.throttle.max_delay = Duration::from_secs(5);
        c.throttle.block_after_failures = 8;
        c.throttle.block_min_accounts = 3;
        c.throttle.block_duration = Duration::from_secs(120);
    })
    .await;
    server
        .state
        .users()
        .add_user(
            "victim@example.com",
            Role::PortalOwner,
            "victim's long passphrase",
        )
        .unwrap();
    server
        .state
        .users()
        .add_user(
            "alice@example.com",
            Role::PortalOwner,
            "alice's own passphrase",
        )
        .unwrap();
    let targets = [
        "victim@example.com",
        "admin@example.com",
        "root@example.com",
        "ops@example.com",
    ];
    let guesses = [
        "123456",
        "password1",
        "letmein!",
        "Summer2026",
        "qwerty123",
        "hunter22",
        "changeme",
        "trustno1",
        "dragon12",
        "monkey12",
    ];

    let mut atk = server.client(ATTACKER);
    let start = Instant::now();
    let mut checked_at: Vec<Duration> = vec![];
    let mut throttled = 0;
    let mut blocked = false;
    let mut requests = 0;
    // Bounded: at most 400 requests, and stop at the block.
    'outer: for (i, guess) in guesses.iter().cycle().take(40).enumerate() {
        let target = targets[i % targets.len()];
        loop {
            requests += 1;
            assert!(requests < 400, "bounded brute force");
            // When the attempt was sent: a delay runs from the previous answer, so the
            // time between two checked attempts is at least the delay, however long each
            // hash takes on a loaded machine.
            let sent = start.elapsed();
            let r = atk.sign_in(target, guess).await;
            match r.status {
                401 => {
                    checked_at.push(sent);
                    break;
                }
                429 => {
                    throttled += 1;
                    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
                    assert!(retry >= 1);
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
                403 => {
                    blocked = true;
                    break 'outer;
                }
                s => panic!("unexpected status {s}: {}", r.body),
            }
        }
        // Meanwhile a valid user from another source signs in without delay.
        if i == 5 {
            let mut alice = server.client(USER);
            let t = Instant::now();
            let r = alice
                .sign_in("alice@example.com", "alice's own passphrase")
                .await;
            assert_eq!(
                (r.status, r.location()),
                (303, Some("/dashboard")),
                "{}",
                r.body
            );
            assert_eq!(alice.get("/dashboard").await.status, 200);
            eprintln!(
                "valid user from {USER} signed in during the attack in {:?}",
                t.elapsed()
            );
        }
    }
    assert!(blocked, "the attacking source ends up blocked");
    let gaps: Vec<f64> = checked_at
        .windows(2)
        .map(|w| (w[1] - w[0]).as_secs_f64())
        .collect();
    eprintln!(
        "password checks for {ATTACKER}: {} (+{throttled} refused early); gaps between checks: {:?}",
        checked_at.len(),
        gaps.iter()
            .map(|g| format!("{:.0} ms", g * 1e3))
            .collect::<Vec<_>>()
    );
    assert_eq!(checked_at.len(), 8, "blocked at the 8th failure");
    // The delay grows: each gap after the free attempts is at least the exponential delay
    // (100, 200, 400, ... ms) and longer than the previous one.
    for (k, g) in gaps.iter().enumerate().skip(2) {
        let expected = 0.1 * f64::powi(2.0, (k - 2) as i32);
        assert!(
            *g >= expected * 0.95,
            "gap {k} = {g:.3}s, expected >= {expected:.3}s"
        );
    }
    // Each gap also holds one hash, whose time varies on a loaded machine, so growth is
    // checked end to end rather than pair by pair.
    assert!(
        gaps[gaps.len() - 1] > 4.0 * gaps[2],
        "delays grow: {gaps:?}"
    );
    assert!(throttled > 0);

    // The block: SecuritySink got it, the audit log has it, further requests are refused.
    let blocks = server.sink.blocks.lock().unwrap().clone();
    assert_eq!(blocks.len(), 1, "{blocks:?}");
    assert_eq!(blocks[0].0.to_string(), ATTACKER);
    assert!(blocks[0].1 > std::time::SystemTime::now() + Duration::from_secs(100));
    let audit = server.audit.list(None).unwrap();
    let block_rec = audit
        .iter()
        .find(|r| r.event.kind == "source.blocked")
        .expect("block audited");
    assert_eq!(block_rec.event.source.unwrap().to_string(), ATTACKER);
    let failures = audit
        .iter()
        .filter(|r| r.event.kind == "signin.failure")
        .count();
    assert_eq!(failures, 8, "every failure audited");
    assert_eq!(server.state.blocked_sources().len(), 1);
    let r = atk
        .sign_in("alice@example.com", "alice's own passphrase")
        .await;
    assert_eq!(
        r.status, 403,
        "even right credentials are refused from a blocked source"
    );
    let m = server.state.metrics().render_prometheus();
    assert!(
        m.contains("zonemesh_signin_failure_total 8")
            && m.contains("zonemesh_sources_blocked_total 1"),
        "{m}"
    );

    // And the valid user still gets in from elsewhere after the block.
    let mut alice = server.client(USER);
    assert_eq!(
        alice
            .sign_in("alice@example.com", "alice's own passphrase")
            .await
            .location(),
        Some("/dashboard")
    );
    server.stop().await;
}
