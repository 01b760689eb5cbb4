//! OCSP staples for the edge (RFC 6960, in the RFC 5019 profile): find the responder a
//! certificate names, build the one-certificate request (SHA-1 CertID, no nonce, so
//! responders may answer from a cache), POST it, and check the answer before it is
//! stapled: it must be a successful basic response for exactly this certificate, signed
//! by the issuer or by a responder certificate the issuer signed for OCSP, and current.
//!
//! Everything but [`OcspClient::fetch`] is free of I/O; time is a parameter.

use aws_lc_rs::{digest, signature};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::time::{Duration, SystemTime};
use x509_parser::prelude::{FromDer, ParsedExtension, X509Certificate};
use yasna::models::ObjectIdentifier;
use yasna::{ASN1Error, ASN1ErrorKind, Tag};

const OID_SHA1: &[u64] = &[1, 3, 14, 3, 2, 26];
const OID_OCSP_BASIC: &[u64] = &[1, 3, 6, 1, 5, 5, 7, 48, 1, 1];
const OID_AD_OCSP: &str = "1.3.6.1.5.5.7.48.1";
/// Largest OCSP response read from a responder.
pub const MAX_RESPONSE: usize = 64 * 1024;
/// Clock skew tolerated on a response's `thisUpdate`.
const SKEW: Duration = Duration::from_secs(300);
/// Validity assumed for a response without `nextUpdate`.
const NO_NEXT_UPDATE: Duration = Duration::from_secs(3600);
/// Earliest and latest refresh after a good response.
pub const MIN_REFRESH: Duration = Duration::from_secs(60);
/// See [`MIN_REFRESH`].
pub const MAX_REFRESH: Duration = Duration::from_secs(12 * 3600);

/// Why no staple could be had.
#[derive(Debug, thiserror::Error)]
pub enum OcspError {
    /// A certificate could not be read.
    #[error("certificate: {0}")]
    Certificate(String),
    /// The certificate names an OCSP responder that is not a plain `http://` URL.
    #[error("unsupported OCSP responder URL {0:?} (only http:// is fetched)")]
    UnsupportedUrl(String),
    /// The responder could not be reached or answered badly at the HTTP level.
    #[error("OCSP responder {url}: {reason}")]
    Fetch { url: String, reason: String },
    /// The response is not valid DER of the expected shape.
    #[error("malformed OCSP response: {0}")]
    Malformed(String),
    /// The responder answered with an error status (RFC 6960 §4.2.1).
    #[error("OCSP responder refused: {0}")]
    Refused(&'static str),
    /// The response does not answer for this certificate.
    #[error("OCSP response is for another certificate")]
    WrongCertificate,
    /// No acceptable signature.
    #[error("OCSP response signature: {0}")]
    Signature(String),
    /// The response is not current.
    #[error("OCSP response is not current: {0}")]
    Stale(String),
}

/// What the responder says of the certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CertStatus {
    /// Not revoked.
    Good,
    /// Revoked at this time.
    Revoked { at: SystemTime },
    /// The responder does not know the certificate.
    Unknown,
}

/// A checked OCSP response, ready to staple.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Staple {
    /// The whole `OCSPResponse`, DER, as served to clients.
    pub der: Vec<u8>,
    /// The certificate's status.
    pub status: CertStatus,
    /// When the responder produced this status.
    pub this_update: SystemTime,
    /// Until when it is valid (assumed one hour after `this_update` when the responder
    /// gave no `nextUpdate`).
    pub next_update: SystemTime,
}

impl Staple {
    /// When to fetch again: halfway through the response's validity, bounded between
    /// [`MIN_REFRESH`] and [`MAX_REFRESH`] from `now`.
    pub fn refresh_in(&self, now: SystemTime) -> Duration {
        let life = self
            .next_update
            .duration_since(self.this_update)
            .unwrap_or_default();
        let at = self.this_update + life / 2;
        at.duration_since(now)
            .unwrap_or_default()
            .clamp(MIN_REFRESH, MAX_REFRESH)
    }
}

