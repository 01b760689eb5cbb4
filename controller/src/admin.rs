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
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use zonemesh_ca::{NodeRequest, RevocationReason, TlsNames, WireGuardKey};

/// Largest admin request line.
const MAX_REQUEST: usize = 256 * 1024;

/// One admin command.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum AdminRequest {
    CaShow,
    CaExport {
        intermediate: bool,
    },
    CaSignCsr {
        csr_der: Vec<u8>,
        zone: String,
        node: String,
        wg_key: String,
    },
    CaIssueTls {
        dns: Vec<String>,
        ips: Vec<String>,
        lifetime_secs: Option<u64>,
    },
    CaRevoke {
        serial: String,
        reason: String,
    },
    CaCrl,
    ZoneAdd {
        name: String,
        cidr: String,
        intra_zone_tunnels: bool,
    },
    ZoneList,
    TokenCreate {
        zone: String,
        ttl_secs: u64,
        uses: u32,
    },
    NodeList,
    NodeRevoke {
        node: String,
        reason: String,
    },
    UserAdd {
        email: String,
        role: String,
        password: Redacted,
    },
    UserList,
    UserDisable {
        email: String,
    },
    UserPasswd {
        email: String,
        password: Redacted,
    },
    ThrottleList,
    ThrottleClear {
        email: Option<String>,
        source: Option<String>,
    },
    Health,
    BlockAdd {
        address: String,
        secs: u64,
        reason: String,
    },
    BlockList,
    BlockRemove {
        address: String,
    },
    Audit {
        limit: Option<usize>,
    },
}

/// A secret carried in an admin request: serialised as is over the 0600 socket, never
/// shown by `Debug`.
#[derive(Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Redacted(pub String);

impl std::fmt::Debug for Redacted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl AdminRequest {
    /// Commands that change or read live mesh state need the running controller.
    pub fn needs_server(&self) -> bool {
        matches!(
            self,
            Self::ZoneAdd { .. }
                | Self::ZoneList
                | Self::TokenCreate { .. }
                | Self::NodeList
                | Self::NodeRevoke { .. }
                | Self::ThrottleList
                | Self::ThrottleClear { .. }
                | Self::BlockAdd { .. }
                | Self::BlockList
                | Self::BlockRemove { .. }
                | Self::Health
        )
    }
}

