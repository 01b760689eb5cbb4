//! OCSP (RFC 6960) responses, signed directly by the issuing intermediate.

use crate::crl::RevocationReason;
use crate::profiles::{Ca, serial_hex};
use crate::to_offset;
use aws_lc_rs::digest;
use rcgen::SigningKey;
use std::time::{Duration, SystemTime};
use x509_parser::prelude::X509Certificate;
use yasna::models::{GeneralizedTime, ObjectIdentifier};
use yasna::{ASN1Error, ASN1ErrorKind, Tag};

const OID_SHA1: &[u64] = &[1, 3, 14, 3, 2, 26];
const OID_SHA256: &[u64] = &[2, 16, 840, 1, 101, 3, 4, 2, 1];
const OID_SHA256_RSA: &[u64] = &[1, 2, 840, 113549, 1, 1, 11];
const OID_OCSP_BASIC: &[u64] = &[1, 3, 6, 1, 5, 5, 7, 48, 1, 1];
const OID_OCSP_NONCE: &[u64] = &[1, 3, 6, 1, 5, 5, 7, 48, 1, 2];
const MAX_REQUESTS: usize = 16;
/// How long a response may be cached by relying parties.
const RESPONSE_VALIDITY: Duration = Duration::from_secs(3600);

/// The status of one certificate as the store knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CertStatus {
    Good,
    Revoked {
        at: SystemTime,
        reason: RevocationReason,
    },
    Unknown,
}

/// The result of answering an OCSP request: the DER response and, for logging, the
/// serials asked about with the status returned.
#[derive(Clone, Debug)]
pub struct OcspOutcome {
    pub response_der: Vec<u8>,
    pub answered: Vec<(String, CertStatus)>,
}

#[derive(Clone, Debug)]
pub(crate) struct IssuerHashes {
    sha1_name: Vec<u8>,
    sha1_key: Vec<u8>,
    sha256_name: Vec<u8>,
    sha256_key: Vec<u8>,
}

impl IssuerHashes {
    pub(crate) fn of(cert: &X509Certificate<'_>) -> Self {
        let name = cert.subject().as_raw();
        let key = &cert.public_key().subject_public_key.data;
        let h = |alg, data: &[u8]| digest::digest(alg, data).as_ref().to_vec();
        Self {
            sha1_name: h(&digest::SHA1_FOR_LEGACY_USE_ONLY, name),
            sha1_key: h(&digest::SHA1_FOR_LEGACY_USE_ONLY, key),
            sha256_name: h(&digest::SHA256, name),
            sha256_key: h(&digest::SHA256, key),
        }
    }

    fn matches(&self, alg: &[u64], name: &[u8], key: &[u8]) -> bool {
        if alg == OID_SHA1 {
            self.sha1_name == name && self.sha1_key == key
        } else if alg == OID_SHA256 {
            self.sha256_name == name && self.sha256_key == key
        } else {
            false
        }
    }
}

struct CertId {
    hash_alg: Vec<u64>,
    name_hash: Vec<u8>,
    key_hash: Vec<u8>,
    serial: Vec<u8>,
    /// The CertID exactly as the client sent it, echoed back in the response.
    raw: Vec<u8>,
}

struct Request {
    ids: Vec<CertId>,
    nonce_ext: Option<Vec<u8>>,
}

fn asn1_err() -> ASN1Error {
    ASN1Error::new(ASN1ErrorKind::Invalid)
}

fn read_cert_id(raw: Vec<u8>) -> Result<CertId, ASN1Error> {
    let (hash_alg, name_hash, key_hash, serial) = yasna::parse_der(&raw, |r| {
        r.read_sequence(|r| {
            let alg = r.next().read_sequence(|r| {
                let oid = r.next().read_oid()?;
                r.read_optional(|r| r.read_null())?;
                Ok(oid)
            })?;
            let name = r.next().read_bytes()?;
            let key = r.next().read_bytes()?;
            let (serial, non_negative) = r.next().read_bigint_bytes()?;
            if !non_negative {
                return Err(asn1_err());
            }
            Ok((alg.components().clone(), name, key, serial))
        })
    })?;
    Ok(CertId {
        hash_alg,
        name_hash,
        key_hash,
        serial,
        raw,
    })
}

