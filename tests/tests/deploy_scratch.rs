use anyhow::Result;
use std::time::Duration;
use zonemesh_tests::*;

#[test]
fn scratch_hs() -> Result<()> {
    let lab = edge::EdgeLab::new(edge::LabOptions {
        tag: 99,
        acme: false,
        bin_dir: None,
    })?;
    let out = lab.dir.join("tls");
    lab.ctl.admin_ok(&[
        "ca",
        "issue-tls",
        "--dns",
        "portal.test",
        "--out-dir",
        out.to_str().unwrap(),
    ])?;
    let ns = format!("zme{}t99e0", std::process::id() % 100000);
    let addr: std::net::SocketAddr = "198.19.99.2:8443".parse()?;
    let _ng = nginx::Nginx::start(
        &lab.dir.join("ng"),
        &[nginx::Site {
            listen: addr,
            server_name: "portal.test".into(),
            cert: out.join("chain.pem"),
            key: out.join("key.pem"),
            staple: None,
            body: "x".into(),
        }],
        2,
        Some(&ns),
        Some(&lab.janitor),
    )?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let r = rt.block_on(tlsprobe::handshake_rate(
        addr,
        "portal.test",
        32,
        Duration::from_secs(3),
    ))?;
    println!("nginx: {r:?}");
    println!("{:?}", tlsprobe::fetch(addr, "portal.test")?.version);
    lab.add_user("o@p.test", "portal-owner", "a long passphrase here");
    let s = lab.sign_in("o@p.test", "a long passphrase here")?;
    println!("dashboard {}", s.get("/dashboard")?.status);
    let b = browser::Browser::start()?;
    let base = format!("https://localhost:{}", lab.ctl.https.port());
    b.goto(&format!("{base}/signin"))?;
    b.wait_url("/signin", Duration::from_secs(10))?;
    b.type_into("#email", "o@p.test")?;
    b.type_into("#password", "a long passphrase here")?;
    b.click("#signin")?;
    std::thread::sleep(Duration::from_secs(2));
    println!("browser at {}", b.url()?);
    Ok(())
}
