//! The dashboard's loss and latency heat map: zone by zone, node by node and the worst
//! pairs, as plain tables. Each cell carries its figures as text and a colour class, so the
//! map reads the same without JavaScript, without colours and in a screen reader.

use super::pages::esc;
use crate::mesh::{HealthMatrix, PairHealth};
use std::fmt::Write as _;

/// Loss from which a cell is a warning, and from which it is bad.
pub const WARN_LOSS: f32 = 0.01;
pub const BAD_LOSS: f32 = 0.10;
/// Round trips (microseconds) from which a cell is a warning, and from which it is bad.
pub const WARN_RTT_MICROS: u32 = 100_000;
pub const BAD_RTT_MICROS: u32 = 500_000;
/// The node-by-node matrix is drawn for at most this many nodes (the zone matrix, the
/// worst pairs and `health --json` cover any fleet).
pub const MAX_MATRIX_NODES: usize = 64;

/// The colour class of a measurement.
pub fn class(loss: f32, rtt_micros: Option<u32>, stale: bool) -> &'static str {
    let rtt = rtt_micros.unwrap_or(0);
    if stale {
        "h-stale"
    } else if loss >= BAD_LOSS || rtt >= BAD_RTT_MICROS {
        "h-bad"
    } else if loss >= WARN_LOSS || rtt >= WARN_RTT_MICROS {
        "h-warn"
    } else {
        "h-ok"
    }
}

fn pct(loss: f32) -> String {
    format!("{:.0}%", f64::from(loss) * 100.0)
}

fn ms(rtt: Option<u32>) -> String {
    rtt.map_or_else(
        || "no reply".into(),
        |us| format!("{:.2} ms", f64::from(us) / 1000.0),
    )
}

fn figures(loss: f32, rtt: Option<u32>, stale: bool) -> String {
    let s = format!("{} · {}", pct(loss), ms(rtt));
    if stale { format!("stale: {s}") } else { s }
}

fn pair_cell(p: &PairHealth) -> String {
    format!(
        r#"<td class="{cls}" data-from="{from}" data-to="{to}" data-loss="{loss:.3}" data-stale="{stale}" title="{from} to {to}, reported {age} s ago">{text}</td>"#,
        cls = class(p.loss, p.rtt_micros, p.stale),
        from = esc(&p.node),
        to = esc(&p.peer),
        loss = p.loss,
        stale = p.stale,
        age = p.age_secs,
        text = esc(&figures(p.loss, p.rtt_micros, p.stale)),
    )
}

fn zone_table(m: &HealthMatrix) -> String {
    let mut t = String::from(
        r#"<div class="scroll"><table class="heat" id="zone-heat"><thead><tr><th>From \ to</th>"#,
    );
    for z in &m.zones {
        let _ = write!(t, "<th>{}</th>", esc(z));
    }
    t.push_str("</tr></thead><tbody>");
    for from in &m.zones {
        let _ = write!(t, "<tr><th>{}</th>", esc(from));
        for to in &m.zones {
            match m.zone_pair(from, to) {
                Some(z) if z.pairs > 0 => {
                    let _ = write!(
                        t,
                        r#"<td class="{cls}" data-from="{f}" data-to="{to}" data-loss="{loss:.3}" title="{n} pairs; worst loss {max}">{text}</td>"#,
                        cls = class(z.mean_loss, z.mean_rtt_micros, false),
                        f = esc(from),
                        to = esc(to),
                        loss = z.mean_loss,
                        n = z.pairs,
                        max = pct(z.max_loss),
                        text = esc(&figures(z.mean_loss, z.mean_rtt_micros, false)),
                    );
                }
                Some(z) => {
                    let _ = write!(
                        t,
                        r#"<td class="h-stale" data-from="{}" data-to="{}" data-stale="true">stale ({} pairs)</td>"#,
                        esc(from),
                        esc(to),
                        z.stale_pairs
                    );
                }
                None => {
                    let _ = write!(
                        t,
                        r#"<td class="h-none" data-from="{}" data-to="{}">–</td>"#,
                        esc(from),
                        esc(to)
                    );
                }
            }
        }
        t.push_str("</tr>");
    }
    t.push_str("</tbody></table></div>");
    t
}