fn parse_request(der: &[u8]) -> Result<Request, ASN1Error> {
    let (raw_ids, nonce_ext) = yasna::parse_der(der, |r| {
        r.read_sequence(|r| {
            let tbs = r.next().read_sequence(|r| {
                r.read_optional(|r| r.read_tagged(Tag::context(0), |r| r.read_u8()))?;
                r.read_optional(|r| r.read_tagged(Tag::context(1), |r| r.read_der()))?;
                let ids = r.next().read_sequence_of_with_limit(MAX_REQUESTS)?;
                let mut nonce = None;
                r.read_optional(|r| {
                    r.read_tagged(Tag::context(2), |r| {
                        r.read_sequence_of(|r| {
                            let raw = r.read_der()?;
                            let oid = yasna::parse_der(&raw, |r| {
                                r.read_sequence(|r| {
                                    let oid = r.next().read_oid()?;
                                    r.read_optional(|r| r.read_bool())?;
                                    r.next().read_bytes()?;
                                    Ok(oid)
                                })
                            })?;
                            if oid.components().as_slice() == OID_OCSP_NONCE {
                                nonce = Some(raw);
                            }
                            Ok(())
                        })
                    })
                })?;
                Ok((ids, nonce))
            })?;
            r.read_optional(|r| r.read_tagged(Tag::context(0), |r| r.read_der()))?;
            Ok(tbs)
        })
    })?;
    let ids = raw_ids
        .into_iter()
        .map(read_cert_id)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Request { ids, nonce_ext })
}

/// Read `SEQUENCE OF Request` where each Request is `SEQUENCE { reqCert CertID, [0] exts OPTIONAL }`,
/// keeping each CertID's raw DER and refusing more than `limit` entries.
trait ReadRequests {
    fn read_sequence_of_with_limit(self, limit: usize) -> Result<Vec<Vec<u8>>, ASN1Error>;
}

impl ReadRequests for yasna::BERReader<'_, '_> {
    fn read_sequence_of_with_limit(self, limit: usize) -> Result<Vec<Vec<u8>>, ASN1Error> {
        let mut out = Vec::new();
        self.read_sequence_of(|r| {
            if out.len() >= limit {
                return Err(asn1_err());
            }
            let raw = r.read_sequence(|r| {
                let cert_id = r.next().read_der()?;
                r.read_optional(|r| r.read_tagged(Tag::context(0), |r| r.read_der()))?;
                Ok(cert_id)
            })?;
            out.push(raw);
            Ok(())
        })?;
        if out.is_empty() {
            return Err(asn1_err());
        }
        Ok(out)
    }
}

fn gtime(t: SystemTime) -> GeneralizedTime {
    GeneralizedTime::from_datetime(to_offset(t))
}

/// An unsigned error response (malformedRequest = 1, internalError = 2, unauthorized = 6).
fn error_response(status: i64) -> Vec<u8> {
    yasna::construct_der(|w| w.write_sequence(|w| w.next().write_enum(status)))
}

/// The unsigned `unauthorized` response: this responder does not answer for that
/// certificate (RFC 6960 §2.3, RFC 5019 §2.2.3). Costs no signature.
pub fn ocsp_unauthorized() -> Vec<u8> {
    error_response(6)
}

/// The unsigned `internalError` response.
pub fn ocsp_internal_error() -> Vec<u8> {
    error_response(2)
}

/// The unsigned `malformedRequest` response.
pub fn ocsp_malformed() -> Vec<u8> {
    error_response(1)
}

/// How long a signed response is valid (its `nextUpdate` minus `thisUpdate`).
pub const OCSP_RESPONSE_VALIDITY: Duration = RESPONSE_VALIDITY;

/// One certificate asked about in an OCSP request that follows the RFC 5019 profile (one
/// certificate per request). The response to it depends only on [`OcspQuery::cert_id`],
/// the status and the time, so it can be signed once and served many times.
#[derive(Clone, Debug)]
pub struct OcspQuery {
    cert_id: Vec<u8>,
    /// The serial asked about, lowercase hex as in [`serial_hex`].
    pub serial_hex: String,
    /// Whether the request names this CA's intermediate as issuer (name and key hash).
    pub our_issuer: bool,
    /// Whether the request carried a nonce (a pre-signed response cannot echo it).
    pub has_nonce: bool,
}

impl OcspQuery {
    /// The CertID exactly as asked (DER), echoed in the response: a cache key.
    pub fn cert_id(&self) -> &[u8] {
        &self.cert_id
    }
}

fn write_single(w: yasna::DERWriter<'_>, raw_id: &[u8], status: &CertStatus, now: SystemTime) {
    w.write_sequence(|w| {
        w.next().write_der(raw_id);
        match status {
            CertStatus::Good => w
                .next()
                .write_tagged_implicit(Tag::context(0), |w| w.write_null()),
            CertStatus::Unknown => w
                .next()
                .write_tagged_implicit(Tag::context(2), |w| w.write_null()),
            CertStatus::Revoked { at, reason } => {
                w.next().write_tagged_implicit(Tag::context(1), |w| {
                    w.write_sequence(|w| {
                        w.next().write_generalized_time(&gtime(*at));
                        w.next().write_tagged(Tag::context(0), |w| {
                            w.write_enum(i64::from(reason.code()))
                        });
                    })
                })
            }
        }
        w.next().write_generalized_time(&gtime(now));
        w.next().write_tagged(Tag::context(0), |w| {
            w.write_generalized_time(&gtime(now + RESPONSE_VALIDITY))
        });
    });
}

