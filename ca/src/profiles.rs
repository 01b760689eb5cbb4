//! Certificate profiles. Each profile is one function that sets every field explicitly:
//! nothing is inherited from rcgen's defaults (whose validity runs from 1975 to 4096).

use crate::binding::{BindingSigner, STAND_IN_OID, put_binding_oid};
use crate::error::{CsrError, Error, Result};
use crate::identity::{SpiffeId, WireGuardKey, validate_label};
use crate::{keys, to_offset};
use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, PKCS_RSA_SHA256,
    PublicKeyData, SanType, SerialNumber, SubjectPublicKeyInfo,
};
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use std::net::IpAddr;
use std::time::{Duration, SystemTime};
use x509_parser::prelude::{FromDer, X509Certificate, X509CertificationRequest};
use x509_parser::public_key::PublicKey;
use zeroize::Zeroizing;

const DAY: u64 = 86_400;
/// Root CA lifetime: 10 years.
pub const ROOT_LIFETIME: Duration = Duration::from_secs(3650 * DAY);
/// Intermediate CA lifetime: 5 years.
pub const INTERMEDIATE_LIFETIME: Duration = Duration::from_secs(1825 * DAY);
/// Back-dating applied to every certificate so small clock skew between hosts is harmless.
pub(crate) const BACKDATE: Duration = Duration::from_secs(300);

/// A fresh 128-bit random serial, never zero in its first byte so its hex form is stable.
pub(crate) fn random_serial() -> SerialNumber {
    let mut b = [0u8; 16];
    loop {
        rand::fill(&mut b);
        if b[0] != 0 {
            return SerialNumber::from_slice(&b);
        }
    }
}

/// Lowercase hex of a serial's magnitude, without leading zero bytes: the form used as a
/// key everywhere (store, CRL lookups, OCSP, CLI).
pub fn serial_hex(bytes: &[u8]) -> String {
    let start = bytes
        .iter()
        .position(|b| *b != 0)
        .unwrap_or(bytes.len().saturating_sub(1));
    hex::encode(&bytes[start..])
}

fn name(common_name: &str, trust_domain: &str, unit: Option<&str>) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, format!("zonemesh {trust_domain}"));
    if let Some(unit) = unit {
        dn.push(DnType::OrganizationalUnitName, unit);
    }
    dn.push(DnType::CommonName, common_name);
    dn
}

fn validity(params: &mut CertificateParams, now: SystemTime, lifetime: Duration) {
    params.not_before = to_offset(now - BACKDATE);
    params.not_after = to_offset(now + lifetime);
}

/// The root's common name: the first root has no generation suffix (as it always had),
/// later ones `gN`, so a cross-signed root never shares its subject with the root above it.
pub(crate) fn root_common_name(trust_domain: &str, generation: u32) -> String {
    if generation <= 1 {
        format!("zonemesh root CA {trust_domain}")
    } else {
        format!("zonemesh root CA {trust_domain} g{generation}")
    }
}

pub(crate) fn root_profile(
    trust_domain: &str,
    generation: u32,
    now: SystemTime,
) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = name(
        &root_common_name(trust_domain, generation),
        trust_domain,
        None,
    );
    p.serial_number = Some(random_serial());
    validity(&mut p, now, ROOT_LIFETIME);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.extended_key_usages = vec![];
    p.subject_alt_names = vec![];
    p.use_authority_key_identifier_extension = false;
    p.key_identifier_method = KeyIdMethod::Sha256;
    p
}

pub(crate) fn intermediate_profile(
    trust_domain: &str,
    generation: u32,
    now: SystemTime,
) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = name(
        &format!("zonemesh intermediate CA {trust_domain} g{generation}"),
        trust_domain,
        None,
    );
    p.serial_number = Some(random_serial());
    validity(&mut p, now, INTERMEDIATE_LIFETIME);
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    // digitalSignature lets the intermediate sign OCSP responses for its own certificates.
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.extended_key_usages = vec![];
    p.subject_alt_names = vec![];
    p.use_authority_key_identifier_extension = true;
    p.key_identifier_method = KeyIdMethod::Sha256;
    p
}

