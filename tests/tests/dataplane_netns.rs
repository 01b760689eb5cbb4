//! The agent's data plane for real: TUN devices and UDP sockets in network namespaces
//! the test creates (underlay 198.18.0.0/15, overlay 100.64.0.0/10). Needs root,
//! `iproute2`, `iputils-ping`, `iperf3`, `wireguard-go` and `wireguard-tools`; skipped
//! with a message otherwise. Build the binaries first: `cargo build --workspace --bins`.

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use zonemesh_tests::{bin, is_root, run_ok};

/// Two namespaces joined by a veth pair; everything it started is stopped and removed on
/// drop, also when the test fails.
struct Lab {
    ns: [String; 2],
    underlay: [String; 2],
    dir: tempfile::TempDir,
    children: Vec<Child>,
    uapi_sockets: Vec<PathBuf>,
}

impl Lab {
    /// `tag` keeps names unique per test; the process id keeps them unique per run.
    fn new(tag: u8) -> Result<Self> {
        let id = format!("{}{tag}", std::process::id() % 100_000);
        let ns = [format!("zmdp{id}a"), format!("zmdp{id}b")];
        let underlay = [format!("198.18.{tag}.1"), format!("198.18.{tag}.2")];
        let lab = Lab {
            ns: ns.clone(),
            underlay: underlay.clone(),
            dir: tempfile::tempdir()?,
            children: Vec::new(),
            uapi_sockets: Vec::new(),
        };
        let (va, vb) = (format!("zv{id}a"), format!("zv{id}b"));
        for n in &ns {
            run_ok(Command::new("ip").args(["netns", "add", n]))?;
        }
        run_ok(Command::new("ip").args([
            "link", "add", &va, "netns", &ns[0], "type", "veth", "peer", "name", &vb, "netns",
            &ns[1],
        ]))?;
        for (n, (v, ip)) in ns.iter().zip([(&va, &underlay[0]), (&vb, &underlay[1])]) {
            lab.exec(n, &["ip", "link", "set", "lo", "up"])?;
            lab.exec(n, &["ip", "addr", "add", &format!("{ip}/24"), "dev", v])?;
            lab.exec(n, &["ip", "link", "set", v, "up"])?;
        }
        Ok(lab)
    }

