//! CA status in the console: each CA certificate with its fingerprint and validity, and the
//! current CRL (number, this and next update, entries).

use std::fmt::Write as _;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use x509_parser::prelude::FromDer;
use x509_parser::revocation_list::CertificateRevocationList;

use super::super::WebState;
use super::super::form::admin_page;
use super::super::pages::esc;
use super::{console_page, mesh_of};

/// What the page shows of one CRL.
struct CrlStatus {
    issuer: String,
    number: String,
    this_update: String,
    next_update: String,
    next_update_unix: Option<i64>,
    entries: usize,
}

fn crl_status(der: &[u8]) -> Option<CrlStatus> {
    let (_, crl) = CertificateRevocationList::from_der(der).ok()?;
    Some(CrlStatus {
        issuer: crl.issuer().to_string(),
        number: crl
            .crl_number()
            .map(|n| n.to_string())
            .unwrap_or_else(|| "-".into()),
        this_update: crl.last_update().to_string(),
        next_update: crl
            .next_update()
            .map(|t| t.to_string())
            .unwrap_or_else(|| "-".into()),
        next_update_unix: crl.next_update().map(|t| t.timestamp()),
        entries: crl.iter_revoked_certificates().count(),
    })
}

pub(super) async fn page(State(state): State<WebState>, headers: HeaderMap) -> Response {
    let who = match admin_page(&state, &headers).await {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let mesh = match mesh_of(&state) {
        Ok(m) => m,
        Err(r) => return *r,
    };
    let read = crate::blocking::run_infallible(move || {
        let auth = mesh.authority();
        let crls: Vec<Option<CrlStatus>> = auth.crls_der().iter().map(|d| crl_status(d)).collect();
        (
            auth.ca_certificates(),
            zonemesh_ca::fingerprint_sha256(auth.ca().root_der()),
            crls,
            auth.trust_domain().to_string(),
            crate::store::unix(mesh.now()),
        )
    })
    .await;
    let (certs, root, crls, trust_domain, now) = match read {
        Ok(v) => v,
        Err(e) => return super::super::internal(e),
    };
    let mut rows = String::new();
    for c in &certs {
        let state = if c.retire_at.is_empty() {
            esc(&c.state)
        } else {
            format!("{} (retired at {})", esc(&c.state), esc(&c.retire_at))
        };
        let _ = write!(
            rows,
            r#"<tr data-id="{id}" data-kind="{kind}" data-state="{st}"><td>{kind}</td><td>{subject}</td><td>{issuer}</td><td class="mono fingerprint">{sha}</td><td>{nb}</td><td>{na}</td><td>RSA {bits}</td><td class="state">{state}</td></tr>"#,
            id = esc(&c.id),
            kind = esc(&c.kind),
            st = esc(&c.state),
            subject = esc(&c.subject),
            issuer = esc(&c.issuer),
            sha = esc(&c.sha256),
            nb = esc(&c.not_before),
            na = esc(&c.not_after),
            bits = c.key_bits,
        );
    }
    let mut crl_rows = String::new();
    for (i, c) in crls.iter().enumerate() {
        let Some(c) = c else {
            crl_rows.push_str(r#"<tr><td colspan="5" class="bad">A CRL does not parse.</td></tr>"#);
            continue;
        };
        let due = match c.next_update_unix {
            Some(t) if t <= now as i64 => r#" <span class="bad">(overdue)</span>"#,
            _ => "",
        };
        let id = if i == 0 {
            r#" id="crl-next-update""#
        } else {
            ""
        };
        let _ = write!(
            crl_rows,
            r#"<tr><td>{}</td><td>{}</td><td>{}</td><td{id}>{}{due}</td><td>{}</td></tr>"#,
            esc(&c.issuer),
            esc(&c.number),
            esc(&c.this_update),
            esc(&c.next_update),
            c.entries
        );
    }
    let body = format!(
        r#"<p>Trust domain <code>{td}</code>. New agents pin the active root: <code id="root-fingerprint">{root}</code> (<code>--ca-fingerprint</code>); enrolled agents follow a new root through its cross-signature.</p>
<table id="ca-certs"><thead><tr><th>Kind</th><th>Subject</th><th>Issuer</th><th>SHA-256</th><th>Valid from</th><th>Valid until</th><th>Key</th><th>State</th></tr></thead><tbody>{rows}</tbody></table>
<h2>Revocation lists</h2>
<table id="crl"><thead><tr><th>Issuer</th><th>CRL number</th><th>This update</th><th>Next update</th><th>Revoked certificates listed</th></tr></thead><tbody>{crl_rows}</tbody></table>
<p>Relying parties fetch the issuing intermediate's at <code>/crl</code>; each is re-signed on every revocation and before its next update. Rotate with <code>zonemesh-controller ca rotate-intermediate</code> or <code>ca rotate-root</code>.</p>"#,
        td = esc(&trust_domain),
        root = esc(&root),
    );
    console_page(&who, StatusCode::OK, "CA", None, &body)
}
