//! How replies are shown: every list as one table (cells escaped) or as `--json`, both from
//! the same typed reply.

use crate::admin::proto::{
    AllowRow, BlockRow, CaCertView, CaRotated, CaShow, DomainView, HealthMatrix, NodeRow,
    UserAdded, ZoneRow,
};
use crate::audit::{AuditRecord, format_utc};
use crate::auth::{ThrottleList, UserSummary};
use crate::text::Escaped;
use serde::Serialize;
use std::fmt::Write as _;

/// A table column: its title, its width (0: not padded), its alignment and what follows it.
#[derive(Clone, Copy)]
pub struct Col {
    title: &'static str,
    width: usize,
    right: bool,
    gap: &'static str,
}

impl Col {
    pub const fn left(title: &'static str, width: usize) -> Self {
        Self {
            title,
            width,
            right: false,
            gap: " ",
        }
    }

    pub const fn right(title: &'static str, width: usize) -> Self {
        Self {
            title,
            width,
            right: true,
            gap: " ",
        }
    }

    /// The last column: not padded.
    pub const fn last(title: &'static str) -> Self {
        Self::left(title, 0)
    }

    /// Separate this column from the next by `gap` instead of one space.
    pub const fn gap(mut self, gap: &'static str) -> Self {
        self.gap = gap;
        self
    }
}

/// The title line and one line per row; every cell is shown with control characters
/// escaped, so a value a client chose cannot rewrite the operator's terminal.
pub fn table<R, I>(cols: &[Col], rows: R) -> String
where
    R: IntoIterator<Item = I>,
    I: IntoIterator<Item = String>,
{
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = String>| {
        for (i, col) in cols.iter().enumerate() {
            let cell = cells.next().unwrap_or_default();
            let w = col.width;
            let _ = if col.right {
                write!(out, "{:>w$}", Escaped(&cell))
            } else {
                write!(out, "{:<w$}", Escaped(&cell))
            };
            if i + 1 < cols.len() {
                out.push_str(col.gap);
            }
        }
        out.push('\n');
    };
    line(&mut cols.iter().map(|c| c.title.to_string()));
    for row in rows {
        line(&mut row.into_iter());
    }
    out
}

/// Pretty JSON and a newline (`zone list`, `node list`, `block list`, `health`, `ca show`).
pub fn pretty<T: Serialize>(v: &T) -> String {
    format!("{}\n", serde_json::to_string_pretty(v).unwrap_or_default())
}

/// One-line JSON and a newline (`user list`, `user add`, `throttle list`).
pub fn compact<T: Serialize>(v: &T) -> String {
    format!("{}\n", serde_json::to_string(v).unwrap_or_default())
}

/// A Unix time as RFC 3339, seconds.
pub fn fmt_unix(secs: u64) -> String {
    humantime::format_rfc3339_seconds(crate::store::from_unix(secs)).to_string()
}

pub fn zones(rows: &[ZoneRow], json: bool) -> String {
    if json {
        return pretty(&rows);
    }
    let cols = [
        Col::left("ZONE", 20),
        Col::left("CIDR", 20),
        Col::right("NODES", 6).gap("  "),
        Col::last("INTRA-ZONE"),
    ];
    table(
        &cols,
        rows.iter().map(|z| {
            [
                z.name.clone(),
                z.cidr.clone(),
                z.nodes.to_string(),
                z.intra_zone_tunnels.to_string(),
            ]
        }),
    )
}

pub fn nodes(rows: &[NodeRow], json: bool) -> String {
    if json {
        return pretty(&rows);
    }
    let cols = [
        Col::left("NODE", 28),
        Col::left("OVERLAY", 16),
        Col::left("SERIAL", 34),
        Col::left("CERT EXPIRES", 22),
        Col::last("STATUS"),
    ];
    table(
        &cols,
        rows.iter().map(|n| {
            [
                format!("{}/{}", n.zone, n.node),
                n.overlay_ip.clone(),
                n.serial.clone(),
                fmt_unix(n.not_after_unix),
                if n.revoked { "revoked" } else { "active" }.to_string(),
            ]
        }),
    )
}

pub fn blocks(rows: &[BlockRow], json: bool) -> String {
    if json {
        return pretty(&rows);
    }
    let cols = [
        Col::left("ADDRESS", 40),
        Col::left("SINCE", 22),
        Col::left("UNTIL", 22),
        Col::right("OFFENCE", 7),
        Col::last("EVIDENCE"),
    ];
    table(
        &cols,
        rows.iter().map(|b| {
            [
                b.address.clone(),
                if b.since_unix == 0 {
                    "-".into()
                } else {
                    fmt_unix(b.since_unix)
                },
                fmt_unix(b.until_unix),
                if b.offence == 0 {
                    "manual".into()
                } else {
                    b.offence.to_string()
                },
                b.reason.clone(),
            ]
        }),
    )
}