/// The responder named in a certificate's Authority Information Access, if any (the
/// first `http://` one when there are several).
///
/// # Errors
/// The certificate does not parse.
pub fn responder_url(cert_der: &[u8]) -> Result<Option<String>, OcspError> {
    let cert = parse_cert(cert_der)?;
    let mut urls = Vec::new();
    for ext in cert.extensions() {
        if let ParsedExtension::AuthorityInfoAccess(aia) = ext.parsed_extension() {
            for ad in &aia.accessdescs {
                if ad.access_method.to_id_string() == OID_AD_OCSP
                    && let x509_parser::extensions::GeneralName::URI(uri) = &ad.access_location
                {
                    urls.push((*uri).to_string());
                }
            }
        }
    }
    let http = urls.iter().position(|u| u.starts_with("http://"));
    Ok(http
        .or((!urls.is_empty()).then_some(0))
        .map(|i| urls.swap_remove(i)))
}

fn parse_cert(der: &[u8]) -> Result<X509Certificate<'_>, OcspError> {
    match X509Certificate::from_der(der) {
        Ok(([], c)) => Ok(c),
        Ok(_) => Err(OcspError::Certificate("trailing data".into())),
        Err(e) => Err(OcspError::Certificate(e.to_string())),
    }
}

/// One certificate to staple: its responder, its CertID and its issuer's key.
#[derive(Clone, Debug)]
pub struct OcspTarget {
    url: String,
    name_hash: Vec<u8>,
    key_hash: Vec<u8>,
    serial_hex: String,
    serial: Vec<u8>,
    issuer_der: Vec<u8>,
}

impl OcspTarget {
    /// The target for `leaf_der` issued by `issuer_der`; `None` when the leaf names no
    /// OCSP responder.
    ///
    /// # Errors
    /// Unparsable certificates, or a responder URL other than `http://`.
    pub fn new(leaf_der: &[u8], issuer_der: &[u8]) -> Result<Option<Self>, OcspError> {
        let Some(url) = responder_url(leaf_der)? else {
            return Ok(None);
        };
        if !url.starts_with("http://") || url.parse::<http::Uri>().is_err() {
            return Err(OcspError::UnsupportedUrl(url));
        }
        let leaf = parse_cert(leaf_der)?;
        let issuer = parse_cert(issuer_der)?;
        let sha1 = |d: &[u8]| {
            digest::digest(&digest::SHA1_FOR_LEGACY_USE_ONLY, d)
                .as_ref()
                .to_vec()
        };
        Ok(Some(Self {
            url,
            name_hash: sha1(issuer.subject().as_raw()),
            key_hash: sha1(&issuer.public_key().subject_public_key.data),
            serial_hex: zonemesh_ca::serial_hex(leaf.raw_serial()),
            serial: leaf.raw_serial().to_vec(),
            issuer_der: issuer_der.to_vec(),
        }))
    }

    /// The responder's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The DER `OCSPRequest` for this certificate (one CertID, SHA-1, no nonce).
    pub fn request_der(&self) -> Vec<u8> {
        yasna::construct_der(|w| {
            w.write_sequence(|w| {
                // tbsRequest
                w.next().write_sequence(|w| {
                    // requestList
                    w.next().write_sequence(|w| {
                        // Request
                        w.next().write_sequence(|w| {
                            // reqCert
                            w.next().write_sequence(|w| {
                                w.next().write_sequence(|w| {
                                    w.next().write_oid(&ObjectIdentifier::from_slice(OID_SHA1));
                                    w.next().write_null();
                                });
                                w.next().write_bytes(&self.name_hash);
                                w.next().write_bytes(&self.key_hash);
                                w.next().write_bigint_bytes(&self.serial, true);
                            });
                        });
                    });
                });
            })
        })
    }

    /// Check `der` as the answer for this certificate at `now`.
    ///
    /// # Errors
    /// Anything that makes it unfit to staple: an error status, another certificate, a
    /// bad or missing signature, a response not yet or no longer valid.
    pub fn check_response(&self, der: &[u8], now: SystemTime) -> Result<Staple, OcspError> {
        let basic = parse_outer(der)?;
        let parsed = parse_basic(&basic)?;
        self.check_signer(&parsed, now)?;
        let mut ours = None;
        for single in &parsed.responses {
            if single.hash_alg == OID_SHA1
                && single.name_hash == self.name_hash
                && single.key_hash == self.key_hash
                && zonemesh_ca::serial_hex(&single.serial) == self.serial_hex
            {
                ours = Some(single);
            }
        }
        let single = ours.ok_or(OcspError::WrongCertificate)?;
        if single.this_update > now + SKEW {
            return Err(OcspError::Stale("thisUpdate is in the future".into()));
        }
        let next_update = single
            .next_update
            .unwrap_or(single.this_update + NO_NEXT_UPDATE);
        if next_update <= now {
            return Err(OcspError::Stale("nextUpdate has passed".into()));
        }
        Ok(Staple {
            der: der.to_vec(),
            status: single.status,
            this_update: single.this_update,
            next_update,
        })
    }

