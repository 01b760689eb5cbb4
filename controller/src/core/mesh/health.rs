//! The health matrix as operators see it: every pair of enrolled nodes that reported loss
//! and latency, summarised zone by zone, the worst pairs first, and reports too old to
//! trust marked stale. The dashboard, `health --json` and `/metrics` all read this one
//! view, so they cannot disagree.

use super::Mesh;
use crate::error::Result;
use crate::store::unix;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

/// A report older than this is shown as stale (agents report every 10 s).
pub const STALE_AFTER: Duration = Duration::from_secs(60);
/// Pairs listed as the worst.
pub const WORST_PAIRS: usize = 10;

/// What `node` last measured towards `peer` (both `zone/node`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PairHealth {
    pub node: String,
    pub zone: String,
    pub peer: String,
    pub peer_zone: String,
    /// Share of recent probes lost, 0.0–1.0.
    pub loss: f32,
    /// Round trip of the last answered probe; `None` when none was answered.
    pub rtt_micros: Option<u32>,
    pub reported_unix: u64,
    /// Seconds between the report and the moment the view was taken.
    pub age_secs: u64,
    /// Older than [`STALE_AFTER`]: the figures may no longer hold.
    pub stale: bool,
}

/// The pairs from the nodes of `zone` to the nodes of `peer_zone`, summarised.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ZoneHealth {
    pub zone: String,
    pub peer_zone: String,
    /// Pairs with a fresh report.
    pub pairs: usize,
    /// Pairs whose report is stale (not in the figures below).
    pub stale_pairs: usize,
    /// Mean loss over the fresh pairs.
    pub mean_loss: f32,
    /// Worst loss of one fresh pair.
    pub max_loss: f32,
    /// Mean round trip over the fresh pairs that have one.
    pub mean_rtt_micros: Option<u32>,
}

/// The whole view.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HealthMatrix {
    pub stale_after_secs: u64,
    /// Zones that hold enrolled nodes, sorted.
    pub zones: Vec<String>,
    /// Enrolled, unrevoked nodes (`zone/node`), sorted.
    pub nodes: Vec<String>,
    /// Every reported pair of enrolled nodes, by node then peer.
    pub pairs: Vec<PairHealth>,
    /// Zone to zone, for every zone pair with at least one report.
    pub zone_pairs: Vec<ZoneHealth>,
    /// The fresh pairs with the highest loss (then the longest round trip), at most
    /// [`WORST_PAIRS`]; pairs without loss are listed only by round trip.
    pub worst: Vec<PairHealth>,
}

impl HealthMatrix {
    /// The reported pair from `node` to `peer`.
    pub fn pair(&self, node: &str, peer: &str) -> Option<&PairHealth> {
        self.pairs.iter().find(|p| p.node == node && p.peer == peer)
    }

    /// The summary from `zone` to `peer_zone`.
    pub fn zone_pair(&self, zone: &str, peer_zone: &str) -> Option<&ZoneHealth> {
        self.zone_pairs
            .iter()
            .find(|z| z.zone == zone && z.peer_zone == peer_zone)
    }
}

fn zone_of(key: &str) -> &str {
    key.split_once('/').map_or("", |(z, _)| z)
}

/// Build the view from raw reports (`node` → its rows), keeping only pairs whose both ends
/// are in `enrolled`. Pure: the time is a parameter.
pub fn matrix(
    reports: &BTreeMap<String, Vec<super::HealthRow>>,
    enrolled: &BTreeSet<String>,
    now: SystemTime,
) -> HealthMatrix {
    let now_unix = unix(now);
    let mut pairs = Vec::new();
    for (node, rows) in reports {
        if !enrolled.contains(node) {
            continue;
        }
        let mut seen = BTreeSet::new();
        for r in rows {
            if r.peer == *node || !enrolled.contains(&r.peer) || !seen.insert(&r.peer) {
                continue;
            }
            let age_secs = now_unix.saturating_sub(r.reported_unix);
            pairs.push(PairHealth {
                node: node.clone(),
                zone: zone_of(node).to_string(),
                peer: r.peer.clone(),
                peer_zone: zone_of(&r.peer).to_string(),
                loss: if r.loss.is_finite() {
                    r.loss.clamp(0.0, 1.0)
                } else {
                    1.0
                },
                rtt_micros: (r.rtt_micros > 0).then_some(r.rtt_micros),
                reported_unix: r.reported_unix,
                age_secs,
                stale: age_secs > STALE_AFTER.as_secs(),
            });
        }
    }
    pairs.sort_by(|a, b| (&a.node, &a.peer).cmp(&(&b.node, &b.peer)));

    let mut by_zone: BTreeMap<(&str, &str), Vec<&PairHealth>> = BTreeMap::new();
    for p in &pairs {
        by_zone.entry((&p.zone, &p.peer_zone)).or_default().push(p);
    }
    let zone_pairs = by_zone
        .into_iter()
        .map(|((zone, peer_zone), list)| {
            let fresh: Vec<&&PairHealth> = list.iter().filter(|p| !p.stale).collect();
            let n = fresh.len();
            let rtts: Vec<u64> = fresh
                .iter()
                .filter_map(|p| p.rtt_micros.map(u64::from))
                .collect();
            ZoneHealth {
                zone: zone.to_string(),
                peer_zone: peer_zone.to_string(),
                pairs: n,
                stale_pairs: list.len() - n,
                mean_loss: if n == 0 {
                    0.0
                } else {
                    fresh.iter().map(|p| p.loss).sum::<f32>() / n as f32
                },
                max_loss: fresh.iter().map(|p| p.loss).fold(0.0, f32::max),
                mean_rtt_micros: (!rtts.is_empty()).then(|| {
                    u32::try_from(rtts.iter().sum::<u64>() / rtts.len() as u64).unwrap_or(u32::MAX)
                }),
            }
        })
        .collect();

    let mut worst: Vec<PairHealth> = pairs.iter().filter(|p| !p.stale).cloned().collect();
    worst.sort_by(|a, b| {
        b.loss
            .total_cmp(&a.loss)
            .then(b.rtt_micros.unwrap_or(0).cmp(&a.rtt_micros.unwrap_or(0)))
            .then((&a.node, &a.peer).cmp(&(&b.node, &b.peer)))
    });
    worst.truncate(WORST_PAIRS);

    let zones: BTreeSet<String> = enrolled.iter().map(|n| zone_of(n).to_string()).collect();
    HealthMatrix {
        stale_after_secs: STALE_AFTER.as_secs(),
        zones: zones.into_iter().collect(),
        nodes: enrolled.iter().cloned().collect(),
        pairs,
        zone_pairs,
        worst,
    }
}

