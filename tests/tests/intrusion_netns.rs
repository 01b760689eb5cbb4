//! Fleet-wide intrusion feedback in namespaces (three zones of two agents, an attacker
//! namespace on the underlay): real sshd lines on one node and Asterisk SIP lines on
//! another get the attacker blocked on all six nodes; nftables drops its TCP connects but
//! not its pings; the block ends on time and a repeat offence lasts twice as long. One node
//! alone, allow-listed ranges and enrolled nodes' addresses never get blocked. Root only.

use anyhow::{Context, Result, bail};
use serde_json::Value;
use std::io::Write as _;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use zonemesh_tests::attacklab::{MeshLab, skip_reason};

const NODES: [&str; 6] = ["a1", "a2", "b1", "b2", "c1", "c2"];
const ATTACKER: &str = "198.18.100.99";
const FIRST_BLOCK: u64 = 12;
const PORT: &str = "18080";

fn sshd(ip: &str, user: &str) -> String {
    format!(
        "Dec  1 20:00:01 a1 sshd[4242]: Failed password for invalid user {user} from {ip} port 50522 ssh2\n"
    )
}

fn asterisk(ip: &str) -> String {
    format!(
        "[Dec  1 20:00:01] NOTICE[1234] chan_sip.c: Registration from '\"100\" <sip:100@198.18.100.21>' failed for '{ip}:5060' - Wrong password\n"
    )
}

fn append(path: &std::path::Path, text: &str) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

