//! CA status in the console: each CA certificate with its fingerprint and validity, and the
//! current CRL (number, this and next update, entries).

use std::fmt::Write as _;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::revocation_list::CertificateRevocationList;

use super::super::WebState;
use super::super::form::admin_page;
use super::super::pages::esc;
use super::{console_page, mesh_of};

/// What the page shows of the CRL.
struct CrlStatus {
    number: String,
    this_update: String,
    next_update: String,
    next_update_unix: Option<i64>,
    entries: usize,
}

fn crl_status(der: &[u8]) -> Option<CrlStatus> {
    let (_, crl) = CertificateRevocationList::from_der(der).ok()?;
    Some(CrlStatus {
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
        let certs: Vec<_> = auth
            .info()
            .into_iter()
            .map(|c| {
                let der = if c.role == "root" {
                    auth.ca().root_der()
                } else {
                    auth.ca().intermediate_der()
                };
                let not_before = X509Certificate::from_der(der)
                    .map(|(_, x)| x.validity().not_before.to_string())
                    .unwrap_or_default();
                (c, not_before)
            })
            .collect();
        let crl = crl_status(&auth.crl_der());
        (
            certs,
            crl,
            auth.trust_domain().to_string(),
            crate::store::unix(mesh.now()),
        )
    })
    .await;
    let (certs, crl, trust_domain, now) = match read {
        Ok(v) => v,
        Err(e) => return super::super::internal(e),
    };
    let mut rows = String::new();
    for (c, not_before) in &certs {
        let _ = write!(
            rows,
            r#"<tr data-role="{role}"><td>{role}</td><td>{subject}</td><td class="mono fingerprint">{sha}</td><td>{nb}</td><td>{na}</td><td>RSA {bits}</td><td>active</td></tr>"#,
            role = esc(c.role),
            subject = esc(&c.subject),
            sha = esc(&c.sha256),
            nb = esc(not_before),
            na = esc(&c.not_after),
            bits = c.key_bits,
        );
    }
    let crl_html = match crl {
        Some(c) => {
            let due = match c.next_update_unix {
                Some(t) if t <= now as i64 => r#" <span class="bad">(overdue)</span>"#,
                _ => "",
            };
            format!(
                r#"<table id="crl"><tbody><tr><th>CRL number</th><td>{}</td></tr><tr><th>This update</th><td>{}</td></tr><tr><th>Next update</th><td id="crl-next-update">{}{due}</td></tr><tr><th>Revoked certificates listed</th><td>{}</td></tr></tbody></table>
<p>Relying parties fetch it at <code>/crl</code>; it is re-signed on every revocation and before its next update.</p>"#,
                esc(&c.number),
                esc(&c.this_update),
                esc(&c.next_update),
                c.entries
            )
        }
        None => r#"<p class="error">The current CRL does not parse.</p>"#.to_string(),
    };
    let root = certs
        .iter()
        .find(|(c, _)| c.role == "root")
        .map(|(c, _)| c.sha256.clone())
        .unwrap_or_default();
    let body = format!(
        r#"<p>Trust domain <code>{td}</code>. Agents pin the root: <code id="root-fingerprint">{root}</code> (<code>--ca-fingerprint</code>).</p>
<table id="ca-certs"><thead><tr><th>Role</th><th>Subject</th><th>SHA-256</th><th>Valid from</th><th>Valid until</th><th>Key</th><th>State</th></tr></thead><tbody>{rows}</tbody></table>
<h2>Revocation list</h2>{crl_html}"#,
        td = esc(&trust_domain),
        root = esc(&root),
    );
    console_page(&who, StatusCode::OK, "CA", None, &body)
}
