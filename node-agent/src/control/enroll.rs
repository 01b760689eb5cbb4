//! Enrollment and renewal of the node identity.

use super::client::{self, status_message};
use super::state::{Identity, StateDir, cert_info, parse_controllers, write_file};
use anyhow::{Context, Result, bail};
use base64::Engine;
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, PKCS_RSA_SHA256};
use rustls::pki_types::PrivatePkcs8KeyDer;
use x509_parser::prelude::{FromDer, X509Certificate};
use zonemesh_proto as pb;

/// What `enroll` needs.
#[derive(Clone, Debug)]
pub struct EnrollParams {
    /// One controller address, or several separated by commas (tried in order).
    pub controller: String,
    pub ca_fingerprint: String,
    pub token: String,
    pub node: String,
    pub zone: Option<String>,
    pub endpoints: Vec<String>,
}

/// A CSR for `key` naming the node (the CA takes only the key from it).
pub fn csr_for(key: &KeyPair, node: &str) -> Result<Vec<u8>> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, node);
    Ok(p.serialize_request(key)?.der().to_vec())
}

/// A sensible default node name: the host name, lowercased, invalid characters as '-'.
pub fn default_node_name() -> String {
    let raw =
        std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_else(|_| "node".into());
    let name: String = raw
        .trim()
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let name = name.trim_matches('-').chars().take(63).collect::<String>();
    if name.is_empty() { "node".into() } else { name }
}

/// Check that what the controller returned is ours: our key, our WireGuard key, the node
/// and zone we were given, chained to the pinned root.
fn check_issued(
    resp: &pb::EnrollResponse,
    key: &KeyPair,
    wg_public: &[u8; 32],
    fingerprint: &str,
) -> Result<()> {
    use rcgen::PublicKeyData;
    if zonemesh_ca::fingerprint_sha256(&resp.root_der) != fingerprint {
        bail!("the controller returned a CA root that does not match --ca-fingerprint");
    }
    let (_, cert) = X509Certificate::from_der(&resp.certificate_der)
        .context("controller returned an unparsable certificate")?;
    if cert.public_key().raw != key.subject_public_key_info().as_slice() {
        bail!("the issued certificate is not for this node's key");
    }
    // The CRL arrives with the first Watch snapshot, where peers' chains are fully checked;
    // here the signatures up to the pinned root are checked directly.
    let (_, int) = X509Certificate::from_der(resp.chain_der.first().context("no chain returned")?)
        .context("bad intermediate")?;
    cert.verify_signature(Some(int.public_key()))
        .map_err(|_| anyhow::anyhow!("certificate is not signed by the returned intermediate"))?;
    let (_, root) = X509Certificate::from_der(&resp.root_der).context("bad root")?;
    int.verify_signature(Some(root.public_key()))
        .map_err(|_| anyhow::anyhow!("intermediate is not signed by the pinned root"))?;
    let wg_ext = cert
        .extensions()
        .iter()
        .find(|e| zonemesh_ca::is_wg_key_binding(&e.oid))
        .context("certificate carries no WireGuard key binding")?;
    if !wg_ext.value.ends_with(wg_public) {
        bail!("certificate binds a different WireGuard key");
    }
    Ok(())
}

