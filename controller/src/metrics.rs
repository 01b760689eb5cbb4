//! The controller's metrics, served as `GET /metrics` on `serve --metrics-listen ADDR`.
//!
//! [`Metrics`] is cheap to clone and shared by every layer: the authority counts the
//! certificates it issues and revokes, the mesh counts enrollments, blocks and security
//! events. What is a state rather than an event (the mesh version, open Watch streams,
//! blocks in force, sign-in counters kept by the web side, the health matrix) is read at
//! scrape time from a [`SampleSource`] the running controller attaches, so nothing is
//! copied between scrapes and nothing can drift.
//!
//! Label values are bounded: event kinds outside [`KNOWN_EVENT_KINDS`] count as `other`,
//! certificate kinds and enrollment results are fixed sets, and per-pair health series
//! exist only for pairs of enrolled nodes (the source filters them), at most
//! [`MAX_HEALTH_PAIRS`].

use parking_lot::RwLock;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use std::sync::Arc;

pub use zonemesh_deploy::exposition::{
    CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE, prometheus_text, wants_openmetrics,
};

/// Security event kinds counted under their own label; any other kind counts as `other`.
/// A new detector adds its kind here.
pub const KNOWN_EVENT_KINDS: &[&str] = &[
    "ssh.auth_failure",
    "tls.auth_failure",
    "http.auth_failure",
    "sip.auth_failure",
    "log.auth_failure",
    "signin.failure",
    "wireguard.unknown_key",
    "wireguard.invalid_handshake",
    "wireguard.spoofed_source",
];

/// Most per-pair health series one scrape exposes (each pair has three).
pub const MAX_HEALTH_PAIRS: usize = 20_000;

/// What a certificate was issued for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CertKind {
    /// A node certificate (enrollment, renewal, `ca issue-node`).
    Node,
    /// A TLS certificate for a node's service or `ca issue-tls`.
    Tls,
    /// An internal portal certificate for a domain's edges.
    Portal,
}

impl CertKind {
    fn label(self) -> &'static str {
        match self {
            Self::Node => "node",
            Self::Tls => "tls",
            Self::Portal => "portal",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PairLabels {
    zone: String,
    node: String,
    peer_zone: String,
    peer: String,
}

/// Loss and latency that `node` last reported towards `peer` (both `zone/node`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PairHealth {
    pub node: String,
    pub peer: String,
    /// Share of probes lost, 0.0–1.0.
    pub loss: f64,
    /// Round trip of the last reply; `None` when no probe was answered.
    pub rtt_seconds: Option<f64>,
    /// Seconds since the report arrived.
    pub age_seconds: f64,
}

/// The state read at scrape time.
#[derive(Clone, Debug, Default)]
pub struct Sample {
    pub mesh_version: u64,
    pub watch_streams: u64,
    pub nodes_enrolled: u64,
    pub blocks_active: u64,
    pub signin_success: u64,
    pub signin_failure: u64,
    pub signin_throttled: u64,
    /// Only pairs of enrolled nodes.
    pub pairs: Vec<PairHealth>,
}

/// Where a scrape reads the controller's state; may read the store (scrapes run on the
/// blocking pool).
pub trait SampleSource: Send + Sync {
    fn sample(&self) -> Sample;
}

#[derive(Default)]
struct SampleSlot(RwLock<Option<Arc<dyn SampleSource>>>);

impl std::fmt::Debug for SampleSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SampleSlot")
            .field("attached", &self.0.read().is_some())
            .finish()
    }
}

fn split_key(key: &str) -> (&str, &str) {
    key.split_once('/').unwrap_or(("", key))
}