fn node_profile(
    id: &SpiffeId,
    wg: &WireGuardKey,
    now: SystemTime,
    lifetime: Duration,
) -> Result<CertificateParams> {
    let mut p = CertificateParams::default();
    p.distinguished_name = name(&id.node, &id.trust_domain, Some(&id.zone));
    p.serial_number = Some(random_serial());
    validity(&mut p, now, lifetime);
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ClientAuth,
        ExtendedKeyUsagePurpose::ServerAuth,
    ];
    p.subject_alt_names = vec![SanType::URI(id.uri().try_into()?)];
    p.use_authority_key_identifier_extension = true;
    p.key_identifier_method = KeyIdMethod::Sha256;
    let content = yasna::construct_der(|w| w.write_bytes(&wg.0));
    let mut ext = CustomExtension::from_oid_content(STAND_IN_OID, content);
    ext.set_criticality(false);
    p.custom_extensions = vec![ext];
    Ok(p)
}

/// `id-pe-authorityInfoAccess` (RFC 5280 4.2.2.1).
const AIA_OID: &[u64] = &[1, 3, 6, 1, 5, 5, 7, 1, 1];
/// `id-ad-ocsp`.
const AD_OCSP: &[u64] = &[1, 3, 6, 1, 5, 5, 7, 48, 1];

/// An Authority Information Access extension naming one OCSP responder.
fn aia_ocsp(url: &str) -> Result<CustomExtension> {
    if !(url.starts_with("http://") || url.starts_with("https://")) || !url.is_ascii() {
        return Err(Error::BadInput(format!(
            "OCSP responder URL must be an http(s) URL, got {url:?}"
        )));
    }
    let content = yasna::construct_der(|w| {
        w.write_sequence(|w| {
            w.next().write_sequence(|w| {
                w.next()
                    .write_oid(&yasna::models::ObjectIdentifier::from_slice(AD_OCSP));
                // GeneralName uniformResourceIdentifier: [6] IMPLICIT IA5String.
                w.next()
                    .write_tagged_implicit(yasna::Tag::context(6), |w| w.write_ia5_string(url));
            });
        });
    });
    let mut ext = CustomExtension::from_oid_content(AIA_OID, content);
    ext.set_criticality(false);
    Ok(ext)
}

/// The portal profile: a TLS server leaf for exactly one DNS name (the portal's domain),
/// serverAuth only, with the controller's OCSP responder in its AIA so edges can staple.
fn portal_profile(
    domain: &str,
    ocsp_url: &str,
    now: SystemTime,
    lifetime: Duration,
) -> Result<CertificateParams> {
    let names = TlsNames {
        dns: vec![domain.to_string()],
        ips: vec![],
    };
    names.validate()?;
    if domain.starts_with("*.") {
        return Err(Error::Name(format!(
            "portal domain {domain:?} must not be a wildcard"
        )));
    }
    let mut p = tls_profile(&names, now, lifetime)?;
    p.custom_extensions = vec![aia_ocsp(ocsp_url)?];
    Ok(p)
}

fn tls_profile(names: &TlsNames, now: SystemTime, lifetime: Duration) -> Result<CertificateParams> {
    let mut p = CertificateParams::default();
    let cn = names
        .dns
        .first()
        .cloned()
        .or_else(|| names.ips.first().map(|ip| ip.to_string()))
        .unwrap_or_default();
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.serial_number = Some(random_serial());
    validity(&mut p, now, lifetime);
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let mut sans = Vec::new();
    for d in &names.dns {
        sans.push(SanType::DnsName(d.clone().try_into()?));
    }
    for ip in &names.ips {
        sans.push(SanType::IpAddress(*ip));
    }
    p.subject_alt_names = sans;
    p.use_authority_key_identifier_extension = true;
    p.key_identifier_method = KeyIdMethod::Sha256;
    p.custom_extensions = vec![];
    Ok(p)
}

/// The lifetime a TLS leaf gets: the policy's default when none is asked for, never
/// more than its maximum, never less than a minute.
fn check_tls_lifetime(policy: &TlsPolicy, lifetime: Option<Duration>) -> Result<Duration> {
    let lifetime = lifetime.unwrap_or(policy.default_lifetime);
    if lifetime > policy.max_lifetime {
        return Err(Error::LifetimeTooLong {
            requested_secs: lifetime.as_secs(),
            max_secs: policy.max_lifetime.as_secs(),
        });
    }
    if lifetime < Duration::from_secs(60) {
        return Err(Error::BadInput(
            "TLS certificate lifetime must be at least 60 s".into(),
        ));
    }
    Ok(lifetime)
}

