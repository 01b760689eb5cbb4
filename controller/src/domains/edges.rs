//! The open WatchEdge streams and the HTTP-01 challenges being answered: who gets which
//! update, and who has said it holds which token.
//!
//! Each stream has a bounded channel; an edge that falls so far behind that its channel
//! is full is disconnected (it reconnects and gets a fresh snapshot) rather than letting
//! updates pile up. Keys are only ever put on streams of the domain's edge zones.

use parking_lot::Mutex;
use std::collections::{HashMap, HashSet};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use zonemesh_proto as pb;

/// Updates queued per edge stream before it counts as stuck.
pub const EDGE_STREAM_QUEUE: usize = 32;
/// Outstanding HTTP-01 challenges at once (one per running ACME job).
pub const MAX_CHALLENGES: usize = 1024;

struct OpenStream {
    id: u64,
    zone: String,
    tx: mpsc::Sender<pb::EdgeUpdate>,
    cancel: CancellationToken,
}

/// A challenge being answered.
#[derive(Clone, Debug)]
pub struct OpenChallenge {
    pub domain: String,
    pub zones: Vec<String>,
    pub key_authorization: String,
    /// `zone/node` of the edges that said they hold it.
    pub ready: HashSet<String>,
}

/// What a new stream gets.
pub struct EdgeStream {
    pub rx: mpsc::Receiver<pb::EdgeUpdate>,
    /// Cancelled when a newer stream of the same node replaces this one, or it was stuck.
    pub cancel: CancellationToken,
}

/// The streams (one per node: nodes are bounded by enrollment) and the challenges.
#[derive(Default)]
pub struct EdgeHub {
    streams: Mutex<HashMap<String, OpenStream>>,
    next_id: std::sync::atomic::AtomicU64,
    challenges: Mutex<HashMap<String, OpenChallenge>>,
    /// Bumped on every report, challenge confirmation and new edge, so waiting jobs re-check.
    changed: watch::Sender<u64>,
}

impl EdgeHub {
    /// Register a stream for `edge` (`zone/node`) in `zone`, ending its previous one.
    pub fn open(&self, edge: &str, zone: &str) -> EdgeStream {
        let (tx, rx) = mpsc::channel(EDGE_STREAM_QUEUE);
        let cancel = CancellationToken::new();
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let old = self.streams.lock().insert(
            edge.to_string(),
            OpenStream {
                id,
                zone: zone.to_string(),
                tx,
                cancel: cancel.clone(),
            },
        );
        if let Some(old) = old {
            old.cancel.cancel();
        }
        self.bump();
        EdgeStream { rx, cancel }
    }

    /// Forget `edge`'s stream when it is `cancel`'s (a replaced stream leaves the new one).
    pub fn close(&self, edge: &str, cancel: &CancellationToken) {
        let mut map = self.streams.lock();
        if map
            .get(edge)
            .is_some_and(|s| s.cancel.is_cancelled() || &s.cancel == cancel)
        {
            map.remove(edge);
        }
    }

    /// Open streams.
    pub fn connected(&self) -> usize {
        self.streams.lock().len()
    }

    /// Whether `edge` has a stream open now.
    pub fn is_connected(&self, edge: &str) -> bool {
        self.streams.lock().contains_key(edge)
    }

    /// Queue `update` on every stream of `zones`; a stuck stream is ended.
    pub fn push(&self, zones: &[String], update: &pb::EdgeUpdate) -> usize {
        let mut map = self.streams.lock();
        let mut sent = 0;
        let mut stuck = Vec::new();
        for (edge, s) in map.iter() {
            if !zones.contains(&s.zone) {
                continue;
            }
            match s.tx.try_send(update.clone()) {
                Ok(()) => sent += 1,
                Err(_) => stuck.push((edge.clone(), s.id)),
            }
        }
        for (edge, id) in stuck {
            if let Some(s) = map.get(&edge).filter(|s| s.id == id) {
                tracing::warn!(edge = %edge, "edge stream full or closed; ending it (it resyncs on reconnect)");
                s.cancel.cancel();
                map.remove(&edge);
            }
        }
        sent
    }

