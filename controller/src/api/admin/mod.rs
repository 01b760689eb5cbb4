//! Admin commands. The CLI sends each as one JSON line over the running controller's Unix
//! socket (`<data-dir>/admin.sock`, mode 0600); CA commands also run directly on the store
//! when no controller is running. One handler serves both paths. The request and reply
//! types are in `proto`, the client side in `client` and `local`, the commands themselves in
//! `ca_cmds`, `mesh_cmds` and `user_cmds`; how replies print is `crate::cli`.

use crate::audit::{AuditEvent, AuditLog};
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

mod backup_cmds;
mod ca_cmds;
pub mod client;
mod domain_cmds;
pub mod local;
mod mesh_cmds;
pub mod proto;
mod ssh_cmds;
mod user_cmds;

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
    /// Portal domains (only in a running controller).
    pub domains: Option<Arc<crate::domains::Domains>>,
    /// The data directory (backups are written under it).
    pub data_dir: PathBuf,
    /// The SSH CA, grants and certificates.
    pub ssh: Option<Arc<crate::ssh::Ssh>>,
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
            .ok_or_else(|| ControllerError::Unavailable("user store"))
    }

    fn audit_log(&self) -> Result<&Arc<AuditLog>, ControllerError> {
        self.audit
            .as_ref()
            .ok_or_else(|| ControllerError::Unavailable("audit log"))
    }

    fn mesh(&self) -> Result<&Arc<Mesh>, ControllerError> {
        self.mesh.as_ref().ok_or_else(|| {
            ControllerError::BadRequest("this command needs a running controller".into())
        })
    }

    /// Run one command (blocking: RSA and flushes happen here).
    pub fn handle(&self, req: AdminRequest) -> Result<AdminReply, ControllerError> {
        use AdminRequest as R;
        let now = SystemTime::now();
        match req {
            R::CaShow => self.ca_show(),
            R::CaExport { intermediate, id } => self.ca_export(intermediate, id),
            R::CaSignCsr {
                csr_der,
                zone,
                node,
                wg_key,
            } => self.ca_sign_csr(csr_der, zone, node, wg_key, now),
            R::CaIssueTls {
                dns,
                ips,
                lifetime_secs,
            } => self.ca_issue_tls(dns, ips, lifetime_secs, now),
            R::CaRevoke { serial, reason } => self.ca_revoke(serial, reason, now),
            R::CaCrl => self.ca_crl(),
            R::CaRotateIntermediate { spread_secs } => {
                self.ca_rotate_intermediate(spread_secs, now)
            }
            R::CaRotateRoot {
                grace_secs,
                spread_secs,
            } => self.ca_rotate_root(grace_secs, spread_secs, now),
            R::ZoneAdd {
                name,
                cidr,
                intra_zone_tunnels,
            } => self.zone_add(name, cidr, intra_zone_tunnels, now),
            R::ZoneList => self.zone_list(),
            R::TokenCreate {
                zone,
                ttl_secs,
                uses,
            } => self.token_create(zone, ttl_secs, uses, now),
            R::NodeList => self.node_list(),
            R::NodeRevoke { node, reason } => self.node_revoke(node, reason, now),
            R::UserAdd {
                email,
                role,
                password,
            } => self.user_add(email, role, password),
            R::Health => self.health(),
            R::BlockAdd {
                address,
                secs,
                reason,
            } => self.block_add(address, secs, reason, now),
            R::BlockList => self.block_list(now),
            R::BlockRemove { address } => self.block_remove(address),
            R::BlockAllowAdd { cidr, note } => self.block_allow_add(cidr, note, now),
            R::BlockAllowList => self.block_allow_list(),
            R::BlockAllowRemove { cidr } => self.block_allow_remove(cidr),
            R::UserList => self.user_list(),
            R::UserDisable { email } => self.user_disable(email),
            R::UserPasswd { email, password } => self.user_passwd(email, password),
            R::UserResetTotp { email } => self.user_reset_totp(email),
            R::ThrottleList => self.throttle_list(),
            R::ThrottleClear { email, source } => self.throttle_clear(email, source),
            R::Audit { limit } => self.audit(limit),
            R::DomainAdd {
                name,
                issuer,
                owner,
                edge_zones,
            } => self.domain_add(name, issuer, owner, edge_zones),
            R::DomainList => self.domain_list(),
            R::DomainDeploy { name } => self.domain_deploy(name),
            R::DomainStatus { name } => self.domain_status(name),
            R::DomainRemove { name } => self.domain_remove(name),
            R::Backup { file_name } => self.backup(&file_name, now),
            R::SshInit { key_type } => self.ssh_init(key_type),
            R::SshCa => self.ssh_ca(),
            R::SshKnownHosts => self.ssh_known_hosts(),
            R::SshGrant {
                email,
                zone,
                principal,
                max_ttl_secs,
                extensions,
            } => self.ssh_grant(email, zone, principal, max_ttl_secs, extensions),
            R::SshRevokeGrant {
                email,
                zone,
                principal,
            } => self.ssh_revoke_grant(email, zone, principal),
            R::SshGrants => self.ssh_grants(),
            R::SshSignUser {
                email,
                public_key,
                ttl_secs,
            } => self.ssh_sign_user(email, public_key, ttl_secs),
            R::SshRevoke { serial, email } => self.ssh_revoke(serial, email),
            R::SshCerts { email } => self.ssh_certs(email),
            R::SshKrl => self.ssh_krl(),
            R::SshRevokedHosts => self.ssh_revoked_hosts(),
        }
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