pub fn allow_list(rows: &[AllowRow], json: bool) -> String {
    if json {
        return pretty(&rows);
    }
    let cols = [
        Col::left("RANGE", 43),
        Col::left("ADDED", 22),
        Col::last("NOTE"),
    ];
    table(
        &cols,
        rows.iter()
            .map(|a| [a.cidr.clone(), fmt_unix(a.added_unix), a.note.clone()]),
    )
}

/// `health`: one line per reported pair (the JSON also has the zone summaries and the
/// worst pairs, as on the dashboard).
pub fn health(m: &HealthMatrix, json: bool) -> String {
    if json {
        return pretty(m);
    }
    let cols = [
        Col::left("FROM", 24),
        Col::left("TO", 24),
        Col::right("LOSS", 6),
        Col::right("RTT", 10),
        Col::last("AGE"),
    ];
    table(
        &cols,
        m.pairs.iter().map(|r| {
            [
                r.node.clone(),
                r.peer.clone(),
                format!("{:.0}%", f64::from(r.loss) * 100.0),
                r.rtt_micros.map_or_else(
                    || "-".to_string(),
                    |us| format!("{:.2}ms", f64::from(us) / 1000.0),
                ),
                format!("{}s{}", r.age_secs, if r.stale { " stale" } else { "" }),
            ]
        }),
    )
}

/// An account name as typed at sign-in: at most 80 characters shown.
fn account(s: &str) -> String {
    let mut out: String = s.chars().take(80).collect();
    if s.chars().count() > 80 {
        out.push('…');
    }
    out
}

pub fn throttles(list: &ThrottleList, json: bool) -> String {
    if json {
        return compact(list);
    }
    let cols = [
        Col::left("ACCOUNT", 36),
        Col::left("SOURCE", 40),
        Col::right("FAILURES", 8),
        Col::right("WAIT", 8).gap("  "),
        Col::last("BLOCKED UNTIL (UTC)"),
    ];
    let mut s = table(
        &cols,
        list.rows.iter().map(|r| {
            [
                r.account.as_deref().map_or("*".into(), account),
                r.source
                    .map_or("(sources not known good)".into(), |ip| ip.to_string()),
                r.failures.to_string(),
                format!("{}s", r.wait_secs),
                r.blocked_until_unix
                    .map_or(String::new(), |u| format_utc(u.saturating_mul(1000))),
            ]
        }),
    );
    if list.left_off > 0 {
        let _ = writeln!(s, "({} more not shown)", list.left_off);
    }
    s
}

pub fn users(rows: &[UserSummary], json: bool) -> String {
    if json {
        return compact(&rows);
    }
    let cols = [
        Col::left("EMAIL", 36),
        Col::left("ROLE", 13),
        Col::left("STATUS", 9),
        Col::left("TOTP", 6),
        Col::left("RECOVERY", 9),
        Col::last("CREATED (UTC)"),
    ];
    table(
        &cols,
        rows.iter().map(|u| {
            [
                u.email.clone(),
                u.role.as_str().to_string(),
                if u.disabled { "disabled" } else { "active" }.to_string(),
                if u.totp_confirmed { "yes" } else { "no" }.to_string(),
                u.recovery_codes_left.to_string(),
                format_utc(u.created_unix_ms),
            ]
        }),
    )
}

/// `audit`: a table, or with `json` one object per line, oldest first.
pub fn audit(records: &[AuditRecord], json: bool) -> String {
    if json {
        return records.iter().map(compact).collect();
    }
    let cols = [
        Col::right("SEQ", 6).gap("  "),
        Col::left("TIME (UTC)", 24),
        Col::left("KIND", 22),
        Col::left("OUTCOME", 8),
        Col::left("ACTOR", 28),
        Col::left("SUBJECT", 28),
        Col::left("SOURCE", 15),
        Col::last("DETAIL"),
    ];
    table(
        &cols,
        records.iter().map(|r| {
            let e = &r.event;
            [
                r.seq.to_string(),
                format_utc(r.at_unix_ms),
                e.kind.clone(),
                e.outcome.clone(),
                e.actor.clone().unwrap_or_else(|| "-".into()),
                e.subject.clone().unwrap_or_else(|| "-".into()),
                e.source.map_or_else(|| "-".into(), |ip| ip.to_string()),
                e.detail.clone().unwrap_or_default(),
            ]
        }),
    )
}

