//! The append-only audit log of security decisions (sign-ins, failures, blocks, tokens,
//! revocations), kept in the sled tree `audit`.
//!
//! Keys are big-endian `u64` sequence numbers, so iteration order is write order; values are
//! JSON. There is deliberately no update or delete API. Every record is on disk before
//! `record`/`record_durable` returns (through the shared group-commit [`Flusher`]): a
//! security decision must survive a crash, and is durable before the action's reply.

use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::durable::{FlushError, Flusher};

/// Name of the sled tree holding the audit log.
pub const AUDIT_TREE: &str = "audit";

/// Errors from the audit log.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit store: {0}")]
    Store(#[from] crate::core::kv::KvError),
    #[error("audit record encoding: {0}")]
    Encoding(#[from] serde_json::Error),
    #[error("audit sequence {0} already written (the log is append-only)")]
    Duplicate(u64),
    #[error("audit flush: {0}")]
    Flush(#[from] FlushError),
}

/// Result alias for the audit log.
pub type Result<T, E = AuditError> = std::result::Result<T, E>;

/// One security decision, as the caller describes it. Never put secrets in it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// What happened, dotted: `signin.failure`, `source.blocked`, `token.created`, `node.revoked`.
    pub kind: String,
    /// Who did it (a user's e-mail, a node's SPIFFE id, `cli`).
    pub actor: Option<String>,
    /// What it was done to (an account, a node, a token id).
    pub subject: Option<String>,
    /// The network source of the request, when there is one.
    pub source: Option<IpAddr>,
    /// `ok`, `denied`, `blocked`, ...
    pub outcome: String,
    /// Free-form, human-readable context without secrets.
    pub detail: Option<String>,
}

impl AuditEvent {
    /// A new event of `kind` with `outcome`; fill the rest with the builder methods.
    pub fn new(kind: impl Into<String>, outcome: impl Into<String>) -> Self {
        Self {
            kind: kind.into(),
            outcome: outcome.into(),
            ..Self::default()
        }
    }

    /// Set the actor.
    pub fn actor(mut self, actor: impl Into<String>) -> Self {
        self.actor = Some(actor.into());
        self
    }

    /// Set the subject.
    pub fn subject(mut self, subject: impl Into<String>) -> Self {
        self.subject = Some(subject.into());
        self
    }

    /// Set the source address.
    pub fn source(mut self, source: IpAddr) -> Self {
        self.source = Some(source);
        self
    }

    /// Set the detail text.
    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }
}

/// A stored audit record: the event plus its sequence number and time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Position in the log, starting at 1.
    pub seq: u64,
    /// Milliseconds since the Unix epoch when the record was written.
    pub at_unix_ms: u64,
    #[serde(flatten)]
    pub event: AuditEvent,
}

impl AuditRecord {
    /// The record's time.
    pub fn at(&self) -> SystemTime {
        UNIX_EPOCH + std::time::Duration::from_millis(self.at_unix_ms)
    }
}

/// Tries at a sequence number other writers of the same store keep taking first.
const SEQ_RACES: usize = 16;

/// The audit log over the sled tree `audit`.
pub struct AuditLog {
    tree: crate::core::kv::Tree,
    next_seq: Mutex<u64>,
    flusher: Flusher,
}

impl AuditLog {
    /// Open (or create) the audit tree in `db`, with a flusher of its own.
    pub fn open(db: &crate::core::kv::Kv) -> Result<Self> {
        Self::open_with(db.flusher())
    }

    /// Open (or create) the audit tree in the flusher's database; records are made
    /// durable through `flusher`, shared with the other writers of that database.
    pub fn open_with(flusher: &Flusher) -> Result<Self> {
        let tree = flusher.kv().open_tree(AUDIT_TREE)?;
        let next = match tree.last()? {
            Some((k, _)) => decode_seq(&k) + 1,
            None => 1,
        };
        Ok(Self {
            tree,
            next_seq: Mutex::new(next),
            flusher: flusher.clone(),
        })
    }

