//! Backup and restore of a controller store holding N nodes (10,000; `SMOKE=1`: 500).
//!
//! The store is filled through the controller's store library with what an enrollment
//! writes for each node (node record with an RSA-4096 certificate's worth of DER, its
//! signature bytes distinct per node, issued
//! serial, the node's serial list, its WireGuard key), not by N RSA enrollments. Then,
//! with the controller serving: `backup --out` over the admin socket, and `restore --from`
//! into a new data directory, timed from the CLI's start to its exit. Anchors in the same
//! run, on the same data directory with the controller stopped: `tar czf` and `cp -a`.
//!
//! `ZM_BIN_DIR` picks the controller binary (default: the debug build next to this bench).

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use zonemesh_controller::store::{
    CertKind, CertRecord, NodeRecord, NodeSerial, Store, ZoneRecord, encode,
};
use zonemesh_tests::cluster::{Controller, wg_key};
use zonemesh_tests::{bin, run_ok};

fn timed(cmd: &mut Command) -> Result<(Duration, String)> {
    let t = Instant::now();
    let out = run_ok(cmd)?;
    Ok((t.elapsed(), out))
}

fn du_bytes(p: &Path) -> Result<u64> {
    let out = run_ok(Command::new("du").args(["-sb"]).arg(p))?;
    out.split_whitespace()
        .next()
        .context("du printed nothing")?
        .parse()
        .context("du output")
}

