//! Connected agents are served on the controller's lower-priority runtime: in a running
//! `serve` process the threads named `zm-agents` run at nice 10 while the main runtime's
//! keep the process's niceness, and a node's renewals (their RSA-4096 signatures
//! included) spend their CPU on the `zm-agents` threads while enrollments (no node
//! certificate yet) spend theirs elsewhere. Read from `/proc/<pid>/task/*/stat`.

use tempfile::TempDir;
use zonemesh_tests::cluster::{Controller, enroll_rpc, enrollment_channel, renew_rpc, wg_key};
use zonemesh_tests::rsa4096;

const AGENTS: &str = "zm-agents";
const ROUNDS: usize = 40;

/// One thread of the process: its name, CPU ticks (user + system) and niceness.
struct Thread {
    name: String,
    ticks: u64,
    nice: i32,
}

fn threads(pid: u32) -> Vec<Thread> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let Ok(stat) = std::fs::read_to_string(task.unwrap().path().join("stat")) else {
            continue; // exited meanwhile
        };
        if let Some(t) = parse(&stat) {
            out.push(t);
        }
    }
    out
}

fn parse(stat: &str) -> Option<Thread> {
    let (head, rest) = stat.rsplit_once(')')?;
    let name = head.split_once('(')?.1.to_string();
    // Fields after the name start at field 3 (state): utime is 14, stime 15, nice 19.
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| f.get(i - 3).and_then(|v| v.parse::<i64>().ok());
    Some(Thread {
        name,
        ticks: u64::try_from(num(14)? + num(15)?).ok()?,
        nice: i32::try_from(num(19)?).ok()?,
    })
}

/// CPU ticks of the whole process (every thread it ever had) and of its `zm-agents`
/// threads now alive.
fn ticks(pid: u32) -> (u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let total = parse(&stat).unwrap().ticks;
    let agents = threads(pid)
        .iter()
        .filter(|t| t.name == AGENTS)
        .map(|t| t.ticks)
        .sum();
    (total, agents)
}

fn share(before: (u64, u64), after: (u64, u64)) -> (u64, f64) {
    let total = after.0.saturating_sub(before.0);
    let agents = after.1.saturating_sub(before.1);
    (total, agents as f64 / total.max(1) as f64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewals_run_on_the_lower_priority_agents_runtime_and_enrollments_do_not() {
    let tmp = TempDir::new().unwrap();
    let ctl = Controller::start_new(tmp.path()).unwrap();
    ctl.zone_add("eu", "100.64.1.0/24").unwrap();
    let pid = ctl.pid().unwrap();
    let addr = ctl.grpc_addr();
    let token = ctl.token("eu", 2 * ROUNDS as u32).unwrap();

    let enroll = |i: usize| {
        let (addr, token, fp) = (addr.clone(), token.clone(), ctl.fingerprint.clone());
        async move {
            let key = rsa4096(30 + i % 4);
            let ch = enrollment_channel(&addr, &fp).await.unwrap();
            let (creds, _) = enroll_rpc(ch, &token, &format!("n{i}"), &key, wg_key(i as u64 + 1))
                .await
                .unwrap();
            (creds, key)
        }
    };
    enroll(0).await;

    let all = threads(pid);
    let agents: Vec<&Thread> = all.iter().filter(|t| t.name == AGENTS).collect();
    assert!(
        !agents.is_empty(),
        "no {AGENTS} thread in the serve process"
    );
    for t in &agents {
        assert_eq!(t.nice, 10, "{AGENTS} thread niceness");
    }
    let main_nice: Vec<i32> = all
        .iter()
        .filter(|t| t.name.starts_with("tokio"))
        .map(|t| t.nice)
        .collect();
    assert!(!main_nice.is_empty(), "no main runtime thread");
    assert!(
        main_nice.iter().all(|n| *n == 0),
        "main runtime niceness {main_nice:?}"
    );

    // Enrollments: the TLS handshake and the signature happen off the agents' runtime.
    let t0 = ticks(pid);
    let mut nodes = Vec::new();
    for i in 1..=ROUNDS {
        nodes.push(enroll(i).await);
    }
    let t1 = ticks(pid);
    // Renewals, each node over its own certificate: served on the agents' runtime.
    for (i, (creds, key)) in nodes.iter().enumerate() {
        renew_rpc(&addr, creds, key, &format!("n{}", i + 1))
            .await
            .unwrap();
    }
    let t2 = ticks(pid);
    let (enroll_ticks, enroll_share) = share(t0, t1);
    let (renew_ticks, renew_share) = share(t1, t2);
    eprintln!(
        "enrollments: {enroll_ticks} ticks, {:.0}% on {AGENTS}; renewals: {renew_ticks} ticks, {:.0}% on {AGENTS}",
        enroll_share * 100.0,
        renew_share * 100.0
    );
    assert!(
        renew_ticks >= 20,
        "renewals too quick to measure: {renew_ticks} ticks"
    );
    assert!(
        renew_share >= 0.3,
        "renewals spent {renew_share:.2} of their CPU on {AGENTS}"
    );
    assert!(
        enroll_share <= 0.1,
        "enrollments spent {enroll_share:.2} of their CPU on {AGENTS}"
    );
}
