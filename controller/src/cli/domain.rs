//! `domain add|list|deploy|remove`: portal domains on the running controller.

use super::render;
use crate::admin::local::request;
use crate::admin::{AdminReply, AdminRequest};
use crate::domains::DomainState;
use crate::secrets::KekSource;
use crate::text::Escaped;
use anyhow::{Result, bail};
use clap::Subcommand;
use std::path::Path;
use std::time::{Duration, Instant};

/// The longest `domain deploy` waits for its job.
const DEPLOY_LIMIT: Duration = Duration::from_secs(300);
const POLL: Duration = Duration::from_millis(500);

#[derive(Subcommand, Debug)]
pub enum DomainCommand {
    /// Add a portal domain served by the edges of the given zones.
    Add {
        name: String,
        /// acme (the ACME server given to `serve --acme-directory`) or internal (our CA).
        #[arg(long)]
        issuer: String,
        /// The portal owner who may see and deploy it.
        #[arg(long)]
        owner: String,
        /// A zone whose edges serve it (repeat for more; at least one).
        #[arg(long = "edge-zone", required = true)]
        edge_zones: Vec<String>,
    },
    /// Domains with their state, issuer, serial and expiry.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Issue and deploy a certificate now (the Deploy Certificate button); prints the job's
    /// progress and succeeds once every edge serves it.
    Deploy { name: String },
    /// Remove a domain; its edges stop serving it.
    Remove { name: String },
}

macro_rules! expect {
    ($reply:expr, $variant:ident) => {
        match $reply {
            AdminReply::$variant(v) => v,
            other => bail!("unexpected {} reply from the controller", other.kind()),
        }
    };
}

/// Run one domain command.
pub async fn run(dir: &Path, kek: &KekSource, cmd: DomainCommand) -> Result<()> {
    match cmd {
        DomainCommand::Add {
            name,
            issuer,
            owner,
            edge_zones,
        } => {
            let req = AdminRequest::DomainAdd {
                name,
                issuer,
                owner,
                edge_zones,
            };
            let d = expect!(request(dir, kek, req).await?, DomainAdded);
            println!(
                "domain {} added (issuer {}, owner {}, edge zones {})",
                Escaped(&d.name),
                d.issuer.as_str(),
                Escaped(&d.owner),
                Escaped(&d.edge_zones.join(", "))
            );
        }
        DomainCommand::List { json } => {
            let rows = expect!(
                request(dir, kek, AdminRequest::DomainList).await?,
                DomainList
            );
            print!("{}", render::domains(&rows, json));
        }
        DomainCommand::Deploy { name } => deploy(dir, kek, name).await?,
        DomainCommand::Remove { name } => {
            let req = AdminRequest::DomainRemove { name };
            let r = expect!(request(dir, kek, req).await?, DomainRemoved);
            println!("domain {} removed", Escaped(&r.name));
        }
    }
    Ok(())
}

async fn deploy(dir: &Path, kek: &KekSource, name: String) -> Result<()> {
    let started = Instant::now();
    let req = AdminRequest::DomainDeploy { name: name.clone() };
    let first = expect!(request(dir, kek, req).await?, Domain);
    let Some(job) = first.job.clone() else {
        bail!("the controller started no job for {}", Escaped(&name));
    };
    println!("job {} for {}", job.id, Escaped(&first.domain.name));
    let mut last = String::new();
    let mut d = first;
    loop {
        let Some(j) = d.job.as_ref().filter(|j| j.id == job.id) else {
            bail!("job {} of {} was replaced", job.id, Escaped(&name));
        };
        let line = format!("{}: {}", j.state.as_str(), j.detail);
        if line != last {
            println!("{}", Escaped(&line));
            last = line;
        }
        match j.state {
            DomainState::Deployed => return Ok(()),
            DomainState::Failed => bail!(
                "{}",
                d.domain.error.clone().unwrap_or_else(|| j.detail.clone())
            ),
            _ => {}
        }
        if started.elapsed() > DEPLOY_LIMIT {
            bail!(
                "job {} did not finish within {} s (still {}: {})",
                job.id,
                DEPLOY_LIMIT.as_secs(),
                j.state.as_str(),
                j.detail
            );
        }
        tokio::time::sleep(POLL).await;
        let req = AdminRequest::DomainStatus { name: name.clone() };
        d = expect!(request(dir, kek, req).await?, Domain);
    }
}