fn size(p: &Path) -> Result<u64> {
    Ok(std::fs::metadata(p)?.len())
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

/// `der` with its last 512 bytes (an RSA-4096 signature) random: every node's certificate
/// differs as real ones do, so compression anchors are not flattered by repetition.
fn distinct(der: &[u8]) -> Vec<u8> {
    let mut d = der.to_vec();
    let at = d.len().saturating_sub(512);
    rand::fill(&mut d[at..]);
    d
}

/// What enrollment writes for `n` nodes, through the store library.
fn fill(data_dir: &Path, n: usize, cert_der: &[u8]) -> Result<()> {
    let store = Store::open(&data_dir.join("db"))?;
    let now = 1_800_000_000u64;
    for (name, cidr) in [("eu", "100.64.0.0/16"), ("us", "100.65.0.0/16")] {
        let z = ZoneRecord {
            name: name.into(),
            cidr: cidr.parse()?,
            intra_zone_tunnels: false,
            created_unix: now,
        };
        store.zones.insert(name, encode(&z))?;
    }
    for i in 0..n {
        let zone = if i % 2 == 0 { "eu" } else { "us" };
        let serial_hex = format!("{:032x}", 0x5eed_0000_0000_u64 + i as u64);
        let ip: std::net::IpAddr = if zone == "eu" {
            format!("100.64.{}.{}", i / 250, 1 + i % 250).parse()?
        } else {
            format!("100.65.{}.{}", i / 250, 1 + i % 250).parse()?
        };
        let node = NodeRecord {
            zone: zone.into(),
            node: format!("n{i}"),
            serial_hex: serial_hex.clone(),
            cert_der: distinct(cert_der),
            wg_public_key: wg_key(i as u64),
            endpoints: vec![format!("198.18.{}.{}:51820", i / 250, 1 + i % 250).parse()?],
            overlay_ip: ip,
            enrolled_unix: now,
            not_after_unix: now + 30 * 86_400,
            revoked: false,
        };
        store.put_node(&node)?;
        store.certs.insert(
            &serial_hex,
            encode(&CertRecord {
                kind: CertKind::Node,
                subject: format!("spiffe://corp.test/zone/{zone}/node/n{i}"),
                not_after_unix: node.not_after_unix,
                issued_unix: now,
            }),
        )?;
        store.add_node_serial(
            &node.key(),
            &NodeSerial {
                serial_hex,
                kind: CertKind::Node,
                not_after_unix: node.not_after_unix,
            },
        )?;
        store
            .wgkeys
            .insert(node.wg_public_key, node.key().as_bytes())?;
    }
    store.flush()?;
    Ok(())
}

fn main() -> Result<()> {
    let smoke = std::env::var("SMOKE").is_ok_and(|v| v == "1");
    let n = if smoke { 500 } else { 10_000 };
    let binary = match std::env::var_os("ZM_BIN_DIR") {
        Some(d) => PathBuf::from(d).join("zonemesh-controller"),
        None => bin("zonemesh-controller"),
    };
    let tmp = tempfile::TempDir::new()?;
    let mut ctl = Controller::init_with(tmp.path(), binary.clone())?;
    let root_pem = ctl.admin_ok(&["ca", "export", "--root"])?;
    let cert_der = zonemesh_ca::pem_blocks("CERTIFICATE", &root_pem)?
        .pop()
        .context("no root certificate")?;
    let t = Instant::now();
    fill(&ctl.data_dir, n, &cert_der)?;
    println!(
        "filled the store with {n} nodes in {} ({} binary)",
        ms(t.elapsed()),
        binary.display()
    );
    let data_bytes = du_bytes(&ctl.data_dir)?;

    // Anchors, with the controller stopped (a copy of a live sled directory is not one).
    let tgz = tmp.path().join("data.tgz");
    let (tar_t, _) = timed(
        Command::new("tar")
            .arg("czf")
            .arg(&tgz)
            .arg("-C")
            .arg(&ctl.data_dir)
            .arg("."),
    )?;
    let cp_dir = tmp.path().join("copy");
    let (cp_t, _) = timed(Command::new("cp").arg("-a").arg(&ctl.data_dir).arg(&cp_dir))?;

    // zonemesh, while the controller serves.
    ctl.start()?;
    let out = tmp.path().join("ctl.zmbackup");
    let (backup_t, said) = timed(
        Command::new(&binary)
            .arg("backup")
            .arg("--out")
            .arg(&out)
            .arg("--json")
            .arg("--data-dir")
            .arg(&ctl.data_dir),
    )?;
    let reply: serde_json::Value = serde_json::from_str(&said)?;
    ctl.sigterm(Duration::from_secs(30))?;
    let restored = tmp.path().join("restored");
    let (restore_t, _) = timed(
        Command::new(&binary)
            .arg("restore")
            .arg("--from")
            .arg(&out)
            .arg("--data-dir")
            .arg(&restored),
    )?;
    let store = Store::open(&restored.join("db"))?;
    let nodes = store.nodes.len()?;
    if nodes != n {
        bail!("restored {nodes} nodes, expected {n}");
    }
    drop(store);
    let backup_bytes = size(&out)?;
    let tgz_bytes = size(&tgz)?;

    println!(
        "store: {n} nodes, {} entries in {} trees, data dir {}",
        reply["entries"],
        reply["trees"].as_array().map_or(0, Vec::len),
        mib(data_bytes)
    );
    println!("{:<28} {:>10} {:>12}", "", "time", "size");
    println!(
        "{:<28} {:>10} {:>12}",
        "zonemesh backup (serving)",
        ms(backup_t),
        mib(backup_bytes)
    );
    println!(
        "{:<28} {:>10} {:>12}",
        "zonemesh restore",
        ms(restore_t),
        mib(du_bytes(&restored)?)
    );
    println!(
        "{:<28} {:>10} {:>12}",
        "anchor: tar czf (stopped)",
        ms(tar_t),
        mib(tgz_bytes)
    );
    println!(
        "{:<28} {:>10} {:>12}",
        "anchor: cp -a (stopped)",
        ms(cp_t),
        mib(du_bytes(&cp_dir)?)
    );
    println!(
        "ratios: backup/tar {:.2}x time, {:.2}x size; restore/cp {:.2}x time; backup/cp {:.2}x time",
        backup_t.as_secs_f64() / tar_t.as_secs_f64(),
        backup_bytes as f64 / tgz_bytes as f64,
        restore_t.as_secs_f64() / cp_t.as_secs_f64(),
        backup_t.as_secs_f64() / cp_t.as_secs_f64(),
    );
    Ok(())
}