/// One CA certificate, as `ca show` and the rotations print it.
fn ca_cert_block(s: &mut String, c: &CaCertView) {
    let _ = writeln!(
        s,
        "{} ({}, {}):\n  subject:    {}\n  issuer:     {}\n  sha256:     {}\n  key:        RSA-{}\n  not before: {}\n  not after:  {}",
        Escaped(&c.id),
        Escaped(&c.kind),
        Escaped(&c.state),
        Escaped(&c.subject),
        Escaped(&c.issuer),
        Escaped(&c.sha256),
        c.key_bits,
        Escaped(&c.not_before),
        Escaped(&c.not_after)
    );
    if !c.retire_at.is_empty() {
        let _ = writeln!(s, "  retired at: {}", Escaped(&c.retire_at));
    }
}

pub fn ca_show(ca: &CaShow, json: bool) -> String {
    if json {
        return pretty(ca);
    }
    let mut s = format!("trust domain: {}\n", Escaped(&ca.trust_domain));
    for c in &ca.certificates {
        ca_cert_block(&mut s, c);
    }
    s
}

/// `ca rotate-intermediate`, `ca rotate-root`.
pub fn ca_rotated(r: &CaRotated, json: bool) -> String {
    if json {
        return pretty(r);
    }
    let mut s = String::from("added:\n");
    for c in &r.added {
        ca_cert_block(&mut s, c);
    }
    s.push_str("now retiring:\n");
    for c in &r.retiring {
        ca_cert_block(&mut s, c);
    }
    s
}

/// `user add`: for admins the otpauth URI and the QR code to scan, and the reminder that
/// the first code must be entered on the enrollment page.
pub fn user_added(added: &UserAdded, json: bool) -> String {
    let uri = added.otpauth_uri.as_ref().map(|u| u.0.as_str());
    if json {
        let v = serde_json::json!({
            "email": added.email,
            "role": added.role,
            "otpauth_uri": uri,
            "totp_confirmation": if uri.is_some() { "pending: sign in and enter the first code on the enrollment page" } else { "not enrolled" },
        });
        return compact(&v);
    }
    let mut s = format!("added {} ({})\n", Escaped(&added.email), added.role);
    if let (Some(uri), Some(qr)) = (uri, &added.qr_terminal) {
        s.push_str(
            "\nScan this with Google Authenticator, Microsoft Authenticator or any TOTP app:\n\n",
        );
        s.push_str(&qr.0);
        s.push_str("\n\nor add it by URI:\n  ");
        s.push_str(uri);
        s.push_str("\n\nThen sign in: the first code confirms the enrollment. Until then this admin gets no session.\n");
    }
    s
}

/// A domain's state as the table shows it: `deployed 3/3`, `deploying 1/3`, `failed`.
pub fn domain_state(d: &DomainView) -> String {
    use crate::domains::DomainState as S;
    match d.state {
        S::Deploying | S::Deployed => {
            format!("{} {}/{}", d.state.as_str(), d.edges_serving, d.edges_total)
        }
        _ => d.state.as_str().to_string(),
    }
}

pub fn domains(rows: &[DomainView], json: bool) -> String {
    if json {
        return pretty(&rows);
    }
    let cols = [
        Col::left("DOMAIN", 28),
        Col::left("ISSUER", 9),
        Col::left("OWNER", 24),
        Col::left("STATE", 14),
        Col::left("SERIAL", 34),
        Col::left("EXPIRES", 21),
        Col::left("STAPLE", 13),
        Col::last("ERROR"),
    ];
    table(
        &cols,
        rows.iter().map(|d| {
            [
                d.name.clone(),
                d.issuer.as_str().to_string(),
                d.owner.clone(),
                domain_state(d),
                d.serial_hex.clone().unwrap_or_else(|| "-".into()),
                d.not_after_unix.map(fmt_unix).unwrap_or_else(|| "-".into()),
                d.staple.clone().unwrap_or_else(|| "-".into()),
                d.error.clone().unwrap_or_default(),
            ]
        }),
    )
}

/// `ssh ca`: both public keys, each on a line of its own for copying.
pub fn ssh_ca(ca: &crate::ssh::SshCaView, json: bool) -> String {
    if json {
        return pretty(ca);
    }
    format!(
        "key type: {}\nuser CA ({}):\n{}\nhost CA ({}):\n{}\n",
        ca.key_type.as_str(),
        Escaped(&ca.user_ca_fingerprint),
        Escaped(&ca.user_ca),
        Escaped(&ca.host_ca_fingerprint),
        Escaped(&ca.host_ca)
    )
}

pub fn ssh_grants(rows: &[crate::ssh::GrantView], json: bool) -> String {
    if json {
        return pretty(&rows);
    }
    let cols = [
        Col::left("EMAIL", 28),
        Col::left("ZONE", 16),
        Col::left("PRINCIPAL", 16),
        Col::left("CERT PRINCIPAL", 28),
        Col::right("MAX TTL", 8).gap("  "),
        Col::last("EXTENSIONS"),
    ];
    table(
        &cols,
        rows.iter().map(|g| {
            let mut ext = vec!["permit-pty".to_string()];
            ext.extend(g.extensions.iter().cloned());
            [
                g.email.clone(),
                g.zone.clone(),
                g.principal.clone(),
                g.certificate_principal.clone(),
                humantime::format_duration(std::time::Duration::from_secs(g.max_ttl_secs))
                    .to_string(),
                ext.join(","),
            ]
        }),
    )
}

