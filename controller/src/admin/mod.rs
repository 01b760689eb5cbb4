//! Admin commands. The CLI sends each as one JSON line over the running controller's Unix
//! socket (`<data-dir>/admin.sock`, mode 0600); CA commands also run directly on the store
//! when no controller is running. One handler serves both paths.

use crate::audit::{AuditEvent, AuditLog};
use crate::auth::{ClearTarget, Role, cli as auth_cli};
use crate::authority::Authority;
use crate::error::ControllerError;
use crate::mesh::Mesh;
use crate::web::WebState;
use anyhow::{Context, Result, bail};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use zonemesh_ca::{NodeRequest, RevocationReason, TlsNames, WireGuardKey};

pub mod client;
pub mod local;
pub mod proto;

use proto::*;
pub use proto::{AdminReply, AdminRequest, AdminResponse, Redacted};

/// Largest admin request line.
const MAX_REQUEST: usize = 256 * 1024;

/// Path of the admin socket in a data directory.
pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join("admin.sock")
}

/// Executes admin commands against the authority and, when serving, the live mesh.
pub struct AdminHandler {
    pub auth: Arc<Authority>,
    pub mesh: Option<Arc<Mesh>>,
    pub audit: Option<Arc<AuditLog>>,
    pub web: Option<WebState>,
}

fn pem_chain(leaf: &[u8], chain: &[Vec<u8>]) -> String {
    let mut s = zonemesh_ca::to_pem("CERTIFICATE", leaf);
    for c in chain {
        s.push_str(&zonemesh_ca::to_pem("CERTIFICATE", c));
    }
    s
}

fn parse_ip(address: &str) -> Result<std::net::IpAddr, ControllerError> {
    address.trim().parse().map_err(|_| {
        ControllerError::BadRequest(format!(
            "{} is not an IP address",
            crate::text::Escaped(crate::text::cap(address, 64))
        ))
    })
}

impl AdminHandler {
    fn note(&self, kind: &str, subject: &str, detail: String) {
        if let Some(a) = &self.audit
            && let Err(e) = a.record(
                AuditEvent::new(kind, "ok")
                    .actor("cli")
                    .subject(subject)
                    .detail(detail),
            )
        {
            tracing::error!(error = %e, "audit record failed");
        }
    }

    fn web(&self) -> Result<&WebState, ControllerError> {
        self.web
            .as_ref()
            .ok_or_else(|| ControllerError::Internal("user store unavailable".into()))
    }

    fn audit_log(&self) -> Result<&Arc<AuditLog>, ControllerError> {
        self.audit
            .as_ref()
            .ok_or_else(|| ControllerError::Internal("audit log unavailable".into()))
    }

    fn mesh(&self) -> Result<&Arc<Mesh>, ControllerError> {
        self.mesh.as_ref().ok_or_else(|| {
            ControllerError::BadRequest("this command needs a running controller".into())
        })
    }

