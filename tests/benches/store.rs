//! Enrollments per second on each store, measured in the same run: the embedded sled
//! store, one etcd member and a three-member etcd cluster (Debian `etcd-server` on
//! loopback). Each enrollment is one store transaction (token use, address, certificate,
//! node, key, change-log entry) made durable before the reply; 8 in flight over 4
//! channels. `ZM_STORE_ENROLLS` sets the count (default 200; smoke: 40).

use anyhow::Result;
use futures::StreamExt;
use std::time::Instant;
use tempfile::TempDir;
use zonemesh_tests::cluster::{Controller, enroll_rpc, enrollment_channel, wg_key};
use zonemesh_tests::etcd::{self, Etcd};

async fn rate(ctl: &Controller, n: usize) -> Result<f64> {
    let addr = ctl.grpc_addr();
    let chans =
        futures::future::try_join_all((0..4).map(|_| enrollment_channel(&addr, &ctl.fingerprint)))
            .await?;
    ctl.zone_add("bench", "100.64.0.0/16")?;
    let token = ctl.token("bench", n as u32 + 1)?;
    let keys: Vec<_> = (0..4)
        .map(|i| std::sync::Arc::new(zonemesh_tests::rsa4096(i)))
        .collect();
    let t = Instant::now();
    let out: Vec<_> = futures::stream::iter(0..n)
        .map(|i| {
            let ch = chans[i % chans.len()].clone();
            let key = keys[i % keys.len()].clone();
            let token = token.clone();
            async move { enroll_rpc(ch, &token, &format!("s{i}"), &key, wg_key(i as u64 + 1)).await }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    let secs = t.elapsed().as_secs_f64();
    for r in out {
        r.map_err(|s| anyhow::anyhow!("enroll: {s}"))?;
    }
    Ok(n as f64 / secs)
}

async fn on(store: Option<&str>, n: usize) -> Result<f64> {
    let tmp = TempDir::new()?;
    let mut ctl = match store {
        None => Controller::init(tmp.path())?,
        Some(url) => Controller::init_on_store(tmp.path(), url)?,
    };
    ctl.start()?;
    rate(&ctl, n).await
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let n: usize = std::env::var("ZM_STORE_ENROLLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let build = if std::env::var("ZM_BIN_DIR").is_ok_and(|d| d.contains("release")) {
        "release"
    } else {
        "debug"
    };
    let sled = on(None, n).await?;
    println!("store bench ({build} controller, {n} enrollments, 8 in flight)");
    println!("sled (embedded):       {sled:7.1} enrollments/s");
    if !etcd::available() {
        println!("skipped: etcd not installed");
        return Ok(());
    }
    let one = Etcd::start_temp(1)?;
    let e1 = on(Some(&one.url("bench")), n).await?;
    drop(one);
    let three = Etcd::start_temp(3)?;
    let e3 = on(Some(&three.url("bench")), n).await?;
    drop(three);
    println!(
        "etcd, 1 member:        {e1:7.1} enrollments/s ({:.2}x sled)",
        e1 / sled
    );
    println!(
        "etcd, 3 members:       {e3:7.1} enrollments/s ({:.2}x sled)",
        e3 / sled
    );
    Ok(())
}
