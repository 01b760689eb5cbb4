//! The admin protocol: one JSON line with an [`AdminRequest`] from the CLI, one JSON line
//! with an [`AdminResponse`] back. Both ends use these types; nothing reads a reply by
//! string keys, and nothing here decides how a reply is shown (that is `crate::cli`).

use crate::audit::AuditRecord;
use crate::auth::{ClearTarget, Role, ThrottleList, UserSummary};
pub use crate::core::rotation::CaCertView;
pub use crate::domains::{DomainDetail, DomainView, JobView};
pub use crate::ssh::{GrantView, IssuedUserCert, RevokedHostView, SshCaView, SshCertView};
use serde::{Deserialize, Serialize};

/// One admin command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum AdminRequest {
    CaShow,
    CaExport {
        intermediate: bool,
        /// Any CA certificate by its `ca show` id (`root-2`, `int-3`, `cross-2`).
        #[serde(default)]
        id: Option<String>,
    },
    CaSignCsr {
        csr_der: Vec<u8>,
        zone: String,
        node: String,
        wg_key: String,
    },
    CaIssueTls {
        dns: Vec<String>,
        ips: Vec<String>,
        lifetime_secs: Option<u64>,
    },
    CaRevoke {
        serial: String,
        reason: String,
    },
    CaCrl,
    /// `ca rotate-intermediate`; without a spread the default one.
    CaRotateIntermediate {
        spread_secs: Option<u64>,
    },
    /// `ca rotate-root`; without a grace or spread the defaults.
    CaRotateRoot {
        grace_secs: Option<u64>,
        spread_secs: Option<u64>,
    },
    ZoneAdd {
        name: String,
        cidr: String,
        intra_zone_tunnels: bool,
    },
    ZoneList,
    TokenCreate {
        zone: String,
        ttl_secs: u64,
        uses: u32,
    },
    NodeList,
    /// `node` is `zone/node`, or a node name that is unique across zones.
    NodeRevoke {
        node: String,
        reason: String,
    },
    UserAdd {
        email: String,
        role: String,
        password: Redacted,
    },
    UserList,
    UserDisable {
        email: String,
    },
    UserPasswd {
        email: String,
        password: Redacted,
    },
    /// Forget the user's TOTP: a new one is set up at the next sign-in.
    UserResetTotp {
        email: String,
    },
    ThrottleList,
    ThrottleClear {
        email: Option<String>,
        source: Option<String>,
    },
    Health,
    BlockAdd {
        address: String,
        secs: u64,
        reason: String,
    },
    BlockList,
    BlockRemove {
        address: String,
    },
    /// `block allow CIDR`: never blocked.
    BlockAllowAdd {
        cidr: String,
        note: String,
    },
    BlockAllowList,
    BlockAllowRemove {
        cidr: String,
    },
    Audit {
        limit: Option<usize>,
    },
    DomainAdd {
        name: String,
        issuer: String,
        owner: String,
        edge_zones: Vec<String>,
    },
    DomainList,
    /// Start the domain's deploy job, or join the running one.
    DomainDeploy {
        name: String,
    },
    /// The domain and its latest job (what `domain deploy` polls).
    DomainStatus {
        name: String,
    },
    DomainRemove {
        name: String,
    },
    /// Write a backup of the store to `<data-dir>/backups/<file_name>` (the CLI moves it to
    /// `--out`): the controller may only write inside its data directory.
    Backup {
        file_name: String,
    },
    /// Create the SSH CA on an installation without one.
    SshInit {
        key_type: String,
    },
    SshCa,
    SshKnownHosts,
    SshGrant {
        email: String,
        zone: String,
        principal: String,
        max_ttl_secs: Option<u64>,
        extensions: Vec<String>,
    },
    SshRevokeGrant {
        email: String,
        zone: String,
        principal: String,
    },
    SshGrants,
    SshSignUser {
        email: String,
        public_key: String,
        ttl_secs: Option<u64>,
    },
    /// Revoke one certificate (`serial`) or every certificate of `email`.
    SshRevoke {
        serial: Option<u64>,
        email: Option<String>,
    },
    SshCerts {
        email: Option<String>,
    },
    SshKrl,
    /// Revoked host certificates (of revoked nodes) and their `@revoked` lines.
    SshRevokedHosts,
}

/// A secret carried over the 0600 socket (a password, an otpauth URI): serialised as is,
/// never shown by `Debug`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Redacted(pub String);