/// Policy for node certificates.
#[derive(Clone, Debug)]
pub struct NodePolicy {
    /// Validity of a node certificate (default 30 days).
    pub lifetime: Duration,
}

impl Default for NodePolicy {
    fn default() -> Self {
        Self {
            lifetime: Duration::from_secs(30 * DAY),
        }
    }
}

/// Policy for short-lived TLS server certificates.
#[derive(Clone, Debug)]
pub struct TlsPolicy {
    /// Lifetime when the caller does not ask for one (default 24 h).
    pub default_lifetime: Duration,
    /// Longest lifetime ever issued (default 7 days).
    pub max_lifetime: Duration,
}

impl Default for TlsPolicy {
    fn default() -> Self {
        Self {
            default_lifetime: Duration::from_secs(DAY),
            max_lifetime: Duration::from_secs(7 * DAY),
        }
    }
}

/// The names a TLS server certificate is valid for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsNames {
    pub dns: Vec<String>,
    pub ips: Vec<IpAddr>,
}

impl TlsNames {
    fn validate(&self) -> Result<()> {
        if self.dns.is_empty() && self.ips.is_empty() {
            return Err(Error::Name(
                "a TLS certificate needs at least one DNS name or IP address".into(),
            ));
        }
        for d in &self.dns {
            let host = d.strip_prefix("*.").unwrap_or(d);
            validate_label("DNS name", host, true)?;
            if !host.contains('.') && host != "localhost" {
                return Err(Error::Name(format!(
                    "DNS name {d:?} must be fully qualified"
                )));
            }
        }
        Ok(())
    }
}

/// What a node asks for; only `csr_der`'s public key is taken from the requester.
#[derive(Clone, Debug)]
pub struct NodeRequest<'a> {
    pub csr_der: &'a [u8],
    pub zone: &'a str,
    pub node: &'a str,
    pub wg_public_key: WireGuardKey,
}

