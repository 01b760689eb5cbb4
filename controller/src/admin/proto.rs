//! The admin protocol: one JSON line with an [`AdminRequest`] from the CLI, one JSON line
//! with an [`AdminResponse`] back. Both ends use these types; nothing reads a reply by
//! string keys, and nothing here decides how a reply is shown (that is `crate::cli`).

use crate::audit::AuditRecord;
use crate::auth::{ClearTarget, Role, ThrottleList, UserSummary};
use serde::{Deserialize, Serialize};

/// One admin command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum AdminRequest {
    CaShow,
    CaExport {
        intermediate: bool,
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
    Audit {
        limit: Option<usize>,
    },
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
                | Self::Health
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
    Health(Vec<HealthRow>),
    BlockAdded(BlockRow),
    BlockList(Vec<BlockRow>),
    BlockRemoved(BlockRemoved),
    Audit(Vec<AuditRecord>),
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
            Self::Audit(_) => "audit",
        }
    }
}

/// `ca show`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaShow {
    pub certificates: Vec<CaCert>,
    pub trust_domain: String,
}

/// One CA certificate in `ca show`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaCert {
    pub role: String,
    pub subject: String,
    pub sha256: String,
    pub not_after: String,
    pub key_bits: usize,
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

/// One row of `health`: what `node` measured towards `peer`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HealthRow {
    pub loss: f32,
    pub node: String,
    pub peer: String,
    pub reported_unix: u64,
    pub rtt_micros: u32,
}

/// A blocked source address (`block add`, `block list`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockRow {
    pub address: String,
    pub reason: String,
    pub until_unix: u64,
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