pub fn ssh_certs(rows: &[crate::ssh::SshCertView], json: bool) -> String {
    if json {
        return pretty(&rows);
    }
    let cols = [
        Col::right("SERIAL", 6),
        Col::left("KIND", 4),
        Col::left("KEY ID", 28),
        Col::left("PRINCIPALS", 32),
        Col::left("EXPIRES", 21),
        Col::last("STATUS"),
    ];
    table(
        &cols,
        rows.iter().map(|c| {
            [
                c.serial.to_string(),
                c.kind.clone(),
                c.key_id.clone(),
                c.principals.join(","),
                fmt_unix(c.valid_before_unix),
                if c.revoked { "revoked" } else { "valid" }.to_string(),
            ]
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_are_escaped_and_columns_keep_their_widths() {
        let out = table(
            &[
                Col::left("A", 4),
                Col::right("B", 3).gap("  "),
                Col::last("C"),
            ],
            [["x\u{1b}[2J".to_string(), "7".into(), "tail\n".into()]],
        );
        assert_eq!(out, "A      B  C\nx\\x1b[2J   7  tail\\x0a\n");
    }

    #[test]
    fn tables_match_the_previous_layout() {
        let z = zones(
            &[ZoneRow {
                cidr: "100.64.1.0/24".into(),
                intra_zone_tunnels: false,
                name: "eu".into(),
                nodes: 2,
            }],
            false,
        );
        assert_eq!(
            z,
            format!(
                "{:<20} {:<20} {:>6}  INTRA-ZONE\n{:<20} {:<20} {:>6}  false\n",
                "ZONE", "CIDR", "NODES", "eu", "100.64.1.0/24", 2
            )
        );
        let h = health(
            &HealthMatrix {
                pairs: vec![crate::admin::proto::PairHealth {
                    loss: 0.25,
                    node: "eu/a".into(),
                    peer: "eu/b".into(),
                    reported_unix: 1,
                    rtt_micros: Some(1234),
                    age_secs: 70,
                    stale: true,
                    ..Default::default()
                }],
                ..Default::default()
            },
            false,
        );
        assert_eq!(
            h.lines().nth(1).unwrap(),
            format!(
                "{:<24} {:<24} {:>5.0}% {:>8.2}ms 70s stale",
                "eu/a", "eu/b", 25.0, 1.234
            )
        );
    }

    #[test]
    fn an_account_typed_at_sign_in_cannot_drive_the_terminal() {
        let list = throttles(
            &ThrottleList {
                rows: vec![crate::auth::ThrottleRow {
                    account: Some("\u{1b}[2Jevil@example.com".into()),
                    source: Some("127.0.0.2".parse().unwrap()),
                    failures: 4,
                    last_failure_unix: 1_700_000_000,
                    wait_secs: 2,
                    blocked_until_unix: None,
                }],
                left_off: 3,
                in_flight: 0,
            },
            false,
        );
        assert!(
            list.contains("127.0.0.2") && list.contains("\\x1b[2Jevil") && !list.contains('\u{1b}'),
            "{list}"
        );
        assert!(list.ends_with("(3 more not shown)\n"), "{list}");
    }

    #[test]
    fn a_domain_row_shows_its_state_with_the_edges_and_dashes_for_what_it_lacks() {
        use crate::domains::{DomainState, DomainView, IssuerKind};
        let mut d = DomainView {
            name: "portal.example.com".into(),
            issuer: IssuerKind::Acme,
            owner: "o@example.com".into(),
            edge_zones: vec!["eu".into()],
            state: DomainState::Deploying,
            edges_serving: 1,
            edges_total: 3,
            serial_hex: None,
            not_after_unix: None,
            error: None,
            staple: None,
        };
        let t = domains(std::slice::from_ref(&d), false);
        let line = t.lines().nth(1).unwrap();
        assert!(
            line.contains("deploying 1/3") && line.contains(" - "),
            "{line}"
        );
        d.state = DomainState::Failed;
        d.error = Some("urn:ietf:params:acme:error:connection: refused\x1b[2J".into());
        let t = domains(std::slice::from_ref(&d), false);
        let line = t.lines().nth(1).unwrap();
        assert!(
            line.contains("failed ") && !line.contains("failed 1/3"),
            "{line}"
        );
        assert!(!line.contains('\x1b'), "escaped: {line}");
        let json: Vec<serde_json::Value> = serde_json::from_str(&domains(&[d], true)).unwrap();
        assert_eq!(json[0]["state"], "failed");
    }
}
