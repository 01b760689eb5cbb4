//! What a `/metrics` scrape costs as the fleet grows: building the health view from the
//! reports of N fully meshed nodes and encoding it with every counter, next to the anchor
//! measured in the same run, a scrape with no health source (the counters alone).
//!
//! Run: `cargo bench -p zonemesh-controller --bench metrics_scrape` (or, without a release
//! build, `cargo test -p zonemesh-controller --bench metrics_scrape`: the controller's own
//! code is then unoptimised, dependencies are built with opt-level 3).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use zonemesh_controller::mesh::{HealthRow, health_view};
use zonemesh_controller::metrics::{Metrics, PairHealth, Sample, SampleSource};

struct Fleet {
    reports: BTreeMap<String, Vec<HealthRow>>,
    enrolled: BTreeSet<String>,
    now: SystemTime,
}

impl Fleet {
    fn new(nodes: usize) -> Self {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let names: Vec<String> = (0..nodes)
            .map(|i| format!("zone-{}/node-{i}", i % 5))
            .collect();
        let reports = names
            .iter()
            .map(|n| {
                let rows = names
                    .iter()
                    .filter(|p| *p != n)
                    .enumerate()
                    .map(|(j, p)| HealthRow {
                        peer: p.clone(),
                        loss: (j % 7) as f32 / 20.0,
                        rtt_micros: 500 + j as u32,
                        reported_unix: 999_995,
                    })
                    .collect();
                (n.clone(), rows)
            })
            .collect();
        Self {
            reports,
            enrolled: names.into_iter().collect(),
            now,
        }
    }
}

impl SampleSource for Fleet {
    fn sample(&self) -> Sample {
        let m = health_view(&self.reports, &self.enrolled, self.now);
        Sample {
            nodes_enrolled: m.nodes.len() as u64,
            pairs: m
                .pairs
                .iter()
                .map(|p| PairHealth {
                    node: p.node.clone(),
                    peer: p.peer.clone(),
                    loss: f64::from(p.loss),
                    rtt_seconds: p.rtt_micros.map(|us| f64::from(us) / 1e6),
                    age_seconds: p.age_secs as f64,
                })
                .collect(),
            ..Default::default()
        }
    }
}

/// Median time of one `encode` and the size of its output.
fn scrape(m: &Metrics, runs: usize) -> (Duration, usize) {
    let mut times = Vec::with_capacity(runs);
    let mut len = 0;
    for _ in 0..runs {
        let t = Instant::now();
        len = m.encode().len();
        times.push(t.elapsed());
    }
    times.sort();
    (times[runs / 2], len)
}

fn main() {
    let anchor = Metrics::new();
    for k in ["ssh.auth_failure", "tls.auth_failure", "x"] {
        anchor.security_event(k);
    }
    let (base, base_len) = scrape(&anchor, 200);
    println!("anchor (counters only): {base:?} per scrape, {base_len} bytes");
    for nodes in [10, 50, 100, 141] {
        let m = Metrics::new();
        m.attach_source(Arc::new(Fleet::new(nodes)));
        let runs = if nodes > 50 { 11 } else { 51 };
        let (t, len) = scrape(&m, runs);
        println!(
            "{nodes:>4} nodes, {:>6} pairs: {t:>10.2?} per scrape ({:>7.1}x the anchor), {:>8} bytes, {:.2} us per pair",
            nodes * (nodes - 1),
            t.as_secs_f64() / base.as_secs_f64(),
            len,
            t.as_secs_f64() * 1e6 / (nodes * (nodes - 1)) as f64
        );
    }
}