impl std::fmt::Debug for Redacted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl AdminRequest {
    /// Commands that change or read live mesh state need the running controller.
    pub fn needs_server(&self) -> bool {
        matches!(
            self,
            Self::ZoneAdd { .. }
                | Self::ZoneList
                | Self::TokenCreate { .. }
                | Self::NodeList
                | Self::NodeRevoke { .. }
                | Self::ThrottleList
                | Self::ThrottleClear { .. }
                | Self::BlockAdd { .. }
                | Self::BlockList
                | Self::BlockRemove { .. }
                | Self::BlockAllowAdd { .. }
                | Self::BlockAllowList
                | Self::BlockAllowRemove { .. }
                | Self::Health
                | Self::DomainAdd { .. }
                | Self::DomainList
                | Self::DomainDeploy { .. }
                | Self::DomainStatus { .. }
                | Self::DomainRemove { .. }
        )
    }
}

/// The typed result of one command. Field order and names are what `--json` prints.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reply", content = "data", rename_all = "kebab-case")]
pub enum AdminReply {
    CaShow(CaShow),
    /// `ca export`, `ca crl`.
    Pem(Pem),
    CaSigned(CaSigned),
    CaTlsIssued(CaTlsIssued),
    CaRevoked(CaRevoked),
    CaRotated(CaRotated),
    ZoneAdded(ZoneAdded),
    ZoneList(Vec<ZoneRow>),
    TokenCreated(TokenCreated),
    NodeList(Vec<NodeRow>),
    NodeRevoked(NodeRevoked),
    UserAdded(UserAdded),
    UserList(Vec<UserSummary>),
    /// `user disable`, `user passwd`.
    UserSessionsEnded(UserSessionsEnded),
    ThrottleList(ThrottleList),
    ThrottleCleared(ThrottleCleared),
    Health(HealthMatrix),
    BlockAdded(BlockRow),
    BlockList(Vec<BlockRow>),
    BlockRemoved(BlockRemoved),
    BlockAllowAdded(AllowAdded),
    BlockAllowList(Vec<AllowRow>),
    BlockAllowRemoved(AllowRow),
    Audit(Vec<AuditRecord>),
    DomainAdded(DomainView),
    DomainList(Vec<DomainView>),
    /// `domain deploy`, and each poll of its job.
    Domain(DomainDetail),
    DomainRemoved(DomainRemoved),
    BackupWritten(BackupWritten),
    SshCa(SshCaView),
    SshKnownHosts(SshLine),
    SshGrantAdded(GrantView),
    SshGrantRevoked(GrantView),
    SshGrants(Vec<GrantView>),
    SshUserCert(IssuedUserCert),
    SshRevoked(SshRevoked),
    SshCerts(Vec<SshCertView>),
    SshKrl(SshKrl),
    SshRevokedHosts(Vec<RevokedHostView>),
}

/// `backup`: what the file holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupWritten {
    /// Where the controller wrote it (inside the data directory).
    pub path: String,
    pub format: u32,
    pub ca_fingerprint: String,
    pub trees: Vec<crate::core::backup::TreeCount>,
    pub entries: u64,
    pub bytes: u64,
    pub body_sha256: String,
    pub millis: u64,
}

/// `ssh known-hosts`: one line for `known_hosts`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SshLine {
    pub line: String,
    /// `@revoked` lines for the host keys of revoked nodes.
    #[serde(default)]
    pub revoked: Vec<String>,
}

/// `ssh revoke`: the serials put on the KRL.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SshRevoked {
    pub serials: Vec<u64>,
}

/// `ssh krl`: the current KRL (binary).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SshKrl {
    pub krl: Vec<u8>,
}

/// `domain remove`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainRemoved {
    pub name: String,
}

