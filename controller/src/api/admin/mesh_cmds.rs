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
        let n = mesh.revoke_node(&self.resolve_node(&node)?, reason, now)?;
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

fn parse_ip(address: &str) -> Result<std::net::IpAddr, ControllerError> {
    address.trim().parse().map_err(|e| {
        ControllerError::BadRequest(format!(
            "{} is not an IP address: {e}",
            crate::text::Escaped(crate::text::cap(address, 64))
        ))
    })
}
