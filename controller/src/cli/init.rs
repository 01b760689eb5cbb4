//! `zonemesh-controller init`: a new CA, key-encryption key and pepper in a new data
//! directory.

use crate::authority::Authority;
use crate::secrets::KekSource;
use anyhow::{Result, bail};
use std::path::Path;
use std::time::SystemTime;

/// Create the CA in `data_dir`; refuses before doing anything when one exists.
pub fn init(
    data_dir: &Path,
    kek: &KekSource,
    trust_domain: &str,
    ssh_ca_key: &str,
    store_url: Option<&str>,
) -> Result<()> {
    // zonemesh-controller init must fail before doing anything when a CA exists.
    zonemesh_ca::validate_label("trust domain", trust_domain, true)?;
    // `none`: no SSH CA now (`ssh init` creates one later).
    let ssh_kind = match crate::ssh::CaKeyType::parse(ssh_ca_key) {
        Some(k) => Some(k),
        None if ssh_ca_key == "none" => None,
        None => bail!("--ssh-ca-key {ssh_ca_key} is not ed25519, rsa4096 or none"),
    };
    crate::secrets::create_private_dir(data_dir)?;
    let url = crate::core::kv::url::StoreUrl::resolve(store_url, data_dir)?;
    let store = crate::admin::local::open_store_with(data_dir, store_url)?;
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
    let ssh_keys = match ssh_kind {
        Some(kind) => {
            bar.set_message(format!("SSH CA keys ({})", kind.as_str()));
            Some(crate::ssh::CaKeys::generate(kind, trust_domain)?)
        }
        None => None,
    };
    bar.finish_and_clear();
    let k = kek.create()?;
    Authority::install(&store, &k, &material)?;
    if let Some(keys) = &ssh_keys {
        keys.install(&store, &k)?;
    }
    if store_url.is_some() {
        url.save(data_dir)?;
    }
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
    match &ssh_keys {
        Some(keys) => println!(
            "SSH CA ({}): user CA {}, host CA {}",
            keys.kind.as_str(),
            keys.user.public_key().fingerprint(ssh_key::HashAlg::Sha256),
            keys.host.public_key().fingerprint(ssh_key::HashAlg::Sha256)
        ),
        None => println!("no SSH CA (create one with `zonemesh-controller ssh init`)"),
    }
    println!("root SHA-256 fingerprint (agents pin this with --ca-fingerprint):");
    println!(
        "{}",
        zonemesh_ca::fingerprint_sha256(&material.root_cert_der)
    );
    Ok(())
}