    fn check_signer(&self, r: &BasicResponse, now: SystemTime) -> Result<(), OcspError> {
        let issuer = parse_cert(&self.issuer_der)?;
        if verify_signed(issuer.public_key(), &r.sig_alg, &r.tbs, &r.signature).is_ok() {
            return Ok(());
        }
        // A delegated responder: a certificate in the response, issued by our issuer
        // for OCSP signing, valid now.
        let mut why = "not signed by the issuer".to_string();
        for der in &r.certs {
            let Ok(responder) = parse_cert(der) else {
                continue;
            };
            let signed_by_issuer = verify_signed(
                issuer.public_key(),
                &responder.signature_algorithm.algorithm.to_id_string(),
                responder.tbs_certificate.as_ref(),
                &responder.signature_value.data,
            );
            if signed_by_issuer.is_err() {
                why = "the responder certificate is not issued by the issuer".into();
                continue;
            }
            let for_ocsp =
                matches!(responder.extended_key_usage(), Ok(Some(eku)) if eku.value.ocsp_signing);
            if !for_ocsp {
                why = "the responder certificate is not for OCSP signing".into();
                continue;
            }
            let v = responder.validity();
            let t = zonemesh_ca::unix_secs(now) as i64;
            if t < v.not_before.timestamp() || t > v.not_after.timestamp() {
                why = "the responder certificate is not valid now".into();
                continue;
            }
            if verify_signed(responder.public_key(), &r.sig_alg, &r.tbs, &r.signature).is_ok() {
                return Ok(());
            }
        }
        Err(OcspError::Signature(why))
    }
}

/// Verify `sig` over `msg` with `spki` for the X.509 signature algorithm `alg` (dotted).
fn verify_signed(
    spki: &x509_parser::x509::SubjectPublicKeyInfo<'_>,
    alg: &str,
    msg: &[u8],
    sig: &[u8],
) -> Result<(), OcspError> {
    let key_alg = spki.algorithm.algorithm.to_id_string();
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok())
        .map(|o| o.to_id_string())
        .unwrap_or_default();
    let p256 = curve == "1.2.840.10045.3.1.7";
    let algorithm: &'static dyn signature::VerificationAlgorithm = match (key_alg.as_str(), alg) {
        ("1.2.840.113549.1.1.1", "1.2.840.113549.1.1.11") => &signature::RSA_PKCS1_2048_8192_SHA256,
        ("1.2.840.113549.1.1.1", "1.2.840.113549.1.1.12") => &signature::RSA_PKCS1_2048_8192_SHA384,
        ("1.2.840.113549.1.1.1", "1.2.840.113549.1.1.13") => &signature::RSA_PKCS1_2048_8192_SHA512,
        ("1.2.840.113549.1.1.1", "1.2.840.113549.1.1.5") => {
            &signature::RSA_PKCS1_2048_8192_SHA1_FOR_LEGACY_USE_ONLY
        }
        ("1.2.840.10045.2.1", "1.2.840.10045.4.3.2") if p256 => &signature::ECDSA_P256_SHA256_ASN1,
        ("1.2.840.10045.2.1", "1.2.840.10045.4.3.3") if p256 => &signature::ECDSA_P256_SHA384_ASN1,
        ("1.2.840.10045.2.1", "1.2.840.10045.4.3.2") => &signature::ECDSA_P384_SHA256_ASN1,
        ("1.2.840.10045.2.1", "1.2.840.10045.4.3.3") => &signature::ECDSA_P384_SHA384_ASN1,
        _ => {
            return Err(OcspError::Signature(format!(
                "unsupported algorithm {alg} for key {key_alg}"
            )));
        }
    };
    signature::UnparsedPublicKey::new(algorithm, &spki.subject_public_key.data)
        .verify(msg, sig)
        .map_err(|_| OcspError::Signature("bad signature".into()))
}