/// A TCP listener in `node`'s namespace on every address.
fn listener(lab: &MeshLab, node: &str) -> Result<Child> {
    Ok(Command::new("ip")
        .args(["netns", "exec", &format!("{}-{node}", lab.pfx), "python3", "-c"])
        .arg(format!(
            "import socket\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind(('0.0.0.0',{PORT}))\ns.listen(64)\nwhile True:\n  c,_=s.accept(); c.close()"
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?)
}

/// Whether the attacker's TCP connect to `node` completes within 1.5 s.
fn attacker_connects(lab: &MeshLab, node: &str) -> bool {
    let ip = MeshLab::underlay(node);
    lab.x_status(
        "x9",
        &[
            "python3",
            "-c",
            "import socket,sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1.5)",
            &ip,
            PORT,
        ],
    )
}

fn attacker_pings(lab: &MeshLab, node: &str) -> bool {
    lab.x_status(
        "x9",
        &["ping", "-c", "1", "-W", "1", &MeshLab::underlay(node)],
    )
}

fn blocks(lab: &MeshLab) -> Result<Vec<Value>> {
    let v: Value = serde_json::from_str(&lab.controller(&["block", "list", "--json"])?)?;
    Ok(v.as_array().cloned().unwrap_or_default())
}

fn block_of(lab: &MeshLab, ip: &str) -> Result<Option<Value>> {
    Ok(blocks(lab)?.into_iter().find(|b| b["address"] == ip))
}

/// Wait until every node's set holds `ip` (or none does, with `present` false).
fn wait_sets(lab: &MeshLab, ip: &str, present: bool, within: Duration) -> Result<Duration> {
    let start = Instant::now();
    loop {
        let mut wrong = None;
        for n in NODES {
            let e = lab.nft_elements(n)?;
            if e.contains(ip) != present {
                wrong = Some((n, e));
                break;
            }
        }
        let Some((n, e)) = wrong else {
            return Ok(start.elapsed());
        };
        if start.elapsed() > within {
            bail!("{ip} present={present} not reached on {n} within {within:?}: {e}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn audit(lab: &MeshLab) -> Result<Vec<Value>> {
    Ok(lab
        .controller(&["audit", "--json"])?
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

/// Offend from the attacker: 3 sshd failures on a1 and 3 SIP failures on b1. Returns when
/// the last line was written.
fn offend(lab: &MeshLab, ip: &str) -> Result<Instant> {
    for i in 0..3 {
        append(&lab.dir.join("a1/auth.log"), &sshd(ip, &format!("u{i}")))?;
    }
    for _ in 0..2 {
        append(&lab.dir.join("b1/sip.log"), &asterisk(ip))?;
    }
    let t = Instant::now();
    append(&lab.dir.join("b1/sip.log"), &asterisk(ip))?;
    Ok(t)
}

#[test]
fn attackers_seen_by_two_nodes_are_blocked_everywhere_and_released_on_time() -> Result<()> {
    if let Some(why) = skip_reason() {
        println!("skipped: {why}");
        return Ok(());
    }
    let pfx = format!("zi{}", std::process::id() % 10_000);
    let lab = MeshLab::new(
        &pfx,
        "a b c",
        "1 2",
        &format!("--block-first {FIRST_BLOCK}s --block-max 10m --block-window 1m"),
    );
    lab.up()?;
    // a1 reads an sshd auth log (from sources.toml), b1 an Asterisk log, c1 an sshd log:
    // written before the agents restart, so they read them from the start.
    std::fs::write(
        lab.dir.join("a1/sources.toml"),
        format!(
            "[[source]]\nkind = \"sshd\"\npath = \"{}\"\n",
            lab.dir.join("a1/auth.log").display()
        ),
    )?;
    std::fs::write(
        lab.dir.join("b1/sources.toml"),
        format!(
            "[[source]]\nkind = \"asterisk\"\npath = \"{}\"\n",
            lab.dir.join("b1/sip.log").display()
        ),
    )?;
    std::fs::write(
        lab.dir.join("c1/sources.toml"),
        format!(
            "[[source]]\nkind = \"sshd\"\npath = \"{}\"\n",
            lab.dir.join("c1/auth.log").display()
        ),
    )?;
    for n in ["a1", "b1", "c1"] {
        append(&lab.dir.join(format!("{n}/auth.log")), "")?;
        append(&lab.dir.join(format!("{n}/sip.log")), "")?;
        lab.run(&["agent-stop", n])?;
        lab.run(&["agent-start", n])?;
    }
    lab.wait_connected(
        &[("a1", "b1"), ("b1", "c1"), ("c1", "a1"), ("a2", "c2")],
        Duration::from_secs(30),
    )?;
    lab.run(&["host", "x9", ATTACKER])?;
    let mut listeners = Vec::new();
    for n in ["a1", "c2"] {
        listeners.push(listener(&lab, n)?);
    }
    let result = scenario(&lab);
    for mut l in listeners {
        let _ = l.kill();
        let _ = l.wait();
    }
    if result.is_err() {
        eprintln!(
            "controller log:\n{}",
            std::fs::read_to_string(lab.dir.join("controller.log")).unwrap_or_default()
        );
        for n in ["a1", "b1"] {
            eprintln!(
                "{n} log:\n{}",
                std::fs::read_to_string(lab.dir.join(format!("{n}.log"))).unwrap_or_default()
            );
        }
    }
    result
}

fn scenario(lab: &MeshLab) -> Result<()> {
    // Before: the attacker reaches both listeners.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(attacker_connects(lab, "a1") && attacker_connects(lab, "c2")) {
        if Instant::now() > deadline {
            bail!("the attacker never reached the listeners");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // ICMP is never dropped by the rule, and only blocked sources are.
    let rules = lab.nft_ruleset("a1").unwrap_or_default();
    assert!(
        rules.is_empty() || rules.contains("l4proto != icmp"),
        "{rules}"
    );

    // One node alone, however often: not blocked.
    for i in 0..60 {
        append(
            &lab.dir.join("c1/auth.log"),
            &sshd("198.18.100.98", &format!("x{i}")),
        )?;
    }
    // Enrolled nodes' underlay addresses and allow-listed ranges, from two nodes: never.
    lab.controller(&["block", "allow", "198.18.100.96/31", "--note", "office"])?;
    let allowed = lab.controller(&["block", "allow", "--list", "--json"])?;
    assert!(allowed.contains("198.18.100.96/31"), "{allowed}");
    for ip in ["198.18.100.21", "198.18.100.97", "198.18.100.1"] {
        offend(lab, ip)?;
    }
    // A user name carrying a spoofed address does not name it.
    for i in 0..3 {
        append(
            &lab.dir.join("a1/auth.log"),
            &sshd(
                "198.18.100.99",
                &format!("z{i} from 198.18.100.77 port 22 ssh2"),
            )
            .replace("198.18.100.99", "198.18.100.95"),
        )?;
    }

    // The attacker: sshd failures on a1, SIP failures on b1.
    let t0 = offend(lab, ATTACKER)?;
    let listed = loop {
        if let Some(b) = block_of(lab, ATTACKER)? {
            break b;
        }
        if t0.elapsed() > Duration::from_secs(15) {
            bail!("the attacker was never blocked: {:?}", blocks(lab)?);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    wait_sets(lab, ATTACKER, true, Duration::from_secs(15))?;
    println!(
        "block active on all six nodes {:.0} ms after the threshold-crossing line",
        t0.elapsed().as_secs_f64() * 1000.0
    );
    let reason = listed["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("a/a1")
            && reason.contains("b/b1")
            && reason.contains("ssh.auth_failure")
            && reason.contains("sip.auth_failure"),
        "{reason}"
    );
    assert_eq!(listed["offence"], 1);
    let length = listed["until_unix"].as_u64().context("until")?
        - listed["since_unix"].as_u64().context("since")?;
    assert_eq!(length, FIRST_BLOCK);

    // Enforcement: TCP from the attacker dropped on a node that saw nothing too; ping works.
    assert!(
        !attacker_connects(lab, "a1"),
        "a1 still accepts the attacker"
    );
    assert!(
        !attacker_connects(lab, "c2"),
        "c2 still accepts the attacker"
    );
    assert!(
        attacker_pings(lab, "a1"),
        "ICMP from the blocked source was dropped"
    );
    assert!(
        attacker_pings(lab, "c2"),
        "ICMP from the blocked source was dropped"
    );
    // The mesh itself still works.
    assert!(lab.ping("a1", "c2")?);

    // Nothing else was blocked.
    let others: Vec<Value> = blocks(lab)?
        .into_iter()
        .filter(|b| b["address"] != ATTACKER)
        .collect();
    assert!(others.is_empty(), "blocked: {others:?}");
    for n in NODES {
        let e = lab.nft_elements(n)?;
        for ip in [
            "198.18.100.98",
            "198.18.100.97",
            "198.18.100.21",
            "198.18.100.77",
            "198.18.100.1",
        ] {
            assert!(!e.contains(ip), "{n} drops {ip}: {e}");
        }
    }
    let audit_now = audit(lab)?;
    let placed = audit_now
        .iter()
        .find(|r| r["kind"] == "source.blocked" && r.to_string().contains(ATTACKER))
        .context("no audit record of the block")?;
    let detail = placed.to_string();
    assert!(
        detail.contains("a/a1") && detail.contains("offence 1"),
        "{detail}"
    );
    assert!(
        audit_now
            .iter()
            .any(|r| r["kind"] == "source.allowed" && r.to_string().contains("198.18.100.96/31")),
        "allow-list change not audited"
    );

    // The block ends on time: gone from the list and from every set, audited.
    let placed_at = Instant::now() - t0.elapsed();
    wait_sets(lab, ATTACKER, false, Duration::from_secs(FIRST_BLOCK + 10))?;
    let ended = placed_at.elapsed();
    println!(
        "block of {FIRST_BLOCK}s ended on every node after {:.1}s",
        ended.as_secs_f64()
    );
    assert!(
        ended >= Duration::from_secs(FIRST_BLOCK - 2),
        "ended early: {ended:?}"
    );
    assert!(block_of(lab, ATTACKER)?.is_none());
    let deadline = Instant::now() + Duration::from_secs(5);
    while !attacker_connects(lab, "a1") {
        if Instant::now() > deadline {
            bail!("the attacker is still dropped after the block ended");
        }
    }
    // The expiry is audited right after its change commits (and reaches the agents), so
    // the record may land a moment after the sets are clear.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let audited = audit(lab)?
            .iter()
            .any(|r| r["kind"] == "source.block_expired" && r.to_string().contains(ATTACKER));
        if audited {
            break;
        }
        assert!(Instant::now() < deadline, "expiry not audited");
        std::thread::sleep(Duration::from_millis(100));
    }

    // A repeat offence: twice as long.
    offend(lab, ATTACKER)?;
    let deadline = Instant::now() + Duration::from_secs(15);
    let again = loop {
        if let Some(b) = block_of(lab, ATTACKER)? {
            break b;
        }
        if Instant::now() > deadline {
            bail!("the repeat offence was not blocked");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(again["offence"], 2);
    let length = again["until_unix"].as_u64().context("until")?
        - again["since_unix"].as_u64().context("since")?;
    assert_eq!(length, 2 * FIRST_BLOCK);

    // A manual unblock reaches every node and is audited.
    lab.controller(&["block", "remove", ATTACKER])?;
    wait_sets(lab, ATTACKER, false, Duration::from_secs(10))?;
    assert!(
        audit(lab)?
            .iter()
            .filter(|r| r["kind"] == "source.unblocked")
            .any(|r| r.to_string().contains(ATTACKER)),
        "manual unblock not audited"
    );
    Ok(())
}
