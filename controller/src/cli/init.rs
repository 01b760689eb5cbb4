//! `zonemesh-controller init`: a new CA, key-encryption key and pepper in a new data
//! directory.

use crate::authority::Authority;
use crate::secrets::KekSource;
use anyhow::{Result, bail};
use std::path::Path;
use std::time::SystemTime;

/// Create the CA in `data_dir`; refuses before doing anything when one exists.
pub fn init(data_dir: &Path, kek: &KekSource, trust_domain: &str, ssh_ca_key: &str) -> Result<()> {
    // zonemesh-controller init must fail before doing anything when a CA exists.
    zonemesh_ca::validate_label("trust domain", trust_domain, true)?;
    let Some(ssh_kind) = crate::ssh::CaKeyType::parse(ssh_ca_key) else {
        bail!("--ssh-ca-key {ssh_ca_key} is not ed25519 or rsa4096");
    };
    crate::secrets::create_private_dir(data_dir)?;
    let store = crate::admin::local::open_store(data_dir)?;
    if Authority::exists(&store)? {
        bail!(
            "{} already holds a CA; refusing to overwrite it",
            data_dir.display()
        );
    }
    if kek.file.exists() && std::env::var_os(crate::secrets::KEK_ENV).is_none() {
        bail!(
            "{} already exists; refusing to overwrite a key-encryption key",
            kek.file.display()
        );
    }
    let bar = indicatif::ProgressBar::new_spinner();
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    let material = zonemesh_ca::CaMaterial::generate(trust_domain, SystemTime::now(), |step| {
        bar.set_message(step.to_string())
    })?;
    bar.set_message(format!("SSH CA keys ({})", ssh_kind.as_str()));
    let ssh_keys = crate::ssh::CaKeys::generate(ssh_kind, trust_domain)?;
    bar.finish_and_clear();
    let k = kek.create()?;
    Authority::install(&store, &k, &material)?;
    ssh_keys.install(&store, &k)?;
    let pepper_file = crate::serve::pepper_path(data_dir);
    if std::env::var_os("ZONEMESH_PEPPER").is_none() && !pepper_file.exists() {
        crate::secrets::write_secret_file(
            &pepper_file,
            crate::auth::Pepper::generate(1).encode().as_bytes(),
        )?;
    }
    println!("zonemesh CA created for trust domain {trust_domain}");
    println!(
        "key-encryption key: {}",
        if std::env::var_os(crate::secrets::KEK_ENV).is_some() {
            "from ZONEMESH_KEK".to_string()
        } else {
            kek.file.display().to_string()
        }
    );
    println!(
        "SSH CA ({}): user CA {}, host CA {}",
        ssh_kind.as_str(),
        ssh_keys
            .user
            .public_key()
            .fingerprint(ssh_key::HashAlg::Sha256),
        ssh_keys
            .host
            .public_key()
            .fingerprint(ssh_key::HashAlg::Sha256)
    );
    println!("root SHA-256 fingerprint (agents pin this with --ca-fingerprint):");
    println!(
        "{}",
        zonemesh_ca::fingerprint_sha256(&material.root_cert_der)
    );
    Ok(())
}