fn node_table(m: &HealthMatrix) -> String {
    let nodes = &m.nodes[..m.nodes.len().min(MAX_MATRIX_NODES)];
    let mut t = String::from(
        r#"<div class="scroll"><table class="heat" id="node-heat"><thead><tr><th>From \ to</th>"#,
    );
    for n in nodes {
        let _ = write!(t, "<th>{}</th>", esc(n));
    }
    t.push_str("</tr></thead><tbody>");
    for from in nodes {
        let _ = write!(t, "<tr><th>{}</th>", esc(from));
        for to in nodes {
            if from == to {
                t.push_str(r#"<td class="h-self">·</td>"#);
                continue;
            }
            match m.pair(from, to) {
                Some(p) => t.push_str(&pair_cell(p)),
                None => {
                    let _ = write!(
                        t,
                        r#"<td class="h-none" data-from="{}" data-to="{}">–</td>"#,
                        esc(from),
                        esc(to)
                    );
                }
            }
        }
        t.push_str("</tr>");
    }
    t.push_str("</tbody></table></div>");
    if m.nodes.len() > nodes.len() {
        let _ = write!(
            t,
            "<p>The first {} of {} nodes are shown; <code>zonemesh-controller health --json</code> lists every pair.</p>",
            nodes.len(),
            m.nodes.len()
        );
    }
    t
}

fn worst_table(m: &HealthMatrix) -> String {
    if m.worst.is_empty() {
        return r#"<p id="worst-pairs">No fresh reports yet.</p>"#.into();
    }
    let mut t = String::from(
        r#"<table id="worst-pairs"><thead><tr><th>From</th><th>To</th><th>Loss</th><th>Round trip</th><th>Reported</th></tr></thead><tbody>"#,
    );
    for p in &m.worst {
        let _ = write!(
            t,
            r#"<tr class="{cls}" data-from="{from}" data-to="{to}"><td>{from}</td><td>{to}</td><td>{loss}</td><td>{rtt}</td><td>{age} s ago</td></tr>"#,
            cls = class(p.loss, p.rtt_micros, p.stale),
            from = esc(&p.node),
            to = esc(&p.peer),
            loss = pct(p.loss),
            rtt = esc(&ms(p.rtt_micros)),
            age = p.age_secs,
        );
    }
    t.push_str("</tbody></table>");
    t
}

/// The dashboard card.
pub fn card(m: &HealthMatrix) -> String {
    if m.nodes.len() < 2 {
        return r#"<div class="card" id="health"><h2>Loss and latency</h2><p>The heat map appears once two nodes are enrolled.</p></div>"#.into();
    }
    format!(
        r#"<div class="card" id="health"><h2>Loss and latency</h2>
<p>What each node (row) measures towards each peer (column) with ICMP probes through the tunnels: loss over the last probes and the last round trip. Green under {warn}% loss and {warn_ms} ms, red from {bad}% or {bad_ms} ms, grey when the report is older than {stale} s, a dash where no tunnel is measured.</p>
<h3>Zone by zone</h3>{zones}
<h3>Node by node</h3>{nodes}
<h3>Worst pairs</h3>{worst}</div>"#,
        warn = WARN_LOSS * 100.0,
        bad = BAD_LOSS * 100.0,
        warn_ms = WARN_RTT_MICROS / 1000,
        bad_ms = BAD_RTT_MICROS / 1000,
        stale = m.stale_after_secs,
        zones = zone_table(m),
        nodes = node_table(m),
        worst = worst_table(m),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::ZoneHealth;

    fn pair(node: &str, peer: &str, loss: f32, stale: bool) -> PairHealth {
        PairHealth {
            node: node.into(),
            zone: node.split('/').next().unwrap().into(),
            peer: peer.into(),
            peer_zone: peer.split('/').next().unwrap().into(),
            loss,
            rtt_micros: Some(1500),
            reported_unix: 0,
            age_secs: if stale { 90 } else { 5 },
            stale,
        }
    }

    #[test]
    fn cells_carry_figures_and_classes_and_names_are_escaped() {
        let lossy = pair("a/1", "b/<x>", 0.3, false);
        let m = HealthMatrix {
            stale_after_secs: 60,
            zones: vec!["a".into(), "b".into()],
            nodes: vec!["a/1".into(), "b/<x>".into()],
            pairs: vec![lossy.clone(), pair("b/<x>", "a/1", 0.0, true)],
            zone_pairs: vec![ZoneHealth {
                zone: "a".into(),
                peer_zone: "b".into(),
                pairs: 1,
                stale_pairs: 0,
                mean_loss: 0.3,
                max_loss: 0.3,
                mean_rtt_micros: Some(1500),
            }],
            worst: vec![lossy],
        };
        let html = card(&m);
        assert!(!html.contains("<x>"), "{html}");
        assert!(
            html.contains(
                r#"class="h-bad" data-from="a/1" data-to="b/&lt;x&gt;" data-loss="0.300""#
            ),
            "{html}"
        );
        assert!(html.contains("30% · 1.50 ms"), "{html}");
        assert!(html.contains("stale: 0% · 1.50 ms"), "{html}");
        assert!(
            html.contains(r#"<td class="h-none" data-from="b" data-to="a">"#),
            "{html}"
        );
        assert!(html.contains(r#"id="worst-pairs""#));
        assert_eq!(class(0.0, Some(1000), false), "h-ok");
        assert_eq!(class(0.05, None, false), "h-warn");
        assert_eq!(class(0.0, Some(600_000), false), "h-bad");
    }
}