    /// Run one command (blocking: RSA and flushes happen here).
    pub fn handle(&self, req: AdminRequest) -> Result<AdminReply, ControllerError> {
        let now = SystemTime::now();
        Ok(match req {
            AdminRequest::CaShow => AdminReply::CaShow(CaShow {
                certificates: self
                    .auth
                    .info()
                    .into_iter()
                    .map(|c| CaCert {
                        role: c.role.to_string(),
                        subject: c.subject,
                        sha256: c.sha256,
                        not_after: c.not_after,
                        key_bits: c.key_bits,
                    })
                    .collect(),
                trust_domain: self.auth.trust_domain().to_string(),
            }),
            AdminRequest::CaExport { intermediate } => {
                let der = if intermediate {
                    self.auth.ca().intermediate_der()
                } else {
                    self.auth.ca().root_der()
                };
                AdminReply::Pem(Pem {
                    pem: zonemesh_ca::to_pem("CERTIFICATE", der),
                })
            }
            AdminRequest::CaSignCsr {
                csr_der,
                zone,
                node,
                wg_key,
            } => {
                let wg = WireGuardKey::from_base64(&wg_key)?;
                let cert = self.auth.issue_node(
                    &NodeRequest {
                        csr_der: &csr_der,
                        zone: &zone,
                        node: &node,
                        wg_public_key: wg,
                    },
                    now,
                )?;
                self.auth.store().flush()?;
                AdminReply::CaSigned(CaSigned {
                    pem: pem_chain(&cert.der, &self.auth.chain()),
                    serial: cert.serial_hex,
                })
            }
            AdminRequest::CaIssueTls {
                dns,
                ips,
                lifetime_secs,
            } => {
                let ips = ips
                    .iter()
                    .map(|i| {
                        i.parse().map_err(|_| {
                            ControllerError::BadRequest(format!("{i:?} is not an IP address"))
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let key = zonemesh_ca::generate_rsa_2048()?;
                let cert = self.auth.issue_tls_key(
                    &key,
                    &TlsNames { dns, ips },
                    lifetime_secs.map(Duration::from_secs),
                    now,
                )?;
                AdminReply::CaTlsIssued(CaTlsIssued {
                    chain_pem: pem_chain(&cert.der, &self.auth.chain()),
                    key_pem: Redacted(zonemesh_ca::to_pem("PRIVATE KEY", &key.serialize_der())),
                    serial: cert.serial_hex,
                })
            }
            AdminRequest::CaRevoke { serial, reason } => {
                let reason: RevocationReason = reason.parse()?;
                let serial_norm = serial.trim().to_ascii_lowercase().replace(':', "");
                let node = self
                    .auth
                    .store()
                    .nodes()?
                    .into_iter()
                    .find(|n| n.serial_hex == serial_norm && !n.revoked);
                match (&self.mesh, node) {
                    (Some(mesh), Some(n)) => {
                        mesh.revoke_node(&n.key(), reason, now)?;
                    }
                    (mesh, node) => {
                        self.auth.revoke(&serial, reason, now)?;
                        if let Some(n) = node {
                            let mut n = n.clone();
                            n.revoked = true;
                            self.auth.store().put_node(&n)?;
                            self.auth.store().flush()?;
                        }
                        if let Some(mesh) = mesh {
                            mesh.publish_crl()?;
                        }
                    }
                }
                self.note(
                    "certificate.revoked",
                    &serial_norm,
                    format!("reason {}", reason.as_str()),
                );
                AdminReply::CaRevoked(CaRevoked {
                    revoked: serial_norm,
                })
            }
            AdminRequest::CaCrl => AdminReply::Pem(Pem {
                pem: zonemesh_ca::to_pem("X509 CRL", &self.auth.crl_der()),
            }),
            AdminRequest::ZoneAdd {
                name,
                cidr,
                intra_zone_tunnels,
            } => {
                let z = self
                    .mesh()?
                    .add_zone(&name, &cidr, intra_zone_tunnels, now)?;
                self.note("zone.added", &name, format!("cidr {}", z.cidr));
                AdminReply::ZoneAdded(ZoneAdded {
                    name: z.name,
                    cidr: z.cidr.to_string(),
                    intra_zone_tunnels: z.intra_zone_tunnels,
                })
            }
            AdminRequest::ZoneList => {
                self.mesh()?;
                let nodes = self.auth.store().nodes()?;
                let zones = self
                    .auth
                    .store()
                    .zones()?
                    .into_iter()
                    .map(|z| {
                        let count = nodes
                            .iter()
                            .filter(|n| n.zone == z.name && !n.revoked)
                            .count();
                        ZoneRow {
                            cidr: z.cidr.to_string(),
                            intra_zone_tunnels: z.intra_zone_tunnels,
                            name: z.name,
                            nodes: count,
                        }
                    })
                    .collect();
                AdminReply::ZoneList(zones)
            }
            AdminRequest::TokenCreate {
                zone,
                ttl_secs,
                uses,
            } => {
                let t =
                    self.mesh()?
                        .create_token(&zone, Duration::from_secs(ttl_secs), uses, now)?;
                self.note(
                    "token.created",
                    &zone,
                    format!("{uses} use(s), expires {}", t.expires_unix),
                );
                AdminReply::TokenCreated(TokenCreated {
                    token: Redacted(t.token),
                    zone: t.zone,
                    expires_unix: t.expires_unix,
                    uses: t.uses,
                })
            }
            AdminRequest::NodeList => {
                self.mesh()?;
                let nodes = self
                    .auth
                    .store()
                    .nodes()?
                    .into_iter()
                    .map(|n| NodeRow {
                        endpoints: n.endpoints.iter().map(ToString::to_string).collect(),
                        node: n.node,
                        not_after_unix: n.not_after_unix,
                        overlay_ip: n.overlay_ip.to_string(),
                        revoked: n.revoked,
                        serial: n.serial_hex,
                        wg_public_key: WireGuardKey(n.wg_public_key).to_base64(),
                        zone: n.zone,
                    })
                    .collect();
                AdminReply::NodeList(nodes)
            }
            AdminRequest::NodeRevoke { node, reason } => {
                let reason: RevocationReason = reason.parse()?;
                let mesh = self.mesh()?;
                let n = mesh.revoke_node(&self.resolve_node(&node)?, reason, now)?;
                self.note(
                    "node.revoked",
                    &n.key(),
                    format!("serial {} reason {}", n.serial_hex, reason.as_str()),
                );
                AdminReply::NodeRevoked(NodeRevoked {
                    node: n.key(),
                    serial: n.serial_hex,
                })
            }
            AdminRequest::UserAdd {
                email,
                role,
                password,
            } => {
                let role: Role = role.parse().map_err(ControllerError::BadRequest)?;
                let web = self.web()?;
                let added = auth_cli::add_user(
                    web.users(),
                    self.audit_log()?,
                    &email,
                    role,
                    &password.0,
                    "cli",
                )
                .map_err(|e| ControllerError::BadRequest(e.to_string()))?;
                AdminReply::UserAdded(UserAdded {
                    email: added.email.clone(),
                    role: added.role,
                    otpauth_uri: added.otpauth_uri.as_ref().map(|u| Redacted(u.to_string())),
                    qr_terminal: added.qr_terminal.clone().map(Redacted),
                })
            }
            AdminRequest::Health => {
                let mut rows = Vec::new();
                for (node, peers) in self.mesh()?.health() {
                    for p in peers {
                        rows.push(HealthRow {
                            loss: p.loss,
                            node: node.clone(),
                            peer: p.peer,
                            reported_unix: p.reported_unix,
                            rtt_micros: p.rtt_micros,
                        });
                    }
                }
                rows.sort_by(|a, b| (&a.node, &a.peer).cmp(&(&b.node, &b.peer)));
                AdminReply::Health(rows)
            }
            AdminRequest::BlockAdd {
                address,
                secs,
                reason,
            } => {
                let ip = parse_ip(&address)?;
                let until = now + Duration::from_secs(secs.clamp(60, 30 * 86_400));
                self.mesh()?.block_source(ip, until, &reason)?;
                self.note(
                    "source.blocked",
                    &ip.to_canonical().to_string(),
                    format!(
                        "{} (until {})",
                        crate::text::cap(&reason, 512),
                        crate::store::unix(until)
                    ),
                );
                AdminReply::BlockAdded(BlockRow {
                    address: ip.to_canonical().to_string(),
                    reason,
                    until_unix: crate::store::unix(until),
                })
            }
            AdminRequest::BlockList => {
                let blocks = self
                    .mesh()?
                    .blocks(now)?
                    .into_iter()
                    .map(|b| BlockRow {
                        address: b.address.to_string(),
                        reason: b.reason,
                        until_unix: b.until_unix,
                    })
                    .collect();
                AdminReply::BlockList(blocks)
            }
            AdminRequest::BlockRemove { address } => {
                let ip = parse_ip(&address)?;
                let rec = self.mesh()?.unblock_source(ip)?;
                self.note(
                    "source.unblocked",
                    &rec.address.to_string(),
                    format!("was blocked until {}: {}", rec.until_unix, rec.reason),
                );
                AdminReply::BlockRemoved(BlockRemoved {
                    address: rec.address.to_string(),
                })
            }
            AdminRequest::UserList => {
                let users = self
                    .web()?
                    .users()
                    .list_users()
                    .map_err(|e| ControllerError::Internal(e.to_string()))?;
                AdminReply::UserList(users)
            }
            AdminRequest::UserDisable { email } => {
                let web = self.web()?;
                let ended = auth_cli::disable_user(
                    web.users(),
                    web.sessions(),
                    self.audit_log()?,
                    &email,
                    "cli",
                )
                .map_err(|e| ControllerError::BadRequest(e.to_string()))?;
                AdminReply::UserSessionsEnded(UserSessionsEnded {
                    email: crate::auth::normalize_email(&email),
                    sessions_ended: ended,
                })
            }
            AdminRequest::UserPasswd { email, password } => {
                let web = self.web()?;
                let ended = auth_cli::change_password(
                    web.users(),
                    web.sessions(),
                    self.audit_log()?,
                    &email,
                    &password.0,
                    "cli",
                )
                .map_err(|e| ControllerError::BadRequest(e.to_string()))?;
                AdminReply::UserSessionsEnded(UserSessionsEnded {
                    email: crate::auth::normalize_email(&email),
                    sessions_ended: ended,
                })
            }
            AdminRequest::ThrottleList => AdminReply::ThrottleList(self.web()?.throttle_list(1000)),
            AdminRequest::ThrottleClear { email, source } => {
                let target = match (email, source) {
                    (Some(e), None) => ClearTarget::Account(e),
                    (None, Some(s)) => ClearTarget::Source(s.parse().map_err(|_| {
                        ControllerError::BadRequest(format!("{s:?} is not an IP address"))
                    })?),
                    _ => {
                        return Err(ControllerError::BadRequest(
                            "give exactly one of --email and --source".into(),
                        ));
                    }
                };
                let cleared = self.web()?.clear_throttle(&target, "cli");
                AdminReply::ThrottleCleared(ThrottleCleared { target, cleared })
            }
            AdminRequest::Audit { limit } => {
                let records = self
                    .audit_log()?
                    .list(limit)
                    .map_err(|e| ControllerError::Internal(e.to_string()))?;
                AdminReply::Audit(records)
            }
        })
    }

    fn respond(&self, req: AdminRequest) -> AdminResponse {
        match self.handle(req) {
            Ok(reply) => AdminResponse::ok(reply),
            Err(e) => AdminResponse::err(e.to_string()),
        }
    }

    /// `zone/node` as given, or the one node of that name across zones. An ambiguous name
    /// is refused with its candidates; an unknown one is left for the lookup to refuse.
    fn resolve_node(&self, name: &str) -> Result<String, ControllerError> {
        if name.contains('/') {
            return Ok(name.to_string());
        }
        let same_name: Vec<_> = self
            .auth
            .store()
            .nodes()?
            .into_iter()
            .filter(|n| n.node == name)
            .collect();
        // A revoked namesake in another zone does not make an active node ambiguous.
        let active: Vec<_> = same_name.iter().filter(|n| !n.revoked).collect();
        let candidates: Vec<String> = if active.is_empty() {
            same_name.iter().map(|n| n.key()).collect()
        } else {
            active.iter().map(|n| n.key()).collect()
        };
        match candidates.as_slice() {
            [] => Ok(name.to_string()),
            [one] => Ok(one.clone()),
            many => Err(ControllerError::BadRequest(format!(
                "node name {} is ambiguous: {} (give zone/node)",
                crate::text::Escaped(name),
                crate::text::escape(&many.join(", "))
            ))),
        }
    }
}

/// Admin connections served at once; more wait in the socket's backlog.
const MAX_ADMIN_CONNECTIONS: usize = 32;
/// Time a client has to send its one request line.
const ADMIN_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Bind the socket with mode 0600 from the start: created under umask 0o177, so there is
/// no moment at which another local user could connect before a chmod.
fn bind_private(path: &Path) -> Result<UnixListener> {
    use nix::sys::stat::{Mode, umask};
    let old = umask(Mode::from_bits_truncate(0o177));
    let bound = UnixListener::bind(path);
    umask(old);
    bound.with_context(|| format!("binding {}", path.display()))
}

/// Listen on the admin socket until shutdown.
pub async fn serve(
    path: PathBuf,
    handler: Arc<AdminHandler>,
    shutdown: CancellationToken,
) -> Result<()> {
    let _ = std::fs::remove_file(&path);
    let listener = bind_private(&path)?;
    let mode = std::fs::metadata(&path)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        bail!("admin socket {} has mode {mode:o}", path.display());
    }
    let tracker = TaskTracker::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_ADMIN_CONNECTIONS));
    let mut backoff = crate::listen::AcceptBackoff::new("admin");
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => { backoff.failed(&e).await; continue; }
            },
        };
        backoff.succeeded();
        let handler = handler.clone();
        tracker.spawn(async move {
            let _permit = permit;
            if let Err(e) = serve_one(stream, handler).await {
                tracing::warn!(error = %e, "admin connection");
            }
        });
    }
    tracker.close();
    tracker.wait().await;
    let _ = std::fs::remove_file(&path);
    Ok(())
}

async fn serve_one(stream: UnixStream, handler: Arc<AdminHandler>) -> Result<()> {
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(r).take(MAX_REQUEST as u64);
    let read = reader.read_line(&mut line);
    let n = match tokio::time::timeout(ADMIN_READ_TIMEOUT, read).await {
        Ok(n) => n?,
        Err(_) => bail!("no request within {}s", ADMIN_READ_TIMEOUT.as_secs()),
    };
    if n == 0 {
        return Ok(());
    }
    let resp = if n >= MAX_REQUEST && !line.ends_with('\n') {
        AdminResponse::err(format!("admin request larger than {MAX_REQUEST} bytes"))
    } else {
        match serde_json::from_str::<AdminRequest>(&line) {
            Ok(req) => tokio::task::spawn_blocking(move || handler.respond(req)).await?,
            Err(e) => AdminResponse::err(format!("bad admin request: {e}")),
        }
    };
    let mut out = serde_json::to_vec(&resp)?;
    out.push(b'\n');
    w.write_all(&out).await?;
    Ok(())
}
