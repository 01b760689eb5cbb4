//! The agent's `GET /metrics` (`run --metrics-listen ADDR`, off by default): per-peer
//! handshake age, bytes, loss and round trip, the data plane's packets and drops, the
//! Watch link, the blocklist and the log followers, in the Prometheus/OpenMetrics text format.
//!
//! Everything is read at scrape time from an [`AgentSample`] the run loop builds, so the
//! per-peer series are exactly the current peers (a peer that leaves the mesh leaves the
//! output) and nothing is kept between scrapes. The listener is the shared one
//! (`zonemesh_deploy::listen`): a few connections at once and from one source, a deadline
//! for the first request and for idle connections.

use crate::dataplane::DataPlaneStats;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use zonemesh_deploy::exposition::{
    CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE, prometheus_text, wants_openmetrics,
};

/// Connections at once, in total and from one source (scrapers are few).
const LIMITS: zonemesh_deploy::listen::ConnLimits = zonemesh_deploy::listen::ConnLimits {
    max_conns: 16,
    max_per_source: 4,
};
/// The controller's PKI listener's deadlines: the first request within 10 s of accept, an
/// idle connection closed after 15 s.
const TIMEOUTS: zonemesh_deploy::listen::Timeouts = zonemesh_deploy::listen::Timeouts {
    first_request: zonemesh_deploy::listen::FIRST_REQUEST_TIMEOUT,
    idle: Duration::from_secs(15),
};

/// One current peer as the agent sees it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PeerSample {
    /// `zone/node`.
    pub name: String,
    /// Seconds since the last completed handshake; `None` before the first.
    pub handshake_age_secs: Option<f64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// Share of recent probes lost; `None` before the first probe.
    pub loss: Option<f64>,
    pub rtt_seconds: Option<f64>,
}

/// The agent's state at scrape time.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AgentSample {
    pub watch_connected: bool,
    pub mesh_version: u64,
    pub blocked_sources: u64,
    pub mesh_updates: u64,
    pub syncs: u64,
    pub cert_not_after_unix: u64,
    pub dataplane: DataPlaneStats,
    pub logwatch: LogwatchSample,
    pub peers: Vec<PeerSample>,
}

/// The log followers' counters (`LogwatchStats`) at scrape time.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LogwatchSample {
    /// Lines read (journal records for a journal source).
    pub lines: u64,
    /// Lines dropped unread for being longer than the cap.
    pub overlong: u64,
    /// Lines that named a failure: events offered to the queue to the controller.
    pub matched: u64,
    /// Events dropped because that queue was full.
    pub dropped: u64,
}

/// Builds the sample (called on each scrape, on the blocking pool).
pub type SampleFn = dyn Fn() -> AgentSample + Send + Sync;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabels {
    peer_zone: String,
    peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabel {
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

struct Scrape(Arc<SampleFn>);

impl std::fmt::Debug for Scrape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Scrape")
    }
}