/// A certificate the CA has just issued.
#[derive(Clone, Debug)]
pub struct IssuedCert {
    pub der: Vec<u8>,
    pub serial_hex: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// Freshly generated CA material, as it must be stored (keys to be sealed by the caller).
pub struct CaMaterial {
    pub trust_domain: String,
    pub root_cert_der: Vec<u8>,
    pub root_key_pkcs8: Zeroizing<Vec<u8>>,
    pub intermediate_cert_der: Vec<u8>,
    pub intermediate_key_pkcs8: Zeroizing<Vec<u8>>,
}

impl CaMaterial {
    /// Generate a root and an intermediate, both RSA-4096 / SHA-256. `progress` is called
    /// with a short label before each slow step.
    pub fn generate(
        trust_domain: &str,
        now: SystemTime,
        mut progress: impl FnMut(&str),
    ) -> Result<Self> {
        validate_label("trust domain", trust_domain, true)?;
        progress("generating root key (RSA-4096)");
        let root_key = keys::generate_rsa_4096()?;
        let root_params = root_profile(trust_domain, 1, now);
        let root_cert = root_params.self_signed(&root_key)?;
        progress("generating intermediate key (RSA-4096)");
        let int_key = keys::generate_rsa_4096()?;
        let root_issuer = Issuer::new(root_params, &root_key);
        let int_cert =
            intermediate_profile(trust_domain, 1, now).signed_by(&int_key, &root_issuer)?;
        Ok(Self {
            trust_domain: trust_domain.into(),
            root_cert_der: root_cert.der().to_vec(),
            root_key_pkcs8: Zeroizing::new(root_key.serialize_der()),
            intermediate_cert_der: int_cert.der().to_vec(),
            intermediate_key_pkcs8: Zeroizing::new(int_key.serialize_der()),
        })
    }
}

/// An operating CA: the intermediate's key and the certificates above it.
pub struct Ca {
    trust_domain: String,
    root_der: CertificateDer<'static>,
    intermediate_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    /// SHA-1 and SHA-256 hashes of the intermediate's subject and key, for OCSP CertIDs.
    pub(crate) ocsp_ids: crate::ocsp::IssuerHashes,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

pub(crate) fn load_rsa_key(pkcs8: &[u8]) -> Result<KeyPair> {
    let der = PrivatePkcs8KeyDer::from(pkcs8.to_vec());
    Ok(KeyPair::from_pkcs8_der_and_sign_algo(
        &der,
        &PKCS_RSA_SHA256,
    )?)
}

fn rsa_bits(public_key: &PublicKey<'_>) -> Option<usize> {
    match public_key {
        PublicKey::RSA(rsa) => Some(rsa.key_size()),
        _ => None,
    }
}

fn parse_csr(csr_der: &[u8], want_bits: usize) -> Result<SubjectPublicKeyInfo> {
    let (rest, csr) = X509CertificationRequest::from_der(csr_der).map_err(CsrError::Der)?;
    if !rest.is_empty() {
        return Err(CsrError::TrailingData.into());
    }
    let spki = &csr.certification_request_info.subject_pki;
    let parsed = spki.parsed().map_err(CsrError::PublicKey)?;
    match rsa_bits(&parsed) {
        Some(bits) if bits == want_bits => {}
        Some(bits) => {
            return Err(Error::KeyPolicy(format!(
                "RSA-{bits} key refused; RSA-{want_bits} is required"
            )));
        }
        None => {
            let kind = match parsed {
                PublicKey::EC(_) => "EC",
                PublicKey::DSA(_) => "DSA",
                _ => "non-RSA",
            };
            return Err(Error::KeyPolicy(format!(
                "{kind} key refused; RSA-{want_bits} is required"
            )));
        }
    }
    csr.verify_signature().map_err(|_| Error::CsrSignature)?;
    Ok(SubjectPublicKeyInfo::from_der(spki.raw)?)
}

impl Ca {
    /// Build an operating CA from stored material. The intermediate key must match the
    /// intermediate certificate, and the intermediate must chain to the root.
    pub fn load(
        trust_domain: &str,
        root_der: &[u8],
        intermediate_der: &[u8],
        intermediate_key_pkcs8: &[u8],
    ) -> Result<Self> {
        validate_label("trust domain", trust_domain, true)?;
        let key = load_rsa_key(intermediate_key_pkcs8)?;
        let (_, int_cert) = X509Certificate::from_der(intermediate_der)
            .map_err(|e| Error::BadInput(format!("intermediate certificate: {e}")))?;
        if int_cert.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(Error::BadInput(
                "intermediate key does not match the intermediate certificate".into(),
            ));
        }
        let (_, root_cert) = X509Certificate::from_der(root_der)
            .map_err(|e| Error::BadInput(format!("root certificate: {e}")))?;
        int_cert
            .verify_signature(Some(root_cert.public_key()))
            .map_err(|_| Error::BadInput("intermediate is not signed by the root".into()))?;
        let ocsp_ids = crate::ocsp::IssuerHashes::of(&int_cert);
        let issuer = Issuer::from_ca_cert_der(&CertificateDer::from(intermediate_der), key)?;
        Ok(Self {
            trust_domain: trust_domain.into(),
            root_der: CertificateDer::from(root_der.to_vec()),
            intermediate_der: CertificateDer::from(intermediate_der.to_vec()),
            issuer,
            ocsp_ids,
        })
    }

    /// Load straight from freshly generated material.
    pub fn from_material(m: &CaMaterial) -> Result<Self> {
        Self::load(
            &m.trust_domain,
            &m.root_cert_der,
            &m.intermediate_cert_der,
            &m.intermediate_key_pkcs8,
        )
    }

    /// The trust domain in every SPIFFE ID this CA issues.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The root certificate (DER).
    pub fn root_der(&self) -> &[u8] {
        &self.root_der
    }

    /// The intermediate certificate (DER).
    pub fn intermediate_der(&self) -> &[u8] {
        &self.intermediate_der
    }

    pub(crate) fn issuer(&self) -> &Issuer<'static, KeyPair> {
        &self.issuer
    }

    /// A trust store containing this CA, for verifying node chains.
    pub fn trust_store(&self) -> crate::verify::TrustStore {
        crate::verify::TrustStore::new(
            &self.trust_domain,
            vec![self.root_der.to_vec()],
            vec![self.intermediate_der.to_vec()],
        )
    }

    fn finish(cert: rcgen::Certificate, params: &CertificateParams) -> IssuedCert {
        let serial = params
            .serial_number
            .as_ref()
            .map(|s| s.to_bytes())
            .unwrap_or_default();
        IssuedCert {
            der: cert.der().to_vec(),
            serial_hex: serial_hex(&serial),
            not_before: params.not_before.into(),
            not_after: params.not_after.into(),
        }
    }