    /// Start answering a challenge: remembered for snapshots and pushed to the zones.
    pub fn add_challenge(&self, token: &str, c: OpenChallenge) -> Result<(), &'static str> {
        let update = pb::EdgeUpdate {
            challenges: vec![pb::Challenge {
                domain: c.domain.clone(),
                token: token.to_string(),
                key_authorization: c.key_authorization.clone(),
            }],
            ..Default::default()
        };
        let zones = c.zones.clone();
        {
            let mut map = self.challenges.lock();
            if map.len() >= MAX_CHALLENGES && !map.contains_key(token) {
                return Err("too many HTTP-01 challenges outstanding");
            }
            map.insert(token.to_string(), c);
        }
        self.push(&zones, &update);
        Ok(())
    }

    /// Stop answering a challenge.
    pub fn remove_challenge(&self, token: &str) {
        let Some(c) = self.challenges.lock().remove(token) else {
            return;
        };
        let update = pb::EdgeUpdate {
            cleared_tokens: vec![token.to_string()],
            ..Default::default()
        };
        self.push(&c.zones, &update);
    }

    /// `edge` holds `token` for `domain`; false when no such challenge is open.
    pub fn challenge_ready(&self, domain: &str, token: &str, edge: &str) -> bool {
        let ok = match self.challenges.lock().get_mut(token) {
            Some(c) if c.domain == domain => {
                c.ready.insert(edge.to_string());
                true
            }
            _ => false,
        };
        if ok {
            self.bump();
        }
        ok
    }

    /// How many edges hold `token`.
    pub fn ready_count(&self, token: &str) -> usize {
        self.challenges
            .lock()
            .get(token)
            .map(|c| c.ready.len())
            .unwrap_or(0)
    }

    /// The challenges an edge of `zone` must answer.
    pub fn challenges_for(&self, zone: &str) -> Vec<pb::Challenge> {
        self.challenges
            .lock()
            .iter()
            .filter(|(_, c)| c.zones.iter().any(|z| z == zone))
            .map(|(token, c)| pb::Challenge {
                domain: c.domain.clone(),
                token: token.clone(),
                key_authorization: c.key_authorization.clone(),
            })
            .collect()
    }

    /// Something a waiting job may care about happened.
    pub fn bump(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// A receiver that sees every [`Self::bump`].
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_update(domain: &str) -> pb::EdgeUpdate {
        pb::EdgeUpdate {
            certificates: vec![pb::DomainCertificate {
                domain: domain.into(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn updates_go_only_to_the_domains_zones_and_a_stuck_stream_is_ended() {
        let hub = EdgeHub::default();
        let mut eu = hub.open("eu/e1", "eu");
        let us = hub.open("us/e1", "us");
        let zones = vec!["eu".to_string()];
        assert_eq!(hub.push(&zones, &cert_update("a.example")), 1);
        assert_eq!(
            eu.rx.try_recv().unwrap().certificates[0].domain,
            "a.example"
        );
        for _ in 0..=EDGE_STREAM_QUEUE {
            hub.push(&zones, &cert_update("a.example"));
        }
        assert!(eu.cancel.is_cancelled(), "a full queue ends the stream");
        assert!(!us.cancel.is_cancelled());
        assert!(!hub.is_connected("eu/e1") && hub.is_connected("us/e1"));
    }

    #[test]
    fn a_reconnect_replaces_the_old_stream_and_closing_the_old_one_keeps_the_new() {
        let hub = EdgeHub::default();
        let old = hub.open("eu/e1", "eu");
        let new = hub.open("eu/e1", "eu");
        assert!(old.cancel.is_cancelled() && !new.cancel.is_cancelled());
        hub.close("eu/e1", &old.cancel);
        assert!(hub.is_connected("eu/e1"));
        hub.close("eu/e1", &new.cancel);
        assert_eq!(hub.connected(), 0);
    }

    #[test]
    fn challenges_are_bounded_and_confirmed_per_domain() {
        let hub = EdgeHub::default();
        let c = |d: &str| OpenChallenge {
            domain: d.into(),
            zones: vec!["eu".into()],
            key_authorization: "ka".into(),
            ready: HashSet::new(),
        };
        for i in 0..MAX_CHALLENGES {
            hub.add_challenge(&format!("t{i}"), c("a.example")).unwrap();
        }
        assert!(hub.add_challenge("one-more", c("a.example")).is_err());
        assert!(
            !hub.challenge_ready("b.example", "t1", "eu/e1"),
            "wrong domain"
        );
        assert!(hub.challenge_ready("a.example", "t1", "eu/e1"));
        assert_eq!(hub.ready_count("t1"), 1);
        assert_eq!(hub.challenges_for("eu").len(), MAX_CHALLENGES);
        assert!(hub.challenges_for("us").is_empty());
        hub.remove_challenge("t1");
        assert_eq!(hub.ready_count("t1"), 0);
    }
}