impl AdminReply {
    /// The variant's wire name, for "unexpected reply" errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::CaShow(_) => "ca-show",
            Self::Pem(_) => "pem",
            Self::CaSigned(_) => "ca-signed",
            Self::CaTlsIssued(_) => "ca-tls-issued",
            Self::CaRevoked(_) => "ca-revoked",
            Self::CaRotated(_) => "ca-rotated",
            Self::ZoneAdded(_) => "zone-added",
            Self::ZoneList(_) => "zone-list",
            Self::TokenCreated(_) => "token-created",
            Self::NodeList(_) => "node-list",
            Self::NodeRevoked(_) => "node-revoked",
            Self::UserAdded(_) => "user-added",
            Self::UserList(_) => "user-list",
            Self::UserSessionsEnded(_) => "user-sessions-ended",
            Self::ThrottleList(_) => "throttle-list",
            Self::ThrottleCleared(_) => "throttle-cleared",
            Self::Health(_) => "health",
            Self::BlockAdded(_) => "block-added",
            Self::BlockList(_) => "block-list",
            Self::BlockRemoved(_) => "block-removed",
            Self::BlockAllowAdded(_) => "block-allow-added",
            Self::BlockAllowList(_) => "block-allow-list",
            Self::BlockAllowRemoved(_) => "block-allow-removed",
            Self::Audit(_) => "audit",
            Self::DomainAdded(_) => "domain-added",
            Self::DomainList(_) => "domain-list",
            Self::Domain(_) => "domain",
            Self::DomainRemoved(_) => "domain-removed",
            Self::BackupWritten(_) => "backup-written",
            Self::SshCa(_) => "ssh-ca",
            Self::SshKnownHosts(_) => "ssh-known-hosts",
            Self::SshGrantAdded(_) => "ssh-grant-added",
            Self::SshGrantRevoked(_) => "ssh-grant-revoked",
            Self::SshGrants(_) => "ssh-grants",
            Self::SshUserCert(_) => "ssh-user-cert",
            Self::SshRevoked(_) => "ssh-revoked",
            Self::SshCerts(_) => "ssh-certs",
            Self::SshKrl(_) => "ssh-krl",
            Self::SshRevokedHosts(_) => "ssh-revoked-hosts",
        }
    }
}

/// `ca show`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaShow {
    pub certificates: Vec<CaCertView>,
    pub trust_domain: String,
}

/// `ca rotate-intermediate`, `ca rotate-root`: what was added and what is now retiring.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaRotated {
    pub added: Vec<CaCertView>,
    pub retiring: Vec<CaCertView>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pem {
    pub pem: String,
}

/// `ca sign-csr`: the certificate followed by the intermediate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaSigned {
    pub serial: String,
    pub pem: String,
}

/// `ca issue-tls`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaTlsIssued {
    pub serial: String,
    pub chain_pem: String,
    pub key_pem: Redacted,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaRevoked {
    pub revoked: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ZoneAdded {
    pub name: String,
    pub cidr: String,
    pub intra_zone_tunnels: bool,
}

/// One row of `zone list`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ZoneRow {
    pub cidr: String,
    pub intra_zone_tunnels: bool,
    pub name: String,
    /// Active (not revoked) nodes.
    pub nodes: usize,
}

/// `token create`: the token is shown once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenCreated {
    pub token: Redacted,
    pub zone: String,
    pub expires_unix: u64,
    pub uses: u32,
}

/// One row of `node list`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRow {
    pub endpoints: Vec<String>,
    pub node: String,
    pub not_after_unix: u64,
    pub overlay_ip: String,
    pub revoked: bool,
    pub serial: String,
    pub wg_public_key: String,
    pub zone: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRevoked {
    /// `zone/node`.
    pub node: String,
    pub serial: String,
}

/// `user add`: for admins the otpauth URI (it holds the TOTP secret) and its QR code.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserAdded {
    pub email: String,
    pub role: Role,
    pub otpauth_uri: Option<Redacted>,
    pub qr_terminal: Option<Redacted>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserSessionsEnded {
    pub email: String,
    pub sessions_ended: usize,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThrottleCleared {
    pub target: ClearTarget,
    pub cleared: usize,
}

/// `health`: the matrix of enrolled pairs, zone summaries and the worst pairs, the same
/// view the dashboard's heat map shows.
pub use crate::mesh::{HealthMatrix, PairHealth, ZoneHealth};

/// A blocked source address (`block add`, `block list`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockRow {
    pub address: String,
    /// The evidence (nodes, events, kinds) or the administrator's reason.
    pub reason: String,
    pub until_unix: u64,
    /// When it started (0 when unknown).
    #[serde(default)]
    pub since_unix: u64,
    /// Which offence of the address (1 = first; 0 = placed by hand).
    #[serde(default)]
    pub offence: u32,
}

/// An operator allow-list range (`block allow`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllowRow {
    pub cidr: String,
    pub added_unix: u64,
    pub note: String,
}

