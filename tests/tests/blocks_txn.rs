//! Placing, lifting and expiring a block is one store transaction with the change that
//! tells the agents. A store lost part-way (commits that stop going through after the
//! first, or at once) leaves the blocklist consistent: a stored block is always one the
//! change log told the watchers about, and a block taken off the store always reached
//! them as lifted. Written as separate commits, the record and its change could part.

use anyhow::{Result, ensure};
use std::net::IpAddr;
use std::time::{Duration, SystemTime};
use zonemesh_controller::store::{BlockRecord, Store};
use zonemesh_proto as pb;
use zonemesh_tests::faultkv::Faulty;
use zonemesh_tests::inproc::Plane;

/// Whether `ip` is stored as blocked, and what a watcher at `after` is told of it
/// (`Some(true)`: blocked, `Some(false)`: lifted, `None`: nothing).
fn state(plane: &Plane, ip: IpAddr, after: u64) -> Result<(bool, Option<bool>)> {
    let mesh = &plane.mesh;
    // Every stored record, ended or not.
    let stored = Store::all::<BlockRecord>(&plane.store.blocks, "blocks")?
        .iter()
        .any(|b| b.address == ip);
    let told = match mesh.next_frame(after)? {
        None => None,
        Some(f) => match f.decode()?.kind {
            Some(pb::mesh_update::Kind::Delta(d)) => {
                if d.blocked.iter().any(|b| b.address == ip.to_string()) {
                    Some(true)
                } else if d.unblocked.contains(&ip.to_string()) {
                    Some(false)
                } else {
                    None
                }
            }
            other => anyhow::bail!("a watcher one change behind got {other:?}"),
        },
    };
    Ok((stored, told))
}

#[test]
fn a_block_and_its_change_are_written_together_or_not_at_all() -> Result<()> {
    let (plane, faulty) = Faulty::plane()?;
    let mesh = &plane.mesh;
    let now = SystemTime::now();
    let until = now + Duration::from_secs(3600);
    for (round, budget) in [0usize, 1].into_iter().enumerate() {
        let ip: IpAddr = format!("198.18.7.{}", round + 1).parse()?;

        // Placing.
        let before = mesh.version();
        faulty.fail_after(budget);
        let placed = mesh.block_source(ip, until, "test");
        faulty.set_failing(false);
        let (stored, told) = state(&plane, ip, before)?;
        println!("place with {budget} commit(s) left: {placed:?}, stored {stored}, told {told:?}");
        ensure!(
            stored == (told == Some(true)),
            "place, {budget} commit(s) left: stored {stored} but watchers told {told:?}"
        );
        ensure!(
            placed.is_ok() == stored,
            "place answered {placed:?}, stored {stored}"
        );
        if !stored {
            mesh.block_source(ip, until, "test")?;
        }

        // Lifting.
        let before = mesh.version();
        faulty.fail_after(budget);
        let lifted = mesh.unblock_source(ip);
        faulty.set_failing(false);
        let (stored, told) = state(&plane, ip, before)?;
        println!("lift with {budget} commit(s) left: {lifted:?}, stored {stored}, told {told:?}");
        ensure!(
            stored == (told != Some(false)),
            "lift, {budget} commit(s) left: stored {stored} but watchers told {told:?}"
        );
        ensure!(
            lifted.is_ok() != stored,
            "lift answered {lifted:?}, stored {stored}"
        );
    }

    // Expiry of several blocks at once.
    let soon = now + Duration::from_secs(60);
    let later = now + Duration::from_secs(120);
    let ips: Vec<IpAddr> = (10..13)
        .map(|i| format!("198.18.8.{i}").parse())
        .collect::<Result<_, _>>()?;
    for ip in &ips {
        mesh.block_source(*ip, soon, "test")?;
    }
    for budget in [0usize, 1] {
        let before = mesh.version();
        faulty.fail_after(budget);
        let expired = mesh.expire_blocks(later);
        faulty.set_failing(false);
        println!(
            "expiry with {budget} commit(s) left: {:?}",
            expired.as_ref().map(Vec::len)
        );
        for ip in &ips {
            let (stored, told) = state(&plane, *ip, before)?;
            ensure!(
                stored == (told != Some(false)),
                "expiry, {budget} commit(s) left: {ip} stored {stored} but watchers told {told:?}"
            );
        }
    }
    let left = Store::all::<BlockRecord>(&plane.store.blocks, "blocks")?;
    ensure!(
        !left.iter().any(|b| ips.contains(&b.address)),
        "every expired block is off: {left:?}"
    );
    Ok(())
}
