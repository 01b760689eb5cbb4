//! Real etcd members (Debian `etcd-server`) on free loopback ports with temporary data
//! directories: one member, or a cluster of three for failover tests. Killed and removed
//! on drop.

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One etcd member.
pub struct Member {
    pub name: String,
    pub client_port: u16,
    pub peer_port: u16,
    data_dir: PathBuf,
    log: PathBuf,
    cluster: String,
    child: Option<Child>,
}

/// A running etcd cluster (one or more members).
pub struct Etcd {
    pub members: Vec<Member>,
    _dir: tempfile::TempDir,
}

/// True when Debian's etcd is installed.
pub fn installed() -> bool {
    crate::have("etcd")
}

impl Member {
    fn spawn(&mut self, state: &str) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let child = Command::new("etcd")
            .args(["--name", &self.name, "--data-dir"])
            .arg(&self.data_dir)
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args([
                "--initial-cluster",
                &self.cluster,
                "--initial-cluster-state",
                state,
            ])
            .args(["--initial-cluster-token", "zonemesh-test"])
            // Quicker elections than the defaults, for failover tests on loopback.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting etcd")?;
        self.child = Some(child);
        Ok(())
    }

    /// `127.0.0.1:PORT` of the member's client listener.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    /// `kill -9` the member.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start a killed member again on its data.
    pub fn restart(&mut self) -> Result<()> {
        self.kill9();
        self.spawn("existing")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Etcd {
    /// `n` members on free loopback ports; returns once the cluster answers.
    pub fn start(n: usize) -> Result<Self> {
        if !installed() {
            bail!("etcd not installed");
        }
        let dir = tempfile::tempdir()?;
        let ports: Vec<(u16, u16)> = (0..n)
            .map(|_| (crate::cluster::free_port(), crate::cluster::free_port()))
            .collect();
        let cluster = ports
            .iter()
            .enumerate()
            .map(|(i, (_, p))| format!("e{i}=http://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut members: Vec<Member> = ports
            .iter()
            .enumerate()
            .map(|(i, (c, p))| Member {
                name: format!("e{i}"),
                client_port: *c,
                peer_port: *p,
                data_dir: dir.path().join(format!("e{i}")),
                log: dir.path().join(format!("e{i}.log")),
                cluster: cluster.clone(),
                child: None,
            })
            .collect();
        for m in &mut members {
            m.spawn("new")?;
        }
        let etcd = Self { members, _dir: dir };
        etcd.wait_healthy(Duration::from_secs(20))?;
        Ok(etcd)
    }

    /// Every member's client endpoint, comma-separated.
    pub fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(Member::endpoint)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The `--store` URL of this cluster, keys under `/PREFIX/`.
    pub fn url(&self, prefix: &str) -> String {
        format!("etcd://{}/{prefix}", self.endpoints())
    }

    /// Wait until `etcdctl endpoint health` passes for the members that run.
    pub fn wait_healthy(&self, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        let live: Vec<String> = self
            .members
            .iter()
            .filter(|m| m.child.is_some())
            .map(Member::endpoint)
            .collect();
        loop {
            let ok = Command::new("etcdctl")
                .env("ETCDCTL_API", "3")
                .args(["--endpoints", &live.join(","), "endpoint", "health"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return Ok(());
            }
            if Instant::now() > deadline {
                let logs: String = self.members.iter().map(|m| m.log_text()).collect();
                bail!("etcd did not become healthy:\n{logs}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Name of the current leader (`e0`, `e1`, ...), by `etcdctl endpoint status`.
    pub fn leader(&self) -> Result<String> {
        for m in self.members.iter().filter(|m| m.child.is_some()) {
            let out = Command::new("etcdctl")
                .env("ETCDCTL_API", "3")
                .args([
                    "--endpoints",
                    &m.endpoint(),
                    "endpoint",
                    "status",
                    "-w",
                    "json",
                ])
                .output()?;
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            let st = &v[0]["Status"];
            if !st.is_null() && st["leader"] == st["header"]["member_id"] {
                return Ok(m.name.clone());
            }
        }
        bail!("no leader found")
    }

    /// The member called `name`.
    pub fn member(&mut self, name: &str) -> &mut Member {
        self.members
            .iter_mut()
            .find(|m| m.name == name)
            .expect("a member of this cluster")
    }

    /// Where the members keep their data.
    pub fn dir(&self) -> &Path {
        self._dir.path()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for m in &mut self.members {
            m.kill9();
        }
    }
}
