//! The commands on live mesh state: zones, tokens, nodes, health, blocks.

use super::AdminHandler;
use super::proto::*;
use crate::error::ControllerError;
use std::time::{Duration, SystemTime};
use zonemesh_ca::{RevocationReason, WireGuardKey};

impl AdminHandler {
    /// `zone add`
    pub(super) fn zone_add(
        &self,
        name: String,
        cidr: String,
        intra_zone_tunnels: bool,
        now: SystemTime,
    ) -> Result<AdminReply, ControllerError> {
        let z = self
            .mesh()?
            .add_zone(&name, &cidr, intra_zone_tunnels, now)?;
        self.note("zone.added", &name, format!("cidr {}", z.cidr));
        Ok(AdminReply::ZoneAdded(ZoneAdded {
            name: z.name,
            cidr: z.cidr.to_string(),
            intra_zone_tunnels: z.intra_zone_tunnels,
        }))
    }

    /// `zone list`, with the active nodes of each zone
    pub(super) fn zone_list(&self) -> Result<AdminReply, ControllerError> {
        self.mesh()?;
        let nodes = self.auth.store().nodes()?;
        let zones = self
            .auth
            .store()
            .zones()?
            .into_iter()
            .map(|z| {
                let count = nodes
                    .iter()
                    .filter(|n| n.zone == z.name && !n.revoked)
                    .count();
                ZoneRow {
                    cidr: z.cidr.to_string(),
                    intra_zone_tunnels: z.intra_zone_tunnels,
                    name: z.name,
                    nodes: count,
                }
            })
            .collect();
        Ok(AdminReply::ZoneList(zones))
    }

    /// `token create`
    pub(super) fn token_create(
        &self,
        zone: String,
        ttl_secs: u64,
        uses: u32,
        now: SystemTime,
    ) -> Result<AdminReply, ControllerError> {
        let t = self
            .mesh()?
            .create_token(&zone, Duration::from_secs(ttl_secs), uses, now)?;
        self.note(
            "token.created",
            &zone,
            format!("{uses} use(s), expires {}", t.expires_unix),
        );
        Ok(AdminReply::TokenCreated(TokenCreated {
            token: Redacted(t.token),
            zone: t.zone,
            expires_unix: t.expires_unix,
            uses: t.uses,
        }))
    }

    /// `node list`
    pub(super) fn node_list(&self) -> Result<AdminReply, ControllerError> {
        self.mesh()?;
        let nodes = self
            .auth
            .store()
            .nodes()?
            .into_iter()
            .map(|n| NodeRow {
                endpoints: n.endpoints.iter().map(ToString::to_string).collect(),
                node: n.node,
                not_after_unix: n.not_after_unix,
                overlay_ip: n.overlay_ip.to_string(),
                revoked: n.revoked,
                serial: n.serial_hex,
                wg_public_key: WireGuardKey(n.wg_public_key).to_base64(),
                zone: n.zone,
            })
            .collect();
        Ok(AdminReply::NodeList(nodes))
    }

    /// `node revoke`
    pub(super) fn node_revoke(
        &self,
        node: String,
        reason: String,
        now: SystemTime,
    ) -> Result<AdminReply, ControllerError> {
        let reason: RevocationReason = reason.parse()?;
        let mesh = self.mesh()?;
        // Its SSH host certificates go on every server's KRL and into `ssh known-hosts`
        // as `@revoked` lines.
        let n = crate::ssh::revoke_node(
            mesh,
            self.ssh.as_deref(),
            &self.resolve_node(&node)?,
            reason,
            now,
            "cli",
        )?;
        self.note(
            "node.revoked",
            &n.key(),
            format!("serial {} reason {}", n.serial_hex, reason.as_str()),
        );
        Ok(AdminReply::NodeRevoked(NodeRevoked {
            node: n.key(),
            serial: n.serial_hex,
        }))
    }

    /// `health`: the matrix of enrolled pairs, sorted by node and peer
    pub(super) fn health(&self) -> Result<AdminReply, ControllerError> {
        let mesh = self.mesh()?;
        Ok(AdminReply::Health(mesh.health_matrix(mesh.now())?))
    }

