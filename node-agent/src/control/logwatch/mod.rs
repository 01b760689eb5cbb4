//! Authentication failures from the node's own logs, as security events for the controller.
//!
//! Sources come from `run --watch-log KIND:WHERE` (repeatable) and from `sources.toml` in the
//! state directory. Each file is followed on the blocking pool with `tail -F` semantics
//! (start at the end, follow a rename to the new file, start over after a truncation); the
//! journal is read through `journalctl -f -o json`. Lines are capped ([`lines::MAX_LINE`]),
//! parsed by a fixed pattern ([`patterns`]) and queued without waiting into the agent's
//! bounded event queue: when it is full the event is dropped and counted, so a flood never
//! holds up the data plane, the Watch stream or the follower itself.

pub mod lines;
pub mod patterns;

use lines::{LineSplitter, MAX_LINE};
use patterns::{Hit, Parser};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use zonemesh_proto as pb;

/// How often a followed file is looked at.
const POLL: Duration = Duration::from_millis(200);
/// Bytes read from a file per step.
const READ_CHUNK: usize = 64 * 1024;
/// Most sources one agent follows.
pub const MAX_SOURCES: usize = 32;
/// Longest journal record (JSON) looked at; its MESSAGE is then capped at [`MAX_LINE`].
const MAX_JOURNAL_RECORD: usize = 16 * 1024;

/// What a source is.
#[derive(Clone, Debug)]
pub enum SourceKind {
    Sshd,
    Kamailio,
    Asterisk,
    /// An operator pattern.
    Regex(String),
}

/// Where a source is read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    File(PathBuf),
    /// sshd's journal (the ssh/sshd units, or `sshd` records from root: [`JOURNAL_MATCHES`]).
    Journal,
}

/// One configured source.
#[derive(Clone, Debug)]
pub struct LogSource {
    pub kind: SourceKind,
    pub origin: Origin,
}

/// A source that cannot be used, with a one-line reason.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(
        "--watch-log {0:?}: expected sshd:PATH, sshd:journal, kamailio:PATH, asterisk:PATH or regex:PATH:PATTERN"
    )]
    Syntax(String),
    #[error("{0}")]
    Pattern(#[from] patterns::PatternError),
    #[error("{path}: {err}")]
    Config { path: String, err: String },
    #[error("at most {MAX_SOURCES} log sources")]
    TooMany,
}

impl LogSource {
    /// Parse `--watch-log` (`sshd:/var/log/auth.log`, `sshd:journal`,
    /// `regex:/var/log/app.log:PATTERN`).
    pub fn parse(spec: &str) -> Result<Self, SourceError> {
        let bad = || SourceError::Syntax(spec.to_string());
        let (kind, rest) = spec.split_once(':').ok_or_else(bad)?;
        if rest.is_empty() {
            return Err(bad());
        }
        let file = |p: &str| Origin::File(PathBuf::from(p));
        let s = match kind {
            "sshd" if rest == "journal" => Self {
                kind: SourceKind::Sshd,
                origin: Origin::Journal,
            },
            "sshd" => Self {
                kind: SourceKind::Sshd,
                origin: file(rest),
            },
            "kamailio" => Self {
                kind: SourceKind::Kamailio,
                origin: file(rest),
            },
            "asterisk" => Self {
                kind: SourceKind::Asterisk,
                origin: file(rest),
            },
            "regex" => {
                let (path, pattern) = rest.split_once(':').ok_or_else(bad)?;
                if path.is_empty() || pattern.is_empty() {
                    return Err(bad());
                }
                Self {
                    kind: SourceKind::Regex(pattern.to_string()),
                    origin: file(path),
                }
            }
            _ => return Err(bad()),
        };
        s.parser()?;
        Ok(s)
    }

    /// The parser of this source's lines.
    pub fn parser(&self) -> Result<Parser, SourceError> {
        Ok(match (&self.kind, &self.origin) {
            (SourceKind::Sshd, Origin::Journal) => Parser::SshdMessage,
            (SourceKind::Sshd, _) => Parser::SshdFile,
            (SourceKind::Kamailio, _) => Parser::Kamailio,
            (SourceKind::Asterisk, _) => Parser::Asterisk,
            (SourceKind::Regex(p), _) => Parser::regex(p)?,
        })
    }

