//! Loss on one underlay link, in network namespaces (`scripts/mesh-lab.sh`, three zones of
//! one agent): exactly the pairs whose probes cross that link show it, in
//! `health --json`, on the controller's and the agents' `/metrics` and on the dashboard's
//! heat map; the other pairs stay at zero. Both `/metrics` outputs pass
//! `promtool check metrics` (the agents' with their log followers' counters). Root only; skipped with a reason otherwise. Build the binaries
//! first (`cargo build -p zonemesh-controller -p zonemesh-agent --bins`).
//!
//! The loss is `tc qdisc ... netem loss 30%` on the node's underlay interface. A kernel
//! without `sch_netem` (some VM kernels) gets the same 30% random drop of that interface's
//! egress from an nftables `numgen random` rule instead; the test says which it used.

use anyhow::{Context, Result, bail};
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use zonemesh_tests::meshlab::{MeshLab, skip_reason};
use zonemesh_tests::webcurl::CurlSession;
use zonemesh_tests::{bin, have};

const LOSS_PERCENT: u32 = 30;
/// Inside the hub namespace (the controller's) and inside each node's namespace.
const CTL_METRICS: &str = "127.0.0.1:9090";
const AGENT_METRICS: &str = "127.0.0.1:9100";
const NODES: [&str; 3] = ["a1", "b1", "c1"];
const LOSSY: &str = "a1";
const ADMIN: &str = "ops@lab.test";
const PASSWORD: &str = "a long lab passphrase for the heat map";

fn key(node: &str) -> String {
    format!("zone-{}/{node}", &node[..1])
}

/// Every ordered pair of lab nodes, `true` when its probes cross the lossy link.
fn pairs() -> Vec<(&'static str, &'static str, bool)> {
    let mut out = Vec::new();
    for a in NODES {
        for b in NODES {
            if a != b {
                out.push((a, b, a == LOSSY || b == LOSSY));
            }
        }
    }
    out
}

/// `(node, peer)` → `(loss, stale)`.
type Pairs = BTreeMap<(String, String), (f64, bool)>;

/// The pairs of `health --json`, and the whole reply.
fn matrix(lab: &MeshLab) -> Result<(Pairs, Value)> {
    let v: Value = serde_json::from_str(&lab.controller(&["health", "--json"])?)?;
    let mut m = BTreeMap::new();
    for p in v["pairs"].as_array().context("pairs")? {
        m.insert(
            (
                p["node"].as_str().unwrap_or_default().to_string(),
                p["peer"].as_str().unwrap_or_default().to_string(),
            ),
            (
                p["loss"].as_f64().unwrap_or(-1.0),
                p["stale"].as_bool().unwrap_or(true),
            ),
        );
    }
    Ok((m, v))
}

