//! The audit log in the console: filtered by kind, actor, text and time range, newest
//! first, 50 records a page, each page reading at most `MAX_SCAN` records.

use std::fmt::Write as _;
use std::time::UNIX_EPOCH;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde::Deserialize;

use super::super::WebState;
use super::super::form::admin_page;
use super::super::pages::esc;
use super::{Message, console_page};
use crate::audit::{AuditFilter, format_utc};

/// Records a page shows.
const PAGE: usize = 50;
/// Records a page reads at most: a narrow filter over a long log pages through it in
/// steps of this size instead of reading it all at once.
const MAX_SCAN: usize = 20_000;
/// Longest filter field kept.
const MAX_FIELD: usize = 200;

#[derive(Deserialize, Default)]
pub(super) struct AuditQuery {
    #[serde(default)]
    kind: String,
    #[serde(default)]
    actor: String,
    #[serde(default)]
    text: String,
    #[serde(default)]
    from: String,
    #[serde(default)]
    to: String,
    #[serde(default)]
    before: Option<u64>,
}

/// `YYYY-MM-DD`, `YYYY-MM-DDTHH:MM` (a browser's date-time field) or with seconds, in
/// UTC, as Unix milliseconds.
fn parse_time(field: &str, s: &str) -> Result<Option<u64>, String> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(None);
    }
    let full = match s.len() {
        10 => format!("{s}T00:00:00Z"),
        16 => format!("{s}:00Z"),
        _ => s.to_string(),
    };
    humantime::parse_rfc3339_weak(full.trim_end_matches('Z'))
        .map(|t| {
            Some(
                t.duration_since(UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0),
            )
        })
        .map_err(|_| {
            format!(
                "{field}: {} is not a UTC time (YYYY-MM-DD or YYYY-MM-DDTHH:MM)",
                crate::text::Escaped(crate::text::cap(s, 40))
            )
        })
}

fn capped(s: &str) -> String {
    crate::text::cap(s.trim(), MAX_FIELD).to_string()
}

/// Percent-encoding for a query value.
fn pct(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            o.push(b as char);
        } else {
            let _ = write!(o, "%{b:02X}");
        }
    }
    o
}

pub(super) async fn page(
    State(state): State<WebState>,
    headers: HeaderMap,
    Query(q): Query<AuditQuery>,
) -> Response {
    let who = match admin_page(&state, &headers).await {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let q = AuditQuery {
        kind: capped(&q.kind),
        actor: capped(&q.actor),
        text: capped(&q.text),
        from: capped(&q.from),
        to: capped(&q.to),
        before: q.before,
    };
    let times = parse_time("from", &q.from).and_then(|f| Ok((f, parse_time("to", &q.to)?)));
    let filter_form = |q: &AuditQuery| {
        format!(
            r#"<form method="get" action="/admin/audit" id="audit-filter">
<label for="kind">Kind (or its prefix: <code>user</code>, <code>node.revoked</code>)</label><input type="text" id="kind" name="kind" value="{kind}">
<label for="actor">Actor</label><input type="text" id="actor" name="actor" value="{actor}">
<label for="text">Subject, source or detail contains</label><input type="text" id="text" name="text" value="{text}">
<label for="from">From (UTC)</label><input type="text" id="from" name="from" value="{from}" placeholder="2026-01-31 or 2026-01-31T08:00">
<label for="to">Before (UTC)</label><input type="text" id="to" name="to" value="{to}">
<button type="submit" id="filter">Show</button></form>"#,
            kind = esc(&q.kind),
            actor = esc(&q.actor),
            text = esc(&q.text),
            from = esc(&q.from),
            to = esc(&q.to),
        )
    };
    let (from_ms, to_ms) = match times {
        Ok(t) => t,
        Err(text) => {
            return console_page(
                &who,
                StatusCode::BAD_REQUEST,
                "Audit log",
                Some(&Message::Error(text)),
                &filter_form(&q),
            );
        }
    };
    let filter = AuditFilter {
        kind: q.kind.clone(),
        actor: q.actor.clone(),
        text: q.text.clone(),
        from_ms,
        to_ms,
    };
    let audit = state.inner.audit.clone();
    let before = q.before;
    let found = crate::blocking::run(move || {
        audit
            .search(&filter, before, PAGE, MAX_SCAN)
            .map_err(super::super::WebError::from)
    })
    .await;
    let page = match found {
        Ok(p) => p,
        Err(e) => return super::super::internal(e),
    };
    let mut rows = String::new();
    for r in &page.records {
        let e = &r.event;
        let _ = write!(
            rows,
            r#"<tr data-seq="{seq}"><td>{seq}</td><td>{at}</td><td class="mono kind">{kind}</td><td>{outcome}</td><td class="actor">{actor}</td><td class="subject">{subject}</td><td class="mono">{source}</td><td>{detail}</td></tr>"#,
            seq = r.seq,
            at = format_utc(r.at_unix_ms),
            kind = esc(&e.kind),
            outcome = esc(&e.outcome),
            actor = esc(e.actor.as_deref().unwrap_or("")),
            subject = esc(e.subject.as_deref().unwrap_or("")),
            source = e.source.map(|s| s.to_string()).unwrap_or_default(),
            detail = esc(e.detail.as_deref().unwrap_or("")),
        );
    }
    if page.records.is_empty() {
        rows.push_str(r#"<tr class="none"><td colspan="8">No matching records here.</td></tr>"#);
    }
    let older = match page.next_before {
        Some(b) => format!(
            r#"<p><a href="/admin/audit?kind={}&amp;actor={}&amp;text={}&amp;from={}&amp;to={}&amp;before={b}" id="older">Older records</a>{}</p>"#,
            pct(&q.kind),
            pct(&q.actor),
            pct(&q.text),
            pct(&q.from),
            pct(&q.to),
            if page.records.len() < PAGE {
                format!(" (this page searched {} records)", page.scanned)
            } else {
                String::new()
            },
        ),
        None => r#"<p id="log-start">The start of the log.</p>"#.to_string(),
    };
    let newest = if q.before.is_some() {
        r#" <a href="/admin/audit" id="newest">Newest</a>"#
    } else {
        ""
    };
    let body = format!(
        r#"{form}
<table id="audit"><thead><tr><th>#</th><th>At (UTC)</th><th>Kind</th><th>Outcome</th><th>Actor</th><th>Subject</th><th>Source</th><th>Detail</th></tr></thead><tbody>{rows}</tbody></table>
{older}{newest}"#,
        form = filter_form(&q),
    );
    console_page(&who, StatusCode::OK, "Audit log", None, &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_query_values() {
        assert_eq!(parse_time("from", ""), Ok(None));
        assert_eq!(
            parse_time("from", "2023-11-14"),
            Ok(Some(1_699_920_000_000))
        );
        assert_eq!(
            parse_time("from", "2023-11-14T22:13"),
            Ok(Some(1_700_000_000_000 - 20_000))
        );
        assert_eq!(
            parse_time("to", "2023-11-14T22:13:20"),
            Ok(Some(1_700_000_000_000))
        );
        assert!(
            parse_time("to", "yesterday")
                .unwrap_err()
                .starts_with("to: ")
        );
        assert_eq!(pct("a b&c=d/é"), "a%20b%26c%3Dd%2F%C3%A9");
    }
}