    /// For logs: `sshd:/var/log/auth.log`.
    pub fn describe(&self) -> String {
        let kind = match &self.kind {
            SourceKind::Sshd => "sshd",
            SourceKind::Kamailio => "kamailio",
            SourceKind::Asterisk => "asterisk",
            SourceKind::Regex(_) => "regex",
        };
        match &self.origin {
            Origin::File(p) => format!("{kind}:{}", p.display()),
            Origin::Journal => format!("{kind}:journal"),
        }
    }
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SourcesFile {
    #[serde(default)]
    source: Vec<SourceEntry>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SourceEntry {
    kind: String,
    path: Option<PathBuf>,
    #[serde(default)]
    journal: bool,
    pattern: Option<String>,
}

/// The sources of a `sources.toml` (see the README); an absent file has none.
pub fn load_sources_file(path: &Path) -> Result<Vec<LogSource>, SourceError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(SourceError::Config {
                path: path.display().to_string(),
                err: e.to_string(),
            });
        }
    };
    let cfg_err = |err: String| SourceError::Config {
        path: path.display().to_string(),
        err,
    };
    let file: SourcesFile = toml::from_str(&text).map_err(|e| cfg_err(e.message().to_string()))?;
    let mut out = Vec::new();
    for (i, e) in file.source.into_iter().enumerate() {
        let n = i + 1;
        let origin = match (&e.path, e.journal) {
            (Some(p), false) => Origin::File(p.clone()),
            (None, true) if e.kind == "sshd" => Origin::Journal,
            (None, true) => {
                return Err(cfg_err(format!("source {n}: only sshd reads the journal")));
            }
            _ => {
                return Err(cfg_err(format!(
                    "source {n}: give exactly one of path = \"...\" or journal = true"
                )));
            }
        };
        let kind = match (e.kind.as_str(), e.pattern) {
            ("sshd", None) => SourceKind::Sshd,
            ("kamailio", None) => SourceKind::Kamailio,
            ("asterisk", None) => SourceKind::Asterisk,
            ("regex", Some(p)) => SourceKind::Regex(p),
            ("regex", None) => return Err(cfg_err(format!("source {n}: regex needs pattern"))),
            (k, Some(_)) if k != "regex" => {
                return Err(cfg_err(format!("source {n}: only regex takes a pattern")));
            }
            (k, _) => {
                return Err(cfg_err(format!(
                    "source {n}: unknown kind {k:?} (sshd, kamailio, asterisk or regex)"
                )));
            }
        };
        let s = LogSource { kind, origin };
        s.parser()?;
        out.push(s);
    }
    Ok(out)
}

/// `--watch-log` sources followed by those of `sources.toml`, checked.
pub fn configured(flags: &[LogSource], sources_file: &Path) -> Result<Vec<LogSource>, SourceError> {
    let mut all = flags.to_vec();
    all.extend(load_sources_file(sources_file)?);
    if all.len() > MAX_SOURCES {
        return Err(SourceError::TooMany);
    }
    Ok(all)
}

/// What the followers did, for `status` and the metrics.
#[derive(Debug, Default)]
pub struct LogwatchStats {
    /// Lines read.
    pub lines: AtomicU64,
    /// Lines that named a failure.
    pub matched: AtomicU64,
    /// Events dropped because the queue to the controller was full.
    pub dropped: AtomicU64,
    /// Lines dropped for being longer than the cap.
    pub overlong: AtomicU64,
}

impl LogwatchStats {
    /// Add what `split` dropped as overlong since `reported` (one follower's count, so
    /// that several sources add up rather than overwrite each other).
    fn add_overlong(&self, split: &LineSplitter, reported: &mut u64) {
        let new = split.overlong.saturating_sub(*reported);
        if new > 0 {
            self.overlong.fetch_add(new, Ordering::Relaxed);
            *reported = split.overlong;
        }
    }
}