    /// The durable writer this log flushes through.
    pub fn flusher(&self) -> &Flusher {
        &self.flusher
    }

    /// Append `event`, stamped with the current time, and flush it to disk.
    pub fn record(&self, event: AuditEvent) -> Result<()> {
        self.record_at(event, SystemTime::now()).map(|_| ())
    }

    /// Append `event` stamped with `now` and flush it; returns the sequence number. For
    /// blocking contexts; async code uses [`AuditLog::record_durable`].
    pub fn record_at(&self, event: AuditEvent, now: SystemTime) -> Result<u64> {
        let seq = self.append_at(event, now)?;
        self.flusher.flush_blocking()?;
        Ok(seq)
    }

    /// Append `event` stamped with `now` and wait, without holding an async worker, until
    /// it is on disk (one flush shared with every writer waiting at the same time).
    pub async fn record_durable(&self, event: AuditEvent, now: SystemTime) -> Result<u64> {
        let seq = self.append_at(event, now)?;
        self.flusher.flush().await?;
        Ok(seq)
    }

    /// Append `event` without waiting for the disk: the caller flushes before it replies.
    fn append_at(&self, event: AuditEvent, now: SystemTime) -> Result<u64> {
        let at_unix_ms = now
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        // The lock orders sequence numbers with writes, so keys never go backwards.
        let mut next = self.next_seq.lock().unwrap_or_else(|p| p.into_inner());
        let mut rec = AuditRecord {
            seq: *next,
            at_unix_ms,
            event,
        };
        // Another controller of a shared store may have taken the number: take the one
        // after the last stored and try again (each try is checked absent, so no record
        // is ever written over another).
        for _ in 0..SEQ_RACES {
            let value = serde_json::to_vec(&rec)?;
            if self
                .tree
                .compare_and_swap(rec.seq.to_be_bytes(), None as Option<&[u8]>, Some(value))?
                .is_ok()
            {
                *next = rec.seq + 1;
                return Ok(rec.seq);
            }
            let last = self.tree.last()?.map_or(0, |(k, _)| decode_seq(&k));
            rec.seq = last.max(rec.seq) + 1;
        }
        *next = rec.seq;
        Err(AuditError::Duplicate(rec.seq))
    }

    /// The newest `limit` records (all when `None`), oldest first.
    pub fn list(&self, limit: Option<usize>) -> Result<Vec<AuditRecord>> {
        let mut out = Vec::new();
        for item in self.tree.iter().rev() {
            if limit.is_some_and(|l| out.len() >= l) {
                break;
            }
            let (_, v) = item?;
            out.push(serde_json::from_slice::<AuditRecord>(&v)?);
        }
        out.reverse();
        Ok(out)
    }

    /// Number of records in the log.
    pub fn len(&self) -> Result<usize> {
        Ok(self.tree.len()?)
    }

    /// Whether the log is empty.
    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.tree.is_empty()?)
    }

    /// The records matching `filter`, newest first, older than sequence `before` (all when
    /// `None`): at most `limit` of them, reading at most `max_scan` records, so a page
    /// costs the same however large the log is. [`AuditPage::next_before`] says where the
    /// next page starts.
    pub fn search(
        &self,
        filter: &AuditFilter,
        before: Option<u64>,
        limit: usize,
        max_scan: usize,
    ) -> Result<AuditPage> {
        let end = before.unwrap_or(u64::MAX);
        let mut records = Vec::new();
        let mut scanned = 0;
        let mut last_seen = None;
        let mut iter = self.tree.range(..end.to_be_bytes()).rev();
        let more = loop {
            if records.len() >= limit || scanned >= max_scan {
                break iter.next().is_some();
            }
            let Some(item) = iter.next() else {
                break false;
            };
            let (k, v) = item?;
            scanned += 1;
            last_seen = Some(decode_seq(&k));
            let rec: AuditRecord = serde_json::from_slice(&v)?;
            if filter.matches(&rec) {
                records.push(rec);
            }
        };
        Ok(AuditPage {
            records,
            scanned,
            next_before: if more { last_seen } else { None },
        })
    }
}

