//! `zonemesh-controller store migrate`: copy an embedded installation into etcd.

use crate::core::kv::migrate::{TreeCheck, migrate};
use crate::core::kv::url::StoreUrl;
use crate::store::{Store, StoreError};
use anyhow::{Result, bail};
use clap::Subcommand;
use std::path::{Path, PathBuf};

#[derive(Subcommand, Debug)]
pub enum StoreCommand {
    /// Copy every tree of a stopped controller's store into another store (e.g. etcd),
    /// then check the copy (entries and SHA-256 per tree). Keys stay sealed; the KEK and
    /// pepper are not in the store: give the new controllers the same ones.
    Migrate {
        /// Source: `sled:DIR` (a data directory or its `db` directory; its controller
        /// must be stopped).
        #[arg(long, value_name = "URL")]
        from: String,
        /// Target: `etcd://HOST:PORT[,...][/PREFIX]` or `etcds://...`.
        #[arg(long, value_name = "URL")]
        to: String,
        /// Write into a target that already holds data.
        #[arg(long)]
        overwrite: bool,
        #[arg(long)]
        json: bool,
    },
}

fn sled_source(url: &StoreUrl) -> Result<PathBuf> {
    let Some(dir) = url.sled_dir(Path::new(".")) else {
        bail!("--from must be sled:DIR");
    };
    let db = dir.join("db");
    Ok(if db.is_dir() { db } else { dir })
}

pub async fn run(command: StoreCommand) -> Result<()> {
    match command {
        StoreCommand::Migrate {
            from,
            to,
            overwrite,
            json,
        } => {
            let from_url: StoreUrl = from.parse()?;
            let to_url: StoreUrl = to.parse()?;
            let dir = sled_source(&from_url)?;
            if !dir.exists() {
                bail!("{} does not exist", dir.display());
            }
            let checks = tokio::task::spawn_blocking(move || -> Result<Vec<TreeCheck>> {
                let src = match Store::open(&dir) {
                    Ok(s) => s,
                    Err(StoreError::Locked) => bail!(
                        "{} is in use: stop the controller on it before migrating",
                        dir.display()
                    ),
                    Err(e) => return Err(e.into()),
                };
                let target = to_url.open(Path::new("."))?;
                Ok(migrate(src.kv(), &target, overwrite)?)
            })
            .await??;
            if json {
                println!("{}", serde_json::to_string_pretty(&checks)?);
            } else {
                println!(
                    "{:<20} {:>8} {:>8}  sha256 (source = target)",
                    "TREE", "SOURCE", "TARGET"
                );
                for c in &checks {
                    println!(
                        "{:<20} {:>8} {:>8}  {}",
                        c.tree,
                        c.source_entries,
                        c.target_entries,
                        &c.target_sha256[..16]
                    );
                }
                let total: u64 = checks.iter().map(|c| c.target_entries).sum();
                println!(
                    "copied {} trees, {total} entries to {to}; the copy matches the source",
                    checks.len()
                );
                println!(
                    "next: serve --data-dir DIR --store {to} (with the same secrets/ or ZONEMESH_KEK and ZONEMESH_PEPPER)"
                );
            }
            Ok(())
        }
    }
}