impl Collector for SampleSlot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(source) = self.0.read().clone() else {
            return Ok(());
        };
        let s = source.sample();
        let gauges: [(&str, &str, u64); 4] = [
            (
                "mesh_version",
                "Version of the mesh change log.",
                s.mesh_version,
            ),
            ("watch_streams", "Open Watch streams.", s.watch_streams),
            (
                "nodes_enrolled",
                "Enrolled, unrevoked nodes.",
                s.nodes_enrolled,
            ),
            ("blocks_active", "Source blocks in force.", s.blocks_active),
        ];
        for (name, help, v) in gauges {
            let g = ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX));
            g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
        }
        let counters: [(&str, &str, u64); 3] = [
            ("signin_success", "Successful sign-ins.", s.signin_success),
            (
                "signin_failure",
                "Failed password checks (unknown accounts included).",
                s.signin_failure,
            ),
            (
                "signin_throttled",
                "Sign-in attempts refused by the throttle.",
                s.signin_throttled,
            ),
        ];
        for (name, help, v) in counters {
            let c = ConstCounter::new(v);
            c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)?;
        }
        let pairs = &s.pairs[..s.pairs.len().min(MAX_HEALTH_PAIRS)];
        let labels = |p: &PairHealth| {
            let (zone, node) = split_key(&p.node);
            let (peer_zone, peer) = split_key(&p.peer);
            PairLabels {
                zone: zone.to_string(),
                node: node.to_string(),
                peer_zone: peer_zone.to_string(),
                peer: peer.to_string(),
            }
        };
        type Value = fn(&PairHealth) -> Option<f64>;
        let series: [(&str, &str, Value); 3] = [
            (
                "peer_loss_ratio",
                "Share of ICMP probes through the tunnel that node sent to peer and lost.",
                |p| Some(p.loss),
            ),
            (
                "peer_rtt_seconds",
                "Round trip of node's last answered probe to peer.",
                |p| p.rtt_seconds,
            ),
            (
                "peer_report_age_seconds",
                "Seconds since node last reported its health towards peer.",
                |p| Some(p.age_seconds),
            ),
        ];
        for (name, help, value) in series {
            let mut family = encoder.encode_descriptor(
                name,
                help,
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for p in pairs {
                if let Some(v) = value(p) {
                    let g = ConstGauge::new(v);
                    g.encode(family.encode_family(&labels(p))?)?;
                }
            }
        }
        Ok(())
    }
}

struct Inner {
    registry: Registry,
    issued: Family<KindLabel, Counter>,
    revoked: Counter,
    enrollments: Family<ResultLabel, Counter>,
    blocks_added: Counter,
    blocks_expired: Counter,
    blocks_removed: Counter,
    events: Family<KindLabel, Counter>,
    source: Arc<SampleSlot>,
}

/// The controller's counters and the scrape-time gauges; clones share them.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every counter at zero, no sample source attached.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("zonemesh");
        let issued = Family::<KindLabel, Counter>::default();
        let revoked = Counter::default();
        let enrollments = Family::<ResultLabel, Counter>::default();
        let (blocks_added, blocks_expired, blocks_removed) =
            (Counter::default(), Counter::default(), Counter::default());
        let events = Family::<KindLabel, Counter>::default();
        registry.register(
            "certificates_issued",
            "Certificates issued, by kind (node, tls, portal)",
            issued.clone(),
        );
        registry.register(
            "certificates_revoked",
            "Certificates revoked",
            revoked.clone(),
        );
        registry.register(
            "enrollments",
            "Enrollment requests, by result (ok, refused)",
            enrollments.clone(),
        );
        registry.register("blocks_added", "Source blocks placed", blocks_added.clone());
        registry.register(
            "blocks_expired",
            "Source blocks that ran out",
            blocks_expired.clone(),
        );
        registry.register(
            "blocks_removed",
            "Source blocks lifted before their end",
            blocks_removed.clone(),
        );
        registry.register(
            "security_events",
            "Security events reported by agents, by kind (unknown kinds as other)",
            events.clone(),
        );
        // Families with no sample yet still show their help and type.
        for r in ["ok", "refused"] {
            drop(enrollments.get_or_create(&ResultLabel { result: r }));
        }
        for k in [CertKind::Node, CertKind::Tls, CertKind::Portal] {
            drop(issued.get_or_create(&KindLabel { kind: k.label() }));
        }
        for &kind in KNOWN_EVENT_KINDS.iter().chain(&["other"]) {
            drop(events.get_or_create(&KindLabel { kind }));
        }
        let source = Arc::new(SampleSlot::default());
        registry.register_collector(Box::new(source.clone()));
        Self {
            inner: Arc::new(Inner {
                registry,
                issued,
                revoked,
                enrollments,
                blocks_added,
                blocks_expired,
                blocks_removed,
                events,
                source,
            }),
        }
    }

    /// Read the scrape-time state from `source` from now on.
    pub fn attach_source(&self, source: Arc<dyn SampleSource>) {
        *self.inner.source.0.write() = Some(source);
    }

    /// One certificate issued.
    pub fn certificate_issued(&self, kind: CertKind) {
        self.inner
            .issued
            .get_or_create(&KindLabel { kind: kind.label() })
            .inc();
    }

    /// `n` certificates revoked.
    pub fn certificates_revoked(&self, n: u64) {
        self.inner.revoked.inc_by(n);
    }

    /// One enrollment request answered, `ok` or refused.
    pub fn enrollment(&self, ok: bool) {
        let result = if ok { "ok" } else { "refused" };
        self.inner
            .enrollments
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    /// One source block placed.
    pub fn block_added(&self) {
        self.inner.blocks_added.inc();
    }

    /// `n` source blocks ran out.
    pub fn blocks_expired(&self, n: u64) {
        self.inner.blocks_expired.inc_by(n);
    }

    /// One source block lifted by an operator or the never-block policy.
    pub fn block_removed(&self) {
        self.inner.blocks_removed.inc();
    }

    /// One security event of `kind` reported (kinds outside [`KNOWN_EVENT_KINDS`] count
    /// as `other`).
    pub fn security_event(&self, kind: &str) {
        let kind = KNOWN_EVENT_KINDS
            .iter()
            .copied()
            .find(|k| *k == kind)
            .unwrap_or("other");
        self.inner.events.get_or_create(&KindLabel { kind }).inc();
    }

    /// The text exposition (OpenMetrics, which Prometheus reads); reads the sample source,
    /// so call it on the blocking pool.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.inner.registry);
        out
    }
}