    /// Sign a node certificate. Only the CSR's public key (RSA-4096, with a valid CSR
    /// signature) is used; names, validity, usages and the WireGuard binding come from policy.
    pub fn sign_node_csr(
        &self,
        policy: &NodePolicy,
        req: &NodeRequest<'_>,
        now: SystemTime,
    ) -> Result<IssuedCert> {
        let id = SpiffeId::new(&self.trust_domain, req.zone, req.node)?;
        let spki = parse_csr(req.csr_der, 4096)?;
        let params = node_profile(&id, &req.wg_public_key, now, policy.lifetime)?;
        let issuer =
            Issuer::from_ca_cert_der(&self.intermediate_der, BindingSigner(self.issuer.key()))?;
        let cert = params.signed_by(&spki, &issuer)?;
        let mut issued = Self::finish(cert, &params);
        issued.der = put_binding_oid(&issued.der)?;
        Ok(issued)
    }

    /// Sign a short-lived TLS server certificate for an RSA-2048 key given as a CSR.
    pub fn sign_tls_csr(
        &self,
        policy: &TlsPolicy,
        csr_der: &[u8],
        names: &TlsNames,
        lifetime: Option<Duration>,
        now: SystemTime,
    ) -> Result<IssuedCert> {
        let spki = parse_csr(csr_der, 2048)?;
        self.issue_tls_for(policy, &spki, names, lifetime, now)
    }

    /// Issue a short-lived TLS server certificate for a key the caller holds.
    pub fn issue_tls(
        &self,
        policy: &TlsPolicy,
        key: &KeyPair,
        names: &TlsNames,
        lifetime: Option<Duration>,
        now: SystemTime,
    ) -> Result<IssuedCert> {
        let spki_der = key.subject_public_key_info();
        let spki = SubjectPublicKeyInfo::from_der(&spki_der)?;
        let (_, parsed) = x509_parser::x509::SubjectPublicKeyInfo::from_der(&spki_der)
            .map_err(|e| Error::KeyPolicy(e.to_string()))?;
        let bits = parsed.parsed().ok().as_ref().and_then(rsa_bits);
        if bits != Some(2048) {
            return Err(Error::KeyPolicy("TLS leaves use RSA-2048 keys".into()));
        }
        self.issue_tls_for(policy, &spki, names, lifetime, now)
    }

    /// Issue a portal certificate for `domain` (RSA-2048 key the caller generated, which
    /// is checked), valid for `lifetime` (default and maximum from `policy`), with
    /// `ocsp_url` as its OCSP responder.
    pub fn issue_portal(
        &self,
        policy: &TlsPolicy,
        key: &KeyPair,
        domain: &str,
        ocsp_url: &str,
        lifetime: Option<Duration>,
        now: SystemTime,
    ) -> Result<IssuedCert> {
        let spki_der = key.subject_public_key_info();
        let spki = SubjectPublicKeyInfo::from_der(&spki_der)?;
        let (_, parsed) = x509_parser::x509::SubjectPublicKeyInfo::from_der(&spki_der)
            .map_err(|e| Error::KeyPolicy(e.to_string()))?;
        if parsed.parsed().ok().as_ref().and_then(rsa_bits) != Some(2048) {
            return Err(Error::KeyPolicy(
                "portal certificates use RSA-2048 keys".into(),
            ));
        }
        let lifetime = check_tls_lifetime(policy, lifetime)?;
        let params = portal_profile(domain, ocsp_url, now, lifetime)?;
        let cert = params.signed_by(&spki, &self.issuer)?;
        Ok(Self::finish(cert, &params))
    }

    fn issue_tls_for(
        &self,
        policy: &TlsPolicy,
        spki: &SubjectPublicKeyInfo,
        names: &TlsNames,
        lifetime: Option<Duration>,
        now: SystemTime,
    ) -> Result<IssuedCert> {
        names.validate()?;
        let lifetime = check_tls_lifetime(policy, lifetime)?;
        let params = tls_profile(names, now, lifetime)?;
        let cert = params.signed_by(spki, &self.issuer)?;
        Ok(Self::finish(cert, &params))
    }
}