impl Ca {
    /// Read a one-certificate OCSP request. Anything else (garbage, several certificates)
    /// is refused with the unsigned response to send back.
    pub fn ocsp_query(&self, request_der: &[u8]) -> std::result::Result<OcspQuery, Vec<u8>> {
        let Ok(mut req) = parse_request(request_der) else {
            return Err(ocsp_malformed());
        };
        if req.ids.len() != 1 {
            return Err(ocsp_malformed());
        }
        let Some(id) = req.ids.pop() else {
            return Err(ocsp_malformed());
        };
        Ok(OcspQuery {
            our_issuer: self
                .ocsp_ids
                .matches(&id.hash_alg, &id.name_hash, &id.key_hash),
            serial_hex: serial_hex(&id.serial),
            has_nonce: req.nonce_ext.is_some(),
            cert_id: id.raw,
        })
    }

    /// Sign the response for `query` with `status`, valid from `now` for
    /// [`OCSP_RESPONSE_VALIDITY`], without a nonce (RFC 5019 §2.2.1: a pre-produced
    /// response).
    pub fn ocsp_sign(
        &self,
        query: &OcspQuery,
        status: CertStatus,
        now: SystemTime,
    ) -> crate::Result<Vec<u8>> {
        let tbs = self.response_tbs(
            now,
            |w| write_single(w.next(), &query.cert_id, &status, now),
            None,
        );
        self.signed_response(&tbs).map_err(crate::Error::OcspSign)
    }

    fn response_tbs(
        &self,
        now: SystemTime,
        singles: impl FnOnce(&mut yasna::DERWriterSeq<'_>),
        nonce: Option<&[u8]>,
    ) -> Vec<u8> {
        yasna::construct_der(|w| {
            w.write_sequence(|w| {
                // responderID byKey [2]: SHA-1 of the responder's public key.
                w.next()
                    .write_tagged(Tag::context(2), |w| w.write_bytes(&self.ocsp_ids.sha1_key));
                w.next().write_generalized_time(&gtime(now));
                w.next().write_sequence(singles);
                if let Some(nonce) = nonce {
                    w.next().write_tagged(Tag::context(1), |w| {
                        w.write_sequence(|w| w.next().write_der(nonce))
                    });
                }
            })
        })
    }

    fn signed_response(&self, tbs: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        let signature = self.issuer().key().sign(tbs)?;
        let basic = yasna::construct_der(|w| {
            w.write_sequence(|w| {
                w.next().write_der(tbs);
                w.next().write_sequence(|w| {
                    w.next()
                        .write_oid(&ObjectIdentifier::from_slice(OID_SHA256_RSA));
                    w.next().write_null();
                });
                w.next().write_bitvec_bytes(&signature, signature.len() * 8);
                w.next().write_tagged(Tag::context(0), |w| {
                    w.write_sequence(|w| w.next().write_der(self.intermediate_der()))
                });
            })
        });
        Ok(yasna::construct_der(|w| {
            w.write_sequence(|w| {
                w.next().write_enum(0);
                w.next().write_tagged(Tag::context(0), |w| {
                    w.write_sequence(|w| {
                        w.next()
                            .write_oid(&ObjectIdentifier::from_slice(OID_OCSP_BASIC));
                        w.next().write_bytes(&basic);
                    })
                });
            })
        }))
    }

    /// Answer an OCSP request, signing a fresh response that echoes its nonce. `lookup`
    /// gives the status of a serial (lowercase hex, as in [`serial_hex`]) that this CA
    /// issued. Malformed requests get an unsigned `malformedRequest` response, requests
    /// naming only other issuers an unsigned `unauthorized`; never a panic.
    pub fn ocsp_respond(
        &self,
        request_der: &[u8],
        lookup: impl Fn(&str) -> CertStatus,
        now: SystemTime,
    ) -> OcspOutcome {
        let Ok(req) = parse_request(request_der) else {
            return OcspOutcome {
                response_der: error_response(1),
                answered: vec![],
            };
        };
        let mut answered = Vec::with_capacity(req.ids.len());
        let mut any_ours = false;
        for id in &req.ids {
            let serial = serial_hex(&id.serial);
            let status = if self
                .ocsp_ids
                .matches(&id.hash_alg, &id.name_hash, &id.key_hash)
            {
                any_ours = true;
                lookup(&serial)
            } else {
                CertStatus::Unknown
            };
            answered.push((serial, status));
        }
        if !any_ours {
            return OcspOutcome {
                response_der: ocsp_unauthorized(),
                answered,
            };
        }
        let tbs = self.response_tbs(
            now,
            |w| {
                for (id, (_, status)) in req.ids.iter().zip(&answered) {
                    write_single(w.next(), &id.raw, status, now);
                }
            },
            req.nonce_ext.as_deref(),
        );
        let response_der = self
            .signed_response(&tbs)
            // An unsigned internalError (2) is the answer a responder that cannot sign gives.
            .unwrap_or_else(|_| error_response(2));
        OcspOutcome {
            response_der,
            answered,
        }
    }
}