/// `GET /metrics` over `metrics`.
pub fn router(metrics: Metrics) -> axum::Router {
    use axum::http::{StatusCode, header};
    use axum::response::IntoResponse;
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(move |headers: axum::http::HeaderMap| {
            let m = metrics.clone();
            let om = wants_openmetrics(headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()));
            async move {
                match crate::blocking::run_infallible(move || m.encode()).await {
                    Ok(text) => {
                        let (ctype, body) = zonemesh_deploy::exposition::body(text, om);
                        ([(header::CONTENT_TYPE, ctype)], body).into_response()
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "metrics scrape failed");
                        StatusCode::INTERNAL_SERVER_ERROR.into_response()
                    }
                }
            }
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(Sample);
    impl SampleSource for Fixed {
        fn sample(&self) -> Sample {
            self.0.clone()
        }
    }

    #[test]
    fn counters_and_samples_appear_with_bounded_labels() {
        let m = Metrics::new();
        m.certificate_issued(CertKind::Node);
        m.certificate_issued(CertKind::Node);
        m.certificates_revoked(3);
        m.enrollment(false);
        m.security_event("ssh.auth_failure");
        m.security_event("made.up\"kind");
        m.security_event("another.one");
        m.attach_source(Arc::new(Fixed(Sample {
            mesh_version: 42,
            watch_streams: 2,
            pairs: vec![PairHealth {
                node: "z1/a".into(),
                peer: "z2/b".into(),
                loss: 0.25,
                rtt_seconds: Some(0.0015),
                age_seconds: 3.0,
            }],
            ..Default::default()
        })));
        let text = m.encode();
        for line in [
            "zonemesh_certificates_issued_total{kind=\"node\"} 2",
            "zonemesh_certificates_issued_total{kind=\"portal\"} 0",
            "zonemesh_certificates_revoked_total 3",
            "zonemesh_enrollments_total{result=\"refused\"} 1",
            "zonemesh_security_events_total{kind=\"ssh.auth_failure\"} 1",
            "zonemesh_security_events_total{kind=\"other\"} 2",
            "zonemesh_mesh_version 42",
            "zonemesh_watch_streams 2",
            "zonemesh_peer_loss_ratio{zone=\"z1\",node=\"a\",peer_zone=\"z2\",peer=\"b\"} 0.25",
            "zonemesh_peer_rtt_seconds{zone=\"z1\",node=\"a\",peer_zone=\"z2\",peer=\"b\"} 0.0015",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        assert!(!text.contains("made.up"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn the_prometheus_form_names_counters_with_their_suffix() {
        let m = Metrics::new();
        m.block_added();
        let text = prometheus_text(&m.encode());
        assert!(
            text.contains("# TYPE zonemesh_blocks_added_total counter\n"),
            "{text}"
        );
        assert!(text.contains("# HELP zonemesh_blocks_added_total Source blocks placed.\n"));
        assert!(text.contains("zonemesh_blocks_added_total 1\n"));
        assert!(!text.contains("# EOF"));
        assert!(wants_openmetrics(Some(
            "application/openmetrics-text;version=1.0.0,text/plain;q=0.5"
        )));
        assert!(!wants_openmetrics(Some("*/*")) && !wants_openmetrics(None));
    }

    #[test]
    fn without_a_source_only_counters_are_served() {
        let text = Metrics::new().encode();
        assert!(text.contains("zonemesh_certificates_revoked_total 0"));
        assert!(!text.contains("zonemesh_mesh_version"));
    }
}