/// What the audit browser filters on; an empty field matches every record.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditFilter {
    /// The kind, or its dotted prefix (`user` matches `user.added`).
    pub kind: String,
    /// Part of the actor (case-insensitive).
    pub actor: String,
    /// Part of the subject, the source address or the detail (case-insensitive).
    pub text: String,
    /// From this time on (Unix milliseconds, inclusive).
    pub from_ms: Option<u64>,
    /// Before this time (Unix milliseconds, exclusive).
    pub to_ms: Option<u64>,
}

impl AuditFilter {
    /// Whether `r` passes every field of the filter.
    pub fn matches(&self, r: &AuditRecord) -> bool {
        let e = &r.event;
        let contains = |hay: Option<&str>, needle: &str| {
            hay.is_some_and(|h| h.to_lowercase().contains(&needle.to_lowercase()))
        };
        let kind = self.kind.trim();
        (kind.is_empty()
            || e.kind == kind
            || e.kind
                .strip_prefix(kind)
                .is_some_and(|rest| rest.starts_with('.') || kind.ends_with('.')))
            && (self.actor.trim().is_empty() || contains(e.actor.as_deref(), self.actor.trim()))
            && (self.text.trim().is_empty()
                || contains(e.subject.as_deref(), self.text.trim())
                || contains(e.detail.as_deref(), self.text.trim())
                || contains(e.source.map(|s| s.to_string()).as_deref(), self.text.trim()))
            && self.from_ms.is_none_or(|f| r.at_unix_ms >= f)
            && self.to_ms.is_none_or(|t| r.at_unix_ms < t)
    }
}

/// One page of [`AuditLog::search`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditPage {
    /// Matching records, newest first.
    pub records: Vec<AuditRecord>,
    /// Records read for this page.
    pub scanned: usize,
    /// The sequence number to pass as `before` for the next (older) page; `None` at the
    /// start of the log.
    pub next_before: Option<u64>,
}

