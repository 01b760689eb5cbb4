//! The namespaced lab of `scripts/mesh-lab.sh` (a controller and zones of agents on an
//! underlay bridge) driven from tests. Root only: check [`skip_reason`] first.

use crate::{bin, is_root};
use anyhow::{Context, Result, bail};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A running lab; `down` when dropped.
pub struct MeshLab {
    pub pfx: String,
    pub dir: PathBuf,
    /// Environment of every `mesh-lab.sh` call (LAB_ZONES, CTL_ARGS, ...).
    env: Vec<(String, String)>,
}

impl MeshLab {
    pub fn script() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/mesh-lab.sh")
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("bash");
        c.arg(Self::script()).args(args);
        c.env("PFX", &self.pfx).env("DIR", &self.dir);
        c.envs(self.env.iter().map(|(k, v)| (k, v)));
        c.env("BIN", bin("zonemesh-agent").parent().expect("bin dir"));
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

    /// The default lab: three zones of two agents.
    pub fn up(pfx: &str) -> Result<Self> {
        Self::up_with(pfx, &[])
    }

    /// A lab with `env` for every `mesh-lab.sh` call, e.g. `("LAB_NODES", "1")` or
    /// `("AGENT_ARGS", "--metrics-listen 127.0.0.1:9100")`.
    pub fn up_with(pfx: &str, env: &[(&str, &str)]) -> Result<Self> {
        let lab = Self {
            pfx: pfx.into(),
            dir: std::env::temp_dir().join(format!("zonemesh-lab-{pfx}")),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        let _ = lab.run(&["down"]);
        lab.run(&["up"])?;
        Ok(lab)
    }

    pub fn overlay(&self, node: &str) -> Result<String> {
        Ok(self.run(&["overlay", node])?.trim().to_string())
    }

    /// One ping attempt.
    pub fn ping_once(&self, from: &str, to: &str) -> Result<bool> {
        let ip = self.overlay(to)?;
        Ok(self
            .cmd(&["x", from, "ping", "-c", "1", "-W", "1", &ip])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?
            .success())
    }

    /// Wait until `from` reaches `to` (true) or not (false); returns the time it took.
    pub fn wait_ping(&self, from: &str, to: &str, want: bool, limit: Duration) -> Result<Duration> {
        let start = Instant::now();
        loop {
            if self.ping_once(from, to)? == want {
                return Ok(start.elapsed());
            }
            if start.elapsed() > limit {
                bail!(
                    "{from} -> {to}: reachability never became {want} within {limit:?}\n{}",
                    self.logs(from)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn status(&self, node: &str) -> Result<serde_json::Value> {
        let agent = bin("zonemesh-agent");
        let dir = self.dir.join(node);
        let out = self.run(&[
            "x",
            node,
            agent.to_str().context("path")?,
            "status",
            "--state-dir",
            dir.to_str().context("path")?,
            "--json",
        ])?;
        Ok(serde_json::from_str(&out)?)
    }

    pub fn peers(&self, node: &str) -> Result<Vec<String>> {
        let v = self.status(node)?;
        Ok(v["peers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["name"].as_str().map(String::from))
            .collect())
    }

    pub fn controller(&self, args: &[&str]) -> Result<String> {
        let mut c = Command::new(bin("zonemesh-controller"));
        c.arg("--data-dir").arg(self.dir.join("ctl")).args(args);
        crate::run_ok(&mut c)
    }

    pub fn logs(&self, node: &str) -> String {
        let tail = |f: &str| {
            let t = std::fs::read_to_string(self.dir.join(f)).unwrap_or_default();
            t.lines()
                .rev()
                .take(15)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n")
        };
        format!(
            "--- {node}.log\n{}\n--- controller.log\n{}",
            tail(&format!("{node}.log")),
            tail("controller.log")
        )
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

/// Why the lab cannot run here, if it cannot.
pub fn skip_reason() -> Option<&'static str> {
    if !is_root() {
        return Some("not root (network namespaces and TUN need it)");
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Some("/dev/net/tun missing");
    }
    None
}
