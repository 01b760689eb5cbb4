//! Where an admin command runs: on the running controller through its socket, or, for the
//! commands that need no live mesh (CA, users, audit), directly on the store when no
//! controller is running.

use super::proto::{AdminReply, AdminRequest};
use super::{AdminHandler, client};
use crate::audit::AuditLog;
use crate::auth::{NoSecuritySink, Pepper, WebConfig};
use crate::authority::Authority;
use crate::secrets::KekSource;
use crate::serve::{StoreDashboard, pepper_path};
use crate::store::{Store, StoreError};
use crate::web::WebState;
use anyhow::{Result, bail};
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

/// Open the data directory's store, explaining a lock held by a controller that does not
/// answer on its socket.
pub fn open_store(data_dir: &Path) -> Result<Store> {
    match Store::open(&data_dir.join("db")) {
        Ok(s) => Ok(s),
        Err(StoreError::Locked) => bail!(
            "the data directory {} is in use by a running controller whose admin socket does not answer",
            data_dir.display()
        ),
        Err(e) => Err(e.into()),
    }
}

/// Send a command to the running controller, or run it on the store when none runs.
pub async fn request(data_dir: &Path, kek: &KekSource, req: AdminRequest) -> Result<AdminReply> {
    request_within(data_dir, kek, req, client::CALL_TIMEOUT).await
}

/// [`request`] with its own deadline for the running controller's reply (long commands).
pub async fn request_within(
    data_dir: &Path,
    kek: &KekSource,
    req: AdminRequest,
    timeout: std::time::Duration,
) -> Result<AdminReply> {
    if !data_dir.exists() {
        bail!(
            "data directory {} does not exist (run `zonemesh-controller init` first)",
            data_dir.display()
        );
    }
    let socket = super::socket_path(data_dir);
    match client::call_socket(&socket, &req, timeout, client::MAX_REPLY).await? {
        Some(resp) => resp.into_result().map_err(anyhow::Error::msg),
        None => {
            if req.needs_server() {
                bail!(
                    "no controller is running on {} (start it with `zonemesh-controller serve --data-dir {}`)",
                    data_dir.display(),
                    data_dir.display()
                );
            }
            let handler = offline_handler(data_dir, kek)?;
            let r = tokio::task::spawn_blocking(move || handler.handle(req)).await?;
            r.map_err(Into::into)
        }
    }
}

/// The handler over the store alone: no mesh; users and audit when their keys are there.
fn offline_handler(data_dir: &Path, kek: &KekSource) -> Result<AdminHandler> {
    if !data_dir.join("db").exists() {
        bail!(
            "{} holds no zonemesh data (run `zonemesh-controller init` first)",
            data_dir.display()
        );
    }
    let store = open_store(data_dir)?;
    let kek = kek.load()?;
    let auth = Authority::load(store, &kek, SystemTime::now())?;
    let store = auth.store().clone();
    let audit = Arc::new(AuditLog::open(store.kv())?);
    let ssh = crate::ssh::Ssh::open(&store, &kek, auth.trust_domain(), Some(audit.clone()))?;
    let web = match Pepper::from_env_or_file(Some(&pepper_path(data_dir))) {
        Ok(pepper) => Some(WebState::new(
            &WebConfig::new(pepper),
            audit.clone(),
            Arc::new(NoSecuritySink),
            Arc::new(StoreDashboard(store.clone())),
        )?),
        Err(_) => None,
    };
    Ok(AdminHandler {
        auth: Arc::new(auth),
        mesh: None,
        audit: Some(audit),
        web,
        domains: None,
        data_dir: data_dir.to_path_buf(),
        ssh: Some(ssh),
    })
}