fn decode_seq(k: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = k.len().min(8);
    b[8 - n..].copy_from_slice(&k[k.len() - n..]);
    u64::from_be_bytes(b)
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` for a Unix time in milliseconds.
pub fn format_utc(unix_ms: u64) -> String {
    let secs = (unix_ms / 1000) as i64;
    match time::OffsetDateTime::from_unix_timestamp(secs) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
            unix_ms % 1000
        ),
        Err(_) => unix_ms.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_logs_on_one_store_take_turns_without_losing_a_record() {
        // Two controllers of one store, each with its own log over the shared tree.
        let dir = tempfile::tempdir().unwrap();
        let db = crate::core::kv::Kv::sled(dir.path()).unwrap();
        let a = AuditLog::open(&db).unwrap();
        let b = AuditLog::open(&db).unwrap();
        let mut seqs = Vec::new();
        for (i, log) in [&a, &b, &a, &a, &b, &b, &a].into_iter().enumerate() {
            let at = SystemTime::now();
            seqs.push(
                log.record_at(
                    AuditEvent::new("source.blocked", "blocked").detail(i.to_string()),
                    at,
                )
                .unwrap_or_else(|e| panic!("record {i}: {e}")),
            );
        }
        assert_eq!(seqs, (1..=7).collect::<Vec<u64>>());
        let all = a.list(None).unwrap();
        let details: Vec<String> = all.iter().filter_map(|r| r.event.detail.clone()).collect();
        assert_eq!(details, (0..7).map(|i| i.to_string()).collect::<Vec<_>>());
    }

    #[test]
    fn appends_in_order_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = crate::core::kv::Kv::sled(dir.path()).unwrap();
            let log = AuditLog::open(&db).unwrap();
            log.record(
                AuditEvent::new("signin.failure", "denied")
                    .subject("a@example.com")
                    .source("127.0.0.2".parse().unwrap()),
            )
            .unwrap();
            log.record(AuditEvent::new("signin.success", "ok").actor("a@example.com"))
                .unwrap();
        }
        let db = crate::core::kv::Kv::sled(dir.path()).unwrap();
        let log = AuditLog::open(&db).unwrap();
        log.record(AuditEvent::new("source.blocked", "blocked").detail("12 failures"))
            .unwrap();
        let all = log.list(None).unwrap();
        assert_eq!(all.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(all[0].event.kind, "signin.failure");
        assert_eq!(all[2].event.kind, "source.blocked");
        let last = log.list(Some(1)).unwrap();
        assert_eq!(last.len(), 1);
        assert_eq!(last[0].seq, 3);
        let human = crate::cli::render::audit(&all, false);
        assert!(human.contains("source.blocked") && human.contains("127.0.0.2"));
        let json = crate::cli::render::audit(&all, true);
        assert_eq!(json.lines().count(), 3);
        let parsed: AuditRecord = serde_json::from_str(json.lines().next().unwrap()).unwrap();
        assert_eq!(parsed, all[0]);
    }

    #[test]
    fn search_filters_pages_and_bounds_the_scan() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::core::kv::Kv::sled(dir.path()).unwrap();
        let log = AuditLog::open(&db).unwrap();
        let t0 = UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        for i in 0..30u64 {
            let kind = if i % 3 == 0 {
                "zone.added"
            } else {
                "user.added"
            };
            let actor = if i % 2 == 0 { "Ops@Example.com" } else { "cli" };
            log.record_at(
                AuditEvent::new(kind, "ok")
                    .actor(actor)
                    .subject(format!("subject-{i}")),
                t0 + std::time::Duration::from_secs(i),
            )
            .unwrap();
        }
        let all = AuditFilter::default();
        let p = log.search(&all, None, 10, 1000).unwrap();
        assert_eq!(p.records.len(), 10);
        assert_eq!(p.records[0].seq, 30, "newest first");
        assert_eq!(p.next_before, Some(21));
        let p2 = log.search(&all, p.next_before, 10, 1000).unwrap();
        assert_eq!(p2.records[0].seq, 20);
        let last = log.search(&all, Some(5), 10, 1000).unwrap();
        assert_eq!(last.records.len(), 4);
        assert_eq!(last.next_before, None, "the start of the log");

        let zones = AuditFilter {
            kind: "zone".into(),
            ..Default::default()
        };
        let p = log.search(&zones, None, 100, 1000).unwrap();
        assert_eq!(p.records.len(), 10);
        assert!(p.records.iter().all(|r| r.event.kind == "zone.added"));
        let not_a_prefix = AuditFilter {
            kind: "zon".into(),
            ..Default::default()
        };
        assert!(
            log.search(&not_a_prefix, None, 100, 1000)
                .unwrap()
                .records
                .is_empty()
        );

        let f = AuditFilter {
            actor: "ops@example".into(),
            text: "SUBJECT-1".into(),
            from_ms: Some(1_700_000_010_000),
            to_ms: Some(1_700_000_020_000),
            ..Default::default()
        };
        let seqs: Vec<u64> = log
            .search(&f, None, 100, 1000)
            .unwrap()
            .records
            .iter()
            .map(|r| r.seq)
            .collect();
        // Subjects 10..=19 are in the time range (seq = i + 1); the even ones are by Ops.
        assert_eq!(seqs, vec![19, 17, 15, 13, 11]);

        // The scan budget ends a page early, and says where to go on.
        let p = log.search(&zones, None, 100, 4).unwrap();
        assert_eq!(p.scanned, 4);
        assert_eq!(p.records.len(), 1, "of seq 30..=27 only 28 is a zone");
        assert_eq!(p.next_before, Some(27));
    }

    #[test]
    fn utc_format() {
        assert_eq!(format_utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_utc(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
    }
}