/// Hands hits to the agent's bounded event queue without waiting.
#[derive(Clone, Debug)]
pub struct EventQueue {
    tx: mpsc::Sender<pb::SecurityEvent>,
    stats: Arc<LogwatchStats>,
}

impl EventQueue {
    pub fn new(tx: mpsc::Sender<pb::SecurityEvent>, stats: Arc<LogwatchStats>) -> Self {
        Self { tx, stats }
    }

    /// Queue `hit` from `origin`; counts a drop when the queue is full.
    pub fn offer(&self, hit: &Hit, origin: &str) {
        self.stats.matched.fetch_add(1, Ordering::Relaxed);
        let ev = pb::SecurityEvent {
            kind: hit.kind.to_string(),
            source: hit.source.to_string(),
            detail: format!("{origin} {}", hit.rule),
            at_unix: zonemesh_ca::unix_secs(SystemTime::now()),
        };
        if self.tx.try_send(ev).is_err() {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn stats(&self) -> &LogwatchStats {
        &self.stats
    }
}

/// Follow every source until `shutdown`; returns when all followers have ended.
pub async fn run(sources: Vec<LogSource>, queue: EventQueue, shutdown: CancellationToken) {
    let mut tasks = tokio::task::JoinSet::new();
    for s in sources {
        let parser = match s.parser() {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(source = %s.describe(), error = %e, "log source skipped");
                continue;
            }
        };
        tracing::info!(source = %s.describe(), "following log source");
        let q = queue.clone();
        let stop = shutdown.clone();
        match s.origin.clone() {
            Origin::File(path) => {
                let name = s.describe();
                tasks.spawn_blocking(move || follow_file(&path, &parser, &name, &q, &stop));
            }
            Origin::Journal => {
                tasks.spawn(follow_journal(parser, s.describe(), q, stop));
            }
        }
    }
    while tasks.join_next().await.is_some() {}
}

/// An open file and where reading stopped.
struct Open {
    file: std::fs::File,
    id: (u64, u64),
    pos: u64,
}

fn open_at(path: &Path, at_end: bool) -> Option<Open> {
    let mut file = std::fs::File::open(path).ok()?;
    let meta = file.metadata().ok()?;
    let pos = if at_end {
        file.seek(SeekFrom::End(0)).ok()?
    } else {
        0
    };
    Some(Open {
        file,
        id: (meta.dev(), meta.ino()),
        pos,
    })
}

/// `tail -F`: start at the end of `path`; after a rename, read the old file to its end and
/// then the new one from its start; after a truncation, start over. Runs on the blocking
/// pool until `stop`.
pub fn follow_file(
    path: &Path,
    parser: &Parser,
    name: &str,
    queue: &EventQueue,
    stop: &CancellationToken,
) {
    let mut split = LineSplitter::new(MAX_LINE);
    let mut cur = open_at(path, true);
    if cur.is_none() {
        tracing::info!(source = %name, "log file absent; waiting for it to appear");
    }
    let mut buf = vec![0u8; READ_CHUNK];
    let stats = queue.stats();
    let mut overlong_reported = 0;
    let mut on_line = |line: &str| {
        stats.lines.fetch_add(1, Ordering::Relaxed);
        if let Some(hit) = parser.parse(line) {
            queue.offer(&hit, name);
        }
    };
    while !stop.is_cancelled() {
        if let Some(o) = cur.as_mut() {
            // A file shorter than what was read was truncated: start over.
            if o.file.metadata().is_ok_and(|m| m.len() < o.pos) {
                tracing::info!(source = %name, "log file truncated; reading from its start");
                let _ = o.file.seek(SeekFrom::Start(0));
                o.pos = 0;
                split.reset();
            }
            drain(o, &mut buf, &mut split, &mut on_line, stop);
        }
        // A different file under the name: the old one was rotated away (and read to its
        // end above); the new one is read from its start.
        let now_id = std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()));
        match (&cur, now_id) {
            (Some(o), Some(id)) if o.id != id => {
                tracing::info!(source = %name, "log file rotated; following the new file");
                split.reset();
                cur = open_at(path, false);
                continue;
            }
            (None, Some(_)) => {
                cur = open_at(path, false);
                continue;
            }
            _ => {}
        }
        stats.add_overlong(&split, &mut overlong_reported);
        std::thread::sleep(POLL);
    }
}