struct SingleResponse {
    hash_alg: Vec<u64>,
    name_hash: Vec<u8>,
    key_hash: Vec<u8>,
    serial: Vec<u8>,
    status: CertStatus,
    this_update: SystemTime,
    next_update: Option<SystemTime>,
}

struct BasicResponse {
    tbs: Vec<u8>,
    sig_alg: String,
    signature: Vec<u8>,
    certs: Vec<Vec<u8>>,
    responses: Vec<SingleResponse>,
}

fn malformed(e: ASN1Error) -> OcspError {
    OcspError::Malformed(e.to_string())
}

/// The `BasicOCSPResponse` bytes of a successful response.
fn parse_outer(der: &[u8]) -> Result<Vec<u8>, OcspError> {
    let (status, bytes) = yasna::parse_der(der, |r| {
        r.read_sequence(|r| {
            let status = r.next().read_enum()?;
            let bytes = r.read_optional(|r| {
                r.read_tagged(Tag::context(0), |r| {
                    r.read_sequence(|r| {
                        let oid = r.next().read_oid()?;
                        let body = r.next().read_bytes()?;
                        Ok((oid, body))
                    })
                })
            })?;
            Ok((status, bytes))
        })
    })
    .map_err(malformed)?;
    match status {
        0 => {}
        1 => return Err(OcspError::Refused("malformedRequest")),
        2 => return Err(OcspError::Refused("internalError")),
        3 => return Err(OcspError::Refused("tryLater")),
        5 => return Err(OcspError::Refused("sigRequired")),
        6 => return Err(OcspError::Refused("unauthorized")),
        _ => return Err(OcspError::Refused("unknown status")),
    }
    let (oid, body) = bytes.ok_or_else(|| OcspError::Malformed("no responseBytes".into()))?;
    if oid.components().as_slice() != OID_OCSP_BASIC {
        return Err(OcspError::Malformed(format!("response type {oid}")));
    }
    Ok(body)
}

fn system_time(t: &yasna::models::GeneralizedTime) -> SystemTime {
    SystemTime::from(*t.datetime())
}

fn read_single(r: yasna::BERReader<'_, '_>) -> Result<SingleResponse, ASN1Error> {
    r.read_sequence(|r| {
        let (hash_alg, name_hash, key_hash, serial) = r.next().read_sequence(|r| {
            let alg = r.next().read_sequence(|r| {
                let oid = r.next().read_oid()?;
                r.read_optional(|r| r.read_null())?;
                Ok(oid)
            })?;
            let name = r.next().read_bytes()?;
            let key = r.next().read_bytes()?;
            let (serial, _) = r.next().read_bigint_bytes()?;
            Ok((alg.components().clone(), name, key, serial))
        })?;
        let status = {
            let r = r.next();
            let tag = r.lookahead_tag()?;
            if tag == Tag::context(0) {
                r.read_tagged_implicit(Tag::context(0), |r| r.read_null())?;
                CertStatus::Good
            } else if tag == Tag::context(1) {
                let at = r.read_tagged_implicit(Tag::context(1), |r| {
                    r.read_sequence(|r| {
                        let at = r.next().read_generalized_time()?;
                        r.read_optional(|r| r.read_tagged(Tag::context(0), |r| r.read_enum()))?;
                        Ok(at)
                    })
                })?;
                CertStatus::Revoked {
                    at: system_time(&at),
                }
            } else if tag == Tag::context(2) {
                r.read_tagged_implicit(Tag::context(2), |r| r.read_null())?;
                CertStatus::Unknown
            } else {
                return Err(ASN1Error::new(ASN1ErrorKind::Invalid));
            }
        };
        let this_update = system_time(&r.next().read_generalized_time()?);
        let next_update = r
            .read_optional(|r| r.read_tagged(Tag::context(0), |r| r.read_generalized_time()))?
            .map(|t| system_time(&t));
        r.read_optional(|r| r.read_tagged(Tag::context(1), |r| r.read_der()))?;
        Ok(SingleResponse {
            hash_alg,
            name_hash,
            key_hash,
            serial,
            status,
            this_update,
            next_update,
        })
    })
}