fn peer_labels(name: &str) -> PeerLabels {
    let (zone, node) = name.split_once('/').unwrap_or(("", name));
    PeerLabels {
        peer_zone: zone.to_string(),
        peer: node.to_string(),
    }
}

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = (self.0)();
        let gauge = |v: u64| ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX));
        let gauges = [
            (
                "watch_connected",
                "1 while the Watch stream to the controller is up.",
                u64::from(s.watch_connected),
            ),
            (
                "mesh_version",
                "Version of the mesh the agent holds.",
                s.mesh_version,
            ),
            (
                "blocked_sources",
                "Source addresses on the blocklist the agent enforces.",
                s.blocked_sources,
            ),
            (
                "certificate_not_after",
                "Expiry of the node certificate, Unix seconds.",
                s.cert_not_after_unix,
            ),
            (
                "peers",
                "Peers configured in the data plane.",
                s.peers.len() as u64,
            ),
        ];
        for (name, help, v) in gauges {
            let g = gauge(v);
            g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
        }
        let counters = [
            (
                "mesh_updates",
                "Updates received on the Watch stream.",
                s.mesh_updates,
            ),
            (
                "syncs",
                "Passes that brought the data plane and host in line with the mesh.",
                s.syncs,
            ),
            (
                "logwatch_lines",
                "Log lines the log followers read (--watch-log).",
                s.logwatch.lines,
            ),
            (
                "logwatch_overlong_lines",
                "Log lines dropped unread for being longer than the line cap.",
                s.logwatch.overlong,
            ),
            (
                "logwatch_matches",
                "Log lines that named a failure (events offered to the controller).",
                s.logwatch.matched,
            ),
            (
                "logwatch_events_dropped",
                "Failure events dropped because the queue to the controller was full.",
                s.logwatch.dropped,
            ),
        ];
        for (name, help, v) in counters {
            let c = ConstCounter::new(v);
            c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)?;
        }

        let d = &s.dataplane;
        let mut packets = encoder.encode_descriptor(
            "dataplane_packets",
            "Packets the data plane handled: tun (read from the TUN device), udp (datagrams received), delivered (decrypted to the TUN device).",
            None,
            MetricType::Counter,
        )?;
        for (direction, v) in [
            ("tun", d.tun_packets),
            ("udp", d.udp_datagrams),
            ("delivered", d.delivered_packets),
        ] {
            ConstCounter::new(v).encode(packets.encode_family(&DirectionLabel { direction })?)?;
        }
        let mut drops = encoder.encode_descriptor(
            "dataplane_drops",
            "Packets the data plane dropped, by reason.",
            None,
            MetricType::Counter,
        )?;
        for (reason, v) in [
            ("no_route", d.dropped_no_route),
            ("malformed", d.dropped_malformed),
            ("unknown_session", d.dropped_unknown_session),
            ("rejected", d.dropped_rejected),
            ("spoofed_source", d.dropped_spoofed),
        ] {
            ConstCounter::new(v).encode(drops.encode_family(&ReasonLabel { reason })?)?;
        }

        type Value = fn(&PeerSample) -> Option<f64>;
        let gauges: [(&str, &str, Value); 3] = [
            (
                "peer_handshake_age_seconds",
                "Seconds since the last completed handshake with the peer.",
                |p| p.handshake_age_secs,
            ),
            (
                "peer_loss_ratio",
                "Share of recent ICMP probes through the tunnel to the peer that were lost.",
                |p| p.loss,
            ),
            (
                "peer_rtt_seconds",
                "Round trip of the last answered probe to the peer.",
                |p| p.rtt_seconds,
            ),
        ];
        for (name, help, value) in gauges {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for p in &s.peers {
                if let Some(v) = value(p) {
                    ConstGauge::new(v).encode(family.encode_family(&peer_labels(&p.name))?)?;
                }
            }
        }
        type Count = fn(&PeerSample) -> u64;
        let counters: [(&str, &str, Count); 2] = [
            (
                "peer_rx_bytes",
                "Payload bytes received from the peer.",
                |p| p.rx_bytes,
            ),
            ("peer_tx_bytes", "Payload bytes sent to the peer.", |p| {
                p.tx_bytes
            }),
        ];
        for (name, help, value) in counters {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for p in &s.peers {
                ConstCounter::new(value(p)).encode(family.encode_family(&peer_labels(&p.name))?)?;
            }
        }
        Ok(())
    }
}

/// The agent's metrics registry over a sample function.
pub struct AgentMetrics {
    registry: Registry,
}

impl std::fmt::Debug for AgentMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AgentMetrics")
    }
}

impl AgentMetrics {
    pub fn new(sample: Arc<SampleFn>) -> Self {
        let mut registry = Registry::with_prefix("zonemesh_agent");
        registry.register_collector(Box::new(Scrape(sample)));
        Self { registry }
    }