/// `block allow CIDR`: the range, and the blocks it lifted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllowAdded {
    pub allow: AllowRow,
    pub lifted: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockRemoved {
    pub address: String,
}

/// The reply line: the typed result, or a one-line error.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdminResponse {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<AdminReply>,
    #[serde(default)]
    pub error: String,
}

impl AdminResponse {
    pub fn ok(reply: AdminReply) -> Self {
        Self {
            ok: true,
            result: Some(reply),
            error: String::new(),
        }
    }

    pub fn err(error: impl Into<String>) -> Self {
        Self {
            ok: false,
            result: None,
            error: error.into(),
        }
    }

    /// The reply, or the controller's error message.
    pub fn into_result(self) -> Result<AdminReply, String> {
        match (self.ok, self.result) {
            (true, Some(r)) => Ok(r),
            (true, None) => Err("the controller sent an empty reply".into()),
            (false, _) => Err(self.error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::AuditEvent;
    use crate::auth::ThrottleRow;
    use std::collections::BTreeSet;

    fn s(v: &str) -> String {
        v.to_string()
    }

    /// One request of every kind.
    fn requests() -> Vec<AdminRequest> {
        use AdminRequest as R;
        vec![
            R::CaShow,
            R::CaExport {
                intermediate: true,
                id: Some(s("cross-2")),
            },
            R::CaSignCsr {
                csr_der: vec![0x30, 0x82, 0, 1],
                zone: s("eu"),
                node: s("n1"),
                wg_key: s("AAAA"),
            },
            R::CaIssueTls {
                dns: vec![s("a.example")],
                ips: vec![s("127.0.0.1")],
                lifetime_secs: Some(3600),
            },
            R::CaRevoke {
                serial: s("0a:bc"),
                reason: s("key-compromise"),
            },
            R::CaCrl,
            R::CaRotateIntermediate {
                spread_secs: Some(60),
            },
            R::CaRotateRoot {
                grace_secs: Some(3600),
                spread_secs: None,
            },
            R::ZoneAdd {
                name: s("eu"),
                cidr: s("100.64.1.0/24"),
                intra_zone_tunnels: true,
            },
            R::ZoneList,
            R::TokenCreate {
                zone: s("eu"),
                ttl_secs: 60,
                uses: 2,
            },
            R::NodeList,
            R::NodeRevoke {
                node: s("n1"),
                reason: s("unspecified"),
            },
            R::UserAdd {
                email: s("ops@example.com"),
                role: s("admin"),
                password: Redacted(s("correct horse")),
            },
            R::UserList,
            R::UserDisable {
                email: s("ops@example.com"),
            },
            R::UserPasswd {
                email: s("ops@example.com"),
                password: Redacted(s("battery staple")),
            },
            R::UserResetTotp {
                email: s("ops@example.com"),
            },
            R::ThrottleList,
            R::ThrottleClear {
                email: None,
                source: Some(s("127.0.0.2")),
            },
            R::Health,
            R::BlockAdd {
                address: s("192.0.2.1"),
                secs: 600,
                reason: s("scan"),
            },
            R::BlockList,
            R::BlockRemove {
                address: s("192.0.2.1"),
            },
            R::BlockAllowAdd {
                cidr: s("192.0.2.0/24"),
                note: s("office"),
            },
            R::BlockAllowList,
            R::BlockAllowRemove {
                cidr: s("192.0.2.0/24"),
            },
            R::Audit { limit: Some(5) },
            R::DomainAdd {
                name: s("portal.example.com"),
                issuer: s("acme"),
                owner: s("owner@example.com"),
                edge_zones: vec![s("eu"), s("us")],
            },
            R::DomainList,
            R::DomainDeploy {
                name: s("portal.example.com"),
            },
            R::DomainStatus {
                name: s("portal.example.com"),
            },
            R::DomainRemove {
                name: s("portal.example.com"),
            },
            R::Backup {
                file_name: s("backup-1700000000.zmbackup"),
            },
            R::SshInit {
                key_type: s("ed25519"),
            },
            R::SshCa,
            R::SshKnownHosts,
            R::SshGrant {
                email: s("ops@example.com"),
                zone: s("eu"),
                principal: s("deploy"),
                max_ttl_secs: Some(3600),
                extensions: vec![s("agent-forwarding")],
            },
            R::SshRevokeGrant {
                email: s("ops@example.com"),
                zone: s("eu"),
                principal: s("deploy"),
            },
            R::SshGrants,
            R::SshSignUser {
                email: s("ops@example.com"),
                public_key: s("ssh-ed25519 AAAA"),
                ttl_secs: None,
            },
            R::SshRevoke {
                serial: Some(7),
                email: None,
            },
            R::SshCerts {
                email: Some(s("ops@example.com")),
            },
            R::SshKrl,
            R::SshRevokedHosts,
        ]
    }

    /// One reply of every kind.
    fn replies() -> Vec<AdminReply> {
        use AdminReply as R;
        let block = BlockRow {
            address: s("192.0.2.1"),
            reason: s("scan"),
            until_unix: 1_700_000_600,
            since_unix: 1_700_000_000,
            offence: 2,
        };
        let ca_cert = CaCertView {
            id: s("root-1"),
            kind: s("root"),
            state: s("retiring"),
            subject: s("CN=zonemesh root"),
            issuer: s("CN=zonemesh root"),
            sha256: s("abcd"),
            not_before: s("2026-01-01T00:00:00Z"),
            not_after: s("2036-01-01T00:00:00Z"),
            key_bits: 4096,
            retire_at: s("2026-02-01T00:00:00Z"),
        };
        let allow = AllowRow {
            cidr: s("192.0.2.0/24"),
            added_unix: 1_700_000_000,
            note: s("office"),
        };
        vec![
            R::CaShow(CaShow {
                certificates: vec![ca_cert.clone()],
                trust_domain: s("example.org"),
            }),
            R::CaRotated(CaRotated {
                added: vec![ca_cert.clone()],
                retiring: vec![ca_cert],
            }),
            R::Pem(Pem {
                pem: s("-----BEGIN X509 CRL-----\n"),
            }),
            R::CaSigned(CaSigned {
                serial: s("0abc"),
                pem: s("-----BEGIN CERTIFICATE-----\n"),
            }),
            R::CaTlsIssued(CaTlsIssued {
                serial: s("0abd"),
                chain_pem: s("chain"),
                key_pem: Redacted(s("key")),
            }),
            R::CaRevoked(CaRevoked { revoked: s("0abc") }),
            R::ZoneAdded(ZoneAdded {
                name: s("eu"),
                cidr: s("100.64.1.0/24"),
                intra_zone_tunnels: false,
            }),
            R::ZoneList(vec![ZoneRow {
                cidr: s("100.64.1.0/24"),
                intra_zone_tunnels: true,
                name: s("eu"),
                nodes: 3,
            }]),
            R::TokenCreated(TokenCreated {
                token: Redacted(s("zmt_secret")),
                zone: s("eu"),
                expires_unix: 1_700_000_000,
                uses: 1,
            }),
            R::NodeList(vec![NodeRow {
                endpoints: vec![s("192.0.2.7:51820")],
                node: s("n1"),
                not_after_unix: 1_700_086_400,
                overlay_ip: s("100.64.1.2"),
                revoked: false,
                serial: s("0abc"),
                wg_public_key: s("AAAA"),
                zone: s("eu"),
            }]),
            R::NodeRevoked(NodeRevoked {
                node: s("eu/n1"),
                serial: s("0abc"),
            }),
            R::UserAdded(UserAdded {
                email: s("ops@example.com"),
                role: Role::Admin,
                otpauth_uri: Some(Redacted(s("otpauth://totp/x"))),
                qr_terminal: Some(Redacted(s("██"))),
            }),
            R::UserList(vec![UserSummary {
                email: s("ops@example.com"),
                role: Role::PortalOwner,
                disabled: true,
                totp_confirmed: false,
                recovery_codes_left: 0,
                created_unix_ms: 1_700_000_000_123,
            }]),
            R::UserSessionsEnded(UserSessionsEnded {
                email: s("ops@example.com"),
                sessions_ended: 2,
            }),
            R::ThrottleList(ThrottleList {
                rows: vec![ThrottleRow {
                    account: Some(s("ops@example.com")),
                    source: Some("127.0.0.2".parse().unwrap()),
                    failures: 4,
                    last_failure_unix: 1_700_000_000,
                    wait_secs: 2,
                    blocked_until_unix: Some(1_700_000_900),
                }],
                left_off: 1,
                in_flight: 0,
            }),
            R::ThrottleCleared(ThrottleCleared {
                target: ClearTarget::Source("127.0.0.2".parse().unwrap()),
                cleared: 3,
            }),
            R::Health(HealthMatrix {
                stale_after_secs: 60,
                zones: vec![s("eu"), s("us")],
                nodes: vec![s("eu/n1"), s("us/n2")],
                pairs: vec![PairHealth {
                    node: s("eu/n1"),
                    zone: s("eu"),
                    peer: s("us/n2"),
                    peer_zone: s("us"),
                    loss: 0.25,
                    rtt_micros: Some(1234),
                    reported_unix: 1_700_000_000,
                    age_secs: 3,
                    stale: false,
                }],
                zone_pairs: vec![ZoneHealth {
                    zone: s("eu"),
                    peer_zone: s("us"),
                    pairs: 1,
                    stale_pairs: 0,
                    mean_loss: 0.25,
                    max_loss: 0.25,
                    mean_rtt_micros: None,
                }],
                worst: vec![],
            }),
            R::BlockAdded(block.clone()),
            R::BlockList(vec![block]),
            R::BlockRemoved(BlockRemoved {
                address: s("192.0.2.1"),
            }),
            R::BlockAllowAdded(AllowAdded {
                allow: allow.clone(),
                lifted: vec![s("192.0.2.7")],
            }),
            R::BlockAllowList(vec![allow.clone()]),
            R::BlockAllowRemoved(allow),
            R::DomainAdded(domain()),
            R::DomainList(vec![domain(), {
                let mut d = domain();
                d.state = crate::domains::DomainState::Failed;
                d.serial_hex = None;
                d.not_after_unix = None;
                d.error = Some(s("urn:ietf:params:acme:error:connection: refused"));
                d.staple = None;
                d
            }]),
            R::Domain(DomainDetail {
                domain: domain(),
                job: Some(JobView {
                    id: 7,
                    state: crate::domains::DomainState::Deploying,
                    detail: s("2/3 edges serve serial 0abc"),
                }),
            }),
            R::DomainRemoved(DomainRemoved {
                name: s("portal.example.com"),
            }),
            R::BackupWritten(BackupWritten {
                path: s("/var/lib/zonemesh/backups/b.zmbackup"),
                format: 1,
                ca_fingerprint: s("ab12"),
                trees: vec![crate::core::backup::TreeCount {
                    name: s("nodes"),
                    entries: 3,
                }],
                entries: 3,
                bytes: 4096,
                body_sha256: s("00ff"),
                millis: 12,
            }),
            R::SshCa(SshCaView {
                key_type: crate::ssh::CaKeyType::Ed25519,
                user_ca: s("ssh-ed25519 AAAA user"),
                host_ca: s("ssh-ed25519 AAAB host"),
                user_ca_fingerprint: s("SHA256:x"),
                host_ca_fingerprint: s("SHA256:y"),
            }),
            R::SshKnownHosts(SshLine {
                line: s("@cert-authority * ssh-ed25519 AAAB"),
                revoked: vec![s("@revoked * ssh-ed25519 AAAC")],
            }),
            R::SshGrantAdded(grant()),
            R::SshGrantRevoked(grant()),
            R::SshGrants(vec![grant()]),
            R::SshUserCert(IssuedUserCert {
                serial: 3,
                key_id: s("ops@example.com"),
                key_fingerprint: s("SHA256:z"),
                principals: vec![s("deploy@eu")],
                extensions: vec![s("permit-pty")],
                valid_after_unix: 1_700_000_000,
                valid_before_unix: 1_700_028_800,
                certificate: s("ssh-ed25519-cert-v01@openssh.com AAAA"),
            }),
            R::SshRevoked(SshRevoked {
                serials: vec![3, 4],
            }),
            R::SshCerts(vec![SshCertView {
                serial: 3,
                kind: s("user"),
                key_id: s("ops@example.com"),
                key_fingerprint: s("SHA256:z"),
                principals: vec![s("deploy@eu")],
                valid_before_unix: 1_700_028_800,
                revoked: true,
            }]),
            R::SshKrl(SshKrl {
                krl: b"SSHKRL\n\0".to_vec(),
            }),
            R::SshRevokedHosts(vec![RevokedHostView {
                serial: 5,
                node: s("eu/n1"),
                key_fingerprint: s("SHA256:h"),
                valid_before_unix: 1_700_604_800,
                line: s("@revoked * ssh-ed25519 AAAC"),
            }]),
            R::Audit(vec![AuditRecord {
                seq: 1,
                at_unix_ms: 1_700_000_000_000,
                event: AuditEvent::new("node.revoked", "ok")
                    .actor("cli")
                    .subject("eu/n1"),
            }]),
        ]
    }

    fn grant() -> GrantView {
        GrantView {
            email: s("ops@example.com"),
            zone: s("eu"),
            principal: s("deploy"),
            certificate_principal: s("deploy@eu"),
            max_ttl_secs: 28_800,
            extensions: vec![],
        }
    }

    fn domain() -> DomainView {
        DomainView {
            name: s("portal.example.com"),
            issuer: crate::domains::IssuerKind::Internal,
            owner: s("owner@example.com"),
            edge_zones: vec![s("eu")],
            state: crate::domains::DomainState::Deployed,
            edges_serving: 3,
            edges_total: 3,
            serial_hex: Some(s("0abc")),
            not_after_unix: Some(1_700_086_400),
            error: None,
            staple: Some(s("stapled")),
        }
    }

    #[test]
    fn a_domain_is_the_agreed_json_object() {
        let v = serde_json::to_value(domain()).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        let mut want = vec![
            "name",
            "issuer",
            "owner",
            "edge_zones",
            "state",
            "edges_serving",
            "edges_total",
            "serial_hex",
            "not_after_unix",
            "error",
            "staple",
        ];
        let mut got = keys.clone();
        got.sort_unstable();
        want.sort_unstable();
        assert_eq!(got, want);
        assert_eq!(v["issuer"], "internal");
        assert_eq!(v["state"], "deployed");
        assert!(v["error"].is_null());
        let detail = serde_json::to_value(DomainDetail {
            domain: domain(),
            job: None,
        })
        .unwrap();
        assert_eq!(detail["name"], "portal.example.com");
        assert!(detail["job"].is_null());
    }

    /// Every variant name serde knows for an enum, from the error for an unknown one.
    fn wire_names<T: serde::de::DeserializeOwned + std::fmt::Debug>(
        probe: &str,
    ) -> BTreeSet<String> {
        let err = serde_json::from_str::<T>(probe).unwrap_err().to_string();
        let list = err
            .split("expected one of ")
            .nth(1)
            .unwrap_or_else(|| panic!("no variant list in {err}"));
        list.split(", ")
            .map(|n| {
                n.trim_matches(|c: char| c == '`' || c.is_whitespace())
                    .to_string()
            })
            .map(|n| n.split('`').next().unwrap_or_default().to_string())
            .collect()
    }

    #[test]
    fn every_request_round_trips() {
        let all = wire_names::<AdminRequest>(r#"{"cmd":"no-such-command"}"#);
        let mut seen = BTreeSet::new();
        for req in requests() {
            let line = serde_json::to_string(&req).unwrap();
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            seen.insert(v["cmd"].as_str().unwrap().to_string());
            let back: AdminRequest = serde_json::from_str(&line).unwrap();
            assert_eq!(back, req, "{line}");
        }
        assert_eq!(seen, all, "every request kind needs a case in requests()");
    }

    #[test]
    fn every_reply_round_trips() {
        let all = wire_names::<AdminReply>(r#"{"reply":"no-such-reply","data":null}"#);
        let mut seen = BTreeSet::new();
        for reply in replies() {
            seen.insert(reply.kind().to_string());
            let resp = AdminResponse::ok(reply.clone());
            let line = serde_json::to_string(&resp).unwrap();
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            assert_eq!(
                v["result"]["reply"],
                reply.kind(),
                "kind() matches the wire name"
            );
            let back: AdminResponse = serde_json::from_str(&line).unwrap();
            assert_eq!(back, resp, "{line}");
            assert_eq!(back.into_result(), Ok(reply));
        }
        assert_eq!(seen, all, "every reply kind needs a case in replies()");
        let err = AdminResponse::err("no such zone");
        let back: AdminResponse =
            serde_json::from_str(&serde_json::to_string(&err).unwrap()).unwrap();
        assert_eq!(back.into_result(), Err("no such zone".to_string()));
    }

    #[test]
    fn secrets_stay_out_of_debug() {
        let req = &requests()[11];
        assert!(!format!("{req:?}").contains("correct horse"));
        let tok = &replies()[7];
        assert!(!format!("{tok:?}").contains("zmt_secret"));
    }
}
