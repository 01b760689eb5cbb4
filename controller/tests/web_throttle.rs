//! The sign-in throttle under concurrency and against lock-outs, over real HTTPS: parallel
//! attempts from one source get no more password checks than the delay schedule allows,
//! a second concurrent attempt is refused without hashing, and a stranger failing on an
//! account does not delay its owner at their usual address. Admins list and clear counters.

mod web_common;

use std::time::Duration;

use web_common::{ManualClock, Server};
use zonemesh_controller::auth::{ClearTarget, Role};

const ATTACKER: &str = "127.0.0.2";
const OWNER: &str = "127.0.0.3";
const STRANGER: &str = "127.0.0.4";
const EMAIL: &str = "victim@example.com";
const PASSWORD: &str = "the victim's real passphrase";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_signins_from_one_source_check_at_most_the_schedule() {
    // The clock stands still: no delay ever runs out, so the schedule allows exactly the free
    // failures plus the one that starts the first delay.
    let clock = ManualClock::new();
    let server =
        Server::start_with_clock(|c| c.throttle.free_failures = 3, Some(clock.clock())).await;
    server
        .state
        .users()
        .add_user(EMAIL, Role::PortalOwner, PASSWORD)
        .unwrap();
    let hasher = server.state.users().hasher().clone();
    let before = hasher.verifications();
    let right = rand::random_range(0..100usize);
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for i in 0..100usize {
        let mut c = server.client(ATTACKER);
        let pw = if i == right {
            PASSWORD.to_string()
        } else {
            format!("guess number {i} of the attacker")
        };
        tasks.push(tokio::spawn(
            async move { c.sign_in(EMAIL, &pw).await.status },
        ));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    let checked = hasher.verifications() - before;
    let count = |s: u16| statuses.iter().filter(|x| **x == s).count();
    eprintln!(
        "100 parallel sign-ins in {:?}: {checked} passwords checked, {} wrong, {} refused (429), right one (#{right}) got {}",
        started.elapsed(),
        count(401),
        count(429),
        statuses[right]
    );
    assert_eq!(count(401) + count(429) + count(303), 100, "{statuses:?}");
    assert!(
        count(401) <= 4,
        "at most free failures + 1 wrong passwords checked: {statuses:?}"
    );
    assert!(checked <= 5, "{checked} passwords checked");
    assert_eq!(
        checked as usize,
        count(401) + count(303),
        "every answer but 429 was checked"
    );
    if statuses[right] == 303 {
        eprintln!("the right password was among the allowed attempts");
    } else {
        assert_eq!(statuses[right], 429, "the right password was not checked");
        // Use up what the schedule still allows, one at a time; then the right password is
        // refused without a check until the delay runs out.
        let mut wrong = count(401);
        let mut c = server.client(ATTACKER);
        loop {
            match c.sign_in(EMAIL, "one more sequential guess").await.status {
                401 => wrong += 1,
                429 => break,
                s => panic!("unexpected {s}"),
            }
            assert!(
                wrong <= 4,
                "more wrong passwords checked than the schedule allows"
            );
        }
        assert_eq!(wrong, 4, "free failures + 1");
        let checked = hasher.verifications() - before;
        assert_eq!(c.sign_in(EMAIL, PASSWORD).await.status, 429);
        assert_eq!(
            hasher.verifications() - before,
            checked,
            "refused without a check"
        );
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_concurrent_attempt_is_refused_without_hashing() {
    // A slow hash, so the first attempt is surely still running.
    let server = Server::start(|c| c.argon2.t = 24).await;
    server
        .state
        .users()
        .add_user(EMAIL, Role::PortalOwner, PASSWORD)
        .unwrap();
    server
        .state
        .users()
        .add_user("other@example.com", Role::PortalOwner, PASSWORD)
        .unwrap();
    let hasher = server.state.users().hasher().clone();
    let before = hasher.verifications();
    let mut first = server.client(ATTACKER);
    let running = tokio::spawn(async move { first.sign_in(EMAIL, "first wrong guess").await });
    let t0 = std::time::Instant::now();
    while hasher.verifications() == before {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "first check never started"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Same source, another account; and the same account from another source.
    let r = server
        .client(ATTACKER)
        .sign_in("other@example.com", PASSWORD)
        .await;
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(r.header("retry-after"), Some("1"));
    let r = server.client(STRANGER).sign_in(EMAIL, PASSWORD).await;
    assert_eq!(r.status, 429, "{}", r.body);
    assert!(
        !running.is_finished(),
        "the first check outlasted the refusals"
    );
    assert_eq!(
        hasher.verifications() - before,
        1,
        "refused without hashing"
    );
    let hash_time = t0.elapsed();
    assert_eq!(running.await.unwrap().status, 401);
    eprintln!("one check took about {:?}", t0.elapsed().max(hash_time));
    // Once settled, the next attempt runs.
    let r = server
        .client(ATTACKER)
        .sign_in("other@example.com", PASSWORD)
        .await;
    assert_eq!(r.location(), Some("/dashboard"));
    assert_eq!(hasher.verifications() - before, 2);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_cannot_lock_the_owner_out_and_admins_clear_throttles() {
    let clock = ManualClock::new();
    let server = Server::start_with_clock(|_| {}, Some(clock.clock())).await;
    server
        .state
        .users()
        .add_user(EMAIL, Role::PortalOwner, PASSWORD)
        .unwrap();
    // The owner has signed in from their usual address before.
    let mut owner = server.client(OWNER);
    assert_eq!(
        owner.sign_in(EMAIL, PASSWORD).await.location(),
        Some("/dashboard")
    );

    // The attacker fails 20 times, waiting out every delay (the clock is moved for it).
    let mut atk = server.client(ATTACKER);
    let (mut failures, mut requests) = (0, 0);
    while failures < 20 {
        requests += 1;
        assert!(requests < 200, "bounded");
        let r = atk.sign_in(EMAIL, &format!("guess {requests}")).await;
        match r.status {
            401 => failures += 1,
            429 => {
                let secs: u64 = r.header("retry-after").unwrap().parse().unwrap();
                clock.advance(Duration::from_secs(secs));
            }
            s => panic!("unexpected {s}: {}", r.body),
        }
    }
    // Right after the 20th failure the attacker waits the longest delay ...
    let r = atk.sign_in(EMAIL, PASSWORD).await;
    assert_eq!(r.status, 429);
    let wait: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!(wait >= 15 * 60 - 1, "attacker waits {wait} s");
    // ... while the owner at the usual address signs in at once with the right password.
    let r = owner.sign_in(EMAIL, PASSWORD).await;
    assert_eq!(
        (r.status, r.location()),
        (303, Some("/dashboard")),
        "{}",
        r.body
    );
    assert_eq!(owner.get("/dashboard").await.status, 200);
    // An address that never signed in to the account still waits (a spread-out guesser
    // gets no fresh free attempts per address).
    assert_eq!(
        server
            .client(STRANGER)
            .sign_in(EMAIL, PASSWORD)
            .await
            .status,
        429
    );
    // Failing on one account only does not block the attacker's address.
    assert!(server.state.blocked_sources().is_empty());

    // Admins see the attacker ...
    let list = server.state.throttle_list(100);
    let row = list
        .rows
        .iter()
        .find(|r| r.source == Some(ATTACKER.parse().unwrap()) && r.account.is_none())
        .expect("the attacker's address is listed");
    assert_eq!(row.failures, 20);
    assert!(row.wait_secs > 0);
    assert!(
        list.rows
            .iter()
            .all(|r| r.source != Some(OWNER.parse().unwrap())),
        "the owner has no failures: {list:?}"
    );
    // ... and clear it: its next attempt is checked again.
    let cleared = server
        .state
        .clear_throttle(&ClearTarget::Source(ATTACKER.parse().unwrap()), "cli");
    assert!(cleared >= 2, "{cleared}");
    assert!(
        server
            .state
            .throttle_list(100)
            .rows
            .iter()
            .all(|r| r.source != Some(ATTACKER.parse().unwrap()))
    );
    let audit = server.audit.list(None).unwrap();
    let rec = audit
        .iter()
        .find(|r| r.event.kind == "throttle.cleared")
        .expect("clearing is audited");
    assert_eq!(rec.event.source.unwrap().to_string(), ATTACKER);
    // The account's counter for unknown sources still holds the attacker's failures:
    // clearing the account as well lets the attacker's address try again.
    assert_eq!(atk.sign_in(EMAIL, "one more guess").await.status, 429);
    server
        .state
        .clear_throttle(&ClearTarget::Account(EMAIL.to_uppercase()), "cli");
    assert_eq!(atk.sign_in(EMAIL, "one more guess").await.status, 401);
    server.stop().await;
}