fn drain(
    o: &mut Open,
    buf: &mut [u8],
    split: &mut LineSplitter,
    on_line: &mut impl FnMut(&str),
    stop: &CancellationToken,
) {
    while !stop.is_cancelled() {
        match o.file.read(buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                o.pos += n as u64;
                split.push(&buf[..n], &mut *on_line);
            }
        }
    }
}

/// Which journal records are sshd's: those of the ssh/sshd units, and those tagged `sshd`
/// or `sshd-session` by a root process (an sshd run outside systemd). `_SYSTEMD_UNIT` and
/// `_UID` are set by journald from the sender's credentials, so an unprivileged local user
/// cannot write a record that passes as sshd's with `logger -t sshd`.
pub const JOURNAL_MATCHES: [&str; 9] = [
    "_SYSTEMD_UNIT=ssh.service",
    "+",
    "_SYSTEMD_UNIT=sshd.service",
    "+",
    "_UID=0",
    "SYSLOG_IDENTIFIER=sshd",
    "+",
    "_UID=0",
    "SYSLOG_IDENTIFIER=sshd-session",
];

/// sshd's journal ([`JOURNAL_MATCHES`]) through `journalctl -f -o json` until `stop`;
/// skipped, with a log line, where journalctl is not installed. New records only, from
/// `--since=now`: with matches, `-n 0` loses records written together after the seek to
/// the tail (journalctl 252; the live journal test writes four at once).
async fn follow_journal(parser: Parser, name: String, queue: EventQueue, stop: CancellationToken) {
    use tokio::io::AsyncReadExt;
    let child = tokio::process::Command::new("journalctl")
        .args(["-f", "-o", "json", "--since=now", "--no-pager"])
        .args(JOURNAL_MATCHES)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::warn!(source = %name, "journalctl not installed: sshd:journal skipped");
            return;
        }
        Err(e) => {
            tracing::warn!(source = %name, error = %e, "journalctl did not start: sshd:journal skipped");
            return;
        }
    };
    let Some(mut out) = child.stdout.take() else {
        return;
    };
    let mut split = LineSplitter::new(MAX_JOURNAL_RECORD);
    let mut buf = vec![0u8; READ_CHUNK];
    let mut overlong_reported = 0;
    loop {
        let n = tokio::select! {
            _ = stop.cancelled() => break,
            r = out.read(&mut buf) => match r { Ok(0) | Err(_) => break, Ok(n) => n },
        };
        split.push(&buf[..n], |record| {
            queue.stats().lines.fetch_add(1, Ordering::Relaxed);
            if let Some(msg) = journal_message(record)
                && let Some(hit) = parser.parse(&msg)
            {
                queue.offer(&hit, &name);
            }
        });
        queue.stats().add_overlong(&split, &mut overlong_reported);
    }
    let _ = child.kill().await;
}

/// The MESSAGE of one journal record, when it is sshd's and at most [`MAX_LINE`] bytes.
/// journalctl writes a non-UTF-8 message as an array of bytes.
pub fn journal_message(record: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(record).ok()?;
    let ident = v.get("SYSLOG_IDENTIFIER").and_then(|i| i.as_str());
    if !matches!(ident, Some("sshd" | "sshd-session")) {
        return None;
    }
    let msg = match v.get("MESSAGE")? {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Array(bytes) => {
            let raw: Vec<u8> = bytes
                .iter()
                .take(MAX_LINE + 1)
                .map(|b| b.as_u64().and_then(|b| u8::try_from(b).ok()))
                .collect::<Option<_>>()?;
            String::from_utf8_lossy(&raw).into_owned()
        }
        _ => return None,
    };
    (msg.len() <= MAX_LINE).then_some(msg)
}

#[cfg(test)]
mod tests;