    /// The text exposition; runs the sample function.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

fn answer(
    metrics: &Arc<AgentMetrics>,
    req: &http::Request<hyper::body::Incoming>,
) -> impl Future<Output = http::Response<String>> + use<> {
    let ok = req.method() == http::Method::GET && req.uri().path() == "/metrics";
    let om = wants_openmetrics(
        req.headers()
            .get(http::header::ACCEPT)
            .and_then(|v| v.to_str().ok()),
    );
    let m = metrics.clone();
    async move {
        let reply = |status: http::StatusCode, ctype: &str, body: String| {
            let mut r = http::Response::new(body);
            *r.status_mut() = status;
            if let Ok(v) = http::HeaderValue::from_str(ctype) {
                r.headers_mut().insert(http::header::CONTENT_TYPE, v);
            }
            r
        };
        if !ok {
            return reply(
                http::StatusCode::NOT_FOUND,
                "text/plain",
                "only GET /metrics\n".into(),
            );
        }
        match tokio::task::spawn_blocking(move || m.encode()).await {
            Ok(text) => {
                let (ctype, body) = zonemesh_deploy::exposition::body(text, om);
                reply(http::StatusCode::OK, ctype, body)
            }
            Err(e) => {
                tracing::error!(error = %e, "metrics scrape failed");
                reply(
                    http::StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    "scrape failed\n".into(),
                )
            }
        }
    }
}

/// Bind `addr` (a failure is a start-up error).
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    use anyhow::Context;
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (--metrics-listen)"))
}

/// Serve `GET /metrics` on `listener` until `shutdown`, with the admission and deadlines
/// of the shared listener module; connections are drained before it returns.
pub async fn serve(listener: TcpListener, metrics: Arc<AgentMetrics>, shutdown: CancellationToken) {
    use zonemesh_deploy::listen::{self, GuardedListener, HttpOptions, TrackedBody};
    let mut listener = GuardedListener::new(listener, "metrics", LIMITS, TIMEOUTS);
    let mut conns = tokio::task::JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        let (io, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            c = listener.accept() => c,
        };
        let activity = io.activity();
        let (m, stop) = (metrics.clone(), shutdown.clone());
        conns.spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                // Counted in flight until the body is sent: the idle deadline waits for it.
                let guard = activity.begin();
                let fut = answer(&m, &req);
                async move {
                    let resp = fut.await;
                    Ok::<_, std::convert::Infallible>(resp.map(|b| TrackedBody::new(b, guard)))
                }
            });
            let opts = HttpOptions {
                h2_only: false,
                max_concurrent_streams: 4,
                keep_alive: Duration::from_secs(15),
            };
            if let Err(e) = listen::serve_connection(io, svc, opts, stop).await {
                tracing::debug!(%peer, error = %e, "metrics connection ended with an error");
            }
        });
    }
    drop(listener);
    listen::drain(conns).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn current_peers_and_counters_are_exposed() {
        let sample = AgentSample {
            watch_connected: true,
            mesh_version: 7,
            blocked_sources: 3,
            dataplane: DataPlaneStats {
                tun_packets: 10,
                dropped_no_route: 1,
                ..Default::default()
            },
            logwatch: LogwatchSample {
                lines: 99,
                overlong: 2,
                matched: 40,
                dropped: 5,
            },
            peers: vec![PeerSample {
                name: "z2/b".into(),
                handshake_age_secs: Some(4.0),
                rx_bytes: 100,
                tx_bytes: 200,
                loss: Some(0.3),
                rtt_seconds: Some(0.002),
            }],
            ..Default::default()
        };
        let m = AgentMetrics::new(Arc::new(move || sample.clone()));
        let text = m.encode();
        for line in [
            "zonemesh_agent_watch_connected 1",
            "zonemesh_agent_mesh_version 7",
            "zonemesh_agent_blocked_sources 3",
            "zonemesh_agent_dataplane_packets_total{direction=\"tun\"} 10",
            "zonemesh_agent_dataplane_drops_total{reason=\"no_route\"} 1",
            "zonemesh_agent_peer_loss_ratio{peer_zone=\"z2\",peer=\"b\"} 0.3",
            "zonemesh_agent_peer_handshake_age_seconds{peer_zone=\"z2\",peer=\"b\"} 4.0",
            "zonemesh_agent_peer_tx_bytes_total{peer_zone=\"z2\",peer=\"b\"} 200",
            "zonemesh_agent_logwatch_lines_total 99",
            "zonemesh_agent_logwatch_overlong_lines_total 2",
            "zonemesh_agent_logwatch_matches_total 40",
            "zonemesh_agent_logwatch_events_dropped_total 5",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
    }
}