/// Enroll: generate keys locally, send the CSR and public WireGuard key, store the result.
pub async fn enroll(state: &StateDir, p: &EnrollParams) -> Result<Identity> {
    if state.is_enrolled() {
        bail!(
            "{} is already enrolled as {}; use a new --state-dir",
            state.dir.display(),
            state.identity()?.spiffe_id
        );
    }
    zonemesh_ca::validate_label("node name", &p.node, false)?;
    let controllers = parse_controllers(&p.controller)?;
    let tls = client::pinned_config(&p.ca_fingerprint)?;
    let fingerprint = p
        .ca_fingerprint
        .trim()
        .to_ascii_lowercase()
        .replace(':', "");
    state.create()?;
    let key = if state.node_key().exists() {
        KeyPair::from_pkcs8_der_and_sign_algo(
            &PrivatePkcs8KeyDer::from(state.read_node_key()?.to_vec()),
            &PKCS_RSA_SHA256,
        )?
    } else {
        let k = zonemesh_ca::generate_rsa_4096()?;
        write_file(
            &state.node_key(),
            zonemesh_ca::to_pem("PRIVATE KEY", &k.serialize_der()).as_bytes(),
            0o600,
        )?;
        k
    };
    if !state.wg_key().exists() {
        let mut raw = zeroize::Zeroizing::new([0u8; 32]);
        rand::fill(&mut raw[..]);
        let b64 = zeroize::Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(*raw));
        write_file(&state.wg_key(), b64.as_bytes(), 0o600)?;
    }
    let wg_secret = x25519_dalek::StaticSecret::from(*state.read_wg_key()?);
    let wg_public = x25519_dalek::PublicKey::from(&wg_secret).to_bytes();
    let csr = csr_for(&key, &p.node)?;

    let (channel, used) = client::connect_first(&controllers, tls).await?;
    let mut rpc = pb::enrollment_client::EnrollmentClient::new(channel);
    let resp = rpc
        .enroll(pb::EnrollRequest {
            token: p.token.trim().to_string(),
            csr_der: csr,
            wg_public_key: wg_public.to_vec(),
            endpoints: p.endpoints.clone(),
            node_name: p.node.clone(),
            zone: p.zone.clone().unwrap_or_default(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("enrollment refused: {}", status_message(&s)))?
        .into_inner();
    check_issued(&resp, &key, &wg_public, &fingerprint)?;
    write_file(
        &state.ca(),
        zonemesh_ca::to_pem("CERTIFICATE", &resp.root_der).as_bytes(),
        0o644,
    )?;
    state.write_cert(&resp.certificate_der, &resp.chain_der)?;
    let id = Identity {
        controller: used,
        controllers: if controllers.len() > 1 {
            controllers
        } else {
            Vec::new()
        },
        ca_fingerprint: fingerprint,
        trust_domain: resp.trust_domain,
        zone: resp.zone,
        node: resp.node,
        spiffe_id: resp.spiffe_id,
        overlay_ip: resp.overlay_ip,
        zone_cidr: resp.zone_cidr,
        endpoints: p.endpoints.clone(),
    };
    // Written last: its presence means enrollment completed.
    write_file(
        &state.identity_file(),
        serde_json::to_string_pretty(&id)?.as_bytes(),
        0o644,
    )?;
    Ok(id)
}

/// Renew over mutual TLS with the current certificate; the new one is checked before it
/// replaces the old. With `rotate_key`, the certificate is for a new RSA-4096 key.
pub async fn renew(state: &StateDir, rotate_key: bool) -> Result<Renewed> {
    let id = state.identity()?;
    let (channel, _) =
        client::connect_first(&id.controller_addrs(), client::mtls_config(state)?).await?;
    renew_over(state, channel, rotate_key).await
}

/// A certificate obtained by renewal, already checked and stored.
#[derive(Clone)]
pub struct Renewed {
    pub info: super::state::CertInfo,
    pub cert_der: Vec<u8>,
    pub chain_der: Vec<Vec<u8>>,
    /// The new key (PKCS#8 DER) when the renewal rotated it.
    pub rotated_key: Option<zeroize::Zeroizing<Vec<u8>>>,
}

impl std::fmt::Debug for Renewed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Renewed")
            .field("serial", &self.info.serial_hex)
            .field("rotated_key", &self.rotated_key.is_some())
            .finish()
    }
}

/// Renew over an open mutual-TLS channel; the new certificate is checked, then stored.
/// With `rotate_key` a new RSA-4096 key is generated for the CSR and stored with the
/// certificate. The key, the CSR signature and the files are handled on the blocking pool.
pub async fn renew_over(
    state: &StateDir,
    channel: tonic::transport::Channel,
    rotate_key: bool,
) -> Result<Renewed> {
    let st = state.clone();
    let (id, key, csr, wg_public, root_der) = super::blocking(move || {
        let id = st.identity()?;
        let key = if rotate_key {
            zonemesh_ca::generate_rsa_4096()?
        } else {
            KeyPair::from_pkcs8_der_and_sign_algo(
                &PrivatePkcs8KeyDer::from(st.read_node_key()?.to_vec()),
                &PKCS_RSA_SHA256,
            )?
        };
        let csr = csr_for(&key, &id.node)?;
        let wg_secret = x25519_dalek::StaticSecret::from(*st.read_wg_key()?);
        let wg_public = x25519_dalek::PublicKey::from(&wg_secret).to_bytes();
        Ok((id, key, csr, wg_public, st.read_ca()?))
    })
    .await?;
    let mut rpc = pb::mesh_client::MeshClient::new(channel);
    let resp = rpc
        .renew(pb::RenewRequest {
            csr_der: csr,
            rotate_key,
        })
        .await
        .map_err(|s| anyhow::anyhow!("renewal refused: {}", status_message(&s)))?
        .into_inner();
    let check = pb::EnrollResponse {
        certificate_der: resp.certificate_der.clone(),
        chain_der: resp.chain_der.clone(),
        root_der,
        trust_domain: id.trust_domain.clone(),
        ..Default::default()
    };
    check_issued(&check, &key, &wg_public, &id.ca_fingerprint)?;
    let rotated_key = rotate_key.then(|| zeroize::Zeroizing::new(key.serialize_der()));
    let st = state.clone();
    super::blocking(move || {
        match &rotated_key {
            Some(k) => {
                st.write_rotated(k, &resp.certificate_der, &resp.chain_der)?;
                st.set_renewals_since_key(0)?;
            }
            None => {
                st.write_cert(&resp.certificate_der, &resp.chain_der)?;
                st.set_renewals_since_key(st.renewals_since_key().saturating_add(1))?;
            }
        }
        Ok(Renewed {
            info: cert_info(&resp.certificate_der)?,
            cert_der: resp.certificate_der,
            chain_der: resp.chain_der,
            rotated_key,
        })
    })
    .await
}