fn parse_basic(der: &[u8]) -> Result<BasicResponse, OcspError> {
    let (tbs, sig_alg, signature, certs) = yasna::parse_der(der, |r| {
        r.read_sequence(|r| {
            let tbs = r.next().read_der()?;
            let alg = r.next().read_sequence(|r| {
                let oid = r.next().read_oid()?;
                r.read_optional(|r| r.read_der())?;
                Ok(oid)
            })?;
            let (sig, _) = r.next().read_bitvec_bytes()?;
            let certs = r
                .read_optional(|r| {
                    r.read_tagged(Tag::context(0), |r| r.collect_sequence_of(|r| r.read_der()))
                })?
                .unwrap_or_default();
            Ok((tbs, alg, sig, certs))
        })
    })
    .map_err(malformed)?;
    let responses = yasna::parse_der(&tbs, |r| {
        r.read_sequence(|r| {
            r.read_optional(|r| r.read_tagged(Tag::context(0), |r| r.read_u8()))?;
            // responderID: which key signed is found by trying the candidates.
            r.next().read_der()?;
            r.next().read_generalized_time()?;
            let singles = r.next().collect_sequence_of(read_single)?;
            r.read_optional(|r| r.read_tagged(Tag::context(1), |r| r.read_der()))?;
            Ok(singles)
        })
    })
    .map_err(malformed)?;
    Ok(BasicResponse {
        tbs,
        sig_alg: sig_alg.to_string(),
        signature,
        certs,
        responses,
    })
}

/// Fetches OCSP responses over plain HTTP (RFC 6960 appendix A: POST), with a deadline
/// and a size cap. Cheap to clone; connections are pooled.
#[derive(Clone)]
pub struct OcspClient {
    client: Client<HttpConnector, Full<Bytes>>,
    timeout: Duration,
}

impl std::fmt::Debug for OcspClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OcspClient")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl OcspClient {
    /// A client whose every fetch (connect, request, whole response) ends within `timeout`.
    pub fn new(timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(2)
            .build(connector);
        Self { client, timeout }
    }

    /// POST `target`'s request to its responder and return the raw response (unchecked:
    /// pass it to [`OcspTarget::check_response`]).
    ///
    /// # Errors
    /// Connection failures, timeouts, a non-200 answer, a body over [`MAX_RESPONSE`].
    pub async fn fetch(&self, target: &OcspTarget) -> Result<Vec<u8>, OcspError> {
        let fail = |reason: String| OcspError::Fetch {
            url: target.url.clone(),
            reason,
        };
        let req = http::Request::post(target.url.as_str())
            .header(http::header::CONTENT_TYPE, "application/ocsp-request")
            .header(http::header::ACCEPT, "application/ocsp-response")
            .body(Full::new(Bytes::from(target.request_der())))
            .map_err(|e| fail(e.to_string()))?;
        let work = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| fail(error_chain(&e)))?;
            if resp.status() != http::StatusCode::OK {
                return Err(fail(format!("HTTP {}", resp.status())));
            }
            let body = Limited::new(resp.into_body(), MAX_RESPONSE)
                .collect()
                .await
                .map_err(|e| fail(format!("reading the response: {e}")))?;
            Ok(body.to_bytes().to_vec())
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| fail(format!("no answer within {:?}", self.timeout)))?
    }
}

/// An error with its causes, for a one-line reason.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn staple(this: u64, next: u64) -> Staple {
        let t = |s| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        Staple {
            der: vec![],
            status: CertStatus::Good,
            this_update: t(this),
            next_update: t(next),
        }
    }

    #[test]
    fn refresh_is_at_half_the_validity_within_bounds() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(10_000);
        // One hour of validity, produced just now: refresh in 30 minutes.
        assert_eq!(
            staple(10_000, 13_600).refresh_in(now),
            Duration::from_secs(1800)
        );
        // Seven days: at most 12 hours.
        assert_eq!(
            staple(10_000, 10_000 + 7 * 86_400).refresh_in(now),
            MAX_REFRESH
        );
        // Past its midpoint already: soon, but not in a loop.
        assert_eq!(staple(1_000, 10_100).refresh_in(now), MIN_REFRESH);
    }

    #[test]
    fn garbage_and_error_statuses_are_refused() {
        let unauthorized = zonemesh_ca::ocsp_unauthorized();
        assert!(matches!(
            parse_outer(&unauthorized),
            Err(OcspError::Refused("unauthorized"))
        ));
        assert!(matches!(
            parse_outer(b"not der"),
            Err(OcspError::Malformed(_))
        ));
    }
}
