//! `--watch-log sshd:journal` against a real systemd journal: Debian's `systemd-journald`
//! runs in its own mount namespace ([`zonemesh_tests::journal`]), the agent (in a server
//! namespace of the [`SshLab`]) follows it through `journalctl`, and `systemd-cat -t sshd`
//! writes real sshd failure lines as root. The agent has no file source at all, so only the
//! journal can have reported them; the controller (`--block-nodes 1`) blocks the address.
//! Records an unprivileged user tags `sshd`, and root's records under another identifier,
//! are not taken as sshd's. Root only.

use anyhow::{Result, bail};
use serde_json::Value;
use std::time::{Duration, Instant};
use zonemesh_tests::journal::{self, Journal, children_named};
use zonemesh_tests::sshlab::{self, SshLab};

const ATTACKER: &str = "198.18.51.77";
const FORGED_UID: &str = "198.18.51.66";
const FORGED_TAG: &str = "198.18.51.55";

fn failures(ip: &str) -> String {
    [
        format!("Failed password for invalid user admin from {ip} port 50522 ssh2"),
        format!("Failed password for root from {ip} port 50524 ssh2"),
        format!("Failed publickey for invalid user oracle from {ip} port 50526 ssh2"),
        format!("Failed password for invalid user test from {ip} port 50528 ssh2"),
    ]
    .join("\n")
        + "\n"
}

fn blocked(lab: &SshLab) -> Result<Vec<String>> {
    let v: Value = serde_json::from_str(&lab.ctl.admin_ok(&["block", "list", "--json"])?)?;
    Ok(v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|b| b["address"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default())
}

#[test]
fn sshd_failures_in_the_systemd_journal_block_the_source() -> Result<()> {
    if let Some(why) = sshlab::skip_reason().or_else(journal::skip_reason) {
        println!("skipped: {why}");
        return Ok(());
    }
    let lab = SshLab::new_with(51, &[("eu", 1)], &["--block-nodes", "1"])?;
    let s = &lab.servers[0];
    assert!(
        !s.state_dir.join("sources.toml").exists(),
        "the agent must have no file source"
    );
    let j = Journal::start(&lab.janitor)?;
    lab.stop_agent(s);
    let wrapper = j.wrapper();
    let w: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let pid = lab.start_agent_with(s, true, &w, &["--watch-log", "sshd:journal"])?;
    // The follower is up once its journalctl runs and has reached the journal's end.
    let deadline = Instant::now() + Duration::from_secs(20);
    while children_named(pid, "journalctl").is_empty() {
        if Instant::now() > deadline {
            bail!("the agent started no journalctl:\n{}", s.agent_log());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(1));
    assert!(s.agent_log().contains("sshd:journal"), "{}", s.agent_log());

    // Written first: the same lines from an unprivileged user, and from root under
    // another identifier. The journal keeps their order, so once the genuine lines have
    // blocked their source these have been read too.
    j.write("sshd", Some(65534), &failures(FORGED_UID))?;
    j.write("sshd-wrapper", None, &failures(FORGED_TAG))?;
    let t0 = Instant::now();
    j.write("sshd", None, &failures(ATTACKER))?;

    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let b = blocked(&lab)?;
        if b.iter().any(|a| a == ATTACKER) {
            println!("journal line -> block in {:?}", t0.elapsed());
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "no block from the journal: {b:?}\nagent:\n{}\ncontroller:\n{}",
                s.agent_log(),
                lab.ctl.log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(1));
    let b = blocked(&lab)?;
    assert!(
        !b.iter().any(|a| a == FORGED_UID),
        "a forged record counted: {b:?}"
    );
    assert!(
        !b.iter().any(|a| a == FORGED_TAG),
        "another tag counted: {b:?}"
    );

    // The journal really holds the records, with the credentials journald took.
    let recs = j.records(&["SYSLOG_IDENTIFIER=sshd"])?;
    let uid_of = |ip: &str| -> Vec<String> {
        recs.iter()
            .filter(|r| r["MESSAGE"].as_str().is_some_and(|m| m.contains(ip)))
            .filter_map(|r| r["_UID"].as_str().map(str::to_string))
            .collect()
    };
    assert_eq!(uid_of(ATTACKER), ["0"; 4], "{recs:?}");
    assert_eq!(uid_of(FORGED_UID), ["65534"; 4], "{recs:?}");

    // What the controller received came from the journal follower.
    assert!(
        lab.ctl.log_text().contains("sshd:journal failed-auth"),
        "{}",
        lab.ctl.log_text()
    );

    // The block's evidence names this node.
    let audit = lab.ctl.admin_ok(&["audit", "--json"])?;
    let rec = audit
        .lines()
        .find(|l| l.contains("source.blocked") && l.contains(ATTACKER))
        .unwrap_or_default();
    assert!(rec.contains(&s.name), "{audit}");
    drop(j);
    Ok(())
}