impl Mesh {
    /// The health matrix of the enrolled nodes as of `now` (reads the store).
    pub fn health_matrix(&self, now: SystemTime) -> Result<HealthMatrix> {
        let enrolled: BTreeSet<String> = self
            .store
            .nodes()?
            .into_iter()
            .filter(|n| !n.revoked)
            .map(|n| n.key())
            .collect();
        let reports: BTreeMap<String, Vec<super::HealthRow>> =
            self.health.lock().clone().into_iter().collect();
        Ok(matrix(&reports, &enrolled, now))
    }
}

#[cfg(test)]
mod tests {
    use super::super::HealthRow;
    use super::*;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn row(peer: &str, loss: f32, rtt: u32, when: u64) -> HealthRow {
        HealthRow {
            peer: peer.into(),
            loss,
            rtt_micros: rtt,
            reported_unix: when,
        }
    }

    #[test]
    fn only_enrolled_pairs_with_zone_summaries_worst_first_and_stale_marked() {
        let enrolled: BTreeSet<String> = ["a/1", "a/2", "b/1"].map(String::from).into();
        let mut reports = BTreeMap::new();
        reports.insert(
            "a/1".to_string(),
            vec![
                row("b/1", 0.3, 2000, 1000),
                row("a/2", 0.0, 500, 1000),
                row("gone/x", 0.9, 1, 1000),
                row("a/1", 0.5, 1, 1000),
                row("b/1", 0.9, 1, 1000),
            ],
        );
        reports.insert("a/2".to_string(), vec![row("b/1", 0.1, 0, 1000)]);
        reports.insert("b/1".to_string(), vec![row("a/1", 0.2, 3000, 900)]);
        reports.insert("stranger/y".to_string(), vec![row("a/1", 1.0, 1, 1000)]);
        let m = matrix(&reports, &enrolled, at(1010));

        let names: Vec<(&str, &str)> = m
            .pairs
            .iter()
            .map(|p| (p.node.as_str(), p.peer.as_str()))
            .collect();
        assert_eq!(
            names,
            [
                ("a/1", "a/2"),
                ("a/1", "b/1"),
                ("a/2", "b/1"),
                ("b/1", "a/1")
            ]
        );
        assert_eq!(m.pair("a/1", "b/1").unwrap().loss, 0.3, "first row wins");
        assert_eq!(m.pair("a/2", "b/1").unwrap().rtt_micros, None);
        let stale = m.pair("b/1", "a/1").unwrap();
        assert!(stale.stale && stale.age_secs == 110, "{stale:?}");

        let ab = m.zone_pair("a", "b").unwrap();
        assert_eq!((ab.pairs, ab.stale_pairs), (2, 0));
        assert!(
            (ab.mean_loss - 0.2).abs() < 1e-6 && ab.max_loss == 0.3,
            "{ab:?}"
        );
        assert_eq!(ab.mean_rtt_micros, Some(2000));
        let ba = m.zone_pair("b", "a").unwrap();
        assert_eq!((ba.pairs, ba.stale_pairs, ba.mean_rtt_micros), (0, 1, None));

        let worst: Vec<(&str, &str)> = m
            .worst
            .iter()
            .map(|p| (p.node.as_str(), p.peer.as_str()))
            .collect();
        assert_eq!(worst, [("a/1", "b/1"), ("a/2", "b/1"), ("a/1", "a/2")]);
        assert_eq!(m.zones, ["a", "b"]);
        assert_eq!(m.nodes, ["a/1", "a/2", "b/1"]);
    }

    #[test]
    fn hostile_figures_are_clamped() {
        let enrolled: BTreeSet<String> = ["a/1", "a/2"].map(String::from).into();
        let mut reports = BTreeMap::new();
        reports.insert("a/1".to_string(), vec![row("a/2", f32::NAN, 1, 5)]);
        reports.insert("a/2".to_string(), vec![row("a/1", -3.0, 1, 99)]);
        let m = matrix(&reports, &enrolled, at(10));
        assert_eq!(m.pair("a/1", "a/2").unwrap().loss, 1.0);
        assert_eq!(m.pair("a/2", "a/1").unwrap().loss, 0.0);
        assert_eq!(m.pair("a/2", "a/1").unwrap().age_secs, 0, "a future report");
    }
}