    /// `block add`: between one minute and 30 days
    pub(super) fn block_add(
        &self,
        address: String,
        secs: u64,
        reason: String,
        now: SystemTime,
    ) -> Result<AdminReply, ControllerError> {
        let ip = parse_ip(&address)?;
        let until = now + Duration::from_secs(secs.clamp(60, 30 * 86_400));
        self.mesh()?.block_source(ip, until, &reason)?;
        self.note(
            "source.blocked",
            &ip.to_canonical().to_string(),
            format!(
                "{} (until {})",
                crate::text::cap(&reason, 512),
                crate::store::unix(until)
            ),
        );
        Ok(AdminReply::BlockAdded(BlockRow {
            address: ip.to_canonical().to_string(),
            reason,
            until_unix: crate::store::unix(until),
            since_unix: crate::store::unix(now),
            offence: 0,
        }))
    }

    /// `block list`
    pub(super) fn block_list(&self, now: SystemTime) -> Result<AdminReply, ControllerError> {
        let blocks = self
            .mesh()?
            .blocks(now)?
            .into_iter()
            .map(|b| BlockRow {
                address: b.address.to_string(),
                reason: b.reason,
                until_unix: b.until_unix,
                since_unix: b.since_unix,
                offence: b.offence,
            })
            .collect();
        Ok(AdminReply::BlockList(blocks))
    }

    /// `block remove`
    pub(super) fn block_remove(&self, address: String) -> Result<AdminReply, ControllerError> {
        let ip = parse_ip(&address)?;
        let rec = self.mesh()?.unblock_source(ip)?;
        self.note(
            "source.unblocked",
            &rec.address.to_string(),
            format!("was blocked until {}: {}", rec.until_unix, rec.reason),
        );
        Ok(AdminReply::BlockRemoved(BlockRemoved {
            address: rec.address.to_string(),
        }))
    }
}

impl AdminHandler {
    /// `block allow CIDR`
    pub(super) fn block_allow_add(
        &self,
        cidr: String,
        note: String,
        now: SystemTime,
    ) -> Result<AdminReply, ControllerError> {
        let net = parse_net(&cidr)?;
        let (rec, lifted) = self.mesh()?.allow_add(net, &note, now)?;
        self.note(
            "source.allowed",
            &rec.net.to_string(),
            format!(
                "added to the allow-list ({}); blocks lifted: {}",
                rec.note,
                lifted.len()
            ),
        );
        Ok(AdminReply::BlockAllowAdded(AllowAdded {
            allow: allow_row(rec),
            lifted: lifted.iter().map(ToString::to_string).collect(),
        }))
    }

    /// `block allow --list`
    pub(super) fn block_allow_list(&self) -> Result<AdminReply, ControllerError> {
        let rows = self
            .mesh()?
            .allow_list()?
            .into_iter()
            .map(allow_row)
            .collect();
        Ok(AdminReply::BlockAllowList(rows))
    }

    /// `block allow --remove CIDR`
    pub(super) fn block_allow_remove(&self, cidr: String) -> Result<AdminReply, ControllerError> {
        let net = parse_net(&cidr)?;
        let rec = self.mesh()?.allow_remove(net)?;
        self.note(
            "source.allow_removed",
            &rec.net.to_string(),
            format!("removed from the allow-list ({})", rec.note),
        );
        Ok(AdminReply::BlockAllowRemoved(allow_row(rec)))
    }
}

fn allow_row(rec: crate::store::AllowRecord) -> AllowRow {
    AllowRow {
        cidr: rec.net.to_string(),
        added_unix: rec.added_unix,
        note: rec.note,
    }
}

/// A CIDR, or one address as its /32 or /128.
fn parse_net(cidr: &str) -> Result<ipnet::IpNet, ControllerError> {
    let t = cidr.trim();
    t.parse::<ipnet::IpNet>()
        .or_else(|_| t.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|e| {
            ControllerError::BadRequest(format!(
                "{} is not a CIDR range: {e}",
                crate::text::Escaped(crate::text::cap(cidr, 64))
            ))
        })
}

fn parse_ip(address: &str) -> Result<std::net::IpAddr, ControllerError> {
    address.trim().parse().map_err(|e| {
        ControllerError::BadRequest(format!(
            "{} is not an IP address: {e}",
            crate::text::Escaped(crate::text::cap(address, 64))
        ))
    })
}