/// The reply: a result value or a one-line error.
#[derive(Debug, Serialize, Deserialize)]
pub struct AdminResponse {
    pub ok: bool,
    #[serde(default)]
    pub result: Value,
    #[serde(default)]
    pub error: String,
}

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
    pub fn handle(&self, req: AdminRequest) -> Result<Value, ControllerError> {
        let now = SystemTime::now();
        Ok(match req {
            AdminRequest::CaShow => {
                json!({ "trust_domain": self.auth.trust_domain(), "certificates": self.auth.info() })
            }
            AdminRequest::CaExport { intermediate } => {
                let der = if intermediate {
                    self.auth.ca().intermediate_der()
                } else {
                    self.auth.ca().root_der()
                };
                json!({ "pem": zonemesh_ca::to_pem("CERTIFICATE", der) })
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
                json!({ "serial": cert.serial_hex, "pem": pem_chain(&cert.der, &self.auth.chain()) })
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
                json!({
                    "serial": cert.serial_hex,
                    "chain_pem": pem_chain(&cert.der, &self.auth.chain()),
                    "key_pem": zonemesh_ca::to_pem("PRIVATE KEY", &key.serialize_der()),
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
                json!({ "revoked": serial_norm })
            }
            AdminRequest::CaCrl => {
                json!({ "pem": zonemesh_ca::to_pem("X509 CRL", &self.auth.crl_der()) })
            }
            AdminRequest::ZoneAdd {
                name,
                cidr,
                intra_zone_tunnels,
            } => {
                let z = self
                    .mesh()?
                    .add_zone(&name, &cidr, intra_zone_tunnels, now)?;
                self.note("zone.added", &name, format!("cidr {}", z.cidr));
                json!(z)
            }
            AdminRequest::ZoneList => {
                self.mesh()?;
                let nodes = self.auth.store().nodes()?;
                let zones: Vec<Value> = self
                    .auth
                    .store()
                    .zones()?
                    .into_iter()
                    .map(|z| {
                        let count = nodes.iter().filter(|n| n.zone == z.name && !n.revoked).count();
                        json!({ "name": z.name, "cidr": z.cidr.to_string(), "intra_zone_tunnels": z.intra_zone_tunnels, "nodes": count })
                    })
                    .collect();
                json!(zones)
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
                json!(t)
            }
            AdminRequest::NodeList => {
                self.mesh()?;
                let nodes: Vec<Value> = self
                    .auth
                    .store()
                    .nodes()?
                    .into_iter()
                    .map(|n| {
                        json!({
                            "zone": n.zone, "node": n.node, "overlay_ip": n.overlay_ip.to_string(),
                            "serial": n.serial_hex, "not_after_unix": n.not_after_unix, "revoked": n.revoked,
                            "endpoints": n.endpoints.iter().map(ToString::to_string).collect::<Vec<_>>(),
                            "wg_public_key": WireGuardKey(n.wg_public_key).to_base64(),
                        })
                    })
                    .collect();
                json!(nodes)
            }
            AdminRequest::NodeRevoke { node, reason } => {
                let reason: RevocationReason = reason.parse()?;
                let n = self.mesh()?.revoke_node(&node, reason, now)?;
                self.note(
                    "node.revoked",
                    &n.key(),
                    format!("serial {} reason {}", n.serial_hex, reason.as_str()),
                );
                json!({ "node": n.key(), "serial": n.serial_hex })
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
                json!({ "human": auth_cli::render_user_added(&added, false), "json": auth_cli::render_user_added(&added, true) })
            }
            AdminRequest::Health => {
                let mut rows: Vec<Value> = Vec::new();
                for (node, peers) in self.mesh()?.health() {
                    for p in peers {
                        rows.push(json!({ "node": node, "peer": p.peer, "loss": p.loss, "rtt_micros": p.rtt_micros, "reported_unix": p.reported_unix }));
                    }
                }
                rows.sort_by(|a, b| {
                    (a["node"].as_str(), a["peer"].as_str())
                        .cmp(&(b["node"].as_str(), b["peer"].as_str()))
                });
                json!(rows)
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
                json!({ "address": ip.to_canonical().to_string(), "until_unix": crate::store::unix(until) })
            }
            AdminRequest::BlockList => {
                let blocks: Vec<Value> = self
                    .mesh()?
                    .blocks(now)?
                    .into_iter()
                    .map(|b| json!({ "address": b.address.to_string(), "until_unix": b.until_unix, "reason": b.reason }))
                    .collect();
                json!(blocks)
            }
            AdminRequest::BlockRemove { address } => {
                let ip = parse_ip(&address)?;
                let rec = self.mesh()?.unblock_source(ip)?;
                self.note(
                    "source.unblocked",
                    &rec.address.to_string(),
                    format!("was blocked until {}: {}", rec.until_unix, rec.reason),
                );
                json!({ "address": rec.address.to_string() })
            }
            AdminRequest::UserList => {
                let users = self
                    .web()?
                    .users()
                    .list_users()
                    .map_err(|e| ControllerError::Internal(e.to_string()))?;
                json!({ "human": auth_cli::render_users(&users, false), "json": auth_cli::render_users(&users, true) })
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
                json!({ "email": email, "sessions_ended": ended })
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
                json!({ "email": crate::auth::normalize_email(&email), "sessions_ended": ended })
            }
            AdminRequest::ThrottleList => json!(self.web()?.throttle_list(1000)),
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
                json!({ "target": target, "cleared": cleared })
            }
            AdminRequest::Audit { limit } => {
                let records = self
                    .audit_log()?
                    .list(limit)
                    .map_err(|e| ControllerError::Internal(e.to_string()))?;
                json!({ "human": crate::audit::render(&records, false), "json": crate::audit::render(&records, true) })
            }
        })
    }

    fn respond(&self, req: AdminRequest) -> AdminResponse {
        match self.handle(req) {
            Ok(result) => AdminResponse {
                ok: true,
                result,
                error: String::new(),
            },
            Err(e) => AdminResponse {
                ok: false,
                result: Value::Null,
                error: e.to_string(),
            },
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
        AdminResponse {
            ok: false,
            result: Value::Null,
            error: format!("admin request larger than {MAX_REQUEST} bytes"),
        }
    } else {
        match serde_json::from_str::<AdminRequest>(&line) {
            Ok(req) => tokio::task::spawn_blocking(move || handler.respond(req)).await?,
            Err(e) => AdminResponse {
                ok: false,
                result: Value::Null,
                error: format!("bad admin request: {e}"),
            },
        }
    };
    let mut out = serde_json::to_vec(&resp)?;
    out.push(b'\n');
    w.write_all(&out).await?;
    Ok(())
}

use tokio::io::AsyncReadExt;

/// Send one command to a running controller; `Ok(None)` when none is listening.
pub async fn call(data_dir: &Path, req: &AdminRequest) -> Result<Option<AdminResponse>> {
    let path = socket_path(data_dir);
    let stream = match UnixStream::connect(&path).await {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(e) => bail!("cannot reach the controller at {}: {e}", path.display()),
    };
    let (r, mut w) = stream.into_split();
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    w.write_all(&line).await?;
    let mut resp = String::new();
    BufReader::new(r).read_line(&mut resp).await?;
    Ok(Some(
        serde_json::from_str(&resp).context("bad reply from the controller")?,
    ))
}