    fn cmd(&self, ns: &str, argv: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]).args(argv);
        c
    }

    fn exec(&self, ns: &str, argv: &[&str]) -> Result<String> {
        run_ok(&mut self.cmd(ns, argv))
    }

    fn spawn(&mut self, ns: &str, argv: &[&str], log: &str) -> Result<u32> {
        let log = std::fs::File::create(self.dir.path().join(log))?;
        let child = self
            .cmd(ns, argv)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawning {argv:?}"))?;
        let pid = child.id();
        self.children.push(child);
        Ok(pid)
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }

    fn ping(&self, ns: &str, dst: &str) -> Result<()> {
        // Retry briefly: the first handshake is still in flight right after start-up.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self
                .exec(ns, &["ping", "-c", "3", "-i", "0.2", "-W", "2", dst])
                .is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("ping {dst} from {ns} failed");
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// A short iperf3 TCP run from `client_ns` to `server_ip` (server in `server_ns`).
    fn tcp(&mut self, client_ns: &str, server_ns: &str, server_ip: &str) -> Result<f64> {
        let server_ns = server_ns.to_string();
        let log = format!("iperf-{server_ip}-{}.log", self.children.len());
        self.spawn(&server_ns, &["iperf3", "-s", "-1", "-B", server_ip], &log)?;
        std::thread::sleep(Duration::from_millis(500));
        let out = self.exec(client_ns, &["iperf3", "-c", server_ip, "-t", "2", "-J"])?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        let bps = v["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .context("iperf3 json")?;
        if bps <= 0.0 {
            bail!("no TCP data moved");
        }
        Ok(bps / 1e6)
    }

    fn write_agent_config(
        &self,
        name: &str,
        key: &str,
        ip: &str,
        peer_pub: &str,
        peer_ul: &str,
        peer_ip: &str,
    ) -> Result<PathBuf> {
        let cfg = serde_json::json!({
            "private_key": key,
            "listen_port": 51820,
            "interface": "zm0",
            "address": format!("{ip}/32"),
            "mtu": 1420,
            "peers": [{
                "name": "peer/peer",
                "public_key": peer_pub,
                "endpoint": format!("{peer_ul}:51820"),
                "allowed_ips": [format!("{peer_ip}/32")],
            }],
        });
        let p = self.dir.path().join(name);
        std::fs::write(&p, serde_json::to_vec_pretty(&cfg)?)?;
        Ok(p)
    }

    /// Stops a child with SIGTERM and returns whether it exited successfully in time.
    fn terminate(&mut self, pid: u32) -> Result<bool> {
        run_ok(Command::new("kill").args(["-TERM", &pid.to_string()]))?;
        let child = self
            .children
            .iter_mut()
            .find(|c| c.id() == pid)
            .context("no such child")?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Some(st) = child.try_wait()? {
                return Ok(st.success());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(false)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.children {
            if matches!(c.try_wait(), Ok(None)) {
                let _ = Command::new("kill")
                    .args(["-TERM", &c.id().to_string()])
                    .status();
            }
        }
        std::thread::sleep(Duration::from_millis(300));
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for n in &self.ns {
            let _ = Command::new("ip")
                .args(["netns", "del", n])
                .stderr(Stdio::null())
                .status();
        }
        for s in &self.uapi_sockets {
            let _ = std::fs::remove_file(s);
        }
    }
}

fn keypair() -> Result<(String, String)> {
    let key = run_ok(Command::new("wg").arg("genkey"))?.trim().to_string();
    let mut c = Command::new("wg")
        .arg("pubkey")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    use std::io::Write;
    c.stdin.take().context("stdin")?.write_all(key.as_bytes())?;
    let out = c.wait_with_output()?;
    Ok((key, String::from_utf8(out.stdout)?.trim().to_string()))
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn skip_reason(tools: &[&str]) -> Option<String> {
    if !is_root() {
        return Some("not root (network namespaces and TUN need it)".into());
    }
    if !Path::new("/dev/net/tun").exists() {
        return Some("/dev/net/tun missing".into());
    }
    tools
        .iter()
        .find(|t| !have(t))
        .map(|t| format!("{t} not installed"))
}

#[test]
fn zonemesh_to_zonemesh_ping_tcp_and_clean_shutdown() -> Result<()> {
    if let Some(why) = skip_reason(&["ip", "ping", "iperf3", "wg"]) {
        eprintln!("skipping: {why}");
        return Ok(());
    }
    let agent = bin("zonemesh-agent");
    let mut lab = Lab::new(11)?;
    let (ka, pa) = keypair()?;
    let (kb, pb) = keypair()?;
    let (ns_a, ns_b) = (lab.ns[0].clone(), lab.ns[1].clone());
    let (ul_a, ul_b) = (lab.underlay[0].clone(), lab.underlay[1].clone());
    let ca = lab.write_agent_config("a.json", &ka, "100.64.11.1", &pb, &ul_b, "100.64.11.2")?;
    let cb = lab.write_agent_config("b.json", &kb, "100.64.11.2", &pa, &ul_a, "100.64.11.1")?;
    let agent = agent.to_str().context("path")?.to_string();
    let pid_a = lab.spawn(
        &ns_a,
        &[&agent, "tunnel", "--config", ca.to_str().context("path")?],
        "a.log",
    )?;
    let pid_b = lab.spawn(
        &ns_b,
        &[&agent, "tunnel", "--config", cb.to_str().context("path")?],
        "b.log",
    )?;

    let r = (|| -> Result<()> {
        lab.ping(&ns_a, "100.64.11.2")?;
        lab.ping(&ns_b, "100.64.11.1")?;
        let ab = lab.tcp(&ns_a, &ns_b, "100.64.11.2")?;
        let ba = lab.tcp(&ns_b, &ns_a, "100.64.11.1")?;
        eprintln!("zonemesh <-> zonemesh TCP: a->b {ab:.0} Mbit/s, b->a {ba:.0} Mbit/s");
        Ok(())
    })();
    if let Err(e) = r {
        bail!(
            "{e:#}\n--- a.log\n{}\n--- b.log\n{}",
            lab.log("a.log"),
            lab.log("b.log")
        );
    }
    // SIGTERM: exit 0 and the device and its routes are gone.
    assert!(
        lab.terminate(pid_a)?,
        "agent a did not exit cleanly:\n{}",
        lab.log("a.log")
    );
    assert!(
        lab.terminate(pid_b)?,
        "agent b did not exit cleanly:\n{}",
        lab.log("b.log")
    );
    let links = lab.exec(&ns_a, &["ip", "-o", "link"])?;
    assert!(!links.contains("zm0"), "TUN device left behind: {links}");
    let routes = lab.exec(&ns_a, &["ip", "route"])?;
    assert!(!routes.contains("100.64."), "route left behind: {routes}");
    Ok(())
}

#[test]
fn wireguard_go_interop_ping_and_tcp_both_ways() -> Result<()> {
    if let Some(why) = skip_reason(&["ip", "ping", "iperf3", "wg", "wireguard-go"]) {
        eprintln!("skipping: {why}");
        return Ok(());
    }
    let agent = bin("zonemesh-agent");
    let mut lab = Lab::new(12)?;
    let (ns_a, ns_b) = (lab.ns[0].clone(), lab.ns[1].clone());
    let (ul_a, ul_b) = (lab.underlay[0].clone(), lab.underlay[1].clone());
    let (ka, pa) = keypair()?;
    let (kb, pb) = keypair()?;

    // a: wireguard-go, configured with wg. Its UAPI socket path is global, so the
    // interface name is unique per run.
    let wg_if = format!("zwg{}", std::process::id() % 100_000);
    lab.uapi_sockets
        .push(PathBuf::from(format!("/var/run/wireguard/{wg_if}.sock")));
    let wg_go = lab.spawn(
        &ns_a,
        &[
            "env",
            "WG_PROCESS_FOREGROUND=1",
            "LOG_LEVEL=error",
            "wireguard-go",
            "-f",
            &wg_if,
        ],
        "wg.log",
    )?;
    let sock = lab.uapi_sockets[0].clone();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !sock.exists() {
        if Instant::now() > deadline {
            bail!(
                "wireguard-go did not create {}: {}",
                sock.display(),
                lab.log("wg.log")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let keyfile = lab.dir.path().join("a.key");
    std::fs::write(&keyfile, &ka)?;
    lab.exec(
        &ns_a,
        &[
            "wg",
            "set",
            &wg_if,
            "private-key",
            keyfile.to_str().context("path")?,
            "listen-port",
            "51820",
            "peer",
            &pb,
            "endpoint",
            &format!("{ul_b}:51820"),
            "allowed-ips",
            "100.64.12.2/32",
        ],
    )?;
    lab.exec(
        &ns_a,
        &["ip", "addr", "add", "100.64.12.1/32", "dev", &wg_if],
    )?;
    lab.exec(&ns_a, &["ip", "link", "set", &wg_if, "mtu", "1420", "up"])?;
    lab.exec(
        &ns_a,
        &["ip", "route", "add", "100.64.12.2/32", "dev", &wg_if],
    )?;

    // b: zonemesh.
    let cb = lab.write_agent_config("b.json", &kb, "100.64.12.2", &pa, &ul_a, "100.64.12.1")?;
    let agent = agent.to_str().context("path")?.to_string();
    let pid_b = lab.spawn(
        &ns_b,
        &[&agent, "tunnel", "--config", cb.to_str().context("path")?],
        "b.log",
    )?;

    let r = (|| -> Result<()> {
        lab.ping(&ns_b, "100.64.12.1")?;
        lab.ping(&ns_a, "100.64.12.2")?;
        let hs = lab.exec(&ns_a, &["wg", "show", &wg_if, "latest-handshakes"])?;
        let t: u64 = hs
            .split_whitespace()
            .nth(1)
            .context("wg show output")?
            .parse()?;
        assert!(t > 0, "wireguard-go saw no handshake: {hs}");
        let to_zm = lab.tcp(&ns_a, &ns_b, "100.64.12.2")?;
        let to_wg = lab.tcp(&ns_b, &ns_a, "100.64.12.1")?;
        eprintln!(
            "wireguard-go -> zonemesh {to_zm:.0} Mbit/s, zonemesh -> wireguard-go {to_wg:.0} Mbit/s"
        );
        Ok(())
    })();
    if let Err(e) = r {
        bail!(
            "{e:#}\n--- wg.log\n{}\n--- b.log\n{}",
            lab.log("wg.log"),
            lab.log("b.log")
        );
    }
    assert!(
        lab.terminate(pid_b)?,
        "agent did not exit cleanly:\n{}",
        lab.log("b.log")
    );
    let _ = wg_go;
    Ok(())
}
