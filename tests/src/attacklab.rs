//! (Fixture of the intrusion tests; folding it into `meshlab` is left for later.)
//! `scripts/mesh-lab.sh` as a fixture: a controller and agents in network namespaces on the
//! underlay 198.18.100.0/24 (node `<zone><n>` is 198.18.100.(10·zone + n), the controller
//! .1), bare namespaces for attackers, and the agents' nftables sets. Root only; the lab is
//! torn down when the value is dropped.

use crate::bin;
use anyhow::{Result, bail};
use serde_json::Value;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub struct MeshLab {
    pub pfx: String,
    pub dir: PathBuf,
    zones: String,
    nodes: String,
    ctl_args: String,
    /// Where zonemesh-controller and zonemesh-agent are (`ZM_BIN_DIR`, else this build's).
    pub bin_dir: PathBuf,
}

/// Why a mesh lab cannot run here, or `None`.
pub fn skip_reason() -> Option<String> {
    if !crate::is_root() {
        return Some("not root (network namespaces and TUN need it)".into());
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Some("/dev/net/tun missing".into());
    }
    for tool in ["ip", "nft", "python3", "ping"] {
        if !crate::have(tool) {
            return Some(format!("{tool} not installed"));
        }
    }
    None
}

impl MeshLab {
    /// A lab named `pfx` (namespace prefix) with `zones` ("a b c") of `nodes` ("1 2") and
    /// extra `serve` flags; not started.
    pub fn new(pfx: &str, zones: &str, nodes: &str, ctl_args: &str) -> Self {
        Self {
            dir: std::env::temp_dir().join(format!("zonemesh-lab-{pfx}")),
            pfx: pfx.into(),
            zones: zones.into(),
            nodes: nodes.into(),
            ctl_args: ctl_args.into(),
            bin_dir: std::env::var_os("ZM_BIN_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| bin("zonemesh-agent").parent().expect("bin dir").into()),
        }
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("bash");
        c.arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/mesh-lab.sh"))
            .args(args)
            .env("PFX", &self.pfx)
            .env("DIR", &self.dir)
            .env("LAB_ZONES", &self.zones)
            .env("LAB_NODES", &self.nodes)
            .env("LAB_CTL_ARGS", &self.ctl_args)
            .env("BIN", &self.bin_dir);
        c
    }

    pub fn run(&self, args: &[&str]) -> Result<String> {
        let out = self.cmd(args).stdin(Stdio::null()).output()?;
        if !out.status.success() {
            bail!(
                "mesh-lab {args:?} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Start the lab (after removing a leftover one of the same name).
    pub fn up(&self) -> Result<()> {
        let _ = self.run(&["down"]);
        self.run(&["up"]).map(drop)
    }

    /// The controller CLI on the lab's data directory.
    pub fn controller(&self, args: &[&str]) -> Result<String> {
        let mut c = Command::new(self.bin_dir.join("zonemesh-controller"));
        c.arg("--data-dir").arg(self.dir.join("ctl")).args(args);
        crate::run_ok(&mut c)
    }

    /// Underlay address of node `<zone><n>`.
    pub fn underlay(node: &str) -> String {
        let zone = match &node[..1] {
            "a" => 1,
            "b" => 2,
            "c" => 3,
            _ => 4,
        };
        let n: u32 = node[1..].parse().unwrap_or(0);
        format!("198.18.100.{}", zone * 10 + n)
    }

    /// A command inside `node`'s namespace (succeeds or not).
    pub fn x_status(&self, node: &str, argv: &[&str]) -> bool {
        let mut a = vec!["x", node];
        a.extend_from_slice(argv);
        self.cmd(&a)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// One ping between overlay addresses.
    pub fn ping(&self, from: &str, to: &str) -> Result<bool> {
        let ip = self.run(&["overlay", to])?.trim().to_string();
        Ok(self.x_status(from, &["ping", "-c", "1", "-W", "1", &ip]))
    }

    /// Wait until every pair in `pairs` pings over the overlay.
    pub fn wait_connected(&self, pairs: &[(&str, &str)], within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        for (a, b) in pairs {
            while !self.ping(a, b)? {
                if Instant::now() > deadline {
                    bail!("{a} never reached {b}");
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        Ok(())
    }

    /// Elements of the agent's nftables block sets (empty when the table is absent).
    pub fn nft_elements(&self, node: &str) -> Result<String> {
        let out = self
            .cmd(&["x", node, "nft", "-j", "list", "table", "inet", "zonemesh"])
            .output()?;
        if !out.status.success() {
            return Ok(String::new());
        }
        let v: Value = serde_json::from_slice(&out.stdout)?;
        let elems: Vec<String> = v["nftables"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|o| o["set"]["elem"].as_array())
            .flatten()
            .map(Value::to_string)
            .collect();
        Ok(elems.join(" "))
    }

    /// The agent's ruleset as nft prints it.
    pub fn nft_ruleset(&self, node: &str) -> Result<String> {
        self.run(&["x", node, "nft", "list", "table", "inet", "zonemesh"])
    }
}

impl Drop for MeshLab {
    fn drop(&mut self) {
        let _ = self
            .cmd(&["down"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