/// 30% loss on the egress of `node`'s underlay interface; returns how.
fn add_loss(lab: &MeshLab, node: &str) -> Result<&'static str> {
    let pct = format!("{LOSS_PERCENT}%");
    let netem = lab
        .cmd(&[
            "x", node, "tc", "qdisc", "add", "dev", "eth0", "root", "netem", "loss", &pct,
        ])
        .output()?;
    if netem.status.success() {
        return Ok("tc netem");
    }
    let why = String::from_utf8_lossy(&netem.stderr).trim().to_string();
    println!("tc netem unavailable ({why}); dropping {pct} with nftables numgen instead");
    let rules = format!(
        "table inet zmlabloss {{\n chain out {{\n  type filter hook output priority 0; policy accept;\n  \
         oifname \"eth0\" numgen random mod 100 < {LOSS_PERCENT} drop\n }}\n}}\n"
    );
    let mut child = lab
        .cmd(&["x", node, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("nft stdin")?
        .write_all(rules.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("nft: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok("nftables numgen")
}

/// `promtool check metrics` on `text`: `Ok(None)` when it passes, `Ok(Some(why))` when
/// promtool is missing.
fn promtool(text: &str) -> Result<Option<String>> {
    if !have("promtool") {
        return Ok(Some(
            "promtool not installed (apt-get install prometheus)".into(),
        ));
    }
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("promtool stdin")?
        .write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "promtool check metrics failed:\n{}{}\n--- input\n{text}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(None)
}

/// The value of the sample `name{labels}` in a text exposition.
fn sample(text: &str, name: &str, labels: &str) -> Option<f64> {
    let prefix = format!("{name}{{{labels}}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}

/// The class and `data-loss` of the node-by-node heat map cell from `from` to `to`.
fn heat_cell(page: &str, from: &str, to: &str) -> Option<(String, f64)> {
    let table = &page[page.find("id=\"node-heat\"")?..];
    let table = &table[..table.find("</table>")?];
    let at = table.find(&format!(
        "data-from=\"{from}\" data-to=\"{to}\" data-loss=\""
    ))?;
    let before = &table[..at];
    let class = before[before.rfind("class=\"")? + 7..]
        .split('"')
        .next()?
        .to_string();
    let loss = table[at..]
        .split("data-loss=\"")
        .nth(1)?
        .split('"')
        .next()?;
    Some((class, loss.parse().ok()?))
}

fn add_admin(lab: &MeshLab) -> Result<()> {
    let mut child = Command::new(bin("zonemesh-controller"))
        .arg("--data-dir")
        .arg(lab.dir.join("ctl"))
        .args(["user", "add", "--email", ADMIN, "--role", "admin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(format!("{PASSWORD}\n").as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("user add: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

#[test]
fn loss_on_one_link_shows_for_exactly_its_pairs_in_health_metrics_and_dashboard() -> Result<()> {
    if let Some(why) = skip_reason() {
        println!("skipped: {why}");
        return Ok(());
    }
    for tool in ["curl", "oathtool", "nft", "tc"] {
        if !have(tool) {
            println!("skipped: {tool} not installed");
            return Ok(());
        }
    }
    let lab = MeshLab::up_with(
        &format!("zh{}", std::process::id() % 10_000),
        &[
            ("LAB_ZONES", "a b c"),
            ("LAB_NODES", "1"),
            ("CTL_ARGS", &format!("--metrics-listen {CTL_METRICS}")),
            ("AGENT_ARGS", &format!("--metrics-listen {AGENT_METRICS}")),
        ],
    )?;

    // Every pair measured, fresh and without loss, before the link degrades.
    let started = Instant::now();
    loop {
        let (m, raw) = matrix(&lab)?;
        let clean = pairs().iter().all(|(a, b, _)| {
            m.get(&(key(a), key(b)))
                .is_some_and(|(loss, stale)| *loss == 0.0 && !stale)
        });
        if clean {
            break;
        }
        if started.elapsed() > Duration::from_secs(90) {
            bail!(
                "the healthy mesh never measured clean: {raw}\n{}",
                lab.logs(LOSSY)
            );
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    println!("all pairs measured clean after {:?}", started.elapsed());

    let how = add_loss(&lab, LOSSY)?;
    let degraded = Instant::now();
    let (m, raw) = loop {
        let (m, raw) = matrix(&lab)?;
        let seen = pairs()
            .iter()
            .filter(|(_, _, lossy)| *lossy)
            .all(|(a, b, _)| {
                m.get(&(key(a), key(b)))
                    .is_some_and(|(loss, _)| *loss > 0.0)
            });
        if seen {
            break (m, raw);
        }
        if degraded.elapsed() > Duration::from_secs(120) {
            bail!("loss through {LOSSY} not reported for every pair: {raw}");
        }
        std::thread::sleep(Duration::from_secs(2));
    };
    println!(
        "{LOSS_PERCENT}% loss on {LOSSY}'s link ({how}) reported for its 4 pairs after {:?}",
        degraded.elapsed()
    );
    for (a, b, lossy) in pairs() {
        let (loss, stale) = m[&(key(a), key(b))];
        assert!(!stale, "{a} -> {b} stale: {raw}");
        if !lossy {
            assert_eq!(loss, 0.0, "{a} -> {b} does not cross {LOSSY}'s link: {raw}");
        }
    }
    let worst = raw["worst"][0]["node"]
        .as_str()
        .unwrap_or_default()
        .to_string()
        + " "
        + raw["worst"][0]["peer"].as_str().unwrap_or_default();
    assert!(worst.contains(&key(LOSSY)), "worst pair {worst}: {raw}");

    // The controller's /metrics.
    let url = |addr: &str| format!("http://{addr}/metrics");
    let ctl_text = lab.run(&[
        "x",
        "hub",
        "curl",
        "-sS",
        "--max-time",
        "10",
        &url(CTL_METRICS),
    ])?;
    for (a, b, lossy) in pairs() {
        let labels = format!(
            "zone=\"zone-{}\",node=\"{a}\",peer_zone=\"zone-{}\",peer=\"{b}\"",
            &a[..1],
            &b[..1]
        );
        let v = sample(&ctl_text, "zonemesh_peer_loss_ratio", &labels)
            .with_context(|| format!("no loss sample for {a} -> {b}:\n{ctl_text}"))?;
        if lossy {
            assert!(v > 0.0, "{a} -> {b}: {v}\n{ctl_text}");
        } else {
            assert_eq!(v, 0.0, "{a} -> {b}\n{ctl_text}");
        }
    }
    assert!(
        ctl_text.contains("\nzonemesh_nodes_enrolled 3\n"),
        "{ctl_text}"
    );
    assert!(
        ctl_text.contains("\nzonemesh_watch_streams 3\n"),
        "{ctl_text}"
    );
    assert!(
        ctl_text.contains("zonemesh_enrollments_total{result=\"ok\"} 3\n"),
        "{ctl_text}"
    );

    // The agents' /metrics: the lossy node sees loss to both peers, an other node only
    // to the lossy one.
    let agent_text = |n: &str| {
        lab.run(&[
            "x",
            n,
            "curl",
            "-sS",
            "--max-time",
            "10",
            &url(AGENT_METRICS),
        ])
    };
    let a_text = agent_text(LOSSY)?;
    let b_text = agent_text("b1")?;
    let peer = |n: &str| format!("peer_zone=\"zone-{}\",peer=\"{n}\"", &n[..1]);
    for (text, of, to, lossy) in [
        (&a_text, LOSSY, "b1", true),
        (&a_text, LOSSY, "c1", true),
        (&b_text, "b1", LOSSY, true),
        (&b_text, "b1", "c1", false),
    ] {
        let v = sample(text, "zonemesh_agent_peer_loss_ratio", &peer(to))
            .with_context(|| format!("{of} has no loss figure for {to}:\n{text}"))?;
        assert_eq!(v > 0.0, lossy, "{of} -> {to}: {v}\n{text}");
        let hs = sample(text, "zonemesh_agent_peer_handshake_age_seconds", &peer(to))
            .with_context(|| format!("{of} has no handshake age for {to}"))?;
        assert!(hs < 300.0, "{of} -> {to} handshake {hs} s ago");
        let rx = sample(text, "zonemesh_agent_peer_rx_bytes_total", &peer(to)).unwrap_or(0.0);
        assert!(rx > 0.0, "{of} received nothing from {to}:\n{text}");
    }
    assert!(
        a_text.contains("\nzonemesh_agent_watch_connected 1\n"),
        "{a_text}"
    );
    let delivered = sample(
        &a_text,
        "zonemesh_agent_dataplane_packets_total",
        "direction=\"delivered\"",
    )
    .unwrap_or(0.0);
    assert!(delivered > 0.0, "{a_text}");
    // The log followers' counters are there (zero: the lab agents follow no log; the
    // log flood test checks their values) and promtool accepts them below.
    for name in [
        "logwatch_lines",
        "logwatch_overlong_lines",
        "logwatch_matches",
        "logwatch_events_dropped",
    ] {
        let line = format!("\nzonemesh_agent_{name}_total 0\n");
        assert!(a_text.contains(&line), "no {line:?} in\n{a_text}");
    }

    for (what, text) in [
        ("controller", &ctl_text),
        ("agent a1", &a_text),
        ("agent b1", &b_text),
    ] {
        match promtool(text)? {
            None => println!("promtool check metrics accepts the {what}'s /metrics"),
            Some(why) => println!("skipped promtool check of the {what}: {why}"),
        }
    }

    // The dashboard's heat map, read by a signed-in admin.
    add_admin(&lab)?;
    let root = lab.dir.join("root.pem");
    std::fs::write(&root, lab.controller(&["ca", "export", "--root"])?)?;
    let web = CurlSession::new(
        "https://198.18.100.1:8443",
        root,
        lab.dir.join("cookies"),
        Box::new(|args: &[String]| {
            let mut argv = vec!["x", "hub", "curl"];
            argv.extend(args.iter().map(String::as_str));
            lab.run(&argv)
        }),
    );
    web.sign_in(ADMIN, PASSWORD)?;
    let page = web.get("/dashboard")?;
    assert!(page.contains("id=\"node-heat\""), "no heat map:\n{page}");
    for (a, b, lossy) in pairs() {
        let (class, loss) = heat_cell(&page, &key(a), &key(b))
            .with_context(|| format!("no heat map cell {a} -> {b}:\n{page}"))?;
        if lossy {
            assert!(loss > 0.0 && class != "h-ok", "{a} -> {b}: {class} {loss}");
        } else {
            assert!(loss == 0.0 && class == "h-ok", "{a} -> {b}: {class} {loss}");
        }
    }
    let zone_cell = "data-from=\"zone-b\" data-to=\"zone-c\" data-loss=\"0.000\"";
    assert!(page.contains(zone_cell), "zone b -> c is clean:\n{page}");
    assert!(page.contains("id=\"worst-pairs\""), "{page}");
    Ok(())
}
